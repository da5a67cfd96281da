"""``python -m bench``: time optimizer steps against the memory-bandwidth floor.

Run from the repository root. Prints a Markdown table and writes the full
results (every repeat's time, the floor, versions, load) as JSON, with the table
beside it as ``.md``.

Examples
--------
``python -m bench``                 CPU: every optimizer and implementation, the default workloads
``python -m bench --gpu``           the same on the current CUDA device (CuPy arrays)
``python -m bench --quick``         seconds-long smoke run on tiny sizes
``python -m bench --optimizers adam --workloads single,resnet50 --impls ours-fused,torch-fused``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from . import impls, report, suite, workloads

CPU_SIZES = "1e5,1e6,1e7"
GPU_SIZES = "1e5,1e6,1e7,1e8,1e9"
# GPT-2 small (124M parameters, 3.5 GB moved per Adam step) is left out of the CPU default
# to keep it a few minutes on 2 cores; add it with --workloads.
CPU_WORKLOADS = "single,resnet50,1000x1000,10000x100"
GPU_WORKLOADS = "single,resnet50,gpt2-small,1000x1000"
QUICK_SIZES = "1e3,1e4"
QUICK_WORKLOADS = "single,20x100"
RESULTS = Path(__file__).resolve().parent / "results"


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true",
                        help="run on the current CUDA device (needs CuPy)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: sizes {QUICK_SIZES}, workloads {QUICK_WORKLOADS}, "
                             "10 ms of timed repeats per cell")
    parser.add_argument("--out", type=Path,
                        help="JSON output path (default bench/results/<cpu|gpu>-<date>.json)")
    parser.add_argument("--sizes", help=f"single-tensor sizes (default CPU {CPU_SIZES}, "
                                        f"GPU {GPU_SIZES})")
    parser.add_argument("--optimizers", default=",".join(impls.OPTIMIZERS),
                        help="comma-separated, from: " + ",".join(impls.OPTIMIZERS))
    parser.add_argument("--workloads", help=f"comma-separated (default CPU {CPU_WORKLOADS}, "
                                            f"GPU {GPU_WORKLOADS}); "
                                            "'single' expands to --sizes, COUNTxNUMEL is "
                                            "COUNT tensors of NUMEL elements")
    parser.add_argument("--impls", default=",".join(impls.IMPLS),
                        help="comma-separated, from: " + ",".join(impls.IMPLS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--budget", type=float,
                        help="seconds of timed repeats per cell (default CPU 0.5, GPU 0.2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per cell")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--time-limit", type=float,
                        help="seconds; cells that would start later are recorded as skipped")
    parser.add_argument("--floor-numel", type=int,
                        help="elements per array of the floor kernel (default CPU 10**7, "
                             "GPU 2**28)")
    args = parser.parse_args(argv)
    try:
        args.optimizers = _names(args.optimizers, impls.OPTIMIZERS, "optimizers")
        args.impls = _names(args.impls, impls.IMPLS, "implementations")
        sizes = args.sizes or (QUICK_SIZES if args.quick else GPU_SIZES if args.gpu
                               else CPU_SIZES)
        args.sizes = [workloads.parse_size(s) for s in sizes.split(",") if s.strip()]
        names = args.workloads or (QUICK_WORKLOADS if args.quick else GPU_WORKLOADS
                                   if args.gpu else CPU_WORKLOADS)
        args.workloads = [w for name in names.split(",") if name.strip()
                          for w in workloads.resolve(name.strip(), args.sizes)]
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(str(error))
    if args.budget is None:
        args.budget = 0.01 if args.quick else 0.2 if args.gpu else 0.5
    if args.quick:
        args.min_repeats = min(args.min_repeats, 3)
        args.warmup = min(args.warmup, 2)
        args.floor_numel = args.floor_numel or 1 << 20
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - any failure means no usable GPU
            print(f"--gpu needs CuPy and a CUDA device: {error}", file=sys.stderr)
            return 2
    config = suite.Config(device=device, optimizers=args.optimizers, workloads=args.workloads,
                          impls=args.impls, dtype=args.dtype, warmup=args.warmup,
                          budget_s=args.budget, min_repeats=args.min_repeats,
                          time_limit_s=args.time_limit, floor_numel=args.floor_numel,
                          argv=list(sys.argv[1:] if argv is None else argv))
    # A timeout's SIGTERM ends the run like Ctrl-C: the cells measured so far are written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = suite.run(config, progress=lambda line: print(line, flush=True))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = args.out or RESULTS / f"{'gpu' if args.gpu else 'cpu'}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    text = report.format_report(results)
    out.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
