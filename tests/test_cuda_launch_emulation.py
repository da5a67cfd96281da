"""The generated CUDA kernels, launch loops included, compute what the generic path computes.

Without a GPU, the exact text ``cuda_source`` emits is compiled by the host C++ compiler
into a shared library whose entry points *emulate a launch*: they run the
``__global__`` kernel (``name`` or ``name_vec``) once for every (block, thread) of a
1-D grid, with ``blockIdx``/``threadIdx``/``blockDim``/``gridDim`` set as the device
sets them. An elementwise kernel's threads share no data, so running them one after
another gives the device's result; the emulator also runs the grid backwards, and
every launch shape must agree bit for bit, so two threads touching the same element,
or an element touched by none, shows up as a difference.

This checks what ``test_cuda_source.py`` (the per-element arithmetic) cannot: the
grid-stride indexing, the 16-byte pack loop and its tail, the ``Pack`` casts and the
``const``-ness of the arrays, for every specialization of every rule, float32 and
float64, at sizes below one pack, with a tail, beyond one sweep of the grid, 0 and 1.
Guard bytes around every array catch a write outside it.

It also runs :meth:`CudaImplementation.step` itself on stand-ins for CuPy arrays whose
kernels are these emulated launches: which kernel it picks for which alignment, the
grid it sizes, and the argument order and types it passes.

The only host additions are in ``HOST_PRELUDE`` below: the CUDA qualifiers defined
away, the four index variables as globals, and the emulating loop; the generated
kernels are included unchanged. Skipped where no C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from fused_cases import ELEMENTWISE_CASE_RULES, ELEMENTWISE_CASES, TOLERANCE, recorded_generic_steps
from optim_core.backends._cuda import (
    _THREADS,
    CUDA_TYPES,
    MULTI_MAX_SIZE,
    MULTI_TENSORS,
    CudaImplementation,
    _Kernels,
    batch_length,
    cuda_source,
    kernel_name,
    table_length,
)
from optim_core.backends._generic import GENERIC
from optim_core.backends._lowering import lower

CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which(
    "c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")

#: Sizes: empty, one element, below one pack (4 floats, 2 doubles), exactly packs,
#: packs plus a tail, and beyond one sweep of all but the largest launch shape below.
SIZES = (0, 1, 2, 3, 5, 8, 13, 1073)
#: (blocks, threads per block, run the grid backwards): one thread doing everything,
#: odd block sizes, a grid that sweeps 1073 elements several times, and one with more
#: threads than elements.
LAUNCH_SHAPES = ((1, 1, False), (2, 5, True), (3, 32, False), (5, 256, True))
#: Bytes before and after every array, filled with GUARD_BYTE and checked afterwards.
GUARD = 64
GUARD_BYTE = 0xA5
#: Host flags matching the device's: no contraction into FMAs (--fmad=false), IEEE math.
CXXFLAGS = ("-std=c++14", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")

HOST_PRELUDE = r"""
#include <math.h>
// Host stand-ins for what CUDA provides. The execution-space qualifiers are no-ops,
// so a __global__ kernel is an ordinary function; the built-in index variables are
// globals that oc_emulate sets before each call, with the device's types.
#define __host__
#define __device__
#define __global__
struct oc_dim3 { unsigned int x, y, z; };
static oc_dim3 threadIdx, blockIdx, blockDim, gridDim;

// One 1-D launch: every (block, thread) in turn, forwards or backwards.
template <typename Kernel>
static void oc_emulate(unsigned grid, unsigned block, int backwards, Kernel kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {backwards ? grid - 1 - b : b, 0, 0};
            threadIdx = {backwards ? block - 1 - t : t, 0, 0};
            kernel();
        }
    }
}
"""


# ----------------------------------------------------------------- what the path runs
@pytest.fixture(scope="module")
def steps() -> list[dict]:
    """Every generic step of every elementwise case of fused_cases, float32 and float64
    (those that reduce each tensor: test_cuda_reductions.py)."""
    return recorded_generic_steps(CUDA_TYPES, ELEMENTWISE_CASES)


@pytest.fixture(scope="module")
def specializations(steps) -> dict[tuple[str, str], dict]:
    """(kernel name, dtype) -> the kernel and its largest recorded tensor's inputs."""
    found: dict[tuple[str, str], dict] = {}
    for call in steps:
        for param, grad, state in zip(call["params"], call["grads"], call["states"],
                                      strict=True):
            key, hoisted, kernel = lower(call["rule"], call["scalars"], frozenset(state))
            entry = {"kernel": kernel, "key": key, "hoisted": hoisted, "rule": call["rule"],
                     "scalars": call["scalars"], "param": param, "grad": grad,
                     "state": state, "case": call["case"]}
            slot = (kernel_name(kernel), param.dtype.name)
            if slot not in found or param.size > found[slot]["param"].size:
                found[slot] = entry
    return found


