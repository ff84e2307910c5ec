"""argparse `type=` converters of the `s4bt` command: a bad value is refused while the command
line is parsed, in one line naming the option (argparse adds the option's name)."""

from __future__ import annotations

import argparse
import math


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    return _number(text)


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def unit_interval_open_right(text: str) -> float:
    """A value in [0, 1): dropout, warm-up ratio."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def unit_interval_closed(text: str) -> float:
    """A value in (0, 1]: the fraction of Hankel energy to keep."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def rank_budget(text: str):
    """`--budget`: an integer is a total number of complex modes, a number in (0, 1] a fraction
    of the SSM parameters."""
    try:
        return int(text)
    except ValueError:
        value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an integer (total modes) or a fraction in (0, 1], got {text!r}")
    return value


def method_option(text: str):
    """`--option NAME=VALUE` of a reduction method: (NAME, VALUE text). The value is read by the
    option's type once the method is known (`reduction_methods.parse_method_options`)."""
    name, separator, value = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value
