"""L-BFGS follows torch.optim.LBFGS step for step (float64), on every array library.

The objective is smooth and not quadratic (a least-squares term, a quartic and a cosine),
so the line search has work to do; both optimizers get the same NumPy gradients, so
only the optimizers differ.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import optim_core

RNG = np.random.default_rng(11)
A = RNG.standard_normal((9, 8))
B = RNG.standard_normal(9)
SHAPES = {"matrix": (2, 3), "vector": (1,), "scalar": (), "empty": (0,)}
CASES = [
    {},
    {"lr": 0.5, "max_iter": 5, "history_size": 3},
    {"max_iter": 8, "max_eval": 6, "tolerance_change": 1e-5},
    {"lr": 0.8, "max_iter": 3, "history_size": 1},
]
STEPS = 5


def start_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {name: np.asarray(rng.standard_normal(shape) * 0.5) for name, shape in SHAPES.items()}


def objective(params: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    """f(w) = |A w - b|^2 / 2 + sum(w^4) / 4 + sum(cos w), w the parameters' elements."""
    w = np.concatenate([params[k].reshape(-1) for k in SHAPES])
    residual = A @ w - B
    loss = 0.5 * residual @ residual + 0.25 * np.sum(w**4) + np.sum(np.cos(w))
    flat = A.T @ residual + w**3 - np.sin(w)
    grads, offset = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        grads[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return float(loss), grads


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_lbfgs_continues_the_same_run(how):
    import copy
    import pickle

    def rosenbrock(theta):
        def closure():
            x, y = theta
            loss = (1 - x) ** 2 + 100 * (y - x * x) ** 2
            return loss, [np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])]
        return closure

    theta = np.array([-1.5, 2.0])
    opt = optim_core.LBFGS([theta], max_iter=5, line_search_fn="strong_wolfe")
    opt.step(rosenbrock(theta))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_theta = twin.param_groups[0]["params"][0]
    assert twin_theta is not theta
    for _ in range(2):
        opt.step(rosenbrock(theta))
        twin.step(rosenbrock(twin_theta))
    np.testing.assert_array_equal(theta, twin_theta)
    assert twin.state["n_iter"] == opt.state["n_iter"]


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("hyper", CASES, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items())
                         or "defaults")
def test_trajectory_matches_torch_lbfgs(torch, hyper, line_search_fn):
    start = start_params()
    ours = {k: v.copy() for k, v in start.items()}
    opt = optim_core.LBFGS(ours, **hyper, line_search_fn=line_search_fn)
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    their_opt = torch.optim.LBFGS(list(theirs.values()), **hyper,
                                  line_search_fn=line_search_fn)

    def closure():
        return objective(ours)

    def their_closure():
        loss, grads = objective({k: t.detach().numpy() for k, t in theirs.items()})
        for k, t in theirs.items():
            t.grad = torch.tensor(grads[k])
        return torch.tensor(loss, dtype=torch.float64)

    for step in range(STEPS):
        loss = opt.step(closure)
        their_loss = their_opt.step(their_closure)
        assert loss == pytest.approx(float(their_loss), rel=1e-9)
        for k in SHAPES:
            np.testing.assert_allclose(ours[k], theirs[k].detach().numpy(), rtol=1e-9,
                                       atol=1e-12, err_msg=f"step {step + 1}, param {k}")
        their_state = their_opt.state[theirs["matrix"]]
        for key in ("func_evals", "n_iter"):
            assert opt.state[key] == their_state[key], key
        assert len(opt.state["old_dirs"]) == len(their_state["old_dirs"])
        assert opt.state["t"] == pytest.approx(float(their_state["t"]), rel=1e-9)
    assert objective(ours)[0] < objective(start)[0]


def test_defaults_are_torchs(torch):
    ours = inspect.signature(optim_core.LBFGS).parameters
    theirs = inspect.signature(torch.optim.LBFGS).parameters
    assert list(ours) == list(theirs)
    for name in list(ours)[1:]:
        assert ours[name].default == theirs[name].default, name
    opt = optim_core.LBFGS([np.ones(2)], max_iter=9)
    assert opt.param_groups[0]["max_eval"] == 9 * 5 // 4


def test_stops_at_once_where_the_gradient_vanishes():
    x = np.ones(3)
    opt = optim_core.LBFGS([x])
    assert opt.step(lambda: (0.0, [np.zeros(3)])) == 0.0
    assert opt.state == {"func_evals": 1, "n_iter": 0}
    np.testing.assert_array_equal(x, 1.0)


