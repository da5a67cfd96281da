"""Launch-configuration sweep of the generated CUDA kernels, against torch's fused Adam.

    python -m bench.cuda_tuning [--out FILE.json] [--sizes 1e7,1e8]

GPU only (CuPy; torch where installed). For Adam and AdamW on one float32 tensor it
times, in the same process and interleaved over several rounds:

* our kernel launched directly: 16-byte (``_vec``) or scalar loads, 128 to 1024
  threads a block, and three grid sizes (one resident wave, four waves of resident
  blocks with a grid-stride loop, and one thread per element or pack);
* our optimizer's ``step`` as users call it (per tensor, and ``flat=True`` with
  ``grad_views``), which launches with the defaults of ``optim_core.backends._cuda``;
* ``torch.optim`` with ``fused=True``;
* Adam over 1000 tensors of 1000 elements, per tensor (small tensors sharing
  launches), flat, and torch fused: the host's cost per tensor;
* two bandwidth references: ``torch add_`` (the read-modify-write floor of the
  benchmark) and a copy kernel with Adam's traffic (read 4 arrays, write 3, 16-byte
  accesses), the most any Adam kernel could reach on this card.

Each time is the median of back-to-back launches, each between CUDA events
(:mod:`bench.timing`), after warm-up; a configuration's figure is the median over
rounds. bench/gpu_check.sh runs it and stores the table with the other GPU results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from . import timing

THREADS = (128, 256, 512, 1024)
GRIDS = ("wave", "wave4", "full")
LAUNCHES = 20
ROUNDS = 3

# Adam's traffic with trivial arithmetic: read p, g, m, v; write p, m, v.
_ADAM_TRAFFIC = r"""
extern "C" __global__ void adam_traffic(long long n_packs, float4* p, const float4* g,
                                        float4* m, float4* v) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n_packs;
         j += stride) {
        float4 a = p[j], b = g[j], c = m[j], d = v[j];
        a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
        c.x += d.x; c.y += d.y; c.z += d.z; c.w += d.w;
        d.x += b.x; d.y += b.y; d.z += b.z; d.w += b.w;
        p[j] = a; m[j] = c; v[j] = d;
    }
}
"""


def _time(clock: timing.Clock, fn, launches: int = LAUNCHES) -> float:
    """Median of ``launches`` back-to-back calls of ``fn``, each between CUDA events."""
    return timing.measure(fn, clock, warmup=3, min_repeats=launches,
                          max_repeats=launches).median


def _grid(grid: str, threads: int, per_thread: int, n: int, sms: int) -> int:
    resident = sms * 2048 // threads
    units = -(-n // per_thread)  # elements, or 16-byte packs, to cover
    needed = -(-units // threads)
    return {"wave": min(resident, needed), "wave4": min(4 * resident, needed),
            "full": needed}[grid]


def _rule_scalars(opt) -> dict:
    return opt.step_scalars(opt.param_groups[0], opt.group_state[0])[0]


def _references(cupy, torch, traffic, host_p, host_g, record) -> None:
    n = host_p.size
    a, b = cupy.asarray(host_p), cupy.asarray(host_g)
    c, d = a.copy(), b.copy()
    packs = n // 4
    for _ in range(ROUNDS):
        for threads in (256, 512):
            launch = partial(traffic, (-(-packs // threads),), (threads,),
                             (np.int64(packs), a, b, c, d))
            record(("reference", n, "adam traffic (4 reads, 3 writes)", "float4", threads,
                    "full"), _time(timing.CupyEventClock(), launch))
        if torch is not None:
            ta, tb = torch.from_dlpack(a), torch.from_dlpack(b)
            record(("reference", n, "torch add_ (2 reads, 1 write)", "", 0, ""),
                   _time(timing.TorchEventClock(), partial(ta.add_, tb, alpha=1e-6)))


def _many_small_tensors(cupy, torch, record, count: int = 1000, size: int = 1000) -> None:
    """Adam over ``count`` tensors of ``size`` elements: the host's cost per tensor."""
    from optim_core import Adam

    rng = np.random.default_rng(1)
    host = [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
    grads = [cupy.asarray(1e-2 * h) for h in host]
    shared = Adam([cupy.asarray(h) for h in host], impl="fused")
    flat = Adam([cupy.asarray(h) for h in host], impl="fused", flat=True)
    for view, grad in zip(flat.grad_views, grads, strict=True):
        view[...] = grad
    views = flat.grad_views
    if torch is not None:
        tparams = [torch.from_dlpack(cupy.asarray(h)).requires_grad_() for h in host]
        for param, grad in zip(tparams, grads, strict=True):
            param.grad = torch.from_dlpack(grad)
        topt = torch.optim.Adam(tparams, fused=True)
    what = f"optimizer.step, {count} tensors of {size}"
    for _ in range(ROUNDS):
        record(("adam", count * size, what, "shared launches", 0, ""),
               _time(timing.CupyEventClock(), partial(shared.step, grads), launches=5))
        record(("adam", count * size, what, "flat+grad_views", 0, ""),
               _time(timing.CupyEventClock(), partial(flat.step, views), launches=5))
        if torch is not None:
            record(("adam", count * size, what, "torch fused", 0, ""),
                   _time(timing.TorchEventClock(), topt.step, launches=5))


def sweep(sizes: list[int]) -> dict:
    import cupy
    from optim_core.backends._cuda import CUDA

    from optim_core import Adam, AdamW

    try:
        import torch
        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    device = cupy.cuda.Device()
    sms = device.attributes["MultiProcessorCount"]
    card = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    rows: dict[tuple, list[float]] = {}
    rng = np.random.default_rng(0)
    traffic = cupy.RawModule(code=_ADAM_TRAFFIC).get_function("adam_traffic")

    def record(key, seconds):
        rows.setdefault(key, []).append(seconds)

    for n in sizes:
        host_p = rng.standard_normal(n, dtype=np.float32)
        host_g = (1e-2 * rng.standard_normal(n, dtype=np.float32))
        for name, cls in (("adam", Adam), ("adamw", AdamW)):
            p = cupy.asarray(host_p)
            g = cupy.asarray(host_g)
            opt = cls([p], impl="fused")
            opt.step([g])  # allocates the states
            state = opt.state[0][0]
            arrays = [p, g, *(state[s] for s in opt.rule.states if s in state)]
            present = frozenset(s for s in opt.rule.states if s in state)
            kernels, hoisted = CUDA.kernel_for(opt.rule, _rule_scalars(opt), present,
                                               np.dtype("float32"))
            scalar_fn, vec_fn = kernels.any, kernels.vec
            hoisted = [np.float32(h) for h in hoisted]
            flat_p = cupy.asarray(host_p)
            flat = cls([flat_p], impl="fused", flat=True)
            flat.grad_views[0][...] = g
            views = flat.grad_views
            if has_torch:
                tp = torch.from_dlpack(cupy.asarray(host_p)).requires_grad_()
                tp.grad = torch.from_dlpack(cupy.asarray(host_g))
                topt = getattr(torch.optim, cls.__name__)([tp], fused=True)
                topt.step()
            cupy.cuda.Device().synchronize()
            for _ in range(ROUNDS):
                for vec in (True, False):
                    function, per_thread = (vec_fn, 4) if vec else (scalar_fn, 1)
                    for threads in THREADS:
                        for grid in GRIDS:
                            blocks = _grid(grid, threads, per_thread, n, sms)
                            launch = partial(function, (blocks,), (threads,),
                                             (np.int64(n), *arrays, *hoisted))
                            seconds = _time(timing.CupyEventClock(), launch)
                            record((name, n, "kernel", "vec" if vec else "scalar", threads, grid),
                                   seconds)
                record((name, n, "optimizer.step", "per-tensor", 0, ""),
                       _time(timing.CupyEventClock(), partial(opt.step, [g])))
                record((name, n, "optimizer.step", "flat+grad_views", 0, ""),
                       _time(timing.CupyEventClock(), partial(flat.step, views)))
                if has_torch:
                    record((name, n, "torch fused", "", 0, ""),
                           _time(timing.TorchEventClock(), topt.step))
            del opt, flat, p, g, arrays, flat_p, views
            if has_torch:
                del topt, tp
                torch.cuda.empty_cache()
            cupy.get_default_memory_pool().free_all_blocks()
        # Bandwidth references on the same size.
        _references(cupy, torch if has_torch else None, traffic, host_p, host_g, record)
    _many_small_tensors(cupy, torch if has_torch else None, record)

    results = []
    for (what, n, kind, variant, threads, grid), times in rows.items():
        seconds = statistics.median(times)
        if what == "reference":
            moved = (28 if kind.startswith("adam") else 12) * n
        else:
            moved = 28 * n
        results.append({"optimizer": what, "numel": n, "kind": kind, "variant": variant,
                        "threads": threads, "grid": grid, "median_s": seconds,
                        "rounds": [float(t) for t in times], "GBps": moved / seconds / 1e9})
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"card": card, "sms": sms, "date_utc": date,
            "launches_per_time": LAUNCHES, "rounds": ROUNDS, "results": results}


def table(report: dict) -> str:
    lines = [f"CUDA launch sweep, {report['card']} ({report['sms']} SMs), {report['date_utc']}",
             "", "| optimizer | numel | what | variant | threads | grid | ms | GB/s |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for r in sorted(report["results"], key=lambda r: (r["numel"], r["optimizer"], r["median_s"])):
        lines.append(f"| {r['optimizer']} | {r['numel']:.0e} | {r['kind']} | {r['variant']} | "
                     f"{r['threads'] or ''} | {r['grid']} | {r['median_s'] * 1e3:.4f} | "
                     f"{r['GBps']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        help="JSON file to write (the table goes beside it, .md)")
    parser.add_argument("--sizes", default="1e7,1e8", help="comma-separated tensor sizes")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    report = sweep(sizes)
    text = table(report)
    print(text)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
