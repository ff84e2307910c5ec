"""Reduction of a whole S4-DSS model: every channel of every DSS layer is a diagonal system
(`DiagonalSystem`), reduced by one of the methods of `reduction_methods.py` and written back as
the diagonal parameters of a new, smaller model of the same class; every other weight is copied
unchanged. The path is the same for every method: stability checks, rank choice (one rank,
kept energy `tol`, or a model-wide `budget`), write-back (modes kept unchanged keep their
continuous parameters; a method's direct term goes into the skip D), the optional data-aware
refit of the output maps, and the common report fields (kernel and DC-gain errors, parameter
counts, wall time); method-specific values go into each layer's `details`.

This file is copied into saved checkpoints (remote code): it imports only torch and siblings.
"""

from __future__ import annotations

import copy
import numbers
import time as clock
from dataclasses import dataclass

import torch

from .balanced_truncation import hankel_singular_values, kept_energy
from .compression_report import CompressionReport, LayerCompression
from .diagonal_system import CONTINUOUS, DISCRETE, TIME_DOMAINS, VANISHED_MAGNITUDE, DiagonalSystem, modal_dc_gain
from .kernel_s4dss import vandermonde_kernel, zoh_discretize
from .rank_budget import allocate_ranks, modes_for_budget, rank_gains
from .reduction_methods import REDUCTION_METHODS, SCORE_BUDGET_METHODS, check_method_options, check_method_tol
from .refit import check_calibration_data, refit_output_maps

SSM_PARAMETER_NAMES = ("log_dt", "log_A_real", "A_imag", "B", "C", "D")
# Modes of padding slots (nothing to hold): a stable continuous mode with zero output.
_PADDING_MODE = complex(-0.5, 0.0)
# A reduced discrete mode must lie strictly inside the unit circle for log|μ| < 0 to exist.
_MAX_DISCRETE_MAGNITUDE = 1.0 - 1e-12
# A reduced discrete mode that has vanished (|μ| < VANISHED_MAGNITUDE, e.g. exactly 0: a state
# that lives one step) has no logarithm; it is stored as Δ Re λ = -800, whose exp is exactly 0 in
# float32 and float64, so the layer reproduces it exactly (residue at lag 0, nothing after).
_VANISHED_DECAY = 800.0


