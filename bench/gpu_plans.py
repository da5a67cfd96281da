"""GPU: the default path's step plans (issue 17 item 1) against torch's fused Adam.

``python -m bench.gpu_plans [--out FILE.md] [--rounds N] [--repeats N]``

Per workload (ResNet-50, GPT-2 small, 1000 tensors of 1000; float32 Adam on CuPy arrays):

* ``plan``: the default path (``impl="fused"``, no ``flat``), the same gradient arrays
  every step: the kept plan's table launch, no copy of gradient addresses;
* ``plan, new grads``: two sets of gradients in turn, so their addresses change every
  step and each step copies them to the device, as after a backward pass that allocates;
* ``full path``: the same optimizer given its gradients in a list subclass, which a plan
  does not take: what every step cost before step plans (32 small tensors a launch);
* ``torch fused``: ``torch.optim.Adam(fused=True)``.

Device time by CUDA events around back-to-back steps (what a training loop sees: a step
bound by host work shows its host time), median of ``rounds`` medians; and the host time
of one step (``perf_counter`` around the calls, before the final synchronize). Targets
(issue 17): the plan at most 1.0x torch fused on ResNet-50 and GPT-2 small, at most 0.5x
on 1000 x 1000. Needs CuPy, torch and a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import impls, timing, workloads

#: (workload, the bound on the plan's ratio to torch fused).
TARGETS = (("resnet50", 1.0), ("gpt2-small", 1.0), ("1000x1000", 0.5))


class _Unplanned(list):
    """Gradients in a list subclass: the optimizer's full path (a plan takes exact lists)."""


def _ours(data: impls.WorkloadData, kind: str) -> Any:
    import optim_core

    params, grads = data.copies("cupy")
    other = [g.copy() for g in grads]
    opt = optim_core.Adam(params, **impls.HYPERPARAMETERS["adam"], impl="fused")
    if kind == "full path":
        given = _Unplanned(grads)
        return lambda: opt.step(given), opt
    if kind == "plan, new grads":
        turn = [grads, other]

        def step() -> None:
            turn.reverse()
            opt.step(turn[0])

        return step, opt
    return (lambda: opt.step(grads)), opt


def measure(name: str, rounds: int, repeats: int) -> list[dict[str, Any]]:
    """Each kind's median device and host time per step on workload ``name``."""
    [workload] = workloads.resolve(name, [])
    data = impls.WorkloadData(workload, "float32", "cuda")
    runners: dict[str, tuple[Any, Any]] = {}
    for kind in ("plan", "plan, new grads", "full path"):
        runners[kind] = (*_ours(data, kind), timing.CupyEventClock())
    torch_runner = impls.build("torch-fused", "adam", data, "cuda")
    runners["torch fused"] = (torch_runner.step, None, torch_runner.clock)
    for step, _, clock in runners.values():
        for _ in range(3):  # compile, make the plan, warm up
            step()
        clock.synchronize()
    device: dict[str, list[float]] = {kind: [] for kind in runners}
    host: dict[str, list[float]] = {kind: [] for kind in runners}
    for _ in range(rounds):  # interleaved: a disturbance hits every kind alike
        for kind, (step, _, clock) in runners.items():
            device[kind].append(statistics.median(clock.time_each(step, repeats)))
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            host[kind].append((time.perf_counter() - start) / repeats)
            clock.synchronize()
    torch_s = statistics.median(device["torch fused"])
    rows = []
    for kind, (_, opt, _) in runners.items():
        median = statistics.median(device[kind])
        row = {"workload": name, "tensors": workload.n_tensors, "kind": kind,
               "device_ms": median * 1e3, "host_ms": statistics.median(host[kind]) * 1e3,
               "ratio_vs_torch_fused": median / torch_s}
        if opt is not None:
            row["planned"] = "plan" in opt._caches[0] and opt._caches[0]["plan"].data is not None
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | tensors | kind | device ms/step | host ms/step | vs torch fused |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['tensors']} | {r['kind']} | {r['device_ms']:.3f} "
                     f"| {r['host_ms']:.3f} | {r['ratio_vs_torch_fused']:.2f}x |")
    lines.append("")
    cells = {(r["workload"], r["kind"]): r for r in rows}
    for name, bound in TARGETS:
        for kind in ("plan", "plan, new grads"):
            row = cells.get((name, kind))
            if row is None:
                continue
            verdict = "holds" if row["ratio_vs_torch_fused"] <= bound else "MISSED"
            lines.append(f"target plans adam {name} ({kind}): <= {bound:.2f}x torch fused: "
                         f"{row['ratio_vs_torch_fused']:.2f}x -> {verdict}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_plans", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="Markdown output (the JSON rows follow the table)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workloads", default=",".join(name for name, _ in TARGETS))
    args = parser.parse_args(argv)
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - any reason there is no GPU
        print(f"bench.gpu_plans needs CuPy and a CUDA device: {error}", file=sys.stderr)
        return 2
    rows = []
    for name in args.workloads.split(","):
        rows.extend(measure(name.strip(), args.rounds, args.repeats))
        print(report(rows), flush=True)
    text = report(rows) + "\n```json\n" + json.dumps(rows, indent=1) + "\n```\n"
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
