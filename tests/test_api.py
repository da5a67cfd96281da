"""The optimizer API: structures, groups, state dicts, backend selection."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from optim_core.backends import select_backend
from optim_db import NAMES
from reference import adam as reference_adam

import optim_core


def test_every_optimizer_is_public():
    for name in NAMES:
        assert issubclass(getattr(optim_core, name), optim_core.Optimizer)
        assert name in optim_core.__all__


def test_list_params_step_returns_the_same_arrays_updated_in_place():
    w, b = np.ones((2, 3)), np.zeros(3)
    opt = optim_core.SGD([w, b], lr=0.1)
    out = opt.step([np.ones((2, 3)), np.ones(3)])
    assert isinstance(out, list) and out[0] is w and out[1] is b
    np.testing.assert_allclose(w, 0.9)
    np.testing.assert_allclose(b, -0.1)


def test_dict_params_take_and_return_dicts():
    params = {"w": np.ones(2), "b": np.zeros(())}
    opt = optim_core.Adam(params, lr=0.1)
    out = opt.step({"b": np.asarray(1.0), "w": np.ones(2)})
    assert list(out) == ["w", "b"]
    assert out["w"] is params["w"]
    np.testing.assert_allclose(out["b"], -0.1)
    with pytest.raises(TypeError, match="dict"):
        opt.step([np.ones(2), np.asarray(1.0)])


def test_param_groups_have_their_own_hyperparameters():
    a, b = np.ones(2), np.ones(2)
    opt = optim_core.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    opt.step([np.ones(2), np.ones(2)])
    np.testing.assert_allclose(a, 0.9)
    np.testing.assert_allclose(b, 0.5)


def test_hyperparameters_can_be_changed_between_steps():
    p = np.ones(3)
    opt = optim_core.SGD([p], lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0]["lr"] = 0.0
    opt.step([np.ones(3)])
    np.testing.assert_allclose(p, 0.9)
    opt.param_groups[0]["momentum"] = 0.9  # allocates the buffer on first use, as torch
    opt.param_groups[0]["lr"] = 0.1
    opt.step([np.ones(3)])
    np.testing.assert_allclose(p, 0.8)


def test_invalid_hyperparameter_is_refused_when_written_and_changes_nothing():
    a, b = np.ones(2), np.ones(2)
    opt = optim_core.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        opt.param_groups[1]["betas"] = (0.9, 1.5)
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    np.testing.assert_array_equal(a, 1.0)
    assert opt.group_state[0]["step"] == 0



@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_optimizer_continues_the_same_run(name, how):
    import copy
    import pickle

    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal(6), rng.standard_normal((2, 3))] for _ in range(8)]
    params = [np.linspace(-1, 1, 6), np.linspace(0, 1, 6).reshape(2, 3)]
    opt = getattr(optim_core, name)(params)
    for g in grads[:4]:
        opt.step(g)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert all(a is not b for a, b in zip(twin.params, opt.params, strict=True))
    assert twin.implementation.name == opt.implementation.name
    for g in grads[4:]:
        opt.step(g)
        twin.step(g)
    for a, b in zip(opt.params, twin.params, strict=True):
        np.testing.assert_array_equal(a, b)
    assert twin.group_state == opt.group_state


def test_a_flat_optimizer_refuses_to_be_copied_rather_than_lose_its_views():
    import copy

    opt = optim_core.Adam([np.ones(3), np.ones(2)], flat=True)
    with pytest.raises(TypeError, match="flat=True cannot be deep-copied"):
        copy.deepcopy(opt)
    shallow = copy.copy(opt)  # shares the buffers, so it may
    shallow.step(shallow.grad_views)
    assert opt.params[0] is shallow.params[0]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(4) for _ in range(8)]
    p1 = np.linspace(-1, 1, 4)
    opt1 = getattr(optim_core, name)([p1])
    for g in grads[:4]:
        opt1.step([g])
    saved = opt1.state_dict()
    p2 = p1.copy()
    opt2 = getattr(optim_core, name)([p2], lr=123.0)  # overwritten by the loaded groups
    opt2.load_state_dict(saved)
    for g in grads[4:]:
        opt1.step([g])
        opt2.step([g])
    np.testing.assert_array_equal(p1, p2)


def test_state_dict_is_backend_neutral(xp):
    params = {"w": xp.asarray(np.ones((2, 2)))}
    opt = optim_core.Adam(params, amsgrad=True)
    opt.step({"w": xp.asarray(np.ones((2, 2)))})
    sd = opt.state_dict()
    assert sd["format_version"] == optim_core.optim.base.STATE_DICT_VERSION
    assert sd["group_state"] == [{"step": 1}]
    assert sd["param_groups"][0]["names"] == ["w"]
    assert set(sd["state"][0]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    for value in sd["state"][0].values():
        assert type(value) is np.ndarray
    for value in sd["param_groups"][0].values():
        assert isinstance(value, (int, float, bool, list, type(None)))


def test_load_state_dict_puts_state_on_the_params_namespace(xp):
    source = optim_core.Adam([np.ones(3)], lr=0.1)
    source.step([np.ones(3)])
    target = optim_core.Adam([xp.asarray(np.ones(3))], lr=0.1)
    target.load_state_dict(source.state_dict())
    state = target.state[0][0]["exp_avg"]
    assert type(state) is type(target.params[0])
    np.testing.assert_allclose(xp.to_numpy(state), 0.1)


def test_load_state_dict_validates_before_changing_anything():
    opt = optim_core.Adam([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    good = opt.state_dict()
    before = {k: v.copy() for k, v in opt.state[0][0].items()}
    bad_shape = optim_core.Adam([np.ones(4)]).state_dict()
    bad_shape["state"] = [{"exp_avg": np.ones(4), "exp_avg_sq": np.ones(4)}]
    bad_shape["group_state"] = [{"step": 1}]
    for bad in (bad_shape, {**good, "optimizer": "SGD"}, {**good, "format_version": 99},
                {**good, "group_state": [{"step": 1.5}]}):
        with pytest.raises(ValueError):
            opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1
    for k, v in before.items():
        np.testing.assert_array_equal(opt.state[0][0][k], v)


def test_step_counter_is_an_exact_integer_beyond_float32_precision():
    # torch's float32 step counter stops at 2**24, freezing bias correction; ours is an int.
    p = np.zeros(1)
    opt = optim_core.Adam([p], lr=0.1, betas=(0.9, 1 - 2.0**-30))
    opt.group_state[0]["step"] = 2**24
    opt.step([np.ones(1)])
    assert opt.group_state[0]["step"] == 2**24 + 1
    assert isinstance(opt.group_state[0]["step"], int)
    state = {"t": 2**24}
    expected = reference_adam(np.zeros(1), np.ones(1), state,
                              {"lr": 0.1, "betas": (0.9, 1 - 2.0**-30)})
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_mixed_namespaces_name_the_offending_parameter():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="'b'"):
        optim_core.SGD({"a": np.ones(2), "b": torch.ones(2)})


def test_gradient_from_another_library_is_refused():
    torch = pytest.importorskip("torch")
    opt = optim_core.SGD({"a": np.ones(2)})
    with pytest.raises(TypeError, match="grad of 'a'"):
        opt.step({"a": torch.ones(2, dtype=torch.float64)})


def test_backend_selector():
    import array_api_compat.numpy as compat_numpy

    xp = optim_core._namespace.namespace_of(np.ones(1))
    assert select_backend("auto", xp).name == "numpy"
    assert select_backend("numpy", xp).name == "numpy"
    assert select_backend(np, xp).name == "numpy"
    assert select_backend(compat_numpy, xp).name == "numpy"
    with pytest.raises(TypeError, match="cupy"):
        select_backend("cupy", xp)
    with pytest.raises(ValueError, match="backend must be"):
        select_backend("tpu", xp)


def test_backend_argument_must_match_the_params(xp):
    p = xp.asarray(np.ones(2))
    assert optim_core.SGD([p], backend="auto").backend.xp is xp.xp
    if xp.name != "numpy":
        with pytest.raises(TypeError, match="numpy"):
            optim_core.SGD([p], backend="numpy")


def test_implementation_choice_is_explained():
    opt = optim_core.Adam([np.ones(2)], impl="generic")
    assert opt.implementation.name == "generic"
    assert "generic" in opt.implementation_reason
    with pytest.raises(ValueError, match="impl must be"):
        optim_core.Adam([np.ones(2)], impl="fastest")


def test_fused_where_none_exists_is_an_error_not_a_fallback():
    strict = pytest.importorskip("array_api_strict")
    p = strict.ones(3, dtype=strict.float64)
    with pytest.raises(ValueError, match="fused"):
        optim_core.Adam([p], impl="fused")
    assert optim_core.Adam([p], impl="auto").implementation.name == "generic"


def test_importing_optim_core_never_imports_cupy():
    code = ("import sys, optim_core, optim_core.backends, numpy as np;"
            "optim_core.Adam([np.ones(3)]).step([np.ones(3)]);"
            "assert 'cupy' not in sys.modules, 'cupy was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_immutable_arrays_get_new_arrays_back():
    # JAX-style arrays cannot be written; array_api_strict ones can, so emulate with a
    # NumPy subclass that is not writeable through array_api_compat's eyes.
    jnp = pytest.importorskip("jax.numpy")
    p = jnp.ones(3)
    opt = optim_core.SGD([p], lr=0.5)
    (new,) = opt.step([jnp.ones(3)])
    assert new is not p
    np.testing.assert_allclose(np.asarray(new), 0.5)
    np.testing.assert_allclose(np.asarray(p), 1.0)
    assert opt.params[0] is new


def test_repr_names_hyperparameters_and_implementation():
    text = repr(optim_core.Lion([np.ones(2)]))
    assert text.startswith("Lion(lr=0.0001, betas=(0.9, 0.99)")
    assert "impl=" in text
