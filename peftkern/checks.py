"""Validation of user-given values: one place for the messages every bad input gets.

Each check returns the value normalised (an int, a float) or raises TypeError (wrong type)
or ValueError (right type, out of range), naming the option and the valid choices.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence


def integer(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """An int >= ``minimum`` (bools are refused: True is not a rank)."""
    if value is None and allow_none:
        return None
    what = f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what}, got {value}")
    return int(value)


def real(name: str, value: Any, low: float = float("-inf"), high: float = float("inf"), *,
         low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """A real number (not NaN, not a bool) in [low, high], with open ends where asked. TypeError for a
    value of another type, ValueError for a number outside the range (NaN included)."""
    if value is None and allow_none:
        return None
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    what = f"{name} must be a real number in {lo}{low:g}, {high:g}{hi}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}, got {value!r}")
    if value != value:
        raise ValueError(f"{what}, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        raise ValueError(f"{what}, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """True or False itself (a string such as "no" is truthy, and would mean the opposite)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value: Any, valid: Sequence[str]) -> str:
    """One of ``valid`` (strings)."""
    listing = ", ".join(valid)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {listing}; got {value!r}")
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; valid choices: {listing}")
    return value


__all__ = ["integer", "real", "boolean", "choice"]
