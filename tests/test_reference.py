"""Every optimizer and option matches the float64 reference, on every array library."""

from __future__ import annotations

import numpy as np
import pytest
from optim_db import NAMES, case_id, reference_cases, with_default_lr
from reference import quadratic_gradient

import optim_core

STEPS = 12
SHAPES = {"matrix": (3, 4), "vector": (5,), "scalar": ()}


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


CASES = reference_cases()


@pytest.mark.parametrize("name, reference, hyper", CASES,
                         ids=[case_id(n, h, '-default') for n, _, h in CASES])
def test_matches_reference_for_ten_plus_steps(xp, name, reference, hyper):
    start = initial_params()
    params = {k: xp.asarray(v) for k, v in start.items()}
    opt = getattr(optim_core, name)(params, **hyper, impl="generic")
    expected = {k: v.copy() for k, v in start.items()}
    ref_states = {k: {} for k in start}
    ref_hyper = with_default_lr(name, hyper)
    for step in range(STEPS):
        grads_np = {k: quadratic_gradient(expected[k], step) for k in start}
        for k in start:
            expected[k] = reference(expected[k], grads_np[k], ref_states[k], ref_hyper)
        current = opt.step({k: xp.asarray(quadratic_gradient(xp.to_numpy(params[k]), step))
                            for k in start})
        for k in start:
            got = xp.to_numpy(current[k])
            np.testing.assert_allclose(got, expected[k], rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name} {hyper} step {step + 1} param {k}")
    assert opt.group_state[0]["step"] == STEPS


@pytest.mark.parametrize("name", NAMES)
def test_results_stay_in_input_namespace_and_dtype(xp, name):
    for dtype in ("float32", "float64"):
        param = xp.asarray(np.linspace(-1, 1, 6).reshape(2, 3), dtype=dtype)
        opt = getattr(optim_core, name)([param], lr=0.01)
        (out,) = opt.step([xp.asarray(np.ones((2, 3)), dtype=dtype)])
        assert type(out) is type(param)
        assert out.dtype == param.dtype
        for state in opt.state[0][0].values():
            assert state.dtype == param.dtype
            assert type(state) is type(param)


def test_float64_gradient_for_float32_param_is_cast(xp):
    param = xp.asarray(np.ones(4), dtype="float32")
    opt = optim_core.SGD([param], lr=0.5)
    (out,) = opt.step([xp.asarray(np.full(4, 0.1), dtype="float64")])
    assert out.dtype == param.dtype
    np.testing.assert_allclose(xp.to_numpy(out), np.float32(1 - 0.5 * np.float32(0.1)))
