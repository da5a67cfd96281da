"""Property-based tests: over random shapes, dtypes and hyperparameters, every
implementation computes what the float64 reference computes.

``tests/reference.py`` writes each optimizer again, independently, from the documented
algorithm in plain NumPy float64. Hypothesis draws the parameter shapes (0-d and
zero-size included, several parameters at once), the dtype (float32, float64), every
hyperparameter over a valid range, the number of steps and the gradients' seed and
scale; the generic path, and the fused path where it exists, must then agree with the
reference, and with each other. Runs are derandomized: CI sees the same examples
every time.

The hyperparameter ranges are valid and sane, not the whole valid range: RMSprop's
``alpha`` is drawn from [0.5, 0.999] because with ``centered=True`` the variance
``v - m**2`` of a near-0 or near-1 ``alpha`` cancels catastrophically in float32 (as it
does in torch), which would test rounding, not the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from optim_db import BY_NAME, NAMES

import optim_core

ALL = NAMES
EXAMPLES = 40  # per optimizer and test: 12 x 40 = 480 examples per test function
FUSED_EXAMPLES = 25
OTHER_LIBRARY_EXAMPLES = 10  # per optimizer, on torch and array_api_strict
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Each optimizer's hyperparameter strategy and fused flags are in optim_db.py. The fused
# tests' flags switch on every optional state and branch: each combination of flags (and
# of zero/nonzero weight decay or momentum) is a separately compiled kernel, about a
# second each on a cold cache, so these tests vary values, shapes and dtypes and keep one
# combination per optimizer; tests/test_fused_numpy.py covers the others.

#: Hyperparameters whose zero selects another branch: kept nonzero in the fused tests.
BRANCHING = ("weight_decay", "momentum")


def draw_case(data, name: str, *, fused: bool = False) -> dict:
    hyper = data.draw(BY_NAME[name].hyperparameters, label="hyperparameters")
    if fused:
        hyper.update(BY_NAME[name].fused_flags)
        hyper.update({k: max(hyper[k], 1e-3) for k in BRANCHING if k in hyper})
    if hyper.get("nesterov") and "momentum" in hyper:  # SGD's: needs momentum, no dampening
        hyper["momentum"] = max(hyper["momentum"], 0.1)
        if "dampening" in hyper:
            hyper["dampening"] = 0.0
    return {
        "hyper": hyper,
        "dtype": data.draw(st.sampled_from(["float32", "float64"]), label="dtype"),
        "shapes": data.draw(st.lists(array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                  max_side=4), min_size=1, max_size=3),
                            label="shapes"),
        "steps": data.draw(st.integers(1, 5), label="steps"),
        "seed": data.draw(st.integers(0, 2**32 - 1), label="seed"),
        "scale": data.draw(st.sampled_from([1e-3, 1.0, 30.0]), label="gradient scale"),
    }


def inputs(case: dict):
    """Starting parameters and every step's gradients, as arrays of the case's dtype."""
    rng = np.random.default_rng(case["seed"])
    dtype = case["dtype"]
    params = [rng.standard_normal(shape).astype(dtype) for shape in case["shapes"]]
    grads = [[(rng.standard_normal(shape) * case["scale"]).astype(dtype)
              for shape in case["shapes"]] for _ in range(case["steps"])]
    return params, grads


def run(name: str, case: dict, impl: str) -> list[np.ndarray]:
    params, grads = inputs(case)
    opt = getattr(optim_core, name)(params, **case["hyper"], impl=impl)
    for step_grads in grads:
        opt.step(step_grads)
    assert all(p.dtype == np.dtype(case["dtype"]) for p in params)
    return params


def run_reference(name: str, case: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(starting values, reference results) in float64, from the same rounded inputs."""
    params, grads = inputs(case)
    reference = BY_NAME[name].reference
    start = [p.astype(np.float64) for p in params]
    values = [p.copy() for p in start]
    states = [{} for _ in params]
    for step_grads in grads:
        values = [reference(p, g.astype(np.float64), s, dict(case["hyper"]))
                  for p, g, s in zip(values, step_grads, states, strict=True)]
    return start, values


def assert_close(actual, expected, start, dtype: str) -> None:
    """Equal up to rounding: a few ulps of the values, plus a relative error of the
    distance travelled (float32 rounds each step's inputs, the reference does not)."""
    actual = np.asarray(actual, dtype=np.float64)
    ulp = np.finfo(dtype).eps
    moved = np.abs(expected - start)
    tolerance = 64 * ulp * (np.abs(start) + np.abs(expected)) + (
        1e-9 if dtype == "float64" else 2e-3) * moved
    both_nan = np.isnan(actual) & np.isnan(expected)
    error = np.where(both_nan, 0.0, np.abs(actual - expected))
    worst = np.argmax(error - tolerance) if error.size else None
    assert error.size == 0 or np.all((error <= tolerance) | both_nan), (
        f"{actual.flat[worst]!r} != {expected.flat[worst]!r} (start {start.flat[worst]!r})")


def fused_available() -> bool:
    try:
        optim_core.Adam([np.zeros(1)], impl="fused")
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", ALL)
@SETTINGS
@given(data=st.data())
def test_generic_matches_the_float64_reference(name, data):
    case = draw_case(data, name)
    got = run(name, case, "generic")
    start, expected = run_reference(name, case)
    for g, e, s in zip(got, expected, start, strict=True):
        assert g.shape == e.shape
        assert_close(g, e, s, case["dtype"])


@pytest.mark.skipif(not fused_available(), reason="no fused NumPy implementation")
@pytest.mark.parametrize("name", ALL)
@settings(SETTINGS, max_examples=FUSED_EXAMPLES)
@given(data=st.data())
def test_fused_equals_generic_equals_the_float64_reference(name, data):
    case = draw_case(data, name, fused=True)
    fused, generic = run(name, case, "fused"), run(name, case, "generic")
    start, expected = run_reference(name, case)
    for f, g, e, s in zip(fused, generic, expected, start, strict=True):
        assert f.dtype == g.dtype and f.shape == g.shape == e.shape
        assert_close(f, e, s, case["dtype"])
        # Same operations in the same order; only contraction into fused multiply-adds
        # may differ, so a few ulps of the values and of the distance travelled.
        assert_close(f, g.astype(np.float64), s, case["dtype"])


@pytest.mark.parametrize("name", ALL)
@SETTINGS
@given(data=st.data())
def test_lr_zero_is_the_identity_for_any_other_hyperparameters(name, data):
    case = draw_case(data, name)
    case["hyper"].update(BY_NAME[name].lr_zero, lr=0.0)
    before, _ = inputs(case)
    after = run(name, case, "generic")
    for a, b in zip(after, before, strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", ALL)
@settings(SETTINGS, max_examples=OTHER_LIBRARY_EXAMPLES,
          suppress_health_check=[*SETTINGS.suppress_health_check,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generic_on_other_libraries_matches_the_float64_reference(xp, name, data):
    if xp.name == "numpy":
        pytest.skip("NumPy is covered above")
    case = draw_case(data, name)
    params, grads = inputs(case)
    arrays = [xp.asarray(p, dtype=case["dtype"]) for p in params]
    opt = getattr(optim_core, name)(arrays, **case["hyper"], impl="generic")
    for step_grads in grads:
        opt.step([xp.asarray(g, dtype=case["dtype"]) for g in step_grads])
    start, expected = run_reference(name, case)
    for got, e, s in zip(opt.params, expected, start, strict=True):
        got = xp.to_numpy(got)
        assert got.dtype == np.dtype(case["dtype"]) and got.shape == e.shape
        assert_close(got, e, s, case["dtype"])
