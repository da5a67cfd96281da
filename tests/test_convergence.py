"""Every optimizer converges on a parabola and on Rosenbrock's function.

Hyperparameters are chosen per optimizer (as a user would tune them); the checks
are on where the iterate ends up, not on how fast.
"""

from __future__ import annotations

import numpy as np
import pytest
from optim_db import BY_NAME, NAMES

import optim_core

CURVATURE = np.array([1.0, 3.0, 10.0])
CENTER = np.array([1.0, -2.0, 0.5])


def parabola(theta):
    return 0.5 * float(np.sum(CURVATURE * (theta - CENTER) ** 2))


def parabola_grad(theta):
    return CURVATURE * (theta - CENTER)


def rosenbrock(theta):
    x, y = theta
    return float((1 - x) ** 2 + 100 * (y - x * x) ** 2)


def rosenbrock_grad(theta):
    x, y = theta
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


# Each optimizer's tuned options are in optim_db.py. DGD, the founding article's method,
# has no damping: at a fixed step size its update matrix on a quadratic has determinant 1,
# so it orbits instead of converging, and its decaying step only freezes the orbit; it is
# held to a large loss reduction instead (parabola_converges=False, see its docstring).


def run(name, hyper, grad, start, steps):
    theta = np.array(start, dtype=np.float64)
    opt = getattr(optim_core, name)([theta], **hyper)
    for _ in range(steps):
        opt.step([grad(theta)])
    return theta


@pytest.mark.parametrize("name", sorted(NAMES))
def test_converges_on_a_parabola(name):
    info = BY_NAME[name]
    theta = run(name, info.parabola, parabola_grad, np.zeros(3), 2000)
    if not info.parabola_converges:
        assert parabola(theta) < 0.02 * parabola(np.zeros(3))
    else:
        np.testing.assert_allclose(theta, CENTER, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_converges_on_rosenbrock(name):
    hyper, steps = BY_NAME[name].rosenbrock
    start = np.array([-1.5, 2.0])
    theta = run(name, hyper, rosenbrock_grad, start, steps)
    if not BY_NAME[name].rosenbrock_converges:
        # Both crawl along the valley floor: held to a 1000x loss reduction.
        assert rosenbrock(theta) < 1e-3 * rosenbrock(start)
    else:
        np.testing.assert_allclose(theta, [1.0, 1.0], atol=1e-2)
