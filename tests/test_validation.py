"""Validate first, then write: every bad call raises a clear error and changes nothing.

Also the edge inputs that must just work: 0-d and zero-size parameters, strided
views (updated in place), ``lr=0`` as the identity, and the non-finite gradient
policies.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from optim_db import BY_NAME, NAMES, RICH

import optim_core
from optim_core import Optimizer


def fused_available() -> bool:
    try:
        optim_core.Adam([np.zeros(1)], impl="fused")
    except ValueError:
        return False
    return True


#: The checks live in the base class, but the edge inputs and the "nothing written"
#: guarantees are checked on each implementation that writes.
IMPLS = ["generic", pytest.param("fused", marks=pytest.mark.skipif(
    not fused_available(), reason="no fused NumPy implementation"))]


def make(name: str, params, **options) -> Optimizer:
    """The optimizer ``name`` with its rich options; generic path (checks are the base class's)."""
    return getattr(optim_core, name)(params, **{"impl": "generic", **RICH[name], **options})


def snapshot(opt: Optimizer):
    """Everything a step could change: parameter values, state, step counts, hyperparameters."""
    params = opt.params
    values = ({k: np.array(v, copy=True) for k, v in params.items()} if isinstance(params, dict)
              else [np.array(v, copy=True) for v in params])
    return values, copy.deepcopy(opt.state_dict()), opt.skipped_steps


def assert_unchanged(opt: Optimizer, before) -> None:
    values, state_dict, skipped = snapshot(opt)
    old_values, old_state_dict, old_skipped = before
    assert skipped == old_skipped
    if isinstance(values, dict):
        values, old_values = list(values.values()), list(old_values.values())
    for new, old in zip(values, old_values, strict=True):
        assert new.tobytes() == old.tobytes()
    assert_same_state_dict(state_dict, old_state_dict)


def assert_same_state_dict(a, b) -> None:
    if isinstance(b, np.ndarray):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    elif isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in b:
            assert_same_state_dict(a[k], b[k])
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state_dict(x, y)
    else:
        assert a == b or (isinstance(b, float) and math.isnan(a) and math.isnan(b))


def stepped(name: str, steps: int = 2, **options) -> Optimizer:
    """An optimizer over a dict of float32 params, after a few steps (state exists)."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)).astype(np.float32),
              "b": rng.standard_normal(2).astype(np.float32)}
    opt = make(name, params, **options)
    for _ in range(steps):
        opt.step({"w": rng.standard_normal((3, 2)).astype(np.float32),
                  "b": rng.standard_normal(2).astype(np.float32)})
    return opt


def good_grads():
    return {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}


@pytest.mark.parametrize("impl", IMPLS)
# --------------------------------------------------------------------------- grads
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mutate, error, match", [
    (lambda g: list(g.values()), TypeError, "dict"),
    (lambda g: {"w": g["w"]}, ValueError, "missing"),
    (lambda g: {**g, "extra": g["b"]}, ValueError, "unexpected"),
    (lambda g: {**g, "b": np.ones(1, np.float32)}, ValueError, "shape"),      # broadcastable
    (lambda g: {**g, "b": np.ones((1, 2), np.float32)}, ValueError, "shape"),  # broadcastable
    (lambda g: {**g, "w": g["w"].T}, ValueError, "shape"),
    (lambda g: {**g, "b": np.float32(1.0)}, ValueError, "shape"),
    (lambda g: {**g, "b": np.ones(2, np.int64)}, TypeError, "floating"),
    (lambda g: {**g, "b": np.ones(2, bool)}, TypeError, "floating"),
    (lambda g: {**g, "b": [1.0, 1.0]}, TypeError, "array"),
    (lambda g: {**g, "b": np.ones(2, np.complex64)}, TypeError, "floating"),
], ids=["list-for-dict", "missing-key", "extra-key", "broadcast-1", "broadcast-row",
        "transposed", "scalar", "int", "bool", "python-list", "complex"])
def test_bad_grads_raise_and_change_nothing(name, mutate, error, match, impl):
    opt = stepped(name, impl=impl)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(mutate(good_grads()))
    assert_unchanged(opt, before)


def test_list_params_refuse_dict_grads_and_wrong_counts():
    opt = optim_core.SGD([np.ones(2), np.ones(3)], lr=0.1)
    with pytest.raises(TypeError, match="list"):
        opt.step({"0": np.ones(2), "1": np.ones(3)})
    with pytest.raises(ValueError, match="2 params"):
        opt.step([np.ones(2)])
    with pytest.raises(TypeError):
        opt.step(np.ones(2))


def test_a_bad_last_grad_leaves_the_first_parameter_untouched():
    first, second = np.ones(3), np.ones(3)
    opt = optim_core.SGD([first, second], lr=0.1)
    with pytest.raises(ValueError):
        opt.step([np.ones(3), np.ones(4)])
    assert first.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", NAMES)
def test_float64_grads_are_rounded_to_float32_params(name):
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(5) for _ in range(3)]
    a = np.linspace(-1, 1, 5, dtype=np.float32)
    b = a.copy()
    opt_a, opt_b = make(name, [a], lr=0.01), make(name, [b], lr=0.01)
    for g in grads:
        opt_a.step([g])
        opt_b.step([g.astype(np.float32)])
    assert a.dtype == np.float32
    assert all(s.dtype == np.float32 for s in opt_a.state[0][0].values())
    assert a.tobytes() == b.tobytes()


def test_grads_from_another_library_or_device_are_refused():
    torch = pytest.importorskip("torch")
    opt = optim_core.Adam([np.ones(3)])
    before = snapshot(opt)
    with pytest.raises(TypeError, match="numpy|torch"):
        opt.step([torch.ones(3, dtype=torch.float64)])
    assert_unchanged(opt, before)
    param = torch.ones(3)
    opt = optim_core.Adam([param])
    with pytest.raises(TypeError, match="device"):
        opt.step([torch.ones(3, device="meta")])
    assert param.tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- hyperparameters
BAD_HYPERPARAMETERS = [
    ("lr", -1e-3, ValueError), ("lr", float("nan"), ValueError), ("lr", float("inf"), ValueError),
    ("lr", "0.1", ValueError), ("lr", True, ValueError), ("lr", None, ValueError),
    ("eps", -1e-8, ValueError), ("weight_decay", -0.1, ValueError),
    ("momentum", -0.5, ValueError), ("dampening", 1.5, ValueError),
    ("betas", (1.0, 0.999), ValueError), ("betas", (0.9, 1.0), ValueError),
    ("betas", (-0.1, 0.999), ValueError), ("betas", (0.9,), ValueError),
    ("betas", (0.9, float("nan")), ValueError), ("betas", 0.9, ValueError),
    ("rho", 1.5, ValueError), ("decay", -0.1, ValueError), ("decay", 1.1, ValueError),
    ("lr_decay", -1.0, ValueError), ("alpha", -0.1, ValueError),
    ("initial_accumulator_value", -1.0, ValueError), ("momentum_decay", -1.0, ValueError),
    ("amsgrad", "yes", TypeError), ("nesterov", 1, TypeError), ("centered", None, TypeError),
    ("maximize", "no", TypeError),
    # ASGD, Rprop, ADOPT, AdEMAMix.
    ("lambd", -1e-4, ValueError), ("t0", float("nan"), ValueError), ("t0", "10", TypeError),
    ("etas", (1.5, 1.2), ValueError), ("etas", (0.5, 0.9), ValueError),
    ("etas", (0.0, 1.2), ValueError), ("etas", 0.5, TypeError),
    ("step_sizes", (1.0, 0.5), ValueError), ("step_sizes", (-1e-6, 50), ValueError),
    ("use_clipping", 1, TypeError), ("clip_exponent", -0.25, ValueError),
    ("eps_root", -1e-8, ValueError), ("alpha_warmup", 2.5, TypeError),
    ("beta3_warmup", -1, ValueError), ("betas", (0.9, 0.999, 1.0), ValueError),
]


def _cases_for_bad_hyperparameters():
    for name in NAMES:
        accepted = set(make(name, [np.ones(1)]).defaults)
        for key, value, error in BAD_HYPERPARAMETERS:
            if key in accepted:
                yield pytest.param(name, key, value, error, id=f"{name}-{key}={value!r}")


BAD_CASES = list(_cases_for_bad_hyperparameters())


@pytest.mark.parametrize("name, key, value, error", BAD_CASES)
def test_bad_hyperparameters_are_refused_at_construction(name, key, value, error):
    if key == "betas" and not isinstance(value, tuple):
        error, key = (TypeError, ValueError), None  # the constructor's tuple(betas) fails first
    with pytest.raises(error, match=key):
        make(name, [np.ones(2)], **{key or "betas": value})
    with pytest.raises(error, match=key):
        make(name, [{"params": [np.ones(2)]}, {"params": [np.ones(2)], key or "betas": value}])


@pytest.mark.parametrize("name, key, value, error", BAD_CASES)
def test_bad_hyperparameter_written_between_steps_is_refused_at_once_and_changes_nothing(
        name, key, value, error):
    first, second = np.ones(3, np.float32), np.ones(2, np.float32)
    opt = make(name, [{"params": [first]}, {"params": [second]}], lr=0.1)
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])
    before = snapshot(opt)
    with pytest.raises(error, match=key):
        opt.param_groups[1][key] = value
    with pytest.raises(error, match=key):
        opt.param_groups[1].update({key: value})
    assert_unchanged(opt, before)
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])  # the group still steps
    assert opt.group_state[1]["step"] == 2


@pytest.mark.parametrize("name", NAMES)
def test_a_hyperparameter_cannot_be_removed_from_a_group(name):
    first, second = np.ones(3, np.float32), np.ones(2, np.float32)
    opt = make(name, [{"params": [first]}, {"params": [second]}], lr=0.1)
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])
    before = snapshot(opt)
    with pytest.raises(ValueError, match="lr"):
        del opt.param_groups[1]["lr"]
    with pytest.raises(ValueError, match="params"):
        del opt.param_groups[1]["params"]
    assert_unchanged(opt, before)


@pytest.mark.parametrize("momentum, dampening", [(0.0, 0.0), (0.9, 0.1)])
def test_nesterov_needs_momentum_and_no_dampening(momentum, dampening):
    with pytest.raises(ValueError, match="nesterov"):
        optim_core.SGD([np.ones(2)], momentum=momentum, dampening=dampening, nesterov=True)


def test_ademamix_beta3_warmup_needs_positive_beta1_and_beta3():
    with pytest.raises(ValueError, match="beta3_warmup needs"):
        optim_core.AdEMAMix([np.ones(2)], betas=(0.0, 0.999, 0.9999), beta3_warmup=10)
    opt = optim_core.AdEMAMix([np.ones(2)], betas=(0.0, 0.999, 0.9999))
    with pytest.raises(ValueError, match="beta3_warmup needs"):
        opt.param_groups[0]["beta3_warmup"] = 10
    assert opt.param_groups[0]["beta3_warmup"] == 0


def test_unknown_hyperparameters_and_options_are_refused():
    with pytest.raises(TypeError):
        optim_core.Adam([np.ones(2)], learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        optim_core.Adam([{"params": [np.ones(2)], "momentum": 0.9}])
    with pytest.raises(ValueError, match="nonfinite"):
        optim_core.Adam([np.ones(2)], nonfinite="ignore")
    with pytest.raises(ValueError, match="impl"):
        optim_core.Adam([np.ones(2)], impl="fastest")


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("params, error, match", [
    ([np.ones(2, np.int32)], TypeError, "floating"),
    ([np.ones(2, bool)], TypeError, "floating"),
    ([np.ones(2, np.complex128)], TypeError, "floating"),
    ([[1.0, 2.0]], TypeError, "array"),
    ([], ValueError, "no parameter"),
    ({}, ValueError, "no parameter"),
    (np.ones(3), TypeError, "params"),
    ("weights", TypeError, "params"),
    ([np.ma.masked_array(np.ones(2), mask=[True, False])], TypeError, "masked"),
], ids=["int", "bool", "complex", "python-list", "empty-list", "empty-dict", "bare-array", "str",
        "masked"])
def test_bad_params_are_refused(params, error, match):
    with pytest.raises(error, match=match):
        optim_core.Adam(params)


def test_sparse_torch_params_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="sparse"):
        optim_core.SGD([torch.ones(3, dtype=torch.float64).to_sparse()])


def test_read_only_params_are_refused_at_construction():
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        optim_core.SGD([np.ones(2), frozen])
    with pytest.raises(ValueError, match="read-only"):
        optim_core.SGD({"w": np.broadcast_to(np.ones(1), (3,))})


def test_the_same_array_twice_is_refused():
    w = np.ones(4)
    with pytest.raises(ValueError, match="same array"):
        optim_core.SGD([w, w])
    with pytest.raises(ValueError, match="same array"):
        optim_core.SGD({"a": w, "b": w[:]})
    with pytest.raises(ValueError, match="same array"):
        optim_core.SGD([{"params": [w]}, {"params": [w]}])
    torch = pytest.importorskip("torch")
    t = torch.ones(3)
    with pytest.raises(ValueError, match="same array"):
        optim_core.SGD([t, t])


@pytest.mark.parametrize("impl", IMPLS)
# --------------------------------------------------------------------------- edge inputs
@pytest.mark.parametrize("name", NAMES)
def test_zero_d_params_step_like_one_element_arrays(name, impl):
    scalar, vector = np.array(0.5), np.array([0.5])
    opt_s, opt_v = make(name, [scalar], lr=0.1, impl=impl), make(name, [vector], lr=0.1, impl=impl)
    for g in (0.3, -1.2, 0.7):
        opt_s.step([np.array(g)])
        opt_v.step([np.array([g])])
    assert scalar.shape == () and scalar.item() == vector.item() != 0.5
    assert all(s.shape == () for s in opt_s.state[0][0].values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_size_params_just_work(name, impl):
    empty, other = np.zeros((0, 3), np.float32), np.ones(2, np.float32)
    opt = make(name, {"empty": empty, "other": other}, lr=0.1, impl=impl)
    for _ in range(3):
        opt.step({"empty": np.zeros((0, 3), np.float32), "other": np.ones(2, np.float32)})
    assert empty.shape == (0, 3) and not np.array_equal(other, np.ones(2))
    assert opt.group_state[0]["step"] == 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_strided_views_are_updated_in_place(name, impl):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    original = base.copy()
    view = base[1::2, ::3]  # rows 1 and 3, columns 0 and 3: not contiguous
    reference = view.copy()
    grads = [np.full((2, 2), 0.5), np.array([[1.0, -1.0], [2.0, 0.25]])]
    opt, opt_ref = make(name, [view], lr=0.1, impl=impl), make(name, [reference], lr=0.1, impl=impl)
    for g in grads:
        assert opt.step([g])[0] is view
        opt_ref.step([g])
    assert np.array_equal(base[1::2, ::3], reference)
    assert not np.array_equal(reference, original[1::2, ::3])
    untouched = np.ones(base.shape, bool)
    untouched[1::2, ::3] = False
    assert np.array_equal(base[untouched], original[untouched])


def test_strided_torch_views_are_updated_in_place():
    torch = pytest.importorskip("torch")
    base = torch.zeros(4, 4, dtype=torch.float64)
    view = base[:, 1]
    opt = optim_core.Adam([view], lr=0.1)
    opt.step([torch.ones(4, dtype=torch.float64)])
    assert torch.all(base[:, 1] < 0) and torch.all(base[:, [0, 2, 3]] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_is_the_identity(name, impl):
    rng = np.random.default_rng(5)
    params = [rng.standard_normal((3, 3)), rng.standard_normal(4).astype(np.float32)]
    before = [p.copy() for p in params]
    opt = make(name, params, **BY_NAME[name].lr_zero, lr=0.0, impl=impl)
    for _ in range(4):
        opt.step([rng.standard_normal((3, 3)), rng.standard_normal(4).astype(np.float32)])
    for p, b in zip(params, before, strict=True):
        assert p.tobytes() == b.tobytes()


@pytest.mark.parametrize("impl", IMPLS)
# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_leaves_everything_untouched_and_counts(name, bad, impl):
    opt = stepped(name, nonfinite="skip", impl=impl)
    clean = stepped(name, impl=impl)
    before = snapshot(opt)
    grads = good_grads()
    grads["b"][1] = bad
    opt.step(grads)
    opt.step(grads)
    values, state_dict, skipped = snapshot(opt)
    assert skipped == 2 and opt.skipped_steps == 2
    assert_unchanged(opt, (before[0], before[1], 2))
    # Afterwards the run continues exactly as if the bad steps never came.
    opt.step(good_grads())
    clean.step(good_grads())
    for a, b in zip(opt.params.values(), clean.params.values(), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_skip_before_the_first_step_creates_no_state(name, impl):
    w = np.ones(3)
    opt = make(name, {"w": w}, nonfinite="skip", impl=impl)
    opt.step({"w": np.array([1.0, np.nan, 1.0])})
    assert opt.state == [[{}]] and opt.group_state[0]["step"] == 0 and opt.skipped_steps == 1
    assert w.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_raise_names_the_parameter_and_writes_nothing(name, impl):
    opt = stepped(name, nonfinite="raise", impl=impl)
    before = snapshot(opt)
    grads = good_grads()
    grads["b"][0] = np.nan
    with pytest.raises(ValueError, match="'b'"):
        opt.step(grads)
    assert_unchanged(opt, before)


def test_propagate_lets_nan_through_unchecked():
    w = np.ones(3)
    opt = optim_core.SGD([w], lr=0.1)
    assert opt.nonfinite == "propagate"
    opt.step([np.array([np.nan, 1.0, 1.0])])
    assert np.isnan(w[0]) and w[1] == 0.9


def test_nonfinite_policy_works_on_other_libraries(xp):
    w = xp.asarray([1.0, 2.0])
    opt = optim_core.Adam([w], nonfinite="skip")
    out = opt.step([xp.asarray([float("nan"), 1.0])])
    assert xp.to_numpy(out[0]).tolist() == [1.0, 2.0] and opt.skipped_steps == 1
    opt = optim_core.Adam([w], nonfinite="raise")
    with pytest.raises(ValueError, match="'0'"):
        opt.step([xp.asarray([1.0, float("inf")])])


# --------------------------------------------------------------------------- load_state_dict
def _set(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _drop(path):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


BAD_STATE_DICTS = [
    (_set(["format_version"], 99), ValueError, "format"),
    (_set(["optimizer"], "Nonesuch"), ValueError, "Nonesuch"),
    (_drop(["state"]), ValueError, "lacks"),
    (_drop(["param_groups"]), ValueError, "lacks"),
    (_drop(["group_state"]), ValueError, "lacks"),
    (lambda d: d["param_groups"].append(d["param_groups"][0]), ValueError, "param groups"),
    (lambda d: d["state"].pop(), ValueError, "state for"),
    (_set(["param_groups", 0, "lr"], -1.0), ValueError, "lr"),
    (_set(["param_groups", 0, "bogus"], 1.0), ValueError, "unknown hyperparameters"),
    (_set(["group_state", 0, "step"], True), ValueError, "step"),
    (_set(["group_state", 0, "step"], -1), ValueError, "step"),
    (_set(["group_state", 0, "step"], 2.0), ValueError, "step"),
    (_set(["group_state", 0, "extra"], 1.0), ValueError, "group_state"),
    (_set(["state", 0], [1, 2]), TypeError, "dict"),
    (_set(["state", 1, "bogus"], np.zeros(2)), ValueError, "unknown state"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mutate, error, match", BAD_STATE_DICTS)
def test_bad_state_dicts_raise_and_change_nothing(name, mutate, error, match):
    source = stepped(name, steps=3)
    target = stepped(name, steps=1)
    state_dict = copy.deepcopy(source.state_dict())
    mutate(state_dict)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(state_dict)
    assert_unchanged(target, before)


def with_states(name: str) -> bool:
    """Whether the optimizer keeps per-parameter state under its rich options."""
    return bool(stepped(name, steps=1).state[0][0])


def scalar_group_state(name: str) -> list[str]:
    """The group state an optimizer keeps beyond the step count (DGD's decay_product...)."""
    return sorted(set(make(name, [np.ones(1)])._initial_group_state()) - {"step"})


@pytest.mark.parametrize("name", [n for n in NAMES if with_states(n)])
def test_state_of_the_wrong_shape_or_kind_is_refused(name):
    source, target = stepped(name, steps=3), stepped(name, steps=1)
    key = next(iter(source.state_dict()["state"][0]))
    for value, error in [(np.zeros(7), ValueError), ([0.0] * 6, TypeError), (None, TypeError)]:
        state_dict = copy.deepcopy(source.state_dict())
        state_dict["state"][0][key] = value
        before = snapshot(target)
        with pytest.raises(error):
            target.load_state_dict(state_dict)
        assert_unchanged(target, before)


@pytest.mark.parametrize("name", [n for n in NAMES if scalar_group_state(n)])
def test_missing_scalar_group_state_is_refused(name):
    for key in scalar_group_state(name):
        source, target = stepped(name, steps=3), stepped(name, steps=1)
        state_dict = source.state_dict()
        del state_dict["group_state"][0][key]
        with pytest.raises(ValueError, match=key):
            target.load_state_dict(state_dict)


def test_load_state_dict_refuses_a_non_dict():
    with pytest.raises(TypeError):
        stepped("Adam").load_state_dict([1, 2, 3])


# ------------------------------------------------------------- load_state_dict completeness
@pytest.mark.parametrize("name", [n for n in NAMES if with_states(n)])
def test_a_state_missing_a_buffer_for_some_parameters_is_refused(name):
    source, target = stepped(name, steps=3), stepped(name, steps=1)
    state_dict = copy.deepcopy(source.state_dict())
    state_dict["state"][1].popitem()  # "b" loses one buffer, "w" keeps all
    before = snapshot(target)
    with pytest.raises(ValueError, match="same state entries"):
        target.load_state_dict(state_dict)
    assert_unchanged(target, before)


def test_a_stepped_group_without_a_required_state_is_refused():
    source, target = stepped("Adam", steps=3), stepped("Adam", steps=1)
    state_dict = copy.deepcopy(source.state_dict())
    for state in state_dict["state"]:
        del state["exp_avg_sq"]
    before = snapshot(target)
    with pytest.raises(ValueError, match="lacks.*exp_avg_sq"):
        target.load_state_dict(state_dict)
    assert_unchanged(target, before)
    state_dict["group_state"][0]["step"] = 0  # never stepped: no state at all is fine
    for state in state_dict["state"]:
        state.clear()
    target.load_state_dict(state_dict)
    assert target.state == [[{}, {}]]


@pytest.mark.parametrize("name", [n for n in NAMES if scalar_group_state(n)])
@pytest.mark.parametrize("value", ["0.5", None, [0.5], float("nan"), True])
def test_non_numeric_group_state_scalars_are_refused(name, value):
    source, target = stepped(name, steps=3), stepped(name, steps=1)
    for key in scalar_group_state(name):
        state_dict = copy.deepcopy(source.state_dict())
        state_dict["group_state"][0][key] = value
        before = snapshot(target)
        with pytest.raises(ValueError, match=key):
            target.load_state_dict(state_dict)
        assert_unchanged(target, before)
        target.step(good_grads())  # and the next step still runs


@pytest.mark.parametrize("mutate, error, match", [
    (_set(["param_groups"], {"0": {"lr": 0.1}}), TypeError, "param_groups.*list"),
    (_set(["param_groups"], "groups"), TypeError, "param_groups.*list"),
    (_drop(["param_groups", 0, "params"]), ValueError, "group 0.*params"),
    (_set(["param_groups", 0], [1, 2]), TypeError, "group 0.*dict"),
    (_set(["state"], {"0": {}}), TypeError, "state.*list"),
    (_set(["group_state"], "steps"), TypeError, "group_state.*list"),
    (_set(["group_state", 0], 3), ValueError, "group_state"),
    (_set(["state", 0, "exp_avg"], np.array(["a", "b"] * 3).reshape(3, 2)), TypeError, "dtype"),
], ids=["groups-dict", "groups-str", "no-params", "group-list", "state-dict", "group-state-str",
        "group-state-int", "state-of-strings"])
def test_malformed_state_dicts_get_clear_errors_and_change_nothing(mutate, error, match):
    source, target = stepped("Adam", steps=3), stepped("Adam", steps=1)
    state_dict = copy.deepcopy(source.state_dict())
    mutate(state_dict)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(state_dict)
    assert_unchanged(target, before)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_keys_survive_state_dict_and_load_state_dict(name):
    opt = stepped(name)
    opt.param_groups[0]["initial_lr"] = 0.05  # what torch's LR schedulers add
    opt.param_groups[0].setdefault("max_lr", 0.5)
    state_dict = opt.state_dict()
    assert state_dict["param_groups"][0]["initial_lr"] == 0.05
    fresh = stepped(name, steps=0)
    fresh.load_state_dict(state_dict)
    assert fresh.param_groups[0]["initial_lr"] == 0.05 and fresh.param_groups[0]["max_lr"] == 0.5
    fresh.step(good_grads())
    made = make(name, [{"params": [np.ones(2, np.float32)], "initial_lr": 0.01}])
    assert made.param_groups[0]["initial_lr"] == 0.01
    with pytest.raises(ValueError, match="initial_lr"):
        fresh.param_groups[0]["initial_lr"] = -1.0
    del fresh.param_groups[0]["initial_lr"]  # a scheduler's own key may go again
    assert "initial_lr" not in fresh.param_groups[0]


def test_unknown_group_keys_are_refused_when_written():
    opt = stepped("Adam")
    with pytest.raises(ValueError, match="unknown hyperparameters.*'momentum'"):
        opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="names"):
        opt.param_groups[0]["names"] = ["x", "y"]
    assert "momentum" not in opt.param_groups[0]


def test_param_groups_are_mutable_mappings_checked_as_a_whole_on_update():
    from collections.abc import MutableMapping

    opt = optim_core.SGD([np.ones(2)], lr=0.1, momentum=0.9, nesterov=True)
    group = opt.param_groups[0]
    assert isinstance(group, MutableMapping) and dict(group)["lr"] == 0.1
    with pytest.raises(ValueError, match="nesterov"):
        group["momentum"] = 0.0  # one at a time, the relation breaks
    group.update(momentum=0.0, nesterov=False)  # together it holds
    assert (group["momentum"], group["nesterov"]) == (0.0, False)
    with pytest.raises(ValueError, match="nesterov"):
        group.update({"nesterov": True})
    assert group["nesterov"] is False


# ------------------------------------------------------------------- hyperparameter values
@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.int64(1),
                                   np.array(0.25), np.array(1, dtype=np.int32)],
                         ids=["float32", "float64", "int64", "0-d float", "0-d int"])
