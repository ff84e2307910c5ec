"""Balanced truncation of a whole S4-DSS model: every channel of every DSS layer is reduced
(`balanced_truncation.reduce_to_modes`) and written back as the diagonal parameters of a new,
smaller model of the same class; every other weight is copied unchanged.

This file is copied into saved checkpoints (remote code): it imports only torch and siblings.
"""

from __future__ import annotations

import copy
import numbers

import torch

from .balanced_truncation import (
    CONTINUOUS,
    DISCRETE,
    TIME_DOMAINS,
    hankel_singular_values,
    kept_energy,
    reduce_to_modes,
)
from .compression_report import CompressionReport, LayerCompression
from .kernel_s4dss import vandermonde_kernel, zoh_discretize

SSM_PARAMETER_NAMES = ("log_dt", "log_A_real", "A_imag", "B", "C", "D")
# Modes of padding slots (nothing to hold): a stable continuous mode with zero output.
_PADDING_MODE = complex(-0.5, 0.0)
# A reduced discrete mode must lie strictly inside the unit circle for log|μ| < 0 to exist.
_MAX_DISCRETE_MAGNITUDE = 1.0 - 1e-12
_MIN_DISCRETE_MAGNITUDE = 1e-300


def balanced_truncate_model(model, rank=None, *, tol=None, time: str = DISCRETE, kernel_length: int = 1024,
                            workers: int | None = None):
    """Return a new model of `model`'s class whose DSS layers are balanced truncations of
    `model`'s, with `config.d_state` = the ranks and a `compression_report` attribute.
    `model` is never modified. See `S4DSSPreTrainedModel.balanced_truncate` for the arguments."""
    config = model.config
    layers = model.base_model.layers
    original_states = config.layer_d_states
    _check_arguments(rank, tol, time, kernel_length, original_states)
    systems = [_layer_system(index, layer.kernel, time) for index, layer in enumerate(layers)]
    if tol is not None:
        ranks = [_rank_for_energy(system, tol, time) for system in systems]
    elif isinstance(rank, numbers.Integral):
        ranks = [int(rank)] * len(layers)
    else:
        ranks = [int(value) for value in rank]

    # copies: the new model must never share memory with `model`
    new_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    reports = []
    for index, (layer, system) in enumerate(zip(layers, systems, strict=True)):
        while True:
            parameters, report = _truncate_layer(index, layer.kernel, system, ranks[index], time, kernel_length,
                                                 workers)
            # real poles can keep fewer than 2r states: raise r until the kept energy really reaches tol
            if tol is None or report.layer_kept_energy >= tol - 1e-12 or ranks[index] == original_states[index]:
                break
            ranks[index] += 1
        prefix = _parameter_prefix(model, layer.kernel)
        for name, value in parameters.items():
            original = getattr(layer.kernel, name)
            new_state[prefix + name] = value.to(dtype=original.dtype, device=original.device)
        reports.append(report)

    new_config = copy.deepcopy(config)
    new_config.d_state = ranks[0] if len(set(ranks)) == 1 else list(ranks)
    with torch.device("meta"):
        compressed = type(model)(new_config)
    compressed.load_state_dict(new_state, strict=True, assign=True)
    for name, parameter in compressed.named_parameters():
        parameter.requires_grad_(model.get_parameter(name).requires_grad)
    compressed.train(model.training)
    compressed.compression_report = CompressionReport(
        time=time,
        kernel_length=kernel_length,
        layers=reports,
        ssm_parameters_before=ssm_parameter_count(model),
        ssm_parameters_after=ssm_parameter_count(compressed),
        total_parameters_before=sum(p.numel() for p in model.parameters()),
        total_parameters_after=sum(p.numel() for p in compressed.parameters()),
        tol=tol,
    )
    return compressed


def _check_arguments(rank, tol, time, kernel_length, original_states) -> None:
    if (rank is None) == (tol is None):
        raise ValueError("balanced_truncate: give exactly one of `rank` (modes per channel) or `tol` (kept energy).")
    if time not in TIME_DOMAINS:
        raise ValueError(f"balanced_truncate: `time` must be one of {TIME_DOMAINS}, got {time!r}.")
    if isinstance(kernel_length, bool) or not isinstance(kernel_length, numbers.Integral) or kernel_length < 1:
        raise ValueError(f"balanced_truncate: `kernel_length` must be a positive int, got {kernel_length!r}.")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol <= 1:
            raise ValueError(f"balanced_truncate: `tol` is the fraction of Hankel energy to keep, in (0, 1]; "
                             f"got {tol!r}.")
        return
    values = [rank] * len(original_states) if not isinstance(rank, (list, tuple)) else list(rank)
    if len(values) != len(original_states):
        raise ValueError(f"balanced_truncate: `rank` lists {len(values)} values for {len(original_states)} layers.")
    for layer, (value, states) in enumerate(zip(values, original_states, strict=True)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"balanced_truncate: `rank` must be an int (complex modes per channel), got {value!r}.")
        if not 1 <= value <= states:
            raise ValueError(f"balanced_truncate: `rank` must be in [1, d_state={states}] for layer {layer}, "
                             f"got {value}.")


