"""The ``optim-core`` command line: subcommands, printed tables, files written, bad flags."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from optim_core.optim.registry import OPTIMIZERS
from optim_core.tools import cli

# Small, fast settings shared by the tests: a 4-class synthetic problem and a linear model.
SMALL = ["--dataset", "synthetic", "--n-samples", "240", "--n-features", "8", "--n-classes", "4",
         "--model", "linear", "--no-progress"]


def run(capsys, *argv):
    """``main(argv)`` in-process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- compare

def test_compare_prints_a_table_and_writes_csv_json_and_loss_curves(capsys, tmp_path):
    status, out, _ = run(capsys, "compare", *SMALL, "--optimizers", "sgd:0.1,adam:0.01",
                         "--epochs", "3", "--out", str(tmp_path))
    assert status == 0
    assert "synthetic (classification, 4 classes): 180 train / 60 test samples" in out
    table = out[out.index("optimizer "):].splitlines()
    assert table[0].split()[:3] == ["optimizer", "lr", "epochs"]
    assert table[2].split()[0] == "sgd:0.1" and table[3].split()[0] == "adam:0.01"
    rows = read_csv(tmp_path / "results.csv")
    assert [r["optimizer"] for r in rows] == ["sgd:0.1", "adam:0.01"]
    assert list(rows[0]) == ["optimizer", "lr", "epochs", "train_loss", "train_accuracy",
                             "val_loss", "val_accuracy", "time_s"]
    assert [float(r["lr"]) for r in rows] == [0.1, 0.01]
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["kind"] == "compare" and data["metric"] == "accuracy"
    assert [len(data["histories"][name]) for name in ("sgd:0.1", "adam:0.01")] == [3, 3]
    assert set(data["histories"]["sgd:0.1"][0]) >= {"epoch", "train_loss", "val_loss",
                                                     "val_metric", "lr", "time"}
    assert data["best"]["optimizer"] in ("sgd:0.1", "adam:0.01")
    assert f"best: {data['best']['optimizer']}" in out
    assert png_size(tmp_path / "loss_curves.png") == (1100, 420)
    assert f"wrote {tmp_path / 'results.csv'}" in out


def test_compare_on_regression_reports_r2_and_applies_lr_and_options(capsys, tmp_path):
    status, out, _ = run(capsys, "compare", "--dataset", "diabetes", "--model", "linear",
                         "--optimizers", "sgd,sgd:momentum=0.9", "--lr", "0.05",
                         "--epochs", "2", "--impl", "generic", "--no-progress",
                         "--out", str(tmp_path))
    assert status == 0
    assert "diabetes (regression): 332 train / 110 test samples, 10 features" in out
    assert "impl: generic" in out
    rows = read_csv(tmp_path / "results.csv")
    assert [r["optimizer"] for r in rows] == ["sgd", "sgd:momentum=0.9"]
    assert [float(r["lr"]) for r in rows] == [0.05, 0.05]
    assert "val_r2" in rows[0] and float(rows[0]["val_r2"]) > 0.2
    # Momentum took different steps from the same start.
    assert rows[0]["train_loss"] != rows[1]["train_loss"]


def test_parse_optimizer_spec():
    assert cli.parse_optimizer_spec("SGD:0.02:momentum=0.9:nesterov=true") == {
        "optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True,
        "label": "SGD:0.02:momentum=0.9:nesterov=true"}
    assert cli.parse_optimizer_spec("adam") == {"optimizer": "adam", "label": "adam"}


# ----------------------------------------------------------------------------- lr-find

