"""The fused CuPy path: generated CUDA kernels, one launch per large tensor (per buffer with
flat=True), one for all small tensors of a dtype once a step plan is kept (one per 32
small tensors on the full path).

For each specialization of a rule (see :mod:`optim_core.backends._lowering`),
:func:`cuda_source` emits CUDA C++ text: the rule's body as a ``__host__ __device__``
per-element function template, and ``__global__`` kernel templates applying it to one
tensor or to many (their sizes and addresses in a table passed by value), instantiated
for ``float`` and ``double``. The same text is compiled by
NVRTC through ``cupy.RawModule`` for the GPU and, in the tests, by ``nvcc`` into a
host program that checks its arithmetic against the generic path without a GPU.

Each launch reads every element once and writes it once, in place, with no
temporary. Hyperparameters and every scalar subexpression are kernel arguments, so
a schedule that changes ``lr`` reuses the compiled kernel. The kernels are built
with ``--fmad=false``: the generic path rounds after every operation, and so must
the kernel (a fused multiply-add would round once). ``sqrt`` and ``/`` are
IEEE-rounded (NVRTC's default, no fast math).

A rule with per-tensor reductions (``sum``, ``norm``, ``size``; see :mod:`._lowering`) runs, per
tensor, one reduction launch per stage before the update launch: each thread
accumulates its grid-stride share in float64 registers and adds it with one
``atomicAdd`` to one of :data:`REDUCTION_SLOTS` slots (by lane, so a warp's 32 adds go
to 32 addresses), then a one-block launch sums the slots into the reduction's value.
The values stay on the device, in a float64 buffer the update launch reads: no host
synchronization. Atomics make the order of the float64 additions vary from run to
run (the float64 sum of float32 data rounds the same nearly always). Such tensors
take single-tensor launches only (no multi-tensor table).

A rule with axis reductions (``row_mean``, ``col_mean``) or states shaped unlike the
parameter (``"rows"``, ``"cols"``: Adafactor's factored second moment) runs each tensor
of two or more dimensions through the passes of :mod:`._cuda_factored`, generated from
the same lowered kernel and the same value-axes analysis as the numba loops of
:mod:`._factored`: per reduction stage, a pass with 32 threads per row (row means, the
mean of the row factor, whole-tensor sums through the slots above), a pass with 32
threads per column (column means) and a finish adding each row's and column's partial
sums in order (deterministic); then the update, one thread per element, and one pass
writing each row state once per row and each column state once per column. The sums
stay in float64 on the device (an accumulator and a workspace per step): no host
synchronization. A form those passes do not lower is stepped by the generic path; a 0-d
or 1-D tensor (unfactored) takes the elementwise kernel with its reduction passes, as
above.

Tensors the kernel cannot take as they are (not C-contiguous, a dtype other than
float32/float64) are stepped by the generic path instead, one by one.

From a group's second step on, a step plan (:mod:`._cuda_plan`) keeps, on the device,
a table of its small tensors' first blocks, sizes and parameter and state addresses;
a step then checks the arrays in a few C-level passes, copies the gradients' addresses
to the device (one asynchronous copy from pinned memory, none if unchanged) and makes
one ``name_table`` launch per dtype, whatever the number of small tensors.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._cuda_factored import (
    FactoredCudaKernels,
    factored_cuda_source,
    factored_functions,
    factored_kernel_name,
    work_coefficients,
)
from ._cuda_text import PRELUDE as _PRELUDE
from ._cuda_text import REDUCTION_SLOTS
from ._factored import is_factored
from ._factored import unsupported as factored_unsupported
from ._fused import FusedImplementation
from ._lowering import Kernel, lower, render
from ._quantized import BLOCK_SIZES, midpoints, quantization_map

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

    from ._generic import PreparedStep

__all__ = ["CudaImplementation", "CUDA", "cuda_source", "kernel_name", "batch_length",
           "table_length",
           "COMPILE_OPTIONS", "CUDA_TYPES", "MULTI_TENSORS", "MULTI_MAX_SIZE",
           "REDUCTION_SLOTS", "REDUCTION_MAX_BLOCKS", "accumulator_length",
           "quantized_cuda_source", "quantized_kernel_name", "quantized_threads"]

#: NVRTC/nvcc options every generated kernel is compiled with.
COMPILE_OPTIONS = ("--fmad=false", "-std=c++14")
#: NumPy dtype name -> CUDA C++ type of the kernel instantiations.
CUDA_TYPES = {"float32": "float", "float64": "double"}
_THREADS = 256
#: Tensors per multi-tensor launch. The table of a launch is then at most
#: 2 * 32 + 1 + 5 * 32 = 225 ``long long`` (1.8 KB, five arrays being the most a rule
#: has), within the 4 KB CUDA allows for a kernel's parameters.
MULTI_TENSORS = 32
#: Tensors up to this many elements share launches. A larger tensor gets its own: its
#: device time (over 7 microseconds for float32 Adam on an H200) already hides the host's
#: cost of a launch.
MULTI_MAX_SIZE = 1 << 20
#: Most blocks of a reduction launch: about one resident wave of 256-thread blocks on a
#: large GPU (an H200 has 132 SMs); each thread then adds one partial sum per reduction.
REDUCTION_MAX_BLOCKS = 1024



def kernel_name(kernel: Kernel) -> str:
    """The C++ name of ``kernel``'s ``__global__`` template (unique per specialization)."""
    return f"optim_core_{kernel.rule}_{kernel.digest}"



def _parameters(kernel: Kernel, reduced: bool = True, stores: bool = True) -> str:
    """The arrays and scalars of the per-element functions (``reduced``: with the values
    ``r0 ..`` of the reductions; ``stores``: arrays the update writes non-const)."""
    arrays = [f"{'const ' if a not in kernel.stores or not stores else ''}T* __restrict__ a_{a}"
              for a in kernel.arrays]
    return ", ".join(arrays + [f"T h{i}" for i in range(kernel.n_hoisted)] +
                     [f"T r{i}" for i in range(len(kernel.reductions) if reduced else 0)])