def _layer_system(index: int, kernel, time: str):
    """(modes, input vector, output rows (H, p, N), log Δ) of one layer in float64/complex128,
    after checking that every channel is finite and strictly stable."""
    with torch.no_grad():
        tensors = {name: getattr(kernel, name).detach().to("cpu", torch.float64) for name in SSM_PARAMETER_NAMES}
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            channel = _channel_of(bad, name)
            raise ValueError(f"balanced_truncate: layer {index}, channel {channel}: parameter `{name}` holds "
                             f"NaN or Inf.")
    modes = torch.complex(-torch.exp(tensors["log_A_real"]), tensors["A_imag"])
    log_dt = tensors["log_dt"]
    log_a_bar, input_bar = zoh_discretize(modes, log_dt, torch.view_as_complex(tensors["B"]))
    magnitude = torch.exp(log_a_bar.real)
    finite = torch.isfinite(modes) & torch.isfinite(log_a_bar) & torch.isfinite(input_bar)
    unstable = ~((modes.real < 0) & (magnitude < 1) & finite)
    if unstable.any():
        channel, mode = unstable.nonzero()[0].tolist()
        raise ValueError(f"balanced_truncate: layer {index}, channel {channel}, mode {mode} is not strictly stable "
                         f"(Re λ = {modes.real[channel, mode].item():.3g}, |exp(Δλ)| = "
                         f"{magnitude[channel, mode].item():.17g}, B̄ = {complex(input_bar[channel, mode])}); "
                         "balanced truncation needs finite Gramians.")
    output_rows = torch.view_as_complex(tensors["C"]).permute(1, 0, 2)  # (H, p, N)
    if time == CONTINUOUS:
        return modes, torch.view_as_complex(tensors["B"]), output_rows, log_dt
    return torch.exp(log_a_bar), input_bar, output_rows, log_dt


def _channel_of(bad: torch.Tensor, name: str) -> int | str:
    if name in ("log_dt", "D", "log_A_real", "A_imag", "B"):
        return bad.reshape(bad.shape[0], -1).any(-1).nonzero()[0].item()
    return bad.transpose(0, 1).reshape(bad.shape[1], -1).any(-1).nonzero()[0].item()  # C: (p, H, N, 2)


def _rank_for_energy(system, tol: float, time: str) -> int:
    """Smallest rank r whose 2r leading Hankel singular values of every channel together keep
    at least `tol` of the layer's Hankel energy:  Σ_h Σ_{i<=2r} σ_hi / Σ_h Σ_i σ_hi >= tol.
    A lower bound of the rank `tol` needs: with real poles a rank keeps fewer than 2r states."""
    modes, input_vec, output_rows, _ = system
    energy_by_position = hankel_singular_values(modes, input_vec, output_rows, time).sum(0)
    total = energy_by_position.sum()
    if total == 0:
        return 1
    kept = energy_by_position.cumsum(0)[1::2] / total  # kept[r - 1]: energy of 2r states
    return int((kept < tol - 1e-12).sum()) + 1


