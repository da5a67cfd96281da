"""The generated CUDA reduction passes compute what the generic path computes, on the host.

As in test_cuda_launch_emulation.py, the exact text ``cuda_source`` emits is compiled
by the host C++ compiler with CUDA's qualifiers defined away and ``atomicAdd`` as a
plain addition, and each ``__global__`` kernel is run once per (block, thread) of its
grid. For every rule with reductions (reduction_cases.py) and every recorded step,
the sequence :meth:`CudaImplementation._launch_reducing` makes (each stage's reduction
and finish launches into a zeroed accumulator, then the update) is emulated at several
grid shapes, forwards and backwards, and must give the generic path's result within
the fused tolerances (not bit for bit: the order of the atomic additions is the
grid's). Guard bytes catch writes outside the arrays. The device text is also compiled
by nvcc for sm_90.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from fused_cases import ELEMENTWISE_CASE_RULES, REDUCING_CASE_RULES, TOLERANCE
from optim_core.backends._cuda import (
    COMPILE_OPTIONS,
    CUDA_TYPES,
    REDUCTION_MAX_BLOCKS,
    CudaImplementation,
    _Kernels,
    accumulator_length,
    cuda_source,
    kernel_name,
)
from optim_core.backends._lowering import lower
from optim_db import RULES
from reduction_cases import recorded_steps
from test_cuda_launch_emulation import CXX, CXXFLAGS, HOST_PRELUDE, Guarded

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")

#: atomicAdd on the host: the emulated threads run one after another.
ATOMICS = "static double atomicAdd(double* a, double v) { double o = *a; *a = o + v; return o; }\n"
#: (blocks, threads per block, backwards) of the emulated reduction and update launches.
SHAPES = ((1, 1, False), (3, 32, True), (2, 256, False))


@pytest.fixture(scope="module")
def specializations() -> dict[tuple[str, str], list[dict]]:
    """(kernel name, dtype) -> the kernel and every recorded tensor it stepped."""
    found: dict[tuple[str, str], list[dict]] = {}
    for call in recorded_steps():
        for param, grad, state, new_param, new_state in zip(
                call["params"], call["grads"], call["states"], call["new_params"],
                call["new_states"], strict=True):
            key, hoisted, kernel = lower(call["rule"], call["scalars"], frozenset(state))
            found.setdefault((kernel_name(kernel), param.dtype.name), []).append(
                {"kernel": kernel, "key": key, "hoisted": hoisted, "rule": call["rule"],
                 "param": param, "grad": grad, "state": state, "case": call["case"],
                 "want": {"param": new_param, **new_state}})
    return found


def library_source(specializations) -> tuple[str, dict]:
    parts, sources, symbols = [HOST_PRELUDE, ATOMICS], {}, {}
    for (name, _), entries in specializations.items():
        sources.setdefault(name, cuda_source(entries[0]["kernel"]))
    parts += sources.values()
    for (name, dtype), entries in specializations.items():
        kernel, ctype = entries[0]["kernel"], CUDA_TYPES[dtype]
        arguments = ", ".join(["n", *(f"({ctype}*)a[{i}]" for i in range(len(kernel.arrays))),
                               *(f"((const {ctype}*)h)[{i}]" for i in range(kernel.n_hoisted)),
                               "acc"])
        functions = [f"{name}<{ctype}>", f"{name}_vec<{ctype}>"]
        functions += [f"{name}_reduce{p}<{ctype}>" for p in range(kernel.n_stages)]
        for function in functions:
            symbol = symbols[name, dtype, function.split("<")[0]] = f"oc_launch_{len(symbols)}"
            parts.append(
                f'extern "C" void {symbol}(unsigned grid, unsigned block, int backwards, '
                f"long long n, void* const* a, const void* h, double* acc) {{\n"
                f"    oc_emulate(grid, block, backwards, [&] {{ {function}({arguments}); }});\n"
                f"}}")
        for p in range(kernel.n_stages):
            symbol = symbols[name, dtype, f"{name}_finish{p}"] = f"oc_launch_{len(symbols)}"
            parts.append(f'extern "C" void {symbol}(unsigned block, double* acc) {{\n'
                         f"    oc_emulate(1, block, 0, [&] {{ {name}_finish{p}(acc); }});\n}}")
    return "\n".join(parts) + "\n", symbols


@pytest.fixture(scope="module")
def library(specializations, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cuda_reductions")
    source, symbols = library_source(specializations)
    (directory / "kernels.cpp").write_text(source)
    result = subprocess.run([CXX, *CXXFLAGS, "-o", str(directory / "kernels.so"),
                             str(directory / "kernels.cpp")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return ctypes.CDLL(str(directory / "kernels.so")), symbols


class Emulated:
    """Stands in for a ``cupy.RawKernel`` of the library: ``kernel(grid, block, args)``."""

    def __init__(self, library, symbol: str, kernel, dtype, log, backwards: bool,
                 finish: bool = False) -> None:
        self.function = getattr(library[0], symbol)
        self.kernel, self.dtype, self.log = kernel, np.dtype(dtype), log
        self.backwards, self.finish = backwards, finish

    def __call__(self, grid, block, args):
        (blocks,), (threads,) = grid, block
        if self.finish:
            [acc] = args
            assert blocks == 1 and threads % 32 == 0
            self.function(ctypes.c_uint(threads), ctypes.c_void_p(acc.data.ptr))
            self.log.append(("finish", blocks, threads))
            return
        n, *rest = args
        arrays = rest[:len(self.kernel.arrays)]
        hoisted, acc = rest[len(self.kernel.arrays):-1], rest[-1]
        assert type(n) is np.int64 and all(a.size == n for a in arrays)
        assert len(hoisted) == self.kernel.n_hoisted
        assert all(type(h) is self.dtype.type for h in hoisted)
        assert acc.size == accumulator_length(self.kernel)
        pointers = (ctypes.c_void_p * len(arrays))(*(a.data.ptr for a in arrays))
        scalars = np.ascontiguousarray(hoisted, dtype=self.dtype)
        self.function(ctypes.c_uint(blocks), ctypes.c_uint(threads),
                      ctypes.c_int(self.backwards), ctypes.c_longlong(n), pointers,
                      ctypes.c_void_p(scalars.ctypes.data), ctypes.c_void_p(acc.data.ptr))
        self.log.append(("launch", blocks, threads))


class HostArray:
    """What the implementation reads of a CuPy array, over guarded host memory."""

    def __init__(self, values: np.ndarray, misalign: int = 0) -> None:
        self.buffer = Guarded(np.ascontiguousarray(values), misalign)
        self.host = self.buffer.array
        self.dtype, self.size, self.flags = self.host.dtype, self.host.size, self.host.flags
        self.shape = self.host.shape
        self.data = SimpleNamespace(ptr=self.buffer.pointer)


class Accumulator:
    """``cupy.zeros(n, float64)`` on the host, sliceable as the implementation slices it."""

    def __init__(self, values: np.ndarray) -> None:
        self.host, self.size = values, values.size
        self.data = SimpleNamespace(ptr=values.ctypes.data)

    def __getitem__(self, index: slice) -> Accumulator:
        return Accumulator(self.host[index])


def emulated(library, specializations, log, backwards: bool) -> CudaImplementation:
    implementation = CudaImplementation()
    for (name, dtype), entries in specializations.items():
        kernel = entries[0]["kernel"]

        def make(function, finish=False, kernel=kernel, dtype=dtype, name=name):
            return Emulated(library, library[1][name, dtype, function], kernel, dtype, log,
                            backwards, finish)

        stages = tuple((make(f"{name}_reduce{p}"), make(f"{name}_finish{p}", True))
                       for p in range(kernel.n_stages))
        counts = tuple(len(kernel.reduction_pass(p).reductions) for p in range(kernel.n_stages))
        implementation.compiled[entries[0]["rule"].name, entries[0]["key"], dtype] = _Kernels(
            make(name), make(f"{name}_vec"), None, None, np.dtype(np.int64), stages, counts,
            accumulator_length(kernel))
    return implementation


@pytest.fixture
def host_cupy(monkeypatch):
    """``cupy`` as the implementation uses it for the accumulator, on the host."""
    fake = SimpleNamespace(float64=np.float64,
                           zeros=lambda n, dtype: Accumulator(np.zeros(n, dtype)))
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_every_reduction_rule_and_dtype_is_covered(specializations):
    # With test_cuda_source.py's elementwise cases: every rule of optim_db.py.
    assert {e[0]["rule"].name for e in specializations.values()} == {
        "normalized", *REDUCING_CASE_RULES}
    assert ELEMENTWISE_CASE_RULES | REDUCING_CASE_RULES == set(RULES)
    assert all(e[0]["kernel"].reductions for e in specializations.values())
    assert {dtype for _, dtype in specializations} == set(CUDA_TYPES)


@pytest.mark.parametrize("threads, backwards", [(1, False), (32, True), (256, False)])
def test_the_launch_sequence_matches_generic(specializations, library, host_cupy, threads,
                                             backwards):
    log: list = []
    implementation = emulated(library, specializations, log, backwards)
    implementation.threads = threads
    checked = 0
    for (name, dtype), entries in specializations.items():
        for index, entry in enumerate(entries):
            kernel = entry["kernel"]
            # The update kernel takes 16-byte packs when every array is aligned.
            misalign = 0 if index % 2 == 0 else np.dtype(dtype).itemsize
            arrays = {"param": HostArray(entry["param"], misalign),
                      "grad": HostArray(entry["grad"], misalign),
                      **{s: HostArray(v, misalign) for s, v in entry["state"].items()}}
            ordered = tuple(arrays[a] for a in kernel.arrays)
            hoisted = [np.dtype(dtype).type(h) for h in entry["hoisted"]]
            kernels = implementation.compiled[entry["rule"].name, entry["key"], dtype]
            if entry["param"].size == 0:
                continue  # the fused step launches nothing for an empty tensor
            log.clear()
            implementation._launch_reducing([(kernels, hoisted, ordered)])
            # Per stage a reduction launch (a grid of at most REDUCTION_MAX_BLOCKS) and a
            # one-block finish; then the update.
            assert [kind for kind, *_ in log] == ["launch", "finish"] * kernel.n_stages + [
                "launch"]
            assert all(blocks <= REDUCTION_MAX_BLOCKS for kind, blocks, _ in log[:-1:2])
            where = f"{entry['case']} {name}<{dtype}> tensor {index}"
            assert all(a.buffer.guards_intact() for a in arrays.values()), where
            np.testing.assert_array_equal(arrays["grad"].host, entry["grad"], err_msg=where)
            for array, value in entry["want"].items():
                np.testing.assert_allclose(arrays[array].host, value, **TOLERANCE[dtype],
                                           err_msg=f"{where} {array}")
            checked += 1
    assert checked


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_reduction_kernels_compile_for_the_device(specializations, tmp_path):
    parts = []
    for (name, dtype), entries in specializations.items():
        kernel, ctype = entries[0]["kernel"], CUDA_TYPES[dtype]
        source = cuda_source(kernel)
        if source not in parts:
            parts.append(source)
        for function in [name, f"{name}_vec",
                         *(f"{name}_reduce{p}" for p in range(kernel.n_stages))]:
            signature = source.split(f"__global__ void {function}(", 1)[1].split(")", 1)[0]
            signature = signature.replace("T*", f"{ctype}*").replace("T h", f"{ctype} h")
            parts.append(f"template __global__ void {function}<{ctype}>({signature});")
    path = tmp_path / "kernels.cu"
    path.write_text("\n".join(parts) + "\n")
    result = subprocess.run(["nvcc", *COMPILE_OPTIONS, "-arch=sm_90", "-c", "-o",
                             str(tmp_path / "kernels.o"), str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