def _arguments(kernel: Kernel, n_reduced: int | None = None) -> str:
    n_reduced = len(kernel.reductions) if n_reduced is None else n_reduced
    return ", ".join([f"a_{a}" for a in kernel.arrays] +
                     [f"h{i}" for i in range(kernel.n_hoisted)] +
                     [f"r{i}" for i in range(n_reduced)])


def _global_parameters(kernel: Kernel, stores: bool = True) -> str:
    """A ``__global__`` kernel's arrays and scalars: the reductions' float64 accumulator
    instead of their values."""
    accumulator = ", double* __restrict__ oc_acc" if kernel.reductions else ""
    return _parameters(kernel, reduced=False, stores=stores) + accumulator


def _read_reduced(kernel: Kernel, count: int) -> list[str]:
    """Statements typing the first ``count`` reductions' values from the accumulator."""
    return [f"    const T r{i} = T({'oc_sqrt(' if r.kind == 'norm' else '('}oc_acc[{i}]));"
            for i, r in enumerate(kernel.reductions[:count])]


def accumulator_length(kernel: Kernel) -> int:
    """float64 values of one tensor's accumulator: each reduction's value, then its
    :data:`REDUCTION_SLOTS` slots (all zero before the step)."""
    return len(kernel.reductions) * (1 + REDUCTION_SLOTS)


def _reduction_source(kernel: Kernel) -> list[str]:
    """The reduction passes: per stage ``p``, ``name_reduce{p}_element`` (one element's
    contribution to the stage's sums ``s``), ``name_reduce{p}`` (a grid-stride loop,
    then one atomic add per thread and reduction into a slot) and ``name_finish{p}``
    (one thread per reduction: the sum of its slots, in slot order)."""
    name, m = kernel_name(kernel), len(kernel.reductions)
    lines = []
    for stage in range(kernel.n_stages):
        work = kernel.reduction_pass(stage)
        count = len(work.reductions)
        element = [f"    const T l_{a} = a_{a}[i];" for a in work.loads]
        element += [f"    const T v_{target} = {render(expr, 'oc_')};"
                    for target, expr in work.body]
        for slot, i in enumerate(work.reductions):
            kind = kernel.reductions[i].kind
            value = f"(double)({render(kernel.reductions[i].expr, 'oc_')})"
            element.append(f"    s[{slot}] += 1.0;" if kind == "size" else
                           f"    s[{slot}] += {value};" if kind == "sum" else
                           f"    {{ const double t = {value}; s[{slot}] += t * t; }}")
        parameters = _parameters(kernel, reduced=False, stores=False) + "".join(
            f", T r{i}" for i in range(work.first))
        lines += [
            "template <typename T>",
            f"__host__ __device__ inline void {name}_reduce{stage}_element(long long i, "
            f"{parameters}, double* s) {{",
            *element,
            "}",
            "",
            "template <typename T>",
            f"__global__ void {name}_reduce{stage}(long long n, "
            f"{_global_parameters(kernel, stores=False)}) {{",
            *_read_reduced(kernel, work.first),
            f"    double s[{count}] = {{}};",
            "    const long long stride = (long long)blockDim.x * gridDim.x;",
            "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;"
            " i += stride) {",
            f"        {name}_reduce{stage}_element<T>(i, {_arguments(kernel, work.first)}, s);",
            "    }",
            f"    const int lane = threadIdx.x % {REDUCTION_SLOTS};",
            *(f"    atomicAdd(&oc_acc[{m + i * REDUCTION_SLOTS} + lane], s[{slot}]);"
              for slot, i in enumerate(work.reductions)),
            "}",
            "",
            f"__global__ void {name}_finish{stage}(double* __restrict__ oc_acc) {{",
            f"    const int k = {work.first} + threadIdx.x;",
            f"    if (threadIdx.x < {count}) {{",
            "        double total = 0.0;",
            f"        for (int slot = 0; slot < {REDUCTION_SLOTS}; ++slot) "
            f"total += oc_acc[{m} + k * {REDUCTION_SLOTS} + slot];",
            "        oc_acc[k] = total;",
            "    }",
            "}",
            "",
        ]
    return lines


def batch_length(kernel: Kernel) -> int:
    """Number of ``long long`` in ``kernel``'s multi-tensor table (see :func:`cuda_source`)."""
    return 2 * MULTI_TENSORS + 1 + len(kernel.arrays) * MULTI_TENSORS