# ----------------------------------------------------------------- the emulated launch
def library_source(specializations) -> tuple[str, dict]:
    """The host library: every generated source, unchanged, and one entry per launch."""
    parts, sources, symbols = [HOST_PRELUDE], {}, {}
    for (name, _), entry in specializations.items():
        sources.setdefault(name, cuda_source(entry["kernel"]))
    parts += sources.values()
    for (name, dtype), entry in specializations.items():
        kernel, ctype = entry["kernel"], CUDA_TYPES[dtype]
        arguments = ", ".join(["n", *(f"({ctype}*)a[{i}]" for i in range(len(kernel.arrays))),
                               *(f"((const {ctype}*)h)[{i}]" for i in range(kernel.n_hoisted))])
        for vectorized in (False, True):
            symbol = f"oc_launch_{len(symbols)}"
            symbols[name, dtype, vectorized] = symbol
            function = f"{name}{'_vec' if vectorized else ''}<{ctype}>"
            parts.append(
                f'extern "C" void {symbol}(unsigned grid, unsigned block, int backwards, '
                f"long long n, void* const* a, const void* h) {{\n"
                f"    oc_emulate(grid, block, backwards, [&] {{ {function}({arguments}); }});\n"
                f"}}")
        # The multi-tensor kernel takes its table by value, as the device does.
        scalars = "".join(f", ((const {ctype}*)h)[{i}]" for i in range(kernel.n_hoisted))
        for vectorized in (False, True):
            symbol = f"oc_launch_{len(symbols)}"
            symbols[name, dtype, "multi", vectorized] = symbol
            function = f"{name}_multi<{ctype}, {'true' if vectorized else 'false'}>"
            parts.append(
                f'extern "C" void {symbol}(unsigned grid, unsigned block, int backwards, '
                f"const long long* table, int count, const void* h) {{\n"
                f"    {name}_batch batch;\n"
                f"    for (int i = 0; i < {batch_length(kernel)}; ++i) batch.v[i] = table[i];\n"
                f"    oc_emulate(grid, block, backwards,\n"
                f"               [&] {{ {function}(batch, count{scalars}); }});\n"
                f"}}")
        # The step plans' kernel: a table and the gradients' addresses in (host) memory.
        symbol = f"oc_launch_{len(symbols)}"
        symbols[name, dtype, "table"] = symbol
        parts.append(
            f'extern "C" void {symbol}(unsigned grid, unsigned block, int backwards, '
            f"const long long* table, const long long* grads, int count, const void* h) {{\n"
            f"    oc_emulate(grid, block, backwards,\n"
            f"               [&] {{ {name}_table<{ctype}>(table, grads, count{scalars}); }});\n"
            f"}}")
    return "\n".join(parts) + "\n", symbols


class Launcher:
    """Emulated launches of the compiled kernels, by (kernel name, dtype, vectorized)."""

    def __init__(self, path, symbols) -> None:
        self.library = ctypes.CDLL(str(path))
        self.symbols = symbols
        for key, symbol in symbols.items():
            getattr(self.library, symbol).argtypes = [
                ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_longlong,
                ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p] if len(key) == 3 and \
                key[2] != "table" else [
                ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_void_p] if len(key) == 3 else [
                ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                ctypes.c_void_p]

    def table(self, name, dtype, grid, block, backwards, table, grads, count, hoisted):
        """An emulated launch of ``name_table<dtype>`` over tables at these addresses."""
        function = getattr(self.library, self.symbols[name, dtype, "table"])
        scalars = np.ascontiguousarray(hoisted, dtype=dtype)
        function(grid, block, int(backwards), table, grads, count, scalars.ctypes.data)

    def multi(self, name, dtype, vectorized, grid, block, backwards, table, count, hoisted):
        """An emulated launch of ``name_multi<dtype, vectorized>`` over ``table``."""
        function = getattr(self.library, self.symbols[name, dtype, "multi", vectorized])
        table = np.ascontiguousarray(table, dtype=np.int64)
        scalars = np.ascontiguousarray(hoisted, dtype=dtype)
        function(grid, block, int(backwards), table.ctypes.data, count, scalars.ctypes.data)

    def __call__(self, name, dtype, vectorized, grid, block, backwards, n, pointers, hoisted):
        function = getattr(self.library, self.symbols[name, dtype, vectorized])
        array_pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        scalars = np.ascontiguousarray(hoisted, dtype=dtype)
        function(grid, block, int(backwards), n, array_pointers, scalars.ctypes.data)


