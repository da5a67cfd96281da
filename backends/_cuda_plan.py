"""Step plans of the fused CuPy path: a device-resident table, one launch for all small tensors.

A plan (see :meth:`optim_core.backends._fused.FusedImplementation.plan_step`, which
keeps it while the parameter list and the state dicts are the same objects and no
state was written) is made once per param group from a full check of its parameters
and states, and holds:

* the group's tensors in rows, sorted by dtype, and within one dtype the small ones
  (at most ``multi_max_size`` elements) first, then the large ones, then the empty
  ones;
* per dtype, a table on the device (:func:`~._cuda.table_length` ``long long``): each
  small tensor's first block (and the total), its size, and the addresses of its
  parameter and states, read by the ``name_table`` kernel of whatever specialization
  the step's scalars choose (the table does not depend on it: every kernel of a rule
  and a set of states takes the same arrays);
* what every planned array must still be, and every gradient must be: the address and
  size of each parameter and state, each parameter's shape, strides and dtype.

Each step, in C-level passes over the arrays (``map`` with ``attrgetter``, no
per-tensor Python code): every planned array must still have its planned memory pointer
object (``data``; a CuPy array cannot be resized in place nor given other strides, but
re-initialized it gets a new one) and size, and every gradient must have its parameter's shape,
strides (C-contiguous: the parameter's) and dtype and a device address; the gradients'
addresses go into one small host array. Any difference and the step takes the full
path, which checks everything again and says what is wrong. That array is copied to the
device with one asynchronous copy from pinned memory (none when the addresses are those
of the last step, as a memory pool often gives), then one launch per dtype runs every
small tensor: block ``b`` finds its tensor by a binary search of the first blocks.
Large tensors keep their own launches.

A pinned buffer is written again only once the event recorded after the launch that
read it has completed, so the host never waits on the device unless it runs
:data:`PINNED_BUFFERS` steps ahead with new gradient addresses every step.
"""

from __future__ import annotations

import ctypes
from collections import deque
from operator import attrgetter, is_
from typing import Any

import numpy as np

__all__ = ["CudaPlan", "CupyDevice", "make_plan", "PINNED_BUFFERS"]

#: Pinned host buffers of gradient addresses per plan, in turn: a step writes one whose
#: copy (and the launch reading its result) the device has finished.
PINNED_BUFFERS = 4

#: (event, buffers) of dropped plans, kept until the device has passed the event.
_RETIRED: list[tuple] = []

_ADDRESS = attrgetter("data.ptr")
_DATA = attrgetter("data")
_SIZE = attrgetter("size")
_GRAD = attrgetter("shape", "strides", "dtype")


class CupyDevice:
    """The device operations of a plan, through CuPy's public API (tests replace it with
    a host stand-in)."""

    def to_device(self, host: np.ndarray) -> Any:
        """A device copy of ``host`` (once per plan)."""
        import cupy

        return cupy.asarray(host)

    def empty(self, n: int) -> Any:
        import cupy

        return cupy.empty(n, dtype=cupy.int64)

    def pinned(self, n: int) -> tuple[np.ndarray, Any]:
        """``n`` int64 of page-locked host memory, as a NumPy array, and its owner."""
        import cupy

        memory = cupy.cuda.alloc_pinned_memory(8 * n)
        return np.frombuffer(memory, np.int64, n), memory

    def stream(self) -> Any:
        import cupy

        return cupy.cuda.get_current_stream()

    def event(self) -> Any:
        import cupy

        return cupy.cuda.Event(disable_timing=True)

    def upload(self, device: Any, host: np.ndarray, stream: Any) -> None:
        """Queue the copy of pinned ``host`` into ``device`` on ``stream``; no wait."""
        device.data.copy_from_host_async(ctypes.c_void_p(host.ctypes.data), host.nbytes,
                                         stream)


class CudaPlan:
    """One group's rows, device tables and checks (see the module docstring).

    Attributes
    ----------
    specs : list of (dtype, first, split, last, table, count, blocks)
        Rows ``first .. split - 1`` of ``dtype`` (``count`` of them, ``blocks`` blocks)
        run in one table launch over the device ``table``; rows ``split .. last - 1``
        (large tensors) one launch each.
    large : dict
        Row -> (tensor index, its parameter and states, all 16-byte aligned).
    objects, expected, sizes : list
        Every planned array, its memory pointer object (``data``, held, compared by
        identity: a re-initialized array has another) and its size.
    grad_meta : list
        Per row, the (shape, strides, dtype) its gradient must have.
    order : callable or None
        The gradients in row order, when that is not the parameters' order.
    grads : device array
        The gradients' addresses, in row order; ``grads_views`` its per-spec slices.
    threads : int
        Threads per block the tables' block counts were made for.
    """

    __slots__ = ("names", "specs", "large", "objects", "expected", "grad_meta", "order",
                 "grads", "grads_views", "ring", "uploaded", "stream", "done", "device",
                 "keep", "rows", "sizes", "threads")

    def upload(self, addresses: np.ndarray) -> Any:
        """Queue the copy of ``addresses`` into :attr:`grads` (none if they are those of
        the last copy); the stream the step runs on."""
        device, stream = self.device, self.device.stream()
        if _RETIRED:
            _RETIRED[:] = [entry for entry in _RETIRED if not entry[0].done]
        if self.stream is not None and stream.ptr != self.stream and self.done is not None:
            # The last step's launches, on another stream, read grads: the copy waits.
            stream.wait_event(self.done)
        self.stream = stream.ptr
        self.uploaded = False
        if self.ring and np.array_equal(addresses, self.ring[-1][0]):
            return stream
        ring = self.ring
        if ring and ring[0][1].done:
            slot = ring.popleft()  # the oldest buffer: the device has read it
        elif len(ring) < PINNED_BUFFERS:
            host, memory = device.pinned(len(self.rows))
            slot = (host, device.event(), memory)
        else:
            # Every buffer's copy is still queued: the host is steps ahead of the device.
            slot = ring.popleft()
            slot[1].synchronize()
        slot[0][...] = addresses
        device.upload(self.grads, slot[0], stream)
        ring.append(slot)
        self.uploaded = True
        return stream

    def __del__(self) -> None:
        # A copy or launch still queued may read these buffers: they go only once the
        # device is past them (a pool would hand the pinned memory to the next copy).
        done = getattr(self, "done", None)
        if done is not None:
            _RETIRED.append((done, self.ring, self.grads, self.specs))

    def launched(self, stream: Any) -> None:
        """Record, after this step's launches, what the next steps wait on."""
        if self.uploaded:
            self.ring[-1][1].record(stream)
        if self.done is None:
            self.done = self.device.event()
        self.done.record(stream)


