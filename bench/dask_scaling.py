"""Training on Dask: epoch time with 1 and 2 worker processes, and against data size.

Each run starts a ``LocalCluster`` of ``n`` worker processes (one thread each,
``--memory-limit`` each) and trains ``LinearRegression`` by full-batch gradient
descent on a lazily generated data set (:func:`optim_core.dask_support.synthetic`,
float64, ``--features`` columns, chunks of ``--chunk-mb``) for ``--epochs``
epochs, reporting the median epoch time after the first. An epoch is one step
here: one distributed reduction over every chunk, and the data is either

* ``lazy`` (the default): generated chunk by chunk at every step, never held
  whole, so a data set larger than the workers' memory trains (out-of-core); or
* ``persisted`` (``--persist``): generated once into the workers' memory, so an
  epoch only reads it (sizes that do not fit are skipped).

For every size up to ``--numpy-max-mb`` the same data is also trained in this
process with NumPy (one epoch = one NumPy gradient step) and the parameters are
compared: the maximum relative difference is reported (float64). The peak
resident memory of every worker process (``VmHWM``, the largest since the
worker started, so the largest of the sizes run so far on that cluster) is
recorded, with the limit, so out-of-core runs show that they stayed under it.

Run from the repository root: ``python -m bench.dask_scaling`` (defaults: sizes
50,100,200,400 MB, workers 1,2) or for instance
``python -m bench.dask_scaling --sizes 4000 --workers 2 --memory-limit 200MiB --epochs 2``
for an out-of-core run. Prints a Markdown table; writes ``--json`` (default
``bench/results/local/dask_scaling.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _peak_rss() -> int:
    """The largest resident set size of this process, in bytes (Linux: VmHWM).

    Not ``ru_maxrss``: across fork and exec it keeps the parent's peak, so a worker
    spawned by a large process would report the parent's memory.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


def run_one(client, n_workers: int, size_mb: float, args: argparse.Namespace) -> dict:
    import dask

    from optim_core import dask_support, fit, models

    row_bytes = 8 * args.features
    n_samples = int(size_mb * 1e6 // row_bytes)
    chunk_rows = max(1, int(args.chunk_mb * 1e6 // row_bytes))
    X, y, _ = dask_support.synthetic(n_samples, args.features, chunk_rows=chunk_rows,
                                     seed=args.seed)
    lazy = (X, y)  # the NumPy reference is computed from these, in this process
    entry = {"workers": n_workers, "size_mb": X.nbytes / 1e6, "n_samples": n_samples,
             "chunks": X.numblocks[0], "mode": "persisted" if args.persist else "lazy"}
    if args.persist:
        if X.nbytes > 0.6 * n_workers * args.memory_limit_bytes:
            entry["skipped"] = "does not fit in the workers' memory"
            return entry
        started = time.perf_counter()
        X, y = dask.persist(X, y)
        dask.compute(X.sum())
        entry["persist_s"] = time.perf_counter() - started
    model = models.LinearRegression(args.features)
    history = fit(model, X, y, optimizer="gd", lr=args.lr, epochs=args.epochs, seed=0,
                  progress=False)
    times = history.time[1:] or history.time
    entry.update(epoch_s=statistics.median(times), epoch_times_s=history.time,
                 final_train_loss=history.train_loss[-1],
                 peak_worker_rss_mb=max(client.run(_peak_rss).values()) / 2**20)
    if X.nbytes <= args.numpy_max_mb * 1e6:
        # Computed in this process (threads), so the workers' peak memory stays theirs.
        X_np, y_np = dask.compute(*lazy, scheduler="threads")
        reference = models.LinearRegression(args.features)
        started = time.perf_counter()
        numpy_history = fit(reference, X_np, y_np, optimizer="gd", lr=args.lr,
                            epochs=args.epochs, seed=0, progress=False)
        entry["numpy_epoch_s"] = statistics.median(numpy_history.time[1:] or
                                                   numpy_history.time)
        entry["numpy_total_s"] = time.perf_counter() - started
        entry["max_rel_diff_vs_numpy"] = max(
            float(np.max(np.abs(model.params[k] - reference.params[k])
                         / np.maximum(np.abs(reference.params[k]), 1e-300)))
            for k in model.params)
        del X_np, y_np
    return entry


def table(rows: Sequence[dict]) -> str:
    lines = ["| workers | data (MB) | chunks | mode | epoch (s) | NumPy epoch (s) | "
             "max rel. diff vs NumPy | peak worker RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['workers']} | {r['size_mb']:.0f} | {r['chunks']} | {r['mode']} "
                         f"| skipped: {r['skipped']} | | | |")
            continue
        numpy_s = f"{r['numpy_epoch_s']:.3f}" if "numpy_epoch_s" in r else "-"
        diff = f"{r['max_rel_diff_vs_numpy']:.1e}" if "max_rel_diff_vs_numpy" in r else "-"
        lines.append(f"| {r['workers']} | {r['size_mb']:.0f} | {r['chunks']} | {r['mode']} | "
                     f"{r['epoch_s']:.3f} | {numpy_s} | {diff} | "
                     f"{r['peak_worker_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dask_scaling",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,100,200,400",
                        help="data sizes in MB (float64 features), comma-separated")
    parser.add_argument("--workers", default="1,2", help="worker process counts")
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--chunk-mb", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="1GiB", help="per worker process")
    parser.add_argument("--persist", action="store_true",
                        help="persist the data in the workers' memory first")
    parser.add_argument("--numpy-max-mb", type=float, default=400.0,
                        help="also train with NumPy (and compare) up to this size")
    parser.add_argument("--json", type=Path,
                        default=Path("bench/results/local/dask_scaling.json"))
    args = parser.parse_args(argv)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print("needs Dask: pip install 'optim-core[dask]'", file=sys.stderr)
        return 2
    args.memory_limit_bytes = _parse_bytes(args.memory_limit)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    rows = []
    for n_workers in worker_counts:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          memory_limit=args.memory_limit, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            for size in sizes:
                entry = run_one(client, n_workers, size, args)
                entry["workers_alive"] = len(client.scheduler_info()["workers"])
                rows.append(entry)
                print(json.dumps(entry), flush=True)
    text = table(rows)
    print(text)
    report = {
        "benchmark": "dask_scaling",
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "rows": rows,
        "table": text,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
