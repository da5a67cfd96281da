"""The steady state of a planned optimizer (optim_core.optim._steady; issue 17, item 1).

Once a step has gone through the step plans, the next steps rely on a record of what it
checked (the groups, their parameter and state lists, the states each group needs).
Whatever the record would miss must still be seen: a hyperparameter that needs another
state, a policy changed, a parameter added, a state dict replaced; each step then takes
the path that checks everything, and steps as an optimizer that never had a record.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from optim_core.backends._fused import StateDict

import optim_core

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba not installed")


def grads(step: int, sizes=(10, 4)):
    return [np.cos(step + np.arange(n, dtype=np.float64)) for n in sizes]


def steady(name: str = "Adam", steps: int = 3, **options):
    params = [np.linspace(-1.0, 1.0, 10), np.linspace(0.0, 1.0, 4)]
    opt = getattr(optim_core, name)(params, lr=0.1, **options)
    for step in range(steps):
        opt.step(grads(step))
    assert opt._steady is not None and opt._steady.holds(opt)
    return params, opt


def reference(name: str = "Adam", **options):
    """The same optimizer on the per-tensor path (gradients in a list subclass, which
    plans do not take), for the numbers a step must give."""
    params = [np.linspace(-1.0, 1.0, 10), np.linspace(0.0, 1.0, 4)]
    return params, getattr(optim_core, name)(params, lr=0.1, **options)


class PerTensor(list):
    pass


def test_steady_steps_equal_the_per_tensor_path_bit_for_bit():
    params, opt = steady(steps=2)  # the first step allocates the states: the full path
    ref_params, ref = reference()
    ref.step(PerTensor(grads(0)))
    ref.step(PerTensor(grads(1)))
    for step in range(2, 7):
        opt.step(grads(step) if step % 2 else tuple(grads(step)))
        ref.step(PerTensor(grads(step)))
        assert opt._steady is not None
    for ours, theirs in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert opt.group_state == ref.group_state


def test_a_hyperparameter_written_to_need_another_state_is_followed():
    params, opt = steady("SGD", momentum=0.0)
    ref_params, ref = reference("SGD", momentum=0.0)
    for step in range(3):
        ref.step(PerTensor(grads(step)))
    opt.param_groups[0]["momentum"] = 0.9
    ref.param_groups[0]["momentum"] = 0.9
    for step in range(3, 6):
        opt.step(grads(step))
        ref.step(PerTensor(grads(step)))
    assert "momentum_buffer" in opt.state[0][0]
    for ours, theirs in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_non_finite_policy_set_after_steady_steps_is_followed():
    params, opt = steady()
    opt.nonfinite = "skip"
    before = [p.copy() for p in params]
    bad = grads(3)
    bad[1][2] = np.nan
    opt.step(bad)
    assert opt.skipped_steps == 1
    assert all(np.array_equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_parameter_appended_to_a_group_after_steady_steps_is_refused():
    params, opt = steady()
    opt.param_groups[0]["params"].append(np.zeros(3))
    with pytest.raises(ValueError, match="param group 0 now has 3 params"):
        opt.step(grads(3))


def test_a_state_dict_replaced_after_steady_steps_is_the_one_stepped():
    params, opt = steady()
    old = opt.state[0][0]
    opt.state[0][0] = StateDict({name: array.copy() for name, array in old.items()})
    kept = {name: array.copy() for name, array in old.items()}
    opt.step(grads(3))
    assert all(np.array_equal(old[name], kept[name]) for name in kept)
    assert not np.array_equal(opt.state[0][0]["exp_avg"], kept["exp_avg"])


def test_a_hyperparameter_written_by_a_schedule_is_used_at_the_next_step():
    params, opt = steady()
    ref_params, ref = reference()
    for step in range(3):
        ref.step(PerTensor(grads(step)))
    for step in range(3, 7):
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.1 / step
        opt.step(grads(step))
        ref.step(PerTensor(grads(step)))
    for ours, theirs in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_copy_of_a_steady_optimizer_makes_its_own_record():
    import copy

    params, opt = steady()
    twin = copy.copy(opt)
    assert twin._steady is None and opt._steady is not None
    twin.step(grads(3))
    twin.step(grads(4))
    assert twin._steady is not None and twin._steady is not opt._steady
