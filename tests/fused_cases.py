"""What the fused-vs-generic tests share: the cases, inputs, tolerances and a recorder.

The cases are each optimizer's ``fused_cases`` in ``optim_db.py``: together they take
both sides of every ``if`` (and of every ``lerp``) of its rule (test_optim_db.py checks
it), so every specialization a fused kernel can take is compared with the generic path
somewhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from optim_core.backends._generic import GENERIC, PreparedStep
from optim_db import case_id, fused_cases

import optim_core

#: Steps each case runs: enough for RAdam to rectify and SGD to leave its first step.
STEPS = 12

#: (optimizer, options) of every fused case in optim_db.py.
CASES: list[tuple[str, dict]] = fused_cases()
IDS = [case_id(name, hyper) for name, hyper in CASES]


def reduces(name: str, hyper: dict) -> bool:
    """Whether the optimizer's steps with these options reduce each tensor (``norm``,
    ``sum``: LAMB, ``cautious=True``), which takes separate tests: flat buffers refuse
    them, and their CUDA kernels launch a reduction pass first (test_cuda_reductions.py)."""
    from optim_core.backends._lowering import reductions_taken

    opt = getattr(optim_core, name)([np.ones(2)], **hyper, impl="generic")
    group = opt.param_groups[0]
    scalars, _ = opt.step_scalars(group, opt.group_state[0])
    present = frozenset(opt.rule.states) - opt.rule.optional_states | opt.active_states(group)
    return bool(reductions_taken(opt.rule, scalars, present))


#: The cases whose steps are elementwise only, and those that reduce each tensor.
ELEMENTWISE_CASES = [(name, hyper) for name, hyper in CASES if not reduces(name, hyper)]
REDUCING_CASES = [(name, hyper) for name, hyper in CASES if reduces(name, hyper)]
ELEMENTWISE_IDS = [case_id(name, hyper) for name, hyper in ELEMENTWISE_CASES]
#: The rule names each kind of case covers.
ELEMENTWISE_CASE_RULES = {getattr(optim_core, name).rule.name for name, _ in ELEMENTWISE_CASES}
REDUCING_CASE_RULES = {getattr(optim_core, name).rule.name for name, _ in REDUCING_CASES}

#: Fused equals generic to these tolerances (the issue's targets).
TOLERANCE = {"float32": dict(rtol=1e-6, atol=1e-7), "float64": dict(rtol=1e-12, atol=1e-14)}


def start_params(dtype: str) -> dict[str, np.ndarray]:
    """Host arrays of several shapes, a 0-d one included."""
    rng = np.random.default_rng(7)
    return {"matrix": rng.standard_normal((37, 29)).astype(dtype),
            "vector": rng.standard_normal(101).astype(dtype),
            "scalar": np.asarray(rng.standard_normal(), dtype=dtype)}


def gradient(param: np.ndarray, step: int) -> np.ndarray:
    """Depends on the parameter, so a wrong step compounds over later steps.

    Includes exact zeros, where ``sign`` and divisions by a small denominator matter.
    """
    g = 1.5 * (param - 0.5) + 0.1 * np.cos(step + np.arange(param.size)).reshape(param.shape)
    g = np.asarray(g, dtype=param.dtype)
    if g.size > 3:
        g.reshape(-1)[::7] = 0
    return g


class GenericStepRecorder:
    """An implementation that runs the generic path and records each call's inputs and
    outputs (copies)."""

    name = "generic"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def prepare(self, rule, xp, params, grads, states, scalars, cache=None):
        checked = GENERIC.prepare(rule, xp, params, grads, states, scalars)
        return PreparedStep(lambda: self.step(rule, xp, params, grads, states, scalars,
                                              checked))

    def step(self, rule, xp, params, grads, states, scalars, checked=None):
        before = {"params": [p.copy() for p in params], "grads": [g.copy() for g in grads],
                  "states": [{k: v.copy() for k, v in s.items()} for s in states]}
        out = (checked or GENERIC.prepare(rule, xp, params, grads, states, scalars)).run()
        self.calls.append({"rule": rule, "scalars": dict(scalars), **before,
                           "new_params": [p.copy() for p in out],
                           "new_states": [{k: v.copy() for k, v in s.items()} for s in states]})
        return out


def recorded_generic_steps(dtypes: Iterable[str], cases: Iterable[tuple[str, dict]] = CASES,
                           steps: int = STEPS) -> list[dict]:
    """Every generic step call of every case, for each dtype, in order.

    Each call: ``rule``, ``scalars``, ``params``, ``grads``, ``states`` (before),
    ``new_params``, ``new_states`` (one entry per tensor) and ``case``.
    """
    calls = []
    for name, hyper in cases:
        for dtype in dtypes:
            params = start_params(dtype)
            opt = getattr(optim_core, name)(params, **hyper, impl="generic")
            opt.implementation = recorder = GenericStepRecorder()
            for step in range(steps):
                opt.step({k: gradient(v, step) for k, v in params.items()})
            for call in recorder.calls:
                call["case"] = f"{name}{hyper}-{dtype}"
            calls += recorder.calls
    return calls
