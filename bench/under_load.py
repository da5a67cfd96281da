"""``python -m bench.under_load``: a large-tensor step beside busy processes (issue 17, item 3).

On a machine shared with other jobs, a multi-threaded kernel waits at its end for every
worker, and a worker whose core is taken waits for a time slice. The fused path therefore
times the threaded and the serial loop as they run and takes the faster
(``backends._numba._ThreadChoice``). This bench checks the target: with one busy process
per core running beside it, the default step within 1.2x of the serial one.

Two optimizers step their own copy of one float32 tensor of ``2**20 + 1`` elements (just
past the size from which the threaded loop may run), Adam, default hyperparameters:

* ``default``: the plain call, which chooses its loop;
* ``serial``: the same with numba on one thread (``numba.set_num_threads(1)`` around its
  step), which stands for the serial loop.

They alternate, ``--per-round`` steps each, in two phases: ``quiet`` (nothing else started)
and ``busy`` (one process per core spinning in pure Python). Reported per phase: the
median step of each, their ratio, and the ratio of the mean step over the first 300 steps
and over all of them (the mean charges the default path with its tries of the slower loop).
Results go to ``bench/results/under-load-<date>.{json,md}`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 2**20 + 1
TARGET = 1.2


def _spin() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


def _stepper(seed: int) -> Callable[[], object]:
    import optim_core

    rng = np.random.default_rng(seed)
    param = rng.standard_normal(SIZE).astype(np.float32)
    grad = (1e-2 * rng.standard_normal(SIZE)).astype(np.float32)
    opt = optim_core.Adam([param])
    opt.step([grad])  # states allocated, kernels compiled
    return lambda: opt.step([grad])


def _on_one_thread(step: Callable[[], object]) -> Callable[[], object]:
    import numba

    def run() -> object:
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return step()
        finally:
            numba.set_num_threads(threads)

    return run


def measure(steps: dict[str, Callable[[], object]], rounds: int, per_round: int
            ) -> dict[str, list[float]]:
    """Seconds of every step of each, in alternating rounds of ``per_round`` steps."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times


def summarize(phase: str, times: dict[str, list[float]]) -> dict:
    default, serial = times["default"], times["serial"]
    first = min(300, len(default), len(serial))
    return {"phase": phase, "steps": len(default),
            "default_median_s": statistics.median(default),
            "serial_median_s": statistics.median(serial),
            "median_ratio": statistics.median(default) / statistics.median(serial),
            "mean_ratio_first_300": (statistics.fmean(default[:first])
                                     / statistics.fmean(serial[:first])),
            "mean_ratio": statistics.fmean(default) / statistics.fmean(serial),
            "default_times_s": default, "serial_times_s": serial}


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| phase | steps | default ms (median) | serial ms (median) | median ratio | "
             "mean ratio, first 300 | mean ratio | target (busy: median <= 1.2) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        judged = ("holds" if r["median_ratio"] <= TARGET else "misses") \
            if r["phase"] == "busy" else "-"
        lines.append(f"| {r['phase']} | {r['steps']} | {r['default_median_s'] * 1e3:.3f} | "
                     f"{r['serial_median_s'] * 1e3:.3f} | {r['median_ratio']:.2f} | "
                     f"{r['mean_ratio_first_300']:.2f} | {r['mean_ratio']:.2f} | {judged} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.under_load",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1,
                        help="busy processes in the busy phase (default: one per core)")
    parser.add_argument("--out", type=Path, help="JSON output path")
    args = parser.parse_args(argv)
    # A fresh optimizer per phase: each starts its choice of loop from scratch.
    rows = []
    load_before = os.getloadavg()
    steps = {"default": _stepper(0), "serial": _on_one_thread(_stepper(0))}
    rows.append(summarize("quiet", measure(steps, args.rounds, args.per_round)))
    context = multiprocessing.get_context("spawn")
    busy = [context.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    try:
        time.sleep(1.0)  # the spinners running before the first step
        steps = {"default": _stepper(1), "serial": _on_one_thread(_stepper(1))}
        rows.append(summarize("busy", measure(steps, args.rounds, args.per_round)))
    finally:
        for process in busy:
            process.terminate()
        for process in busy:
            process.join()
    stamp = datetime.now(timezone.utc)
    header = (f"Adam float32, {SIZE} elements, {os.cpu_count()} cores, {args.busy} busy "
              f"processes in the busy phase, {stamp:%Y-%m-%dT%H:%M:%SZ}, load average "
              f"{[round(x, 2) for x in load_before]} -> "
              f"{[round(x, 2) for x in os.getloadavg()]}")
    table = format_table(rows, header)
    out = args.out or RESULTS / f"under-load-{stamp:%Y-%m-%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {"header": header}, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