def cuda_source(kernel: Kernel) -> str:
    """CUDA C++ source of ``kernel``.

    Defines, for ``name = kernel_name(kernel)``:

    * ``template <typename T> __host__ __device__ void name_element(long long i,
      T* param, const T* grad, T* state..., T h0, ...)``: the rule on element ``i``;
    * ``name_pack``, the same on the ``j``-th 16-byte pack (4 floats, 2 doubles) of
      arrays that are all 16-byte aligned, through registers;
    * ``template <typename T> __global__ void name(long long n, <same arrays and
      scalars>)``: a grid-stride loop over ``n`` elements;
    * ``name_vec``, the same over 16-byte packs, then the tail;
    * ``template <typename T, bool VEC> __global__ void name_multi(name_batch batch,
      int count, <scalars>)``: up to :data:`MULTI_TENSORS` tensors in one launch. The
      table ``batch.v`` (passed by value) holds each tensor's size at ``[t]``, the
      first block of each at ``[K + t]`` (and the total at ``[K + count]``), and its
      arrays' addresses at ``[2K + 1 + a K + t]`` in the kernel's array order.
      Block ``b`` steps the tensor with the last first block ``<= b``, one thread per
      element (per pack and then per tail element with ``VEC``);
    * ``template <typename T> __global__ void name_table(const long long* table, const
      long long* grads, int count, <scalars>)``: the step plans' launch of ``count``
      tensors over tables in device memory (:func:`table_length`): ``table`` holds each
      tensor's first block at ``[t]`` (the total at ``[count]``), its size at
      ``[count + 1 + t]``, and the addresses of its arrays but the gradient at
      ``[2 count + 1 + a count + t]`` (``a`` counting the kernel's arrays without the
      gradient); ``grads[t]`` is its gradient's address. Block ``b`` finds its tensor by a
      binary search of the first blocks; blocks are sized for packs then the tail, and a
      tensor with an array off 16-byte alignment takes each pack's elements one by one,


    and for a kernel with reductions, no ``name_multi`` but the reduction passes (see
    :func:`_reduction_source`): its element functions then also take the reductions'
    values ``T r0, ...`` and its ``__global__`` kernels a ``double* oc_acc`` accumulator
    (:func:`accumulator_length`) instead, whose values they finish (the square root of
    a norm) and type;

    instantiated by the compiler for the type asked for (``name<float>``,
    ``name<double>``, ``name_multi<float, true>``, ...).
    """
    name = kernel_name(kernel)
    k = MULTI_TENSORS
    body = [f"    const T l_{a} = a_{a}[i];" for a in kernel.loads]
    body += [f"    const T v_{target} = {render(expr, 'oc_')};" for target, expr in kernel.body]
    body += [f"    a_{a}[i] = v_{kernel.results[a]};" for a in kernel.stores]
    # A pack: each element goes through the same element function, on the pack's
    # registers instead of global memory.
    packs = [f"    Pack p_{a};" for a in kernel.arrays if a not in kernel.loads]
    packs += [f"    const Pack p_{a} = reinterpret_cast<const Pack*>(a_{a})[j];"
              if a not in kernel.stores else
              f"    Pack p_{a} = reinterpret_cast<const Pack*>(a_{a})[j];"
              for a in kernel.loads]
    pack_arguments = ", ".join([f"p_{a}.v" for a in kernel.arrays] +
                               [f"h{i}" for i in range(kernel.n_hoisted)] +
                               [f"r{i}" for i in range(len(kernel.reductions))])
    pack_stores = [f"    reinterpret_cast<Pack*>(a_{a})[j] = p_{a};" for a in kernel.stores]
    # The multi-tensor kernel reads tensor t's arrays out of the table.
    unpack = [f"    {'const ' if a not in kernel.stores else ''}T* __restrict__ a_{a} = "
              f"reinterpret_cast<{'const ' if a not in kernel.stores else ''}T*>("
              f"batch.v[{2 * k + 1 + index * k} + t]);"
              for index, a in enumerate(kernel.arrays)]
    hoisted_parameters = "".join(f", T h{i}" for i in range(kernel.n_hoisted))
    lines = [
        f"// Generated by optim_core from rule {kernel.rule!r}; key {kernel.key!r}.",
        _PRELUDE,
        "template <typename T>",
        f"__host__ __device__ inline void {name}_element(long long i, {_parameters(kernel)}) {{",
        *body,
        "}",
        "",
        "template <typename T>",
        f"__host__ __device__ inline void {name}_pack(long long j, {_parameters(kernel)}) {{",
        "    constexpr int V = 16 / sizeof(T);",
        "    struct alignas(16) Pack { T v[V]; };",
        *packs,
        "#pragma unroll",
        "    for (int k = 0; k < V; ++k) {",
        f"        {name}_element<T>(k, {pack_arguments});",
        "    }",
        *pack_stores,
        "}",
        "",
        *_reduction_source(kernel),
        "// Any alignment: one element per thread and iteration.",
        "template <typename T>",
        f"__global__ void {name}(long long n, {_global_parameters(kernel)}) {{",
        *_read_reduced(kernel, len(kernel.reductions)),
        "    const long long stride = (long long)blockDim.x * gridDim.x;",
        "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;"
        " i += stride) {",
        f"        {name}_element<T>(i, {_arguments(kernel)});",
        "    }",
        "}",
        "",
        "// Every array 16-byte aligned: 16-byte loads and stores, then the tail.",
        "template <typename T>",
        f"__global__ void {name}_vec(long long n, {_global_parameters(kernel)}) {{",
        *_read_reduced(kernel, len(kernel.reductions)),
        "    constexpr int V = 16 / sizeof(T);",
        "    const long long stride = (long long)blockDim.x * gridDim.x;",
        "    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
        "    const long long n_packs = n / V;",
        "    for (long long j = start; j < n_packs; j += stride) {",
        f"        {name}_pack<T>(j, {_arguments(kernel)});",
        "    }",
        "    for (long long i = n_packs * V + start; i < n; i += stride) {",
        f"        {name}_element<T>(i, {_arguments(kernel)});",
        "    }",
        "}",
        "",
    ]
    if kernel.reductions:  # per tensor: no multi-tensor kernel
        return "\n".join(lines) + "\n"
    lines += [
        "// Many tensors, one launch: the table of sizes, first blocks and addresses.",
        f"struct {name}_batch {{ long long v[{batch_length(kernel)}]; }};",
        "",
        "template <typename T, bool VEC>",
        f"__global__ void {name}_multi(const {name}_batch batch, int count"
        f"{hoisted_parameters}) {{",
        "    const long long block = blockIdx.x;",
        "    int t = 0;",
        f"    while (t + 1 < count && batch.v[{k} + t + 1] <= block) ++t;",
        "    const long long n = batch.v[t];",
        *unpack,
        f"    const long long j = (block - batch.v[{k} + t]) * blockDim.x + threadIdx.x;",
        "    if (VEC) {",
        "        constexpr int V = 16 / sizeof(T);",
        "        const long long n_packs = n / V;",
        "        if (j < n_packs) {",
        f"            {name}_pack<T>(j, {_arguments(kernel)});",
        "        } else if (n_packs * V + (j - n_packs) < n) {",
        f"            {name}_element<T>(n_packs * V + (j - n_packs), {_arguments(kernel)});",
        "        }",
        "    } else if (j < n) {",
        f"        {name}_element<T>(j, {_arguments(kernel)});",
        "    }",
        "}",
        "",
        *_table_source(kernel),
    ]
    return "\n".join(lines) + "\n"