def reduce_model(model, method: str = "balanced_truncation", rank=None, *, tol=None, budget=None,
                 time: str = DISCRETE, kernel_length: int = 1024, workers: int | None = None,
                 calibration_data=None, **method_options):
    """Return a new model of `model`'s class whose DSS layers are reduced by `method`, with
    `config.d_state` = the ranks and a `compression_report` attribute. `model` is never
    modified. See `S4DSSPreTrainedModel.reduce` for the arguments."""
    started = clock.perf_counter()
    method_options = check_method_options(method, method_options)  # plain, checked values (the report keeps them)
    check_method_tol(method, tol)
    reduce_layer = REDUCTION_METHODS[method]
    config = model.config
    layers = model.base_model.layers
    original_states = config.layer_d_states
    _check_arguments(rank, tol, budget, time, kernel_length, workers, original_states)
    on_meta = sorted({name.rsplit(".", 1)[0] for name, parameter in model.named_parameters() if parameter.is_meta})
    if on_meta:  # torch would fail with "Cannot copy out of meta tensor" deep inside
        raise ValueError(f"{method}: the model's weights are not materialised (on the meta device: "
                         f"{', '.join(on_meta[:3])}{', ...' if len(on_meta) > 3 else ''}); load weights or call "
                         "`model.to_empty(device=...)` and `model.init_weights()` first.")
    tol, budget, kernel_length = (_plain_number(value) for value in (tol, budget, kernel_length))
    batches = check_calibration_data(model, calibration_data) if calibration_data is not None else None
    systems = [_layer_system(index, layer.kernel, time) for index, layer in enumerate(layers)]
    first_lags = (0, 1) if config.bidirectional else (0,)
    banks = [DiagonalSystem(modes, input_vec, output_rows, time, first_lags)
             for modes, input_vec, output_rows, _ in systems]
    budget_report = None
    if tol is not None:
        ranks = [_rank_for_energy(bank, tol) for bank in banks]
    elif budget is not None:
        total = modes_for_budget(budget, d_model=config.d_model, original_states=original_states,
                                 output_rows=len(first_lags), ssm_parameters=ssm_parameter_count(model))
        if method in SCORE_BUDGET_METHODS:  # the method's own normalised scores, one global threshold
            gains = [SCORE_BUDGET_METHODS[method](bank) for bank in banks]
        else:
            sigmas = [hankel_singular_values(bank.modes, bank.input_vec, bank.output_vec, time) for bank in banks]
            gains = [rank_gains(sigma) for sigma in sigmas]
        ranks = allocate_ranks(gains, total)
        budget_report = {"budget": budget, "modes_per_channel": total, "ranks": list(ranks)}
        if method in SCORE_BUDGET_METHODS:  # the global threshold τ: kept slots score >= τ >= dropped ones
            budget_report["threshold"] = min(float(gain[:rank].min()) for gain, rank in zip(gains, ranks, strict=True))
    elif isinstance(rank, numbers.Integral):
        ranks = [int(rank)] * len(layers)
    else:
        ranks = [int(value) for value in rank]

    # copies: the new model must never share memory with `model`
    new_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    reports = []
    for index, (layer, bank, system) in enumerate(zip(layers, banks, systems, strict=True)):
        while True:
            result = reduce_layer(bank, ranks[index], pad_mode=0.0, workers=workers, **method_options)
            parameters, report = _layer_parameters(index, layer.kernel, bank, system[3], result, ranks[index],
                                                   kernel_length)
            # real poles can keep fewer than 2r states: raise r until the kept energy really reaches tol
            energy = report.layer_kept_energy
            if tol is None or energy is None or energy >= tol - 1e-12 or ranks[index] == original_states[index]:
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
    if batches is not None:
        for report, errors in zip(reports, refit_output_maps(model, compressed, batches), strict=True):
            report.refit = errors
        for index, layer in enumerate(compressed.base_model.layers):
            check_finite_parameters(index, layer.kernel, {"C": layer.kernel.C, "D": layer.kernel.D}, stage="refit")
    compressed.compression_report = CompressionReport(
        time=time,
        kernel_length=kernel_length,
        layers=reports,
        ssm_parameters_before=ssm_parameter_count(model),
        ssm_parameters_after=ssm_parameter_count(compressed),
        total_parameters_before=sum(p.numel() for p in model.parameters()),
        total_parameters_after=sum(p.numel() for p in compressed.parameters()),
        method=method,
        tol=tol,
        options=dict(method_options),
        budget=budget_report,
        wall_seconds=round(clock.perf_counter() - started, 3),
    )
    if batches is not None:  # the kernel errors above are those of the method; refit changes C and D
        _remeasure_errors(model, compressed, kernel_length)
    return compressed


def balanced_truncate_model(model, rank=None, *, tol=None, time: str = DISCRETE, kernel_length: int = 1024,
                            workers: int | None = None):
    """`reduce_model` with balanced truncation (see `S4DSSPreTrainedModel.balanced_truncate`)."""
    return reduce_model(model, "balanced_truncation", rank, tol=tol, time=time, kernel_length=kernel_length,
                        workers=workers)


