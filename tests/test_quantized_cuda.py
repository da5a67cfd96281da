"""The quantized CUDA kernels compute what the generic path computes, checked without a GPU.

The generated source (``quantized_cuda_source``) is compiled for the device by nvcc, and
by the host C++ compiler into a library that *emulates a launch*: each CUDA block runs as
one OS thread per CUDA thread, ``__syncthreads()`` a barrier among them and
``__shared__`` memory a static shared by them, so the shared-memory absmax reduction runs
as on the device. Every step of every quantized case of ``test_quantized_states.py``
(the inputs the generic path saw, recorded) is launched with one CUDA block per
quantization block and with fewer blocks than that (the grid-stride loop), and must give
the generic path's parameters, codes and scales bit for bit. Skipped where no compiler is
found.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
from optim_core.backends._cuda import (
    COMPILE_OPTIONS,
    CudaImplementation,
    quantized_cuda_source,
    quantized_kernel_name,
    quantized_threads,
)
from optim_core.backends._generic import GENERIC, PreparedStep
from optim_core.backends._lowering import lower
from optim_core.backends._quantized import (
    BLOCK_SIZES,
    QuantizedState,
    is_quantized,
    midpoints,
    quantization_map,
)
from test_quantized_states import CASES, gradient, start_params

import optim_core

CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

HOST_PRELUDE = r"""
#include <math.h>
#include <pthread.h>
#include <vector>
// CUDA's qualifiers defined away; a block's threads are OS threads meeting at a barrier,
// its __shared__ arrays statics (one block runs at a time).
#define __host__
#define __device__
#define __global__
#define __shared__ static
struct oc_dim3 { unsigned int x, y, z; };
static thread_local oc_dim3 threadIdx, blockIdx;
static oc_dim3 blockDim, gridDim;
static pthread_barrier_t oc_barrier;
static inline void __syncthreads() { pthread_barrier_wait(&oc_barrier); }

template <typename Kernel>
struct oc_thread_args { const Kernel* kernel; unsigned block, thread; };

template <typename Kernel>
static void* oc_thread(void* raw) {
    const oc_thread_args<Kernel>* args = static_cast<const oc_thread_args<Kernel>*>(raw);
    blockIdx = {args->block, 0, 0};
    threadIdx = {args->thread, 0, 0};
    (*args->kernel)();
    return nullptr;
}

template <typename Kernel>
static void oc_emulate(unsigned grid, unsigned block, const Kernel& kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        pthread_barrier_init(&oc_barrier, nullptr, block);
        std::vector<pthread_t> threads(block);
        std::vector<oc_thread_args<Kernel>> args(block);
        for (unsigned t = 0; t < block; ++t) {
            args[t] = {&kernel, b, t};
            pthread_create(&threads[t], nullptr, oc_thread<Kernel>, &args[t]);
        }
        for (unsigned t = 0; t < block; ++t) pthread_join(threads[t], nullptr);
        pthread_barrier_destroy(&oc_barrier);
    }
}
"""


def _copy(state: dict) -> dict:
    return {k: QuantizedState(v.codes.copy(), v.absmax.copy(), v.bits, v.signed, v.shape)
            if is_quantized(v) else v.copy() for k, v in state.items()}


class Recorder:
    """The generic path, recording the big tensor's inputs and outputs of every step."""

    name = "generic"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def prepare(self, rule, xp, params, grads, states, scalars, cache=None):
        ready = GENERIC.prepare(rule, xp, params, grads, states, scalars)

        def run():
            before = (params[0].copy(), grads[0].copy(), _copy(states[0]))
            out = ready.run()
            self.calls.append({"rule": rule, "scalars": dict(scalars), "param": before[0],
                               "grad": before[1], "state": before[2],
                               "new_param": params[0].copy(), "new_state": _copy(states[0])})
            return out

        return PreparedStep(run)


