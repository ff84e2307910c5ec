"""The reduction methods a model can be compressed with, by name, and the typed options each takes.

Every method is a pure function `method(system: DiagonalSystem, rank: int, *, pad_mode, workers,
**options) -> ReducedModes` on a bank of diagonal systems (one per channel of a layer); the
model-level path (`compression.reduce_model`) is shared by all of them.

The options of a method are declared once, next to its registration (`METHOD_OPTIONS`), and that
declaration is the one check of `model.reduce(...)`, `ReductionSchedule` and the command line's
`--option`/`--reduce-option NAME=VALUE` (`check_method_options`, `parse_method_options`).

This file is copied into saved checkpoints (remote code): it imports only the standard library and siblings.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .balanced_truncation import balanced_truncation
from .h2_reduction import MAX_ITERATIONS, h2_optimal
from .modal_truncation import modal_truncation
from .peer_pruning import aire_pruning, aire_rank_gains, last_pruning, last_rank_gains
from .singular_perturbation import singular_perturbation

# The command line's spellings of a bool option (any letter case): one word per value, as in JSON
# and Python; 0/1 and yes/no are refused so that a typo never flips an option.
_TRUE_WORDS, _FALSE_WORDS = ("true",), ("false",)


@dataclass(frozen=True)
class MethodOption:
    """One keyword option of a reduction method: its type (`bool`, `int` or `float`), default,
    the range an `int`/`float` value must lie in (`minimum`/`maximum`, inclusive) and a line of help."""

    name: str
    type: type
    default: object
    help: str
    minimum: float | None = None
    maximum: float | None = None

    @property
    def accepted(self) -> str:
        """The values this option takes, in words."""
        if self.type is bool:
            return "true or false"
        kind = "an integer" if self.type is int else "a finite number"
        if self.minimum is not None and self.maximum is not None:
            return f"{kind} in [{self.minimum}, {self.maximum}]"
        if self.minimum is not None:
            return f"{kind} >= {self.minimum}"
        if self.maximum is not None:
            return f"{kind} <= {self.maximum}"
        return kind

    def check(self, method: str, value):
        """`value` as this option's plain Python type (numpy scalars become int/float/bool). A value
        of another type is a `TypeError` (a float for an int, 1 or "no" for a bool: never coerced),
        a value outside the range a `ValueError`; both name the method, the option and the value."""
        where = f"method {method!r}: option `{self.name}`"
        if self.type is bool:
            if not _is_bool(value):
                raise TypeError(f"{where} must be a bool (True or False), got {value!r} ({type(value).__name__}).")
            return bool(value)
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{where} must be an int, got {value!r} ({type(value).__name__}).")
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{where} must be a float, got {value!r} ({type(value).__name__}).")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where} must be finite, got {value!r}.")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ValueError(f"{where} must be {self.accepted}, got {value!r}.")
        return value

    def parse(self, method: str, text: str):
        """The value of the command-line text `text` (of `NAME=VALUE`), read by this option's type
        and checked as `check` does; anything else is a `ValueError` naming the accepted values."""
        word = text.strip()
        if self.type is bool:
            if word.lower() in _TRUE_WORDS + _FALSE_WORDS:
                return word.lower() in _TRUE_WORDS
            value = None
        else:
            try:
                value = int(word) if self.type is int else float(word)
            except ValueError:
                value = None
        if value is None:
            raise ValueError(f"method {method!r}: option `{self.name}` takes {self.accepted}, got {text!r}.")
        return self.check(method, value)


def _is_bool(value) -> bool:
    """A Python or numpy bool (numpy is not imported: remote code)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


REDUCTION_METHODS = {
    "balanced_truncation": balanced_truncation,
    "singular_perturbation": singular_perturbation,
    "modal_truncation": modal_truncation,
    "h2": h2_optimal,
    "last": last_pruning,
    "aire": aire_pruning,
}
# The options of each method: its keyword-only arguments besides the path's own `pad_mode` and
# `workers` (tests/test_method_options.py checks them against the signatures).
METHOD_OPTIONS = {
    "balanced_truncation": (),
    "singular_perturbation": (),
    "modal_truncation": (
        MethodOption("match_dc", bool, False,
                     "move the dropped modes' DC gain into the skip D (modal singular perturbation)"),
    ),
    "h2": (
        MethodOption("max_iterations", int, 50, "most L-BFGS iterations from the balanced-truncation start (it stops "
                     "earlier at convergence, usually within a few hundred; 0 keeps the start)",
                     minimum=0, maximum=MAX_ITERATIONS),
    ),
    "last": (),
    "aire": (),
}
# Methods that split a `budget=` between the layers by their own layer-normalised scores (one
# global threshold, see `peer_pruning.py`) instead of Hankel energy: {method: gains of one layer's
# bank (N,)}. They define no kept-energy tolerance, so they refuse `tol=` (`check_method_tol`).
SCORE_BUDGET_METHODS = {
    "last": last_rank_gains,
    "aire": aire_rank_gains,
}
# Methods whose details carry the kept real states and Hankel singular values of a balanced
# realisation (kept energy and the 2 Σ σ bound are then reported).
BALANCED_METHODS = ("balanced_truncation", "singular_perturbation")


def method_options(name: str) -> dict:
    """The options of method `name` with their defaults."""
    return {option.name: option.default for option in METHOD_OPTIONS[_check_method(name)]}


def check_method_options(name, options: dict) -> dict:
    """`options` of method `name` as plain Python values, after checking that the method exists
    (`ValueError`), that it takes every option (`TypeError`) and each value (`MethodOption.check`)."""
    schema = _option_schema(name, options)
    return {key: schema[key].check(name, value) for key, value in options.items()}


def parse_method_options(name, pairs) -> dict:
    """The options of method `name` from the command line's (NAME, VALUE text) pairs, each read by
    its option's type (`MethodOption.parse`: bools are true/false); an option given twice is an error."""
    names = [key for key, _ in pairs]
    schema = _option_schema(name, names)
    repeated = sorted({key for key in names if names.count(key) > 1})
    if repeated:
        raise ValueError(f"method {name!r}: option(s) {', '.join(repeated)} given more than once.")
    return {key: schema[key].parse(name, text) for key, text in pairs}


def check_method_tol(name, tol) -> None:
    """A `ValueError` if `tol` is given for a method that defines no kept-energy tolerance."""
    if tol is not None and name in SCORE_BUDGET_METHODS:
        raise ValueError(f"method {name!r} takes `rank` or `budget` (its paper's global threshold on layer-normalised "
                         f"scores), not `tol`: it defines no kept-energy tolerance; got tol={tol!r}.")


def _option_schema(name, given) -> dict:
    """{option name: MethodOption} of method `name`, after checking the method and the `given` names."""
    schema = {option.name: option for option in METHOD_OPTIONS[_check_method(name)]}
    unknown = sorted(set(given) - set(schema))
    if unknown:
        takes = ", ".join(schema) if schema else "no options"
        raise TypeError(f"method {name!r} does not take option(s) {', '.join(unknown)} (it takes {takes}).")
    return schema


def _check_method(name) -> str:
    if not isinstance(name, str) or name not in REDUCTION_METHODS:
        raise ValueError(f"`method` must be one of {', '.join(REDUCTION_METHODS)}; got {name!r}.")
    return name
