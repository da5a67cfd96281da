"""The ``optim-core`` command line (also ``python -m optim_core``).

Subcommands:

* ``compare``: train one model with several optimizers; table, CSV/JSON, loss curves.
* ``lr-find``: learning rate range test; suggested rate, CSV/JSON, the curve.
* ``tune``: grid search with k-fold cross-validation; ranked table, CSV/JSON.
* ``bench``: the benchmark suite of a source checkout (``python -m bench``).
* ``article``: the founding article's linear regression with every optimizer.
* ``prune``: train, then fine-tune under magnitude pruning at several sparsities;
  metric, weights left and compressed size; CSV/JSON, metric against sparsity.
* ``quantize``: train, then quantize the weights to int8 and fewer bits; metric and
  size; CSV/JSON, metric against bits.
* ``explain``: train, then integrated gradients (completeness checked) and permutation
  importance; CSV/JSON, attribution heat maps (digits: 8x8 images).

Data defaults to scikit-learn's bundled digits (classification); ``--dataset
diabetes`` is the bundled regression set and ``--dataset synthetic`` draws one of
any size. Bad flags print a message and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..train.extras import MissingExtraError
from . import datasets

__all__ = ["main", "build_parser", "parse_optimizer_spec", "DEFAULT_COMPARE"]

#: Optimizers ``compare`` runs by default, with learning rates that suit the
#: default data (digits, an MLP with one hidden layer, batch 32).
DEFAULT_COMPARE = ("sgd:0.1,sgd:0.02:momentum=0.9,adagrad:0.05,rmsprop:0.001,"
                   "adam:0.003,lion:0.001")
DEFAULT_OUT = "optim-core-results"


class UsageError(Exception):
    """A flag value that parsed but cannot be used; reported like argparse's errors."""


# ----------------------------------------------------------------------------- flag types

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _list_of(item_type: Any) -> Any:
    def parse(text: str) -> list[Any]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        return [item_type(part) for part in items]

    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def _hidden_layers(text: str) -> list[int]:
    if text.strip() in ("", "0", "none"):
        return []
    return _list_of(_positive_int)(text)


def _known_optimizers() -> dict[str, Any]:
    from ..train.fit import OPTIMIZERS

    return OPTIMIZERS


