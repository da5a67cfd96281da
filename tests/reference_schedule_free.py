"""Float64 references of Schedule-Free SGD and AdamW, written from the paper's equations.

Deliberately unlike ``optim_core.optim.rules_schedule_free`` (and ``schedulefree``,
which store only ``y`` and ``z``): these keep the three sequences of Defazio et al.,
"The Road Less Scheduled" (NeurIPS 2024), Algorithm 1, explicitly,

    y_t = (1 - beta) z_t + beta x_t,    z_{t+1} = z_t - lr_t g(y_t),
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1},

and return the parameter the optimizer holds in train mode, ``y``. The weights
``c_t`` are those of the ``schedulefree`` package (warmup, ``r``, ``weight_lr_power``).
Same interface as ``tests/reference.py``: ``(param, grad, state, hyper) -> new param``.
"""

from __future__ import annotations

import numpy as np


def _weights(s: dict, h: dict) -> tuple[float, float]:
    """This step's learning rate and averaging weight c; advances the step count."""
    k = s.get("k", 0)
    warmup = h.get("warmup_steps", 0)
    lr = h["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
    s["lr_max"] = max(lr, s.get("lr_max", -1.0))
    weight = (k + 1) ** h.get("r", 0.0) * s["lr_max"] ** h.get("weight_lr_power", 2.0)
    s["weight_sum"] = s.get("weight_sum", 0.0) + weight
    s["k"] = k + 1
    return lr, (weight / s["weight_sum"] if s["weight_sum"] else 0.0)


def _average(p: np.ndarray, s: dict, step: np.ndarray, lr: float, c: float,
             beta: float) -> np.ndarray:
    s["z"] = s["z"] - lr * step
    s["x"] = (1 - c) * s["x"] + c * s["z"]
    return (1 - beta) * s["z"] + beta * s["x"]


def schedule_free_sgd(p, g, s, h):
    s.setdefault("z", p.copy())
    s.setdefault("x", p.copy())
    lr, c = _weights(s, h)
    g = g + h.get("weight_decay", 0.0) * p
    return _average(p, s, g, lr, c, h.get("momentum", 0.9))


def schedule_free_adamw(p, g, s, h):
    s.setdefault("z", p.copy())
    s.setdefault("x", p.copy())
    s.setdefault("v", np.zeros_like(p))
    beta1, beta2 = h.get("betas", (0.9, 0.999))
    lr, c = _weights(s, h)
    s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
    normalized = g / (np.sqrt(s["v"] / (1 - beta2 ** s["k"])) + h.get("eps", 1e-8))
    return _average(p, s, normalized + h.get("weight_decay", 0.0) * p, lr, c, beta1)


def eval_point(s: dict) -> np.ndarray:
    """The average x, where ``eval()`` puts the parameter."""
    return s["x"]
