"""Optimizer x option sets that drive every branch of every rule, for fused-vs-generic tests.

Each entry takes at least one side of every ``if`` in its rule (and both sides across
the entries), so every specialization a fused kernel can take is compared with the
generic path somewhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from optim_core.backends._generic import GENERIC

import optim_core

#: Steps each case runs: enough for RAdam to rectify and SGD to leave its first step.
STEPS = 12

CASES: list[tuple[str, dict]] = [
    ("GD", {}),
    ("SGD", {"lr": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("DGD", {"lr": 0.1, "decay": 0.5}),
    ("Adagrad", {}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1,
                 "initial_accumulator_value": 0.5, "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"momentum": 0.9, "weight_decay": 0.1, "maximize": True}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "alpha": 0.9}),
    ("Adadelta", {}),
    ("Adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1, "maximize": True}),
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    # beta1 = 0.3 puts lerp's weight 1 - beta1 above 0.5: the other side of its formula.
    ("Adam", {"lr": 0.01, "betas": (0.3, 0.5), "eps": 1e-6}),
    ("AdamW", {}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.5, "amsgrad": True}),
    ("Adamax", {}),
    ("Adamax", {"lr": 0.01, "betas": (0.3, 0.95), "weight_decay": 0.1, "maximize": True}),
    ("NAdam", {}),
    ("NAdam", {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1, "maximize": True}),
    ("NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    # betas[1] = 0.9 makes RAdam rectify from step 6 on, within the tested steps.
    ("RAdam", {"lr": 0.01, "betas": (0.9, 0.9)}),
    ("RAdam", {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    ("RAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("Lion", {}),
    ("Lion", {"lr": 1e-3, "betas": (0.3, 0.98), "weight_decay": 0.5, "maximize": True}),
]

#: Every optimizer, by class name.
ALL = ["GD", "SGD", "DGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax",
       "NAdam", "RAdam", "Lion"]
#: Options that switch on every optional state and branch, for each optimizer.
RICH = {
    "GD": {}, "SGD": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "DGD": {}, "Adagrad": {"lr_decay": 0.1, "weight_decay": 0.1},
    "RMSprop": {"momentum": 0.5, "centered": True, "weight_decay": 0.1},
    "Adadelta": {"weight_decay": 0.1}, "Adam": {"amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"amsgrad": True}, "Adamax": {"weight_decay": 0.1},
    "NAdam": {"weight_decay": 0.1}, "RAdam": {"weight_decay": 0.1}, "Lion": {"weight_decay": 0.1},
}


def case_id(name: str, hyper: dict) -> str:
    return name + ("-" + ",".join(f"{k}={v}" for k, v in hyper.items()) if hyper else "")


IDS = [case_id(name, hyper) for name, hyper in CASES]

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

    def step(self, rule, xp, params, grads, states, scalars):
        before = {"params": [p.copy() for p in params], "grads": [g.copy() for g in grads],
                  "states": [{k: v.copy() for k, v in s.items()} for s in states]}
        out = GENERIC.step(rule, xp, params, grads, states, scalars)
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
