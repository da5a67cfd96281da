"""Checks of user-given values, in one place: numbers, integers, flags, choices.

Every public entry point (optimizer hyperparameters, fit's arguments, models,
schedules, data sets) checks its values with these functions, when the values are
given, and gets the same messages everywhere. A value of the wrong kind raises
:class:`WrongTypeError` ("must be a number, got 'a'"); a value of the right kind out of
range raises ValueError ("must be >= 0, got -1.0").

Numbers are Python ints and floats, NumPy real scalars (``np.float32(0.1)``,
``np.int64(1)``) and 0-d real arrays of any array library; they come back as Python
floats, so nothing downstream sees an array or a NumPy type. ``bool`` is never a number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = ["WrongTypeError", "number", "integer", "boolean", "choice", "number_pair"]


class WrongTypeError(TypeError, ValueError):
    """A value of the wrong kind (a string for a learning rate, a float for a count).

    A TypeError; also a ValueError, so callers that caught ValueError for any bad
    argument keep working.
    """


def _as_real(value: Any) -> float | int | None:
    """``value`` as a Python int or float if it is a real number, else None."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and tuple(shape) == () and dtype is not None:
        kind = getattr(dtype, "kind", None)
        if kind is None:  # torch and other libraries: ask the dtype's name
            name = str(dtype).rsplit(".", 1)[-1]
            kind = "f" if name.startswith(("float", "bfloat")) else \
                "i" if name.startswith(("int", "uint")) else None
        if kind in ("f", "i", "u"):
            try:
                item = value.item()
            except (AttributeError, TypeError, ValueError):
                return None
            return int(item) if kind in ("i", "u") else float(item)
    return None


def number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite Python float in the interval given.

    Raises
    ------
    WrongTypeError
        If ``value`` is not a real number (bools are not).
    ValueError
        If it is not finite (``10**400`` included) or outside the interval.
    """
    real = _as_real(value)
    if real is None:
        raise WrongTypeError(f"{name} must be a number, got {value!r:.80}")
    try:
        result = float(real)
    except OverflowError:
        result = math.inf if real > 0 else -math.inf
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {value!r:.80}")
    if (result <= low if low_open else result < low) or \
            (result >= high if high_open else result > high):
        raise ValueError(f"{name} must be {_interval(low, high, low_open, high_open)}, "
                         f"got {value!r:.80}")
    return result


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as a Python int, at least ``minimum``.

    Python and NumPy integers and 0-d integer arrays are integers; floats (even
    ``2.0``) and bools are not.
    """
    real = _as_real(value)
    if not isinstance(real, int):
        raise WrongTypeError(f"{name} must be an integer, got {value!r:.80}")
    if minimum is not None and real < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r:.80}")
    return real


def boolean(name: str, value: Any) -> bool:
    """``value`` as a Python bool (Python and NumPy bools only: 0 and 1 are not flags)."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":
        return bool(value)
    raise WrongTypeError(f"{name} must be a bool, got {value!r:.80}")


def choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` itself if it is one of ``choices`` (ValueError naming them otherwise)."""
    try:
        ok = value in choices
    except TypeError:  # unhashable
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r:.80}")
    return value


def number_pair(name: str, value: Any, **interval: Any) -> tuple[float, float]:
    """A pair of numbers (a tuple or list of two), each checked as :func:`number`."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") \
            or not hasattr(value, "__getitem__"):
        raise WrongTypeError(f"{name} must be a pair of numbers, got {value!r:.80}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers, got {len(value)} of them")
    return (number(f"{name}[0]", value[0], **interval),
            number(f"{name}[1]", value[1], **interval))
