"""The founding article's linear-regression example, reproduced with GD and DGD.

The article's functions are copied verbatim (section 4.2 and 4.4) and run beside
ours on its own data, learning rate and 1000 iterations.
"""

from __future__ import annotations

import numpy as np

import optim_core
from optim_core.tools.article import (
    ARTICLE_ITERATIONS,
    ARTICLE_LR,
    ARTICLE_X,
    ARTICLE_Y,
    main,
    train,
)

# --- the article's code, verbatim ---------------------------------------------
X = np.array([[1, 2], [2, 3], [3, 4], [4, 5]])
y = np.array([2, 3, 4, 5])
learning_rate = 0.01
num_iterations = 1000


def gradient_descent(X, y, learning_rate, num_iterations):
    m, n = X.shape
    theta = np.zeros(n)
    for _ in range(num_iterations):
        gradients = (1 / m) * X.T.dot(X.dot(theta) - y)
        theta -= learning_rate * gradients
    return theta


def dgd_loss(X, y, learning_rate, alpha_decay, num_iterations):
    m, n = X.shape
    theta = np.zeros(n)
    v = np.zeros(n)
    alpha = learning_rate
    for _ in range(num_iterations):
        gradients = (1 / m) * X.T.dot(X.dot(theta) - y)
        v += gradients
        theta -= alpha * v
        alpha *= alpha_decay
    return theta
# -------------------------------------------------------------------------------


def ours(optimizer):
    m, n = X.shape
    theta = np.zeros(n)
    opt = optimizer([theta])
    for _ in range(num_iterations):
        opt.step([(1 / m) * X.T.dot(X.dot(theta) - y)])
    return theta


def test_demo_uses_the_articles_data():
    np.testing.assert_array_equal(ARTICLE_X, X)
    np.testing.assert_array_equal(ARTICLE_Y, y)
    assert (ARTICLE_LR, ARTICLE_ITERATIONS) == (learning_rate, num_iterations)


def test_gd_reproduces_the_article():
    expected = gradient_descent(X, y, learning_rate, num_iterations)
    got = ours(lambda p: optim_core.GD(p, lr=learning_rate))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(train(optim_core.GD, lr=ARTICLE_LR), expected, rtol=1e-12)


def test_dgd_reproduces_the_article():
    expected = dgd_loss(X, y, learning_rate, alpha_decay=0.9, num_iterations=num_iterations)
    got = ours(lambda p: optim_core.DGD(p, lr=learning_rate, decay=0.9))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_dgd_defaults_are_the_articles():
    opt = optim_core.DGD([np.zeros(2)])
    assert opt.defaults == {"lr": 0.01, "decay": 0.9}


def test_article_gd_has_not_converged_after_1000_iterations():
    # A fact worth knowing about the article's example: with lr=0.01 GD is still far
    # from the least-squares solution (the problem is ill-conditioned).
    theta = gradient_descent(X, y, learning_rate, num_iterations)
    exact = np.linalg.lstsq(X, y, rcond=None)[0]
    assert np.abs(theta - exact).max() > 0.1


def test_demo_prints_a_row_per_optimizer(capsys):
    assert main(["--iterations", "50"]) == 0
    out = capsys.readouterr().out
    for name in ("GD", "DGD", "Adagrad", "Adam", "Lion"):
        assert f"\n{name} " in out
    # One-time compilation is timed in its own column, not charged to the first optimizer.
    assert "warm-up ms" in out.splitlines()[2]
