"""The smallest reduced model whose validation metric stays within a tolerance of the original's
(`model.shrink`): a search over model-wide budgets and reduction methods.

The size of a candidate is its number of SSM states: the complex modes of all channels of all
layers, S = d_model · Σ_l r_l. A model-wide budget of m = Σ_l r_l modes per channel (from one per
layer to the original's Σ_l N_l) is split between the layers by each method's own rule (Hankel
energy for the balanced methods, the layer-normalised scores and one global threshold for
`last` and `aire`; `model.reduce(budget=...)`).

A candidate is accepted when its metric is within `max_drop` of the original's:
    higher-is-better metrics (accuracy, F1, exact match):  value >= original - max_drop
    lower-is-better metrics (loss, MSE, MAE):               value <= original · (1 + max_drop)
Assuming that a larger budget of one method is never worse, each (method, refit) pair is a
binary search for its smallest accepted m below the best m found so far: a pair that cannot beat
the best costs one evaluation (at best m - 1), the first pair about log2(Σ_l N_l) + 1. Every
candidate evaluated is recorded in the report, accepted or not.

This file is copied into saved checkpoints (remote code): it imports only torch and siblings.
"""

from __future__ import annotations

import copy
import json
import numbers
import time as clock
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from .evaluation_s4dss import evaluation_metrics
from .reduction_methods import REDUCTION_METHODS
from .refit import batch_list

# the metric each problem type is judged by, and which metrics grow when the model gets worse
DEFAULT_METRICS = {"single_label_classification": "accuracy", "multi_label_classification": "f1",
                   "regression": "mse", None: "accuracy"}
LOWER_IS_BETTER = ("loss", "mse", "mae")
METRICS = ("accuracy", "f1", "exact_match", "loss", "mse", "mae")
REPORT_FILE = "shrink_report.json"


@dataclass
class ShrinkCandidate:
    """One reduced model the search evaluated."""

    method: str
    refit: bool
    modes_per_channel: int  # m = Σ_l r_l
    states: int  # S = d_model · m complex modes
    states_removed: float  # 1 - S / S_original
    value: float  # the metric on the validation data
    accepted: bool
    ranks: list[int] = field(default_factory=list)  # r_l per layer
    seconds: float = 0.0  # reduction and evaluation


@dataclass
class ShrinkReport:
    """What `shrink` searched and found; `chosen` indexes `candidates` (None: no smaller model was
    within the tolerance, and the result is a copy of the original)."""

    metric: str
    original_value: float
    max_drop: float
    threshold: float  # the worst accepted value
    original_states: int
    methods: list[str]
    refit: list[bool]
    candidates: list[ShrinkCandidate]
    chosen: int | None
    validation_samples: int
    seconds: float

    @property
    def evaluations(self) -> int:
        return len(self.candidates)

    @property
    def best(self) -> ShrinkCandidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    def to_dict(self) -> dict:
        return {**asdict(self), "evaluations": self.evaluations}

    @classmethod
    def from_dict(cls, data: dict) -> ShrinkReport:
        data = {key: value for key, value in data.items() if key != "evaluations"}
        data["candidates"] = [ShrinkCandidate(**candidate) for candidate in data["candidates"]]
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    def to_markdown(self) -> str:
        best = self.best
        lines = [f"Original: {self.metric} {self.original_value:.4f} on {self.validation_samples} validation "
                 f"samples, {self.original_states} SSM states; accepted: {self.metric} "
                 f"{'<=' if self.metric in LOWER_IS_BETTER else '>='} {self.threshold:.4f}.", ""]
        if best is None:
            lines.append(f"No reduced model was within the tolerance ({self.evaluations} candidates evaluated).")
        else:
            lines.append(f"Chosen: {best.method}{' + refit' if best.refit else ''}, {best.states} states "
                         f"({100 * best.states_removed:.1f} % removed), {self.metric} {best.value:.4f} "
                         f"({self.evaluations} candidates evaluated).")
        lines += ["", "| method | refit | states | removed | " + self.metric + " | accepted |",
                  "|---|---|---|---|---|---|"]
        for candidate in self.candidates:
            lines.append(f"| {candidate.method} | {'yes' if candidate.refit else 'no'} | {candidate.states} | "
                         f"{100 * candidate.states_removed:.1f} % | {candidate.value:.4f} | "
                         f"{'yes' if candidate.accepted else 'no'} |")
        return "\n".join(lines) + "\n"


def acceptance_threshold(metric: str, original: float, max_drop: float) -> float:
    """original - max_drop (higher is better) or original · (1 + max_drop) (lower is better)."""
    return original * (1 + max_drop) if metric in LOWER_IS_BETTER else original - max_drop


def is_accepted(metric: str, value: float, threshold: float) -> bool:
    return value <= threshold if metric in LOWER_IS_BETTER else value >= threshold


def smallest_accepted(accepts, low: int, high: int) -> int | None:
    """The smallest m in [low, high] with accepts(m), assuming accepts is monotone (False then
    True); None if accepts(high) is False. Evaluates accepts(high) first, then bisects."""
    if high < low or not accepts(high):
        return None
    failed = low - 1  # below the range: treated as failing, never evaluated
    while high - failed > 1:
        middle = (failed + high) // 2
        if accepts(middle):
            high = middle
        else:
            failed = middle
    return high


