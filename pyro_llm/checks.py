"""Argument checks shared by every configuration object, so the Python API refuses exactly what the
command line refuses, with a message that names the option and the value."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_SEED", "check_bool", "check_choice", "check_int", "check_real"]


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> None:
    """``value`` is an integer in ``[low, high]``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is ``True`` or ``False`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


#: the largest seed torch's generators take
MAX_SEED = 2 ** 63 - 1


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