@pytest.fixture(scope="module")
def recorded() -> list[dict]:
    calls = []
    for name, hyper, bits in CASES:
        params = {"big": start_params()["big"]}
        opt = getattr(optim_core, name)(params, **hyper, state_bits=bits, impl="generic")
        opt.implementation = recorder = Recorder()
        for step in range(3):
            opt.step({k: gradient(v, step) for k, v in params.items()})
        calls += recorder.calls
    for call in calls:
        state = call["state"]
        call["layout"] = tuple((n, s.bits, s.signed) for n, s in state.items() if is_quantized(s))
        _, call["hoisted"], call["kernel"] = lower(call["rule"], call["scalars"],
                                                   frozenset(state))
    return calls


def _arguments(kernel, layout) -> list[tuple[str, str]]:
    """(C type, role) of each array argument, in order (see quantized_cuda_source)."""
    quantized = {name for name, _, _ in layout}
    out = []
    for a in kernel.arrays:
        if a in quantized:
            out += [("unsigned char*", f"q_{a}"), ("float*", f"m_{a}"),
                    ("const float*", f"map_{a}"), ("const float*", f"mid_{a}")]
        else:
            out.append(("float*" if a in kernel.stores else "const float*", f"a_{a}"))
    return out


def _unique(calls: list[dict]) -> dict[str, dict]:
    found = {}
    for call in calls:
        found.setdefault(quantized_kernel_name(call["kernel"], call["layout"]), call)
    return found


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_quantized_kernels_compile_for_the_device(recorded, tmp_path):
    parts = []
    for name, call in _unique(recorded).items():
        kernel, layout = call["kernel"], call["layout"]
        parts.append(quantized_cuda_source(kernel, layout))
        for ctype in ("float", "double"):
            # Codes, scales and maps keep their types; the parameter's arrays are T.
            types = [t if role.split("_")[0] in ("q", "m", "map", "mid")
                     else t.replace("float", ctype) for t, role in _arguments(kernel, layout)]
            types = ", ".join(["long long", *types, *([ctype] * kernel.n_hoisted)])
            parts.append(f"template __global__ void {name}<{ctype}>({types});")
    source = tmp_path / "quantized.cu"
    source.write_text("\n".join(parts) + "\n")
    result = subprocess.run(["nvcc", *COMPILE_OPTIONS, "-arch=sm_90", "-c", "-o",
                             str(tmp_path / "quantized.o"), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def emulator(recorded, tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    kernels = _unique(recorded)
    parts = [HOST_PRELUDE]
    for index, (name, call) in enumerate(kernels.items()):
        kernel, layout = call["kernel"], call["layout"]
        parts.append(quantized_cuda_source(kernel, layout))
        arguments = _arguments(kernel, layout)
        casts = [f"({t})a[{i}]" for i, (t, _) in enumerate(arguments)]
        hoisted = [f"h[{i}]" for i in range(kernel.n_hoisted)]
        call_args = ", ".join(["n", *casts, *hoisted])
        parts.append(f'extern "C" void run_{index}(long long n, void** a, const float* h, '
                     f"unsigned grid) {{\n"
                     f"    auto launch = [&]() {{ {name}<float>({call_args}); }};\n"
                     f"    oc_emulate(grid, {quantized_threads(layout)}, launch);\n}}")
        call["symbol"] = f"run_{index}"
    directory = tmp_path_factory.mktemp("quantized_cuda")
    (directory / "kernels.cpp").write_text("\n".join(parts) + "\n")
    result = subprocess.run([CXX, "-std=c++14", "-O1", "-ffp-contract=off", "-fno-fast-math",
                             "-fPIC", "-shared", "-pthread", "-o", str(directory / "k.so"),
                             str(directory / "kernels.cpp")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    library = ctypes.CDLL(str(directory / "k.so"))
    return {name: getattr(library, call["symbol"]) for name, call in kernels.items()}


def _launch(function, call, grid: int) -> tuple[np.ndarray, dict]:
    kernel = call["kernel"]
    param, state = call["param"].copy(), _copy(call["state"])
    grad = call["grad"].copy()
    arrays = []
    for a in kernel.arrays:
        value = {"param": param, "grad": grad}.get(a, state.get(a))
        if is_quantized(value):
            arrays += [value.codes, value.absmax,
                       np.array(quantization_map(value.bits, value.signed)),
                       np.array(midpoints(value.bits, value.signed))]
        else:
            arrays.append(value)
    pointers = (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))
    hoisted = np.asarray(call["hoisted"], dtype=np.float32)
    function(ctypes.c_longlong(param.size), pointers,
             hoisted.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint(grid))
    return param, state


def test_emulated_launches_equal_the_generic_path(recorded, emulator):
    for index, call in enumerate(recorded):
        name = quantized_kernel_name(call["kernel"], call["layout"])
        blocks = -(-call["param"].size // BLOCK_SIZES[call["layout"][0][1]])
        # A CUDA block a quantization block (as CudaImplementation launches), or fewer
        # blocks than that (the grid-stride loop), in turn.
        for grid in ((blocks,) if index % 2 else (5,)):
            param, state = _launch(emulator[name], call, grid)
            assert param.tobytes() == call["new_param"].tobytes(), (name, grid)
            for key, value in call["new_state"].items():
                if is_quantized(value):
                    np.testing.assert_array_equal(state[key].codes, value.codes)
                    np.testing.assert_array_equal(state[key].absmax, value.absmax)
                else:
                    np.testing.assert_array_equal(state[key], value)


def test_the_cuda_implementation_launches_one_block_per_quantization_block(recorded):
    """CudaImplementation.launch on stand-ins: grid, threads and argument order."""
    seen = []

    class Function:
        def __call__(self, grid, block, args):
            seen.append((grid, block, args))

    class Array:
        def __init__(self, size):
            self.size = size

    from optim_core.backends._cuda import _QuantizedKernels

    impl = CudaImplementation(max_blocks=7)
    kernels = _QuantizedKernels(Function(), 256, 256)
    arrays = (Array(5000), Array(5000), "q", "m", "map", "mid")
    impl.launch([(kernels, [np.float32(0.5)], arrays)])
    impl.launch([(kernels, [np.float32(0.5)], (Array(600), *arrays[1:]))])
    assert [(g, b) for g, b, _ in seen] == [((7,), (256,)), ((3,), (256,))]
    assert seen[0][2][1:] == (*arrays, np.float32(0.5)) and seen[0][2][0] == 5000


@pytest.mark.parametrize("name, hyper, bits", CASES, ids=[f"{n}-{b}bit" for n, _, b in CASES])
def test_on_a_gpu_the_fused_quantized_step_equals_the_generic_path(gpu, name, hyper, bits):
    """Where a GPU is lent: the compiled kernel launched by CudaImplementation, on CuPy
    arrays, gives the generic path's parameters, codes and scales bit for bit."""
    import cupy

    start = start_params()
    runs = {}
    for impl in ("generic", "fused"):
        params = {k: cupy.asarray(v) for k, v in start.items()}
        opt = getattr(optim_core, name)(params, **hyper, state_bits=bits, impl=impl)
        for step in range(3):
            host = {k: gradient(v, step) for k, v in start.items()}
            opt.step({k: cupy.asarray(v) for k, v in host.items()})
        runs[impl] = (params, opt)
    (generic_params, generic), (fused_params, fused) = runs["generic"], runs["fused"]
    assert fused.implementation.name == "fused-cuda"
    for key in generic_params:
        assert cupy.asnumpy(fused_params[key]).tobytes() == \
            cupy.asnumpy(generic_params[key]).tobytes(), key
    for key, value in generic.state[0][0].items():
        theirs = fused.state[0][0][key]
        assert is_quantized(value) and is_quantized(theirs)
        np.testing.assert_array_equal(cupy.asnumpy(theirs.codes), cupy.asnumpy(value.codes))
        np.testing.assert_array_equal(cupy.asnumpy(theirs.absmax), cupy.asnumpy(value.absmax))
