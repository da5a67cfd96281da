"""The steady state of a planned optimizer: what its planned step checked, kept.

A step through step plans (:meth:`Optimizer._planned_step`) first checks that the
optimizer's structure is its own (the group list, each group's parameter list, the state
lists), which states each group needs under its hyperparameters, and that each group's
plan still holds (the same parameter and state objects, no state written since). Between
two steps of a training loop none of that changes, yet on caches a large step has just
emptied those checks cost more than the step's own host work. A :class:`SteadyRecord`,
made after a planned step, keeps what they found; the next step compares it with the
optimizer in one pass of identity tests (C loops of ``is``) and two write counts:

* :data:`~optim_core.backends._fused.STATE_WRITES`: any write to any state dict;
* :data:`~.param_group.GROUP_WRITES`: any write to any param group, after which each
  group's needed states are derived again (a schedule writing ``lr`` every step costs
  that derivation, nothing more).

Where anything differs the record is not used, and the step takes the path that checks
everything (and reports what is wrong). The record decides nothing about values: each
step still derives its scalars, checks every gradient and planned array in the compiled
pass of the plan, and writes nothing before all of that has passed.
"""

from __future__ import annotations

from operator import is_
from typing import Any

from ..backends._fused import STATE_WRITES
from .param_group import GROUP_WRITES

__all__ = ["SteadyRecord"]


class SteadyRecord:
    """The structure and plans one planned step of ``optimizer`` found (see the module
    docstring); :meth:`holds` tells whether the next step may rely on them.

    Parameters
    ----------
    optimizer : Optimizer
        Just stepped through its plans, every group.
    plans : list
        Each group's plan data (the implementation's), in group order.
    active : list of frozenset
        Each group's needed states, as that step derived them.
    """

    __slots__ = ("groups", "group_list", "params", "state_list", "states", "group_state",
                 "plans", "active", "state_writes", "group_writes", "finite", "counts",
                 "flat", "implementation")

    def __init__(self, optimizer: Any, plans: list[Any], active: list[frozenset],
                 writes: tuple[int, int]) -> None:
        # The counts as the step read them *before* its checks: a write made while it
        # checked or ran (another thread) is then seen by the next step.
        self.state_writes, self.group_writes = writes
        self.group_list = optimizer.param_groups
        self.groups = list(self.group_list)
        # Each group's parameter list object and its items, and likewise its state dicts.
        self.params = [(group["params"], list(group["params"])) for group in self.groups]
        self.state_list = optimizer.state
        self.states = [(states, list(states)) for states in self.state_list]
        self.group_state = optimizer.group_state
        self.plans, self.active = plans, active
        self.finite = optimizer.nonfinite != "propagate"
        self.counts = [len(params) for _, params in self.params]
        self.flat = [param for _, params in self.params for param in params]
        self.implementation = optimizer.implementation

    def holds(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` has the structure, states and needed states recorded."""
        groups, state = optimizer.param_groups, optimizer.state
        n = len(self.groups)
        if STATE_WRITES[0] != self.state_writes or groups is not self.group_list \
                or state is not self.state_list \
                or optimizer.group_state is not self.group_state \
                or optimizer.implementation is not self.implementation \
                or optimizer.rounding != "nearest" or len(groups) != n or len(state) != n \
                or len(optimizer.group_state) != n or not all(map(is_, groups, self.groups)):
            return False
        for (now, kept), (states_now, states_kept), states_given in zip(
                self.params, self.states, state):
            if states_given is not states_now or len(now) != len(kept) \
                    or not all(map(is_, now, kept)) or len(states_now) != len(states_kept) \
                    or not all(map(is_, states_now, states_kept)):
                return False
        writes = GROUP_WRITES[0]
        if writes != self.group_writes:
            # A hyperparameter was written (here or in another optimizer): the parameter
            # lists must still be the recorded ones, and the needed states the same.
            if any(group["params"] is not now for group, (now, _) in
                   zip(self.groups, self.params)) or any(
                    optimizer._required_states | optimizer.active_states(group) != active
                    for group, active in zip(self.groups, self.active)):
                return False
            self.group_writes = writes  # as read before these checks
        return True
