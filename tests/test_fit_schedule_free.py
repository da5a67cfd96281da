"""fit with a schedule-free optimizer: trained at y, evaluated, checkpointed and returned at x.

As the ``schedulefree`` package prescribes, fit calls ``opt.train()`` before each epoch's
steps and ``opt.eval()`` before its evaluation, so what fit reports and keeps is the
averaged point x, never the training point y.
"""

from __future__ import annotations

import numpy as np
import pytest

from optim_core import EarlyStopping, ScheduleFreeAdamW, fit, load_checkpoint, models


def _data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 4))
    y = np.argmax(X @ rng.normal(size=(4, 3)) + 0.5 * rng.normal(size=(60, 3)), axis=1)
    return X[:40], y[:40], X[40:], y[40:]


class Probe:
    """At each epoch's end: the optimizer's mode and the validation loss at the model's
    parameters as they are then."""

    def __init__(self, X_val, y_val):
        self.X_val, self.y_val, self.seen = X_val, y_val, []

    def on_train_begin(self, model, history):
        self.optimizer = history.optimizer

    def on_epoch_end(self, epoch, logs, model):
        self.seen.append((self.optimizer.train_mode, logs["val_loss"],
                          model.loss(self.X_val, self.y_val)))


@pytest.mark.parametrize("name", ["schedulefreeadamw", "schedulefreesgd"])
def test_the_validation_loss_reported_is_the_loss_at_the_eval_point(name):
    X, y, X_val, y_val = _data()
    model = models.SoftmaxRegression(4, 3)
    probe = Probe(X_val, y_val)
    history = fit(model, X, y, optimizer=name, lr=0.05 if name.endswith("adamw") else 0.5,
                  epochs=4, batch_size=8, validation_data=(X_val, y_val), callbacks=[probe],
                  seed=0, progress=False)
    opt = history.optimizer
    # Every epoch ended in eval mode, and its val_loss is the loss there.
    assert [mode for mode, _, _ in probe.seen] == [False] * 4
    for _, reported, at_x in probe.seen:
        assert reported == pytest.approx(at_x, rel=1e-12)
    # The model fit returns is at x: eval() is where the reported loss came from ...
    assert not opt.train_mode
    at_x = model.loss(X_val, y_val)
    assert history.val_loss[-1] == pytest.approx(at_x, rel=1e-12)
    # ... and not the training point y, whose loss differs.
    x = {k: v.copy() for k, v in model.params.items()}
    opt.train()
    assert opt.train_mode
    at_y = model.loss(X_val, y_val)
    assert abs(at_y - at_x) > 1e-6 * abs(at_x)
    opt.eval()
    for key, value in x.items():
        np.testing.assert_allclose(model.params[key], value, rtol=1e-12, atol=1e-15)


def test_checkpoints_hold_x_and_a_resumed_run_is_bit_identical(tmp_path):
    X, y, X_val, y_val = _data(1)

    def run(epochs, path=None, resume=False):
        model = models.MLP([4, 6, 3])
        history = fit(model, X, y, optimizer="schedulefreeadamw", lr=0.02, epochs=epochs,
                      batch_size=8, validation_data=(X_val, y_val),
                      callbacks=[EarlyStopping(patience=10)], seed=3, progress=False,
                      checkpoint=path, resume=resume)
        return model, history

    uninterrupted, history = run(4)
    path = tmp_path / "sf.ckpt"
    run(2, path)
    resumed, resumed_history = run(4, path, resume=True)
    assert resumed_history.val_loss == history.val_loss
    assert resumed_history.train_loss == history.train_loss
    for key in uninterrupted.params:
        np.testing.assert_array_equal(resumed.params[key], uninterrupted.params[key])
    saved = load_checkpoint(path)
    assert saved["optimizer"]["train_mode"] is False  # saved at x, in eval mode
    for key in resumed.params:
        np.testing.assert_array_equal(saved["params"][key], resumed.params[key])


def test_an_instance_left_in_eval_mode_trains_on_in_the_next_fit():
    X, y, X_val, y_val = _data(2)
    model = models.SoftmaxRegression(4, 3)
    model.init_params(X, seed=0)
    opt = ScheduleFreeAdamW(model.params, lr=0.05)
    fit(model, X, y, optimizer=opt, epochs=2, batch_size=8, seed=0, progress=False)
    assert not opt.train_mode
    history = fit(model, X, y, optimizer=opt, epochs=2, batch_size=8,
                  validation_data=(X_val, y_val), seed=0, progress=False)
    assert opt.group_state[0]["step"] == 20 and not opt.train_mode
    assert history.val_loss[-1] == pytest.approx(model.loss(X_val, y_val), rel=1e-12)
