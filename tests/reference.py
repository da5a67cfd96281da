"""Float64 reference implementations, written from the documented algorithms.

These are deliberately independent of ``optim_core.optim.rules``: plain NumPy, one
function per optimizer, following the pseudo-code in torch.optim's documentation
(and the papers for DGD and Lion). Each ``step`` function takes the parameter,
gradient, a mutable ``state`` dict and the hyperparameters, and returns the new
parameter. Which optimizer each checks, and with which options, is in ``optim_db.py``.
"""

from __future__ import annotations

import math

import numpy as np


def _grad(p, g, h):
    g = -g if h.get("maximize", False) else g
    if h.get("weight_decay", 0) and not h.get("decoupled_weight_decay", False):
        g = g + h["weight_decay"] * p
    return g


def _decay(p, h):
    if h.get("weight_decay", 0) and h.get("decoupled_weight_decay", False):
        return p * (1 - h["lr"] * h["weight_decay"])
    return p


def _moments(g, s, b1, b2):
    """Adam's running averages of the gradient and its square, in ``s["m"]`` and ``s["v"]``."""
    s["m"] = b1 * s.get("m", np.zeros_like(g)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", np.zeros_like(g)) + (1 - b2) * g**2


def _cautious(u, g, h):
    """Liang et al. 2024 ("Cautious Optimizers"), as their code: the update where it
    agrees in sign with the gradient, scaled by numel / (mask.sum() + 1)."""
    if not h.get("cautious", False):
        return u
    mask = (u * g > 0).astype(u.dtype)
    return u * (mask * (mask.size / (mask.sum() + 1)))


def gd(p, g, s, h):
    return p - h["lr"] * g


def sgd(p, g, s, h):
    g = _grad(p, g, h)
    mu = h.get("momentum", 0)
    if mu:
        if "b" not in s:
            s["b"] = g.copy()
        else:
            s["b"] = mu * s["b"] + (1 - h.get("dampening", 0)) * g
        g = _cautious(g + mu * s["b"] if h.get("nesterov", False) else s["b"], g, h)
    return p - h["lr"] * g


def dgd(p, g, s, h):
    s.setdefault("v", np.zeros_like(p))
    s.setdefault("alpha", h["lr"])
    s["v"] = s["v"] + g
    p = p - s["alpha"] * s["v"]
    s["alpha"] *= h.get("decay", 0.9)
    return p


def adagrad(p, g, s, h):
    t = s["t"] = s.get("t", 0) + 1
    g = _grad(p, g, h)
    clr = h["lr"] / (1 + (t - 1) * h.get("lr_decay", 0))
    s["sum"] = s.get("sum", np.full_like(p, h.get("initial_accumulator_value", 0))) + g * g
    return p - clr * g / (np.sqrt(s["sum"]) + h.get("eps", 1e-10))


def rmsprop(p, g, s, h):
    g = _grad(p, g, h)
    a, eps = h.get("alpha", 0.99), h.get("eps", 1e-8)
    s["v"] = a * s.get("v", np.zeros_like(p)) + (1 - a) * g**2
    v = s["v"]
    if h.get("centered", False):
        s["gavg"] = a * s.get("gavg", np.zeros_like(p)) + (1 - a) * g
        v = v - s["gavg"] ** 2
    mu = h.get("momentum", 0)
    if mu > 0:
        s["b"] = mu * s.get("b", np.zeros_like(p)) + g / (np.sqrt(v) + eps)
        return p - h["lr"] * s["b"]
    return p - h["lr"] * g / (np.sqrt(v) + eps)


def adadelta(p, g, s, h):
    g = _grad(p, g, h)
    rho, eps = h.get("rho", 0.9), h.get("eps", 1e-6)
    s["v"] = rho * s.get("v", np.zeros_like(p)) + (1 - rho) * g**2
    u = s.get("u", np.zeros_like(p))
    delta = np.sqrt(u + eps) / np.sqrt(s["v"] + eps) * g
    s["u"] = rho * u + (1 - rho) * delta**2
    return p - h["lr"] * delta


def adam(p, g, s, h):
    t = s["t"] = s.get("t", 0) + 1
    b1, b2 = h.get("betas", (0.9, 0.999))
    eps = h.get("eps", 1e-8)
    p = _decay(p, h)
    g = _grad(p, g, h)
    _moments(g, s, b1, b2)
    m_hat = s["m"] / (1 - b1**t)
    v = s["v"]
    if h.get("amsgrad", False):
        s["vmax"] = np.maximum(s.get("vmax", np.zeros_like(p)), v)
        v = s["vmax"]
    v_hat = v / (1 - b2**t)
    return p - h["lr"] * _cautious(m_hat / (np.sqrt(v_hat) + eps), g, h)


def adamw(p, g, s, h):
    return adam(p, g, s, {"weight_decay": 1e-2, **h, "decoupled_weight_decay": True})


def adamax(p, g, s, h):
    t = s["t"] = s.get("t", 0) + 1
    b1, b2 = h.get("betas", (0.9, 0.999))
    eps = h.get("eps", 1e-8)
    g = _grad(p, g, h)
    s["m"] = b1 * s.get("m", np.zeros_like(p)) + (1 - b1) * g
    s["u"] = np.maximum(b2 * s.get("u", np.zeros_like(p)), np.abs(g) + eps)
    return p - h["lr"] / (1 - b1**t) * s["m"] / s["u"]


def nadam(p, g, s, h):
    t = s["t"] = s.get("t", 0) + 1
    b1, b2 = h.get("betas", (0.9, 0.999))
    eps, psi = h.get("eps", 1e-8), h.get("momentum_decay", 4e-3)
    p = _decay(p, h)
    g = _grad(p, g, h)
    mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
    s["prod"] = s.get("prod", 1.0) * mu
    _moments(g, s, b1, b2)
    v_hat = s["v"] / (1 - b2**t)
    update = (1 - mu) * g / (1 - s["prod"]) + mu_next * s["m"] / (1 - s["prod"] * mu_next)
    return p - h["lr"] * update / (np.sqrt(v_hat) + eps)


def radam(p, g, s, h):
    t = s["t"] = s.get("t", 0) + 1
    b1, b2 = h.get("betas", (0.9, 0.999))
    eps = h.get("eps", 1e-8)
    p = _decay(p, h)
    g = _grad(p, g, h)
    _moments(g, s, b1, b2)
    m_hat = s["m"] / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t > 5:
        l_t = math.sqrt(1 - b2**t) / (np.sqrt(s["v"]) + eps)
        r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        return p - h["lr"] * m_hat * l_t * r_t
    return p - h["lr"] * m_hat


def lion(p, g, s, h):
    b1, b2 = h.get("betas", (0.9, 0.99))
    g = -g if h.get("maximize", False) else g
    m = s.get("m", np.zeros_like(p))
    c = b1 * m + (1 - b1) * g
    p = p * (1 - h["lr"] * h.get("weight_decay", 0)) - h["lr"] * _cautious(np.sign(c), g, h)
    s["m"] = b2 * m + (1 - b2) * g
    return p


def muon(p, g, s, h):
    """torch.optim.Muon's documented algorithm, Newton-Schulz in float64 (2-D ``p`` only)."""
    mu = h.get("momentum", 0.95)
    a, b, c = h.get("ns_coefficients", (3.4445, -4.7750, 2.0315))
    s["b"] = mu * s.get("b", np.zeros_like(g)) + (1 - mu) * g
    x = (1 - mu) * g + mu * s["b"] if h.get("nesterov", True) else s["b"]
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / max(np.sqrt(np.sum(x * x)), h.get("eps", 1e-7))
    for _ in range(h.get("ns_steps", 5)):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    rows, cols = p.shape
    if h.get("adjust_lr_fn") == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = math.sqrt(max(1, rows / cols))
    return p * (1 - h["lr"] * h.get("weight_decay", 0.1)) - h["lr"] * ratio * x


def asgd(p, g, s, h):
    t = s["t"] = s.get("t", 0) + 1
    lr, lambd = h["lr"], h.get("lambd", 1e-4)
    g = _grad(p, g, h)
    eta, mu = s.get("eta", lr), s.get("mu", 1.0)  # the values the previous step left
    p = p * (1 - lambd * eta) - eta * g
    s["ax"] = p.copy() if mu == 1 else s["ax"] + mu * (p - s["ax"])
    s["eta"] = lr / (1 + lambd * lr * t) ** h.get("alpha", 0.75)
    s["mu"] = 1 / max(1, t - h.get("t0", 1e6))
    return p


def _trust_ratio(param, update, coefficient=1.0, eps=0.0):
    """optax.scale_by_trust_ratio's ratio: 1 where either whole-tensor norm is 0."""
    param_norm, update_norm = np.linalg.norm(param), np.linalg.norm(update)
    if param_norm == 0 or update_norm == 0:
        return 1.0
    return coefficient * param_norm / (update_norm + eps)


def lamb(p, g, s, h):
    """optax.lamb (You et al. 2020): Adam's update plus decay, scaled by the trust ratio."""
    t = s["t"] = s.get("t", 0) + 1
    b1, b2 = h.get("betas", (0.9, 0.999))
    g = -g if h.get("maximize", False) else g
    s["m"] = (1 - b1) * g + b1 * s.get("m", np.zeros_like(p))
    s["v"] = (1 - b2) * g**2 + b2 * s.get("v", np.zeros_like(p))
    u = (s["m"] / (1 - b1**t)) / (np.sqrt(s["v"] / (1 - b2**t) + h.get("eps_root", 0.0))
                                  + h.get("eps", 1e-6))
    u = u + h.get("weight_decay", 0.0) * p
    return p - h["lr"] * (u * _trust_ratio(p, u))


def lars(p, g, s, h):
    """optax.lars (You et al. 2017): decay, trust ratio, -lr, then optax.trace."""
    g = -g if h.get("maximize", False) else g
    g = g + h.get("weight_decay", 0.0) * p
    if h.get("trust_ratio", True):
        g = g * _trust_ratio(p, g, h.get("trust_coefficient", 0.001), h.get("eps", 0.0))
    u = -h["lr"] * g
    mu = h.get("momentum", 0.9)
    s["trace"] = u + mu * s.get("trace", np.zeros_like(p))
    return p + (u + mu * s["trace"] if h.get("nesterov", False) else s["trace"])


def rprop(p, g, s, h):
    eta_minus, eta_plus = h.get("etas", (0.5, 1.2))
    low, high = h.get("step_sizes", (1e-6, 50))
    g = -g if h.get("maximize", False) else g
    prev = s.get("prev", np.zeros_like(p))
    step = s.get("step_size", np.full_like(p, h["lr"]))
    d = np.sign(g * prev)
    step = np.clip(step * np.where(d > 0, eta_plus, np.where(d < 0, eta_minus, 1.0)), low, high)
    g = np.where(d < 0, 0.0, g)
    s["prev"], s["step_size"] = g, step
    return p - np.sign(g) * step


def adopt(p, g, s, h):
    """Taniguchi et al. 2024, Algorithm 1 with the clipping of their implementation."""
    t = s["t"] = s.get("t", 0) + 1
    b1, b2 = h.get("betas", (0.9, 0.9999))
    p = _decay(p, h)
    g = _grad(p, g, h)
    if t == 1:
        s["m"], s["v"] = np.zeros_like(p), g * g
        return p
    u = g / np.maximum(np.sqrt(s["v"]), h.get("eps", 1e-6))
    if h.get("use_clipping", True):
        c = (t - 1) ** h.get("clip_exponent", 0.25)
        u = np.clip(u, -c, c)
    s["m"] = b1 * s["m"] + (1 - b1) * u
    step = b1 * s["m"] + (1 - b1) * u if h.get("nesterov", False) else s["m"]
    s["v"] = b2 * s["v"] + (1 - b2) * g * g
    return p - h["lr"] * step


def ademamix(p, g, s, h):
    """Pagliardini et al. 2024, Algorithm 1, with the warmups of their section 3."""
    t = s["t"] = s.get("t", 0) + 1
    b1, b2, b3 = h.get("betas", (0.9, 0.999, 0.9999))
    alpha, eps = h.get("alpha", 5.0), h.get("eps", 1e-8)
    g = -g if h.get("maximize", False) else g
    t_alpha, t_beta = h.get("alpha_warmup", 0), h.get("beta3_warmup", 0)
    if t - 1 < t_alpha:
        alpha = alpha * (t - 1) / t_alpha
    if t - 1 < t_beta:
        def half_life(beta):
            return math.log(0.5) / math.log(beta) - 1
        a = (t - 1) / t_beta
        b3 = 0.5 ** (1 / ((1 - a) * half_life(b1) + a * half_life(b3) + 1))
    s["m1"] = b1 * s.get("m1", np.zeros_like(p)) + (1 - b1) * g
    s["m2"] = b3 * s.get("m2", np.zeros_like(p)) + (1 - b3) * g
    s["v"] = b2 * s.get("v", np.zeros_like(p)) + (1 - b2) * g**2
    denom = np.sqrt(s["v"] / (1 - b2**t) + h.get("eps_root", 0.0)) + eps
    update = (s["m1"] / (1 - b1**t) + alpha * s["m2"]) / denom
    return p - h["lr"] * (update + h.get("weight_decay", 0.0) * p)


def gradient_sequence(shape: tuple[int, ...], steps: int, seed: int = 0):
    """A fixed stream of gradients of varied scale and sign (the same for every run)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * (1 + 0.5 * np.sin(t)) for t in range(steps)]


def quadratic_gradient(theta: np.ndarray, step: int) -> np.ndarray:
    """Gradient of an ill-conditioned quadratic plus a deterministic perturbation.

    Depends on the current parameter, so a wrong step compounds over later steps.
    """
    scales = np.linspace(0.5, 5.0, theta.size).reshape(theta.shape) if theta.size else theta
    return scales * (theta - 1.0) + 0.1 * np.cos(step + np.arange(theta.size)).reshape(theta.shape)


def adafactor(p, g, s, h):
    """Shazeer & Stern 2018 as torch.optim.Adafactor: the last two axes factored (a row and
    a column mean of g**2) for tensors of 2+ dimensions, a full second moment otherwise."""
    t = s["t"] = s.get("t", 0) + 1
    lr, c, d = h.get("lr", 1e-2), h.get("beta2_decay", -0.8), h.get("d", 1.0)
    eps1, eps2 = h.get("eps", (None, 1e-3))
    eps1 = np.finfo(p.dtype).eps if eps1 is None else eps1
    g = -g if h.get("maximize", False) else g
    w = t ** c
    rms = np.sqrt(np.mean(p * p)) if p.size else 0.0
    alpha = max(eps2, rms) * min(lr, 1 / math.sqrt(t))
    p = p * (1 - lr * h.get("weight_decay", 0.0))
    if p.ndim >= 2:
        r = s.get("row", np.zeros((*p.shape[:-1], 1)))
        k = s.get("col", np.zeros((*p.shape[:-2], 1, p.shape[-1])))
        r = s["row"] = r + w * (np.mean(g * g, axis=-1, keepdims=True) - r)
        k = s["col"] = k + w * (np.mean(g * g, axis=-2, keepdims=True) - k)
        v = r * k / np.maximum(np.mean(r, axis=-2, keepdims=True), eps1)
    else:
        v = s["v"] = s.get("v", np.zeros_like(p)) + w * (g * g - s.get("v", np.zeros_like(p)))
    u = g / np.sqrt(np.maximum(v, eps1 * eps1))
    rms_u = np.sqrt(np.mean(u * u)) if u.size else 0.0
    return p - alpha / max(1.0, rms_u / d) * u