def _check_arguments(rank, tol, budget, time, kernel_length, workers, original_states) -> None:
    given = [name for name, value in (("rank", rank), ("tol", tol), ("budget", budget)) if value is not None]
    if len(given) != 1:
        raise ValueError("reduce: give exactly one of `rank` (modes per channel) or `tol` (kept Hankel energy) or "
                         f"`budget` (modes or parameter fraction for the whole model); got {given or 'none'}.")
    if time not in TIME_DOMAINS:
        raise ValueError(f"reduce: `time` must be one of {TIME_DOMAINS}, got {time!r}.")
    if isinstance(kernel_length, bool) or not isinstance(kernel_length, numbers.Integral) or kernel_length < 1:
        raise ValueError(f"reduce: `kernel_length` must be a positive int, got {kernel_length!r}.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral)
                                or workers < 1):
        raise ValueError(f"reduce: `workers` must be a positive int (threads) or None, got {workers!r}.")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol <= 1:
            raise ValueError(f"reduce: `tol` is the fraction of Hankel energy to keep, in (0, 1]; got {tol!r}.")
        return
    if rank is None:
        return
    values = [rank] * len(original_states) if not isinstance(rank, (list, tuple)) else list(rank)
    if len(values) != len(original_states):
        raise ValueError(f"reduce: `rank` lists {len(values)} values for {len(original_states)} layers.")
    for layer, (value, states) in enumerate(zip(values, original_states, strict=True)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"reduce: `rank` must be an int (complex modes per channel), got {value!r}.")
        if not 1 <= value <= states:
            raise ValueError(f"reduce: `rank` must be in [1, d_state={states}] for layer {layer}, got {value}.")


def _plain_number(value):
    """A numpy or other `numbers` scalar as a Python int/float (reports are JSON), None unchanged."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def _layer_system(index: int, kernel, time: str):
    """(modes, input vector, output rows (H, p, N), log Δ) of one layer in float64/complex128,
    after checking that every channel is finite and strictly stable."""
    # parameters are read as fresh copies (`copy=True`) here and below: a loaded checkpoint's tensors may
    # lie 8-byte aligned in the file's memory, and a complex128 view of them crashes some torch kernels
    with torch.no_grad():
        tensors = {name: getattr(kernel, name).detach().to("cpu", torch.float64, copy=True)
                   for name in SSM_PARAMETER_NAMES}
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


def check_finite_parameters(index: int, kernel, parameters: dict, stage: str = "reduction") -> None:
    """The last guard of the write-back: a reduction (or the refit after it, `stage="refit"`) never
    stores a NaN or Inf (also none that appears only in the model's own dtype, e.g. a float32
    overflow). Raises naming the layer, the parameter and every channel concerned."""
    hint = ("Try another method, a larger rank or time='continuous'." if stage == "reduction" else
            "Try the reduction without `calibration_data`, or other calibration batches.")
    for name, value in parameters.items():
        stored = value.detach().to(getattr(kernel, name).dtype)
        bad = ~torch.isfinite(stored)
        if bad.any():
            channels = _channels_of(bad, name)
            raise ValueError(f"reduce: layer {index}, channel(s) {channels}: the {stage} gives parameter `{name}` "
                             f"NaN or Inf in {stored.dtype}; nothing was returned (the original model is "
                             f"unchanged). {hint}")


def _channels_of(bad: torch.Tensor, name: str) -> list[int]:
    """Every channel with a True in `bad`, laid out like kernel parameter `name` (C: (p, H, r, 2))."""
    if name == "C":
        bad = bad.transpose(0, 1)
    return bad.reshape(bad.shape[0], -1).any(-1).nonzero().squeeze(-1).tolist()


def _channel_of(bad: torch.Tensor, name: str) -> int | str:
    if name in ("log_dt", "D", "log_A_real", "A_imag", "B"):
        return bad.reshape(bad.shape[0], -1).any(-1).nonzero()[0].item()
    return bad.transpose(0, 1).reshape(bad.shape[1], -1).any(-1).nonzero()[0].item()  # C: (p, H, N, 2)


def _rank_for_energy(system: DiagonalSystem, tol: float) -> int:
    """Smallest rank r whose 2r leading Hankel singular values of every channel together keep
    at least `tol` of the layer's Hankel energy:  Σ_h Σ_{i<=2r} σ_hi / Σ_h Σ_i σ_hi >= tol.
    A lower bound of the rank `tol` needs: with real poles a rank keeps fewer than 2r states."""
    sigma = hankel_singular_values(system.modes, system.input_vec, system.output_vec, system.time)
    energy_by_position = sigma.sum(0)
    total = energy_by_position.sum()
    if total == 0:
        return 1
    kept = energy_by_position.cumsum(0)[1::2] / total  # kept[r - 1]: energy of 2r states
    return int((kept < tol - 1e-12).sum()) + 1


def _layer_parameters(index, kernel, bank: DiagonalSystem, log_dt, result, rank: int, kernel_length: int):
    """The new SSM parameters of one layer from a method's `ReducedModes`, and its report."""
    time = bank.time
    dt = torch.exp(log_dt).unsqueeze(-1)
    reduced = result.modes
    notes = []
    if time == DISCRETE:
        magnitude = reduced.abs()
        too_large = magnitude > _MAX_DISCRETE_MAGNITUDE
        vanished = magnitude < VANISHED_MAGNITUDE
        adjusted = too_large & ~result.padding
        reduced = torch.where(too_large, torch.polar(torch.full_like(magnitude, _MAX_DISCRETE_MAGNITUDE),
                                                     reduced.angle()), reduced)
        continuous = torch.log(torch.where(vanished, torch.ones_like(reduced), reduced)) / dt
        continuous = torch.where(vanished, torch.complex(-_VANISHED_DECAY / dt, torch.zeros_like(dt)), continuous)
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
    has_weight = scale != 0  # NaN must reach the final check, not become a zero output
    input_bar = torch.where(has_weight, scale, torch.ones_like(scale)).to(torch.complex128)
    output_vec = torch.where(has_weight.unsqueeze(-2), residues / input_bar.unsqueeze(-2), torch.zeros_like(residues))
    unchanged = _unchanged_modes(kernel, bank, result)
    if unchanged is not None:
        continuous = torch.where(unchanged.mode, unchanged.original_modes, continuous)
    if time == DISCRETE:
        input_vec = input_bar * continuous / torch.expm1(dt * continuous)  # B̄ = expm1(Δλ)/λ · B
    else:
        input_vec = input_bar
    if unchanged is not None:
        input_vec = torch.where(unchanged.vectors, unchanged.input_vec, input_vec)
        output_vec = torch.where(unchanged.vectors.unsqueeze(-2), unchanged.output_vec, output_vec)
    with torch.no_grad():
        skip = kernel.D.detach().to("cpu", torch.float64, copy=True) + result.feedthrough.sum(-1)
    parameters = {
        "log_A_real": torch.log(-continuous.real),
        "A_imag": continuous.imag,
        "B": torch.view_as_real(input_vec.contiguous()),
        "C": torch.view_as_real(output_vec.permute(1, 0, 2).contiguous()),
        "D": skip,
    }
    check_finite_parameters(index, kernel, parameters)
    kernel_error, kernel_norm, dc_gain_error = _kernel_errors(kernel, parameters, kernel_length)
    report = LayerCompression(
        layer=index,
        original_d_state=bank.num_modes,
        rank=rank,
        kernel_error=_rounded(kernel_error),
        kernel_norm=_rounded(kernel_norm),
        padded_modes=result.padding.sum(-1).tolist(),
        adjusted_modes=adjusted.sum(-1).tolist(),
        adjustments=notes,
        dc_gain_error=_rounded(dc_gain_error),
        details=_report_details(result.details),
    )
    return parameters, report