def _truncate_layer(index, kernel, system, rank, time, kernel_length, workers):
    modes, input_vec, output_rows, log_dt = system
    result = reduce_to_modes(modes, input_vec, output_rows, rank, time=time, workers=workers)
    dt = torch.exp(log_dt).unsqueeze(-1)
    reduced = result.modes
    adjusted = torch.zeros(reduced.shape, dtype=torch.bool)
    notes = []
    if time == DISCRETE:
        magnitude = reduced.abs()
        too_large = magnitude > _MAX_DISCRETE_MAGNITUDE
        too_small = magnitude < _MIN_DISCRETE_MAGNITUDE
        adjusted = (too_large | too_small) & ~result.padding
        phase = torch.where(magnitude > 0, reduced / magnitude.clamp_min(1e-320), torch.ones_like(reduced))
        reduced = torch.where(too_large, phase * _MAX_DISCRETE_MAGNITUDE, reduced)
        reduced = torch.where(too_small, phase * _MIN_DISCRETE_MAGNITUDE, reduced)
        continuous = torch.log(reduced) / dt
    else:
        unstable = (reduced.real >= 0) & ~result.padding
        adjusted = unstable
        continuous = torch.where(unstable, torch.complex(-1e-12 * reduced.abs().clamp_min(1.0), reduced.imag),
                                 reduced)
    for channel, mode in adjusted.nonzero().tolist():
        original_mode = complex(result.modes[channel, mode])
        notes.append(f"layer {index}, channel {channel}, mode {mode}: reduced mode {original_mode} moved to be "
                     "strictly stable and representable")
    continuous = torch.where(result.padding, torch.full_like(continuous, _PADDING_MODE), continuous)

    # residue w = c·b: split as b = sqrt(‖w‖), c = w / b so both vectors have similar size
    residues = result.residues  # (H, p, r)
    scale = residues.abs().square().sum(-2).sqrt().sqrt()  # (H, r)
    has_weight = scale > 0
    input_bar = torch.where(has_weight, scale, torch.ones_like(scale)).to(torch.complex128)
    output_vec = torch.where(has_weight.unsqueeze(-2), residues / input_bar.unsqueeze(-2), torch.zeros_like(residues))
    if time == DISCRETE:
        input_vec = input_bar * continuous / torch.expm1(dt * continuous)  # B̄ = expm1(Δλ)/λ · B
    else:
        input_vec = input_bar
    parameters = {
        "log_A_real": torch.log(-continuous.real),
        "A_imag": continuous.imag,
        "B": torch.view_as_real(input_vec.contiguous()),
        "C": torch.view_as_real(output_vec.permute(1, 0, 2).contiguous()),
    }
    kernel_error, kernel_norm = _kernel_errors(kernel, parameters, kernel_length)
    sigma = result.hankel_singular_values
    report = LayerCompression(
        layer=index,
        original_d_state=modes.shape[-1],
        rank=rank,
        hankel_singular_values=_rounded(sigma),
        kept_states=result.kept_states.tolist(),
        kept_energy=_rounded(kept_energy(sigma, result.kept_states)),
        error_bound=_rounded(result.error_bound),
        kernel_error=_rounded(kernel_error),
        kernel_norm=_rounded(kernel_norm),
        padded_modes=result.padding.sum(-1).tolist(),
        adjusted_modes=adjusted.sum(-1).tolist(),
        adjustments=notes,
        max_cholesky_shift=float(result.cholesky_shift.max()),
        max_eigenvector_condition=float(result.eigenvector_condition.max()),
    )
    return parameters, report


def _kernel_errors(kernel, parameters, length):
    """‖K - K_r‖_2 and ‖K‖_2 per channel over `length` steps and all outputs, K_r computed from
    the new parameters as the model will store them (its dtype)."""
    def kernel_of(log_a_real, a_imag, input_pairs, output_pairs, log_dt):
        modes = torch.complex(-torch.exp(log_a_real), a_imag)
        log_a_bar, input_bar = zoh_discretize(modes, log_dt, torch.view_as_complex(input_pairs))
        return vandermonde_kernel(log_a_bar, torch.view_as_complex(output_pairs) * input_bar, length)

    with torch.no_grad():
        original = {name: getattr(kernel, name).detach().to("cpu", torch.float64) for name in SSM_PARAMETER_NAMES}
        stored = {
            name: value.to(getattr(kernel, name).dtype).to(torch.float64).contiguous()
            for name, value in parameters.items()
        }
        full = kernel_of(original["log_A_real"], original["A_imag"], original["B"], original["C"], original["log_dt"])
        reduced = kernel_of(stored["log_A_real"], stored["A_imag"], stored["B"], stored["C"], original["log_dt"])
    error = (full - reduced).square().sum((0, 2)).sqrt()
    return error, full.square().sum((0, 2)).sqrt()


def _parameter_prefix(model, kernel) -> str:
    for name, module in model.named_modules():
        if module is kernel:
            return name + "."
    raise RuntimeError("DSS kernel not found in the model")  # unreachable for S4-DSS models


def ssm_parameter_count(model) -> int:
    """Parameters of all DSS kernels (modes, step, input and output vectors, skip)."""
    return sum(
        parameter.numel()
        for module in model.modules()
        if type(module).__name__ == "S4DSSKernel"
        for parameter in module.parameters(recurse=False)
    )


def _rounded(values: torch.Tensor, digits: int = 7):
    """Nested lists of floats rounded to `digits` significant digits (keeps the JSON small):
    x -> round(x · 10^(d-1-e)) / 10^(d-1-e) with e = floor(log10 |x|), vectorised."""
    values = values.to(torch.float64)
    exponent = torch.floor(torch.log10(values.abs().clamp_min(1e-300)))
    scale = torch.pow(10.0, digits - 1 - exponent)
    rounded = torch.where(torch.isfinite(values) & (values != 0), torch.round(values * scale) / scale, values)
    return rounded.tolist()
