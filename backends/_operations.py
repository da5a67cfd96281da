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

The axis reductions (:data:`AXIS_REDUCTIONS`) reduce over one of the last two axes of a
tensor of two or more dimensions, keeping it with length 1, so their value broadcasts
against the tensor: ``row_mean(x)`` is the mean of each row,
``xp.sum(x, axis=-1, keepdims=True) / x.shape[-1]`` (shape ``(..., rows, 1)``), and
``col_mean(x)`` the mean of each column, over axis -2 (shape ``(..., 1, columns)``).
The mean over an empty axis is 0 (the sum's value, not NaN), so an empty tensor steps
to no change with finite states. Adafactor's factored second moment is written with them.

Matrix operations
-----------------
``orthogonalize`` (:data:`MATRIX_OPERATIONS`) acts on a whole 2-D tensor, not per
element: Newton-Schulz orthogonalization, as ``torch.optim.Muon`` runs it. Its meaning is
the same on every path, written once here with the namespace's own ``matmul`` (BLAS on
NumPy, cuBLAS on CuPy); the fused paths run the elementwise stages around it as generated
kernels (see :mod:`._lowering`) and call this function between them. It has no host
meaning: a matrix operation never takes scalar arguments only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["OPERATIONS", "REDUCTIONS", "AXIS_REDUCTIONS", "MATRIX_OPERATIONS", "generic_operations",
           "HOST_OPERATIONS", "orthogonalize"]

#: Per-tensor reductions a rule may call: one value per tensor from an elementwise
#: expression over all of its elements.
REDUCTIONS = ("sum", "norm", "size")

#: Reductions over one of the last two axes (kept with length 1): one value per row
#: (``row_mean``, over the last axis) or per column (``col_mean``, over the one before).
AXIS_REDUCTIONS = ("row_mean", "col_mean")

#: The operations that act on a whole tensor (as the whole value of an assignment).
MATRIX_OPERATIONS = ("orthogonalize",)
#: The only functions a rule may call.
OPERATIONS = ("sqrt", "abs", "maximum", "minimum", "sign", "lerp", "where", *REDUCTIONS,
              *AXIS_REDUCTIONS, *MATRIX_OPERATIONS)


def generic_operations(xp: Any) -> dict[str, Callable]:
    """The rule operations on array API namespace ``xp``."""

    def lerp(start: Any, end: Any, weight: float) -> Any:
        # torch.lerp's two-sided formula: exact at both ends of the interval.
        if isinstance(weight, (int, float)):
            if abs(weight) < 0.5:
                return start + weight * (end - start)
            return end - (end - start) * (1 - weight)
        # A 0-d array weight (the functional API traces the host scalars under jax.jit)
        # has no truth value: choose the side elementwise, with the same two formulas.
        return xp.where(xp.abs(weight) < 0.5, start + weight * (end - start),
                        end - (end - start) * (1 - weight))

    def norm(x: Any) -> Any:
        linalg = getattr(xp, "linalg", None)
        if linalg is not None and hasattr(linalg, "vector_norm"):
            return linalg.vector_norm(x)
        return xp.sqrt(xp.sum(x * x))  # a namespace without the linalg extension

    arrays = {"sqrt": xp.sqrt, "abs": xp.abs, "maximum": xp.maximum, "minimum": xp.minimum,
              "sign": xp.sign, "where": xp.where}
    def size(x: Any) -> float:
        return float(math.prod(x.shape))

    def orthogonalize_xp(x: Any, a: float, b: float, c: float, eps: float, steps: float,
                         bfloat16: bool = False) -> Any:
        return orthogonalize(xp, x, a, b, c, eps, steps, bfloat16)

    def axis_mean(x: Any, axis: int, name: str) -> Any:
        if x.ndim < 2:
            raise ValueError(f"{name} reduces over one of the last two axes, of a tensor of "
                             f"two or more dimensions; got shape {tuple(x.shape)}")
        # An empty axis: its sum, 0, divided by 1 (a mean of nothing adds nothing).
        return xp.sum(x, axis=axis, keepdims=True) / max(x.shape[axis], 1)

    def row_mean(x: Any) -> Any:
        return axis_mean(x, -1, "row_mean")

    def col_mean(x: Any) -> Any:
        return axis_mean(x, -2, "col_mean")

    return {"lerp": lerp, "sum": xp.sum, "norm": norm, "size": size,
            "row_mean": row_mean, "col_mean": col_mean,
            "orthogonalize": orthogonalize_xp,
            **{name: _on_arrays_or_host(function, HOST_OPERATIONS[name])
               for name, function in arrays.items()}}


