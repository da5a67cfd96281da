"""Adafactor (Shazeer & Stern 2018) against torch.optim.Adafactor, and the rule language's
axis reductions and shaped states it is written with.

Every option is checked in float64 over 120 steps on parameters of 0, 1, 2 and 3
dimensions (torch factors the last two), states included; the generic path on
array_api_strict against the NumPy reference; empty tensors; state dicts of states
shaped unlike their parameters; and what the language refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
from optim_db import BY_NAME

import optim_core
from optim_core import update_rule
from optim_core.optim.language import RuleError

SHAPES = [(), (7,), (5, 6), (3, 4, 5)]
STEPS = 120
RTOL = 1e-9
#: torch's state names are ours.
TORCH_CASES = [
    {},
    {"lr": 0.05},
    {"lr": 0.05, "beta2_decay": -0.5},
    {"lr": 0.05, "eps": (1e-20, 1e-3)},
    {"lr": 0.05, "eps": (1e-6, 0.0)},
    {"lr": 0.05, "eps": (None, 0.1)},
    {"lr": 0.05, "d": 1.5},
    {"lr": 0.05, "d": 4.0, "weight_decay": 0.1},
    {"lr": 0.05, "maximize": True},
    {"lr": 0.3, "beta2_decay": -1.0, "eps": (1e-4, 1e-2), "d": 1.2, "weight_decay": 0.5,
     "maximize": True},
]


def _params(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in SHAPES]


def _grads(rng: np.random.Generator, params: list) -> list[np.ndarray]:
    # Gradients of differing scales per row and column: the factors matter.
    return [rng.standard_normal(np.shape(p)) * (1 + np.abs(np.asarray(p))) for p in params]


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-300),
                        initial=0.0))


@pytest.mark.parametrize("hyper", TORCH_CASES, ids=str)
def test_matches_torch_adafactor_float64_every_option(hyper):
    torch = pytest.importorskip("torch")
    start = _params()
    opt = optim_core.Adafactor([p.copy() for p in start], **hyper)
    tensors = [torch.tensor(p, requires_grad=True) for p in start]
    theirs = torch.optim.Adafactor(tensors, **hyper, foreach=False)
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(STEPS):
        grads = _grads(rng, opt.params)
        ours = opt.step(grads)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = torch.tensor(grad)
        theirs.step()
        for mine, tensor in zip(ours, tensors):
            worst = max(worst, _relative(mine, tensor.detach().numpy()))
    assert worst < RTOL
    for state, tensor in zip(opt.state[0], tensors):
        torch_state = theirs.state[tensor]
        names = {k for k in torch_state if k != "step" and torch_state[k] is not None}
        assert set(state) == names  # row_var, col_var for 2+ dimensions, variance otherwise
        for name in names:
            assert tuple(state[name].shape) == tuple(torch_state[name].shape)
            assert _relative(state[name], torch_state[name].numpy()) < RTOL


def test_foreach_torch_agrees_too_and_groups_keep_their_options():
    torch = pytest.importorskip("torch")
    start = _params(3)
    groups = [{"params": [start[0].copy(), start[2].copy()]},
              {"params": [start[1].copy(), start[3].copy()], "lr": 0.2, "weight_decay": 0.1}]
    opt = optim_core.Adafactor(groups, lr=0.05, d=2.0)
    tensors = [torch.tensor(p, requires_grad=True) for p in (start[0], start[2], start[1],
                                                              start[3])]
    theirs = torch.optim.Adafactor([{"params": tensors[:2]},
                                    {"params": tensors[2:], "lr": 0.2, "weight_decay": 0.1}],
                                   lr=0.05, d=2.0, foreach=True)
    rng = np.random.default_rng(4)
    for _ in range(100):
        grads = _grads(rng, opt.params)
        ours = opt.step(grads)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = torch.tensor(grad)
        theirs.step()
    for mine, tensor in zip(ours, tensors):
        assert _relative(mine, tensor.detach().numpy()) < RTOL


def test_generic_path_on_array_api_strict_matches_the_reference():
    xp = pytest.importorskip("array_api_strict")
    hyper = {"lr": 0.05, "beta2_decay": -0.6, "d": 1.5, "weight_decay": 0.1,
             "eps": (1e-12, 1e-3)}
    start = _params(5)
    opt = optim_core.Adafactor([xp.asarray(p) for p in start], **hyper)
    assert opt.backend.name == "array_api_strict"
    expected, states = [p.copy() for p in start], [{} for _ in start]
    rng = np.random.default_rng(6)
    for _ in range(100):
        grads = _grads(rng, expected)
        ours = opt.step([xp.asarray(g) for g in grads])
        expected = [reference.adafactor(p, g, s, hyper)
                    for p, g, s in zip(expected, grads, states)]
    for mine, want in zip(ours, expected):
        assert _relative(np.asarray(mine), want) < RTOL


def test_float32_eps1_defaults_to_the_dtypes_machine_epsilon():
    torch = pytest.importorskip("torch")
    start = [p.astype(np.float32) for p in _params(8)]
    opt = optim_core.Adafactor([p.copy() for p in start], lr=0.05)
    tensors = [torch.tensor(p, requires_grad=True) for p in start]
    theirs = torch.optim.Adafactor(tensors, lr=0.05, foreach=False)
    rng = np.random.default_rng(9)
    for _ in range(30):
        grads = [g.astype(np.float32) for g in _grads(rng, start)]
        ours = opt.step(grads)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = torch.tensor(grad)
        theirs.step()
    for mine, tensor in zip(ours, tensors):
        assert mine.dtype == np.float32
        np.testing.assert_allclose(mine, tensor.detach().numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)], ids=str)
def test_empty_tensors_step_to_no_change_with_finite_states(shape):
    # torch divides by the zero size (ZeroDivisionError); ours steps them, unchanged.
    param = np.zeros(shape)
    opt = optim_core.Adafactor([param, np.ones(3)], lr=0.1, weight_decay=0.1)
    with np.errstate(all="raise"):
        for _ in range(3):
            opt.step([np.zeros(shape), np.ones(3)])
    assert opt.params[0].shape == shape
    state = opt.state[0][0]
    assert set(state) == ({"row_var", "col_var"} if len(shape) >= 2 else {"variance"})
    for value in state.values():
        assert np.all(np.isfinite(value))


def test_state_dict_round_trip_of_factored_states():
    start = _params(10)
    rng = np.random.default_rng(11)
    grads = [_grads(rng, start) for _ in range(10)]
    a = optim_core.Adafactor([p.copy() for p in start], lr=0.05, weight_decay=0.1)
    for g in grads[:5]:
        a.step(g)
    saved = a.state_dict()
    shapes = [{k: v.shape for k, v in st.items()} for st in saved["state"]]
    assert shapes == [{"variance": ()}, {"variance": (7,)},
                      {"row_var": (5, 1), "col_var": (1, 6)},
                      {"row_var": (3, 4, 1), "col_var": (3, 1, 5)}]
    b = optim_core.Adafactor([p.copy() for p in a.params], lr=0.05, weight_decay=0.1)
    b.load_state_dict(saved)
    for g in grads[5:]:
        pa, pb = a.step(g), b.step(g)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)


def test_state_dict_of_wrong_shapes_is_refused_with_nothing_changed():
    opt = optim_core.Adafactor(_params(12), lr=0.05)
    opt.step(_grads(np.random.default_rng(0), opt.params))
    saved = opt.state_dict()
    before = {k: v.copy() for k, v in opt.state[0][2].items()}
    full = dict(saved, state=[dict(st) for st in saved["state"]])
    full["state"][2]["row_var"] = np.zeros((5, 6))  # the parameter's shape: wrong here
    with pytest.raises(ValueError, match="row_var.*shape"):
        opt.load_state_dict(full)
    vector = dict(saved, state=[dict(st) for st in saved["state"]])
    vector["state"][2] = {"variance": np.zeros((5, 6))}  # a matrix has no variance
    with pytest.raises(ValueError, match="variance"):
        opt.load_state_dict(vector)
    for name, value in before.items():
        np.testing.assert_array_equal(opt.state[0][2][name], value)


FUSED_CASES = [
    {},  # the first step's lerp takes its end side (weight 1), the later ones the start's
    {"lr": 0.05, "beta2_decay": -0.5, "eps": (1e-20, 1e-2), "d": 1.5, "weight_decay": 0.1,
     "maximize": True},
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("hyper", FUSED_CASES, ids=str)
def test_fused_numpy_loops_match_the_generic_path(hyper, dtype):
    pytest.importorskip("numba")
    # Factored (2-D, 3-D, a single row or column, matrices of one element as a 1x1
    # convolution's, which take the elementwise kernels) and unfactored (0-d, 1-D)
    # tensors, and empty ones, in one group: each takes its own specialization.
    shapes = [*SHAPES, (1, 9), (9, 1), (4, 3, 1, 1), (1, 1), (0,), (0, 3), (4, 0)]
    rng = np.random.default_rng(15)
    start = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    generic = optim_core.Adafactor([p.copy() for p in start], **hyper, impl="generic")
    fused = optim_core.Adafactor([p.copy() for p in start], **hyper, impl="fused")
    assert fused.implementation_reason == "fused numpy kernel for adafactor"
    for _ in range(12):
        grads = [g.astype(dtype) for g in _grads(rng, generic.params)]
        expected, got = generic.step(grads), fused.step(grads)
    # float64 sums in the fused loops, the dtype's own (pairwise) in NumPy's.
    rtol = 1e-12 if dtype == "float64" else 2e-5
    for want, have, a, b in zip(expected, got, generic.state[0], fused.state[0]):
        assert have.dtype == np.dtype(dtype)
        np.testing.assert_allclose(have, want, rtol=rtol, atol=0)
        assert set(a) == set(b)
        for name in a:
            assert b[name].shape == a[name].shape
            np.testing.assert_allclose(b[name], a[name], rtol=rtol, atol=0)


def test_fused_loops_of_a_large_matrix_run_multi_threaded_and_match():
    pytest.importorskip("numba")
    from optim_core.backends._numba import _PARALLEL_MIN_SIZE

    rng = np.random.default_rng(16)
    start = [rng.standard_normal((1030, _PARALLEL_MIN_SIZE // 1024))]
    generic = optim_core.Adafactor([p.copy() for p in start], lr=0.05, impl="generic")
    fused = optim_core.Adafactor([p.copy() for p in start], lr=0.05, impl="fused")
    for _ in range(3):
        grads = _grads(rng, start)
        expected, got = generic.step(grads), fused.step(grads)
    # Sums of a million terms in another order: elements that nearly cancel differ in
    # their last digits (absolute 1e-14 here).
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-13)
    for name in ("row_var", "col_var"):
        np.testing.assert_allclose(fused.state[0][0][name], generic.state[0][0][name],
                                   rtol=1e-12, atol=0)


def test_flat_buffers_and_quantized_states_are_refused():
    with pytest.raises(ValueError, match="flat=True"):
        optim_core.Adafactor([np.ones((3, 4))], flat=True)
    with pytest.raises(ValueError, match="state_bits"):
        optim_core.Adafactor([np.ones((3, 4))], state_bits=8)


@pytest.mark.parametrize(("hyper", "match"), [
    ({"beta2_decay": 0.1}, "beta2_decay"), ({"d": 0.5}, "d"), ({"eps": (-1.0, 1e-3)}, "eps"),
    ({"eps": (None, -1.0)}, "eps"), ({"eps": 1e-3}, "eps"), ({"lr": -1.0}, "lr"),
    ({"weight_decay": -0.1}, "weight_decay")])
def test_hyperparameters_torch_refuses_are_refused(hyper, match):
    with pytest.raises((ValueError, TypeError), match=match):
        optim_core.Adafactor([np.ones(3)], **hyper)


def test_registered_by_name_with_torchs_defaults():
    opt = optim_core.Adafactor([np.ones(2)])
    group = opt.param_groups[0]
    assert (group["lr"], group["beta2_decay"], group["eps"], group["d"],
            group["weight_decay"], group["maximize"]) == (1e-2, -0.8, (None, 1e-3), 1.0, 0.0,
                                                          False)
    assert BY_NAME["Adafactor"].cls is optim_core.optim.registry.optimizer_class("adafactor")


# ---------------------------------------------------------------- the language
def test_axis_reductions_broadcast_and_keep_leading_axes():
    @update_rule(optional_states=("rows", "cols"), state_shapes={"rows": "rows",
                                                                 "cols": "cols"})
    def means(param, grad, rows, cols):
        rows = row_mean(grad)  # noqa: F821 - bound when the rule runs
        cols = col_mean(grad)  # noqa: F821
        param = param - rows * cols
        return param, rows, cols

    grad = np.arange(24.0).reshape(2, 3, 4)
    rows, cols = np.zeros((2, 3, 1)), np.zeros((2, 1, 4))
    new, new_rows, new_cols = means(np, np.zeros_like(grad), grad,
                                    {"rows": rows, "cols": cols}, {})
    np.testing.assert_array_equal(new_rows, grad.mean(axis=-1, keepdims=True))
    np.testing.assert_array_equal(new_cols, grad.mean(axis=-2, keepdims=True))
    np.testing.assert_array_equal(new, -new_rows * new_cols)


def test_a_state_assigned_a_value_of_more_axes_is_refused():
    with pytest.raises(RuleError, match="'rows'-shaped.*cols"):
        @update_rule(optional_states=("r",), state_shapes={"r": "rows"})
        def bad(param, grad, r):
            r = r + grad
            return param, r


def test_axis_reductions_of_scalars_or_two_arguments_are_refused():
    with pytest.raises(RuleError, match="axis reduction is of an array"):
        @update_rule()
        def of_scalars(param, grad, *, lr):
            param = param - row_mean(lr) * grad  # noqa: F821
            return (param,)
    with pytest.raises(RuleError, match="a reduction exactly one"):
        @update_rule()
        def two(param, grad):
            param = param - col_mean(grad, param)  # noqa: F821
            return (param,)


def test_state_shapes_must_name_optional_states_of_known_kinds():
    with pytest.raises(RuleError, match="optional"):
        @update_rule(state_shapes={"r": "rows"})
        def required(param, grad, r):
            return param, r
    with pytest.raises(TypeError, match="state_shapes"):
        @update_rule(optional_states=("r",), state_shapes={"r": "diagonal"})
        def unknown(param, grad, r):
            return param, r


def test_optim_core_torch_adafactor_matches_torch_and_loads_its_state_dict():
    torch = pytest.importorskip("torch")
    import optim_core.torch as oct

    start = _params(13)
    ours = [torch.nn.Parameter(torch.tensor(p)) for p in start]
    theirs = [torch.nn.Parameter(torch.tensor(p)) for p in start]
    mine = oct.Adafactor(ours, lr=0.05, weight_decay=0.1)
    reference_opt = torch.optim.Adafactor(theirs, lr=0.05, weight_decay=0.1)
    rng = np.random.default_rng(14)
    for _ in range(100):
        grads = _grads(rng, start)
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = torch.tensor(g), torch.tensor(g)
        mine.step()
        reference_opt.step()
    for a, b in zip(ours, theirs):
        assert _relative(a.detach().numpy(), b.detach().numpy()) < RTOL
        assert {k: tuple(v.shape) for k, v in mine.state[a].items()} == {
            k: tuple(v.shape) for k, v in reference_opt.state[b].items()}
    mine.load_state_dict(reference_opt.state_dict())  # torch's own, factored states and all
    assert tuple(mine.state[ours[2]]["row_var"].shape) == (5, 1)


def test_functional_refuses_shaped_states():
    with pytest.raises(TypeError, match="shaped otherwise"):
        optim_core.functional("adafactor")


def test_matrices_of_one_element_are_one_norm_pass_and_the_update():
    # A 1x1 convolution's matrices have one element: its row and column means are the
    # terms themselves, so the factored body is an elementwise kernel with Adafactor's
    # two norms in one reduction pass (the factored loops take four passes and a loop
    # per row of one element).
    from optim_core.backends._factored import collapsed
    from optim_core.backends._lowering import lower

    from optim_core.optim import rules_pertensor

    opt = optim_core.Adafactor([np.zeros((4, 3, 1, 1))])
    scalars, _ = opt.step_scalars(opt.param_groups[0], opt.group_state[0])
    scalars = {**scalars, **opt.tensor_scalars(opt.param_groups[0], scalars, (4, 3, 1, 1),
                                               np.float64)}
    _, _, kernel = lower(rules_pertensor.adafactor, scalars, frozenset({"row_var", "col_var"}))
    flat = collapsed(kernel)
    assert {r.kind for r in kernel.reductions} >= {"row_mean", "col_mean"}
    assert [r.kind for r in flat.reductions] == ["norm", "size", "norm", "size"]
    assert flat.n_stages == 1 and kernel.n_stages > 1


def test_the_factored_loops_allocate_nothing_of_the_tensors_size():
    # Architecture principle 3: no full-size temporary. The loops' scratch is per row, per
    # column or per chunk; the generated source allocates nothing of n (the element count).
    import re

    from optim_core.backends._factored import factored_source
    from optim_core.backends._lowering import lower

    from optim_core.optim import rules_pertensor

    for hyper in FUSED_CASES:
        opt = optim_core.Adafactor([np.zeros((6, 5))], **hyper)
        scalars, _ = opt.step_scalars(opt.param_groups[0], opt.group_state[0])
        scalars = {**scalars, **opt.tensor_scalars(opt.param_groups[0], scalars, (6, 5),
                                                   np.float64)}
        _, _, kernel = lower(rules_pertensor.adafactor, scalars,
                             frozenset({"row_var", "col_var"}))
        source = factored_source(kernel, "float64", rules_pertensor.adafactor.state_shapes)
        sizes = re.findall(r"np\.(?:empty|zeros)\(([^,)]*)", source)
        assert sizes and all(re.search(r"\bn\b", size) is None for size in sizes), sizes
