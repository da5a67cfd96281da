"""What the tests of per-tensor reductions share: a rule of the tests' own with reductions
at two stages, and the recorded generic steps of every rule with reductions.

``normalized`` (below) is no optimizer of the library: it exists to exercise what the
registered ones do not, a reduction of a reduction (two reduction passes) and a sum
beside a norm. The registered ones come from ``optim_db.py``: the fused cases whose
steps reduce (``fused_cases.REDUCING_CASES``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fused_cases import REDUCING_CASES, STEPS, GenericStepRecorder, gradient, start_params

import optim_core
from optim_core.optim.language import update_rule
from optim_core.optim.param_group import HYPERPARAMETERS

# Bound per backend by UpdateRule.bind; placeholders for linters.
sum = norm = sqrt = None  # noqa: A001


@update_rule()
def normalized(param, grad, velocity, *, lr, eps, beta):
    velocity = beta * velocity + grad
    size = norm(velocity)
    scale = lr / (size + eps)
    # A reduction of a reduction: a second pass.
    spread = norm(velocity / (size + eps))
    param = param - scale * velocity * sum(param * param) / (1 + spread + sum(grad))
    return param, velocity


class Normalized(optim_core.Optimizer):
    """Normalized momentum, a test optimizer (not registered: no ``cli_name``)."""

    rule = normalized
    hyperparameter_checks = {"beta": HYPERPARAMETERS["dampening"]}  # within [0, 1]

    def __init__(self, params: Any, lr: float = 0.1, eps: float = 1e-8, beta: float = 0.9,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, beta=beta), **options)


#: (optimizer class, options) of every case whose rule has reductions.
CASES: list[tuple[type, dict]] = [(Normalized, {}), (Normalized, {"lr": 0.3, "beta": 0.3})] + [
    (getattr(optim_core, name), hyper) for name, hyper in REDUCING_CASES]


def recorded_steps(dtypes: tuple[str, ...] = ("float32", "float64"),
                   steps: int = STEPS) -> list[dict]:
    """Every generic step call of every case, as ``fused_cases.recorded_generic_steps``."""
    calls = []
    for cls, hyper in CASES:
        for dtype in dtypes:
            params = start_params(dtype)
            params["empty"] = np.zeros((0, 3), dtype=dtype)
            opt = cls(params, **hyper, impl="generic")
            opt.implementation = recorder = GenericStepRecorder()
            for step in range(steps):
                opt.step({k: gradient(v, step) for k, v in params.items()})
            for call in recorder.calls:
                call["case"] = f"{cls.__name__}{hyper}-{dtype}"
            calls += recorder.calls
    return calls
