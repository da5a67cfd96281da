"""Trajectories match optax step for step (float64 JAX), where optax has the algorithm.

Each optimizer's entry in optim_db.py names its optax counterpart
(``optax_reference``: optax's transformation for the same options); every reference
case of it runs 120 steps here, on a 0-d, an empty and two ordinary tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
from optim_db import BY_NAME, OPTIM_DB, case_id
from reference import quadratic_gradient

import optim_core

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

STEPS = 120
CASES = [(info.name, hyper) for info in OPTIM_DB if info.optax_reference is not None
         for hyper in info.reference_cases]


@pytest.fixture(autouse=True)
def jax_in_float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("name, hyper", CASES, ids=[case_id(n, h, "-default") for n, h in CASES])
def test_trajectory_matches_optax(name, hyper):
    import jax.numpy as jnp

    rng = np.random.default_rng(11)
    shapes = [(4, 3), (6,), (), (0,)]
    start = [rng.standard_normal(s) for s in shapes]
    ours = [p.copy() for p in start]
    opt = getattr(optim_core, name)(ours, **hyper, impl="generic")
    # Our trajectory, and the gradients it met (each depends on the parameters).
    grads, trajectory = [], []
    for step in range(STEPS):
        grads.append([quadratic_gradient(p, step) for p in ours])
        opt.step(grads[-1])
        trajectory.append([p.copy() for p in ours])
    # optax's, on the same gradients: one jitted scan over the steps.
    transformation = BY_NAME[name].optax_reference(optax, hyper)
    sign = -1.0 if hyper.get("maximize", False) else 1.0

    def one_step(carry, step_grads):
        params, state = carry
        updates, state = transformation.update(step_grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    params = [jnp.asarray(p) for p in start]
    stacked = [jnp.asarray(np.stack([sign * g[i] for g in grads])) for i in range(len(shapes))]
    _, theirs = jax.jit(lambda p, g: jax.lax.scan(one_step, (p, transformation.init(p)), g))(
        params, stacked)
    for i in range(len(shapes)):
        np.testing.assert_allclose(np.stack([t[i] for t in trajectory]), np.asarray(theirs[i]),
                                   rtol=1e-9, atol=1e-12, err_msg=f"{name} {hyper}: param {i}")
