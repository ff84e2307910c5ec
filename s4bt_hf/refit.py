"""Data-aware refit of a reduced model's output maps: with the reduced modes (and input vectors)
fixed, each channel's output vectors C and skip D are refit by least squares so that the
reduced layer's output matches the ORIGINAL layer's output on the original layer's own inputs,
captured with forward hooks on a few calibration batches.

For channel h of a layer with reduced discrete modes ā_j, input vector b̄_j and the layer's
input u, each output row ρ and mode j contribute Re(C_ρj z_j) ⋆_ρ u with z_j,k = b̄_j ā_j^k
(⋆_0: the causal convolution, ⋆_1: the backward one of a bidirectional layer), and

    Re(C z) = Re C · Re z - Im C · Im z,

so the layer output  y = Σ_ρj Re(C_ρj z_j) ⋆_ρ u + D u  is linear in θ = [Re C; Im C; D]:
y = X θ with the columns of X the responses Re z_j ⋆ u, -Im z_j ⋆ u and u. θ minimises
‖y_original - X θ‖² + α ‖θ - θ₀‖² (θ₀: the reduction method's own coefficients), i.e.

    (Xᵀ X + α I) θ = Xᵀ y_original + α θ₀,    α = 1e-6 · mean diag(Xᵀ X),

in float64, accumulated over the valid (attention-mask 1) positions of all calibration
sequences. The responses of nearby modes are nearly collinear over a finite window; the pull
towards θ₀ keeps the coefficients (and so the kernel beyond the data) from growing without
need.
Deterministic; the original model is run in eval mode without gradients and left as it was.

This file is copied into saved checkpoints (remote code): it imports only torch and siblings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch

from .kernel_s4dss import two_sided_kernel, zoh_discretize

_INPUT_KEYS = ("input_ids", "input_values", "inputs_embeds")
_ACCEPTED_KEYS = (*_INPUT_KEYS, "attention_mask", "labels")
_RIDGE = 1e-6


def check_calibration_data(model, calibration_data) -> list[dict]:
    """The calibration batches as a list of dicts of tensors the model takes; a clear error naming
    `calibration_data` (and the batch) for anything else, checked on the model itself without
    changing it. Accepts one batch (a dict), or any iterable of batches (a list, a generator, a
    torch `DataLoader`); values may be tensors or arrays (numpy). A batch is refused if it is
    empty, holds NaN or Inf, or drives a DSS layer's input or output to NaN or Inf: the refit's
    least squares would fit NaN output maps."""
    batches = batch_list(calibration_data, "`calibration_data`", "a dict of tensors such as {'input_values': ..., "
                         "'attention_mask': ...}")
    return [_checked_batch(model, index, batch) for index, batch in enumerate(batches)]


def batch_list(data, name: str, batch: str) -> list:
    """One batch (a mapping) or any iterable of batches (a list, a generator, a `DataLoader`) as a
    non-empty list; `name` and `batch` (what a batch is) word the errors."""
    if isinstance(data, Mapping):
        batches = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, str, bytes)):
        batches = list(data)
    else:
        raise TypeError(f"{name} must be a batch ({batch}) or an iterable of such batches (a list, a DataLoader), "
                        f"got {type(data).__name__}.")
    if not batches:
        raise ValueError(f"{name} holds no batch.")
    return batches


def _checked_batch(model, index: int, batch) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"`calibration_data` batch {index} must be a dict of tensors, got {type(batch).__name__}.")
    unknown = sorted(set(batch) - set(_ACCEPTED_KEYS))
    if unknown:
        raise ValueError(f"`calibration_data` batch {index} has key(s) {unknown} the model does not take "
                         f"(accepted: {', '.join(_ACCEPTED_KEYS)}).")
    inputs = [key for key in _INPUT_KEYS if key in batch]
    if len(inputs) != 1:
        raise ValueError(f"`calibration_data` batch {index} must hold exactly one of {', '.join(_INPUT_KEYS)}, "
                         f"got {inputs or 'none'}.")
    batch = {key: _as_tensor(index, key, value) for key, value in batch.items() if key != "labels"}
    values = batch[inputs[0]]
    if values.dim() == 0 or values.shape[0] == 0:
        raise ValueError(f"`calibration_data` batch {index}: `{inputs[0]}` holds no sequence (batch size 0, shape "
                         f"{tuple(values.shape)}).")
    # one forward now (the refit runs them again later) so that a batch that does not fit fails
    # before the reduction's work, with a message naming `calibration_data`
    overflow = []

    def watch(module, args, output, layer):
        if not (torch.isfinite(args[0]).all() and torch.isfinite(output).all()):
            overflow.append(layer)

    handles = [layer.kernel.register_forward_hook(lambda m, a, o, layer=number: watch(m, a, o, layer))
               for number, layer in enumerate(model.base_model.layers)]
    try:
        with torch.no_grad(), _evaluation(model):
            model(**batch)
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        raise ValueError(f"`calibration_data` batch {index} does not fit the model: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    bad = ~torch.isfinite(values) if values.is_floating_point() else torch.zeros_like(values, dtype=torch.bool)
    if "attention_mask" in batch:  # padded positions never reach the model (the forward checked the mask)
        valid = batch["attention_mask"].to(device=bad.device, dtype=torch.bool)
        bad &= valid.view(*valid.shape, *[1] * (bad.dim() - 2))
    if bad.any():
        raise ValueError(f"`calibration_data` batch {index}: `{inputs[0]}` holds NaN or Inf at valid positions (first "
                         f"at index {tuple(bad.nonzero()[0].tolist())}); the refit would fit NaN output maps.")
    if overflow:
        raise ValueError(f"`calibration_data` batch {index}: the input or output of DSS layer {overflow[0]} "
                         "overflows to NaN or Inf on this batch (values too large for the model's dtype); the "
                         "refit would fit NaN output maps. Scale the batch down.")
    return batch


def _as_tensor(index: int, key: str, value) -> torch.Tensor:
    """A batch value as a tensor: tensors as they are, arrays (numpy, anything with `__array__`)
    converted; anything else refused naming the batch and the key."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__array__"):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"`calibration_data` batch {index}: `{key}` cannot be read as a tensor: {error}") from error
    raise TypeError(f"`calibration_data` batch {index}: `{key}` must be a torch.Tensor or an array, got "
                    f"{type(value).__name__}.")


