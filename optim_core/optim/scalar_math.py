"""Math on a step's scalars that runs on host numbers and on 0-d arrays alike.

An optimizer's ``scalars`` derives a step's host values (bias corrections, decayed
step sizes) from the step count and the group state. The eager path calls it with
Python numbers: host float64 math and an exact integer step. The functional API
(:mod:`optim_core.optim.functional`) calls the very same method with 0-d arrays, the
step count among them, which ``jax.jit`` traces into the step's program. Python's
operators (``+ - * / **``, comparisons) work on both; these functions stand in for
what does not: ``math.sqrt``, ``max``/``min`` and ``a if condition else b`` (a traced
condition has no truth value).

On Python numbers each is the host meaning of the rule operation of the same name
(:data:`optim_core.backends._operations.HOST_OPERATIONS`), after one type test, so
the eager path keeps its float64 values and its speed. ``where`` evaluates both sides
on the host too: write the side that is not taken so that it cannot raise (see
:meth:`optim_core.RAdam.scalars`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _namespace as ns
from ..backends._operations import HOST_OPERATIONS

__all__ = ["sqrt", "maximum", "minimum", "where"]

_NUMBERS = (int, float)  # bool is an int; NumPy's float64 scalar is a float


def _array_of(args: tuple[Any, ...]) -> Any:
    return next(a for a in args if not isinstance(a, _NUMBERS))


def _as_array(xp: Any, value: Any, like: Any) -> Any:
    """``value`` as an array of ``like``'s dtype (a Python number), else itself."""
    if isinstance(value, _NUMBERS):
        return xp.asarray(value, dtype=like.dtype)
    return value


def sqrt(x: Any) -> Any:
    """Square root: ``math.sqrt`` of a number, the namespace's ``sqrt`` of an array."""
    if isinstance(x, _NUMBERS):
        return HOST_OPERATIONS["sqrt"](x)
    return ns.namespace_of(x).sqrt(x)


def maximum(a: Any, b: Any) -> Any:
    """The larger of ``a`` and ``b`` (NaN propagates), on numbers or arrays."""
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return HOST_OPERATIONS["maximum"](a, b)
    like = _array_of((a, b))
    xp = ns.namespace_of(like)
    return xp.maximum(_as_array(xp, a, like), _as_array(xp, b, like))


def minimum(a: Any, b: Any) -> Any:
    """The smaller of ``a`` and ``b`` (NaN propagates), on numbers or arrays."""
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return HOST_OPERATIONS["minimum"](a, b)
    like = _array_of((a, b))
    xp = ns.namespace_of(like)
    return xp.minimum(_as_array(xp, a, like), _as_array(xp, b, like))


def where(condition: Any, a: Any, b: Any) -> Any:
    """``a if condition else b``; for an array condition, the namespace's ``where`` (both
    sides are then evaluated, and a number side takes the other side's dtype)."""
    if isinstance(condition, (bool, np.bool_)):
        return a if condition else b
    xp = ns.namespace_of(condition)
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return xp.where(condition, xp.asarray(a), xp.asarray(b))
    like = _array_of((a, b))
    return xp.where(condition, _as_array(xp, a, like), _as_array(xp, b, like))
