"""The article's FAQ as tools: lr_find, tune and compare, and their result files."""

from __future__ import annotations

import csv
import inspect
import json
import math

import numpy as np
import pytest
from optim_core.models import LinearRegression, SoftmaxRegression

from optim_core import datasets, tools


@pytest.fixture(scope="module")
def regression():
    """Standard normal features, a linear teacher, little noise: GD's stable range is known."""
    return datasets.load("synthetic", task="regression", n_samples=400, n_features=5,
                         noise=0.05, seed=1)


@pytest.fixture(scope="module")
def classification():
    return datasets.load("synthetic", task="classification", n_samples=300, n_features=6,
                         n_classes=3, seed=2)


def _sharpness(X):
    """Largest eigenvalue of the Hessian of the mean squared error, 2 X^T X / n."""
    return float(np.linalg.eigvalsh(2 * X.T @ X / X.shape[0]).max())


# ----------------------------------------------------------------------------- compare

def test_compare_returns_one_row_per_optimizer_in_order(classification):
    d = classification
    result = tools.compare(SoftmaxRegression(6, 3), d.X_train, d.y_train,
                           optimizers=["sgd", {"optimizer": "adam", "lr": 0.05},
                                       {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                                        "label": "momentum"}],
                           epochs=3, batch_size=32, validation_data=(d.X_test, d.y_test))
    assert [row["optimizer"] for row in result.table] == ["sgd", "adam:0.05", "momentum"]
    assert list(result.histories) == ["sgd", "adam:0.05", "momentum"]
    for row, history in zip(result.table, result.histories.values(), strict=True):
        assert row["epochs"] == 3 and len(history.epochs) == 3
        assert row["train_loss"] == history.train_loss[-1]
        assert row["val_accuracy"] == history.val_metric[-1]
        assert row["time_s"] > 0
    assert [row["lr"] for row in result.table] == [1e-3, 0.05, 0.1]  # sgd's default is 1e-3
    assert result.best == max(result.table, key=lambda row: row["val_accuracy"])
    assert result.metric_name == "accuracy"


def test_compare_starts_every_run_from_the_same_parameters_and_batches(classification):
    d = classification
    model = SoftmaxRegression(6, 3)
    model.init_params(d.X_train, seed=7)
    before = {name: p.copy() for name, p in model.params.items()}
    result = tools.compare(model, d.X_train, d.y_train,
                           optimizers=[{"optimizer": "adam", "lr": 0.01, "label": "a"},
                                       {"optimizer": "adam", "lr": 0.01, "label": "b"}],
                           epochs=2, batch_size=16)
    # Identical settings, identical start, identical batch order: identical curves.
    assert result.histories["a"].train_loss == result.histories["b"].train_loss
    # The caller's model is copied, never trained.
    for name, p in model.params.items():
        np.testing.assert_array_equal(p, before[name])


def test_compare_warms_each_run_up_on_a_copy_before_timing_it(classification):
    # Compilation happens in the warm-up, apart from time_s; the timed run is the plain fit.
    from optim_core import fit

    d = classification
    result = tools.compare(SoftmaxRegression(6, 3), d.X_train, d.y_train,
                           optimizers=["sgd", "adam"], epochs=2, batch_size=16, seed=3)
    assert list(result.warmup_s) == ["sgd", "adam"]
    assert all(seconds > 0 for seconds in result.warmup_s.values())
    assert result.to_dict()["warmup_s"] == result.warmup_s
    assert "warm-up" in result.format()
    alone = fit(SoftmaxRegression(6, 3), d.X_train, d.y_train, optimizer="adam", epochs=2,
                batch_size=16, seed=3, progress=False, nonfinite="propagate")
    assert result.histories["adam"].train_loss == alone.train_loss


def test_compare_reports_a_diverging_optimizer_instead_of_failing(regression):
    d = regression
    result = tools.compare(LinearRegression(5), d.X_train, d.y_train,
                           optimizers=[{"optimizer": "sgd", "lr": 0.1},
                                       {"optimizer": "sgd", "lr": 50.0}],
                           epochs=3, batch_size=32, validation_data=(d.X_test, d.y_test))
    good, bad = result.table
    assert good["val_r2"] > 0.95
    assert not bad["train_loss"] < 1e6  # blown up (or NaN): reported, not raised
    assert result.best is good


@pytest.mark.parametrize("optimizers, message", [
    (["adam", "nosuch"],
     r"unknown optimizer 'nosuch'; known: adadelta, (\w+, )*adam, (\w+, )*sgd$"),
    ([{"lr": 0.1}], "'optimizer' key"),
    (["adam", "adam"], "duplicate optimizer labels"),
    ([], "empty"),
])
def test_compare_rejects_bad_optimizer_lists_before_training(classification, optimizers,
                                                             message):
    d = classification
    model = SoftmaxRegression(6, 3)
    with pytest.raises(ValueError, match=message):
        tools.compare(model, d.X_train, d.y_train, optimizers=optimizers, epochs=1)
    assert model.params is None


