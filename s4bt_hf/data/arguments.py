"""Type checks of the task builders' arguments: a wrong type is reported by name at once, not
deep inside numpy or `datasets`."""

from __future__ import annotations

import numbers


def require_int(name: str, value, minimum: int | None = None) -> None:
    """`value` must be an int (numpy ints too, not bool or float) and at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
