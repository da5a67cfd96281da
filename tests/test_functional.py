"""The functional API (optim_core.functional) and its optax adapter (optim_core.as_optax).

The pure ``init``/``update`` of every registered optimizer, jitted by JAX in float64,
follows the eager optimizer's trajectory to 1e-12; un-jitted it runs on NumPy arrays
and writes nothing; optax's chain takes the adapter, which matches optax's own
optimizers. Each optimizer is compiled once (one case each), which is the cost here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from optim_db import OPTIM_DB

import optim_core
from optim_core.optim.functional import FunctionalState

STEPS = 8  # RAdam rectifies from step 6 on, ASGD with t0 = 2 averages from step 3


def _case(info) -> dict:
    """One option set per optimizer: its default case with every optional state and
    branch switched on."""
    return {**info.reference_cases[0], **info.rich}


# The tree holds vectors and a 0-d array: an optimizer of matrices only (Muon, whose
# per-tensor scalars the functional API does not derive yet) is left out.
CASES = [pytest.param(info.cls, _case(info), id=info.name) for info in OPTIM_DB
         if info.shared]
# SGD's dampened momentum takes the other side of first_step, an if on the step count.
CASES.append(pytest.param(optim_core.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
                          id="SGD-dampening"))


def _tree(rng, dtype=np.float64):
    """A small pytree: a dict holding a matrix, and a list holding a vector and a
    tuple with a 0-d array."""
    return {"w": rng.standard_normal((3, 4)).astype(dtype),
            "layers": [rng.standard_normal(5).astype(dtype),
                       (rng.standard_normal(()).astype(dtype),)]}


def _leaves(tree) -> list:
    return [tree["w"], tree["layers"][0], tree["layers"][1][0]]


def _like(tree, leaves):
    return {"w": leaves[0], "layers": [leaves[1], (leaves[2],)]}


def _eager_run(cls, hyper, params, grads):
    opt = cls([p.copy() for p in _leaves(params)], impl="generic", **hyper)
    for g in grads:
        opt.step(_leaves(g))
    return opt


def _assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.maximum(np.abs(expected), 1e-300)
    worst = float(np.max(np.abs(actual - expected) / scale)) if expected.size else 0.0
    assert worst <= rtol, f"{what}: relative difference {worst:.3g} > {rtol}"


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize(("cls", "hyper"), CASES)
def test_jitted_update_follows_the_eager_path_and_numpy_runs_it_unjitted(jax_x64, cls, hyper):
    jax, jnp = jax_x64, jax_x64.numpy
    rng = np.random.default_rng(7)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(STEPS)]
    eager = _eager_run(cls, hyper, params, grads)
    opt = optim_core.functional(cls, **hyper)

    traces = []

    def update(g, state, p):
        traces.append(1)
        return opt.update(g, state, p)

    step = jax.jit(update)
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    state = jax.jit(opt.init)(jparams)
    for g in grads:
        jparams, state = step(jax.tree_util.tree_map(jnp.asarray, g), state, jparams)
    assert len(traces) == 1, "the step count is traced, not a constant of the program"
    assert int(state.count) == STEPS

    nparams = params
    nstate = opt.init(nparams)
    for g in grads:
        nparams, nstate = opt.update(g, nstate, nparams)

    for run, (p, st) in {"jit": (jparams, state), "numpy": (nparams, nstate)}.items():
        assert _leaves(p)[0].dtype == np.float64
        for i, (got, want) in enumerate(zip(_leaves(p), eager.params, strict=True)):
            _assert_close(got, want, 1e-12, f"{run} param {i}")
        assert set(st.states) == set(eager.state[0][0]), run
        for name, tree in st.states.items():
            for i, got in enumerate(_leaves(tree)):
                _assert_close(got, eager.state[0][i][name], 1e-12, f"{run} state {name} {i}")


def test_update_is_pure_and_keeps_each_dtype():
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal(4).astype(np.float32),
              "b": rng.standard_normal(3).astype(np.float16)}
    grads = {"a": np.ones(4, np.float64), "b": np.ones(3, np.float16)}  # a: cast, as eager
    opt = optim_core.functional(optim_core.NAdam, lr=0.1)
    state = opt.init(params)
    before = (params["a"].copy(), state.group["mu_product"].copy(), state.count.copy())
    new, after = opt.update(grads, state, params)
    np.testing.assert_array_equal(params["a"], before[0])
    assert state.group["mu_product"] == before[1] and state.count == before[2]
    assert (new["a"].dtype, new["b"].dtype) == (np.float32, np.float16)
    assert after.states["exp_avg"]["b"].dtype == np.float16
    assert after.group["mu_product"].dtype == np.float32  # computed in float32, not upcast
    assert int(after.count) == 1 and not np.array_equal(new["a"], params["a"])


def test_hyperparameters_are_checked_once_with_the_class_checks():
    with pytest.raises(ValueError) as eager:
        optim_core.Adam([np.zeros(2)], lr=-1)
    with pytest.raises(ValueError) as pure:
        optim_core.functional(optim_core.Adam, lr=-1)
    assert str(pure.value) == str(eager.value)
    with pytest.raises(ValueError, match="nesterov"):
        optim_core.functional(optim_core.SGD, lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="lrr"):
        optim_core.functional(optim_core.Adam, lrr=0.1)
    with pytest.raises(TypeError, match="options of the eager"):
        optim_core.functional(optim_core.Adam, impl="fused")
    by_name = optim_core.functional("adamw", lr=0.01)
    assert by_name.optimizer is optim_core.AdamW
    assert by_name.hyperparameters["weight_decay"] == 1e-2
    assert by_name.hyperparameters["decoupled_weight_decay"] is True


def test_update_refuses_mismatched_trees_and_foreign_state():
    opt = optim_core.functional(optim_core.Adam, lr=0.1, amsgrad=True)
    params = {"w": np.zeros(3), "b": np.zeros(2)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="structure"):
        opt.update({"w": np.zeros(3)}, state, params)
    with pytest.raises(ValueError, match="shape"):
        opt.update({"w": np.zeros(4), "b": np.zeros(2)}, state, params)
    other = optim_core.functional(optim_core.Adam, lr=0.1).init(params)  # no max_exp_avg_sq
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.update(params, other, params)
    with pytest.raises(TypeError, match="FunctionalState"):
        opt.update(params, tuple(state), params)
    with pytest.raises(TypeError, match="floating"):
        opt.init({"n": np.arange(3)})
    assert isinstance(state, FunctionalState) and state.count.dtype == np.int32


def test_optax_chain_takes_the_adapter_and_matches_optax(jax_x64):
    optax = pytest.importorskip("optax")
    jax, jnp = jax_x64, jax_x64.numpy
    pairs = [
        (optim_core.as_optax(optim_core.Adam, lr=0.01), optax.adam(0.01)),
        (optim_core.as_optax(optim_core.AdamW, lr=0.01, weight_decay=0.1),
         optax.adamw(0.01, weight_decay=0.1)),
    ]
    rng = np.random.default_rng(1)
    start = jax.tree_util.tree_map(jnp.asarray, _tree(rng))
    grads = [jax.tree_util.tree_map(lambda x: 3 * jnp.asarray(x), _tree(rng)) for _ in range(5)]
    for ours, theirs in pairs:
        results = []
        for inner in (ours, theirs):
            tx = optax.chain(optax.clip_by_global_norm(1.0), inner)

            @jax.jit
            def step(p, s, g, tx=tx):
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            p, s = start, tx.init(start)
            for g in grads:
                p, s = step(p, s, g)
            results.append(p)
        for got, want in zip(_leaves(results[0]), _leaves(results[1]), strict=True):
            _assert_close(got, want, 1e-12, "as_optax vs optax")
    with pytest.raises(ValueError, match="needs params"):
        pairs[0][0].update(start, pairs[0][0].init(start))


def test_import_optim_core_imports_neither_jax_nor_optax():
    code = ("import sys, numpy as np, optim_core;"
            "f = optim_core.functional(optim_core.Adam);"
            "f.update([np.ones(2)], f.init([np.ones(2)]), [np.ones(2)]);"
            "assert not {'jax', 'optax'} & set(sys.modules), 'jax or optax was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