def shrink_model(model, validation_data, max_drop: float = 0.005, *, methods=None, refit=False,
                 calibration_data=None, metric: str | None = None, log=None, **reduce_options):
    """See `S4DSSPreTrainedModel.shrink`."""
    started = clock.perf_counter()
    methods = _check_methods(methods)
    refits = _check_refit(refit, calibration_data)
    metric = _check_metric(metric, model.config)
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not 0 <= float(max_drop) < 1:
        raise ValueError(f"shrink: `max_drop` must be a number in [0, 1) (0.005 = half a point of accuracy), "
                         f"got {max_drop!r}.")
    max_drop = float(max_drop)
    batches = _validation_batches(validation_data)
    if "budget" in reduce_options or "rank" in reduce_options or "tol" in reduce_options:
        raise ValueError("shrink: the search chooses the size; `rank`, `tol` and `budget` cannot be given.")
    config = model.config
    original_modes = sum(config.layer_d_states)
    lowest = config.n_layers  # one mode per channel in every layer
    was_training = model.training  # evaluation switches to eval mode: the user's mode comes back after
    try:
        original_value = _evaluate(model, batches, metric, config)
        threshold = acceptance_threshold(metric, original_value, max_drop)
        samples = sum(int(_batch_size(batch)) for batch in batches)
        candidates = []
        # the smallest accepted so far: {"modes", "index", "model"}. Bisection only accepts below the
        # last accepted size, and each later pair searches below it, so every accept is the new best.
        best = {}
        say = log or (lambda message: None)

        def accepts(modes, method, with_refit):
            tick = clock.perf_counter()
            reduced = model.reduce(method, budget=modes * config.d_model,
                                   calibration_data=calibration_data if with_refit else None, **reduce_options)
            value = _evaluate(reduced, batches, metric, reduced.config)
            accepted = is_accepted(metric, value, threshold)
            candidates.append(ShrinkCandidate(
                method=method, refit=with_refit, modes_per_channel=modes, states=modes * config.d_model,
                states_removed=1 - modes / original_modes, value=value, accepted=accepted,
                ranks=list(reduced.config.layer_d_states), seconds=round(clock.perf_counter() - tick, 3)))
            if accepted:
                best.update(modes=modes, index=len(candidates) - 1, model=reduced)
            say(f"shrink: {method}{' + refit' if with_refit else ''}, {modes * config.d_model} states: "
                f"{metric} {value:.4f} ({'accepted' if accepted else 'refused'})")
            return accepted

        for method in methods:
            for with_refit in refits:
                ceiling = best["modes"] - 1 if best else original_modes
                smallest_accepted(lambda modes, m=method, r=with_refit: accepts(modes, m, r), lowest, ceiling)
    finally:
        model.train(was_training)
    # nothing within the tolerance: a copy as it was, its own compression report (if any) included
    shrunk = best["model"] if best else copy.deepcopy(model)
    shrunk.shrink_report = ShrinkReport(
        metric=metric, original_value=original_value, max_drop=max_drop, threshold=threshold,
        original_states=original_modes * config.d_model, methods=list(methods), refit=list(refits),
        candidates=candidates, chosen=best.get("index"), validation_samples=samples,
        seconds=round(clock.perf_counter() - started, 3))
    return shrunk


def _check_methods(methods) -> tuple[str, ...]:
    if methods is None:
        return tuple(REDUCTION_METHODS)
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    unknown = [method for method in methods if method not in REDUCTION_METHODS]
    if not methods or unknown:
        raise ValueError(f"shrink: `methods` must name reduction methods ({', '.join(REDUCTION_METHODS)}), "
                         f"got {unknown or 'none'}.")
    return tuple(dict.fromkeys(methods))


def _check_refit(refit, calibration_data) -> tuple[bool, ...]:
    """`refit` False, True, or both: (False, True)."""
    values = (refit,) if isinstance(refit, bool) else tuple(refit) if isinstance(refit, (list, tuple)) else None
    if not values or not all(isinstance(value, bool) for value in values):
        raise ValueError(f"shrink: `refit` must be True, False or a list of them (e.g. [False, True]), got {refit!r}.")
    if any(values) and calibration_data is None:
        raise ValueError("shrink: `refit=True` needs `calibration_data` (training batches; not the validation "
                         "data, which chooses the model).")
    return tuple(dict.fromkeys(values))


def _check_metric(metric, config) -> str:
    if metric is None:
        return DEFAULT_METRICS.get(config.problem_type, "accuracy")
    if metric not in METRICS:
        raise ValueError(f"shrink: `metric` must be one of {', '.join(METRICS)}, got {metric!r}.")
    return metric


def _validation_batches(validation_data) -> list[dict]:
    """The validation batches as dicts of tensors, each with `labels`."""
    batches = batch_list(validation_data, "shrink: `validation_data`", "a dict of tensors with `labels`")
    checked = []
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(f"shrink: `validation_data` batch {index} must be a dict of tensors, got "
                            f"{type(batch).__name__}.")
        if "labels" not in batch and "label" not in batch:
            raise ValueError(f"shrink: `validation_data` batch {index} has no `labels` (it has "
                             f"{', '.join(map(str, batch)) or 'nothing'}); the search compares candidates on them.")
        checked.append({("labels" if key == "label" else key): torch.as_tensor(value) for key, value in batch.items()})
    return checked


def _batch_size(batch: dict) -> int:
    labels = batch["labels"]
    return labels.shape[0] if labels.dim() > 0 else 1


def _evaluate(model, batches, metric: str, config) -> float:
    device = next(model.parameters()).device
    try:
        values = evaluation_metrics(model, batches, config=config, device=device)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"shrink: `validation_data` does not fit the model: {error}") from error
    if metric not in values:
        raise ValueError(f"shrink: `metric` {metric!r} is not a metric of this problem type "
                         f"({config.problem_type or 'single_label_classification'}: "
                         f"{', '.join(key for key in values if key != 'samples')}).")
    return float(values[metric])
