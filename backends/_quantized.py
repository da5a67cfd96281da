"""Block-wise quantized optimizer states: the storage kind, its maps and its generic path.

An optimizer made with ``state_bits=8`` or ``state_bits=4`` stores each state of a tensor
of at least :data:`QUANTIZE_MIN_SIZE` elements as a :class:`QuantizedState`: one code per
element (a byte at 8 bits, a nibble at 4) and one float32 scale per block of
:data:`BLOCK_SIZES` elements, the block's largest magnitude (absmax). An element's value
is ``qmap[code] * absmax[block]``, with ``qmap`` a sorted table of values in ``[-1, 1]``
(signed, for first moments) or ``[0, 1]`` (unsigned, for second moments):

* 8 bits: the dynamic (non-linear) maps of Dettmers et al. 2022, "8-bit Optimizers via
  Block-wise Quantization" (``bitsandbytes.functional.create_dynamic_map``): a sign bit,
  a run of zero bits giving the decimal exponent, an indicator bit, then linear fraction
  bits. Blocks of 256, as bitsandbytes' blockwise 8-bit optimizers.
* 4 bits: as Li et al. 2023, "Memory Efficient Optimizers with 4-bit States": first
  moments with the signed dynamic map of 3 exponent bits, second moments with the linear
  map ``1/16, 2/16, ..., 1`` *without zero* (a second moment rounded to 0 would divide the
  update by ``eps``: the paper's zero-point problem). Blocks of 128, as the paper.

Quantizing a value ``v`` of a block takes ``x = v / scale`` with ``scale`` the block's new
absmax rounded to float32 (1 where that is not positive, so an all-zero block stays
zero), and the code of the nearest map entry: the number of midpoints
``(qmap[k] + qmap[k + 1]) / 2`` below ``x`` (ties go to the lower entry; a NaN takes the
last code, as ``searchsorted`` orders it). Elements past the end of the last block count
as zeros. The rule itself never sees codes: every implementation dequantizes a state
into the rule's compute dtype, runs the rule's one definition, and quantizes the new
value (the fused kernels do all three in one pass over each block; see
:mod:`._numba` and :mod:`._cuda`). Tensors under :data:`QUANTIZE_MIN_SIZE` elements keep
float32 (the parameter's dtype) states, as bitsandbytes does: their state is a small
part of the memory, and their update loses nothing.

A 4-bit code array holds two elements a byte: element ``2j`` in the low nibble of byte
``j``, element ``2j + 1`` in the high nibble.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from optim_core import _namespace as ns

__all__ = ["QUANTIZE_MIN_SIZE", "BLOCK_SIZES", "STATE_BITS", "CODE_TABLE_BITS", "QuantizedState",
           "create_dynamic_map", "quantization_map", "midpoints", "quantize", "dequantize",
           "new_quantized_state", "is_quantized", "code_estimate", "ESTIMATE_OCTAVES"]

#: Tensors with fewer elements keep float32 states (bitsandbytes' ``min_8bit_size``).
QUANTIZE_MIN_SIZE = 4096
#: Elements per absmax block, by bits.
BLOCK_SIZES = {8: 256, 4: 128}
#: The state widths an optimizer accepts.
STATE_BITS = (32, 8, 4)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
    """The dynamic quantization map of Dettmers et al. 2022, as float32, sorted.

    The construction of ``bitsandbytes.functional.create_dynamic_map``: for each decimal
    exponent ``i`` below ``max_exponent_bits``, the midpoints of ``2**(i + f)`` equal
    steps of ``[0.1, 1]`` scaled by ``10**(i - max_exponent_bits + 1)`` (``f`` fraction
    bits, one more without a sign), their negatives when signed, then 0 and 1. Computed
    in float64 and rounded once to float32 (bitsandbytes rounds its float32 ``linspace``
    steps as it goes: see ``tests/test_quantized_states.py`` for how far apart they are).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = np.linspace(0.1, 1, items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10.0 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = np.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1) * means).tolist()
        if signed:
            data += (-(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
                     * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.asarray(data, dtype=np.float32))


def _linear_map_without_zero(bits: int) -> np.ndarray:
    return (np.arange(1, 2 ** bits + 1, dtype=np.float64) / 2 ** bits).astype(np.float32)


_MAPS = {
    (8, True): create_dynamic_map(True, 7, 8),
    (8, False): create_dynamic_map(False, 7, 8),
    (4, True): create_dynamic_map(True, 3, 4),
    (4, False): _linear_map_without_zero(4),
}
for _map in _MAPS.values():
    _map.flags.writeable = False
_MIDPOINTS = {}
for _key, _map in _MAPS.items():
    _MIDPOINTS[_key] = ((_map[:-1].astype(np.float64) + _map[1:]) / 2).astype(np.float32)
    _MIDPOINTS[_key].flags.writeable = False


#: Leading bits of a float32 that index :func:`code_table`'s buckets: sign, the 8
#: exponent bits and 7 significand bits, fine enough that no bucket holds two midpoints
#: of any map (13 bits left up to 5 of the unsigned 8-bit map's in one).
CODE_TABLE_BITS = 16


def _code_table(bits: int, signed: bool) -> tuple[np.ndarray, int, np.ndarray]:
    """The code of a float32 by its top bits: a first code and one threshold per bucket.

    Bucket ``b`` holds the float32 values whose bit pattern starts with the
    :data:`CODE_TABLE_BITS` bits of ``b``. ``starts[b]`` counts the midpoints below all of
    them, and at most ``steps`` (1) midpoint ``m`` lies among them, so the code of ``x``
    (the midpoints below it) is ``starts[b]`` plus whether ``m < x``. Within a bucket the
    values share their top bits, so that comparison is one of the low 16 bits, taken as
    :func:`code_key` orders them (reversed for negative values). ``packed[b]`` holds
    ``starts[b] << 16 | key(m)`` (key 0xFFFF, which no ``x`` exceeds, where the bucket
    holds no midpoint): the kernels' one lookup a value. The NaN buckets code to the last
    code, as ``searchsorted`` orders a NaN. Returns ``(packed, steps, midpoints)``.
    """
    mids = midpoints(bits, signed)
    shift = 32 - CODE_TABLE_BITS
    buckets = np.arange(1 << CODE_TABLE_BITS, dtype=np.uint32)
    low = (buckets << shift).view(np.float32)
    high = ((buckets << shift) | np.uint32((1 << shift) - 1)).view(np.float32)
    negative = (buckets >> (CODE_TABLE_BITS - 1)) == 1
    smallest, largest = np.where(negative, high, low), np.where(negative, low, high)
    starts = np.searchsorted(mids, smallest, side="left")
    ends = np.searchsorted(mids, largest, side="left")
    special = ((buckets >> (CODE_TABLE_BITS - 9)) & 0xFF) == 0xFF  # inf and NaN
    starts[special], ends[special] = mids.size, mids.size
    steps = int((ends - starts).max())
    assert steps <= 1, (bits, signed, steps)  # the kernels make one comparison
    keys = np.full(buckets.size, 0xFFFF, np.uint32)
    inside = ends > starts
    keys[inside] = code_key(mids[starts[inside]])
    packed = (starts.astype(np.uint32) << 16) | keys
    return packed.view(np.int32), steps, mids


#: The pairs of octaves :func:`code_estimate`'s lines are tabled for, by ``e >> 1`` (``e``
#: the biased binary exponent): ``2**-31 <= |x| < 2``; smaller magnitudes take the first
#: pair's lines, larger the last's.
ESTIMATE_OCTAVES = (48, 63)


def code_estimate(bits: int, signed: bool) -> tuple[np.ndarray, int]:
    """An estimate, in registers, of which midpoint lies nearest a value of an 8-bit map.

    The dynamic maps are linear within each decade: decade ``d``'s ``n`` entries are
    ``10**(d + 1) * (0.1 + (k + 0.5) * 0.9 / n)``, codes ``base + k``. So the position
    ``p(a) = base + (a / 10**(d + 1) - 0.1) * n / 0.9 - 0.5`` (``a`` in that decade)
    puts entry ``c`` at ``c`` and the midpoint after it near ``c + 0.5``; across decades
    ``p`` is continuous and concave (each decade's slope a fifth of the one below), so it
    is the least of the decades' lines, and on each pair of octaves ``[4**k, 4**(k + 1))``
    (a factor 4: it meets at most two decades) the least of those decades' two lines:
    ``p(a) = zero + min(a * A1[k] + B1[k], a * A2[k] + B2[k])``, with ``zero`` the code
    of 0. Below zero
    (signed maps, symmetric about 0 but for the last entry 1) ``p(x) = zero - (p(|x|) -
    zero)``. For every midpoint ``m_c``, ``c + 0.2 < p(m_c) < c + 0.8`` (checked here, in
    float64 with the float32 constants): as ``p`` increases, the whole part ``j`` of any
    ``y`` within 0.2 of ``p(x)``, held in ``[0, 2**bits - 2]``, is ``code(x)`` or
    ``code(x) - 1``, and ``code(x) = j + (m_j < x)``: one exact comparison with one
    midpoint. The kernels evaluate ``p`` in float32 (fused multiply-adds), within
    ``2**-16`` of it. Returns ``(lines, zero)``: ``lines`` float32 ``(4, 16)``, rows
    ``A1, B1, A2, B2`` and column ``(e >> 1) - ESTIMATE_OCTAVES[0]`` (``e`` the biased
    binary exponent of ``|x|``) for the pairs of :data:`ESTIMATE_OCTAVES`.
    """
    qmap = quantization_map(bits, signed).astype(np.float64)
    zero = int(np.flatnonzero(qmap == 0)[0])
    inner = np.flatnonzero((qmap > 0) & (qmap < 1))
    decades = np.floor(np.log10(qmap[inner])).astype(np.int64)
    slopes, intercepts = [], []
    for d in np.unique(decades):
        codes = inner[decades == d]
        n, top = codes.size, 10.0 ** (d + 1)
        entries = top * (0.1 + (np.arange(n) + 0.5) * 0.9 / n)
        assert np.allclose(qmap[codes], entries, rtol=1e-6, atol=0), (bits, signed, d)
        slopes.append(n / (0.9 * top))
        intercepts.append(codes[0] - 0.5 - n / 9 - zero)
    slopes64 = np.float32(slopes).astype(np.float64)
    intercepts64 = np.float32(intercepts).astype(np.float64)

    def least(a: np.ndarray) -> np.ndarray:
        return np.argmin(np.asarray(a)[:, None] * slopes64 + intercepts64, axis=1)

    low, high = ESTIMATE_OCTAVES
    octaves = np.arange(low, high + 1)
    first = least(2.0 ** (2 * octaves - 127))
    last = least(np.nextafter(2.0 ** (2 * octaves - 125), 0))
    assert (last - first).max() <= 1 and (last >= first).all(), (bits, signed)
    lines = np.float32([slopes64[first], intercepts64[first], slopes64[last],
                        intercepts64[last]])
    # The octave lines are the least of all where they are used.
    mids = midpoints(bits, signed).astype(np.float64)
    size = np.abs(mids)
    octave = np.clip((np.floor(np.log2(size)).astype(np.int64) + 127) >> 1, low, high) - low
    line = np.minimum(size * lines[0, octave] + lines[1, octave],
                      size * lines[2, octave] + lines[3, octave])
    assert np.array_equal(line, (size[:, None] * slopes64 + intercepts64).min(axis=1))
    offset = zero + np.copysign(line, mids) - np.arange(mids.size)
    assert offset.min() > 0.2 and offset.max() < 0.8, (bits, signed, offset.min(),
                                                         offset.max())
    return lines, zero


def code_key(values: np.ndarray) -> np.ndarray:
    """The low 16 bits of float32 ``values``, reversed for negative ones: within a bucket
    of :func:`code_table` (same sign, same top bits) they order as the values do."""
    u = np.asarray(values, np.float32).view(np.uint32)
    return (u ^ np.where(u >> 31 == 1, np.uint32(0xFFFF), np.uint32(0))) & np.uint32(0xFFFF)


def code_table(bits: int, signed: bool) -> tuple[np.ndarray, int, np.ndarray]:
    """``(packed, steps, midpoints)`` of :func:`_code_table`, made once."""
    key = (bits, bool(signed))
    table = _CODE_TABLES.get(key)
    if table is None:
        table = _CODE_TABLES[key] = _code_table(bits, signed)
    return table


_CODE_TABLES: dict[tuple[int, bool], tuple] = {}


def quantization_map(bits: int, signed: bool) -> np.ndarray:
    """The (read-only, float32, sorted) map of codes to values in units of a block's absmax."""
    return _MAPS[bits, bool(signed)]


def midpoints(bits: int, signed: bool) -> np.ndarray:
    """The ``2**bits - 1`` float32 midpoints between consecutive map entries."""
    return _MIDPOINTS[bits, bool(signed)]


class QuantizedState:
    """One state buffer stored as block-wise codes and scales.

    Attributes
    ----------
    codes : array of uint8
        ``size`` codes (8 bits) or ``ceil(size / 2)`` bytes of two codes (4 bits).
    absmax : array of float32
        One scale per block of :attr:`block` elements.
    bits : int
        8 or 4.
    signed : bool
        Which map: signed (first moments) or unsigned (second moments).
    shape : tuple of int
        The parameter's shape.
    """

    __slots__ = ("codes", "absmax", "bits", "signed", "shape", "size")

    def __init__(self, codes: Any, absmax: Any, bits: int, signed: bool,
                 shape: tuple[int, ...]) -> None:
        self.codes, self.absmax, self.bits, self.signed = codes, absmax, bits, bool(signed)
        self.shape = tuple(shape)
        self.size = math.prod(self.shape)

    @property
    def block(self) -> int:
        """Elements per absmax block."""
        return BLOCK_SIZES[self.bits]

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes and the scales."""
        return int(self.codes.size) * 1 + int(self.absmax.size) * 4

    def __repr__(self) -> str:
        return (f"QuantizedState(bits={self.bits}, signed={self.signed}, shape={self.shape}, "
                f"blocks={int(self.absmax.size)})")


def is_quantized(value: Any) -> bool:
    """Whether a state entry is a :class:`QuantizedState`."""
    return type(value) is QuantizedState


def code_count(bits: int, size: int) -> int:
    """Bytes of codes for ``size`` elements."""
    return size if bits == 8 else (size + 1) // 2


def block_count(bits: int, size: int) -> int:
    """Blocks (scales) for ``size`` elements."""
    return -(-size // BLOCK_SIZES[bits])


def _device_array(xp: Any, values: np.ndarray, like: Any) -> Any:
    """A host table (a map, its midpoints) on ``like``'s namespace and device, as it is."""
    return xp.asarray(np.array(values), device=ns.device_of(like))


def quantize(xp: Any, values: Any, bits: int, signed: bool, *, like: Any = None
             ) -> tuple[Any, Any]:
    """Codes and float32 absmax scales of ``values`` (any shape; flattened in C order).

    Array API calls only: runs on any namespace, with full-size temporaries (the generic
    path; the fused kernels quantize block by block).
    """
    block = BLOCK_SIZES[bits]
    like = values if like is None else like
    flat = xp.reshape(values, (-1,))
    size = flat.shape[0]
    blocks = block_count(bits, size)
    pad = blocks * block - size
    if pad:
        flat = xp.concat([flat, xp.zeros(pad, dtype=flat.dtype, device=ns.device_of(flat))])
    grid = xp.reshape(flat, (blocks, block))
    absmax = xp.astype(xp.max(xp.abs(grid), axis=1), xp.float32)
    scale = xp.astype(absmax, flat.dtype)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    x = xp.reshape(grid / scale[:, None], (-1,))
    mids = xp.astype(_device_array(xp, midpoints(bits, signed), like), flat.dtype)
    codes = xp.astype(xp.searchsorted(mids, x, side="left"), xp.uint8)
    if bits == 4:
        pairs = xp.reshape(codes, (-1, 2))
        codes = xp.bitwise_or(pairs[:, 0], xp.bitwise_left_shift(pairs[:, 1], xp.asarray(
            4, dtype=xp.uint8, device=ns.device_of(pairs))))
    return codes[:code_count(bits, size)], absmax


def dequantize(xp: Any, state: QuantizedState, dtype: Any, *, like: Any = None) -> Any:
    """The values of ``state`` as an array of ``dtype`` and the parameter's shape."""
    bits, block, size = state.bits, state.block, state.size
    codes = state.codes
    like = codes if like is None else like
    device = ns.device_of(codes)
    if bits == 4:
        low = xp.bitwise_and(codes, xp.asarray(15, dtype=xp.uint8, device=device))
        high = xp.bitwise_right_shift(codes, xp.asarray(4, dtype=xp.uint8, device=device))
        codes = xp.reshape(xp.stack([low, high], axis=1), (-1,))
    blocks = int(state.absmax.shape[0])
    pad = blocks * block - int(codes.shape[0])
    if pad:
        codes = xp.concat([codes, xp.zeros(pad, dtype=xp.uint8, device=device)])
    qmap = xp.astype(_device_array(xp, quantization_map(bits, state.signed), like), dtype)
    values = xp.take(qmap, xp.astype(codes, xp.int64), axis=0)
    values = xp.reshape(values, (blocks, block)) * xp.astype(state.absmax, dtype)[:, None]
    return xp.reshape(xp.reshape(values, (-1,))[:size], state.shape)


def new_quantized_state(xp: Any, param: Any, bits: int, signed: bool, fill: float
                        ) -> QuantizedState:
    """A state of ``param``'s shape holding ``fill`` everywhere, quantized."""
    dtype = xp.float64 if param.dtype == xp.float64 else xp.float32
    values = xp.full(tuple(param.shape), fill, dtype=dtype, device=ns.device_of(param))
    codes, absmax = quantize(xp, values, bits, signed, like=param)
    return QuantizedState(codes, absmax, bits, signed, tuple(param.shape))


def store_quantized(xp: Any, state: QuantizedState, values: Any) -> None:
    """Quantize ``values`` into ``state`` (in place where the library allows it)."""
    codes, absmax = quantize(xp, values, state.bits, state.signed, like=state.codes)
    if ns.is_writeable(state.codes):
        state.codes[...] = codes
        state.absmax[...] = absmax
    else:  # immutable libraries (JAX): new arrays
        state.codes, state.absmax = codes, absmax
