"""Step plans of the fused NumPy path (issue 17, item 1).

After its first step, a group's tensors are stepped through a kept table: one compiled
call per specialization however many tensors there are, with the same numbers as the
per-tensor path. Whatever changes between steps (an array resized, replaced or made
read-only or non-contiguous, a state dict written or replaced, a gradient of another
kind) is seen before any kernel runs, and the step then takes the full path: it steps
correctly, or raises and changes nothing, exactly as without a plan.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
from optim_core.backends._fused import StateDict
from optim_core.backends._numba_plan import array_layout, table_parts
from test_step_safety import snapshot

import optim_core

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba not installed")


def shapes_and_dtypes():
    """Mixed dtypes (the table is sorted by dtype), a 0-d and an empty tensor."""
    rng = np.random.default_rng(3)
    return [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5),
            np.asarray(0.25, np.float32), np.zeros(0, np.float32),
            rng.standard_normal((2, 2, 2)).astype(np.float32), rng.standard_normal(7)]


def grads_of(params, step: int):
    return [np.asarray(np.cos(step + np.arange(p.size)).reshape(p.shape) - 0.3 * p, p.dtype)
            for p in params]


class FullPath(list):
    """Gradients in a list subclass: a step plan takes exact lists, so these go the full
    (per-tensor) path."""


def test_the_array_layout_is_verified_on_this_numpy():
    assert array_layout() is not None


@pytest.mark.parametrize("name, options", [("Adam", {"amsgrad": True, "weight_decay": 0.1}),
                                           ("SGD", {"momentum": 0.9, "nesterov": True}),
                                           ("Lion", {})])
def test_planned_steps_equal_per_tensor_steps_and_take_one_call_per_dtype(name, options):
    planned = shapes_and_dtypes()
    per_tensor = copy.deepcopy(planned)
    a = getattr(optim_core, name)(planned, lr=0.01, **options)
    b = getattr(optim_core, name)(per_tensor, lr=0.01, **options)
    for step in range(4):
        before = a.implementation.launches
        a.step(grads_of(planned, step))
        if step:  # two dtypes: two table calls
            assert a.implementation.launches - before == 2
        b.step(FullPath(grads_of(per_tensor, step)))
    for got, want in zip(planned, per_tensor, strict=True):
        assert got.tobytes() == want.tobytes()
    assert snapshot(a)["state"] == snapshot(b)["state"]


def stepped(steps: int = 3, n: int = 10):
    params = [np.linspace(-1.0, 1.0, n).copy(), np.linspace(0.0, 1.0, 4).copy()]
    opt = optim_core.Adam(params, lr=0.1)
    for step in range(steps):
        opt.step([np.full(n, 0.5 + step), np.ones(4)])
    assert "plan" in opt._caches[0]
    return params, opt


def test_a_planned_parameter_resized_in_place_is_refused():
    params, opt = stepped()
    params[1].resize(4000, refcheck=False)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="'1'.*resized or replaced"):
        opt.step([np.ones(10), np.ones(4000)])
    assert snapshot(opt) == before


def test_a_planned_state_resized_in_place_or_replaced_is_refused():
    params, opt = stepped()
    opt.state[0][1]["exp_avg_sq"].resize(3, refcheck=False)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="'1'.*exp_avg_sq"):
        opt.step([np.ones(10), np.ones(4)])
    assert snapshot(opt) == before
    opt.state[0][1]["exp_avg_sq"] = np.zeros(4)
    opt.step([np.ones(10), np.ones(4)])  # checked in full, then planned again
    opt.state[0][0] = {"exp_avg": np.zeros(10), "exp_avg_sq": np.zeros(3)}  # a plain dict
    before = snapshot(opt)
    with pytest.raises(ValueError, match="'0'.*exp_avg_sq"):
        opt.step([np.ones(10), np.ones(4)])
    assert snapshot(opt) == before


def test_a_planned_parameter_replaced_in_the_group_is_checked_again():
    params, opt = stepped()
    opt.param_groups[0]["params"][0] = np.zeros(4000)
    with pytest.raises(ValueError, match="'0'.*resized or replaced"):
        opt.step([np.ones(4000), np.ones(4)])
    replacement = np.zeros(10)
    opt.param_groups[0]["params"][0] = replacement
    opt.step([np.ones(10), np.ones(4)])
    assert replacement.any()


def test_a_parameter_made_read_only_is_refused_not_written_by_a_kept_plan_or_record():
    params, opt = stepped()
    params[0].flags.writeable = False
    values, before = [p.copy() for p in params], snapshot(opt)
    with pytest.raises(ValueError, match="read-only"):
        opt.step([np.ones(10), np.ones(4)])
    assert snapshot(opt) == before
    assert all(np.array_equal(p, v) for p, v in zip(params, values, strict=True))


@pytest.mark.parametrize("kind", ["float32", "strided", "matrix subclass", "shape"])
def test_gradients_the_plan_cannot_take_go_the_full_path(kind):
    params, opt = stepped()
    _, reference = stepped()
    grad = {"float32": np.ones(10, np.float32), "strided": np.ones(20)[::2],
            "matrix subclass": np.ones(10).view(np.ma.MaskedArray),
            "shape": np.ones((2, 5))}[kind]
    if kind in ("matrix subclass", "shape"):
        before = snapshot(opt)
        with pytest.raises((TypeError, ValueError)):
            opt.step([grad, np.ones(4)])
        assert snapshot(opt) == before
        return
    opt.step([grad, np.ones(4)])
    reference.step([np.ones(10), np.ones(4)])
    assert all(np.array_equal(a, b) for a, b in zip(opt.params, reference.params, strict=True))


def test_state_dicts_count_their_writes_and_pickle_as_state_dicts():
    import pickle

    from optim_core.backends._fused import state_writes

    state = StateDict(a=np.zeros(2))
    count = state_writes()
    state["b"] = np.ones(2)
    state.update(c=1)
    state.pop("c")
    state.setdefault("d", 0)
    del state["d"]
    state |= {"e": 2}
    state.popitem()
    assert state_writes() == count + 7
    copied = pickle.loads(pickle.dumps(state))
    assert type(copied) is StateDict and copied.keys() == state.keys()
    assert type(copy.deepcopy(state)) is StateDict


def test_keyed_params_and_a_second_group_are_planned():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    opt = optim_core.Adam([{"params": {"w": params["w"]}},
                           {"params": {"b": params["b"]}, "lr": 0.5}], lr=0.1)
    for _ in range(3):
        before = opt.implementation.launches
        opt.step({"b": np.ones(2, np.float32), "w": np.ones((3, 2), np.float32)})
    assert opt.implementation.launches - before == 2
    with pytest.raises(ValueError, match="missing"):
        opt.step({"w": np.ones((3, 2), np.float32), "x": np.ones(2, np.float32)})


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_non_finite_gradient_is_seen_by_a_planned_step(policy):
    params = [np.ones(5, np.float32), np.ones((2, 3))]
    opt = optim_core.Adam(params, lr=0.1, nonfinite=policy)
    for _ in range(3):
        opt.step([np.ones(5, np.float32), np.ones((2, 3))])
    assert "plan" in opt._caches[0]
    before = snapshot(opt)
    bad = np.ones((2, 3))
    bad[1, 2] = np.inf
    if policy == "raise":
        with pytest.raises(ValueError, match="non-finite gradient for parameter '1'"):
            opt.step([np.ones(5, np.float32), bad])
    else:
        opt.step([np.ones(5, np.float32), bad])
        assert opt.skipped_steps == 1
    assert snapshot(opt)["params"] == before["params"]
    assert snapshot(opt)["state"] == before["state"]
    opt.step([np.ones(5, np.float32), np.ones((2, 3))])
    assert snapshot(opt)["params"] != before["params"]


@pytest.mark.parametrize("sizes", [[0, 7, 1 << 20, 3], [5000] * 300, [1 << 21]])
def test_the_parts_of_a_threaded_pass_cover_every_element_once(sizes):
    sizes = np.array(sizes, dtype=np.int64)
    parts = table_parts(sizes, first=2)
    covered = [np.zeros(n, np.int64) for n in sizes]
    for first, start, last, stop in parts:
        for row in range(first, last + 1):
            lo = start if row == first else 0
            hi = stop if row == last else sizes[row - 2]
            covered[row - 2][lo:hi] += 1
    assert all((c == 1).all() for c in covered)
    lengths = [int(sum(sizes[r - 2] for r in range(f, l_)) - s + e) for f, s, l_, e in parts]
    assert max(lengths) - min(lengths) <= 64  # equal shares, up to the alignment


def test_many_tensors_of_one_dtype_are_stepped_in_one_threaded_call_as_per_tensor():
    # 1.2 million elements in 40 tensors of unequal sizes: one call over parts of them, on
    # all threads or on the calling one (the thread choice tries both), bit for bit as
    # the per-tensor path.
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 60_000, size=40)
    planned = [rng.standard_normal(int(n)).astype(np.float32) for n in sizes]
    per_tensor = copy.deepcopy(planned)
    a = optim_core.Adam(planned, lr=0.01, weight_decay=0.1)
    b = optim_core.Adam(per_tensor, lr=0.01, weight_decay=0.1)
    for step in range(6):
        before = a.implementation.launches
        a.step(grads_of(planned, step))
        if step:
            assert a.implementation.launches - before == 1
        b.step(FullPath(grads_of(per_tensor, step)))
        for p, q in zip(planned, per_tensor):
            assert np.array_equal(p, q)
    choice = a._caches[0]["plan"].data.choices[0]
    assert None not in choice.per_element.values()  # both loops ran