def orthogonalize(xp: Any, x: Any, a: float, b: float, c: float, eps: float, steps: float,
                  bfloat16: bool = False) -> Any:
    r"""Newton-Schulz orthogonalization of the 2-D array ``x``, as ``torch.optim.Muon``.

    .. math::

        X_0 = G / \max(\lVert G\rVert_F, \epsilon), \qquad
        A_k = X_k X_k^\top, \qquad
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k

    for ``steps`` iterations, on :math:`G^\top` where ``x`` has more rows than columns
    (so the Gram matrix is the smaller one), transposed back at the end. The quintic's
    coefficients (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural
    networks") push every singular value towards 1 in few steps; the result is about
    :math:`U S' V^\top` with :math:`S'` near the identity, not exactly :math:`U V^\top`.
    The operations and their order are those of torch 2.13's
    ``torch.optim._muon._zeropower_via_newtonschulz``, products through ``xp.matmul``
    and the norm on the device (no host synchronization).

    Parameters
    ----------
    xp : namespace
    x : array, 2-D
    a, b, c : float
        The quintic's coefficients.
    eps : float
        Lower bound of the norm the input is divided by (a zero input stays zero).
    steps : int-valued float
        Number of iterations.
    bfloat16 : bool
        Iterate in bfloat16 as torch 2.13 always does: the input rounded to bfloat16, and
        every operation computed in float32 from bfloat16 operands and rounded to
        bfloat16 (torch's CPU and cuBLAS bfloat16 products accumulate in float32). The
        result is returned in ``x``'s dtype. False (the default) iterates in ``x``'s dtype.
    """
    if x.ndim != 2:
        raise ValueError(f"orthogonalize takes a 2-D array, got {x.ndim}-D")
    dtype = x.dtype
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    if bfloat16:
        low, f32 = bfloat16_dtype(xp), xp.float32

        def rounded(value: Any) -> Any:
            return xp.astype(xp.astype(value, low), f32)

        # float64 -> bfloat16 goes through float32 in torch (c10::BFloat16(float)).
        x = rounded(xp.astype(x, f32))
        norm = rounded(_norm(xp, x))
        x = rounded(x / xp.maximum(norm, rounded(xp.asarray(eps, dtype=f32))))
        for _ in range(int(steps)):
            gram = rounded(xp.matmul(x, x.T))
            update = rounded(b * gram + c * xp.matmul(gram, gram))
            x = rounded(a * x + xp.matmul(update, x))
        x = xp.astype(x, dtype)
    else:
        norm = _norm(xp, x)
        x = x / xp.maximum(norm, xp.asarray(eps, dtype=norm.dtype))
        for _ in range(int(steps)):
            gram = xp.matmul(x, x.T)
            update = b * gram + c * xp.matmul(gram, gram)
            x = a * x + xp.matmul(update, x)
    return x.T if transpose else x


def _norm(xp: Any, x: Any) -> Any:
    """The Frobenius norm of ``x`` as a 0-d array of its namespace (no host value)."""
    linalg = getattr(xp, "linalg", None)
    if linalg is not None and hasattr(linalg, "vector_norm"):
        return linalg.vector_norm(x)
    return xp.sqrt(xp.sum(x * x))


def bfloat16_dtype(xp: Any) -> Any:
    """The bfloat16 dtype of namespace ``xp``: torch's own, ``ml_dtypes.bfloat16`` for NumPy.

    Raises
    ------
    ImportError
        NumPy without ml_dtypes installed.
    TypeError
        A library without a bfloat16 dtype (CuPy, array_api_strict).
    """
    own = getattr(xp, "bfloat16", None)
    if own is not None:
        return own
    name = getattr(xp, "__name__", "")
    if name.endswith("torch"):
        import sys

        return sys.modules["torch"].bfloat16
    if name.endswith("numpy"):
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError("bfloat16 on NumPy needs ml_dtypes: pip install ml_dtypes") \
                from None
        return ml_dtypes.bfloat16
    raise TypeError(f"{name or xp!r} arrays have no bfloat16 dtype")


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
