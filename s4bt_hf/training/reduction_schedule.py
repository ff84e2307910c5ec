"""Reduction during training (CompreSSM-style): at a scheduled optimizer step every DSS layer is
reduced (by default balanced truncation; any method of `model.reduce`) and training goes on at the
smaller size, in the same model object.

What happens at the step (`reduce_during_training`):
  * every layer's channels are reduced by `model.reduce(method=..., rank=|tol=|budget=, **options)`
    (`reduce_model`: the one place that calls the reduction API), giving new `log_A_real`,
    `A_imag`, `B`, `C` (and a new `D` for methods with a direct term); `log_dt` and every
    non-SSM weight are unchanged, and the model is changed IN PLACE (the same module objects, the
    four parameters replaced by new ones of the reduced shape, D updated in place, `config.d_state`
    updated), so the training loop, the Accelerator and the Trainer keep their references;
  * the optimizer is rebuilt for the new shapes by swapping the replaced parameters inside its
    parameter groups (`swap_optimizer_parameters`): groups, learning rates and therefore the
    learning-rate schedule continue unchanged, and the Adam moments of every unchanged
    parameter are kept. The reduced SSM parameters start with fresh moments: their coordinates
    are new (balanced, truncated and re-diagonalised modes are mixtures of the old ones, matched
    to no old coordinate), so old moments would scale their updates by statistics of other
    quantities (CompreSSM keeps leading slices of the old moments, which has this problem);
  * the model gets a `compression_report` whose `training` entry says when and how it was reduced.
Method, options and budget are checked when the schedule is built and against the model before
the run (`check_model`), never first at the scheduled step.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field

import torch

from ..rank_budget import modes_for_budget
from ..reduction_methods import REDUCTION_METHODS, check_method_options, check_method_tol

REDUCED_PARAMETER_NAMES = ("log_A_real", "A_imag", "B", "C")  # new objects of the reduced shape
# log_dt and D keep their objects (and Adam moments); D's value changes only for methods with a direct term


@dataclass(frozen=True)
class ReductionSchedule:
    """Reduce every DSS layer once, at an optimizer step, and train on at the reduced size.

    Args:
        at: a float in (0, 1]: the fraction of the run's optimizer steps after which to reduce
            (step max(1, round(at · total_steps))); or an int >= 1: that optimizer step.
        method: a method of `model.reduce` (`s4bt_hf.reduction_methods.REDUCTION_METHODS`:
            "balanced_truncation" (default), "singular_perturbation", "modal_truncation", "h2", "last", "aire").
        rank: complex modes per channel after the reduction (an int, or one per layer), or
        tol: the fraction of each layer's Hankel energy to keep, in (0, 1], or
        budget: a model-wide size (an int: total complex modes Σ_layers d_model · rank; a float in
            (0, 1]: fraction of the SSM parameters), split between the layers by Hankel energy
            ("last", "aire": by their layer-normalised scores, one global threshold; they take no `tol`).
            Give exactly one of the three.
        time: `"discrete"` (default) or `"continuous"`: the system that is reduced.
        options: the method's options (e.g. `{"match_dc": True}` for modal truncation,
            `{"max_iterations": 20}` for h2), checked against the method's signature here.
    """

    at: float | int
    method: str = "balanced_truncation"
    rank: int | tuple[int, ...] | None = None
    tol: float | None = None
    time: str = "discrete"
    budget: int | float | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        at = self.at
        if isinstance(at, bool) or not isinstance(at, numbers.Real):
            raise TypeError(f"ReductionSchedule: `at` must be a fraction of the run (float) or a step (int), "
                            f"got {at!r}.")
        if isinstance(at, numbers.Integral):
            if at < 1:
                raise ValueError(f"ReductionSchedule: `at` as a step must be >= 1, got {at}.")
        elif not (math.isfinite(at) and 0 < at <= 1):
            raise ValueError(f"ReductionSchedule: `at` as a fraction of the run must be in (0, 1], got {at}.")
        if not isinstance(self.method, str) or self.method not in REDUCTION_METHODS:
            raise ValueError(f"ReductionSchedule: `method` must be one of {', '.join(REDUCTION_METHODS)}, "
                             f"got {self.method!r}.")
        self._check_options()
        given = [name for name in ("rank", "tol", "budget") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("ReductionSchedule: give exactly one of `rank` (modes per channel), `tol` (kept Hankel "
                             f"energy) or `budget` (model-wide size); got {given or 'none'}.")
        if self.rank is not None:
            ranks = list(self.rank) if isinstance(self.rank, (list, tuple)) else [self.rank]
            for value in ranks:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise ValueError(f"ReductionSchedule: `rank` must be a positive int (or one per layer), "
                                     f"got {self.rank!r}.")
            # plain ints (numpy's would not go into run_config.json); a list becomes a hashable tuple
            object.__setattr__(self, "rank", tuple(int(value) for value in ranks)
                               if isinstance(self.rank, (list, tuple)) else int(self.rank))
        try:
            check_method_tol(self.method, self.tol)
        except ValueError as error:
            raise ValueError(f"ReductionSchedule: {error}") from None
        if self.tol is not None and (isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real)
                                     or not 0 < self.tol <= 1):
            raise ValueError(f"ReductionSchedule: `tol` is the fraction of Hankel energy to keep, in (0, 1]; "
                             f"got {self.tol!r}.")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real)
                                        or not (math.isfinite(self.budget) and self.budget > 0)
                                        or (not isinstance(self.budget, numbers.Integral) and self.budget > 1)):
            raise ValueError(f"ReductionSchedule: `budget` must be an int >= 1 (total complex modes) or a float in "
                             f"(0, 1] (fraction of the SSM parameters), got {self.budget!r}.")
        if self.time not in ("discrete", "continuous"):
            raise ValueError(f"ReductionSchedule: `time` must be 'discrete' or 'continuous', got {self.time!r}.")
        for name in ("at", "tol", "budget"):  # numpy scalars as plain int/float (the schedule is saved as JSON)
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value) if isinstance(value, numbers.Integral) else float(value))

    def _check_options(self) -> None:
        """The method's typed option check (`check_method_options`, as `model.reduce` does), here
        rather than first at the scheduled step, mid-run; keeps the plain values it returns."""
        if not isinstance(self.options, dict):
            raise TypeError(f"ReductionSchedule: `options` must be a dict of the method's options, got "
                            f"{self.options!r}.")
        try:
            options = check_method_options(self.method, self.options)
        except (TypeError, ValueError) as error:
            raise type(error)(f"ReductionSchedule: `options`: {error}") from None
        object.__setattr__(self, "options", options)

    def __hash__(self):  # `options` is a dict: hash the JSON form
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def step(self, total_steps: int) -> int:
        """The optimizer step after which the model is reduced, checked against the run's length."""
        if isinstance(self.at, numbers.Integral):
            if self.at > total_steps:
                raise ValueError(f"ReductionSchedule: `at`={self.at} is beyond the run's {total_steps} optimizer "
                                 "steps.")
            return int(self.at)
        return min(total_steps, max(1, round(self.at * total_steps)))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["rank"] is not None and isinstance(data["rank"], tuple):
            data["rank"] = list(data["rank"])
        data["options"] = dict(data["options"])
        return data

    @classmethod
    def coerce(cls, value) -> ReductionSchedule | None:
        """A schedule from a schedule, a dict of its fields (a saved run configuration) or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"`reduction` must be a ReductionSchedule, a dict of its fields or None, got {value!r}.")

    def check_model(self, model) -> None:
        """Raise before training if this schedule cannot reduce `model` (no DSS layers, a rank
        above a layer's d_state: a reduction never adds modes, or a budget outside the model's size)."""
        config = getattr(model, "config", None)
        if not hasattr(model, "reduce") or not hasattr(config, "layer_d_states"):
            raise TypeError(f"ReductionSchedule: {type(model).__name__} is not an S4-DSS model; only S4-DSS models "
                            "(DSS layers) can be reduced during training.")
        states = config.layer_d_states
        if self.budget is not None:
            from ..compression import ssm_parameter_count

            try:
                modes_for_budget(self.budget, d_model=config.d_model, original_states=states,
                                 output_rows=2 if config.bidirectional else 1,
                                 ssm_parameters=ssm_parameter_count(model))
            except (TypeError, ValueError) as error:
                raise ValueError(f"ReductionSchedule: {error}") from None
            return
        if self.rank is None:
            return
        ranks = list(self.rank) if isinstance(self.rank, tuple) else [self.rank] * len(states)
        if len(ranks) != len(states):
            raise ValueError(f"ReductionSchedule: `rank` lists {len(ranks)} values for {len(states)} layers.")
        for layer, (rank, current) in enumerate(zip(ranks, states, strict=True)):
            if rank > current:
                raise ValueError(f"ReductionSchedule: `rank`={rank} would raise layer {layer}'s d_state={current}; a "
                                 "reduction can only keep or remove modes.")


def reduce_model(model, schedule: ReductionSchedule):
    """A NEW, reduced model with a `compression_report`: the single call into the reduction API."""
    rank = list(schedule.rank) if isinstance(schedule.rank, tuple) else schedule.rank
    return model.reduce(method=schedule.method, rank=rank, tol=schedule.tol, budget=schedule.budget,
                        time=schedule.time, **schedule.options)


def reduce_during_training(model, schedule: ReductionSchedule, step: int, total_steps: int) -> list:
    """Reduce `model` (unwrapped) in place at optimizer `step`; returns the (old, new) parameter
    pairs for `swap_optimizer_parameters`."""
    reduced = reduce_model(model, schedule)
    report = reduced.compression_report
    report.training = {"step": step, "total_steps": total_steps, "schedule": schedule.to_dict()}
    replaced = resize_dss_layers(model, reduced.config.layer_d_states)
    state = reduced.state_dict()
    with torch.no_grad():  # every value, in place: methods with a direct term also change D
        for name, parameter in model.named_parameters():
            parameter.copy_(state[name])
    model.compression_report = report
    return replaced


def resize_dss_layers(model, d_states: list[int]) -> list:
    """Give every DSS kernel of `model` new (zero) `log_A_real`, `A_imag`, `B`, `C` of
    `d_states[layer]` modes and set `config.d_state`; returns the (old, new) parameter pairs.
    Used at the reduction and, on resume, to give the model the shapes of a reduced checkpoint."""
    kernels = [layer.kernel for layer in model.base_model.layers]
    replaced = []
    for kernel, states in zip(kernels, d_states, strict=True):
        for name in REDUCED_PARAMETER_NAMES:
            old = getattr(kernel, name)
            shape = list(old.shape)
            shape[-2 if name in ("B", "C") else -1] = states
            new = torch.nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device),
                                     requires_grad=old.requires_grad)
            setattr(kernel, name, new)
            replaced.append((old, new))
        kernel.d_state = states
    value = d_states[0] if len(set(d_states)) == 1 else list(d_states)
    for config in {id(module.config): module.config for module in model.modules() if hasattr(module, "config")
                   and hasattr(module.config, "layer_d_states")}.values():
        config.d_state = value
    return replaced


def swap_optimizer_parameters(optimizer, replaced: list) -> None:
    """Put the new parameters in place of the old ones in `optimizer`'s groups (same positions,
    so groups, learning rates and the schedule carry on) and drop the old ones' state: the new
    parameters start with fresh Adam moments, every other parameter keeps its moments."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    new_by_old = {id(old): new for old, new in replaced}
    for group in optimizer.param_groups:
        group["params"] = [new_by_old.get(id(parameter), parameter) for parameter in group["params"]]
    for old, _ in replaced:
        optimizer.state.pop(old, None)


__all__ = ["ReductionSchedule", "reduce_during_training", "reduce_model", "resize_dss_layers",
           "swap_optimizer_parameters"]