def _state_bits(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``{"state_bits": n}`` for an optimizer that quantizes its states, when asked."""
    bits = getattr(args, "state_bits", 32)
    if bits == 32 or not _known_optimizers()[name].quantized_states:
        return {}
    return {"state_bits": bits}


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_optimizer_spec(spec: str) -> dict[str, Any]:
    """Parse ``name[:lr][:key=value...]`` into :func:`~optim_core.tools.compare`'s dict form.

    ``"sgd:0.02:momentum=0.9"`` becomes ``{"optimizer": "sgd", "lr": 0.02,
    "momentum": 0.9, "label": "sgd:0.02:momentum=0.9"}``.

    Raises
    ------
    UsageError
        For an unknown optimizer (the message lists the known ones) or a malformed part.
    """
    parts = [part.strip() for part in spec.split(":")]
    name = parts[0].lower()
    known = _known_optimizers()
    if name not in known:
        raise UsageError(f"unknown optimizer {parts[0]!r}; known optimizers: "
                         f"{', '.join(sorted(known))}")
    out: dict[str, Any] = {"optimizer": name}
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            if not key.strip().isidentifier():
                raise UsageError(f"bad option {part!r} in optimizer spec {spec!r}")
            out[key.strip()] = _literal(value.strip())
        else:
            try:
                out["lr"] = _positive_float(part)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"bad learning rate in optimizer spec {spec!r}: {exc}") from None
    out["label"] = spec.strip()
    return out


def _unit_float(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _bits(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"expected a bit width in 2..8, got {text!r}")
    return value


# ----------------------------------------------------------------------------- parser

def _train_flags() -> argparse.ArgumentParser:
    """How prune, quantize and explain train the model they work on."""
    parent = argparse.ArgumentParser(add_help=False)
    train = parent.add_argument_group("training the model")
    train.add_argument("--optimizer", default="adam:0.003",
                       help="optimizer spec name[:lr][:key=value...] (default: adam:0.003)")
    train.add_argument("--epochs", type=_positive_int, default=30,
                       help="epochs of training (default: 30)")
    return parent


def _data_flags(hidden: Sequence[int] = (64,)) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    data = parent.add_argument_group("data and model")
    data.add_argument("--dataset", choices=datasets.DATASETS, default="digits",
                      help="digits (classification) and diabetes (regression) ship with "
                           "scikit-learn; synthetic is drawn from --seed (default: digits)")
    data.add_argument("--task", choices=datasets.TASKS, default="classification",
                      help="synthetic data: the task (default: classification)")
    data.add_argument("--n-samples", type=_positive_int, default=2000,
                      help="synthetic data: samples before the 75/25 split (default: 2000)")
    data.add_argument("--n-features", type=_positive_int, default=20,
                      help="synthetic data: features (default: 20)")
    data.add_argument("--n-classes", type=_positive_int, default=3,
                      help="synthetic classification: classes (default: 3)")
    data.add_argument("--noise", type=_nonnegative_float, default=0.1,
                      help="synthetic data: noise on the teacher's output (default: 0.1)")
    data.add_argument("--model", choices=("mlp", "linear"), default="mlp",
                      help="mlp, or linear (linear/logistic/softmax regression by task) "
                           "(default: mlp)")
    data.add_argument("--hidden", type=_hidden_layers, default=list(hidden),
                      help="mlp hidden layer widths, comma-separated (default: "
                           f"{','.join(map(str, hidden))})")
    data.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                      help="array library the data, model and optimizer live on "
                           "(default: numpy)")
    data.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                      help="floating dtype of data and parameters (default: float64)")
    data.add_argument("--impl", choices=("auto", "fused", "generic"), default="auto",
                      help="optimizer implementation: fused kernels where they exist, or "
                           "the generic array API path (default: auto)")
    data.add_argument("--state-bits", type=int, choices=(32, 8, 4), default=32,
                      help="width of the optimizer's moment states: 8 or 4 store them "
                           "block-wise quantized on tensors of 4096 elements or more, for "
                           "the optimizers that support it (adam, adamw, lion, sgd, rmsprop; "
                           "the others keep 32) (default: 32)")
    data.add_argument("--seed", type=int, default=0,
                      help="seeds the data split, the initial parameters and the batch order")
    run = parent.add_argument_group("training and output")
    run.add_argument("--batch-size", type=_positive_int, default=32,
                     help="mini-batch size (default: 32)")
    run.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                     help=f"directory for CSV/JSON results and PNG plots (default: {DEFAULT_OUT})")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``optim-core`` argument parser."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="optim-core",
        description="Compare, tune and benchmark first-order optimizers on real or synthetic "
                    "data.",
        epilog="Run 'optim-core COMMAND -h' for the flags of a command.")
    parser.add_argument("--version", action="version", version=f"optim-core {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data = _data_flags()

    compare = commands.add_parser(
        "compare", parents=[data], help="train one model with several optimizers",
        description="Train the same model from the same initial parameters with each "
                    "optimizer; print final loss, metric and time; write results.csv, "
                    "results.json and loss_curves.png to --out.")
    compare.add_argument("--optimizers", default=DEFAULT_COMPARE,
                         help="comma-separated name[:lr][:key=value] specs "
                              f"(default: {DEFAULT_COMPARE})")
    compare.add_argument("--lr", type=_positive_float, default=None,
                         help="learning rate for every optimizer without one in its spec")
    compare.add_argument("--epochs", type=_positive_int, default=10,
                         help="epochs per optimizer (default: 10)")

    lr_find = commands.add_parser(
        "lr-find", parents=[data], help="learning rate range test",
        description="Train with a learning rate growing exponentially each step and record "
                    "the loss; print the suggested rate; write lr_find.csv, lr_find.json and "
                    "lr_finder.png to --out.")
    lr_find.add_argument("--optimizer", default="adam",
                         help="optimizer name, with options as name[:key=value...], e.g. "
                              "sgd:momentum=0.9 (default: adam)")
    lr_find.add_argument("--start-lr", type=_positive_float, default=1e-6,
                         help="first learning rate (default: 1e-6)")
    lr_find.add_argument("--end-lr", type=_positive_float, default=10.0,
                         help="last learning rate (default: 10)")
    lr_find.add_argument("--steps", type=_positive_int, default=100,
                         help="number of steps from start to end (default: 100)")

    tune = commands.add_parser(
        "tune", parents=[data], help="grid search with k-fold cross-validation",
        description="Score every optimizer x learning rate x batch size by k-fold "
                    "cross-validation on the training split; print the ranked table and the "
                    "best configuration's test score; write tune.csv and tune.json to --out.")
    tune.add_argument("--optimizers", type=_list_of(str), default=["sgd", "adam"],
                      help="comma-separated optimizer names (default: sgd,adam)")
    tune.add_argument("--lrs", type=_list_of(_positive_float), default=[1e-3, 1e-2, 1e-1],
                      help="comma-separated learning rates (default: 0.001,0.01,0.1)")
    tune.add_argument("--batch-sizes", type=_list_of(_positive_int), default=[32, 128],
                      help="comma-separated batch sizes (default: 32,128)")
    tune.add_argument("--folds", type=_positive_int, default=3,
                      help="k of the k-fold cross-validation, at least 2 (default: 3)")
    tune.add_argument("--epochs", type=_positive_int, default=5,
                      help="epochs per fold (default: 5)")

    bench = commands.add_parser(
        "bench", help="run the benchmark suite (source checkout)",
        description="Run the repository's benchmark suite, 'python -m bench', with the "
                    "arguments given. The suite lives in the source checkout's bench/ "
                    "directory, not in the installed package.")
    bench.add_argument("--root", type=Path, default=None,
                       help="source checkout holding bench/ (default: the current directory, "
                            "then the package's parent)")
    bench.add_argument("args", nargs="*", metavar="ARG",
                       help="arguments passed on to 'python -m bench', flags included "
                            "(after '--' where one is named --root)")

    article = commands.add_parser(
        "article", help="the founding article's example with every optimizer",
        description="The founding article's linear regression (4 samples, full batch) trained "
                    "by every optimizer.")
    article.add_argument("--iterations", type=_positive_int, default=1000,
                         help="full-batch iterations (default: 1000)")
    prune = commands.add_parser(
        "prune", parents=[_data_flags(hidden=(256,)), _train_flags()],
        help="magnitude pruning: metric and compressed size against sparsity",
        description="Train the model, then fine-tune a copy of it under magnitude pruning "
                    "(optim_core.pruning.MagnitudePruning) at each sparsity; print the "
                    "metric, the weights left and the bytes of the sparse model stored "
                    "compressed; write prune.csv, prune.json and prune.png to --out. The "
                    "MLP's hidden layer defaults to 256 here (wide enough to prune).")
    prune.add_argument("--sparsities", type=_list_of(_unit_float), default=[0.5, 0.8, 0.9, 0.95],
                       help="comma-separated shares of the weights to prune, each in (0, 1) "
                            "(default: 0.5,0.8,0.9,0.95)")
    prune.add_argument("--scope", choices=("global", "layer"), default="global",
                       help="rank the weights over all layers together or per layer "
                            "(default: global)")
    prune.add_argument("--one-shot", action="store_true",
                       help="prune once at the start of the fine-tuning instead of Zhu & "
                            "Gupta's gradual schedule")
    prune.add_argument("--finetune-epochs", type=_positive_int, default=20,
                       help="fine-tuning epochs per sparsity (default: 20)")

    quantize = commands.add_parser(
        "quantize", parents=[data, _train_flags()],
        help="post-training quantization: metric and size against bits",
        description="Train the model, then quantize its weights (symmetric, per output "
                    "channel) to each bit width; print the metric and the weights' bytes "
                    "against the float model; write quantize.csv, quantize.json and "
                    "quantize.png to --out.")
    quantize.add_argument("--bits", type=_list_of(_bits), default=[8, 6, 4, 3, 2],
                          help="comma-separated bit widths, each in 2..8 (default: 8,6,4,3,2)")
    quantize.add_argument("--per-tensor", action="store_true",
                          help="one scale per weight matrix instead of one per output channel")
    quantize.add_argument("--calibrate", action="store_true",
                          help="quantize the activations to int8 too, calibrated on the "
                               "training split (integer matrix products)")

    explain = commands.add_parser(
        "explain", parents=[data, _train_flags()],
        help="integrated gradients and permutation importance",
        description="Train the model, then explain its test predictions: integrated "
                    "gradients (Sundararajan et al. 2017) with their completeness, and "
                    "scikit-learn's permutation importance; write explain.csv (per feature), "
                    "explain.json and, for digits, attributions.png (8x8 heat maps of one "
                    "test image per class) and class_maps.png (mean attribution per "
                    "predicted class), else features.png.")
    explain.add_argument("--steps", type=_positive_int, default=64,
                         help="quadrature nodes of the path integral (default: 64)")
    explain.add_argument("--output", choices=("probability", "logit"), default="probability",
                         help="classifiers: explain the predicted class's probability or "
                              "logit (default: probability)")
    explain.add_argument("--repeats", type=_positive_int, default=5,
                         help="permutation importance: shuffles per feature (default: 5)")
    for subparser in (compare, lr_find, tune, bench, article, prune, quantize, explain):
        # Errors found after parsing are reported with the subcommand's own usage line.
        subparser.set_defaults(subparser=subparser)
    return parser


# ----------------------------------------------------------------------------- shared steps

def _check_backend(backend: str) -> Any:
    """The array module to put data on; UsageError when it cannot be used here."""
    if backend == "numpy":
        import numpy

        return numpy
    if importlib.util.find_spec("cupy") is None:
        raise UsageError("--backend cupy needs CuPy, which is not installed; install "
                         "'optim-core[cuda12]' or 'optim-core[cuda13]'")
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any driver failure means no usable GPU
        raise UsageError(f"--backend cupy: no usable CUDA device ({exc})") from None
    if count < 1:
        raise UsageError("--backend cupy: no CUDA device found")
    return cupy


def _load(args: argparse.Namespace) -> tuple[datasets.Dataset, Any]:
    xp = _check_backend(args.backend)
    if args.dataset == "synthetic" and args.task == "classification" and args.n_classes < 2:
        raise UsageError("--n-classes must be at least 2")
    dataset = datasets.load(args.dataset, task=args.task, n_samples=args.n_samples,
                            n_features=args.n_features, n_classes=args.n_classes,
                            noise=args.noise, seed=args.seed, dtype=args.dtype)
    return dataset, xp


def _on_device(xp: Any, *arrays: Any) -> list[Any]:
    return [xp.asarray(a) for a in arrays]


def _model_factory(args: argparse.Namespace, dataset: datasets.Dataset) -> Any:
    """A callable building a fresh model; ``fit`` draws its parameters from ``--seed``."""
    from ..train import models

    n_in = dataset.n_features
    if args.model == "mlp":
        n_out = dataset.n_classes if dataset.task == "classification" else 1
        sizes, task = [n_in, *args.hidden, n_out], dataset.task
        return lambda: models.MLP(sizes, task=task)
    if dataset.task == "regression":
        return lambda: models.LinearRegression(n_in)
    if dataset.n_classes == 2:
        return lambda: models.LogisticRegression(n_in)
    n_classes = dataset.n_classes
    return lambda: models.SoftmaxRegression(n_in, n_classes)


def _describe(args: argparse.Namespace, dataset: datasets.Dataset) -> str:
    model = ("mlp " + "-".join(map(str, [dataset.n_features, *args.hidden,
                                          dataset.n_classes or 1]))
             if args.model == "mlp" else "linear")
    bits = getattr(args, "state_bits", 32)
    bits = "" if bits == 32 else f", state bits: {bits}"
    return (f"{dataset.describe()}\nmodel: {model}, backend: {args.backend}, dtype: "
            f"{args.dtype}, impl: {args.impl}{bits}, batch size: {args.batch_size}")


def _prepare_out(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {str(path)!r}: cannot create the directory ({exc})") from None
    return path


def _written(*paths: Path) -> str:
    return "wrote " + ", ".join(str(p) for p in paths)


# ----------------------------------------------------------------------------- commands

def _cmd_compare(args: argparse.Namespace) -> int:
    from .. import tools

    specs = [parse_optimizer_spec(s) for s in args.optimizers.split(",") if s.strip()]
    if not specs:
        raise UsageError("--optimizers is empty")
    for spec in specs:
        if args.lr is not None:
            spec.setdefault("lr", args.lr)
        for key, value in _state_bits(spec["optimizer"], args).items():
            spec.setdefault(key, value)
    labels = [spec["label"] for spec in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--optimizers lists a spec twice: {','.join(labels)}")
    dataset, xp = _load(args)
    out = _prepare_out(args.out)
    print(_describe(args, dataset))
    X, y, X_test, y_test = _on_device(xp, dataset.X_train, dataset.y_train,
                                      dataset.X_test, dataset.y_test)
    result = tools.compare(_model_factory(args, dataset), X, y, optimizers=specs,
                           epochs=args.epochs, batch_size=args.batch_size,
                           validation_data=(X_test, y_test), seed=args.seed,
                           progress=not args.no_progress, impl=args.impl)
    print(f"\n{args.epochs} epochs, validation on the {dataset.X_test.shape[0]}-sample test "
          f"split\n")
    print(result.format())
    plot = result.plot(out / "loss_curves.png",
                       title=f"{dataset.name}: {args.model}, batch {args.batch_size}")
    print(_written(result.to_csv(out / "results.csv"), result.to_json(out / "results.json"),
                   plot))
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from .. import tools

    spec = parse_optimizer_spec(args.optimizer)
    if "lr" in spec:
        raise UsageError(f"lr-find scans the learning rate itself; drop it from "
                         f"--optimizer {args.optimizer!r}")
    name, options = spec.pop("optimizer"), {k: v for k, v in spec.items() if k != "label"}
    options = {**_state_bits(name, args), **options}
    if args.start_lr >= args.end_lr:
        raise UsageError(f"--start-lr ({args.start_lr:g}) must be below --end-lr "
                         f"({args.end_lr:g})")
    if args.steps < 2:
        raise UsageError("--steps must be at least 2")
    dataset, xp = _load(args)
    out = _prepare_out(args.out)
    print(_describe(args, dataset))
    X, y = _on_device(xp, dataset.X_train, dataset.y_train)
    result = tools.lr_find(_model_factory(args, dataset), X, y, optimizer=name,
                           start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps,
                           batch_size=args.batch_size, seed=args.seed,
                           progress=not args.no_progress, impl=args.impl, **options)
    print()
    print(result.format())
    print(_written(result.to_csv(out / "lr_find.csv"), result.to_json(out / "lr_find.json"),
                   result.plot(out / "lr_finder.png")))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .. import tools

    for name in args.optimizers:
        if ":" in name:
            raise UsageError(f"tune --optimizers takes names, got {name!r}; the learning "
                             f"rates to try go in --lrs")
    names = [parse_optimizer_spec(name)["optimizer"] for name in args.optimizers]
    state_options = [_state_bits(name, args) for name in names]
    if args.state_bits != 32 and not all(state_options):
        raise UsageError(f"--state-bits {args.state_bits}: "
                         f"{', '.join(n for n, o in zip(names, state_options) if not o)} "
                         "keep 32-bit states; tune them without --state-bits")
    if args.folds < 2:
        raise UsageError("--folds must be at least 2")
    dataset, xp = _load(args)
    if args.folds > dataset.X_train.shape[0]:
        raise UsageError(f"--folds {args.folds} exceeds the {dataset.X_train.shape[0]} "
                         f"training samples")
    out = _prepare_out(args.out)
    print(_describe(args, dataset))
    X, y, X_test, y_test = _on_device(xp, dataset.X_train, dataset.y_train,
                                      dataset.X_test, dataset.y_test)
    factory = _model_factory(args, dataset)
    result = tools.tune(factory, X, y, optimizers=names, lrs=args.lrs,
                        batch_sizes=args.batch_sizes, k=args.folds, epochs=args.epochs,
                        seed=args.seed, progress=not args.no_progress, impl=args.impl,
                        **(state_options[0] if state_options else {}))
    print(f"\n{args.folds}-fold cross-validation on the training split, {args.epochs} epochs "
          f"per fold\n")
    print(result.format())
    # The held-out test split has not been seen by the search: score the winner on it.
    from ..train.fit import fit

    best = result.best_config
    model = factory()
    fit(model, X, y, epochs=args.epochs, seed=args.seed, progress=False, impl=args.impl,
        **(state_options[0] if state_options else {}), **best)
    test_score = float(model.score(X_test, y_test))
    print(f"best configuration retrained on the whole training split: test "
          f"{result.metric_name} {test_score:.4f}")
    summary = result.to_dict()
    summary["test_" + result.metric_name] = test_score
    from .experiments import write_json

    print(_written(result.to_csv(out / "tune.csv"), write_json(summary, out / "tune.json")))
    return 0


def _bench_root(explicit: Path | None) -> Path | None:
    candidates = [explicit] if explicit is not None else \
        [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "bench" / "__main__.py").is_file():
            return root
    return None


def _split_bench_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``bench``'s own flags (-h, --root) from the suite's arguments, kept in order.

    Everything from the first other argument on (or after ``--``) belongs to the
    suite, whose flags are its own to check.
    """
    own: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return own, argv[i + 1:]
        if token in ("-h", "--help") or token.startswith("--root="):
            own.append(token)
        elif token == "--root":
            own.extend(argv[i:i + 2])
            i += 1
        else:
            break
        i += 1
    return own, argv[i:]


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _bench_root(args.root)
    if root is None:
        where = str(args.root) if args.root is not None else \
            "the current directory or next to the installed package"
        raise UsageError(f"no benchmark suite (bench/__main__.py) in {where}. The benchmarks "
                         f"are not part of the installed package: run 'optim-core bench' from "
                         f"a source checkout of optim-core, or pass --root CHECKOUT")
    passed = args.args
    command = [sys.executable, "-m", "bench", *passed]
    print(f"+ (cd {root} && python -m bench{''.join(' ' + a for a in passed)})", flush=True)
    env = dict(os.environ)
    # The checkout's root must be importable for 'bench' (and, without an install, optim_core).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.call(command, cwd=root, env=env)


def _cmd_article(args: argparse.Namespace) -> int:
    from .article import main as article_main

    return article_main(["--iterations", str(args.iterations)])


# ----------------------------------------------------------- model size, explanations

def _trained(args: argparse.Namespace) -> tuple[datasets.Dataset, Any, list[Any], dict, Path]:
    """The data set, the model trained as the flags say, the arrays on the device, the
    optimizer's fit arguments (for fine-tuning), the output folder (made once every flag
    is checked)."""
    spec = parse_optimizer_spec(args.optimizer)
    spec.pop("label")
    name = spec.pop("optimizer")
    dataset, xp = _load(args)
    out = _prepare_out(args.out)
    print(_describe(args, dataset))
    arrays = _on_device(xp, dataset.X_train, dataset.y_train, dataset.X_test, dataset.y_test)
    from ..train.fit import fit

    model = _model_factory(args, dataset)()
    options = dict(optimizer=name, batch_size=args.batch_size, impl=args.impl,
                   **{**_state_bits(name, args), **spec})
    fit(model, arrays[0], arrays[1], epochs=args.epochs, seed=args.seed,
        progress=not args.no_progress, **options)
    return dataset, model, arrays, options, out


def _cmd_prune(args: argparse.Namespace) -> int:
    from .compression import prune_sweep

    dataset, model, (X, y, X_test, y_test), options, out = _trained(args)
    result = prune_sweep(model, X, y, X_test, y_test, sparsities=args.sparsities,
                         scope=args.scope, gradual=not args.one_shot,
                         epochs=args.finetune_epochs, seed=args.seed,
                         progress=not args.no_progress, **options)
    print(f"\ntrained {args.epochs} epochs; test {result.metric_name} on the "
          f"{dataset.X_test.shape[0]}-sample test split\n")
    print(result.format())
    plot = result.plot(out / "prune.png", title=f"{dataset.name}: magnitude pruning "
                                                f"({args.scope})")
    print(_written(result.to_csv(out / "prune.csv"), result.to_json(out / "prune.json"), plot))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .compression import quantize_sweep

    dataset, model, (X, _, X_test, y_test), _, out = _trained(args)
    result = quantize_sweep(model, X_test, y_test, bits=args.bits,
                            per_channel=not args.per_tensor,
                            calibration_data=X if args.calibrate else None)
    print(f"\ntrained {args.epochs} epochs; test {result.metric_name} on the "
          f"{dataset.X_test.shape[0]}-sample test split\n")
    print(result.format())
    plot = result.plot(out / "quantize.png", title=f"{dataset.name}: post-training "
                                                   "quantization")
    print(_written(result.to_csv(out / "quantize.csv"), result.to_json(out / "quantize.json"),
                   plot))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from ..integrations import explain
    from .experiments import format_table, write_csv, write_json

    dataset, model, (_, _, X_test, y_test), _, out = _trained(args)
    attributions, delta = explain.integrated_gradients(model, X_test, steps=args.steps,
                                                       output=args.output, return_delta=True)
    f_x = explain.model_output(model, X_test, output=args.output)
    targets = None if dataset.task == "regression" else model.predict(X_test)
    f_base = explain.model_output(model, X_test * 0, target=targets, output=args.output)
    attributions, delta = _host(attributions), _host(delta)
    gap = np.abs(_host(f_x) - _host(f_base))
    relative = np.abs(delta) / np.where(gap > 0, gap, np.inf)
    what = "the predicted class's " + args.output if dataset.task == "classification" \
        else "the prediction"
    completeness = {"samples": int(delta.shape[0]), "steps": args.steps, "explains": what,
                    "median_relative_error": float(np.median(relative)),
                    "max_relative_error": float(np.max(relative)),
                    "max_abs_error": float(np.max(np.abs(delta)))}
    print(f"\nintegrated gradients of {what} (baseline: zeros), {args.steps} Gauss-Legendre "
          f"nodes, on {delta.shape[0]} test samples\n")
    print("completeness: sum of attributions vs f(x) - f(baseline)")
    print(format_table([{k: v for k, v in completeness.items() if k != "explains"}]))
    importance = explain.permutation_importance(model, _host(X_test), _host(y_test),
                                                n_repeats=args.repeats,
                                                random_state=args.seed)
    features = [{"feature": i, "mean_abs_attribution": float(np.mean(np.abs(attributions[:, i]))),
                 "mean_attribution": float(np.mean(attributions[:, i])),
                 "permutation_importance": float(importance.importances_mean[i]),
                 "permutation_std": float(importance.importances_std[i])}
                for i in range(attributions.shape[1])]
    ranked = sorted(features, key=lambda row: -row["mean_abs_attribution"])
    print(f"\nfeatures by mean |attribution| (top 10 of {len(features)}); permutation "
          f"importance: drop of test {model.metric_name} ({args.repeats} shuffles)\n")
    print(format_table(ranked[:10]))
    written = [write_csv(features, out / "explain.csv"),
               write_json({"kind": "explain", "completeness": completeness,
                           "features": features}, out / "explain.json")]
    if dataset.name == "digits":
        predicted = _host(model.predict(X_test))
        images = _host(X_test)
        first = [int(np.flatnonzero(predicted == k)[0]) for k in range(10)
                 if np.any(predicted == k)]
        written.append(explain.plot_attribution_maps(
            attributions[first], out / "attributions.png", images=images[first],
            titles=[f"predicted {predicted[i]}" for i in first],
            title="integrated gradients (red: raises the predicted class's score)"))
        classes = [k for k in range(10) if np.any(predicted == k)]
        written.append(explain.plot_attribution_maps(
            np.stack([attributions[predicted == k].mean(axis=0) for k in classes]),
            out / "class_maps.png", titles=[f"class {k}" for k in classes],
            title="mean attribution per predicted class"))
    else:
        written.append(_plot_features(features, out / "features.png", dataset.name))
    print(_written(*written))
    return 0


def _host(x: Any) -> Any:
    from .. import _namespace as ns

    return ns.to_numpy(x)


def _plot_features(features: list[dict[str, Any]], path: Path, name: str) -> Path:
    from ..train.extras import require

    Figure = require("matplotlib.figure", "a plot").Figure
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "a plot").FigureCanvasAgg
    figure = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    index = [row["feature"] for row in features]
    left.bar(index, [row["mean_abs_attribution"] for row in features], color="C0")
    left.set_title("mean |integrated gradient|")
    right.bar(index, [row["permutation_importance"] for row in features],
              yerr=[row["permutation_std"] for row in features], color="C1")
    right.set_title("permutation importance")
    for axes in (left, right):
        axes.set_xlabel("feature")
        axes.grid(True, alpha=0.3)
    figure.suptitle(f"{name}: what the predictions rest on")
    figure.savefig(path, format="png")
    return path


_COMMANDS = {"compare": _cmd_compare, "lr-find": _cmd_lr_find, "tune": _cmd_tune,
             "bench": _cmd_bench, "article": _cmd_article, "prune": _cmd_prune,
             "quantize": _cmd_quantize, "explain": _cmd_explain}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optim-core`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Exit status 0 on success, 2 for a bad flag or value, 1 when an optional dependency
    of the command is not installed (with a message on stderr naming the extra).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        own, passed = _split_bench_args(argv[1:])
        args = build_parser().parse_args(["bench", *own])
        args.args = passed
    else:
        args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        status = _COMMANDS[args.command](args)
    except UsageError as exc:
        args.subparser.error(str(exc))  # prints usage and the message, exits with 2
    except MissingExtraError as exc:
        print(f"optim-core {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.command in ("compare", "lr-find", "tune", "prune", "quantize", "explain"):
        print(f"done in {time.perf_counter() - start:.1f} s")
    return status
