"""Per-tensor reductions in the rule language: ``sum`` and ``norm``, on every path.

The generic path evaluates them with the namespace's functions; the fused NumPy path
runs one reduction pass per stage before the update pass. Both must agree with each
other and with the definition, for every rule with reductions (the registered ones and
the test rule ``normalized`` of reduction_cases.py, which has two stages).
"""

from __future__ import annotations

import numpy as np
import pytest
from fused_cases import TOLERANCE, gradient, start_params
from optim_core.backends._lowering import lower
from reduction_cases import CASES, Normalized, normalized

import optim_core
from optim_core.optim.language import update_rule

norm = sum = None  # noqa: A001 - placeholders, bound per backend


def test_the_generic_path_evaluates_the_definition_with_numpy():
    param = np.linspace(-1.0, 2.0, 12).reshape(3, 4)
    grad = np.cos(np.arange(12.0)).reshape(3, 4)
    before = param.copy()
    opt = Normalized([param], lr=0.1, eps=1e-8, beta=0.9, impl="generic")
    opt.step([grad])
    velocity = grad  # the state starts at zero
    size = np.linalg.norm(velocity)
    spread = np.linalg.norm(velocity / (size + 1e-8))
    want = before - 0.1 / (size + 1e-8) * velocity * np.sum(before * before) / (
        1 + spread + np.sum(grad))
    np.testing.assert_allclose(param, want, rtol=1e-15)


def test_a_reduction_of_a_reduction_is_a_later_stage():
    _, _, kernel = lower(normalized, {"lr": 0.1, "eps": 1e-8, "beta": 0.9},
                         frozenset({"velocity"}))
    assert [(r.kind, r.stage) for r in kernel.reductions] == [
        ("norm", 0), ("sum", 0), ("sum", 0), ("norm", 1)]
    assert kernel.n_stages == 2
    first, second = kernel.reduction_pass(0), kernel.reduction_pass(1)
    assert first.reductions == (0, 1, 2) and first.first == 0
    assert set(first.loads) == {"param", "grad", "velocity"}
    # The second pass reads only what norm(velocity / (size + eps)) needs.
    assert second.reductions == (3,) and second.first == 3
    assert set(second.loads) == {"grad", "velocity"}
    assert all(target.startswith(("velocity", "size")) for target, _ in second.body)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cls, hyper", CASES,
                         ids=[f"{c.__name__}-{h}" for c, h in CASES])
def test_fused_numpy_matches_generic(cls, hyper, dtype):
    runs = {}
    for impl in ("generic", "fused"):
        params = start_params(dtype)
        params["empty"] = np.zeros((0, 3), dtype=dtype)
        opt = cls(params, **hyper, impl=impl)
        for step in range(8):
            opt.step({k: gradient(v, step) for k, v in params.items()})
        runs[impl] = (params, opt.state[0])
    assert "fused" in opt.implementation_reason
    (generic, generic_state), (fused, fused_state) = runs["generic"], runs["fused"]
    for name in generic:
        np.testing.assert_allclose(fused[name], generic[name], **TOLERANCE[dtype],
                                   err_msg=name)
    for want, got in zip(generic_state, fused_state, strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], **TOLERANCE[dtype],
                                       err_msg=name)


def test_the_multithreaded_reduction_of_a_large_tensor_matches_generic():
    # 2**20 elements take numba's parallel loops (prange reductions).
    rng = np.random.default_rng(1)
    start, grad = rng.standard_normal(1 << 20), rng.standard_normal(1 << 20)
    out = {}
    for impl in ("generic", "fused"):
        param = start.copy()
        opt = Normalized([param], impl=impl)
        opt.step([grad])
        opt.step([grad])
        out[impl] = param
    np.testing.assert_allclose(out["fused"], out["generic"], **TOLERANCE["float64"])


def test_flat_buffers_are_refused_for_a_rule_with_reductions():
    with pytest.raises(ValueError, match="reduces each tensor on its own"):
        Normalized([np.ones(3), np.ones(2)], flat=True)


def test_a_reduction_takes_one_elementwise_argument():
    with pytest.raises(TypeError, match="a reduction exactly one"):
        @update_rule()
        def two(param, grad, *, lr):
            param = param - lr * norm(grad, param)
            return (param,)

    @update_rule()
    def of_scalars(param, grad, *, lr):
        param = param - sum(lr) * grad
        return (param,)

    with pytest.raises(ValueError, match="reduces scalars only"):
        lower(of_scalars, {"lr": 0.1}, frozenset())


def test_a_name_that_is_also_a_called_operation_is_refused():
    # The generic path would call the state instead of the reduction.
    with pytest.raises(TypeError, match="both names a value and is called"):
        @update_rule()
        def shadow(param, grad, norm, *, lr):
            param = param - lr * grad / norm(grad)
            return param, norm


def test_an_if_cannot_test_a_reduction():
    # Its value stays beside the tensor: testing it would synchronize with the host.
    with pytest.raises(TypeError, match="an if may only test scalars"):
        @update_rule()
        def branchy(param, grad, *, lr):
            size = norm(grad)
            if size > 1:
                grad = grad / size
            param = param - lr * grad
            return (param,)


def test_reductions_of_an_empty_tensor_are_zero_and_change_nothing():
    for impl in ("generic", "fused"):
        param = np.zeros((0, 4))
        opt = Normalized([param], impl=impl)
        opt.step([np.zeros((0, 4))])
        assert param.shape == (0, 4)


def test_a_reducing_step_with_quantized_states_takes_the_generic_path():
    # The quantized kernels have no reduction pass: such tensors are stepped generically.
    rng = np.random.default_rng(0)
    start, grad = rng.standard_normal(10000), np.cos(np.arange(10000.0))
    out = {}
    for impl in ("fused", "generic"):
        param = start.copy()
        opt = optim_core.Adam([param], cautious=True, state_bits=8, impl=impl)
        for _ in range(3):
            opt.step([grad])
        out[impl] = param
    np.testing.assert_array_equal(out["fused"], out["generic"])