@contextmanager
def _evaluation(model):
    """Run a model in eval mode (no dropout, no BatchNorm statistics update), then restore the
    mode of every module."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def mode_responses(kernel, length: int) -> torch.Tensor:
    """The two-sided FFT layout (`two_sided_kernel`) of every regressor kernel of one reduced
    layer, (c, 2r, H, 2L) real in float64: row ρ, [Re z_j; -Im z_j] with z_j,k = b̄_j ā_j^k; padding
    modes (zero output vector) are left out as zero kernels."""
    with torch.no_grad():
        modes = kernel.modes(torch.float64).detach().cpu()
        log_dt = kernel.log_dt.detach().to("cpu", torch.float64, copy=True)
        input_vec = torch.view_as_complex(kernel.B.detach().to("cpu", torch.float64, copy=True).contiguous())
        # (c, H, r); a fresh copy: a loaded checkpoint's tensor may not be aligned for a complex128 view
        output_vec = torch.view_as_complex(kernel.C.detach().to("cpu", torch.float64, copy=True).contiguous())
    log_a_bar, input_bar = zoh_discretize(modes, log_dt, input_vec)
    steps = torch.arange(length, dtype=torch.float64)
    powers = input_bar.unsqueeze(-1) * torch.exp(log_a_bar.unsqueeze(-1) * steps)  # (H, r, L)
    basis = torch.cat([powers.real, -powers.imag], 1).transpose(0, 1)  # (2r, H, L)
    in_use = (output_vec != 0).any(0).transpose(0, 1)  # (r, H)
    basis = basis * torch.cat([in_use, in_use], 0).unsqueeze(-1)
    rows = output_vec.shape[0]
    layouts = []
    for row in range(rows):
        stacked = torch.zeros(rows, *basis.shape, dtype=torch.float64)
        stacked[row] = basis
        # two_sided_kernel takes (c, H, L): fold the 2r regressors into the channel axis
        layouts.append(two_sided_kernel(stacked.reshape(rows, -1, length)).reshape(*basis.shape[:2], 2 * length))
    return torch.stack(layouts)


class _NormalEquations:
    """Xᵀ X, Xᵀ y and yᵀ y of one layer, per channel, accumulated sequence by sequence."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.gram = self.cross = self.energy = None
        self.spectra, self.length = None, None

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor) -> None:
        """inputs, outputs (B, L, H); mask (B, L) bool of valid positions."""
        length = inputs.shape[1]
        if self.length != length:
            responses = mode_responses(self.kernel, length)
            self.spectra, self.length = torch.fft.rfft(responses, n=2 * length).flatten(0, 1), length  # (P-1, H, F)
        valid = mask.to(torch.float64).unsqueeze(1)  # (B, 1, L)
        signal = inputs.transpose(1, 2).to(torch.float64) * valid  # (B, H, L), padded positions zeroed
        target = outputs.transpose(1, 2).to(torch.float64) * valid
        count = self.spectra.shape[0] + 1
        # sequences at a time so that the responses (b, P, H, L) stay below ~2e7 numbers
        step = max(1, int(2e7 // (count * signal.shape[1] * length)))
        for start in range(0, signal.shape[0], step):
            chunk, goal, weight = signal[start:start + step], target[start:start + step], valid[start:start + step]
            convolved = torch.fft.irfft(self.spectra * torch.fft.rfft(chunk, n=2 * length).unsqueeze(1),
                                        n=2 * length)[..., :length]
            features = torch.cat([convolved * weight.unsqueeze(1), chunk.unsqueeze(1)], 1)  # (b, P, H, L)
            features = features.permute(2, 1, 0, 3).reshape(features.shape[2], count, -1)  # (H, P, b·L)
            gram = features @ features.mT
            cross = (features @ goal.transpose(0, 1).reshape(goal.shape[1], -1, 1)).squeeze(-1)
            energy = goal.square().sum((0, 2))
            if self.gram is None:
                self.gram, self.cross, self.energy = gram, cross, energy
            else:
                self.gram += gram
                self.cross += cross
                self.energy += energy

    def residual(self, theta: torch.Tensor) -> torch.Tensor:
        """Relative output error ‖y - Xθ‖ / ‖y‖ per channel."""
        squared = self.energy - 2 * (theta * self.cross).sum(-1) + (theta * (self.gram @ theta.unsqueeze(-1))
                                                                     .squeeze(-1)).sum(-1)
        return (squared.clamp_min(0.0) / self.energy.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()

    def solve(self, start: torch.Tensor) -> torch.Tensor:
        """θ of the regularised normal equations (see the module), pulled towards `start`."""
        weight = _RIDGE * self.gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
        identity = torch.eye(self.gram.shape[-1], dtype=torch.float64)
        return torch.linalg.solve(self.gram + weight[:, None, None] * identity,
                                  self.cross + weight.unsqueeze(-1) * start)


def _coefficients(kernel) -> torch.Tensor:
    """θ = [Re C (row-major over rows and modes); Im C; D] of a layer, (H, P)."""
    with torch.no_grad():
        output_vec = kernel.C.detach().to("cpu", torch.float64, copy=True)  # (c, H, r, 2)
        parts = [torch.cat([output_vec[row, ..., 0], output_vec[row, ..., 1]], -1) for row in range(len(output_vec))]
        return torch.cat([*parts, kernel.D.detach().to("cpu", torch.float64, copy=True).unsqueeze(-1)], -1)


def _write_coefficients(kernel, theta: torch.Tensor) -> None:
    rows, _, rank, _ = kernel.C.shape
    values = theta[:, :-1].reshape(-1, rows, 2, rank).permute(1, 0, 3, 2)  # (c, H, r, 2)
    with torch.no_grad():
        kernel.C.copy_(values.to(kernel.C.dtype))
        kernel.D.copy_(theta[:, -1].to(kernel.D.dtype))


def refit_output_maps(original, reduced, batches: list[dict]) -> list[dict]:
    """Refit the output vectors C and skips D of every DSS layer of `reduced` (in place: it is the
    new model `reduce` returns) on the calibration `batches` run through `original` (unchanged).
    Returns per layer the relative output error per channel before and after, and their means."""
    equations = [_NormalEquations(layer.kernel) for layer in reduced.base_model.layers]
    current = {"mask": None}
    handles = []
    for layer, accumulator in zip(original.base_model.layers, equations, strict=True):
        def capture(module, args, output, accumulator=accumulator):
            accumulator.add(args[0].detach().cpu(), output.detach().cpu(), current["mask"])
        handles.append(layer.kernel.register_forward_hook(capture))
    try:
        with torch.no_grad(), _evaluation(original):
            for batch in batches:
                inputs = next(batch[key] for key in _INPUT_KEYS if key in batch)
                mask = batch.get("attention_mask")
                current["mask"] = (torch.ones(inputs.shape[:2], dtype=torch.bool) if mask is None
                                   else mask.detach().cpu().bool())
                original(**batch)
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for layer, accumulator in zip(reduced.base_model.layers, equations, strict=True):
        start = _coefficients(layer.kernel)
        before = accumulator.residual(start)
        theta = accumulator.solve(start)
        after = accumulator.residual(theta)
        _write_coefficients(layer.kernel, theta)
        results.append({"error_before": [round(float(value), 7) for value in before],
                        "error_after": [round(float(value), 7) for value in after],
                        "mean_error_before": float(before.mean()), "mean_error_after": float(after.mean())})
    return results
