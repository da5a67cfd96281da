"""``python -m bench.torch_optim``: optim_core.torch against torch.optim on torch tensors.

Every optimizer of the registry that ``torch.optim`` also has, stepped on CPU float32
``torch`` tensors with ``p.grad`` set, as a training loop steps them:

* ``ours``: ``optim_core.torch.<Name>`` (the fused numba kernels on NumPy views of the
  tensors);
* ``torch``: ``torch.optim.<Name>`` with ``fused=True`` where torch has a fused CPU
  implementation (Adam, AdamW, SGD, Adagrad), else ``foreach=True``.

Targets (issue 15): no slower than torch's fused implementation (ratio ours/torch
<= 1), at least 3x faster than torch's foreach one (torch/ours >= 3), on one 10M
tensor and on ResNet-50's 161 parameter shapes. The two are timed in alternating
rounds, so a load that comes and goes weighs on both alike; the table gives each
one's median step time.

``--quick`` is a seconds-long smoke run on tiny sizes (no target is judged).
Results go to ``bench/results/torch-cpu-<date>.{json,md}`` unless ``--out`` says
otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from . import workloads

RESULTS = Path(__file__).resolve().parent / "results"
#: Hyperparameters beside torch's defaults (SGD runs with momentum, as in the main bench).
OPTIONS = {"SGD": {"lr": 1e-3, "momentum": 0.9}}


def _pairs() -> list[tuple[str, str]]:
    """(class name, torch's mode: "fused" or "foreach") of every registered optimizer
    torch.optim also has with one of those modes; a new optimizer of the registry joins by
    itself. torch.optim.Muon has neither (and takes matrices only): ``python -m bench``
    measures it on gpt2-small-matrices."""
    import torch

    import optim_core.torch as oct

    pairs = []
    for name in oct.__all__:
        theirs = getattr(torch.optim, name, None)
        if name == "TorchOptimizer" or not isinstance(theirs, type):
            continue
        parameters = inspect.signature(theirs).parameters
        if "fused" in parameters or "foreach" in parameters:
            pairs.append((name, "fused" if "fused" in parameters else "foreach"))
    return pairs


def _tensors(shapes: Sequence[tuple[int, ...]], seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator, dtype=torch.float32).requires_grad_()
        p.grad = 1e-2 * torch.randn(shape, generator=generator, dtype=torch.float32)
        params.append(p)
    return params


def _runner(name: str, side: str, mode: str, shapes) -> Callable[[], object]:
    import torch

    import optim_core.torch as oct

    params = _tensors(shapes, seed=0)
    options = OPTIONS.get(name, {})
    if side == "ours":
        opt = getattr(oct, name)(params, **options)
    else:
        opt = getattr(torch.optim, name)(params, **options, **{mode: True})
    opt.step()  # state allocated, kernels compiled
    return opt.step


def _time(step: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def measure_pair(name: str, mode: str, workload: workloads.Workload, rounds: int,
                 per_round: int) -> dict:
    """Median step times of ours and torch's, timed in alternating rounds."""
    ours = _runner(name, "ours", mode, workload.shapes)
    theirs = _runner(name, "torch", mode, workload.shapes)
    for step in (ours, theirs):
        _time(step, 2)  # warm-up
    ours_times, torch_times = [], []
    for _ in range(rounds):
        ours_times += _time(ours, per_round)
        torch_times += _time(theirs, per_round)
    ours_s, torch_s = statistics.median(ours_times), statistics.median(torch_times)
    target = "ours/torch <= 1" if mode == "fused" else "torch/ours >= 3"
    holds = ours_s <= torch_s if mode == "fused" else torch_s >= 3 * ours_s
    return {"optimizer": name, "workload": workload.name, "numel": workload.numel,
            "tensors": workload.n_tensors, "torch_mode": mode, "ours_s": ours_s,
            "torch_s": torch_s, "speedup": torch_s / ours_s, "target": target,
            "holds": holds, "ours_times_s": ours_times, "torch_times_s": torch_times}


def format_table(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| optimizer | workload | torch baseline | ours ms | torch ms | torch/ours | "
             "target | holds |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r['optimizer']} | {r['workload']} | {r['torch_mode']} | "
                     f"{r['ours_s'] * 1e3:.3g} | {r['torch_s'] * 1e3:.3g} | "
                     f"{r['speedup']:.2f} | {r['target']} | "
                     f"{'-' if r['holds'] is None else 'yes' if r['holds'] else 'no'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_optim",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on tiny sizes")
    parser.add_argument("--optimizers", help="comma-separated class names (default: all)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON output path")
    args = parser.parse_args(argv)
    import torch

    pairs = _pairs()
    if args.optimizers:
        wanted = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {n for n, _ in pairs})
        if unknown:
            parser.error(f"unknown optimizers {unknown}; choose from {[n for n, _ in pairs]}")
        pairs = [p for p in pairs if p[0] in wanted]
    if args.quick:
        cases = [workloads.single(10_000), workloads.many(20, 100)]
        args.rounds, args.per_round = min(args.rounds, 2), min(args.per_round, 2)
    else:
        cases = [workloads.single(10_000_000), workloads.RESNET50]
    load_before = os.getloadavg()
    results = []
    for name, mode in pairs:
        for workload in cases:
            result = measure_pair(name, mode, workload, args.rounds, args.per_round)
            if args.quick:
                result["holds"] = None
            results.append(result)
            print(f"{name:9s} {workload.name:9s} ours {result['ours_s'] * 1e3:8.3f} ms  "
                  f"torch {mode:7s} {result['torch_s'] * 1e3:8.3f} ms", flush=True)
    stamp = datetime.now(timezone.utc)
    header = (f"optim_core.torch vs torch.optim, {stamp:%Y-%m-%dT%H:%M:%SZ}, cpu: "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch threads, float32, torch {torch.__version__}, "
              f"load average {list(load_before)} -> {list(os.getloadavg())}")
    table = format_table(results, header)
    out = args.out or RESULTS / f"torch-cpu-{stamp:%Y-%m-%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {"header": header, "argv": list(argv or sys.argv[1:])},
                               "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