def test_lr_find_prints_the_suggestion_and_writes_the_curve(capsys, tmp_path):
    status, out, _ = run(capsys, "lr-find", *SMALL, "--optimizer", "sgd:momentum=0.5",
                         "--steps", "40",
                         "--start-lr", "1e-4", "--end-lr", "100", "--out", str(tmp_path))
    assert status == 0
    data = json.loads((tmp_path / "lr_find.json").read_text())
    assert data["kind"] == "lr_find" and data["optimizer"] == "sgd"
    assert f"suggested lr: {data['suggested_lr']:.3e}" in out
    rows = read_csv(tmp_path / "lr_find.csv")
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed_loss"]
    assert float(rows[0]["lr"]) == 1e-4 and 2 <= len(rows) <= 40
    assert 1e-4 <= data["suggested_lr"] <= 100
    assert png_size(tmp_path / "lr_finder.png") == (700, 420)


# ----------------------------------------------------------------------------- tune

def test_tune_prints_the_ranked_grid_and_the_winners_test_score(capsys, tmp_path):
    status, out, _ = run(capsys, "tune", *SMALL, "--optimizers", "sgd,adam", "--lrs",
                         "0.001,0.1", "--batch-sizes", "32", "--folds", "2", "--epochs", "2",
                         "--out", str(tmp_path))
    assert status == 0
    rows = read_csv(tmp_path / "tune.csv")
    assert [(r["optimizer"], float(r["lr"])) for r in rows] == [
        ("sgd", 0.001), ("sgd", 0.1), ("adam", 0.001), ("adam", 0.1)]
    assert sorted(int(r["rank"]) for r in rows) == [1, 2, 3, 4]
    data = json.loads((tmp_path / "tune.json").read_text())
    assert data["kind"] == "tune" and data["k"] == 2
    best = data["best"]
    assert best["rank"] == 1
    assert (f"best (2-fold mean accuracy): optimizer={best['optimizer']} lr={best['lr']:g} "
            f"batch_size=32") in out
    assert 0 <= data["test_accuracy"] <= 1
    assert f"test accuracy {data['test_accuracy']:.4f}" in out


# ----------------------------------------------------------------------------- others

def test_article_runs_the_founding_example(capsys):
    status, out, _ = run(capsys, "article", "--iterations", "50")
    assert status == 0
    assert "Article example: X (4, 2), 50 full-batch iterations" in out
    assert all(name in out for name in ("GD", "Adam", "Lion"))


def test_bench_delegates_to_the_checkouts_suite(capsys, tmp_path):
    suite = tmp_path / "bench"
    suite.mkdir()
    (suite / "__init__.py").write_text("")
    (suite / "__main__.py").write_text(
        "import sys\nprint('suite got', sys.argv[1:])\nsys.exit(3)\n")
    status = cli.main(["bench", "--root", str(tmp_path), "--quick", "x"])
    # The suite's own exit status comes back; its output went to the real stdout.
    assert status == 3
    assert "python -m bench --quick x" in capsys.readouterr().out


def test_bench_without_a_checkout_explains_where_benchmarks_run(capsys, tmp_path):
    status, _, err = run(capsys, "bench", "--root", str(tmp_path))
    assert status == 2
    assert "not part of the installed package" in err and "source checkout" in err


# ------------------------------------------------------------ prune, quantize, explain

def test_prune_prints_accuracy_against_sparsity_and_writes_the_sweep(capsys, tmp_path):
    status, out, _ = run(capsys, "prune", *SMALL, "--epochs", "3", "--finetune-epochs", "2",
                         "--sparsities", "0.5,0.9", "--out", str(tmp_path))
    assert status == 0
    assert "magnitude pruning (global, gradual (Zhu & Gupta)), 2 fine-tuning epochs" in out
    table = out[out.index("sparsity "):].splitlines()
    assert table[0].split() == ["sparsity", "zeros", "nonzero_weights", "accuracy", "change",
                                "sparse_bytes", "dense_bytes", "ratio"]
    rows = read_csv(tmp_path / "prune.csv")
    assert [float(r["sparsity"]) for r in rows] == [0.0, 0.5, 0.9]
    # A linear model on 8 features and 4 classes: 32 weights.
    assert [int(r["nonzero_weights"]) for r in rows] == [32, 16, 3]
    assert float(rows[2]["zeros"]) == pytest.approx(29 / 32, abs=1e-4)
    assert int(rows[2]["sparse_bytes"]) < int(rows[0]["sparse_bytes"])
    data = json.loads((tmp_path / "prune.json").read_text())
    assert data["kind"] == "prune" and data["scope"] == "global" and len(data["table"]) == 3
    assert png_size(tmp_path / "prune.png") == (700, 420)