def test_converges_on_rosenbrock_with_the_line_search():
    theta = np.array([-1.5, 2.0])

    def closure():
        x, y = theta
        loss = (1 - x) ** 2 + 100 * (y - x * x) ** 2
        return loss, [np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])]

    opt = optim_core.LBFGS([theta], max_iter=100, line_search_fn="strong_wolfe")
    for _ in range(3):
        opt.step(closure)
    # Within what the default tolerance_change (1e-9 on the loss) allows.
    np.testing.assert_allclose(theta, [1.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_every_library_follows_numpy(xp, line_search_fn):
    start = start_params()
    expected = {k: v.copy() for k, v in start.items()}
    reference = optim_core.LBFGS(expected, lr=0.7, max_iter=4, line_search_fn=line_search_fn)
    params = {k: xp.asarray(v) for k, v in start.items()}
    opt = optim_core.LBFGS(params, lr=0.7, max_iter=4, line_search_fn=line_search_fn)

    def closure():
        # opt.params: the current values, for immutable libraries too.
        loss, grads = objective({k: xp.to_numpy(v) for k, v in opt.params.items()})
        return xp.asarray(loss), {k: xp.asarray(g) for k, g in grads.items()}

    for _ in range(3):
        reference.step(lambda: objective(expected))
        opt.step(closure)
    for k in SHAPES:
        np.testing.assert_allclose(xp.to_numpy(opt.params[k]), expected[k], rtol=1e-12,
                                   atol=1e-14)
        assert type(opt.params[k]) is type(params[k])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_state_dict_round_trip_resumes_exactly(line_search_fn):
    start = start_params()
    params = {k: v.copy() for k, v in start.items()}
    opt = optim_core.LBFGS(params, max_iter=3, history_size=4, line_search_fn=line_search_fn)
    for _ in range(2):
        opt.step(lambda: objective(params))
    saved = opt.state_dict()
    assert isinstance(saved["state"]["d"], np.ndarray) and saved["state"]["old_dirs"]
    copies = {k: v.copy() for k, v in params.items()}
    other = optim_core.LBFGS(copies, line_search_fn=line_search_fn)
    other.load_state_dict(saved)
    assert other.param_groups[0]["max_iter"] == 3
    for _ in range(2):
        opt.step(lambda: objective(params))
        other.step(lambda: objective(copies))
    for k in SHAPES:
        np.testing.assert_array_equal(copies[k], params[k])
    assert other.state["func_evals"] == opt.state["func_evals"]


def test_a_bad_state_dict_changes_nothing():
    params = start_params()
    opt = optim_core.LBFGS(params, max_iter=3)
    opt.step(lambda: objective(params))
    saved = opt.state_dict()
    fresh = optim_core.LBFGS({k: v.copy() for k, v in params.items()})
    bad_vector = {**saved, "state": {**saved["state"], "d": np.zeros(3)}}
    for bad in (bad_vector, {**saved, "optimizer": "SGD"},
                {**saved, "param_groups": [{**saved["param_groups"][0], "momentum": 0.9}]},
                {**saved, "state": {**saved["state"], "ro": [1.0] * 9}}):
        with pytest.raises((TypeError, ValueError)):
            fresh.load_state_dict(bad)
    assert fresh.state == {"func_evals": 0, "n_iter": 0}
    assert fresh.param_groups[0]["max_iter"] == 20


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_a_bad_closure_result_mid_step_restores_the_parameters(line_search_fn):
    params = start_params()
    opt = optim_core.LBFGS(params, max_iter=5, line_search_fn=line_search_fn)
    opt.step(lambda: objective(params))
    before = {k: v.copy() for k, v in params.items()}
    state = dict(opt.state)
    calls = []

    def closure():
        calls.append(1)
        loss, grads = objective(params)
        if len(calls) == 3:  # after the parameters have moved
            grads["vector"] = np.zeros(4)
        return loss, grads

    with pytest.raises(ValueError, match="'vector' has shape"):
        opt.step(closure)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    assert opt.state.keys() == state.keys()
    assert opt.state["func_evals"] == state["func_evals"]
    assert all(a is b for a, b in zip(opt.state["old_dirs"], state["old_dirs"], strict=True))


@pytest.mark.parametrize("bad, error", [
    ({"line_search_fn": "armijo"}, ValueError), ({"max_iter": 0}, ValueError),
    ({"history_size": 1.5}, TypeError), ({"tolerance_grad": -1.0}, ValueError),
    ({"lr": -0.1}, ValueError),
])
def test_bad_hyperparameters_are_refused(bad, error):
    with pytest.raises(error, match=next(iter(bad))):
        optim_core.LBFGS([np.ones(2)], **bad)
    opt = optim_core.LBFGS([np.ones(2)])
    with pytest.raises(error, match=next(iter(bad))):
        opt.param_groups[0].update(bad)


def test_one_param_group_and_a_callable_closure():
    with pytest.raises(ValueError, match="one param group"):
        optim_core.LBFGS([{"params": [np.ones(2)]}, {"params": [np.ones(3)]}])
    opt = optim_core.LBFGS([np.ones(2)])
    with pytest.raises(TypeError, match="callable"):
        opt.step(None)
    with pytest.raises(TypeError, match="pair"):
        opt.step(lambda: 1.0)


def test_torch_leaf_tensors_with_an_autograd_closure(torch):
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)

    def closure():
        loss = ((p - 2) ** 4).sum()
        (grad,) = torch.autograd.grad(loss, [p])
        return loss.detach(), [grad]

    opt = optim_core.LBFGS([p], line_search_fn="strong_wolfe")
    opt.step(closure)
    assert p.requires_grad and opt.params[0] is p
    np.testing.assert_allclose(p.detach().numpy(), 2.0, atol=1e-2)