@pytest.fixture(scope="module")
def launcher(specializations, tmp_path_factory) -> Launcher:
    directory = tmp_path_factory.mktemp("cuda_launch_emulation")
    source, symbols = library_source(specializations)
    (directory / "kernels.cpp").write_text(source)
    result = subprocess.run([CXX, *CXXFLAGS, "-o", str(directory / "kernels.so"),
                             str(directory / "kernels.cpp")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return Launcher(directory / "kernels.so", symbols)


class Guarded:
    """A host array at a chosen offset from 16-byte alignment, between guard bytes."""

    def __init__(self, values: np.ndarray, misalign: int = 0) -> None:
        self.nbytes = values.nbytes
        self.raw = np.full(self.nbytes + 2 * GUARD + 16, GUARD_BYTE, dtype=np.uint8)
        start = GUARD + (-(self.raw.ctypes.data + GUARD)) % 16 + misalign
        self.start = start
        self.array = self.raw[start:start + self.nbytes].view(values.dtype).reshape(values.shape)
        self.array[...] = values
        # (An empty view's own address is not always the slice's.)
        self.pointer = self.raw.ctypes.data + start
        assert (self.pointer % 16 == 0) == (misalign == 0)

    def guards_intact(self) -> bool:
        outside = np.concatenate([self.raw[:self.start], self.raw[self.start + self.nbytes:]])
        return bool(np.all(outside == GUARD_BYTE))


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    unsigned = {4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return a.shape == b.shape and bool(np.all(a.view(unsigned) == b.view(unsigned)))


def generic_result(entry, n: int) -> dict[str, np.ndarray]:
    """The generic path on the first ``n`` elements of the entry's inputs."""
    param = entry["param"].reshape(-1)[:n].copy()
    grad = entry["grad"].reshape(-1)[:n].copy()
    state = {k: v.reshape(-1)[:n].copy() for k, v in entry["state"].items()}
    [param] = GENERIC.step(entry["rule"], np, [param], [grad], [state], entry["scalars"])
    return {"param": param, "grad": grad, **state}


def inputs(entry, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` elements of the entry's arrays, by kernel argument name."""
    return {"param": entry["param"].reshape(-1)[:n], "grad": entry["grad"].reshape(-1)[:n],
            **{k: v.reshape(-1)[:n] for k, v in entry["state"].items()}}


# ----------------------------------------------------------------- the tests
def test_every_rule_and_dtype_is_covered(specializations):
    assert {entry["rule"].name for entry in specializations.values()} == ELEMENTWISE_CASE_RULES
    assert {dtype for _, dtype in specializations} == set(CUDA_TYPES)
    # Each specialization's source is compiled once per dtype: float and double alike.
    names = {name for name, _ in specializations}
    assert all((name, dtype) in specializations for name in names for dtype in CUDA_TYPES)


def test_both_kernels_match_generic_at_every_size_and_launch_shape(specializations, launcher):
    launches = 0
    for (name, dtype), entry in specializations.items():
        kernel = entry["kernel"]
        for n in SIZES:
            want = generic_result(entry, n)
            given = inputs(entry, n)
            # Any alignment for the plain kernel (aligned, and one element off); the
            # vectorized one only ever gets 16-byte aligned arrays (see the step test).
            runs = [(vectorized, misalign, shape) for shape in LAUNCH_SHAPES
                    for vectorized, misalign in ((False, 0), (True, 0))]
            runs.append((False, np.dtype(dtype).itemsize, LAUNCH_SHAPES[2]))
            first = None
            for vectorized, misalign, (grid, block, backwards) in runs:
                where = (f"{entry['case']} {name}{'_vec' if vectorized else ''}<{dtype}> "
                         f"n={n} grid={grid} block={block} backwards={backwards} "
                         f"misalign={misalign}")
                buffers = {a: Guarded(given[a], misalign) for a in kernel.arrays}
                launcher(name, dtype, vectorized, grid, block, backwards, n,
                         [buffers[a].pointer for a in kernel.arrays], entry["hoisted"])
                launches += 1
                got = {a: buffer.array for a, buffer in buffers.items()}
                assert all(b.guards_intact() for b in buffers.values()), f"{where}: wrote outside"
                assert bitwise_equal(got["grad"], given["grad"]), f"{where}: grad changed"
                for array in kernel.arrays:
                    if array not in kernel.stores:
                        assert bitwise_equal(got[array], given[array]), f"{where}: {array}"
                for array, value in want.items():
                    np.testing.assert_allclose(got[array], value, **TOLERANCE[dtype],
                                               err_msg=f"{where}: {array}")
                # Every launch applies the same element function once per element: the
                # results agree bit for bit whatever the kernel, grid and order.
                if first is None:
                    first = got
                for array in kernel.arrays:
                    assert bitwise_equal(got[array], first[array]), f"{where}: {array} differs"
    assert launches == len(specializations) * len(SIZES) * (2 * len(LAUNCH_SHAPES) + 1)


def test_every_multi_tensor_launch_fits_cudas_4_kb_of_kernel_parameters(specializations):
    for (name, dtype), entry in specializations.items():
        table = 8 * batch_length(entry["kernel"])
        scalars = entry["kernel"].n_hoisted * np.dtype(dtype).itemsize
        assert table + 4 + scalars <= 4096, name


#: (threads per block, run the grid backwards) for the multi-tensor kernel, whose grid
#: always has one thread per element or pack.
MULTI_SHAPES = ((1, False), (5, True), (32, False), (256, True))


def test_multi_tensor_kernel_matches_generic_for_every_size_in_one_launch(specializations,
                                                                          launcher):
    # Every size of SIZES (0 and 1 included) as its own tensor of one launch, through the
    # implementation's own table builder; each tensor's arrays between guard bytes.
    launches = 0
    for (name, dtype), entry in specializations.items():
        kernel, log = entry["kernel"], []
        want = {n: generic_result(entry, n) for n in SIZES}
        first = None
        for vectorized, misalign in ((False, 0), (True, 0), (False, np.dtype(dtype).itemsize)):
            for threads, backwards in MULTI_SHAPES:
                implementation = emulated_implementation(launcher, specializations, log,
                                                         backwards, threads=threads)
                kernels = implementation.compiled[entry["rule"].name, entry["key"], dtype]
                hoisted = [np.dtype(dtype).type(h) for h in entry["hoisted"]]
                buffers = {n: {a: Guarded(inputs(entry, n)[a], misalign) for a in kernel.arrays}
                           for n in SIZES}
                tensors = [(n, [buffers[n][a].pointer for a in kernel.arrays]) for n in SIZES]
                implementation._launch_many(kernels, hoisted, tensors,
                                            16 // np.dtype(dtype).itemsize if vectorized else 0)
                launches += 1
                where = (f"{entry['case']} {name}_multi<{dtype}, {vectorized}> threads={threads} "
                         f"backwards={backwards} misalign={misalign}")
                got = {n: {a: b.array for a, b in buffers[n].items()} for n in SIZES}
                for n in SIZES:
                    assert all(b.guards_intact() for b in buffers[n].values()), f"{where} n={n}"
                    for array in kernel.arrays:
                        if array not in kernel.stores:
                            assert bitwise_equal(got[n][array], inputs(entry, n)[array]), where
                    for array, value in want[n].items():
                        np.testing.assert_allclose(got[n][array], value, **TOLERANCE[dtype],
                                                   err_msg=f"{where} n={n} {array}")
                # The same element function once per element: bit for bit the same
                # whatever the kernel, block size and order.
                if first is None:
                    first = got
                for n in SIZES:
                    for array in kernel.arrays:
                        assert bitwise_equal(got[n][array], first[n][array]), f"{where} n={n}"
        assert [entry.count for entry in log] == [len(SIZES)] * len(MULTI_SHAPES) * 3
    assert launches == len(specializations) * 3 * len(MULTI_SHAPES)


def test_step_shares_launches_between_small_tensors_32_at_a_time(specializations, launcher):
    # 70 small tensors, every third one misaligned, and one larger than the limit:
    # aligned ones in launches of 32 + 15, misaligned in one of 23, the large alone.
    entry = next(e for (_, dtype), e in specializations.items()
                 if e["rule"].name == "adam" and dtype == "float32"
                 and set(e["state"]) == {"exp_avg", "exp_avg_sq"})
    rule, log = entry["rule"], []
    implementation = emulated_implementation(launcher, specializations, log, multi_max_size=64)
    rng = np.random.default_rng(0)
    sizes = [int(rng.integers(1, 65)) for _ in range(70)] + [65]
    params, grads, states, wants = [], [], [], []
    for index, n in enumerate(sizes):
        tile = {a: np.resize(v, n) for a, v in inputs(entry, entry["param"].size).items()}
        offset = 4 if index % 3 == 2 else 0
        params.append(DeviceStandIn(tile["param"], offset))
        grads.append(DeviceStandIn(tile["grad"], offset))
        states.append({s: DeviceStandIn(tile[s], offset) for s in ("exp_avg", "exp_avg_sq")})
        wants.append(generic_result({**entry, "param": tile["param"], "grad": tile["grad"],
                                     "state": {s: tile[s] for s in states[-1]}}, n))
    implementation.step(rule, None, params, grads, states, entry["scalars"])
    shared = sorted((e.vectorized, e.count) for e in log if e.multi)
    assert shared == [(False, 23), (True, 15), (True, 32)]
    assert [(e.multi, e.n) for e in log if not e.multi] == [(False, 65)]
    assert implementation.launches == 4
    for param, state, want in zip(params, states, wants, strict=True):
        np.testing.assert_allclose(param.host, want["param"], **TOLERANCE["float32"])
        for name, array in state.items():
            np.testing.assert_allclose(array.host, want[name], **TOLERANCE["float32"])
        assert param.buffer.guards_intact()


# ----------------------------------------------------------------- the step, on stand-ins
class DeviceStandIn:
    """What ``CudaImplementation.step`` reads of a CuPy array, over guarded host memory."""

    def __init__(self, values: np.ndarray, misalign: int) -> None:
        self.buffer = Guarded(np.asarray(values), misalign)
        self.host = self.buffer.array
        self.dtype, self.size, self.flags = self.host.dtype, self.host.size, self.host.flags
        self.shape, self.strides = self.host.shape, self.host.strides
        self.data = SimpleNamespace(ptr=self.buffer.pointer)


class EmulatedKernel:
    """Stands in for a ``cupy.RawKernel``: ``kernel((blocks,), (threads,), args)``."""

    def __init__(self, launcher, kernel, dtype, vectorized, log, backwards=False) -> None:
        self.launcher, self.kernel, self.dtype = launcher, kernel, np.dtype(dtype)
        self.vectorized, self.log, self.backwards = vectorized, log, backwards

    def _check_scalars(self, hoisted) -> None:
        # CuPy passes a NumPy scalar as its own C type: the kernel's T.
        assert len(hoisted) == self.kernel.n_hoisted
        assert all(type(h) is self.dtype.type for h in hoisted)

    def __call__(self, grid, block, args):
        (blocks,), (threads,) = grid, block
        n, *rest = args
        arrays, hoisted = rest[:len(self.kernel.arrays)], rest[len(self.kernel.arrays):]
        assert type(n) is np.int64
        self._check_scalars(hoisted)
        assert all(isinstance(a, DeviceStandIn) and a.dtype == self.dtype for a in arrays)
        assert all(a.size == n for a in arrays)
        # The device faults on a misaligned 16-byte access.
        assert not self.vectorized or all(a.data.ptr % 16 == 0 for a in arrays)
        assert 1 <= blocks and threads >= 1
        self.log.append(SimpleNamespace(multi=False, vectorized=self.vectorized, blocks=blocks,
                                        threads=threads, n=int(n),
                                        per_thread=16 // self.dtype.itemsize
                                        if self.vectorized else 1))
        self.launcher(kernel_name(self.kernel), self.dtype.name, self.vectorized, blocks,
                      threads, self.backwards, int(n), [a.data.ptr for a in arrays],
                      [float(h) for h in hoisted])


class EmulatedMultiKernel(EmulatedKernel):
    """Stands in for ``name_multi``: ``kernel((blocks,), (threads,), (table, count, *h))``."""

    def __call__(self, grid, block, args):
        (blocks,), (threads,) = grid, block
        batch, count, *hoisted = args
        self._check_scalars(hoisted)
        # The table goes by value: a size-one NumPy array of the kernel's struct type.
        assert isinstance(batch, np.ndarray) and batch.size == 1
        assert batch.dtype.itemsize == 8 * batch_length(self.kernel)
        assert type(count) is np.int32 and 1 <= count <= MULTI_TENSORS
        table = batch.view(np.int64).copy()
        k, pack = MULTI_TENSORS, 16 // self.dtype.itemsize if self.vectorized else 0
        sizes, first = table[:count], table[k:k + count + 1]
        # Each tensor gets exactly the blocks its elements (packs, then tail) need.
        units = [int(n) // pack + int(n) % pack if pack else int(n) for n in sizes]
        assert first[0] == 0 and blocks == first[-1] >= 1 and threads >= 1
        assert list(np.diff(first)) == [-(-u // threads) for u in units]
        addresses = [table[2 * k + 1 + a * k:2 * k + 1 + a * k + count]
                     for a in range(len(self.kernel.arrays))]
        assert not self.vectorized or all(int(x) % 16 == 0 for column in addresses
                                          for x in column)
        self.log.append(SimpleNamespace(multi=True, vectorized=self.vectorized, blocks=blocks,
                                        threads=threads, count=int(count),
                                        sizes=[int(n) for n in sizes]))
        self.launcher.multi(kernel_name(self.kernel), self.dtype.name, self.vectorized, blocks,
                            threads, self.backwards, table, int(count),
                            [float(h) for h in hoisted])


class EmulatedTableKernel(EmulatedKernel):
    """Stands in for ``name_table``: ``kernel((blocks,), (threads,), (table, grads, count,
    *h))``, both tables device arrays (here host memory)."""

    def __call__(self, grid, block, args):
        (blocks,), (threads,) = grid, block
        table, grads, count, *hoisted = args
        self._check_scalars(hoisted)
        assert type(count) is np.int32 and count >= 1
        assert isinstance(table, HostDeviceArray) and isinstance(grads, HostDeviceArray)
        assert table.size == table_length(self.kernel, int(count)) and grads.size == count
        values = table.host
        first, sizes = values[:count + 1], values[count + 1:2 * count + 1]
        # Each tensor gets exactly the blocks its packs and tail need, and at least one.
        pack = 16 // self.dtype.itemsize
        assert first[0] == 0 and blocks == first[-1] and threads >= 1
        assert list(np.diff(first)) == [-(-(int(n) // pack + int(n) % pack) // threads)
                                        for n in sizes]
        assert all(n >= 1 for n in sizes)
        self.log.append(SimpleNamespace(multi=True, table=True, blocks=blocks, threads=threads,
                                        count=int(count), sizes=[int(n) for n in sizes],
                                        dtype=self.dtype.name))
        self.launcher.table(kernel_name(self.kernel), self.dtype.name, blocks, threads,
                            self.backwards, table.data.ptr, grads.data.ptr, int(count),
                            [float(h) for h in hoisted])


class HostDeviceArray:
    """A device array of the host stand-in of CuPy: a NumPy array and its address."""

    def __init__(self, host: np.ndarray) -> None:
        self.host, self.size = host, host.size
        self.data = SimpleNamespace(ptr=host.ctypes.data)

    def __getitem__(self, where: slice) -> HostDeviceArray:
        return HostDeviceArray(self.host[where])


class HostEvent:
    """An event of the host stand-in: launches run at once, so it is always done."""

    done = True

    def record(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostDevice:
    """The device operations of the step plans, on host memory; counts the copies."""

    def __init__(self) -> None:
        self.uploads, self.tables = 0, 0

    def to_device(self, host):
        self.tables += 1
        return HostDeviceArray(np.array(host, dtype=np.int64))

    def empty(self, n):
        return HostDeviceArray(np.full(n, -1, dtype=np.int64))

    def pinned(self, n):
        return np.zeros(n, dtype=np.int64), None

    def stream(self):
        return SimpleNamespace(ptr=0, wait_event=lambda event: None)

    def event(self):
        return HostEvent()

    def upload(self, device, host, stream):
        self.uploads += 1
        device.host[...] = host


def emulated_implementation(launcher, specializations, log, backwards=False,
                            **options) -> CudaImplementation:
    """A CudaImplementation whose compiled kernels are the emulated launches and whose
    step plans' device is host memory."""
    implementation = CudaImplementation(**options)
    implementation.device = HostDevice()
    for (_, dtype), entry in specializations.items():
        kernels = [cls(launcher, entry["kernel"], dtype, vectorized, log, backwards)
                   for cls in (EmulatedKernel, EmulatedMultiKernel)
                   for vectorized in (False, True)]
        batch = np.dtype([("v", np.int64, (batch_length(entry["kernel"]),))])
        implementation.compiled[entry["rule"].name, entry["key"], dtype] = _Kernels(
            *kernels, batch, table=EmulatedTableKernel(launcher, entry["kernel"], dtype, True,
                                                       log, backwards))
    return implementation


def misalignment(pattern: int, arrays: int, itemsize: int) -> list[int]:
    """All aligned (pattern 0), or one array one element off: param, grad, the last one."""
    offsets = [0] * arrays
    if pattern:
        offsets[{1: 0, 2: 1, 3: arrays - 1}[pattern]] = itemsize
    return offsets


@pytest.mark.parametrize("multi_max_size", [0, MULTI_MAX_SIZE],
                         ids=["launch-per-tensor", "shared-launches"])
def test_step_picks_the_kernel_by_alignment_and_matches_generic(steps, specializations,
                                                                launcher, multi_max_size):
    log: list = []
    implementation = emulated_implementation(launcher, specializations, log,
                                             multi_max_size=multi_max_size)
    chosen = {True: 0, False: 0}
    launches = 0
    for index, call in enumerate(steps):
        rule, itemsize = call["rule"], call["params"][0].dtype.itemsize
        params, grads, states, expected_kinds = [], [], [], []
        for tensor, (param, grad, state) in enumerate(
                zip(call["params"], call["grads"], call["states"], strict=True)):
            names = [s for s in rule.states if s in state]
            offsets = misalignment((index + tensor) % 4, 2 + len(names), itemsize)
            params.append(DeviceStandIn(param, offsets[0]))
            grads.append(DeviceStandIn(grad, offsets[1]))
            states.append({s: DeviceStandIn(state[s], o)
                           for s, o in zip(names, offsets[2:], strict=True)})
            expected_kinds.append(not any(offsets))
        # An empty tensor launches nothing.
        params.append(DeviceStandIn(np.zeros(0, params[0].dtype), 0))
        grads.append(DeviceStandIn(np.zeros(0, params[0].dtype), 0))
        states.append({s: DeviceStandIn(np.zeros(0, params[0].dtype), 0)
                       for s in states[0]})
        log.clear()
        out = implementation.step(rule, None, params, grads, states, call["scalars"])
        assert out is params
        launches += len(log)
        if multi_max_size == 0:
            assert [entry.vectorized for entry in log] == expected_kinds, call["case"]
            for entry in log:
                chosen[entry.vectorized] += 1
                # One thread per element (per pack): enough blocks for one sweep, none idle.
                per_block = _THREADS * entry.per_thread
                assert (entry.blocks - 1) * per_block < entry.n <= entry.blocks * per_block
        else:
            # Every tensor of a step is small: one shared launch per alignment, in order.
            assert all(entry.multi for entry in log), call["case"]
            assert {entry.vectorized: entry.count for entry in log} == {
                kind: expected_kinds.count(kind) for kind in set(expected_kinds)}, call["case"]
            for entry in log:
                chosen[entry.vectorized] += entry.count
                assert entry.sizes == [p.size for p, kind in zip(params, expected_kinds)
                                       if kind == entry.vectorized]
        for tensor, new_param in enumerate(call["new_params"]):
            where = f"{call['case']} step {index} tensor {tensor}"
            tolerance = TOLERANCE[new_param.dtype.name]
            np.testing.assert_allclose(params[tensor].host, new_param, **tolerance,
                                       err_msg=f"{where} param")
            assert bitwise_equal(grads[tensor].host, call["grads"][tensor]), where
            for s, value in call["new_states"][tensor].items():
                np.testing.assert_allclose(states[tensor][s].host, value, **tolerance,
                                           err_msg=f"{where} {s}")
            assert all(a.buffer.guards_intact() for a in
                       [params[tensor], grads[tensor], *states[tensor].values()]), where
    assert implementation.launches == launches
    assert sum(chosen.values()) == sum(len(c["params"]) for c in steps)
    assert chosen[True] and chosen[False]


@pytest.mark.parametrize("dtype", list(CUDA_TYPES))
@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "any-alignment"])
def test_step_sweeps_a_tensor_larger_than_the_capped_grid(specializations, launcher, dtype,
                                                          aligned):
    # A grid capped at 32 blocks of 256 threads: 70001 elements take several sweeps of
    # the grid-stride loops (packs and plain), and leave a tail.
    n, log = 70001, []
    implementation = emulated_implementation(launcher, specializations, log, max_blocks=32,
                                             multi_max_size=0)
    checked = set()
    for (name, kernel_dtype), entry in specializations.items():
        rule = entry["rule"]
        if kernel_dtype != dtype or rule.name in checked:
            continue
        checked.add(rule.name)
        # The recorded values, repeated to n elements.
        tile = {a: np.resize(v, n) for a, v in inputs(entry, entry["param"].size).items()}
        offset = 0 if aligned else np.dtype(dtype).itemsize
        param = DeviceStandIn(tile["param"], offset)
        grad = DeviceStandIn(tile["grad"], 0)
        state = {s: DeviceStandIn(tile[s], 0) for s in rule.states if s in entry["state"]}
        want = generic_result({**entry, "param": tile["param"], "grad": tile["grad"],
                               "state": {s: tile[s] for s in state}}, n)
        log.clear()
        implementation.step(rule, None, [param], [grad], [state], entry["scalars"])
        [launch] = log
        assert launch.vectorized == aligned and launch.blocks == 32, name
        assert launch.blocks * _THREADS * launch.per_thread < n  # more than one sweep
        np.testing.assert_allclose(param.host, want["param"], **TOLERANCE[dtype], err_msg=name)
        for s, array in state.items():
            np.testing.assert_allclose(array.host, want[s], **TOLERANCE[dtype],
                                       err_msg=f"{name} {s}")
    assert checked == ELEMENTWISE_CASE_RULES


# ----------------------------------------------------------------- the step plans
def planned_step(implementation, rule, params, grads, states, scalars, cache):
    """:meth:`plan_step` as the optimizer calls it: the prepared step, or None."""
    names = frozenset(n for state in states[:1] for n in state)
    return implementation.plan_step(rule, params, grads, states, scalars, names, list(params),
                                    [p.shape for p in params], cache)


def plan_case(entry, sizes, misaligned_grads=(), seed=0):
    """Stand-ins of ``sizes`` (the entry's values repeated), StateDicts of states, and the
    generic path's results on copies."""
    from optim_core.backends._fused import StateDict

    rng = np.random.default_rng(seed)
    params, grads, states, wants = [], [], [], []
    for index, n in enumerate(sizes):
        tile = {a: np.resize(v, n) * (1 + rng.random(n)).astype(v.dtype)
                for a, v in inputs(entry, entry["param"].size).items()}
        offset = entry["param"].dtype.itemsize if index in misaligned_grads else 0
        params.append(DeviceStandIn(tile["param"], 0))
        grads.append(DeviceStandIn(tile["grad"], offset))
        states.append(StateDict({s: DeviceStandIn(tile[s], 0) for s in entry["state"]}))
        wants.append(generic_result({**entry, "param": tile["param"], "grad": tile["grad"],
                                     "state": {s: tile[s] for s in entry["state"]}}, n))
    return params, grads, states, wants


def assert_bitwise_generic(params, grads, states, wants, where):
    for index, (param, state, want) in enumerate(zip(params, states, wants, strict=True)):
        assert bitwise_equal(param.host, want["param"]), f"{where} tensor {index} param"
        for name, array in state.items():
            assert bitwise_equal(array.host, want[name]), f"{where} tensor {index} {name}"
        assert all(a.buffer.guards_intact() for a in (param, grads[index], *state.values()))


def table_entries(specializations, dtype=None):
    return [(name, entry) for (name, kernel_dtype), entry in specializations.items()
            if dtype is None or kernel_dtype == dtype]


def test_planned_step_runs_every_small_tensor_in_one_table_launch_bit_for_bit(specializations,
                                                                              launcher):
    # Per specialization and dtype: empty, 1, a block's elements -1 and +1 (in packs and
    # element-wise), 70 tensors (more than one old launch's 32), one grad off 16-byte
    # alignment (its tensor takes the same elements one by one); forwards and backwards.
    for name, entry in table_entries(specializations):
        dtype = entry["param"].dtype
        block = _THREADS * (16 // dtype.itemsize)
        sizes = [0, 1, _THREADS - 1, _THREADS + 1, block - 1, block, block + 1, 3, 0, 2,
                 *range(5, 65)]
        for backwards in (False, True):
            log: list = []
            implementation = emulated_implementation(launcher, specializations, log, backwards)
            params, grads, states, wants = plan_case(entry, sizes, misaligned_grads={3, 6})
            # The plan is made from a full check, then steps (nothing runs before run()).
            ready = planned_step(implementation, entry["rule"], params, grads, states,
                                 entry["scalars"], cache := {})
            assert ready is not None, name
            assert log == []
            ready.run()
            [launch] = log
            assert launch.table and launch.count == len([n for n in sizes if n])
            assert launch.sizes == [n for n in sizes if n]  # the parameters' order
            assert_bitwise_generic(params, grads, states, wants, f"{entry['case']} {name}")
            assert cache["plan"].data is not None


def test_planned_step_launches_each_dtype_once_and_each_large_tensor_alone(specializations,
                                                                           launcher):
    # One group mixing float32 and float64 tensors of one rule, 2**20 elements (the
    # largest that shares the table) and 2**20 + 1 (its own launch), aligned and not.
    entries = {dtype: next(e for (_, d), e in specializations.items()
                           if e["rule"].name == "adam" and d == dtype
                           and set(e["state"]) == {"exp_avg", "exp_avg_sq"})
               for dtype in CUDA_TYPES}
    log: list = []
    implementation = emulated_implementation(launcher, specializations, log)
    params, grads, states, wants = [], [], [], []
    for dtype, sizes, misaligned in (("float32", [MULTI_MAX_SIZE, 7, MULTI_MAX_SIZE + 1], {}),
                                     ("float64", [5, MULTI_MAX_SIZE + 1, 0, 1], {1})):
        case = plan_case(entries[dtype], sizes, misaligned_grads=misaligned, seed=len(params))
        for into, part in zip((params, grads, states, wants), case, strict=True):
            into.extend(part)
    rule, scalars, cache = entries["float32"]["rule"], entries["float32"]["scalars"], {}
    ready = planned_step(implementation, rule, params, grads, states, scalars, cache)
    ready.run()
    tables = sorted((e.dtype, sorted(e.sizes)) for e in log if getattr(e, "table", False))
    assert tables == [("float32", [7, MULTI_MAX_SIZE]), ("float64", [1, 5])]
    alone = sorted((e.n, e.vectorized) for e in log if not e.multi)
    assert alone == [(MULTI_MAX_SIZE + 1, False), (MULTI_MAX_SIZE + 1, True)]
    assert implementation.launches == 4
    assert_bitwise_generic(params, grads, states, wants, "mixed dtypes")


def test_gradient_addresses_are_copied_only_when_they_change(specializations, launcher):
    entry = next(e for (_, d), e in specializations.items()
                 if e["rule"].name == "adam" and d == "float32")
    log: list = []
    implementation = emulated_implementation(launcher, specializations, log)
    params, grads, states, _ = plan_case(entry, [3, 1000, 17])
    rule, scalars, cache = entry["rule"], entry["scalars"], {}
    device = implementation.device
    for _ in range(3):
        planned_step(implementation, rule, params, grads, states, scalars, cache).run()
    assert device.tables == 1  # one device table per dtype, made with the plan
    assert device.uploads == 1  # the same gradients: the device has their addresses
    fresh = [DeviceStandIn(g.host.copy(), 0) for g in grads]
    planned_step(implementation, rule, params, fresh, states, scalars, cache).run()
    assert device.uploads == 2 and device.tables == 1
    # A new learning rate is a kernel argument: no new table, no recompilation.
    planned_step(implementation, rule, params, fresh, states, {**scalars, "lr": 0.5},
                 cache).run()
    assert device.tables == 1 and len(log) == 5


def test_a_plan_never_launches_with_a_replaced_or_moved_array(specializations, launcher):
    from optim_core.backends._fused import StateDict

    entry = next(e for (_, d), e in specializations.items()
                 if e["rule"].name == "adam" and d == "float32"
                 and set(e["state"]) == {"exp_avg", "exp_avg_sq"})
    log: list = []
    implementation = emulated_implementation(launcher, specializations, log)
    rule, scalars, cache = entry["rule"], entry["scalars"], {}
    params, grads, states, _ = plan_case(entry, [4, 9, 16])
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is not None
    plan = cache["plan"]

    # A state replaced in its StateDict: a new plan, with the new array's address.
    old = states[1]["exp_avg"]
    states[1]["exp_avg"] = DeviceStandIn(old.host.copy(), 0)
    before = old.host.copy()
    planned_step(implementation, rule, params, grads, states, scalars, cache).run()
    assert cache["plan"] is not plan
    assert bitwise_equal(old.host, before)  # the replaced array is not written
    assert not bitwise_equal(states[1]["exp_avg"].host, before)

    # A parameter replaced in the list (not yet checked by the optimizer): no plan.
    plan = cache["plan"]
    replaced = [*params[:2], DeviceStandIn(params[2].host.copy(), 0)]
    assert implementation.plan_step(rule, replaced, grads, states, scalars,
                                    frozenset(states[0]), params, [p.shape for p in params],
                                    cache) is None
    assert "plan" not in cache
    # Checked by the optimizer: a new plan for it.
    params[2] = replaced[2]
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is not None
    assert cache["plan"] is not plan

    # A planned array that moved (re-initialized in place), or a state dict that is a
    # plain dict: the step is left to the full path, nothing written.
    launches = len(log)
    moved = states[0]["exp_avg_sq"]
    data = moved.data
    moved.data = SimpleNamespace(ptr=data.ptr)  # re-initialized: a new memory pointer
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is None
    moved.data = data
    moved.size -= 1
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is None
    moved.size += 1
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is not None
    plain = [dict(s) for s in states]
    assert planned_step(implementation, rule, params, grads, plain, scalars, {}) is None
    assert planned_step(implementation, rule, params, grads, plain, scalars, {}) is None
    assert len(log) == launches
    assert isinstance(states[0], StateDict)


@pytest.mark.parametrize("change", ["shape", "strides", "dtype", "host array", "short"])
def test_a_gradient_that_does_not_fit_leaves_the_step_to_the_full_path(specializations,
                                                                       launcher, change):
    entry = next(e for (_, d), e in specializations.items()
                 if e["rule"].name == "adam" and d == "float32")
    log: list = []
    implementation = emulated_implementation(launcher, specializations, log)
    rule, scalars, cache = entry["rule"], entry["scalars"], {}
    params, grads, states, _ = plan_case(entry, [6, 8])
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is not None
    bad = DeviceStandIn(grads[1].host.copy(), 0)
    if change == "shape":
        bad.shape = (2, 4)
    elif change == "strides":
        bad.strides = (8,)
    elif change == "dtype":
        bad.dtype = np.dtype(np.float64)
    elif change == "host array":
        bad = grads[1].host.copy()
    else:
        bad = DeviceStandIn(grads[1].host[:7].copy(), 0)
    before = [p.host.copy() for p in params]
    assert planned_step(implementation, rule, params, [grads[0], bad], states, scalars,
                        cache) is None
    assert log == [] and all(bitwise_equal(p.host, b) for p, b in zip(params, before))
    assert planned_step(implementation, rule, params, grads, states, scalars, cache) is not None


def test_a_dropped_plan_keeps_its_buffers_until_the_device_is_past_them(specializations,
                                                                        launcher):
    # A pinned buffer handed back while its copy is still queued could be rewritten by
    # the next copy from the pool: a dropped plan's buffers wait for its last event.
    import gc

    from optim_core.backends import _cuda_plan

    entry = next(e for (_, d), e in specializations.items()
                 if e["rule"].name == "adam" and d == "float32")
    implementation = emulated_implementation(launcher, specializations, [])
    rule, scalars, cache = entry["rule"], entry["scalars"], {}
    params, grads, states, _ = plan_case(entry, [5, 6])
    planned_step(implementation, rule, params, grads, states, scalars, cache).run()
    event = cache["plan"].data.done
    event.done = False  # the device has not reached the last step's end yet
    params[0] = DeviceStandIn(params[0].host.copy(), 0)
    planned_step(implementation, rule, params, grads, states, scalars, cache).run()
    gc.collect()
    assert any(kept[0] is event for kept in _cuda_plan._RETIRED)
    event.done = True
    planned_step(implementation, rule, params, grads, states, scalars, cache).run()
    assert not any(kept[0] is event for kept in _cuda_plan._RETIRED)


def test_a_plan_launches_its_table_with_the_threads_it_was_made_for(specializations,
                                                                    launcher):
    entry = next(e for (_, d), e in specializations.items()
                 if e["rule"].name == "adam" and d == "float32")
    log: list = []
    implementation = emulated_implementation(launcher, specializations, log, threads=32)
    rule, scalars, cache = entry["rule"], entry["scalars"], {}
    params, grads, states, wants = plan_case(entry, [300, 7, 129])
    planned_step(implementation, rule, params, grads, states, scalars, cache)
    implementation.threads = 256  # after the plan was made: its block counts are for 32
    planned_step(implementation, rule, params, grads, states, scalars, cache).run()
    [launch] = log
    assert launch.threads == 32
    assert_bitwise_generic(params, grads, states, wants, "threads changed")