def test_numpy_scalars_and_0d_arrays_are_numbers(value):
    opt = optim_core.Adam([np.ones(2)], lr=value, eps=value,
                          betas=(np.float32(0.5), np.array(0.75)))
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == float(value)
    assert group["betas"] == (0.5, 0.75) and all(type(b) is float for b in group["betas"])
    group["lr"] = value
    assert type(group["lr"]) is float
    opt.step([np.ones(2)])
    torch = pytest.importorskip("torch")
    group["lr"] = torch.tensor(0.5, dtype=torch.float64)
    assert group["lr"] == 0.5 and type(group["lr"]) is float


def test_a_wrong_type_and_a_value_out_of_range_are_told_apart():
    with pytest.raises(TypeError, match="lr must be a number"):
        optim_core.Adam([np.ones(2)], lr="0.1")
    with pytest.raises(TypeError, match="lr must be a number"):
        optim_core.Adam([np.ones(2)], lr=np.ones(2))
    with pytest.raises(ValueError, match="lr must be >= 0") as out_of_range:
        optim_core.Adam([np.ones(2)], lr=-1)
    assert not isinstance(out_of_range.value, TypeError)
    with pytest.raises(TypeError, match="amsgrad must be a bool"):
        optim_core.Adam([np.ones(2)], amsgrad=1)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)") as beta:
        optim_core.Adam([np.ones(2)], betas=(0.9, 1.0))
    assert not isinstance(beta.value, TypeError)


def test_an_integer_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match="lr must be a finite number") as huge:
        optim_core.SGD([np.ones(2)], lr=10**400)
    assert not isinstance(huge.value, TypeError)
    opt = optim_core.SGD([np.ones(2)], lr=0.1)
    with pytest.raises(ValueError, match="finite"):
        opt.param_groups[0]["lr"] = -(10**400)
    assert opt.param_groups[0]["lr"] == 0.1


def test_integer_dict_keys_are_refused_with_a_clear_message():
    with pytest.raises(TypeError, match="names .*must be strings, got 1"):
        optim_core.SGD({1: np.ones(2)})
    with pytest.raises(TypeError, match="must be strings"):
        optim_core.SGD([{"params": {"a": np.ones(2), 2: np.ones(2)}}])


def test_the_nonfinite_policy_is_checked_when_set():
    opt = stepped("Adam", nonfinite="skip")
    with pytest.raises(ValueError, match="nonfinite"):
        opt.nonfinite = "ignore"
    assert opt.nonfinite == "skip"
    opt.nonfinite = "raise"
    grads = good_grads()
    grads["b"][0] = np.nan
    with pytest.raises(ValueError, match="'b'"):
        opt.step(grads)