def make_plan(names: tuple[str, ...], records: list[Any], threads: int, multi_max_size: int,
              max_blocks: int, device: Any, table_length: Any) -> CudaPlan | None:
    """The plan of checked, fusable tensor ``records``, or None where a dtype's small
    tensors would need more than ``max_blocks`` blocks (the full path then steps them).

    ``table_length(count)`` is the number of ``long long`` of a table of ``count``."""
    if not records:
        return None

    def kind(record: Any) -> int:
        return 2 if not record.size else 0 if record.size <= multi_max_size else 1

    order = sorted(range(len(records)), key=lambda i: (records[i].dtype.str, kind(records[i])))
    plan = CudaPlan()
    plan.names, plan.device, plan.rows, plan.threads = names, device, order, threads
    plan.specs, plan.large, plan.objects, plan.expected, plan.grad_meta = [], {}, [], [], []
    plan.sizes = []
    plan.keep = []
    by_dtype: dict[Any, list[int]] = {}
    for row, index in enumerate(order):
        record = records[index]
        arrays = record.arrays  # the parameter and its states, as the kernel takes them
        plan.keep.append(arrays)
        plan.objects.extend(arrays)
        # Their memory pointer objects, held: one comparison by identity each step.
        plan.expected.extend(_DATA(a) for a in arrays)
        plan.sizes.extend(a.size for a in arrays)
        param = record.param
        plan.grad_meta.append((param.shape, param.strides, param.dtype))
        by_dtype.setdefault(record.dtype, []).append(row)
    plan.grads = device.empty(len(records))
    plan.grads_views = []
    for dtype, rows in by_dtype.items():
        small = [r for r in rows if kind(records[order[r]]) == 0]
        large = [r for r in rows if kind(records[order[r]]) == 1]
        first, split = rows[0], rows[0] + len(small)
        pack = 16 // dtype.itemsize
        count = len(small)
        table = np.zeros(table_length(count), dtype=np.int64)
        total = 0
        for position, row in enumerate(small):
            record = records[order[row]]
            table[position] = total
            table[count + 1 + position] = record.size
            for column, array in enumerate(record.arrays):
                table[2 * count + 1 + column * count + position] = _ADDRESS(array)
            # Packs, then the tail one element a thread (see the kernel).
            units = record.size // pack + record.size % pack
            total += (units + threads - 1) // threads
        table[count] = total
        if total > max_blocks:
            return None
        for row in large:
            index, arrays = order[row], records[order[row]].arrays
            plan.large[row] = (index, arrays, all(_ADDRESS(a) % 16 == 0 for a in arrays))
        plan.specs.append((dtype, first, split, split + len(large),
                           device.to_device(table) if count else None, count, total))
    plan.grads_views = [plan.grads[first:split] for _, first, split, *_ in plan.specs]
    plan.order = None if order == list(range(len(order))) else _getter(order)
    plan.ring, plan.uploaded, plan.stream, plan.done = deque(), False, None, None
    return plan


def gradient_addresses(plan: CudaPlan, grads: Any) -> tuple[Any, np.ndarray] | None:
    """The gradients in row order and their addresses, if every planned array is as
    planned and every gradient fits its parameter; else None."""
    ordered = grads if plan.order is None else plan.order(grads)
    try:
        if not all(map(is_, map(_DATA, plan.objects), plan.expected)) \
                or list(map(_SIZE, plan.objects)) != plan.sizes \
                or list(map(_GRAD, ordered)) != plan.grad_meta:
            return None
        addresses = np.fromiter(map(_ADDRESS, ordered), np.int64, len(plan.rows))
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None  # not a CuPy array: the full path says what it is
    return ordered, addresses


def _getter(order: list[int]) -> Any:
    from operator import itemgetter

    pick = itemgetter(*order)
    return (lambda items: (pick(items),)) if len(order) == 1 else pick
