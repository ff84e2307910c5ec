"""The reduction methods a model can be compressed with, by name, and the options each takes.

Every method is a pure function `method(system: DiagonalSystem, rank: int, *, pad_mode, workers,
**options) -> ReducedModes` on a bank of diagonal systems (one per channel of a layer); the
model-level path (`compression.reduce_model`) is shared by all of them.

This file is copied into saved checkpoints (remote code): it imports only torch and siblings.
"""

from __future__ import annotations

import inspect

from .balanced_truncation import balanced_truncation
from .h2_reduction import h2_optimal
from .modal_truncation import modal_truncation
from .singular_perturbation import singular_perturbation

REDUCTION_METHODS = {
    "balanced_truncation": balanced_truncation,
    "singular_perturbation": singular_perturbation,
    "modal_truncation": modal_truncation,
    "h2": h2_optimal,
}
# Keyword arguments the model-level path passes itself: not user options.
_PATH_ARGUMENTS = ("pad_mode", "workers")
# Methods whose details carry the kept real states and Hankel singular values of a balanced
# realisation (kept energy and the 2 Σ σ bound are then reported).
BALANCED_METHODS = ("balanced_truncation", "singular_perturbation")


def method_options(name: str) -> dict:
    """The options of method `name` with their defaults."""
    signature = inspect.signature(REDUCTION_METHODS[name])
    return {
        parameter.name: parameter.default
        for parameter in signature.parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name not in _PATH_ARGUMENTS
    }


def resolve_method(name, options: dict):
    """The function of method `name`, after checking that it exists and takes `options`."""
    if not isinstance(name, str) or name not in REDUCTION_METHODS:
        raise ValueError(f"`method` must be one of {', '.join(REDUCTION_METHODS)}; got {name!r}.")
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise TypeError(f"method {name!r} does not take option(s) {', '.join(unknown)} (it takes {takes}).")
    return REDUCTION_METHODS[name]
