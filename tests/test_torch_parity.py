"""Trajectories match torch.optim step for step (float64), where torch is installed."""

from __future__ import annotations

import numpy as np
import pytest
from optim_db import BY_NAME, case_id, reference_cases
from reference import quadratic_gradient

import optim_core

torch = pytest.importorskip("torch")

STEPS = 15
# Optimizers without a torch counterpart (DGD, Lion) are checked against the reference only.
# cautious=True (Liang et al. 2024) is no torch.optim option: the reference checks it.
CASES = [c for c in reference_cases() if BY_NAME[c[0]].torch_name is not None
         and not c[2].get("cautious")]


@pytest.fixture(autouse=True)
def float64_torch_scalars():
    # torch keeps step counters and NAdam's mu_product in the default dtype; float64
    # makes its scalars exact like ours.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _pair(name: str, hyper: dict, start: list[np.ndarray]):
    """Ours (generic) and torch.optim's optimizer over copies of ``start``."""
    ours = [p.copy() for p in start]
    opt = getattr(optim_core, name)(ours, **hyper, impl="generic")
    theirs = [torch.tensor(p, requires_grad=True) for p in start]
    torch_opt = getattr(torch.optim, BY_NAME[name].torch_name)(theirs, **hyper,
                                                                   foreach=False)
    return ours, opt, theirs, torch_opt


def _step_both(ours, opt, theirs, torch_opt, step: int) -> None:
    grads = [quadratic_gradient(p, step) for p in ours]
    opt.step(grads)
    for t, g in zip(theirs, grads):
        t.grad = torch.tensor(g)
    torch_opt.step()


def _assert_same(name, hyper, step, ours, opt, theirs, torch_opt) -> None:
    for i, (mine, t) in enumerate(zip(ours, theirs)):
        where = f"{name} {hyper}: step {step + 1}, param {i}"
        np.testing.assert_allclose(mine, t.detach().numpy(), rtol=1e-12, atol=1e-15,
                                   err_msg=where)
        # Our state buffers carry torch's names (exp_avg, momentum_buffer, ax, prev, ...).
        torch_state = torch_opt.state[t]
        for key, value in opt.state[0][i].items():
            if key in torch_state:
                np.testing.assert_allclose(value, torch_state[key].numpy(), rtol=1e-12,
                                           atol=1e-15, err_msg=f"{where}, state {key!r}")


@pytest.mark.parametrize("name, reference, hyper", CASES,
                         ids=[case_id(n, h, '-default') for n, _, h in CASES])
def test_trajectory_matches_torch_optim(name, reference, hyper):
    rng = np.random.default_rng(7)
    # A 0-d and an empty tensor among them: torch.optim steps both.
    shapes = [(4, 3), (6,), (), (0,)]
    pair = _pair(name, hyper, [rng.standard_normal(s) for s in shapes])
    for step in range(STEPS):
        _step_both(*pair, step)
        _assert_same(name, hyper, step, *pair)


FIRST_CASES = {name: hyper for name, _, hyper in reversed(CASES)}


@pytest.mark.parametrize("name", sorted(FIRST_CASES))
def test_a_learning_rate_written_between_steps_acts_as_in_torch(name):
    # Some optimizers carry lr-derived values from one step to the next (ASGD's eta):
    # a schedule's write must take effect when torch's does.
    hyper = FIRST_CASES[name]
    rng = np.random.default_rng(3)
    pair = _pair(name, hyper, [rng.standard_normal(s) for s in [(3, 2), ()]])
    ours, opt, theirs, torch_opt = pair
    lr = opt.param_groups[0]["lr"]
    for step in range(8):
        if step in (3, 5):
            lr *= 0.5 if step == 3 else 3.0
            opt.param_groups[0]["lr"] = lr
            torch_opt.param_groups[0]["lr"] = lr
        _step_both(*pair, step)
        _assert_same(name, hyper, step, *pair)
