"""The fused CuPy path: one generated CUDA kernel launch per tensor (per buffer with flat=True).

For each specialization of a rule (see :mod:`optim_core.backends._lowering`),
:func:`cuda_source` emits CUDA C++ text: the rule's body as a ``__host__ __device__``
per-element function template, and a grid-stride ``__global__`` kernel template
applying it, instantiated for ``float`` and ``double``. The same text is compiled by
NVRTC through ``cupy.RawModule`` for the GPU and, in the tests, by ``nvcc`` into a
host program that checks its arithmetic against the generic path without a GPU.

Each launch reads every element once and writes it once, in place, with no
temporary. Hyperparameters and every scalar subexpression are kernel arguments, so
a schedule that changes ``lr`` reuses the compiled kernel. The kernels are built
with ``--fmad=false``: the generic path rounds after every operation, and so must
the kernel (a fused multiply-add would round once). ``sqrt`` and ``/`` are
IEEE-rounded (NVRTC's default, no fast math).

Tensors the kernel cannot take as they are (not C-contiguous, a dtype other than
float32/float64) are stepped by the generic path instead, one by one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optim_core._generic import GENERIC
from optim_core.rule import UpdateRule

from ._lowering import Kernel, lower

__all__ = ["CudaImplementation", "CUDA", "cuda_source", "kernel_name", "COMPILE_OPTIONS",
           "CUDA_TYPES"]

#: NVRTC/nvcc options every generated kernel is compiled with.
COMPILE_OPTIONS = ("--fmad=false", "-std=c++14")
#: NumPy dtype name -> CUDA C++ type of the kernel instantiations.
CUDA_TYPES = {"float32": "float", "float64": "double"}
_THREADS = 256

#: The operations every kernel may call, as overloads for each element type.
_PRELUDE = """\
#ifndef OPTIM_CORE_PRELUDE
#define OPTIM_CORE_PRELUDE
__host__ __device__ inline float oc_sqrt(float x) { return sqrtf(x); }
__host__ __device__ inline double oc_sqrt(double x) { return sqrt(x); }
__host__ __device__ inline float oc_abs(float x) { return fabsf(x); }
__host__ __device__ inline double oc_abs(double x) { return fabs(x); }
// NaN propagates from either side, as xp.maximum does (fmax would drop it).
template <typename T>
__host__ __device__ inline T oc_maximum(T a, T b) { return (a >= b || a != a) ? a : b; }
// sign(0) = 0 and sign(NaN) = NaN, as xp.sign.
template <typename T>
__host__ __device__ inline T oc_sign(T x) {
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == T(0) ? T(0) : x));
}
#endif
"""


def kernel_name(kernel: Kernel) -> str:
    """The C++ name of ``kernel``'s ``__global__`` template (unique per specialization)."""
    return f"optim_core_{kernel.rule}_{kernel.digest}"


def _expression(expr: tuple) -> str:
    kind = expr[0]
    if kind == "load":
        return f"l_{expr[1]}"
    if kind == "local":
        return f"v_{expr[1]}"
    if kind == "hoisted":
        return f"h{expr[1]}"
    if kind == "neg":
        return f"(-{_expression(expr[1])})"
    if kind == "bin":
        return f"({_expression(expr[2])} {expr[1]} {_expression(expr[3])})"
    if kind == "call":
        return f"oc_{expr[1]}({', '.join(_expression(a) for a in expr[2])})"
    raise AssertionError(kind)


def _parameters(kernel: Kernel) -> str:
    arrays = [f"{'const ' if a not in kernel.stores else ''}T* __restrict__ a_{a}"
              for a in kernel.arrays]
    return ", ".join(arrays + [f"T h{i}" for i in range(kernel.n_hoisted)])


def _arguments(kernel: Kernel) -> str:
    return ", ".join([f"a_{a}" for a in kernel.arrays] +
                     [f"h{i}" for i in range(kernel.n_hoisted)])