def test_prune_one_shot_per_layer(capsys, tmp_path):
    status, out, _ = run(capsys, "prune", *SMALL, "--hidden", "6", "--model", "mlp",
                         "--epochs", "2", "--finetune-epochs", "1", "--sparsities", "0.5",
                         "--scope", "layer", "--one-shot", "--out", str(tmp_path))
    assert status == 0
    assert "model: mlp 8-6-4" in out and "magnitude pruning (layer, one-shot)" in out
    rows = read_csv(tmp_path / "prune.csv")
    assert float(rows[1]["zeros"]) == 0.5  # 24 of 48 + 12 of 24


def test_quantize_prints_accuracy_against_bits(capsys, tmp_path):
    status, out, _ = run(capsys, "quantize", *SMALL, "--epochs", "3", "--bits", "8,4",
                         "--dtype", "float32", "--out", str(tmp_path))
    assert status == 0
    assert "post-training quantization, symmetric, per output channel, float activations" in out
    rows = read_csv(tmp_path / "quantize.csv")
    assert [r["weights"] for r in rows] == ["float32", "int8", "int4"]
    assert [int(r["weight_bytes"]) for r in rows] == [128, 32, 16]
    assert float(rows[1]["ratio"]) == 4.0
    assert abs(float(rows[1]["accuracy"]) - float(rows[0]["accuracy"])) <= 0.02
    assert json.loads((tmp_path / "quantize.json").read_text())["activations"] == "float"
    assert png_size(tmp_path / "quantize.png") == (700, 420)
    status, out, _ = run(capsys, "quantize", *SMALL, "--epochs", "2", "--bits", "8",
                         "--per-tensor", "--calibrate", "--out", str(tmp_path))
    assert status == 0 and "per tensor, int8 activations" in out


def test_explain_on_digits_draws_8x8_attribution_maps(capsys, tmp_path):
    status, out, _ = run(capsys, "explain", "--model", "linear", "--epochs", "2",
                         "--repeats", "1", "--no-progress", "--out", str(tmp_path))
    assert status == 0
    assert "integrated gradients of the predicted class's probability (baseline: zeros), " \
           "64 Gauss-Legendre nodes, on 450 test samples" in out
    summary = json.loads((tmp_path / "explain.json").read_text())
    assert summary["completeness"]["samples"] == 450
    assert summary["completeness"]["max_relative_error"] < 0.01
    rows = read_csv(tmp_path / "explain.csv")
    assert len(rows) == 64 and list(rows[0]) == ["feature", "mean_abs_attribution",
                                                "mean_attribution", "permutation_importance",
                                                "permutation_std"]
    corner = next(r for r in rows if r["feature"] == "0")  # a pixel that is always blank
    assert float(corner["mean_abs_attribution"]) == 0.0
    width, height = png_size(tmp_path / "attributions.png")
    assert width == 1300 and height > 280
    assert png_size(tmp_path / "class_maps.png")[0] == 1300


def test_explain_on_tabular_data_draws_the_features(capsys, tmp_path):
    status, out, _ = run(capsys, "explain", "--dataset", "diabetes", "--model", "linear",
                         "--epochs", "3", "--output", "logit", "--no-progress",
                         "--out", str(tmp_path))
    assert status == 0
    assert "integrated gradients of the prediction" in out
    assert "drop of test r2" in out
    assert json.loads((tmp_path / "explain.json").read_text())["completeness"][
        "max_relative_error"] < 1e-9  # a linear model: the path integral is exact
    assert png_size(tmp_path / "features.png") == (900, 400)


