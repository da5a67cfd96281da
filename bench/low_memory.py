"""Quantized optimizer states: bytes of state per parameter, and the fused step's speed.

The targets of issue 14: Adam on tensors of 1M elements or more holds at most 2.1 bytes
of state per parameter at ``state_bits=8`` and 1.1 at 4 (float32 states: 8), and an
8-bit fused step is at least 0.9x as fast as the float32 fused step (it moves fewer
bytes: 2 of state a parameter read and written instead of 8).

For each size, Adam (float32 parameters, ``impl="fused"``) at 32, 8 and 4 bits: the
bytes of state per parameter (:meth:`optim_core.Optimizer.state_nbytes`), and the
median time of a step, the three interleaved round by round so that load from other jobs
falls on all of them alike; the speed column is the float32 step's median time over this
one's (above 1: faster). With ``--gpu`` the parameters are CuPy arrays.

Run from the repository root: ``python -m bench.low_memory`` (``--quick`` for a smoke
run); prints a Markdown table and writes ``--json`` (default
``bench/results/local/low_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BITS = (32, 8, 4)
SIZES = (1 << 20, 10_000_000)
QUICK_SIZES = (1 << 14,)
#: The issue's bounds: bytes of state per parameter, and the least speed vs float32.
TARGET_BYTES = {8: 2.1, 4: 1.1}
TARGET_SPEED_8BIT = 0.9


def _runner(xp: Any, size: int, bits: int, sync: Any) -> tuple[Any, Any]:
    import optim_core

    rng = np.random.default_rng(0)
    param = xp.asarray(rng.standard_normal(size).astype(np.float32))
    grad = xp.asarray(rng.standard_normal(size).astype(np.float32))
    opt = optim_core.Adam([param], lr=1e-3, state_bits=bits, impl="fused")

    def step() -> None:
        opt.step([grad])
        sync()

    return opt, step


def measure(sizes: Sequence[int], repeats: int, gpu: bool = False) -> list[dict[str, Any]]:
    """One row per (size, bits): bytes per parameter, median step time, speed vs float32."""
    if gpu:
        import cupy as xp

        def sync() -> None:
            xp.cuda.Device().synchronize()
    else:
        xp = np

        def sync() -> None:
            return None

    rows = []
    for size in sizes:
        runners = {bits: _runner(xp, size, bits, sync) for bits in BITS}
        for _, step in runners.values():
            for _ in range(3):  # compile, allocate the states, warm the caches
                step()
        times: dict[int, list[float]] = {bits: [] for bits in BITS}
        for _ in range(repeats):
            for bits, (_, step) in runners.items():
                start = time.perf_counter()
                step()
                times[bits].append(time.perf_counter() - start)
        base = statistics.median(times[32])
        for bits, (opt, _) in runners.items():
            median = statistics.median(times[bits])
            rows.append({"size": size, "state_bits": bits,
                         "state_bytes_per_param": opt.state_nbytes() / size,
                         "median_step_s": median, "speed_vs_float32": base / median,
                         "implementation": opt.implementation.name})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`measure`'s rows."""
    lines = ["| size | state bits | state bytes/param | median step (ms) | speed vs float32 |",
             "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['size']:,} | {row['state_bits']} | "
                     f"{row['state_bytes_per_param']:.3f} | {1e3 * row['median_step_s']:.3f} | "
                     f"{row['speed_vs_float32']:.2f}x |")
    return "\n".join(lines)


def check(rows: list[dict[str, Any]]) -> list[str]:
    """The targets each row of 1M elements or more misses (bytes, and the 8-bit speed)."""
    missed = []
    for row in rows:
        if row["size"] < 1_000_000 or row["state_bits"] == 32:
            continue
        bound = TARGET_BYTES[row["state_bits"]]
        if row["state_bytes_per_param"] > bound:
            missed.append(f"{row['size']:,} at {row['state_bits']} bits: "
                          f"{row['state_bytes_per_param']:.3f} bytes/param > {bound}")
        if row["state_bits"] == 8 and row["speed_vs_float32"] < TARGET_SPEED_8BIT:
            missed.append(f"{row['size']:,} at 8 bits: {row['speed_vs_float32']:.2f}x the "
                          f"float32 step < {TARGET_SPEED_8BIT}x")
    return missed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.low_memory",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny size, few repeats")
    parser.add_argument("--gpu", action="store_true", help="CuPy arrays on the current GPU")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "local" /
                        "low_memory.json")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    rows = measure(sizes, 3 if args.quick else args.repeats, gpu=args.gpu)
    print(table(rows))
    missed = check(rows)
    print("\ntargets: " + ("all met" if not missed else "missed: " + "; ".join(missed)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "missed": missed, "gpu": args.gpu},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
