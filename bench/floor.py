"""The floor: how fast an update could possibly be on this machine, measured in the same run.

An elementwise optimizer step is bound by memory traffic. It must read the
parameter, the gradient and every state buffer once and write the parameter and
the states once; :func:`bytes_moved` counts those bytes. On the CPU the floor's
bandwidth is that of a kernel with exactly an Adam step's traffic and next to no
arithmetic: one pass reading four float arrays and writing three of them in place
(seven streams, :func:`_numba_step_traffic`), compiled with the flags of our own
kernels (:data:`KERNEL_FLAGS`), over arrays whose pages are all touched before it is
timed, warmed up, at the size the CPU target is judged at (10**7 elements per array,
4 x 40 MB in float32: five times the last-level cache of the machine the targets were
set on). It runs on all threads (numba's static schedule gives each thread one
contiguous block of millions of elements) and on the calling thread alone; the faster
is the floor, so no honest kernel with a step's traffic is faster than it.
Read-modify-write loops (``a = a + s * b``, three streams) are measured and reported
too, but move less per element and reach less of the memory system's bandwidth than
a step does (Adam's own step exceeded one), so they are not the floor. The floor of a
step is its bytes over the floor's bandwidth; a step's "fraction of the floor" is floor
time over its measured time (1.0 is the memory limit; a workload that fits in cache can
exceed it). :mod:`bench.suite` measures the floor before and after the cells and keeps
the faster of the two, so a load that came and went during one of them does not lower
it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from . import timing

__all__ = ["STATE_BUFFERS", "STEP_TRAFFIC_KERNEL", "STEP_TRAFFIC_SERIAL", "KERNEL_FLAGS",
           "CPU_FLOOR_NUMEL", "STEP_TRAFFIC_STREAMS", "bytes_moved", "step_traffic_kernel",
           "measure_paired", "Bandwidth", "floor_bandwidth", "best_of", "measure_cpu",
           "measure_gpu"]

#: State buffers each benchmarked optimizer keeps per parameter element.
STATE_BUFFERS = {"adam": 2, "adamw": 2, "sgd-momentum": 1, "adagrad": 1, "rmsprop": 1, "lion": 1,
                 # Muon's elementwise passes; its Newton-Schulz products are compute-bound.
                 "muon": 1,
                 "schedulefree-sgd": 1, "schedulefree-adamw": 2,
                 # L-BFGS is no single pass: its "floor" is one pass's, a scale only.
                 "lbfgs": 0,
                 "asgd": 1, "rprop": 2, "adopt": 2, "ademamix": 3,
                 # Adafactor's factored states are a row and a column per matrix: the
                 # floor is p and g read, p written (its norms take more passes).
                 "adafactor": 0}


def bytes_moved(optimizer: str, numel: int, itemsize: int) -> int:
    """Bytes one step must move: read p, g and the states; write p and the states.

    Adam in float32: (4 reads + 3 writes) x 4 B = 28 B per element; the optimizers
    with one state buffer move 20 B.
    """
    states = STATE_BUFFERS[optimizer]
    return (2 + states + 1 + states) * itemsize * numel


@dataclass
class Bandwidth:
    """A measured bandwidth: ``streams`` arrays of ``numel`` elements read or written once
    per pass (3 for a read-modify-write, 7 for Adam's traffic)."""

    kernel: str
    numel: int
    itemsize: int
    median_s: float
    repeats: int
    method: str
    streams: int = 3

    @property
    def bytes(self) -> int:
        return self.streams * self.itemsize * self.numel

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.median_s

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "numel": self.numel, "itemsize": self.itemsize,
                "streams": self.streams, "bytes": self.bytes, "median_s": self.median_s,
                "repeats": self.repeats,
                "GBps": self.bytes_per_s / 1e9, "timing": self.method}


def _numba_rmw():
    import numba

    @numba.njit(parallel=True, cache=False)
    def rmw(a, b, s):  # pragma: no cover - compiled
        for i in numba.prange(a.size):
            a[i] = a[i] + s * b[i]

    return rmw


