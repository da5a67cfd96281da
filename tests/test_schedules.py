"""Schedules: values step by step, purity, validation, and torch's schedulers as references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optim_core import fit, models, schedules

BASE = 0.1


def _values(schedule, steps, base=BASE):
    return [schedule(base, t) for t in range(steps)]


def test_constant_is_the_base_rate():
    assert _values(schedules.constant(), 5) == [BASE] * 5


def test_step_decay_multiplies_every_step_size_steps():
    assert _values(schedules.step_decay(3, 0.5), 8) == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_exponential_is_the_articles_alpha_decay():
    # The article multiplies its step size by alpha_decay = 0.9 after every iteration.
    alpha, expected = BASE, []
    for _ in range(20):
        expected.append(alpha)
        alpha *= 0.9
    assert _values(schedules.exponential(0.9), 20) == pytest.approx(expected, rel=1e-14)


def test_cosine_goes_from_base_to_min_and_stays():
    cosine = schedules.cosine(10, min_lr=0.01)
    assert cosine(BASE, 0) == BASE
    assert cosine(BASE, 5) == pytest.approx((BASE + 0.01) / 2)
    assert cosine(BASE, 10) == pytest.approx(0.01)
    assert cosine(BASE, 25) == pytest.approx(0.01)
    values = _values(cosine, 11)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_warmup_ramps_linearly_then_runs_the_inner_schedule_from_its_start():
    inner = schedules.cosine(4)
    schedule = schedules.warmup(inner, 4)
    assert _values(schedule, 4) == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert [schedule(BASE, 4 + t) for t in range(6)] == pytest.approx(_values(inner, 6))


def test_schedules_are_pure_functions_of_the_step():
    schedule = schedules.warmup(schedules.one_cycle(50), 5)
    forward = _values(schedule, 55)
    backward = [schedule(BASE, t) for t in reversed(range(55))][::-1]
    assert forward == backward
    assert schedules.cosine(10) == schedules.cosine(10)  # compared by value
    assert "total_steps=10" in repr(schedules.cosine(10))


def test_one_cycle_uses_the_base_rate_as_peak_unless_given():
    schedule = schedules.one_cycle(100)
    values = _values(schedule, 100)
    assert max(values) == pytest.approx(BASE)
    assert values[0] == pytest.approx(BASE / 25)
    assert values[-1] == pytest.approx(BASE / 25 / 1e4)
    assert schedules.one_cycle(100, max_lr=1.0)(BASE, 29) == pytest.approx(1.0)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize(("total", "pct"), [(100, 0.3), (37, 0.25), (10, 0.5)])
def test_one_cycle_matches_torch(anneal, total, pct):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=total,
                                              pct_start=pct, anneal_strategy=anneal,
                                              cycle_momentum=False)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    schedule = schedules.one_cycle(total, 0.5, pct_start=pct, anneal=anneal)
    assert _values(schedule, total) == pytest.approx(expected, rel=1e-12)


def test_cosine_and_step_decay_match_torch():
    torch = pytest.importorskip("torch")
    for make_ref, ours in [
        (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.001),
         schedules.cosine(20, min_lr=0.001)),
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.3),
         schedules.step_decay(4, 0.3)),
        (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
         schedules.exponential(0.9)),
    ]:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=BASE)
        ref = make_ref(opt)
        expected = []
        for _ in range(21):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        assert _values(ours, 21) == pytest.approx(expected, rel=1e-10)


def test_reduce_on_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    losses = [1.0, 0.9, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85, 0.85, 0.86, 0.7, 0.7, 0.71, 0.72,
              0.73, 0.74, 0.75]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=1, threshold=0.01, cooldown=1, min_lr=0.02)
    ours = schedules.ReduceOnPlateau(0.5, 1, monitor="train_loss", threshold=0.01, cooldown=1,
                                     min_lr=0.02)
    for epoch, loss in enumerate(losses, start=1):
        ref.step(loss)
        ours.on_epoch_end(epoch, {"train_loss": loss}, None)
        assert ours(BASE, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert ours.scale < 1


def test_reduce_on_plateau_state_round_trips():
    plateau = schedules.ReduceOnPlateau(0.5, 0, monitor="train_loss")
    for loss in [1.0, 1.0, 1.0]:
        plateau.on_epoch_end(1, {"train_loss": loss}, None)
    state = plateau.state_dict()
    assert state["scale"] == 0.25
    fresh = schedules.ReduceOnPlateau(0.5, 0, monitor="train_loss")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh(1.0, 100) == 0.25
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state_dict({"scale": 1.0})
    with pytest.raises(ValueError, match="does not log"):
        schedules.ReduceOnPlateau().on_epoch_end(1, {"train_loss": 1.0, "val_loss": None}, None)


def test_reduce_on_plateau_in_fit_lowers_the_rate_on_a_plateau():
    X = np.zeros((8, 2))  # no signal: the loss cannot improve after the first epoch
    y = np.ones(8)
    plateau = schedules.ReduceOnPlateau(0.5, 1, monitor="train_loss", threshold=0.5)
    history = fit(models.LinearRegression(2), X, y, optimizer="sgd", lr=0.01, epochs=6,
                  schedule=plateau, seed=0, progress=False)
    assert history.lr[0] == 0.01
    assert history.lr[-1] < 0.01
    assert plateau.scale < 1


def test_fit_sets_the_scheduled_rate_before_every_step():
    X = np.random.default_rng(0).normal(size=(10, 2))
    y = X @ np.array([1.0, -1.0])
    schedule = schedules.warmup(schedules.exponential(0.8), 3)
    history = fit(models.LinearRegression(2), X, y, optimizer="sgd", lr=0.05, epochs=4,
                  batch_size=4, schedule=schedule, seed=0, progress=False)
    # 3 steps per epoch; the logged rate is that of the epoch's last step.
    assert history.lr == pytest.approx([schedule(0.05, 3 * e - 1) for e in range(1, 5)])
    assert history.optimizer.group_state[0]["step"] == 12


@pytest.mark.parametrize(("call", "error"), [
    (lambda: schedules.step_decay(0), ValueError),
    (lambda: schedules.step_decay(2, 1.5), ValueError),
    (lambda: schedules.exponential(-0.1), ValueError),
    (lambda: schedules.cosine(0), ValueError),
    (lambda: schedules.cosine(10, min_lr=math.nan), ValueError),
    (lambda: schedules.warmup(0.1, 5), TypeError),
    (lambda: schedules.warmup(schedules.constant(), 0), ValueError),
    (lambda: schedules.one_cycle(100, pct_start=1.0), ValueError),
    (lambda: schedules.one_cycle(2, pct_start=0.3), ValueError),
    (lambda: schedules.one_cycle(100, anneal="exp"), ValueError),
    (lambda: schedules.ReduceOnPlateau(factor=1.0), ValueError),
    (lambda: schedules.ReduceOnPlateau(patience=-1), ValueError),
    (lambda: schedules.constant()(0.1, -1), ValueError),
])
def test_bad_arguments_raise(call, error):
    with pytest.raises(error):
        call()


def test_schedules_are_listed_by_name():
    assert set(schedules.SCHEDULES) >= {"constant", "step", "exponential", "cosine", "warmup",
                                        "one_cycle", "reduce_on_plateau"}
    assert schedules.SCHEDULES["cosine"](10) == schedules.cosine(10)
