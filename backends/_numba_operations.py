"""The rule's operations as numba source text, for every generated numba module.

One definition of each operation's meaning in the compiled CPU kernels (NaN handling
included): :mod:`._numba` (elementwise and quantized kernels) and :mod:`._factored`
(loop nests over rows and columns) both emit it."""

__all__ = ["OPERATION_HELPERS"]

#: Lines of source defining ``_sqrt``, ``_abs``, ``_maximum``, ``_minimum``, ``_where``
#: and ``_sign``; a module using them defines ``T``, its element type, first.
OPERATION_HELPERS = [
    "@numba.njit(inline='always')",
    "def _sqrt(x):",
    "    return np.sqrt(x)",
    "",
    "",
    "@numba.njit(inline='always')",
    "def _abs(x):",
    "    return np.abs(x)",
    "",
    "",
    "@numba.njit(inline='always')",
    "def _maximum(a, b):",
    "    # NaN propagates from either side, as xp.maximum does.",
    "    return a if (a >= b or a != a) else b",
    "",
    "",
    "@numba.njit(inline='always')",
    "def _minimum(a, b):",
    "    # NaN propagates from either side, as xp.minimum does.",
    "    return a if (a <= b or a != a) else b",
    "",
    "",
    "@numba.njit(inline='always')",
    "def _where(condition, a, b):",
    "    return a if condition else b",
    "",
    "",
    "@numba.njit(inline='always')",
    "def _sign(x):",
    "    # sign(0) = 0 and sign(NaN) = NaN, as xp.sign.",
    "    return T(1) if x > 0 else (T(-1) if x < 0 else (T(0) if x == 0 else x))",
    "",
    "",
]