#: The names of the CPU floor kernels (:func:`_numba_step_traffic`): all threads, one.
STEP_TRAFFIC_KERNEL = "numba step traffic (4 reads, 3 writes)"
STEP_TRAFFIC_SERIAL = "numba step traffic (4 reads, 3 writes), one thread"
#: The numba flags of the generated kernels (optim_core.backends._numba), but parallel.
KERNEL_FLAGS = {"cache": False, "fastmath": False, "error_model": "numpy", "nogil": True,
                "boundscheck": False}
#: Elements per array of the CPU floor: the size the CPU targets are judged at (1e7).
CPU_FLOOR_NUMEL = 10_000_000


#: Arrays a step-traffic pass streams: four read (p, g, m, v), three written (p, m, v).
STEP_TRAFFIC_STREAMS = 7


@functools.cache
def _numba_step_traffic():
    """The floor kernels: threaded and serial, the same loop (made and compiled once per
    process: the floor is measured twice a run, and once more per paired cell)."""
    import numba

    def step_traffic(p, g, m, v, s):  # pragma: no cover - compiled
        # One pass, element by element as our kernels go: four loads, three stores in
        # place, an add or two per stream (vectorized, far below the memory's pace).
        for i in numba.prange(p.shape[0]):
            gi = g[i]
            mi = m[i] + gi
            vi = v[i] + s * gi
            m[i] = mi
            v[i] = vi
            p[i] = p[i] + s * (mi - vi)

    return (numba.njit(parallel=True, **KERNEL_FLAGS)(step_traffic),
            numba.njit(parallel=False, **KERNEL_FLAGS)(step_traffic))


def step_traffic_kernel(numel: int = CPU_FLOOR_NUMEL, dtype: str = "float32"
                        ) -> tuple[Callable[[], object], int]:
    """The threaded floor kernel on arrays of its own, ready to call, and the bytes one
    call moves: for :func:`measure_paired`."""
    threaded, _ = _numba_step_traffic()
    p, g, m, v = _step_traffic_arrays(numel, dtype)
    scale = p.dtype.type(1e-6)
    return (lambda: threaded(p, g, m, v, scale)), STEP_TRAFFIC_STREAMS * p.itemsize * numel


def _step_traffic_arrays(numel: int, dtype: str) -> tuple:
    """The four arrays of a step-traffic pass: p and g random, m and v filled (not
    np.zeros: calloc'd pages are mapped at their first write, which a step's states
    never wait for)."""
    import numpy as np

    rng = np.random.default_rng(0)
    p = rng.standard_normal(numel, dtype=np.float32).astype(dtype)
    g = rng.standard_normal(numel, dtype=np.float32).astype(dtype)
    return p, g, np.full_like(p, 0.5), np.full_like(p, 0.25)


def measure_paired(step: Callable[[], object], clock: timing.Clock, numel: int,
                   dtype: str = "float32", rounds: int = 41) -> dict:
    """The floor kernel and ``step`` timed in alternation, one call of each per round.

    Both then run under the same conditions (the same load, the same state of the
    memory system, both after another kernel's pass over 160 MB), which the floor
    measured before and after all the cells cannot promise: memory bandwidth on a
    shared VM drifts by 20% between minutes. Returns the floor kernel's median
    bandwidth over the rounds (bytes per second), both medians, and the rounds.
    """
    import statistics

    kernel, nbytes = step_traffic_kernel(numel, dtype)
    for _ in range(2):
        kernel()
        step()
    clock.synchronize()
    floor_times, step_times = [], []
    for _ in range(rounds):
        floor_times += clock.time_each(kernel, 1)
        step_times += clock.time_each(step, 1)
    floor_median = statistics.median(floor_times)
    return {"bytes_per_s": nbytes / floor_median, "floor_median_s": floor_median,
            "step_median_s": statistics.median(step_times), "rounds": rounds}