def test_compare_result_writes_csv_and_json(tmp_path, classification):
    d = classification
    result = tools.compare(SoftmaxRegression(6, 3), d.X_train, d.y_train,
                           optimizers=["sgd", "adam"], epochs=2,
                           validation_data=(d.X_test, d.y_test))
    with result.to_csv(tmp_path / "r.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["optimizer"] for row in rows] == ["sgd", "adam"]
    assert list(rows[0]) == ["optimizer", "lr", "epochs", "train_loss", "train_accuracy",
                             "val_loss", "val_accuracy", "time_s"]
    assert float(rows[1]["val_accuracy"]) == result.table[1]["val_accuracy"]
    data = json.loads(result.to_json(tmp_path / "r.json").read_text())
    assert data["kind"] == "compare" and data["metric"] == "accuracy"
    assert data["best"]["optimizer"] == result.best["optimizer"]
    assert [e["epoch"] for e in data["histories"]["adam"]] == [1, 2]


# ----------------------------------------------------------------------------- lr_find

def test_lr_find_suggests_a_stable_rate_on_least_squares(regression):
    d = regression
    model = LinearRegression(5)
    result = tools.lr_find(model, d.X_train, d.y_train, optimizer="sgd", start_lr=1e-5,
                           end_lr=100.0, num_steps=120, batch_size=32)
    largest_stable = 2 / _sharpness(d.X_train)  # gradient descent diverges above this
    assert largest_stable / 30 < result.suggested_lr < largest_stable
    # The range test ran past the stable range and stopped when the loss blew up.
    assert result.diverged and result.lrs[-1] > largest_stable
    assert len(result.lrs) < 120
    # Geometric spacing from start_lr, the growth set by end_lr over num_steps.
    ratios = np.asarray(result.lrs[1:]) / np.asarray(result.lrs[:-1])
    np.testing.assert_allclose(ratios, (100.0 / 1e-5) ** (1 / 119), rtol=1e-9)
    assert result.lrs[0] == 1e-5
    assert model.params is None  # the caller's model is untouched
    assert result.steepest_lr is not None and result.steepest_lr <= result.lrs[
        int(np.argmin(result.smoothed_losses))]


def test_lr_find_table_and_files(tmp_path, classification):
    d = classification
    result = tools.lr_find(SoftmaxRegression(6, 3), d.X_train, d.y_train, optimizer="adam",
                           num_steps=30, end_lr=1.0)
    assert [row["step"] for row in result.table] == list(range(1, len(result.lrs) + 1))
    assert set(result.table[0]) == {"step", "lr", "loss", "smoothed_loss"}
    # The bias-corrected average starts at the first loss.
    assert result.smoothed_losses[0] == pytest.approx(result.losses[0])
    data = json.loads(result.to_json(tmp_path / "lr.json").read_text())
    assert data["kind"] == "lr_find" and data["suggested_lr"] == result.suggested_lr
    assert len(data["table"]) == len(result.lrs)
    png = result.plot(tmp_path / "lr.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("kwargs, message", [
    (dict(optimizer="nosuch"), "unknown optimizer"),
    (dict(start_lr=1.0, end_lr=0.1), "must be below end_lr"),
    (dict(start_lr=0.0), "start_lr"),
    (dict(num_steps=1), "num_steps"),
    (dict(smoothing=1.0), "smoothing"),
    (dict(diverge_factor=1.0), "diverge_factor"),
    (dict(batch_size=0), "batch_size"),
])
def test_lr_find_rejects_bad_arguments(classification, kwargs, message):
    d = classification
    with pytest.raises(ValueError, match=message):
        tools.lr_find(SoftmaxRegression(6, 3), d.X_train, d.y_train, **kwargs)


# ----------------------------------------------------------------------------- tune

def test_tune_finds_the_known_best_configuration(regression):
    d = regression
    largest_stable = 2 / _sharpness(d.X_train)
    too_small, right, too_large = 1e-4, 0.1, 3 * largest_stable
    result = tools.tune(LinearRegression(5), d.X_train, d.y_train, optimizers=["sgd"],
                        lrs=[too_small, right, too_large], batch_sizes=[16, 300], k=3,
                        epochs=3)
    assert len(result.table) == 6
    assert sorted(row["rank"] for row in result.table) == list(range(1, 7))
    # Small batches take more steps in the same epochs; a tiny rate barely moves.
    assert result.best_config == {"optimizer": "sgd", "lr": right, "batch_size": 16}
    assert result.best["mean_r2"] > 0.95
    diverged = [row for row in result.table if row["lr"] == too_large]
    assert all(not row["mean_r2"] > 0 for row in diverged)  # worse than predicting the mean
    assert {row["rank"] for row in diverged} == {5, 6}  # ranked last