@dataclass
class _UnchangedModes:
    mode: torch.Tensor  # (H, r) bool: the reduced mode is one of the original modes
    vectors: torch.Tensor  # (H, r) bool: ... and its residues are unchanged too
    original_modes: torch.Tensor  # (H, r) continuous modes of the matched originals
    input_vec: torch.Tensor  # (H, r) their input vectors
    output_vec: torch.Tensor  # (H, p, r) their output vectors


def _unchanged_modes(kernel, bank: DiagonalSystem, result) -> _UnchangedModes | None:
    """The modes a method kept exactly (the same discrete/continuous mode as an original one):
    they keep that mode's continuous parameters (the log of a discrete mode is only defined up to
    2πi/Δ), and, where their residues are unchanged as well, its input and output vectors."""
    same_mode = (result.modes.unsqueeze(-1) == bank.modes.unsqueeze(-2)) & ~result.padding.unsqueeze(-1)
    unchanged = same_mode.any(-1)  # (H, r)
    if not unchanged.any():
        return None
    source = same_mode.to(torch.int8).argmax(-1)  # (H, r): index of the original mode
    with torch.no_grad():
        original_modes = kernel.modes(torch.float64).detach().cpu()
        original_input = torch.view_as_complex(kernel.B.detach().to("cpu", torch.float64, copy=True).contiguous())
        original_output = torch.view_as_complex(kernel.C.detach().to("cpu", torch.float64, copy=True).contiguous())
    rows = source.unsqueeze(-2).expand_as(result.residues)
    same_residues = unchanged & (result.residues == bank.residues().gather(-1, rows)).all(-2)
    return _UnchangedModes(mode=unchanged, vectors=same_residues, original_modes=original_modes.gather(-1, source),
                           input_vec=original_input.gather(-1, source),
                           output_vec=original_output.permute(1, 0, 2).gather(-1, rows))