def measure_cpu(numel: int = CPU_FLOOR_NUMEL, dtype: str = "float32", budget_s: float = 1.0
                ) -> list[Bandwidth]:
    """CPU bandwidths with every kernel available; the floor is the best step-traffic one.

    The step-traffic kernel on all threads and on one (numba; see the module docstring);
    then read-modify-write loops for reference: NumPy ``np.add(a, b, out=a)`` (one
    thread), a numba ``prange`` loop and torch's ``add_`` (both on all threads) where
    those are installed.
    """
    import numpy as np

    a, b, m, v = _step_traffic_arrays(numel, dtype)
    kernels = {}
    if importlib.util.find_spec("numba") is not None:
        threaded, serial = _numba_step_traffic()
        scale = a.dtype.type(1e-6)
        kernels[STEP_TRAFFIC_KERNEL] = (STEP_TRAFFIC_STREAMS,
                                        lambda: threaded(a, b, m, v, scale))
        kernels[STEP_TRAFFIC_SERIAL] = (STEP_TRAFFIC_STREAMS,
                                        lambda: serial(a, b, m, v, scale))
        rmw = _numba_rmw()
        kernels["numba prange a=a+s*b"] = (3, lambda: rmw(a, b, scale))
    kernels["numpy add(out=)"] = (3, lambda: np.add(a, b, out=a))
    if importlib.util.find_spec("torch") is not None:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        kernels["torch add_(alpha)"] = (3, lambda: ta.add_(tb, alpha=1e-6))
    clock = timing.WallClock()
    found = []
    for name, (streams, kernel) in kernels.items():
        m_ = timing.measure(kernel, clock, warmup=2, budget_s=budget_s, min_repeats=5)
        found.append(Bandwidth(name, numel, a.itemsize, m_.median, m_.repeats, m_.method,
                               streams))
    return found


def best_of(*runs: list[Bandwidth]) -> list[Bandwidth]:
    """Per kernel, the faster of several measurements of it (the floor measured before
    and after the cells: a load during one of them does not lower it)."""
    best: dict[str, Bandwidth] = {}
    for found in runs:
        for b in found:
            if b.kernel not in best or b.bytes_per_s > best[b.kernel].bytes_per_s:
                best[b.kernel] = b
    return list(best.values())


def floor_bandwidth(found: list[Bandwidth]) -> Bandwidth:
    """The bandwidth a step's floor is taken from: the faster step-traffic kernel where
    they were measured (CPU), else the fastest kernel (GPU: each already moves a step's
    kind of traffic through the whole device)."""
    traffic = [b for b in found if b.kernel in (STEP_TRAFFIC_KERNEL, STEP_TRAFFIC_SERIAL)]
    return max(traffic or found, key=lambda b: b.bytes_per_s)


def measure_gpu(numel: int = 1 << 28, dtype: str = "float32", budget_s: float = 0.5
                ) -> list[Bandwidth]:  # pragma: no cover - GPU only
    """Read-modify-write bandwidth on the current CUDA device (CuPy, and torch if present).

    The default size, 2 x 1 GiB in float32, is far beyond any GPU's L2 cache.
    """
    import cupy

    found = [_measure_cupy(numel, dtype, budget_s)]
    cupy.get_default_memory_pool().free_all_blocks()
    if importlib.util.find_spec("torch") is not None:
        import torch

        try:
            found.append(_measure_torch(numel, dtype, budget_s))
        except (RuntimeError, AssertionError) as error:  # CPU-only torch: CuPy alone sets it
            print(f"torch read-modify-write kernel not measured: {error}")
        torch.cuda.empty_cache()
    return found


def _measure_cupy(numel: int, dtype: str, budget_s: float) -> Bandwidth:  # pragma: no cover
    import cupy

    a = cupy.random.standard_normal(numel, dtype=cupy.float32).astype(dtype)
    b = cupy.random.standard_normal(numel, dtype=cupy.float32).astype(dtype)
    kernel = cupy.ElementwiseKernel("T b, T s", "T a", "a = a + s * b", "bench_rmw")
    scale = a.dtype.type(1e-6)
    m = timing.measure(lambda: kernel(b, scale, a), timing.CupyEventClock(), warmup=3,
                       budget_s=budget_s, min_repeats=10)
    return Bandwidth("cupy ElementwiseKernel a=a+s*b", numel, a.itemsize, m.median, m.repeats,
                     m.method)


def _measure_torch(numel: int, dtype: str, budget_s: float) -> Bandwidth:  # pragma: no cover
    import torch

    a = torch.randn(numel, device="cuda", dtype=getattr(torch, dtype))
    b = torch.randn(numel, device="cuda", dtype=getattr(torch, dtype))
    m = timing.measure(lambda: a.add_(b, alpha=1e-6), timing.TorchEventClock(), warmup=3,
                       budget_s=budget_s, min_repeats=10)
    return Bandwidth("torch add_(alpha)", numel, a.element_size(), m.median, m.repeats,
                     m.method)
