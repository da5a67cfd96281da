"""LAMB and LARS follow optax.lamb and optax.lars, float64, over 120 steps.

optax runs under jax with float64 enabled; both sides see the same gradients of a
quadratic (which depend on the iterate, so a wrong step compounds). The names map as
the classes document: ``learning_rate`` is ``lr``, ``(b1, b2)`` is ``betas``, optax's
masks are param groups (``weight_decay=0``, ``trust_ratio=False``).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import quadratic_gradient

import optim_core

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

STEPS = 120
SHAPES = {"matrix": (4, 5), "vector": (7,), "scalar": (), "zero": (3,)}

LAMB_CASES = [
    ({"learning_rate": 1e-2}, {"lr": 1e-2}),
    ({"learning_rate": 3e-3, "b1": 0.8, "b2": 0.95, "eps": 1e-8, "eps_root": 1e-10,
      "weight_decay": 0.05},
     {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-8, "eps_root": 1e-10, "weight_decay": 0.05}),
]
LARS_CASES = [
    ({"learning_rate": 0.5}, {"lr": 0.5}),
    ({"learning_rate": 0.2, "weight_decay": 0.01, "trust_coefficient": 0.02, "eps": 1e-6,
      "momentum": 0.8, "nesterov": True},
     {"lr": 0.2, "weight_decay": 0.01, "trust_coefficient": 0.02, "eps": 1e-6,
      "momentum": 0.8, "nesterov": True}),
    ({"learning_rate": 0.05, "trust_ratio_mask": False, "momentum": 0.0},
     {"lr": 0.05, "trust_ratio": False, "momentum": 0.0}),
]


def start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(shape) for k, shape in SHAPES.items()}
    params["zero"][...] = 0  # a zero norm: the trust ratio is 1
    return params


def optax_trajectory(transform, params):
    """optax's iterates and the gradients it saw, step by step (one jit compilation)."""

    @jax.jit
    def step(params, grads, state):
        updates, state = transform.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    theirs = {k: jnp.asarray(v) for k, v in params.items()}
    state, seen = transform.init(theirs), []
    for index in range(STEPS):
        grads = {k: quadratic_gradient(np.asarray(theirs[k]), index) for k in params}
        seen.append(grads)
        theirs, state = step(theirs, {k: jnp.asarray(g) for k, g in grads.items()}, state)
    return {k: np.asarray(v) for k, v in theirs.items()}, seen


def check_both_impls(transform, cls, groups_of, options):
    """Ours, generic and fused, given optax's gradients, ends where optax does."""
    want, grads = optax_trajectory(transform, start())
    for impl in ("generic", "fused"):
        ours = start()
        opt = cls(groups_of(ours), **options, impl=impl)
        for step_grads in grads:
            opt.step(step_grads)
        assert opt.group_state[0]["step"] == STEPS
        for k in SHAPES:
            np.testing.assert_allclose(ours[k], want[k], rtol=1e-9, atol=1e-12,
                                       err_msg=f"{cls.__name__} {options} {impl} {k}")


@pytest.mark.parametrize("theirs, ours", LAMB_CASES)
def test_lamb_matches_optax(theirs, ours):
    check_both_impls(optax.lamb(**theirs), optim_core.LAMB, dict, ours)


@pytest.mark.parametrize("theirs, ours", LARS_CASES)
def test_lars_matches_optax(theirs, ours):
    check_both_impls(optax.lars(**theirs), optim_core.LARS, dict, ours)


def test_optax_masks_are_param_groups():
    # optax's weight_decay_mask and trust_ratio_mask select tensors; here a group does.
    mask = {"matrix": True, "vector": False, "scalar": False, "zero": True}
    transform = optax.lars(0.3, weight_decay=0.1, weight_decay_mask=mask,
                           trust_ratio_mask=mask)

    def groups(params):
        return [{"params": {k: v for k, v in params.items() if mask[k]}},
                {"params": {k: v for k, v in params.items() if not mask[k]},
                 "weight_decay": 0.0, "trust_ratio": False}]

    check_both_impls(transform, optim_core.LARS, groups, {"lr": 0.3, "weight_decay": 0.1})