def _report_details(details: dict) -> dict:
    """Method-specific values of one layer as JSON-friendly lists and scalars."""
    summary = {}
    for name, value in details.items():
        if name == "cholesky_shift":
            summary["max_cholesky_shift"] = float(value.max())
        elif name == "eigenvector_condition":
            summary["max_eigenvector_condition"] = float(value.max())
        elif name == "fell_back":
            summary["channels_kept_balanced"] = int(value.sum())
        elif name == "evaluations":
            summary["evaluations"] = int(value.max())
        elif name == "scores":
            continue  # (H, N): an ordering, not a result
        elif value.dtype.is_floating_point:
            summary[name] = _rounded(value)
        else:
            summary[name] = value.tolist()
    if "kept_states" in details and "hankel_singular_values" in details:
        summary["kept_energy"] = _rounded(kept_energy(details["hankel_singular_values"], details["kept_states"]))
    return summary


def _kernel_errors(kernel, parameters, length):
    """Per channel: ‖K - K_r‖_2 and ‖K‖_2 over `length` steps and all outputs, with the skip D in
    the lag-0 term of the forward row, and |DC gain - reduced DC gain| (Σ_k K_k over all k plus D,
    in closed form); everything computed from the new parameters as the model will store them
    (its dtype)."""
    def kernel_and_gain(log_a_real, a_imag, input_pairs, output_pairs, log_dt, skip):
        modes = torch.complex(-torch.exp(log_a_real), a_imag)
        log_a_bar, input_bar = zoh_discretize(modes, log_dt, torch.view_as_complex(input_pairs))
        weights = torch.view_as_complex(output_pairs) * input_bar
        values = vandermonde_kernel(log_a_bar, weights, length)
        values[0, :, 0] += skip
        gain = modal_dc_gain(torch.exp(log_a_bar), weights.transpose(0, 1), DISCRETE).sum((-2, -1)) + skip
        return values, gain

    with torch.no_grad():
        original = {name: getattr(kernel, name).detach().to("cpu", torch.float64, copy=True)
                    for name in SSM_PARAMETER_NAMES}
        stored = {
            name: value.to(getattr(kernel, name).dtype).to(torch.float64).contiguous()
            for name, value in parameters.items()
        }
        full, gain = kernel_and_gain(original["log_A_real"], original["A_imag"], original["B"], original["C"],
                                     original["log_dt"], original["D"])
        reduced, reduced_gain = kernel_and_gain(stored["log_A_real"], stored["A_imag"], stored["B"], stored["C"],
                                                original["log_dt"], stored["D"])
    error = (full - reduced).square().sum((0, 2)).sqrt()
    return error, full.square().sum((0, 2)).sqrt(), (gain - reduced_gain).abs()


def _remeasure_errors(model, compressed, kernel_length: int) -> None:
    """After a refit, the report's kernel and DC-gain errors are those of the model as stored."""
    for report, original, new in zip(compressed.compression_report.layers, model.base_model.layers,
                                     compressed.base_model.layers, strict=True):
        parameters = {name: getattr(new.kernel, name).detach().to("cpu", torch.float64, copy=True)
                      for name in ("log_A_real", "A_imag", "B", "C", "D")}
        error, _, gain_error = _kernel_errors(original.kernel, parameters, kernel_length)
        report.kernel_error, report.dc_gain_error = _rounded(error), _rounded(gain_error)


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