def test_tune_scores_each_fold_on_held_out_data(classification, tmp_path):
    d = classification
    result = tools.tune(SoftmaxRegression(6, 3), d.X_train, d.y_train,
                        optimizers=["sgd", "adam"], lrs=[0.05], batch_sizes=[32], k=4, epochs=2)
    assert [(row["optimizer"], row["lr"], row["batch_size"]) for row in result.table] == [
        ("sgd", 0.05, 32), ("adam", 0.05, 32)]
    assert result.k == 4 and result.metric_name == "accuracy"
    for row in result.table:
        assert 0 <= row["mean_accuracy"] <= 1 and row["std_accuracy"] >= 0
    data = json.loads(result.to_json(tmp_path / "t.json").read_text())
    assert data["kind"] == "tune" and data["best"] == result.best and data["k"] == 4
    assert "best" in result.format()


@pytest.mark.parametrize("kwargs, message", [
    (dict(optimizers=["nosuch"]), "unknown optimizer"),
    (dict(lrs=[]), "non-empty"),
    (dict(lrs=[-0.1]), "learning rates"),
    (dict(batch_sizes=[0]), "batch sizes"),
    (dict(k=1), "k must be"),
])
def test_tune_rejects_bad_grids(classification, kwargs, message):
    d = classification
    with pytest.raises(ValueError, match=message):
        tools.tune(SoftmaxRegression(6, 3), d.X_train, d.y_train, **kwargs)


def test_tune_rejects_an_optimizer_keyword_one_of_its_optimizers_lacks_before_training(
        classification, monkeypatch):
    d = classification
    trained = []
    monkeypatch.setattr(tools.experiments, "_fit", lambda: _recording_fit(trained))
    with pytest.raises(TypeError, match="'adam' of the grid.*momentum"):
        tools.tune(SoftmaxRegression(6, 3), d.X_train, d.y_train, optimizers=["sgd", "adam"],
                   momentum=0.9)
    assert trained == []
    with pytest.raises(ValueError, match="'sgd' of the grid"):
        tools.tune(SoftmaxRegression(6, 3), d.X_train, d.y_train, optimizers=["sgd"],
                   nesterov=True)  # Nesterov needs momentum
    assert trained == []


def _recording_fit(calls):
    from optim_core.train.fit import fit

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return fit(*args, **kwargs)

    recording.__signature__ = inspect.signature(fit)
    return recording


def test_tune_ranks_a_run_that_overflows_to_nan_last(regression):
    d = regression
    result = tools.tune(LinearRegression(5), d.X_train, d.y_train, optimizers=["sgd"],
                        lrs=[1e12, 1e-4], batch_sizes=[16], k=2, epochs=4)
    overflowed, slow = result.table
    assert math.isnan(overflowed["mean_r2"]) and math.isnan(overflowed["mean_val_loss"])
    assert (overflowed["rank"], slow["rank"]) == (2, 1)


def test_kfold_is_a_stratified_partition():
    labels = np.repeat([0, 1, 2], [30, 12, 6])
    folds = tools.experiments._kfold(labels.size, 3, labels, np.random.default_rng(0))
    assert sorted(np.concatenate(folds).tolist()) == list(range(labels.size))
    for fold in folds:
        # Each class splits evenly across the folds.
        assert np.bincount(labels[fold], minlength=3).tolist() == [10, 4, 2]


# ----------------------------------------------------------------------------- writers

def test_writers_make_plain_json_and_aligned_tables(tmp_path):
    rows = [{"name": "a", "value": float("nan"), "n": np.int64(3)},
            {"name": "bb", "value": 0.5, "extra": None}]
    data = json.loads(tools.write_json({"rows": rows}, tmp_path / "x.json").read_text())
    assert data == {"rows": [{"name": "a", "value": None, "n": 3},
                             {"name": "bb", "value": 0.5, "extra": None}]}
    with tools.write_csv(rows, tmp_path / "x.csv").open() as handle:
        assert next(csv.reader(handle)) == ["name", "value", "n", "extra"]
    text = tools.format_table(rows, ["name", "value"]).splitlines()
    assert text[0].split() == ["name", "value"]
    assert text[2].split() == ["a", "nan"] and text[3].split() == ["bb", "0.5000"]
    assert len({len(line) for line in text}) == 1


def test_lr_find_passes_optimizer_options_on(classification):
    d = classification
    plain = tools.lr_find(SoftmaxRegression(6, 3), d.X_train, d.y_train, optimizer="sgd",
                          num_steps=20)
    heavy = tools.lr_find(SoftmaxRegression(6, 3), d.X_train, d.y_train, optimizer="sgd",
                          num_steps=20, momentum=0.9)
    assert plain.losses[:2] == heavy.losses[:2]  # same start, same first batch...
    assert plain.losses[5:] != heavy.losses[5:]  # ...then momentum changes the path
