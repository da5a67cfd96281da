"""fit: the issue's accuracy targets, exact agreement with hand-written loops, determinism,
callbacks, early stopping, and validation before anything changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from optim_db import OPTIM_DB

from optim_core import SGD, Adam, EarlyStopping, History, fit, models, schedules
from optim_core.train.fit import OPTIMIZERS, epoch_order


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def digits():
    """Digits as the issue specifies: 75/25 stratified split, pixels / 16."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    data = datasets.load_digits()
    return model_selection.train_test_split(data.data / 16.0, data.target, test_size=0.25,
                                            stratify=data.target, random_state=0)


@pytest.fixture(scope="module")
def diabetes():
    """Diabetes with features standardized by the training split's statistics."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    data = datasets.load_diabetes()
    X_train, X_test, y_train, y_test = model_selection.train_test_split(
        data.data, data.target, test_size=0.25, random_state=0)
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    return (X_train - mean) / std, (X_test - mean) / std, y_train, y_test


def _regression(n=30, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ rng.normal(size=d) + 0.3 + 0.1 * rng.normal(size=n)


def _classification(n=60, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, np.argmax(X @ rng.normal(size=(d, k)), axis=1)


# --------------------------------------------------------------------------- targets
def test_digits_softmax_regression_with_adam_reaches_95_percent(digits):
    X_train, X_test, y_train, y_test = digits
    model = models.SoftmaxRegression(64, 10)
    history = fit(model, X_train, y_train, optimizer="adam", lr=0.05, epochs=15,
                  batch_size=128, seed=0, progress=False)
    assert model.score(X_test, y_test) >= 0.95
    assert history.train_loss[-1] < history.train_loss[0]


def test_digits_mlp_64_128_10_reaches_96_5_percent(digits):
    X_train, X_test, y_train, y_test = digits
    model = models.MLP([64, 128, 10])
    fit(model, X_train, y_train, optimizer="adam", lr=5e-3, epochs=15, batch_size=128, seed=0,
        progress=False)
    assert model.score(X_test, y_test) >= 0.965


def test_diabetes_linear_regression_with_adam_reaches_least_squares(diabetes):
    X_train, X_test, y_train, y_test = diabetes
    design = np.column_stack([X_train, np.ones(len(X_train))])
    coef = np.linalg.lstsq(design, y_train, rcond=None)[0]
    least_squares_mse = np.mean((X_test @ coef[:-1] + coef[-1] - y_test) ** 2)
    model = models.LinearRegression(10)
    fit(model, X_train, y_train, optimizer="adam", lr=5.0, epochs=300,
        schedule=schedules.cosine(300), seed=0, progress=False)
    mse = np.mean((model.predict(X_test) - y_test) ** 2)
    assert mse <= 1.02 * least_squares_mse


# --------------------------------------------------------------------------- exactness
def test_full_batch_gd_is_the_textbook_loop():
    X, y = _regression()
    model = models.LinearRegression(3)
    fit(model, X, y, optimizer="gd", lr=0.1, epochs=25, seed=0, progress=False)
    W, b = np.zeros(3), 0.0
    for _ in range(25):
        residual = X @ W + b - y
        W, b = W - 0.1 * 2 * X.T @ residual / len(y), b - 0.1 * 2 * residual.mean()
    np.testing.assert_allclose(model.params["W"], W, rtol=1e-12)
    assert float(model.params["b"]) == pytest.approx(b, rel=1e-12)


def _sgd_momentum_by_hand(X, y, orders, batch_size, lr=0.05, momentum=0.9):
    W, b = np.zeros(X.shape[1]), 0.0
    buf_W = buf_b = None
    for order in orders:
        for start in range(0, len(y), batch_size):
            index = order[start:start + batch_size]
            residual = X[index] @ W + b - y[index]
            g_W, g_b = 2 * X[index].T @ residual / len(index), 2 * residual.mean()
            buf_W = g_W if buf_W is None else momentum * buf_W + g_W
            buf_b = g_b if buf_b is None else momentum * buf_b + g_b
            W, b = W - lr * buf_W, b - lr * buf_b
    return W, b


def test_minibatches_in_order_average_each_batch_including_the_short_last_one():
    X, y = _regression(n=30)
    model = models.LinearRegression(3)
    history = fit(model, X, y, optimizer="sgd", lr=0.05, momentum=0.9, epochs=3,
                  batch_size=7, shuffle=False, seed=0, progress=False)
    W, b = _sgd_momentum_by_hand(X, y, [np.arange(30)] * 3, 7)
    np.testing.assert_allclose(model.params["W"], W, rtol=1e-12)
    assert float(model.params["b"]) == pytest.approx(b, rel=1e-12)
    assert history.steps == 3 * 5


def test_shuffled_minibatches_follow_epoch_order():
    X, y = _regression(n=30)
    model = models.LinearRegression(3)
    fit(model, X, y, optimizer="sgd", lr=0.05, momentum=0.9, epochs=3, batch_size=8, seed=42,
        progress=False)
    orders = [epoch_order(42, epoch, 30) for epoch in (1, 2, 3)]
    assert not np.array_equal(orders[0], orders[1])
    W, b = _sgd_momentum_by_hand(X, y, orders, 8)
    np.testing.assert_allclose(model.params["W"], W, rtol=1e-12)
    assert float(model.params["b"]) == pytest.approx(b, rel=1e-12)


def test_train_loss_is_the_mean_over_the_epochs_samples():
    X, y = _regression(n=12)
    model = models.LinearRegression(3)
    history = fit(model, X, y, optimizer="gd", lr=0.0, epochs=1, batch_size=5, seed=0,
                  progress=False)
    assert history.train_loss[0] == pytest.approx(np.mean((y - 0.0) ** 2), rel=1e-12)


# --------------------------------------------------------------------------- determinism
def _run(seed, xp=None, **kwargs):
    X, y = _classification()
    if xp is not None:
        X, y = xp.asarray(X), xp.asarray(y, dtype="int64")
    model = models.MLP([4, 16, 3], dropout=0.25)
    history = fit(model, X, y, lr=0.01, epochs=4, batch_size=16, seed=seed, progress=False,
                  validation_data=(X, y), **kwargs)
    return model, history


def _numbers(history):
    return [{k: v for k, v in e.items() if k != "time"} for e in history.epochs]


def test_same_seed_same_run_different_seed_different_run():
    a, history_a = _run(5)
    b, history_b = _run(5)
    c, history_c = _run(6)
    assert _numbers(history_a) == _numbers(history_b)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert _numbers(history_a) != _numbers(history_c)


def test_a_run_without_seed_records_one_that_repeats_it():
    model, history = _run(None)
    assert isinstance(history.seed, int)
    again, history_again = _run(history.seed)
    assert _numbers(history) == _numbers(history_again)


def test_every_namespace_trains_the_same_numbers(xp):
    reference, reference_history = _run(9)
    model, history = _run(9, xp)
    for name, param in model.params.items():
        assert type(param) is type(xp.asarray([0.0]))
        np.testing.assert_allclose(xp.to_numpy(param), reference.params[name], rtol=1e-9,
                                   atol=1e-12)
    for ours, theirs in zip(history.epochs, reference_history.epochs, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-9)
        assert ours["val_metric"] == theirs["val_metric"]


# --------------------------------------------------------------------------- optimizers
def test_every_optimizer_name_trains():
    X, y = _regression()
    assert set(OPTIMIZERS) == {info.cli_name for info in OPTIM_DB}
    for name in OPTIMIZERS:
        model = models.LinearRegression(3)
        history = fit(model, X, y, optimizer=name.upper(), epochs=3, seed=0, progress=False)
        assert type(history.optimizer) is OPTIMIZERS[name]
        assert history.train_loss[-1] < history.train_loss[0], name


def test_lr_none_keeps_the_optimizers_default_and_kwargs_reach_it():
    X, y = _regression()
    history = fit(models.LinearRegression(3), X, y, epochs=1, seed=0, progress=False)
    assert history.lr == [1e-3]
    history = fit(models.LinearRegression(3), X, y, optimizer="sgd", lr=0.2, momentum=0.5,
                  nesterov=True, impl="generic", epochs=1, seed=0, progress=False)
    group = history.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.2, 0.5, True)


def test_an_optimizer_instance_continues_across_fits():
    X, y = _regression()
    split = models.LinearRegression(3)
    split.init_params(X, seed=0)
    optimizer = Adam(split.params, lr=0.05)
    fit(split, X, y, optimizer=optimizer, epochs=2, batch_size=10, seed=1, progress=False)
    fit(split, X, y, optimizer=optimizer, epochs=2, batch_size=10, seed=1, progress=False)
    assert optimizer.group_state[0]["step"] == 12

    whole = models.LinearRegression(3)
    fit(whole, X, y, optimizer="adam", lr=0.05, epochs=2, batch_size=10, seed=1,
        progress=False)
    fit(whole, X, y, optimizer=Adam(whole.params, lr=0.05), epochs=2, batch_size=10, seed=1,
        progress=False)
    # Two fresh Adams differ from one Adam carried on: the instance kept its moments.
    assert not np.array_equal(split.params["W"], whole.params["W"])


def test_flat_optimizers_train_the_same_numbers():
    X, y = _classification()
    runs = []
    for flat in (False, True):
        model = models.MLP([4, 8, 3], dropout=0.1)
        history = fit(model, X, y, lr=0.01, epochs=3, batch_size=16, l1=1e-3,
                      weight_decay=1e-2, seed=0, progress=False, flat=flat)
        # The model holds the arrays the optimizer steps (with flat=True, buffer views).
        assert all(history.optimizer.params[k] is model.params[k] for k in model.params)
        runs.append((model.params["W0"].copy(), history.train_loss))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    model = models.MLP([4, 8, 3])
    model.init_params(X, seed=0)
    optimizer = Adam(model.params, lr=0.01, flat=True)  # copies the parameters once
    fit(model, X, y, optimizer=optimizer, epochs=2, batch_size=16, seed=0, progress=False)
    assert optimizer.params["W0"] is model.params["W0"]


def test_an_optimizer_instance_must_be_built_on_the_models_params():
    X, y = _regression()
    model = models.LinearRegression(3)
    model.init_params(X)
    with pytest.raises(ValueError, match="built on model.params"):
        fit(model, X, y, optimizer=SGD({"W": np.ones(3), "b": np.array(0.0)}), epochs=1,
            progress=False)
    with pytest.raises(TypeError, match="instance"):
        fit(model, X, y, optimizer=SGD(model.params), momentum=0.9, epochs=1, progress=False)
    with pytest.raises(ValueError, match="weight decay"):
        fit(model, X, y, optimizer=SGD(model.params), weight_decay=0.1, epochs=1,
            progress=False)


# --------------------------------------------------------------------------- history
def test_history_records_every_epoch():
    X, y = _classification()
    model = models.SoftmaxRegression(4, 3)
    history = fit(model, X[:40], y[:40], lr=0.1, epochs=3, batch_size=16,
                  validation_data=(X[40:], y[40:]), seed=0, progress=False)
    assert isinstance(history, History) and len(history) == 3
    assert history.metric_name == "accuracy"
    assert [e["epoch"] for e in history.to_dicts()] == [1, 2, 3] == history.epoch
    assert set(history.epochs[0]) == {"epoch", "train_loss", "train_metric", "val_loss",
                                      "val_metric", "lr", "time"}
    assert history.val_loss[-1] == pytest.approx(model.loss(X[40:], y[40:]))
    assert history.val_metric[-1] == model.score(X[40:], y[40:])
    assert 0 <= history.train_metric[-1] <= 1
    # Epoch times are reported, never asserted (a loaded machine must not fail a test).
    assert len(history.time) == 3 and history.lr == [0.1] * 3
    print(f"epoch times: {[f'{t:.4f}' for t in history.time]} s")
    assert history.best_epoch == 1 + int(np.argmin(history.val_loss))
    assert not history.stopped_early and history.steps == 9
    assert "3 epochs" in repr(history)
    copy = history.to_dicts()
    copy[0]["train_loss"] = None
    assert history.train_loss[0] is not None


def test_train_metric_comes_from_the_batches_trained_on():
    X, y = _classification()
    frozen = models.SoftmaxRegression(4, 3)
    frozen.init_params(X, seed=0)
    frozen.params["W"][...] = np.random.default_rng(1).normal(size=(4, 3))
    # lr=0: the parameters never move, so the running accuracy is the accuracy.
    history = fit(frozen, X, y, optimizer="sgd", lr=0.0, epochs=1, batch_size=7, seed=0,
                  progress=False)
    assert history.train_metric == [frozen.score(X, y)]
    assert history.train_loss[0] == pytest.approx(frozen.loss(X, y), rel=1e-12)
    Xr, yr = _regression(n=23)
    regression = models.LinearRegression(3)
    history = fit(regression, Xr, yr, optimizer="adam", lr=0.05, epochs=3, batch_size=5,
                  validation_data=(Xr[:9], yr[:9]), seed=0, progress=False)
    # R^2 of the residuals trained on: 1 - mean squared residual / variance of y.
    expected = [1 - loss / np.var(yr) for loss in history.train_loss]
    assert history.train_metric == pytest.approx(expected, rel=1e-12)
    assert history.val_metric[-1] == pytest.approx(regression.score(Xr[:9], yr[:9]), rel=1e-12)
    assert history.val_loss[-1] == pytest.approx(regression.loss(Xr[:9], yr[:9]), rel=1e-12)


def test_without_validation_data_val_entries_are_none_and_best_uses_train_loss():
    X, y = _regression()
    history = fit(models.LinearRegression(3), X, y, optimizer="gd", lr=0.1, epochs=4, seed=0,
                  progress=False)
    assert history.val_loss == [None] * 4 and history.val_metric == [None] * 4
    assert history.best_epoch == 4


def test_epochs_zero_trains_nothing():
    X, y = _regression()
    model = models.LinearRegression(3)
    history = fit(model, X, y, epochs=0, seed=0, progress=False)
    assert len(history) == 0 and history.best_epoch is None
    assert not np.any(model.params["W"])


def test_progress_bar_goes_to_stderr(capsys):
    X, y = _regression()
    fit(models.LinearRegression(3), X, y, epochs=2, seed=0, progress=True)
    assert "2/2" in capsys.readouterr().err
    fit(models.LinearRegression(3), X, y, epochs=2, seed=0, progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- callbacks
class Recorder:
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_begin(self, model, history):
        self.calls.append("begin")

    def on_epoch_end(self, epoch, logs, model):
        self.calls.append(epoch)
        return epoch == self.stop_at

    def on_train_end(self, model, history):
        self.calls.append("end")


def test_callbacks_are_called_and_can_stop_training():
    X, y = _regression()
    recorder, silent = Recorder(stop_at=2), object()
    history = fit(models.LinearRegression(3), X, y, epochs=5, callbacks=[recorder, silent],
                  seed=0, progress=False)
    assert recorder.calls == ["begin", 1, 2, "end"]
    assert history.stopped_early and len(history) == 2


def test_early_stopping_stops_and_restores_the_best_parameters():
    X, y = _classification(k=2)
    X_val, y_val = X, 1 - y  # every step that helps training hurts validation
    model = models.LogisticRegression(4)
    stopper = EarlyStopping(patience=3)
    history = fit(model, X, y, optimizer="sgd", lr=0.5, epochs=50, batch_size=20,
                  validation_data=(X_val, y_val), callbacks=[stopper], seed=0, progress=False)
    assert history.stopped_early and len(history) == 4
    assert history.best_epoch == stopper.best_epoch == 1
    assert history.val_loss[1] > history.val_loss[0]
    assert model.loss(X_val, y_val) == pytest.approx(history.val_loss[0], rel=1e-12)
    assert history.optimizer.params["W"] is model.params["W"]


def test_early_stopping_on_a_metric_maximizes_and_min_delta_counts():
    X, y = _classification()
    stopper = EarlyStopping(monitor="train_metric", patience=2, min_delta=0.5,
                            restore_best=False)
    assert stopper.mode == "max"
    history = fit(models.SoftmaxRegression(4, 3), X, y, lr=0.1, epochs=10, callbacks=[stopper],
                  seed=0, progress=False)
    # No accuracy can improve by more than 0.5 twice in a row after the first epoch.
    assert len(history) == 3 and history.stopped_early and stopper.best_epoch == 1


# --------------------------------------------------------------------------- validation
X_OK, Y_OK = _regression()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"optimizer": "adamm"}, ValueError, "known: gd, sgd"),
    ({"optimizer": 3}, TypeError, "optimizer"),
    ({"epochs": -1}, ValueError, "epochs"),
    ({"epochs": 2.5}, ValueError, "epochs"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"l1": -1.0}, ValueError, "l1"),
    ({"l2": math.inf}, ValueError, "l2"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"clip_norm": 0.0}, ValueError, "clip_norm"),
    ({"clip_value": -1.0}, ValueError, "clip_value"),
    ({"schedule": 0.1}, TypeError, "schedule"),
    ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
    ({"shuffle": 1}, TypeError, "shuffle"),
    ({"callbacks": [EarlyStopping()]}, ValueError, "validation_data"),
    ({"callbacks": [EarlyStopping(monitor="val_acc")]}, ValueError, "val_acc"),
    ({"schedule": schedules.ReduceOnPlateau()}, ValueError, "validation_data"),
    ({"callbacks": [schedules.ReduceOnPlateau(monitor="train_loss")]}, ValueError,
     "schedule="),
    ({"validation_data": (X_OK,)}, ValueError, "pair"),
    ({"validation_data": (X_OK[:, :2], Y_OK)}, ValueError, "features"),
    ({"dampening": 2.0}, ValueError, "dampening"),
    ({"nesterov": True}, ValueError, "nesterov"),
    ({"betas": (0.9,)}, TypeError, "betas"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, error, message):
    model = models.LinearRegression(3)
    with pytest.raises(error, match=message):
        fit(model, X_OK, Y_OK, **{"optimizer": "sgd", "progress": False, **kwargs})
    assert model.params is None


def test_bad_data_raises():
    model = models.LinearRegression(3)
    with pytest.raises(ValueError, match="samples"):
        fit(model, X_OK, Y_OK[:-1], progress=False)
    with pytest.raises(ValueError, match="features"):
        fit(model, X_OK[:, :2], Y_OK, progress=False)
    with pytest.raises(TypeError, match="Model"):
        fit(object(), X_OK, Y_OK, progress=False)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError):
        fit(model, torch.asarray(X_OK), Y_OK, progress=False)
    assert model.params is None


def test_nonfinite_gradients_raise_with_epoch_and_step():
    X, y = _regression()
    X = X.copy()
    X[17, 1] = np.nan  # in the second batch of size 10, unshuffled
    model = models.LinearRegression(3)
    with pytest.raises(ValueError, match=r"epoch 1, step 2: non-finite gradient"):
        fit(model, X, y, batch_size=10, shuffle=False, seed=0, progress=False)
    skipping = models.LinearRegression(3)
    history = fit(skipping, X, y, batch_size=10, shuffle=False, epochs=2, nonfinite="skip",
                  seed=0, progress=False)
    assert history.optimizer.skipped_steps == 2
    assert np.all(np.isfinite(skipping.params["W"]))


# --------------------------------------------------------------------------- checkpoints
class Interrupt(Exception):
    pass


class InterruptAt:
    """Simulates a crash at the end of an epoch (before that epoch's checkpoint)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs, model):
        if epoch == self.epoch:
            raise Interrupt


def _checkpointed_run(path=None, epochs=6, extra_callbacks=(), convert=None, **kwargs):
    X, y = _classification(n=50, seed=3)
    if convert is not None:
        X, y = convert(X), convert(y)
    model = models.MLP([4, 12, 3], dropout=0.2)
    plateau = schedules.ReduceOnPlateau(0.5, 0, monitor="val_loss", threshold=0.2,
                                        schedule=schedules.warmup(schedules.cosine(40), 4))
    stopper = EarlyStopping(patience=20)
    history = fit(model, X[:40], y[:40], optimizer="adam", lr=0.02, epochs=epochs,
                  batch_size=16, validation_data=(X[40:], y[40:]), schedule=plateau,
                  callbacks=[stopper, *extra_callbacks], l1=1e-4, weight_decay=1e-3,
                  clip_norm=2.0, seed=21, progress=False, checkpoint=path, **kwargs)
    return model, history, plateau, stopper


def _same_run(a, b):
    (model_a, history_a, plateau_a, stopper_a), (model_b, history_b, plateau_b, stopper_b) = a, b
    assert _numbers(history_a) == _numbers(history_b)
    for name in model_a.params:
        assert np.array_equal(np.asarray(model_a.params[name]), np.asarray(model_b.params[name]))
    state_a, state_b = history_a.optimizer.state_dict(), history_b.optimizer.state_dict()
    assert state_a["group_state"] == state_b["group_state"]
    for saved_a, saved_b in zip(state_a["state"], state_b["state"], strict=True):
        assert all(np.array_equal(saved_a[k], saved_b[k]) for k in saved_a)
    assert plateau_a.state_dict() == plateau_b.state_dict()
    assert (stopper_a.best, stopper_a.best_epoch) == (stopper_b.best, stopper_b.best_epoch)
    assert history_a.steps == history_b.steps


def test_resuming_after_a_crash_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    path = tmp_path / "run.ckpt"
    uninterrupted = _checkpointed_run()
    assert uninterrupted[2].scale < 1  # the plateau schedule acted: its state matters
    with pytest.raises(Interrupt):
        _checkpointed_run(path, extra_callbacks=[InterruptAt(5)], checkpoint_every=2)
    assert path.exists()  # saved after epoch 4
    resumed = _checkpointed_run(path, resume=True, checkpoint_every=2)
    _same_run(uninterrupted, resumed)


def test_resume_can_train_further_and_repeating_a_finished_run_changes_nothing(tmp_path):
    path = tmp_path / "run.ckpt"
    uninterrupted = _checkpointed_run(epochs=6)
    _checkpointed_run(path, epochs=3)
    extended = _checkpointed_run(path, epochs=6, resume=True)
    _same_run(uninterrupted, extended)
    repeated = _checkpointed_run(path, epochs=6, resume=True)
    _same_run(uninterrupted, repeated)


def test_resume_on_torch_is_bit_identical_too(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "run.ckpt"
    uninterrupted = _checkpointed_run(convert=torch.asarray, epochs=4)
    with pytest.raises(Interrupt):
        _checkpointed_run(path, convert=torch.asarray, epochs=4,
                          extra_callbacks=[InterruptAt(3)])
    resumed = _checkpointed_run(path, convert=torch.asarray, epochs=4, resume=True)
    assert isinstance(resumed[0].params["W0"], torch.Tensor)
    _same_run(uninterrupted, resumed)


def test_resume_without_a_file_starts_afresh(tmp_path):
    path = tmp_path / "new.ckpt"
    fresh = _checkpointed_run(path, epochs=2, resume=True)
    assert path.exists()
    _same_run(_checkpointed_run(epochs=2), fresh)


def test_resume_refuses_a_different_run(tmp_path):
    X, y = _regression()
    path = tmp_path / "run.ckpt"
    fit(models.LinearRegression(3), X, y, epochs=2, batch_size=10, seed=1, checkpoint=path,
        progress=False)
    for kwargs, message in [({"batch_size": 5}, "batch_size"), ({"l2": 0.1}, "l2"),
                            ({"optimizer": "sgd"}, "optimizer"), ({"seed": 2}, "seed"),
                            ({"callbacks": [EarlyStopping(monitor="train_loss")]}, "callbacks")]:
        model = models.LinearRegression(3)
        arguments = {"epochs": 4, "batch_size": 10, "checkpoint": path, "resume": True,
                     "progress": False, **kwargs}
        with pytest.raises(ValueError, match=message):
            fit(model, X, y, **arguments)
        assert model.params is None
    with pytest.raises(ValueError, match="does not exist"):
        fit(models.LinearRegression(3), X, y, checkpoint=tmp_path / "no" / "run.ckpt",
            progress=False)
    with pytest.raises(ValueError, match="checkpoint path"):
        fit(models.LinearRegression(3), X, y, resume=True, progress=False)


def test_everything_stays_on_the_datas_device(tmp_path):
    # array_api_strict refuses any operation mixing devices, so a parameter, batch, mask or
    # state created on the default device instead of the data's would raise here.
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    X, y = _classification()
    X, y = xp.asarray(X, device=device), xp.asarray(y, device=device)
    arguments = dict(lr=0.01, epochs=3, batch_size=16, validation_data=(X, y), l1=1e-3,
                     weight_decay=0.1, clip_norm=1.0, clip_value=3.0, l2=1e-3,
                     schedule=schedules.cosine(10), seed=0, progress=False,
                     checkpoint=tmp_path / "run.ckpt")
    model = models.MLP([4, 8, 3], dropout=0.2)
    fit(model, X, y, callbacks=[EarlyStopping(patience=1)], **arguments)
    assert all(p.device == device for p in model.params.values())
    assert model.predict(X).device == device
    resumed = models.MLP([4, 8, 3], dropout=0.2)
    fit(resumed, X, y, callbacks=[EarlyStopping(patience=1)], resume=True,
        **{**arguments, "epochs": 5})
    assert all(p.device == device for p in resumed.params.values())


def _corrupt_params(tree):
    tree["params"]["W"] = tree["params"]["W"][:1]  # (1,): would broadcast into (3,)


def _corrupt_optimizer_state(tree):
    state = tree["optimizer"]["state"][0]
    state["exp_avg"] = state["exp_avg"][:1]


def _corrupt_callback_state(tree):
    del tree["hooks"][0]["wait"]


def _same_tree(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_tree(a[k], b[k])
                                                                  for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, z) for x, z in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("corrupt", [_corrupt_params, _corrupt_optimizer_state,
                                     _corrupt_callback_state])
def test_resume_checks_the_whole_checkpoint_before_changing_anything(tmp_path, corrupt):
    from optim_core import load_checkpoint, save_checkpoint

    X, y = _regression()
    path = tmp_path / "run.ckpt"

    def run(model, optimizer, stopper, epochs=4, **kwargs):
        return fit(model, X, y, optimizer=optimizer, epochs=epochs, batch_size=10, seed=1,
                   checkpoint=path, callbacks=[stopper], progress=False, **kwargs)

    saved_model = models.LinearRegression(3)
    saved_model.init_params(X, seed=0)
    run(saved_model, Adam(saved_model.params, lr=0.05),
        EarlyStopping(monitor="train_loss", patience=5), epochs=2)
    tree = load_checkpoint(path)
    corrupt(tree)
    save_checkpoint(path, tree)

    # A model, optimizer and callback with state of their own, which must survive.
    model = models.LinearRegression(3)
    model.init_params(X, seed=3)
    optimizer = Adam(model.params, lr=0.05)
    optimizer.step({"W": np.ones(3), "b": np.array(0.5)})
    stopper = EarlyStopping(monitor="train_loss", patience=5)
    stopper.on_epoch_end(1, {"train_loss": 2.0}, model)
    params = {name: p.copy() for name, p in model.params.items()}
    arrays = dict(model.params)
    optimizer_state, stopper_state = optimizer.state_dict(), stopper.state_dict()
    with pytest.raises(ValueError):
        run(model, optimizer, stopper, resume=True)
    assert all(model.params[name] is arrays[name] for name in arrays)
    assert all(np.array_equal(model.params[name], params[name]) for name in params)
    assert _same_tree(optimizer.state_dict(), optimizer_state)
    assert _same_tree(stopper.state_dict(), stopper_state)
    if corrupt is _corrupt_params:
        fresh = models.LinearRegression(3)
        with pytest.raises(ValueError, match=r"parameter 'W' has shape \(1,\)"):
            fit(fresh, X, y, optimizer="adam", epochs=4, batch_size=10, seed=1,
                checkpoint=path, resume=True, progress=False,
                callbacks=[EarlyStopping(monitor="train_loss", patience=5)])
        assert fresh.params is None
