"""flat=True: many tensors in one buffer per group and dtype, stepped by one launch."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from fused_cases import (
    ELEMENTWISE_CASES,
    ELEMENTWISE_IDS,
    REDUCING_CASES,
    TOLERANCE,
    gradient,
)

import optim_core


def many_params(count: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    params = {f"w{i}": rng.standard_normal((i % 5 + 1, 7)).astype(np.float32)
              for i in range(count)}
    params["bias64"] = rng.standard_normal(11)
    params["scalar"] = np.asarray(0.25, dtype=np.float32)
    params["empty"] = np.zeros((0, 3), dtype=np.float32)
    return params


def run(name: str, hyper: dict, *, flat: bool, impl: str, steps: int = 12):
    params = many_params(6)
    opt = getattr(optim_core, name)(params, **hyper, impl=impl, flat=flat)
    for step in range(steps):
        opt.step({k: gradient(v, step) for k, v in opt.params.items()})
    return opt


@pytest.mark.parametrize("impl", ["fused", "generic"])
@pytest.mark.parametrize("name, hyper", ELEMENTWISE_CASES, ids=ELEMENTWISE_IDS)
def test_flat_steps_like_separate_tensors(name, hyper, impl):
    flat = run(name, hyper, flat=True, impl=impl)
    separate = run(name, hyper, flat=False, impl="generic")
    for key, want in separate.params.items():
        got = flat.params[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, **TOLERANCE[str(want.dtype)], err_msg=key)
    for got, want in zip(flat.state_dict()["state"], separate.state_dict()["state"],
                         strict=True):
        assert got.keys() == want.keys()
        for state_name in want:
            np.testing.assert_allclose(got[state_name], want[state_name],
                                       **TOLERANCE[str(want[state_name].dtype)])


@pytest.mark.parametrize("name, hyper", REDUCING_CASES)
def test_a_step_that_reduces_each_tensor_refuses_flat_buffers(name, hyper):
    # A norm over a flat buffer would be the norm of many tensors at once.
    with pytest.raises(ValueError, match="reduces each tensor on its own"):
        getattr(optim_core, name)([np.ones(3), np.ones(2)], **hyper, flat=True)


def test_one_launch_per_dtype_per_group():
    params = many_params(200)
    opt = optim_core.Adam([{"params": {k: v for k, v in params.items() if k != "w0"}},
                           {"params": {"w0": params["w0"]}, "lr": 0.5}],
                          impl="fused", flat=True)
    grads = {k: np.ones_like(v) for k, v in opt.params.items()}
    opt.step(grads)
    before = opt.implementation.launches
    opt.step(grads)
    # Group 0: one float32 buffer (199 tensors) and one float64 buffer; group 1: one.
    assert opt.implementation.launches - before == 3


def test_params_are_views_that_see_each_update():
    given = many_params(5)
    opt = optim_core.SGD(given, lr=0.5, flat=True)
    params = opt.params
    buffer = opt._flat.segments[0][0].param
    for key, value in params.items():
        if value.dtype == np.float32 and value.size:
            assert np.shares_memory(value, buffer), key
        np.testing.assert_array_equal(value, given[key])
    before = {k: v.copy() for k, v in params.items()}
    opt.step({k: np.ones_like(v) for k, v in params.items()})
    for key, value in params.items():
        np.testing.assert_allclose(value, before[key] - 0.5, rtol=1e-6)
        assert value is opt.params[key]
    # The caller's original arrays are copies now, left alone.
    np.testing.assert_array_equal(given["w1"], before["w1"])


def test_grad_views_are_read_in_place_without_a_copy():
    opt = optim_core.Adam(many_params(5), lr=0.1, flat=True, impl="generic")
    views = opt.grad_views
    for view in views.values():
        view[...] = np.linspace(-1, 1, view.size).reshape(view.shape)
    reference = optim_core.Adam(many_params(5), lr=0.1, impl="generic")
    expected = reference.step({k: v.copy() for k, v in views.items()})
    # Read-only views: any copy into the gradient buffer would raise.
    for segment in opt._flat.segments[0]:
        segment.grad.flags.writeable = False
        for view in segment.grad_views:
            view.flags.writeable = False
    got = opt.step(views)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_plain_gradients_are_copied_once_without_temporaries():
    n = 500_000
    params = {"a": np.ones(n, dtype=np.float32), "b": np.ones(n, dtype=np.float32)}
    opt = optim_core.Adam(params, lr=0.1, flat=True, impl="fused")
    grads = {k: np.full(n, 0.5, dtype=np.float32) for k in params}
    opt.step(grads)
    tracemalloc.start()
    try:
        opt.step(grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * 4 / 20


def test_state_dict_round_trip_keeps_the_storage_flat():
    opt = optim_core.Adam(many_params(5), lr=0.1, amsgrad=True, flat=True)
    for step in range(3):
        opt.step({k: gradient(v, step) for k, v in opt.params.items()})
    saved = opt.state_dict()
    assert all(isinstance(a, np.ndarray) for st in saved["state"] for a in st.values())
    restored = optim_core.Adam({k: v.copy() for k, v in opt.params.items()}, lr=0.1,
                               amsgrad=True, flat=True)
    restored.load_state_dict(saved)
    buffer = restored._flat.segments[0][0].states["exp_avg"]
    assert np.shares_memory(restored.state[0][0]["exp_avg"], buffer)
    for step in range(3, 6):
        grads = {k: gradient(v, step) for k, v in opt.params.items()}
        opt.step(grads)
        restored.step(grads)
    for key, value in opt.params.items():
        np.testing.assert_array_equal(restored.params[key], value)


def test_inconsistent_state_is_refused_before_anything_changes():
    opt = optim_core.Adam(many_params(3), lr=0.1, flat=True)
    opt.step({k: np.ones_like(v) for k, v in opt.params.items()})
    saved = opt.state_dict()
    del saved["state"][0]["exp_avg"]
    before = [dict(st) for st in opt.state[0]]
    with pytest.raises(ValueError, match="same state entries"):
        opt.load_state_dict(saved)
    assert all(a.keys() == b.keys() and all(a[k] is b[k] for k in a)
               for a, b in zip(opt.state[0], before, strict=True))


def test_a_replaced_parameter_is_an_error():
    opt = optim_core.SGD({"a": np.ones(3), "b": np.ones(2)}, lr=0.1, flat=True)
    opt.param_groups[0]["params"][0] = np.zeros(3)
    with pytest.raises(ValueError, match="replaced"):
        opt.step({"a": np.ones(3), "b": np.ones(2)})


def test_grad_views_need_flat():
    with pytest.raises(ValueError, match="flat=True"):
        _ = optim_core.SGD([np.ones(3)]).grad_views


def test_flat_needs_a_library_with_views():
    xp = pytest.importorskip("array_api_strict")
    with pytest.raises(ValueError, match="views"):
        optim_core.SGD([xp.ones(3)], flat=True)


def test_flat_must_be_a_bool():
    with pytest.raises(TypeError, match="flat"):
        optim_core.SGD([np.ones(3)], flat="yes")


def test_grad_views_in_the_wrong_structure_are_refused():
    opt = optim_core.SGD({"a": np.ones(3), "b": np.ones(2)}, lr=0.1, flat=True)
    with pytest.raises(TypeError, match="dict"):
        opt.step(list(opt.grad_views.values()))


def test_flat_on_torch_tensors():
    torch = pytest.importorskip("torch")
    given = {"a": torch.ones(3, 4), "b": torch.ones(5, dtype=torch.float64)}
    opt = optim_core.Adam(given, lr=0.1, flat=True)
    reference = optim_core.Adam({k: v.clone() for k, v in given.items()}, lr=0.1)
    for step in range(3):
        grads = {k: torch.full_like(v, 0.5 - step) for k, v in given.items()}
        for name, view in opt.grad_views.items():
            view[...] = grads[name]
        opt.step(opt.grad_views)
        reference.step(grads)
    buffer = opt._flat.segments[0][0].param
    assert opt.params["a"].data_ptr() == buffer.data_ptr()
    for key, want in reference.params.items():
        assert torch.equal(opt.params[key], want)
