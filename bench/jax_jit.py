"""JAX under ``jax.jit``: :func:`optim_core.functional` against optax, the same algorithm.

The target (issue 15): a jitted step of our functional optimizer within 1.2x of the
same algorithm's optax step. Both run as a user would run them, side by side:

* ``ours``: ``jax.jit(optim_core.functional(cls, **hyper).update)``, the parameters
  and state donated;
* ``optax``: ``optax.<name>(...).update`` followed by ``optax.apply_updates``, under
  one ``jax.jit`` with the parameters and state donated (:mod:`bench.impls`'
  ``optax-jit`` runner).

The hyperparameters are :data:`bench.impls.HYPERPARAMETERS` (torch.optim's defaults;
SGD with momentum 0.9); optax's are mapped to the same algorithm (Adagrad and
RMSprop differ from ours in where ``eps`` sits, as optax's own formulas do). Float32,
on the CPU (``--gpu`` for JAX's GPU). Workloads: one 10M-element tensor and
ResNet-50's 161 parameter shapes.

After a warm-up (compilation), ``--rounds`` rounds each time ``--steps`` steps of
each implementation in turn (interleaved, so load from other jobs falls on both
alike); the table gives each one's median step time and the median over rounds of
the per-round ratio ours / optax.

Run from the repository root: ``python -m bench.jax_jit``; writes ``--json``
(default ``bench/results/local/jax_jit.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import impls, workloads

OPTIMIZERS = ("adam", "adamw", "sgd-momentum", "adagrad", "rmsprop", "lion")
WORKLOADS = ("1e7", "resnet50")
TARGET = 1.2


def _ours(optimizer: str, data: impls.WorkloadData, device: str
          ) -> tuple[Callable[[], object], Callable[[], None]]:
    import jax

    import optim_core

    cls = getattr(optim_core, impls._CLASS_NAMES[optimizer])
    pure = optim_core.functional(cls, **impls.HYPERPARAMETERS[optimizer])
    params, grads = data.copies("jax")

    # Donated in the order of update's outputs (params, state): JAX pairs donated buffers
    # with outputs of the same shape in order, and a mismatched pairing costs copies.
    def update(params, state, grads):
        return pure.update(grads, state, params)

    jitted = jax.jit(update, donate_argnums=(0, 1))
    carry = {"params": params, "state": pure.init(params)}

    def step() -> object:
        carry["params"], carry["state"] = jitted(carry["params"], carry["state"], grads)

    return step, lambda: jax.block_until_ready(carry["params"])


def _optax(optimizer: str, data: impls.WorkloadData, device: str
           ) -> tuple[Callable[[], object], Callable[[], None]]:
    runner = impls.build("optax-jit", optimizer, data, device)
    return runner.step, runner.clock.synchronize


def _timed(step: Callable[[], object], sync: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def run(optimizers: Sequence[str], names: Sequence[str], device: str, rounds: int,
        steps: int, progress: Callable[[str], None] = print) -> list[dict]:
    """One row per optimizer and workload: medians in seconds and the ratio."""
    rows = []
    for optimizer in optimizers:
        for name in names:
            workload = _workload(name)
            data = impls.WorkloadData(workload, "float32", device)
            built = {"ours": _ours(optimizer, data, device),
                     "optax": _optax(optimizer, data, device)}
            runners = {key: step for key, (step, _) in built.items()}
            syncs = {key: sync for key, (_, sync) in built.items()}
            for key, fn in runners.items():  # compile and warm up
                for _ in range(3):
                    fn()
                syncs[key]()
            times: dict[str, list[float]] = {"ours": [], "optax": []}
            for _ in range(rounds):
                for key, fn in runners.items():
                    times[key].append(_timed(fn, syncs[key], steps))
            ratios = [a / b for a, b in zip(times["ours"], times["optax"], strict=True)]
            row = {"optimizer": optimizer, "workload": workload.name,
                   "n_tensors": workload.n_tensors, "numel": workload.numel,
                   "ours_s": statistics.median(times["ours"]),
                   "optax_s": statistics.median(times["optax"]),
                   "ratio": statistics.median(ratios), "times_s": times}
            rows.append(row)
            progress(_line(row))
            del built, runners, syncs, data
    return rows


def _workload(name: str) -> workloads.Workload:
    """A model workload by name, or one tensor of a size written as "1e7"."""
    if name[0].isdigit() and "x" not in name:
        return workloads.single(workloads.parse_size(name))
    (workload,) = workloads.resolve(name, [])
    return workload


def _line(row: dict) -> str:
    return (f"| {row['optimizer']:<12} | {row['workload']:<9} | {row['n_tensors']:>4} | "
            f"{row['ours_s'] * 1e3:9.3f} | {row['optax_s'] * 1e3:9.3f} | "
            f"{row['ratio']:5.2f}x | {'yes' if row['ratio'] <= TARGET else 'NO'} |")


HEADER = ("| optimizer    | workload  | tensors | ours ms | optax ms | ours/optax | "
          f"<= {TARGET}x |\n|---|---|---:|---:|---:|---:|---|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jax_jit",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="1e7 (one tensor) and/or resnet50")
    parser.add_argument("--gpu", action="store_true", help="JAX's GPU instead of the CPU")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "local"
                        / "jax_jit.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import optax
    except ImportError as error:
        print(f"needs jax and optax: {error}", file=sys.stderr)
        return 2
    device = "cuda" if args.gpu else "cpu"
    print(f"jax {jax.__version__}, optax {optax.__version__}, {platform.processor() or ''} "
          f"{os.cpu_count()} cores, load {os.getloadavg()}, float32, {device}")
    print(HEADER)
    rows = run([o.strip() for o in args.optimizers.split(",")],
               [w.strip() for w in args.workloads.split(",")], device, args.rounds,
               args.steps)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device, "jax": jax.__version__,
                                     "optax": optax.__version__, "rows": rows,
                                     "load_average_end": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
