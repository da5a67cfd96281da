"""Review of the steady-state step (optim_core.optim._steady, commits 238a1a2..fd61880).

Each test is a sequence of user actions after a few steps where a steady step does not
do what the per-tensor path does (gradients in a list subclass, which plans do not take,
as in tests/test_steady_steps.py), or writes before it raises. They pass on 4889770.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from optim_core.backends._fused import StateDict

import optim_core

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba not installed")


class PerTensor(list):
    pass


def grads(step: int, sizes=(10, 4)):
    return [np.cos(step + np.arange(n, dtype=np.float64)) for n in sizes]


def pair(cls=optim_core.Adam, groups: bool = False, **options):
    """Two optimizers on equal parameters: ours (steps with a list, planned and then
    steady) and the reference (steps with a list subclass: the per-tensor path)."""
    made = []
    for _ in range(2):
        params = [np.linspace(-1.0, 1.0, 10), np.linspace(0.0, 1.0, 4)]
        given = [{"params": params[:1]}, {"params": params[1:]}] if groups else params
        made.append((params, cls(given, lr=0.1, **options)))
    return made


def step_both(ours, ref, step):
    ours[1].step(grads(step))
    ref[1].step(PerTensor(grads(step)))


def assert_same(ours, ref):
    for a, b in zip(ours[0], ref[0], strict=True):
        np.testing.assert_array_equal(a, b)
    for states_a, states_b in zip(ours[1].state, ref[1].state, strict=True):
        for st_a, st_b in zip(states_a, states_b, strict=True):
            assert set(st_a) == set(st_b)
            for name in st_a:
                np.testing.assert_array_equal(st_a[name], st_b[name], err_msg=name)
    assert ours[1].group_state == ref[1].group_state


# -- 1. a group's list of state dicts replaced ------------------------------------------

def test_a_groups_state_list_replaced_after_steady_steps_is_the_one_stepped():
    """``opt.state[0] = [...]`` (new StateDicts, e.g. restored from a checkpoint of
    one group) changes neither count nor any object holds() compares: it compares the
    recorded inner lists with themselves, never ``optimizer.state[i]``. The steady step
    goes on stepping the old, orphaned state arrays; the optimizer's own never move."""
    ours, ref = pair()
    for step in range(3):
        step_both(ours, ref, step)
    for _, opt in (ours, ref):
        opt.state[0] = [StateDict({name: array.copy() for name, array in st.items()})
                        for st in opt.state[0]]
    for step in range(3, 6):
        step_both(ours, ref, step)
    assert_same(ours, ref)


def test_state_entries_added_after_steady_steps_are_refused_as_on_the_full_path():
    """The full path refuses an ``optimizer.state`` without one entry per group
    (_check_group_structure); holds() zips the recorded lists and never looks at
    ``len(optimizer.state)``, so the steady step goes on as if nothing happened."""
    _, opt = pair()[0]
    for step in range(3):
        opt.step(grads(step))
    opt.state.append([])
    with pytest.raises(ValueError, match="one entry per"):
        opt.step(grads(3))


# -- 2. hoisted values no longer converted on a steady step ------------------------------

class WarmAdam(optim_core.Adam):
    """A custom optimizer whose scalars() uses np.where (0-d arrays), as a warm-up
    written in NumPy would."""

    def scalars(self, group, group_state):
        values = super().scalars(group, group_state)
        warm = group_state["step"] < 3
        values["step_size"] = np.where(warm, 0.5, 1.0) * values["step_size"]
        values["bias_correction2_sqrt"] = np.where(warm, 1.0, values["bias_correction2_sqrt"])
        return values


def test_scalars_that_are_0d_arrays_step_as_on_the_per_tensor_path():
    """The first planned step converts the hoisted values (float()); later ones pass
    the host program's raw values to table loops whose compile is disabled: a 0-d
    array matches no signature, TypeError from inside run() (4889770: np.float64(h))."""
    ours, ref = pair(WarmAdam)
    for step in range(6):
        step_both(ours, ref, step)
    assert_same(ours, ref)


def test_a_steady_step_that_raises_changes_nothing():
    """Same TypeError with two groups: it comes from the second group's run(), after
    the first group's parameters, states and group state were written. A 0-d array in
    a group state (ASGD's eta, e.g. read back from an .npz) is enough."""
    ours, ref = pair(optim_core.ASGD, groups=True)
    for step in range(3):
        step_both(ours, ref, step)
    for _, opt in (ours, ref):
        opt.group_state[1]["eta"] = np.array(opt.group_state[1]["eta"])
    params, opt = ours
    before = [p.copy() for p in params]
    states = [{k: v.copy() for k, v in st.items()} for group in opt.state for st in group]
    group_state = [dict(s) for s in opt.group_state]
    try:
        opt.step(grads(3))
    except TypeError:
        assert all(np.array_equal(p, b) for p, b in zip(params, before, strict=True))
        assert all(np.array_equal(st[k], kept[k])
                   for st, kept in zip((st for g in opt.state for st in g), states)
                   for k in kept)
        assert [s["step"] for s in opt.group_state] == [s["step"] for s in group_state]
        raise
    ref[1].step(PerTensor(grads(3)))
    assert_same(ours, ref)


# -- 3. the record's counts are read after the step wrote, not before it checked ---------

def test_a_state_written_while_the_kernels_run_is_not_missed(monkeypatch):
    """The table loops are nogil: another thread (a checkpoint restore, a pruning hook)
    may write a state dict while they run. SteadyRecord reads STATE_WRITES when it is
    made, after the kernels, so that write is already counted; the next steps are
    steady, holds() sees no write, and the kernels update the replaced (orphaned)
    array, while the one in the state dict never moves. Simulated here by a write made
    from inside run_table, at the point where a thread could make it."""
    ours, ref = pair()
    opt = ours[1]
    implementation = opt.implementation
    run_table = implementation.run_table
    pending = []

    def run_and_write(calls, data):
        run_table(calls, data)
        while pending:
            pending.pop()()

    monkeypatch.setattr(implementation, "run_table", run_and_write, raising=False)
    step_both(ours, ref, 0)  # allocates the states: the full path

    def replace():
        # The same write into the reference (not yet stepped: its step 1 follows), in
        # the same window: any later write would bump the shared count for ours too.
        for _, each in (ours, ref):
            each.state[0][0]["exp_avg"] = each.state[0][0]["exp_avg"].copy()

    pending.append(replace)
    step_both(ours, ref, 1)  # the planned step that makes the record
    assert not pending
    for step in range(2, 5):
        step_both(ours, ref, step)
    assert_same(ours, ref)
