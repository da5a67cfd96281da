"""The operations an update rule may call, with their two meanings.

The rule language (:mod:`optim_core.optim.language`) allows calls to these names only.
Each has an array meaning, for the generic path on any array API namespace
(:func:`generic_operations`), and a host meaning on Python floats
(:data:`HOST_OPERATIONS`), which the lowering uses for scalar-only subexpressions it
evaluates before a kernel runs. Both follow the array API standard's functions of the
same names (NaN propagates through ``maximum``); ``lerp`` is ``torch.lerp``'s
two-sided formula, exact at both ends.

The reductions (:data:`REDUCTIONS`) take an elementwise expression and give one value
per tensor: ``sum(x)`` is ``xp.sum(x)`` and ``norm(x)`` the Euclidean norm
``xp.linalg.vector_norm(x)`` over every element (0 for an empty tensor). They have no
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
REDUCTIONS = ("sum", "norm")

#: The only functions a rule may call.
OPERATIONS = ("sqrt", "abs", "maximum", "sign", "lerp", *REDUCTIONS)


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

    return {"sqrt": xp.sqrt, "abs": xp.abs, "maximum": xp.maximum, "sign": xp.sign,
            "lerp": lerp, "sum": xp.sum, "norm": norm}


def _host_maximum(a: float, b: float) -> float:
    if a != a:  # NaN propagates, as in xp.maximum
        return a
    if b != b:
        return b
    return a if a >= b else b


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
                                        "maximum": _host_maximum, "sign": _host_sign,
                                        "lerp": _host_lerp}
