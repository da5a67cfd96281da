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
CASES = [c for c in reference_cases() if BY_NAME[c[0]].torch_name is not None]


@pytest.fixture(autouse=True)
def float64_torch_scalars():
    # torch keeps step counters and NAdam's mu_product in the default dtype; float64
    # makes its scalars exact like ours.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("name, reference, hyper", CASES,
                         ids=[case_id(n, h, '-default') for n, _, h in CASES])
def test_trajectory_matches_torch_optim(name, reference, hyper):
    rng = np.random.default_rng(7)
    shapes = [(4, 3), (6,), ()]
    start = [rng.standard_normal(s) for s in shapes]
    ours = [p.copy() for p in start]
    opt = getattr(optim_core, name)(ours, **hyper, impl="generic")
    theirs = [torch.tensor(p, requires_grad=True) for p in start]
    torch_opt = getattr(torch.optim, BY_NAME[name].torch_name)(theirs, **hyper,
                                                                   foreach=False)
    for step in range(STEPS):
        grads = [quadratic_gradient(p, step) for p in ours]
        opt.step(grads)
        for t, g in zip(theirs, grads):
            t.grad = torch.tensor(g)
        torch_opt.step()
        for i, (mine, t) in enumerate(zip(ours, theirs)):
            np.testing.assert_allclose(mine, t.detach().numpy(), rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name} {hyper}: step {step + 1}, param {i}")