def table_length(kernel: Kernel, count: int) -> int:
    """Number of ``long long`` in ``kernel``'s device-resident table of ``count`` tensors
    (see :func:`cuda_source`): first blocks (and the total), sizes, and the addresses of
    every array but the gradient."""
    return 2 * count + 1 + (len(kernel.arrays) - 1) * count


def _table_source(kernel: Kernel) -> list[str]:
    """``name_table``: every small tensor of a step plan in one launch (see
    :func:`cuda_source`)."""
    name = kernel_name(kernel)
    columns = [a for a in kernel.arrays if a != "grad"]
    unpack = []
    for a in kernel.arrays:
        const = "" if a in kernel.stores else "const "
        source = ("oc_grads[t]" if a == "grad" else
                  f"oc_table[oc_columns + {columns.index(a)} * (long long)count + t]")
        unpack.append(f"    {const}T* __restrict__ a_{a} = reinterpret_cast<{const}T*>({source});")
    misaligned = " | ".join(f"reinterpret_cast<unsigned long long>(a_{a})"
                            for a in kernel.arrays)
    hoisted_parameters = "".join(f", T h{i}" for i in range(kernel.n_hoisted))
    return [
        "// Many tensors, one launch, a table on the device: oc_table holds the first",
        "// block of each tensor (and the total), then the sizes, then each array's",
        "// addresses but the gradients', which oc_grads holds (uploaded each step).",
        "template <typename T>",
        f"__global__ void {name}_table(const long long* __restrict__ oc_table, "
        f"const long long* __restrict__ oc_grads, int count{hoisted_parameters}) {{",
        "    const long long block = blockIdx.x;",
        "    // The last tensor whose first block is <= this one (each has at least one).",
        "    int low = 0, high = count - 1;",
        "    while (low < high) {",
        "        const int middle = (low + high + 1) >> 1;",
        "        if (oc_table[middle] <= block) low = middle; else high = middle - 1;",
        "    }",
        "    const int t = low;",
        "    const long long n = oc_table[count + 1 + t];",
        "    const long long oc_columns = 2 * (long long)count + 1;",
        *unpack,
        "    // Blocks are sized for 16-byte packs, then the tail; a tensor with an array",
        "    // off 16-byte alignment (a gradient can be) takes the same elements one by one.",
        "    constexpr int V = 16 / sizeof(T);",
        "    const long long j = (block - oc_table[t]) * blockDim.x + threadIdx.x;",
        "    const long long n_packs = n / V;",
        "    if (j < n_packs) {",
        f"        if ((({misaligned}) & 15) == 0) {{",
        f"            {name}_pack<T>(j, {_arguments(kernel)});",
        "        } else {",
        "            for (int k = 0; k < V; ++k) {",
        f"                {name}_element<T>(j * V + k, {_arguments(kernel)});",
        "            }",
        "        }",
        "    } else if (n_packs * V + (j - n_packs) < n) {",
        f"        {name}_element<T>(n_packs * V + (j - n_packs), {_arguments(kernel)});",
        "    }",
        "}",
    ]


_QUANTIZED_PRELUDE = """\
#ifndef OPTIM_CORE_QUANTIZED_PRELUDE
#define OPTIM_CORE_QUANTIZED_PRELUDE
// The running absmax of a block; a NaN stays, as xp.max keeps it.
template <typename T>
__host__ __device__ inline T oc_maxabs(T m, T v) {
    const T a = oc_abs(v);
    return (m >= a || m != m) ? m : a;
}
// The number of the 2**bits - 1 midpoints below x (searchsorted, side='left'; a NaN
// above all): a binary search of fixed steps, without branches.
template <int BITS, typename T>
__host__ __device__ inline int oc_code(const float* __restrict__ mids, T x) {
    int p = 0;
#pragma unroll
    for (int step = 1 << (BITS - 1); step > 0; step >>= 1) {
        p += (!(x <= T(mids[p + step - 1]))) ? step : 0;
    }
    return p;
}
#endif
"""


def quantized_kernel_name(kernel: Kernel, layout: tuple) -> str:
    """The C++ name of the quantized ``__global__`` template of ``kernel`` and ``layout``."""
    digest = hashlib.sha256(repr((kernel.digest, layout)).encode()).hexdigest()[:16]
    return f"optim_core_{kernel.rule}_q_{digest}"


def quantized_threads(layout: tuple) -> int:
    """Threads per CUDA block of a quantized kernel: one per byte of codes of a block."""
    bits = layout[0][1]
    return BLOCK_SIZES[bits] // (8 // bits)


