"""The operations an update rule may call, with their two meanings.

The rule language (:mod:`optim_core.optim.language`) allows calls to these names only.
Each has an array meaning, for the generic path on any array API namespace
(:func:`generic_operations`), and a host meaning on Python floats
(:data:`HOST_OPERATIONS`), which the lowering uses for scalar-only subexpressions it
evaluates before a kernel runs. Both follow the array API standard's functions of the
same names (NaN propagates through ``maximum`` and ``minimum``); ``lerp`` is
``torch.lerp``'s two-sided formula, exact at both ends.

``where(condition, a, b)`` is the standard's ``where``: ``a`` where the condition holds,
else ``b``, element by element. Its condition is one comparison of arrays (``s < 0``,
``x >= threshold``); the language allows a comparison of arrays nowhere else, and at
least one of ``a`` and ``b`` must be an array (a scalar takes the other's dtype).

The reductions (:data:`REDUCTIONS`) take an elementwise expression and give one value
per tensor: ``sum(x)`` is ``xp.sum(x)``, ``norm(x)`` the Euclidean norm
``xp.linalg.vector_norm(x)`` over every element (both 0 for an empty tensor), and
``size(x)`` the number of elements (``x.numel()``, as a float). They have no
host meaning: their value exists only beside the tensor (see
:mod:`optim_core.optim.language`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["OPERATIONS", "REDUCTIONS", "generic_operations", "HOST_OPERATIONS"]

#: Per-tensor reductions a rule may call: one value per tensor from an elementwise
#: expression over all of its elements.
REDUCTIONS = ("sum", "norm", "size")

#: The only functions a rule may call.
OPERATIONS = ("sqrt", "abs", "maximum", "minimum", "sign", "lerp", "where", *REDUCTIONS)


def generic_operations(xp: Any) -> dict[str, Callable]:
    """The rule operations on array API namespace ``xp``."""

    def lerp(start: Any, end: Any, weight: float) -> Any:
        # torch.lerp's two-sided formula: exact at both ends of the interval.
        if abs(weight) < 0.5:
            return start + weight * (end - start)
        return end - (end - start) * (1 - weight)

    def norm(x: Any) -> Any:
        linalg = getattr(xp, "linalg", None)
        if linalg is not None and hasattr(linalg, "vector_norm"):
            return linalg.vector_norm(x)
        return xp.sqrt(xp.sum(x * x))  # a namespace without the linalg extension

    arrays = {"sqrt": xp.sqrt, "abs": xp.abs, "maximum": xp.maximum, "minimum": xp.minimum,
              "sign": xp.sign, "where": xp.where}
    def size(x: Any) -> float:
        return float(math.prod(x.shape))

    return {"lerp": lerp, "sum": xp.sum, "norm": norm, "size": size,
            **{name: _on_arrays_or_host(function, HOST_OPERATIONS[name])
               for name, function in arrays.items()}}


_PYTHON_NUMBERS = (int, float, bool)


def _on_arrays_or_host(on_arrays: Callable, on_host: Callable) -> Callable:
    """``on_arrays``, or the host meaning when every argument is a Python number.

    A call on scalars only (``minimum(high, 1.0)``) is host float64 math, as the
    lowering hoists it: an array library would return a 0-d float64 array (NumPy) that
    promotes float32 math after it, or refuse Python numbers (array_api_strict).
    """

    def operation(*args: Any) -> Any:
        for arg in args:
            # Exact types: a NumPy scalar (what a ufunc returns for 0-d arrays, np.float64
            # being a float subclass) keeps its dtype on the array side.
            if type(arg) not in _PYTHON_NUMBERS:
                return on_arrays(*args)
        return on_host(*args)

    operation.__name__ = on_arrays.__name__ if hasattr(on_arrays, "__name__") else "operation"
    return operation


def _host_maximum(a: float, b: float) -> float:
    if a != a:  # NaN propagates, as in xp.maximum
        return a
    if b != b:
        return b
    return a if a >= b else b


def _host_minimum(a: float, b: float) -> float:
    if a != a:  # NaN propagates, as in xp.minimum
        return a
    if b != b:
        return b
    return a if a <= b else b


def _host_where(condition: bool, a: float, b: float) -> float:
    return a if condition else b


def _host_sign(a: float) -> float:
    if a > 0:
        return 1.0
    if a < 0:
        return -1.0
    return 0.0 if a == 0 else a


def _host_lerp(start: float, end: float, weight: float) -> float:
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


#: Scalar versions of the operations, for hoisted subexpressions (host float64 math).
HOST_OPERATIONS: dict[str, Callable] = {"sqrt": math.sqrt, "abs": abs,
                                        "maximum": _host_maximum, "minimum": _host_minimum,
                                        "sign": _host_sign, "lerp": _host_lerp,
                                        "where": _host_where}
