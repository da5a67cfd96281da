"""How the float32 result of a step is stored into a 16-bit parameter.

A bfloat16 or float16 parameter is stepped in float32 (see :mod:`._generic`). Rounding
the result to nearest loses every update smaller than half a unit in the last place:
bfloat16 keeps 8 significant bits, so ``1 + 1e-3`` is ``1``, and a long run of small
steps stalls (Zamirai et al. 2020, "Revisiting BFloat16 Training"). Two remedies:

* ``"stochastic"``: round up with probability equal to the distance from the value
  below, in units of the gap, so the stored parameter is right on average. The uniform
  numbers come from a counter-based generator: a 32-bit integer hash ("lowbias32", C.
  Wellons) of the element's index and of keys derived from the optimizer's seed, the
  step and the tensor, computed with integer array operations that never overflow
  int64; a run is therefore reproducible and the same on NumPy, torch and CuPy.
* ``"compensated"``: a Kahan-style sum. A buffer of the parameter's dtype keeps what
  rounding dropped; the step updates ``param + compensation`` (in float32), stores its
  rounded value, and keeps the new residual in the buffer.

Both act only on 16-bit parameters; wider ones store their result as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optim_core import _namespace as ns

__all__ = ["Rounding", "ROUNDINGS", "hash32", "uniform", "stochastic_round",
           "is_16bit", "COMPENSATION"]

#: The ways a 16-bit parameter can be stored.
ROUNDINGS = ("nearest", "stochastic", "compensated")
#: The state entry holding a compensated parameter's residual.
COMPENSATION = "compensation"

_MASK = 0xFFFFFFFF
#: (significand bits after the point, smallest normal exponent) of each 16-bit format.
_FORMATS = {"bfloat16": (7, -126), "float16": (10, -14)}


def _host_hash(x: int) -> int:
    """lowbias32 on a Python int (the same function as :func:`hash32`)."""
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK
    x ^= x >> 16
    return x


def _multiply(xp: Any, x: Any, constant: int) -> Any:
    """``x * constant mod 2**32`` for int64 ``x`` below 2**32, in 16-bit halves so that no
    product passes 2**48 (int64 overflow is not the same in every library)."""
    low, high = constant & 0xFFFF, constant >> 16
    return xp.bitwise_and(x * low + xp.bitwise_left_shift(
        xp.bitwise_and(x * high, 0xFFFF), 16), _MASK)


def hash32(xp: Any, x: Any) -> Any:
    """lowbias32 of int64 values below 2**32, elementwise, on any array API namespace."""
    x = xp.bitwise_xor(x, xp.bitwise_right_shift(x, 16))
    x = _multiply(xp, x, 0x7FEB352D)
    x = xp.bitwise_xor(x, xp.bitwise_right_shift(x, 15))
    x = _multiply(xp, x, 0x846CA68B)
    return xp.bitwise_xor(x, xp.bitwise_right_shift(x, 16))


def uniform(xp: Any, n: int, key: int, *, like: Any) -> Any:
    """``n`` float32 numbers in ``[0, 1)`` (multiples of 2**-24), a function of ``key`` and
    each one's index only."""
    index = xp.arange(n, dtype=xp.int64, device=ns.device_of(like))
    bits = hash32(xp, xp.bitwise_xor(hash32(xp, xp.bitwise_xor(index, key & _MASK)),
                                     _host_hash(key >> 32)))
    return xp.astype(xp.bitwise_right_shift(bits, 8), xp.float32) * 2.0 ** -24


def is_16bit(dtype: Any) -> str | None:
    """"bfloat16" or "float16" for those dtypes (of any library), else None."""
    name = str(dtype).rsplit(".", 1)[-1]
    return name if name in _FORMATS else None


def stochastic_round(xp: Any, value: Any, dtype: Any, key: int) -> Any:
    """``value`` (float32) rounded stochastically to the 16-bit ``dtype``.

    ``dtype`` may also be the name "bfloat16" or "float16": the rounded values are then
    returned in float32 (for libraries without that dtype).

    The two neighbours of ``|value|`` on the target's grid are found with exact float32
    operations (the gap is a power of two: ``2**(e - p)`` for exponent ``e`` and ``p``
    significand bits, the smallest normal exponent below); the upper one is taken when the
    uniform number is below the fraction of the gap ``|value|`` lies above the lower one.
    Zeros, infinities and NaN keep their value; the result converts to ``dtype`` exactly
    (a value past the format's largest rounds to infinity, as to nearest).
    """
    bits, minimum = _FORMATS[is_16bit(dtype)]
    shape = value.shape
    flat = xp.reshape(value, (-1,))
    magnitude = xp.abs(flat)
    finite = xp.logical_and(xp.isfinite(flat), magnitude > 0)
    safe = xp.where(finite, magnitude, xp.ones_like(magnitude))
    two = xp.asarray(2.0, dtype=xp.float32, device=ns.device_of(flat))
    exponent = xp.floor(xp.log2(safe))
    # log2 may be off by one next to a power of two: correct it exactly.
    exponent = xp.where(xp.pow(two, exponent) > safe, exponent - 1, exponent)
    exponent = xp.where(xp.pow(two, exponent + 1) <= safe, exponent + 1, exponent)
    exponent = xp.maximum(exponent, xp.asarray(float(minimum), dtype=xp.float32,
                                               device=ns.device_of(flat)))
    gap = xp.pow(two, exponent - bits)
    below = xp.trunc(safe / gap) * gap
    fraction = (safe - below) / gap
    up = uniform(xp, int(flat.shape[0]), key, like=flat) < fraction
    rounded = xp.where(up, below + gap, below)
    rounded = xp.where(flat < 0, -rounded, rounded)
    rounded = xp.where(finite, rounded, flat)
    if isinstance(dtype, str):  # a format's name: its values, in float32
        return xp.reshape(rounded, shape)
    return xp.reshape(xp.astype(rounded, dtype), shape)


@dataclass(frozen=True)
class Rounding:
    """How one group's step stores its 16-bit parameters.

    Attributes
    ----------
    kind : {"stochastic", "compensated"}
    seed : int
        The optimizer's seed.
    step : int
        The step being taken (1 for the first).
    group : int
        The param group's index.
    """

    kind: str
    seed: int
    step: int
    group: int

    def key(self, tensor: int) -> int:
        """The generator's key for tensor ``tensor`` of the group at this step (64 bits)."""
        low = _host_hash(_host_hash(self.seed & _MASK) ^ _host_hash(self.step & _MASK) ^
                         (self.step >> 32))
        high = _host_hash(_host_hash((self.group << 20) ^ tensor) ^ (self.seed >> 32) ^ low)
        return (high << 32) | low