# ----------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("argv, message", [
    (["compare", "--optimizers", "adam,sgdd"],
     "unknown optimizer 'sgdd'; known optimizers: " + ", ".join(sorted(OPTIMIZERS))),
    (["lr-find", "--optimizer", "nosuch"], "unknown optimizer 'nosuch'"),
    (["lr-find", "--optimizer", "sgd:0.1"], "lr-find scans the learning rate itself"),
    (["tune", "--optimizers", "sgd,nosuch"], "unknown optimizer 'nosuch'"),
    (["compare", "--optimizers", "sgd:fast"], "bad learning rate in optimizer spec 'sgd:fast'"),
    (["compare", "--optimizers", "sgd,sgd"], "lists a spec twice"),
    (["compare", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["compare", "--backend", "jax"], "invalid choice: 'jax'"),
    (["compare", "--impl", "cuda"], "invalid choice: 'cuda'"),
    (["compare", "--epochs", "0"], "expected a positive integer, got '0'"),
    (["compare", "--lr", "-1"], "expected a positive finite number"),
    (["tune", "--lrs", "0.1,x"], "expected a positive number, got 'x'"),
    (["tune", "--folds", "1"], "--folds must be at least 2"),
    (["tune", "--optimizers", "sgd:0.1"], "the learning rates to try go in --lrs"),
    (["lr-find", "--start-lr", "1", "--end-lr", "0.1"], "--start-lr (1) must be below --end-lr"),
    (["lr-find", "--steps", "1"], "--steps must be at least 2"),
    (["compare", "--dataset", "synthetic", "--n-classes", "1"], "--n-classes must be at least 2"),
    (["prune", "--sparsities", "0.5,1.5"], "expected a number in (0, 1), got '1.5'"),
    (["prune", "--optimizer", "nosuch"], "unknown optimizer 'nosuch'"),
    (["quantize", "--bits", "8,9"], "expected a bit width in 2..8, got '9'"),
    (["explain", "--output", "margin"], "invalid choice: 'margin'"),
    (["explain", "--dataset", "synthetic", "--n-classes", "1"], "--n-classes must be at least 2"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_flags_exit_2_with_a_clear_message(capsys, tmp_path, argv, message):
    status, out, err = run(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[:1] in (
        ["compare"], ["lr-find"], ["tune"], ["prune"], ["quantize"], ["explain"]) else []))
    assert status == 2
    assert message in err
    assert "usage: optim-core" in err
    assert not (tmp_path / "o").exists()  # nothing written for a bad call


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_backend_without_cupy_exits_2(capsys, tmp_path):
    status, _, err = run(capsys, "compare", "--backend", "cupy", "--out", str(tmp_path / "o"))
    assert status == 2
    assert "--backend cupy needs CuPy, which is not installed" in err


def test_version_flag(capsys):
    from optim_core import __version__

    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"optim-core {__version__}"


# ----------------------------------------------------------------------------- as programs

def _env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "", "PYTHONWARNINGS": "error::DeprecationWarning"}


def test_python_dash_m_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "optim_core", "compare", *SMALL,
                           "--optimizers", "adam:0.01", "--epochs", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "adam:0.01" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loss_curves.png", "results.csv", "results.json"]


def test_python_dash_m_bad_flag_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "optim_core", "compare", "--optimizers",
                           "nosuch"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "unknown optimizer 'nosuch'; known optimizers:" in done.stderr


@pytest.mark.skipif(shutil.which("optim-core") is None, reason="console script not installed")
def test_console_script_is_the_cli(tmp_path):
    done = subprocess.run(["optim-core", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0
    for command in ("compare", "lr-find", "tune", "bench", "article"):
        assert command in done.stdout