def cuda_source(kernel: Kernel) -> str:
    """CUDA C++ source of ``kernel``.

    Defines, for ``name = kernel_name(kernel)``:

    * ``template <typename T> __host__ __device__ void name_element(long long i,
      T* param, const T* grad, T* state..., T h0, ...)``: the rule on element ``i``;
    * ``template <typename T> __global__ void name(long long n, <same arrays and
      scalars>)``: a grid-stride loop over ``n`` elements;
    * ``name_vec``, the same for arrays that are all 16-byte aligned, moving 16-byte
      packs (4 floats, 2 doubles) per thread and iteration,

    instantiated by the compiler for the type asked for (``name<float>``,
    ``name<double>``).
    """
    name = kernel_name(kernel)
    body = [f"    const T l_{a} = a_{a}[i];" for a in kernel.loads]
    body += [f"    const T v_{target} = {_expression(expr)};" for target, expr in kernel.body]
    body += [f"    a_{a}[i] = v_{kernel.results[a]};" for a in kernel.stores]
    # The vectorized kernel moves 16-byte packs; each element of a pack goes through
    # the same element function, on the pack's registers instead of global memory.
    packs = [f"        Pack p_{a};" for a in kernel.arrays if a not in kernel.loads]
    packs += [f"        const Pack p_{a} = reinterpret_cast<const Pack*>(a_{a})[j];"
              if a not in kernel.stores else
              f"        Pack p_{a} = reinterpret_cast<const Pack*>(a_{a})[j];"
              for a in kernel.loads]
    pack_arguments = ", ".join([f"p_{a}.v" for a in kernel.arrays] +
                               [f"h{i}" for i in range(kernel.n_hoisted)])
    pack_stores = [f"        reinterpret_cast<Pack*>(a_{a})[j] = p_{a};" for a in kernel.stores]
    lines = [
        f"// Generated by optim_core from rule {kernel.rule!r}; key {kernel.key!r}.",
        _PRELUDE,
        "template <typename T>",
        f"__host__ __device__ inline void {name}_element(long long i, {_parameters(kernel)}) {{",
        *body,
        "}",
        "",
        "// Any alignment: one element per thread and iteration.",
        "template <typename T>",
        f"__global__ void {name}(long long n, {_parameters(kernel)}) {{",
        "    const long long stride = (long long)blockDim.x * gridDim.x;",
        "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;"
        " i += stride) {",
        f"        {name}_element<T>(i, {_arguments(kernel)});",
        "    }",
        "}",
        "",
        "// Every array 16-byte aligned: 16-byte loads and stores, then the tail.",
        "template <typename T>",
        f"__global__ void {name}_vec(long long n, {_parameters(kernel)}) {{",
        "    constexpr int V = 16 / sizeof(T);",
        "    struct alignas(16) Pack { T v[V]; };",
        "    const long long stride = (long long)blockDim.x * gridDim.x;",
        "    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
        "    const long long n_packs = n / V;",
        "    for (long long j = start; j < n_packs; j += stride) {",
        *packs,
        "#pragma unroll",
        "        for (int k = 0; k < V; ++k) {",
        f"            {name}_element<T>(k, {pack_arguments});",
        "        }",
        *pack_stores,
        "    }",
        "    for (long long i = n_packs * V + start; i < n; i += stride) {",
        f"        {name}_element<T>(i, {_arguments(kernel)});",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class CudaImplementation:
    """The fused CuPy implementation: one generated kernel launch per contiguous tensor.

    Attributes
    ----------
    compiled : dict
        ``(rule name, key, dtype) -> (kernel, vectorized kernel)`` for every
        specialization this process has compiled; a new ``lr`` adds none.
    launches : int
        Number of kernel launches made, for tests and benchmarks.
    """

    name = "fused-cuda"

    def __init__(self) -> None:
        self.compiled: dict[tuple, Any] = {}
        self.launches = 0
        self._blocks_cap: dict[int, int] = {}

    def kernel_for(self, rule: UpdateRule, scalars: dict[str, Any], present: frozenset[str],
                   dtype: np.dtype) -> tuple[Any, list[float]]:
        """The compiled kernels (any alignment, 16-byte aligned) and the hoisted values."""
        key, hoisted, _ = lower(rule, scalars, present, build=False)
        cache_key = (rule.name, key, dtype.name)
        function = self.compiled.get(cache_key)
        if function is None:
            import cupy

            _, _, lowered = lower(rule, scalars, present)
            name, ctype = kernel_name(lowered), CUDA_TYPES[dtype.name]
            expressions = [f"{name}<{ctype}>", f"{name}_vec<{ctype}>"]
            module = cupy.RawModule(code=cuda_source(lowered), options=COMPILE_OPTIONS,
                                    name_expressions=expressions)
            function = tuple(module.get_function(e) for e in expressions)
            self.compiled[cache_key] = function
        return function, hoisted

    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states`` in place; return the parameters."""
        prepared: dict[tuple, tuple] = {}
        for param, grad, state in zip(params, grads, states, strict=True):
            present = frozenset(n for n in rule.states if n in state)
            arrays = [param, grad, *(state[n] for n in rule.states if n in state)]
            if not _fusable(arrays):
                GENERIC.step(rule, xp, [param], [grad], [state], scalars)
                continue
            dtype = np.dtype(param.dtype)
            entry = prepared.get((present, dtype))
            if entry is None:
                function, hoisted = self.kernel_for(rule, scalars, present, dtype)
                entry = prepared[present, dtype] = (function, [dtype.type(h) for h in hoisted])
            (unaligned, aligned), hoisted = entry
            n = param.size
            if n:
                if all(a.data.ptr % 16 == 0 for a in arrays):
                    function, per_thread = aligned, 16 // dtype.itemsize
                else:
                    function, per_thread = unaligned, 1
                threads_needed = (n + per_thread - 1) // per_thread
                blocks = min((threads_needed + _THREADS - 1) // _THREADS, self._max_blocks(param))
                function((blocks,), (_THREADS,), (np.int64(n), *arrays, *hoisted))
                self.launches += 1
        return params

    def _max_blocks(self, array: Any) -> int:
        device = array.device.id
        cap = self._blocks_cap.get(device)
        if cap is None:
            # Enough resident blocks to fill every SM several times; the grid-stride
            # loop covers the rest.
            sms = array.device.attributes["MultiProcessorCount"]
            cap = self._blocks_cap[device] = sms * 2048 // _THREADS * 4
        return cap


def _fusable(arrays: list[Any]) -> bool:
    first = arrays[0]
    return np.dtype(first.dtype).name in CUDA_TYPES and all(
        a.dtype == first.dtype and a.flags.c_contiguous for a in arrays)


CUDA = CudaImplementation()
