"""Which parameters share memory: the bytes a strided array may touch, and overlap tests.

An optimizer updates each parameter in place, once a step; two parameters sharing
memory would have their shared elements stepped twice (``buf[0:4]`` and ``buf[2:6]``,
or one torch storage given twice through two views). :func:`check_no_overlap` refuses
them. NumPy, CuPy and torch arrays have addresses and strides: their byte extents are
compared (sorted, so thousands of parameters cost a sort), and where two extents
intersect NumPy decides exactly (``np.shares_memory``: ``buf[::2]`` and ``buf[1::2]``
interleave without sharing an element); for the others intersecting extents count as
overlap. Arrays of libraries without addresses (JAX's are immutable anyway,
array_api_strict's are opaque) are only compared by identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["extent", "check_no_overlap"]


def extent(x: Any) -> tuple[Any, int, int] | None:
    """``(device, first byte, one past the last byte)`` that ``x`` may touch; None if it is
    empty or its library gives no address."""
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return None
        return ("cpu", *_bounds(x.__array_interface__["data"][0], x.shape, x.strides,
                                x.itemsize))
    module = type(x).__module__
    if module.startswith("torch"):
        if x.numel() == 0 or getattr(x, "is_sparse", False):
            return None
        size = x.element_size()
        return (str(x.device), *_bounds(x.data_ptr(), tuple(x.shape),
                                        tuple(s * size for s in x.stride()), size))
    if module.startswith("cupy"):
        if x.size == 0:
            return None
        return (("cuda", x.device.id), *_bounds(x.data.ptr, x.shape, x.strides, x.itemsize))
    return None


def _bounds(pointer: int, shape: Sequence[int], strides: Sequence[int],
            itemsize: int) -> tuple[int, int]:
    low = pointer + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    high = pointer + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + itemsize
    return low, high


def _share_elements(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b``, whose extents intersect, share an element."""
    try:
        if type(a).__module__.startswith("torch"):
            a, b = a.detach().numpy(), b.detach().numpy()
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return bool(np.shares_memory(a, b, max_work=10**6))
    except (TypeError, RuntimeError, np.exceptions.TooHardError):
        pass
    return True  # cannot tell: intersecting extents count as overlap


def check_no_overlap(arrays: Sequence[Any], names: Sequence[str]) -> None:
    """ValueError naming two of ``arrays`` that are the same array or share memory."""
    seen: dict[int, str] = {}
    spans = []
    for name, x in zip(names, arrays, strict=True):
        if id(x) in seen:
            raise ValueError(f"parameters {seen[id(x)]!r} and {name!r} are the same array; "
                             "each parameter must be given once")
        seen[id(x)] = name
        span = extent(x)
        if span is not None:
            spans.append((span, name, x))
    # Sorted by device and first byte: each extent need only be compared with those
    # still open when it starts.
    spans.sort(key=lambda entry: (str(entry[0][0]), entry[0][1]))
    open_spans: list[tuple[tuple[Any, int, int], str, Any]] = []
    for span, name, x in spans:
        device, low, high = span
        open_spans = [o for o in open_spans if o[0][0] == device and o[0][2] > low]
        for (_, other_low, other_high), other_name, other in open_spans:
            if (other_low, other_high) == (low, high) and _same_layout(x, other):
                raise ValueError(f"parameters {other_name!r} and {name!r} are the same array "
                                 "(views of one memory: they overlap entirely); each "
                                 "parameter must be given once")
            if _share_elements(x, other):
                raise ValueError(f"parameters {other_name!r} and {name!r} overlap: they share "
                                 "memory, so the shared elements would be updated twice; give "
                                 "arrays that do not overlap")
        open_spans.append((span, name, x))


def _same_layout(a: Any, b: Any) -> bool:
    try:
        return math.prod(a.shape) == math.prod(b.shape) and a.dtype == b.dtype
    except (AttributeError, TypeError):
        return False