def quantized_cuda_source(kernel: Kernel, layout: tuple) -> str:
    """CUDA C++ source of ``kernel`` with the states of ``layout`` quantized.

    ``layout`` is ``((state, bits, signed), ...)`` (see :mod:`._quantized`). Defines
    ``template <typename T> __global__ void name(long long n, T* param, const T* grad,
    <per state: T* state, or unsigned char* q_state, float* m_state, const float*
    map_state, const float* mid_state>, T h0, ...)`` with ``name =
    quantized_kernel_name(kernel, layout)``, to be launched with
    :func:`quantized_threads` threads a block. A CUDA block steps one quantization block
    at a time (grid-stride over blocks): each thread takes one byte of codes (one element
    at 8 bits, two at 4), dequantizes with the block's old scale, runs the rule's body,
    stores the parameter and the unquantized states and keeps the new quantized values in
    registers; a shared-memory reduction gives the block's new absmax; then every thread
    writes its codes and thread 0 the scale. One pass over memory, no temporary array.
    """
    quantized = {name: (bits, signed) for name, bits, signed in layout}
    (bits,) = {b for b, _ in quantized.values()}
    block, per_thread = BLOCK_SIZES[bits], 8 // bits
    threads = block // per_thread
    name = quantized_kernel_name(kernel, layout)
    requantized = [a for a in kernel.stores if a in quantized]
    parameters = []
    for a in kernel.arrays:
        if a in quantized:
            parameters += [f"unsigned char* __restrict__ q_{a}", f"float* __restrict__ m_{a}",
                           f"const float* __restrict__ map_{a}",
                           f"const float* __restrict__ mid_{a}"]
        else:
            parameters.append(f"{'const ' if a not in kernel.stores else ''}T* __restrict__ a_{a}")
    parameters += [f"T h{i}" for i in range(kernel.n_hoisted)]
    loads = []
    for a in kernel.loads:
        if a not in quantized:
            loads.append(f"            const T l_{a} = a_{a}[i];")
        elif bits == 8:
            loads.append(f"            const T l_{a} = T(map_{a}[q_{a}[i]]) * s_{a};")
        else:
            loads.append(f"            const T l_{a} = T(map_{a}[(q_{a}[i >> 1] >> ((i & 1) << 2))"
                         f" & 15]) * s_{a};")
    body = loads + [f"            const T v_{target} = {render(expr, 'oc_')};"
                    for target, expr in kernel.body]
    for a in kernel.stores:
        result = f"v_{kernel.results[a]}"
        if a in quantized:
            body += [f"            r_{a}[e] = {result};",
                     f"            x_{a} = oc_maxabs(x_{a}, {result});"]
        else:
            body.append(f"            a_{a}[i] = {result};")
    reduce, write = [], []
    for a in requantized:
        reduce += [f"        oc_max_{a}[threadIdx.x] = x_{a};"]
        write += [
            f"        const float amax_{a} = (float)oc_max_{a}[0];",
            f"        T scale_{a} = T(amax_{a});",
            f"        if (!(scale_{a} > T(0))) scale_{a} = T(1);",
            f"        if (threadIdx.x == 0) m_{a}[b] = amax_{a};",
        ]
        if bits == 8:
            write.append(f"        if (first < n) q_{a}[first] = (unsigned char)oc_code<8>("
                         f"mid_{a}, r_{a}[0] / scale_{a});")
        else:
            # Past the end, r is 0: the zero the generic path pads with.
            write.append(f"        if (first < n) q_{a}[first >> 1] = (unsigned char)(oc_code<4>("
                         f"mid_{a}, r_{a}[0] / scale_{a}) | (oc_code<4>(mid_{a}, "
                         f"r_{a}[1] / scale_{a}) << 4));")
    combine = [f"                oc_max_{a}[threadIdx.x] = oc_maximum(oc_max_{a}[threadIdx.x], "
               f"oc_max_{a}[threadIdx.x + stride]);" for a in requantized]
    lines = [
        f"// Generated by optim_core from rule {kernel.rule!r}; key {kernel.key!r}; "
        f"quantized {layout!r}.",
        _PRELUDE,
        _QUANTIZED_PRELUDE,
        "template <typename T>",
        f"__global__ void {name}(long long n, {', '.join(parameters)}) {{",
        *(f"    __shared__ T oc_max_{a}[{threads}];" for a in requantized),
        f"    const long long blocks = (n + {block - 1}) / {block};",
        "    for (long long b = blockIdx.x; b < blocks; b += gridDim.x) {",
        f"        const long long first = b * {block} + (long long)threadIdx.x * {per_thread};",
        *(f"        const T s_{a} = T(m_{a}[b]);" for a in kernel.loads if a in quantized),
        *(f"        T r_{a}[{per_thread}];" for a in requantized),
        *(f"        T x_{a} = T(0);" for a in requantized),
        f"        for (int e = 0; e < {per_thread}; ++e) {{",
        *(f"            r_{a}[e] = T(0);" for a in requantized),
        "            const long long i = first + e;",
        "            if (i >= n) continue;",
        *body,
        "        }",
        *reduce,
        "        __syncthreads();",
        f"        for (int stride = {threads // 2}; stride > 0; stride >>= 1) {{",
        "            if (threadIdx.x < stride) {",
        *combine,
        "            }",
        "            __syncthreads();",
        "        }",
        *write,
        "        // The shared maxima are the next block's.",
        "        __syncthreads();",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class CudaImplementation(FusedImplementation):
    """The fused CuPy implementation: generated kernels, in place, a few launches a step.

    A tensor of more than ``multi_max_size`` elements gets a launch of its own; smaller
    ones share launches: through a kept step plan (:meth:`make_plan`), all of a dtype in
    one launch over a device-resident table; on the full path (the first step, or
    anything the plan does not take), :data:`MULTI_TENSORS` at a time, by specialization,
    dtype and alignment. Every launch has one thread per element, or per 16-byte pack
    where all of a tensor's arrays are 16-byte aligned.

    Parameters
    ----------
    threads : int, default 256
        Threads per block.
    max_blocks : int, default 2**31 - 1 (CUDA's limit)
        Most blocks a single-tensor launch may have; beyond it, the kernels'
        grid-stride loops cover the rest.
    multi_max_size : int, default :data:`MULTI_MAX_SIZE`
        The largest tensor that shares a launch (0: none do).

    Attributes
    ----------
    compiled : dict
        ``(rule name, key, dtype) -> kernels`` (single-tensor, vectorized, and the
        multi-tensor pair; a factored specialization's passes, a
        :class:`._cuda_factored.FactoredCudaKernels`, or None where they do not lower
        its form) for every specialization this process has compiled; a new ``lr`` adds
        none.
    launches : int
        Number of kernel launches made, for tests and benchmarks.

    Notes
    -----
    The defaults are the fastest of ``bench/cuda_tuning.py``'s sweep on an NVIDIA
    H200 (2026-11-26, results in ``bench/results/``): for Adam on 1e8 float32
    elements, 16-byte accesses with one thread per pack and 256 threads a block took
    0.666 ms, a grid of four resident waves with a grid-stride loop 0.695 ms, one
    resident wave 0.713 ms, and scalar accesses at best 0.886 ms.
    """

    name = "fused-cuda"

    def __init__(self, threads: int = _THREADS, max_blocks: int = 2**31 - 1,
                 multi_max_size: int = MULTI_MAX_SIZE) -> None:
        super().__init__()
        self.threads, self.max_blocks, self.multi_max_size = threads, max_blocks, multi_max_size

    def kernel_for(self, rule: UpdateRule, scalars: dict[str, Any], present: frozenset[str],
                   dtype: np.dtype, layout: tuple = ()) -> tuple[Any, list[float]]:
        """The compiled kernels of this step's specialization and the hoisted values
        (``layout``: the quantized states, see :func:`quantized_cuda_source`)."""
        key, hoisted, _ = lower(rule, scalars, present, build=False)
        cache_key = (rule.name, key, dtype.name, *((layout,) if layout else ()))
        kernels = self.compiled.get(cache_key)
        if kernels is None and layout:
            import cupy

            _, _, lowered = lower(rule, scalars, present)
            expression = f"{quantized_kernel_name(lowered, layout)}<{CUDA_TYPES[dtype.name]}>"
            module = cupy.RawModule(code=quantized_cuda_source(lowered, layout),
                                    options=COMPILE_OPTIONS, name_expressions=[expression])
            kernels = self.compiled[cache_key] = _QuantizedKernels(
                module.get_function(expression), quantized_threads(layout),
                BLOCK_SIZES[layout[0][1]])
        if kernels is None and cache_key not in self.compiled:  # None: declined before
            _, _, lowered = lower(rule, scalars, present)
            if is_factored(lowered, rule.state_shapes):
                # Axis reductions or shaped states: the passes of ._cuda_factored (None,
                # stepped by the generic path, for a form they do not lower).
                kernels = None if factored_unsupported(lowered, rule.state_shapes) else \
                    self._compile_factored(lowered, dtype, rule.state_shapes)
            else:
                kernels = self._compile(lowered, dtype)
            self.compiled[cache_key] = kernels
        return kernels, hoisted

    def compile_kernel(self, kernel: Kernel, dtype: np.dtype) -> _Kernels:
        """The kernels of any lowered ``kernel`` on ``dtype`` arrays: a stage of a rule with
        matrix operations (:mod:`._staged`)."""
        dtype = np.dtype(dtype)
        cache_key = (kernel.rule, kernel.key, dtype.name)
        kernels = self.compiled.get(cache_key)
        if kernels is None:
            kernels = self.compiled[cache_key] = self._compile(kernel, dtype)
        return kernels

    @staticmethod
    def _compile(lowered: Kernel, dtype: np.dtype) -> _Kernels:
        """Compile ``lowered``'s CUDA source with NVRTC; its kernels."""
        import cupy

        name, ctype = kernel_name(lowered), CUDA_TYPES[dtype.name]
        expressions = [f"{name}<{ctype}>", f"{name}_vec<{ctype}>"]
        if lowered.reductions:
            for stage in range(lowered.n_stages):
                expressions += [f"{name}_reduce{stage}<{ctype}>", f"{name}_finish{stage}"]
        else:
            expressions += [f"{name}_multi<{ctype}, false>", f"{name}_multi<{ctype}, true>",
                            f"{name}_table<{ctype}>"]
        module = cupy.RawModule(code=cuda_source(lowered), options=COMPILE_OPTIONS,
                                name_expressions=expressions)
        functions = [module.get_function(e) for e in expressions]
        batch = np.dtype([("v", np.int64, (batch_length(lowered),))])
        if lowered.reductions:
            counts = tuple(len(lowered.reduction_pass(p).reductions)
                           for p in range(lowered.n_stages))
            return _Kernels(functions[0], functions[1], None, None, batch,
                            tuple(zip(functions[2::2], functions[3::2])), counts,
                            accumulator_length(lowered))
        return _Kernels(*functions[:4], batch, table=functions[4])

    @staticmethod
    def _compile_factored(lowered: Kernel, dtype: np.dtype,
                          state_shapes: Any) -> FactoredCudaKernels:
        """Compile ``lowered``'s factored passes (:mod:`._cuda_factored`) with NVRTC."""
        import cupy

        name, ctype = factored_kernel_name(lowered), CUDA_TYPES[dtype.name]
        passes = factored_functions(lowered, state_shapes)
        # The finish passes read and write float64 only: no template.
        expressions = [f"{name}{suffix}" if kind == "finish" else f"{name}{suffix}<{ctype}>"
                       for kind, suffix, _ in passes]
        module = cupy.RawModule(code=factored_cuda_source(lowered, state_shapes),
                                options=COMPILE_OPTIONS, name_expressions=expressions)
        return FactoredCudaKernels(
            tuple((kind, extent, module.get_function(expression))
                  for (kind, _, extent), expression in zip(passes, expressions, strict=True)),
            work_coefficients(lowered, state_shapes), accumulator_length(lowered))

    def launch(self, tensors: list[tuple[Any, list[Any], tuple[Any, ...]]]) -> None:
        """A launch per large tensor, one per :data:`MULTI_TENSORS` small ones."""
        # (id of the kernels, 16-byte aligned) -> kernels, hoisted values, elements per pack
        # (0: element-wise), and the small tensors' sizes and addresses. There is one kernels
        # object per specialization and dtype.
        small: dict[tuple, tuple[_Kernels, list[Any], int, list[tuple[int, list[int]]]]] = {}
        factored = [entry for entry in tensors if type(entry[0]) is FactoredCudaKernels]
        if factored:
            self._launch_factored(factored)
            tensors = [entry for entry in tensors if type(entry[0]) is not FactoredCudaKernels]
        reducing = [entry for entry in tensors if getattr(entry[0], "stages", ())]
        if reducing:
            self._launch_reducing(reducing)
            tensors = [entry for entry in tensors if not getattr(entry[0], "stages", ())]
        for kernels, hoisted, arrays in tensors:
            n = arrays[0].size
            if type(kernels) is _QuantizedKernels:
                # A CUDA block a quantization block (grid-stride beyond max_blocks).
                blocks = min(-(-n // kernels.block), self.max_blocks)
                kernels.function((blocks,), (kernels.threads,), (np.int64(n), *arrays,
                                                                 *hoisted))
                self.launches += 1
                continue
            addresses = [a.data.ptr for a in arrays]
            aligned = all(address % 16 == 0 for address in addresses)
            pack = 16 // arrays[0].dtype.itemsize
            if n <= self.multi_max_size:
                small.setdefault((id(kernels), aligned),
                                 (kernels, hoisted, pack if aligned else 0, []))[3].append(
                                     (n, addresses))
                continue
            per_block = self.threads * (pack if aligned else 1)
            blocks = min((n + per_block - 1) // per_block, self.max_blocks)
            function = kernels.vec if aligned else kernels.any
            function((blocks,), (self.threads,), (np.int64(n), *arrays, *hoisted))
            self.launches += 1
        for kernels, hoisted, pack, tensors in small.values():
            for first in range(0, len(tensors), MULTI_TENSORS):
                self._launch_many(kernels, hoisted, tensors[first:first + MULTI_TENSORS], pack)

    # ----------------------------------------------------------------- step plans
    keeps_plans = True

    @property
    def device(self) -> Any:
        """The device operations of the step plans (:class:`._cuda_plan.CupyDevice`)."""
        device = self.__dict__.get("_device")
        if device is None:
            from ._cuda_plan import CupyDevice

            device = self.__dict__["_device"] = CupyDevice()
        return device

    @device.setter
    def device(self, device: Any) -> None:
        self.__dict__["_device"] = device

    def make_plan(self, names: tuple[str, ...], records: list[Any],
                  states: list[dict[str, Any]]) -> Any:
        """A device-resident table per dtype of the group's small tensors and what each
        step checks (:mod:`._cuda_plan`)."""
        from . import _cuda_plan

        arrays = 2 + len(names)
        return _cuda_plan.make_plan(
            names, records, self.threads, self.multi_max_size, self.max_blocks, self.device,
            lambda count: 2 * count + 1 + (arrays - 1) * count)

    def planned_step(self, rule: UpdateRule, data: Any, grads: Any, scalars: dict[str, Any],
                     params: list[Any], finite: bool = False) -> PreparedStep | None:
        """The kernels of each specialization, compiled; the gradients and the planned
        arrays checked (None if any differs, if a specialization reduces, or with
        ``finite``: the full path checks finiteness); then a step that uploads the
        gradients' addresses and makes one table launch per dtype, one per large tensor."""
        from . import _cuda_plan
        from ._generic import PreparedStep

        if finite:
            return None
        present = frozenset(data.names)
        calls = []
        for spec, view in zip(data.specs, data.grads_views, strict=True):
            dtype = spec[0]
            kernels, hoisted = self.kernel_for(rule, scalars, present, dtype)
            if kernels is None or kernels.table is None:
                # A specialization with reduction passes (or factored ones, or none: a form
                # they do not lower): the full path.
                return None
            calls.append((kernels, [dtype.type(h) for h in hoisted], spec, view))
        found = _cuda_plan.gradient_addresses(data, grads)
        if found is None:
            return None
        ordered, addresses = found
        threads, max_blocks, large = self.threads, self.max_blocks, data.large

        def run() -> list[Any]:
            stream = data.upload(addresses)
            launches = 0
            for kernels, hoisted, (dtype, _, split, last, table, count, blocks), view in calls:
                if count:
                    # The table's block counts are for the plan's threads a block.
                    kernels.table((blocks,), (data.threads,),
                                  (table, view, np.int32(count), *hoisted))
                    launches += 1
                per_pack = 16 // dtype.itemsize
                for row in range(split, last):
                    _, arrays, aligned = large[row]
                    grad = ordered[row]
                    n = arrays[0].size
                    vec = aligned and int(addresses[row]) % 16 == 0
                    per_block = threads * (per_pack if vec else 1)
                    function = kernels.vec if vec else kernels.any
                    function((min((n + per_block - 1) // per_block, max_blocks),), (threads,),
                             (np.int64(n), arrays[0], grad, *arrays[1:], *hoisted))
                    launches += 1
            data.launched(stream)
            self.launches += launches
            return params

        return PreparedStep(run)

    def fusable(self, arrays: list[Any]) -> bool:
        """C-contiguous CuPy arrays of one dtype, float32 or float64."""
        first = arrays[0]
        return np.dtype(first.dtype).name in CUDA_TYPES and all(
            a.dtype == first.dtype and a.flags.c_contiguous for a in arrays)

    def quantized_arrays(self, state: Any) -> tuple:
        """A quantized state's kernel arguments: codes, scales, and the map and midpoints
        on the codes' device (copied there once per device)."""
        import cupy

        device = state.codes.device.id
        tables = _DEVICE_TABLES.get((device, state.bits, state.signed))
        if tables is None:
            with cupy.cuda.Device(device):
                tables = _DEVICE_TABLES[device, state.bits, state.signed] = (
                    cupy.asarray(quantization_map(state.bits, state.signed)),
                    cupy.asarray(midpoints(state.bits, state.signed)))
        return (state.codes, state.absmax, *tables)

    def quantized_fusable(self, param: Any, states: tuple) -> bool:
        """C-contiguous CuPy codes (uint8) and scales (float32) beside fusable arrays."""
        from ._quantized import is_quantized

        for state in states:
            if is_quantized(state) and not all(
                    type(a).__module__.startswith("cupy") and a.dtype == dtype
                    and a.flags.c_contiguous for a, dtype in ((state.codes, np.uint8),
                                                              (state.absmax, np.float32))):
                return False
        return self.fusable([param, *(s for s in states if not is_quantized(s))])

    def grad_fusable(self, grad: Any, record: Any) -> bool:
        """A C-contiguous gradient of the parameter's dtype."""
        return grad.dtype == record.dtype and grad.flags.c_contiguous

    def _launch_reducing(self, tensors: list[tuple[Any, list[Any], tuple[Any, ...]]]) -> None:
        """Tensors of rules with reductions: per tensor, each stage's reduction and finish
        launches, then the update launch, all reading one zeroed float64 accumulator."""
        import cupy

        offsets, total = [], 0
        for kernels, _, _ in tensors:
            offsets.append(total)
            total += kernels.accumulator
        accumulator = cupy.zeros(total, dtype=cupy.float64)  # one allocation and fill
        for (kernels, hoisted, arrays), offset in zip(tensors, offsets, strict=True):
            acc = accumulator[offset:offset + kernels.accumulator]
            n = arrays[0].size
            blocks = min((n + self.threads - 1) // self.threads, REDUCTION_MAX_BLOCKS,
                         self.max_blocks)
            for (reduce, finish), count in zip(kernels.stages, kernels.counts, strict=True):
                reduce((blocks,), (self.threads,), (np.int64(n), *arrays, *hoisted, acc))
                finish((1,), (32 * ((count + 31) // 32),), (acc,))
                self.launches += 2
            aligned = all(a.data.ptr % 16 == 0 for a in arrays)
            per_block = self.threads * (16 // arrays[0].dtype.itemsize if aligned else 1)
            blocks = min((n + per_block - 1) // per_block, self.max_blocks)
            function = kernels.vec if aligned else kernels.any
            function((blocks,), (self.threads,), (np.int64(n), *arrays, *hoisted, acc))
            self.launches += 1

    def _launch_factored(self, tensors: list[tuple[Any, list[Any], tuple[Any, ...]]]) -> None:
        """Tensors of factored specializations (arrays ending with the matrix's rows ``R``
        and columns ``C``): each pass of :mod:`._cuda_factored` in order, one grid-stride
        launch each, over one zeroed float64 accumulator and one workspace (not zeroed:
        each value is written before it is read) for all of them."""
        import cupy

        shapes, accumulators, works = [], 0, 0
        for kernels, _, arrays in tensors:
            R, C = int(arrays[-2]), int(arrays[-1])
            n = arrays[0].size
            M = n // C
            shapes.append((n, R, C, M, M // R))
            accumulators += kernels.accumulator
            works += kernels.workspace(M, M // R, C)
        accumulator = cupy.zeros(accumulators, dtype=cupy.float64)  # one allocation each
        workspace = cupy.empty(works, dtype=cupy.float64)
        acc_at = work_at = 0
        for (kernels, hoisted, arrays), (n, R, C, M, B) in zip(tensors, shapes, strict=True):
            acc = accumulator[acc_at:acc_at + kernels.accumulator]
            length = kernels.workspace(M, B, C)
            work = workspace[work_at:work_at + length]
            acc_at, work_at = acc_at + kernels.accumulator, work_at + length
            shape = (np.int64(n), np.int64(R), np.int64(C))
            arguments = (*shape, *arrays[:-2], *hoisted, acc, work)
            for kind, extent, function in kernels.functions:
                items = sum(k * v for k, v in zip(extent, (1, n, M, B * C, B), strict=True))
                blocks = max(1, min((items + self.threads - 1) // self.threads, self.max_blocks))
                function((blocks,), (self.threads,),
                         (*shape, acc, work) if kind == "finish" else arguments)
                self.launches += 1

    def _launch_many(self, kernels: _Kernels, hoisted: list[Any],
                     tensors: list[tuple[int, list[int]]], pack: int) -> None:
        """One launch of the multi-tensor kernel over ``tensors`` (sizes, addresses);
        ``pack`` elements a 16-byte pack, or 0 for element-wise access."""
        k, count = MULTI_TENSORS, len(tensors)
        sizes, first_blocks, total = [], [], 0
        for n, _ in tensors:
            # With packs, the threads past the last pack take the tail, one element each.
            units = n // pack + n % pack if pack else n
            sizes.append(n)
            first_blocks.append(total)
            total += (units + self.threads - 1) // self.threads
        first_blocks.append(total)
        table = np.zeros(kernels.batch.itemsize // 8, dtype=np.int64)
        table[:count] = sizes
        table[k:k + count + 1] = first_blocks
        for a, column in enumerate(zip(*(addresses for _, addresses in tensors))):
            table[2 * k + 1 + a * k:2 * k + 1 + a * k + count] = column
        function = kernels.multi_vec if pack else kernels.multi
        # A size-one NumPy array of the table's struct type is passed by value.
        function((total,), (self.threads,), (table.view(kernels.batch), np.int32(count), *hoisted))
        self.launches += 1


class _QuantizedKernels(NamedTuple):
    """A quantized specialization's kernel, its threads a block and its block size (no
    reduction stages: a reducing step with quantized states takes the generic path)."""

    function: Any
    threads: int
    block: int
    stages: tuple = ()


#: (device id, bits, signed) -> the map and its midpoints on that device.
_DEVICE_TABLES: dict[tuple, tuple] = {}


class _Kernels(NamedTuple):
    """One specialization's compiled kernels, and its multi-tensor table's NumPy type;
    for a rule with reductions (no multi-tensor kernels), each stage's reduction and
    finish kernels, the number of reductions each finishes, and the accumulator's
    length per tensor."""

    any: Any
    vec: Any
    multi: Any
    multi_vec: Any
    batch: np.dtype
    stages: tuple = ()
    counts: tuple[int, ...] = ()
    accumulator: int = 0
    #: ``name_table``, the step plans' one launch for all small tensors (None: a rule
    #: with reductions).
    table: Any = None


CUDA = CudaImplementation()
