"""The implementations under test, each built as a runner of one optimizer step.

* ``ours-fused``, ``ours-generic``: :mod:`optim_core` with ``impl="fused"`` or
  ``impl="generic"``, on NumPy arrays (CPU) or CuPy arrays (GPU).
* ``ours-flat``: ``impl="fused", flat=True``: every tensor of the workload in one
  buffer, one kernel per step; the gradients are written into the optimizer's
  ``grad_views`` once, as a backward pass would write them, so the step copies nothing.
* ``naive-numpy``: the founding article's style, correct math written with plain
  NumPy expressions: one Python loop over tensors, a new temporary array per
  operation, parameters rebound to new arrays. On the GPU the same code runs with
  CuPy in place of NumPy.
* ``torch-forloop``, ``torch-foreach``, ``torch-fused``: ``torch.optim`` with
  ``foreach=False``, ``foreach=True`` or ``fused=True``.
* ``torch-nocast``: Muon only: ``torch.optim.Muon`` with the one ``grad.bfloat16()`` of
  its Newton-Schulz function replaced by ``grad.clone()`` (its source, patched at build
  time), so it iterates in the parameters' dtype as ours does by default; torch as
  shipped (``torch-forloop``) always iterates in bfloat16, which CPUs without bfloat16
  instructions emulate slowly.
* ``optax-jit``: optax's transformation and ``optax.apply_updates`` under one
  ``jax.jit`` with the parameters and state donated, where JAX and optax are installed.

Schedule-Free SGD and AdamW run against the ``schedulefree`` package (torch) in the
``torch-forloop`` and ``torch-foreach`` rows (its ``foreach=False`` and ``True``); L-BFGS
(``ours-generic``: it is no elementwise rule) against ``torch.optim.LBFGS`` in the
``torch-forloop`` row, each step a fresh optimizer's one ``step(closure)`` on
:func:`bench.workloads.quadratic_objective` from the same start (see
:func:`_build_lbfgs`).

Every implementation runs the same hyperparameters (:data:`HYPERPARAMETERS`,
``torch.optim``'s defaults). One that cannot run a combination raises
:class:`NotAvailable`; the benchmark records it as "n/a" with the reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import timing
from .workloads import Workload, quadratic_objective

__all__ = ["OPTIMIZERS", "IMPLS", "HYPERPARAMETERS", "NotAvailable", "Runner", "WorkloadData",
           "build"]

OPTIMIZERS = ("adam", "adamw", "sgd-momentum", "adagrad", "rmsprop", "lion",
              "schedulefree-sgd", "schedulefree-adamw", "lbfgs", "asgd", "rprop", "adopt",
              "ademamix", "muon", "adafactor")
IMPLS = ("ours-fused", "ours-flat", "ours-generic", "naive-numpy", "torch-forloop", "torch-foreach",
         "torch-fused", "torch-nocast", "optax-jit")

#: The hyperparameters every implementation runs (``torch.optim``'s defaults; SGD with
#: momentum 0.9; Lion with the paper's defaults).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    "sgd-momentum": {"lr": 1e-3, "momentum": 0.9},
    "adagrad": {"lr": 1e-2, "eps": 1e-10},
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8},
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
    # schedulefree's defaults.
    "schedulefree-sgd": {"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0, "warmup_steps": 0,
                         "r": 0.0, "weight_lr_power": 2.0},
    "schedulefree-adamw": {"lr": 0.0025, "betas": (0.9, 0.999), "eps": 1e-8,
                           "weight_decay": 0.0, "warmup_steps": 0, "r": 0.0,
                           "weight_lr_power": 2.0},
    # Ten iterations with the line search, a short history.
    "lbfgs": {"lr": 1.0, "max_iter": 10, "history_size": 10, "line_search_fn": "strong_wolfe"},
    # torch.optim's defaults (ASGD, Rprop); optax.contrib's (ADOPT, AdEMAMix).
    "asgd": {"lr": 1e-2, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0},
    "rprop": {"lr": 1e-2, "etas": (0.5, 1.2), "step_sizes": (1e-6, 50)},
    "adopt": {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6},
    "ademamix": {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "alpha": 5.0, "eps": 1e-8,
                 "weight_decay": 0.0},
    # torch.optim.Muon's defaults (2-D parameters only: the gpt2-small-matrices workload).
    # torch iterates Newton-Schulz in bfloat16, ours in the parameters' dtype by default.
    "muon": {"lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True},
    # torch.optim.Adafactor's defaults (its foreach implementation is the reference).
    "adafactor": {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0,
                  "weight_decay": 0.0},
}

_CLASS_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd-momentum": "SGD", "adagrad": "Adagrad",
                "rmsprop": "RMSprop", "lion": "Lion", "schedulefree-sgd": "ScheduleFreeSGD",
                "schedulefree-adamw": "ScheduleFreeAdamW", "lbfgs": "LBFGS", "asgd": "ASGD",
                "rprop": "Rprop", "adopt": "ADOPT", "ademamix": "AdEMAMix", "muon": "Muon",
                "adafactor": "Adafactor"}


class NotAvailable(Exception):
    """This implementation cannot run this optimizer here; the message says why."""


@dataclass
class Runner:
    """One optimizer step on one workload, ready to be timed."""

    step: Callable[[], object]
    clock: timing.Clock
    note: str = ""


class WorkloadData:
    """Random parameters and gradients of a workload, made once and copied for each runner.

    Values repeat a 2**20-element random block, so even 1e9-element tensors are
    made at memory speed; the timing does not depend on the values. On a GPU the
    data is uploaded once (as CuPy arrays) and each runner gets device-to-device
    copies.
    """

    BLOCK = 1 << 20

    def __init__(self, workload: Workload, dtype: str, device: str = "cpu", seed: int = 0
                 ) -> None:
        rng = np.random.default_rng(seed)
        self.workload, self.dtype, self.device = workload, np.dtype(dtype), device
        # Two periods of the block, so any window of BLOCK elements is a plain slice.
        block_p = np.tile(rng.standard_normal(self.BLOCK, dtype=np.float32), 2)
        block_g = np.tile(1e-2 * rng.standard_normal(self.BLOCK, dtype=np.float32), 2)
        self.params = [self._filled(block_p, shape, rng) for shape in workload.shapes]
        self.grads = [self._filled(block_g, shape, rng) for shape in workload.shapes]
        self._on_gpu: tuple[list, list] | None = None

    def _filled(self, block: np.ndarray, shape: tuple[int, ...], rng) -> np.ndarray:
        size = int(np.prod(shape))
        start = int(rng.integers(self.BLOCK))
        window = block[start:start + min(size, self.BLOCK)]
        filled = window.astype(self.dtype) if size <= self.BLOCK else np.resize(window, size)
        return filled.astype(self.dtype, copy=False).reshape(shape)

    def copies(self, library: str) -> tuple[list, list]:
        """Fresh (params, grads) of ``library`` ("numpy", "cupy", "torch", "jax") on the device."""
        if self.device == "cpu":
            params, grads = [p.copy() for p in self.params], [g.copy() for g in self.grads]
            if library == "torch":
                import torch

                return [torch.from_numpy(p) for p in params], [torch.from_numpy(g) for g in grads]
            if library == "jax":
                import jax

                cpu = jax.devices("cpu")[0]
                return ([jax.device_put(p, cpu) for p in params],
                        [jax.device_put(g, cpu) for g in grads])
            return params, grads
        return self._gpu_copies(library)  # pragma: no cover - GPU only

    def _gpu_copies(self, library: str) -> tuple[list, list]:  # pragma: no cover - GPU only
        import cupy

        if self._on_gpu is None:
            self._on_gpu = ([cupy.asarray(p) for p in self.params],
                            [cupy.asarray(g) for g in self.grads])
        sources = self._on_gpu
        if library in ("cupy", "numpy"):
            return tuple([a.copy() for a in arrays] for arrays in sources)
        if library == "torch":
            import torch

            return tuple([torch.from_dlpack(a).clone() for a in arrays] for arrays in sources)
        import jax
        import jax.numpy as jnp

        gpu = jax.devices("gpu")[0]
        try:
            return tuple([jnp.array(jax.dlpack.from_dlpack(a), copy=True) for a in arrays]
                         for arrays in sources)
        except Exception:  # noqa: BLE001 - DLPack exchange varies by version: upload instead
            return tuple([jax.device_put(a, gpu) for a in arrays]
                         for arrays in (self.params, self.grads))


def build(impl: str, optimizer: str, data: WorkloadData, device: str) -> Runner:
    """A runner of ``optimizer`` in ``impl`` on ``device`` ("cpu" or "cuda"), or NotAvailable."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    family = impl.split("-")[0]
    if optimizer == "lbfgs":
        return _build_lbfgs(impl, data, device)
    if optimizer.startswith("schedulefree") and family == "torch":
        return _build_schedulefree(impl, optimizer, data, device)
    return _BUILDERS[family](impl, optimizer, data, device)


# --------------------------------------------------------------------------- optim_core
def _array_library(device: str):
    if device == "cpu":
        return np, timing.WallClock()
    import cupy  # pragma: no cover - GPU only

    return cupy, timing.CupyEventClock()  # pragma: no cover


def _build_ours(impl: str, optimizer: str, data: WorkloadData, device: str) -> Runner:
    import optim_core

    xp, clock = _array_library(device)
    params, grads = data.copies(xp.__name__)
    cls = getattr(optim_core, _CLASS_NAMES[optimizer])
    options = {"impl": "generic" if impl == "ours-generic" else "fused"}
    if impl == "ours-flat":
        options["flat"] = True
    try:
        opt = cls(params, **HYPERPARAMETERS[optimizer], **options)
    except (ValueError, TypeError) as error:
        raise NotAvailable(str(error)) from error
    note = opt.implementation_reason
    if impl == "ours-flat":
        # As a backward pass would: gradients written straight into the gradient buffer.
        views = opt.grad_views
        for view, grad in zip(views, grads, strict=True):
            view[...] = grad
        grads = views
        note += "; flat buffers, gradients written into grad_views"
    return Runner(lambda: opt.step(grads), clock, note)


# --------------------------------------------------------------------------- naive
class _NaiveOptimizer:
    """The article's way: a Python loop over tensors, plain expressions, new arrays."""

    def __init__(self, xp, params: list, **hyper: Any) -> None:
        self.xp, self.params, self.hyper, self.t = xp, params, hyper, 0
        self.state = [[xp.zeros_like(p) for _ in range(self.n_states)] for p in params]

    n_states = 1

    def step(self, grads: list) -> None:
        self.t += 1
        for i, (theta, grad) in enumerate(zip(self.params, grads, strict=True)):
            self.params[i], self.state[i] = self.update(theta, grad, self.state[i])


class _NaiveAdam(_NaiveOptimizer):
    n_states = 2

    def update(self, theta, grad, state):
        lr, (beta1, beta2), eps, wd = (self.hyper[k] for k in ("lr", "betas", "eps",
                                                                "weight_decay"))
        m, v = state
        if self.decoupled:
            theta = theta - lr * wd * theta
        elif wd:
            grad = grad + wd * theta
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        m_hat = m / (1 - beta1**self.t)
        v_hat = v / (1 - beta2**self.t)
        theta = theta - lr * m_hat / (self.xp.sqrt(v_hat) + eps)
        return theta, [m, v]

    decoupled = False


class _NaiveAdamW(_NaiveAdam):
    decoupled = True


class _NaiveSGD(_NaiveOptimizer):
    def update(self, theta, grad, state):
        (buf,) = state
        buf = grad if self.t == 1 else self.hyper["momentum"] * buf + grad
        theta = theta - self.hyper["lr"] * buf
        return theta, [buf]


class _NaiveAdagrad(_NaiveOptimizer):
    def update(self, theta, grad, state):
        (total,) = state
        total = total + grad**2
        theta = theta - self.hyper["lr"] * grad / (self.xp.sqrt(total) + self.hyper["eps"])
        return theta, [total]


class _NaiveRMSprop(_NaiveOptimizer):
    def update(self, theta, grad, state):
        (v,) = state
        alpha = self.hyper["alpha"]
        v = alpha * v + (1 - alpha) * grad**2
        theta = theta - self.hyper["lr"] * grad / (self.xp.sqrt(v) + self.hyper["eps"])
        return theta, [v]


class _NaiveLion(_NaiveOptimizer):
    def update(self, theta, grad, state):
        (m,) = state
        (beta1, beta2), lr = self.hyper["betas"], self.hyper["lr"]
        c = beta1 * m + (1 - beta1) * grad
        theta = theta * (1 - lr * self.hyper["weight_decay"]) - lr * self.xp.sign(c)
        m = beta2 * m + (1 - beta2) * grad
        return theta, [m]


_NAIVE = {"adam": _NaiveAdam, "adamw": _NaiveAdamW, "sgd-momentum": _NaiveSGD,
          "adagrad": _NaiveAdagrad, "rmsprop": _NaiveRMSprop, "lion": _NaiveLion}


def _build_naive(impl: str, optimizer: str, data: WorkloadData, device: str) -> Runner:
    if optimizer not in _NAIVE:
        raise NotAvailable(f"no article-style version of {optimizer}")
    xp, clock = _array_library(device)
    params, grads = data.copies(xp.__name__)
    opt = _NAIVE[optimizer](xp, params, **HYPERPARAMETERS[optimizer])
    note = "article-style NumPy" if device == "cpu" else "article-style code on CuPy"
    return Runner(lambda: opt.step(grads), clock, note)


# --------------------------------------------------------------------------- torch
def _build_torch(impl: str, optimizer: str, data: WorkloadData, device: str) -> Runner:
    if importlib.util.find_spec("torch") is None:
        raise NotAvailable("torch is not installed")
    import torch

    if optimizer in ("lion", "adopt", "ademamix"):
        raise NotAvailable(f"torch.optim has no {_CLASS_NAMES[optimizer]}")
    cls = getattr(torch.optim, _CLASS_NAMES[optimizer])
    if impl == "torch-nocast":
        if optimizer != "muon":
            raise NotAvailable("torch-nocast is torch.optim.Muon without its bfloat16 cast")
        _remove_muons_bfloat16_cast()
        impl = "torch-forloop"
    else:
        _restore_muon()
    mode = {"torch-forloop": {"foreach": False}, "torch-foreach": {"foreach": True},
            "torch-fused": {"fused": True}}[impl]
    if next(iter(mode)) not in inspect.signature(cls).parameters:
        if impl != "torch-forloop":
            raise NotAvailable(f"torch.optim.{cls.__name__} has no {next(iter(mode))}= option")
        mode = {}  # one tensor at a time is all it has (Muon)
    params, grads = data.copies("torch")
    for param, grad in zip(params, grads, strict=True):
        param.requires_grad_()
        param.grad = grad
    try:
        opt = cls(params, **HYPERPARAMETERS[optimizer], **mode)
        opt.step()
    except (RuntimeError, ValueError, TypeError) as error:
        raise NotAvailable(f"torch {impl.removeprefix('torch-')}: {error}") from error
    clock = timing.WallClock() if device == "cpu" else timing.TorchEventClock()
    return Runner(opt.step, clock, f"torch {torch.__version__}")


def _remove_muons_bfloat16_cast() -> None:
    """torch.optim.Muon's Newton-Schulz from its own source, minus the bfloat16 cast.

    The module's function is replaced (torch's loop looks it up at each call) until
    another torch cell is built, which puts the original back: cells are built and timed
    one after the other.
    """
    from torch.optim import _muon

    original = _ORIGINAL.setdefault("ns", _muon._zeropower_via_newtonschulz)
    source = inspect.getsource(original)
    if source.count("grad.bfloat16()") != 1:
        raise NotAvailable("torch.optim.Muon's source has changed: no single bfloat16 cast")
    namespace = dict(vars(_muon))
    exec(compile(source.replace("grad.bfloat16()", "grad.clone()"),  # noqa: S102
                 "<torch muon, no cast>", "exec"), namespace)
    _muon._zeropower_via_newtonschulz = namespace["_zeropower_via_newtonschulz"]


def _restore_muon() -> None:
    if "ns" in _ORIGINAL:
        from torch.optim import _muon

        _muon._zeropower_via_newtonschulz = _ORIGINAL["ns"]


_ORIGINAL: dict[str, Any] = {}


# --------------------------------------------------------------------------- optax
def _optax_transformation(optax, optimizer: str):
    h = HYPERPARAMETERS[optimizer]
    if optimizer == "adam":
        return optax.adam(h["lr"], b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"])
    if optimizer == "adamw":
        return optax.adamw(h["lr"], b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
                           weight_decay=h["weight_decay"])
    if optimizer == "sgd-momentum":
        return optax.sgd(h["lr"], momentum=h["momentum"])
    if optimizer == "adagrad":
        return optax.adagrad(h["lr"], initial_accumulator_value=0.0, eps=h["eps"])
    if optimizer == "rmsprop":
        extra = ({"eps_in_sqrt": False}
                 if "eps_in_sqrt" in inspect.signature(optax.rmsprop).parameters else {})
        return optax.rmsprop(h["lr"], decay=h["alpha"], eps=h["eps"], **extra)
    if optimizer == "rprop":
        # optax's variant: where the sign product is 0 it keeps the step size unclamped.
        return optax.rprop(h["lr"], eta_minus=h["etas"][0], eta_plus=h["etas"][1],
                           min_step_size=h["step_sizes"][0], max_step_size=h["step_sizes"][1])
    if optimizer == "adopt":
        return optax.contrib.adopt(h["lr"], b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"])
    if optimizer == "ademamix":
        b1, b2, b3 = h["betas"]
        return optax.contrib.ademamix(h["lr"], b1=b1, b2=b2, b3=b3, alpha=h["alpha"],
                                      eps=h["eps"], weight_decay=h["weight_decay"])
    if optimizer == "asgd":
        raise NotAvailable("optax has no ASGD")
    return optax.lion(h["lr"], b1=h["betas"][0], b2=h["betas"][1],
                      weight_decay=h["weight_decay"])


def _build_optax(impl: str, optimizer: str, data: WorkloadData, device: str) -> Runner:
    if optimizer.startswith("schedulefree"):
        raise NotAvailable("schedule-free methods are compared with the schedulefree package")
    if optimizer == "muon":
        raise NotAvailable("optax's Muon (optax.contrib) is another algorithm than "
                           "torch.optim.Muon's; not compared")
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None:
        raise NotAvailable("jax/optax are not installed")
    # JAX would otherwise reserve most of the GPU's memory at import, starving CuPy and torch.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import optax

    backend = "cpu" if device == "cpu" else "gpu"
    try:
        jax.devices(backend)
    except RuntimeError as error:
        raise NotAvailable(f"JAX has no {backend} device: {error}") from error
    transformation = _optax_transformation(optax, optimizer)
    params, grads = data.copies("jax")

    def update(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(update, donate_argnums=(0, 1))
    carry = {"params": params, "state": transformation.init(params)}

    def step() -> None:
        carry["params"], carry["state"] = jitted(carry["params"], carry["state"], grads)

    clock = timing.WallClock(lambda: jax.block_until_ready(carry["params"]))
    return Runner(step, clock, f"optax {optax.__version__}, jax {jax.__version__}")


# --------------------------------------------------------------------------- schedule-free
def _build_schedulefree(impl: str, optimizer: str, data: WorkloadData, device: str) -> Runner:
    """The schedulefree package's optimizer (torch): foreach=False or True."""
    if impl == "torch-fused":
        raise NotAvailable("schedulefree has no fused implementation")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("schedulefree") \
            is None:
        raise NotAvailable("torch/schedulefree are not installed")
    import schedulefree
    import torch

    cls = {"schedulefree-sgd": schedulefree.SGDScheduleFree,
           "schedulefree-adamw": schedulefree.AdamWScheduleFree}[optimizer]
    params, grads = data.copies("torch")
    for param, grad in zip(params, grads, strict=True):
        param.requires_grad_()
        param.grad = grad
    opt = cls(params, **HYPERPARAMETERS[optimizer], foreach=impl == "torch-foreach")
    opt.train()
    clock = timing.WallClock() if device == "cpu" else timing.TorchEventClock()
    version = importlib.metadata.version("schedulefree")
    return Runner(opt.step, clock, f"schedulefree {version}, torch {torch.__version__}")


# --------------------------------------------------------------------------- L-BFGS
def _build_lbfgs(impl: str, data: WorkloadData, device: str) -> Runner:
    """One L-BFGS step (``HYPERPARAMETERS["lbfgs"]``) of a fresh optimizer from the same
    start, on :func:`~bench.workloads.quadratic_objective`: every repeat does the same
    iterations, line search and evaluations. Ours (ours-generic) on NumPy or CuPy arrays,
    torch.optim.LBFGS (torch-forloop) on torch tensors; the closures do the same work."""
    hyper = HYPERPARAMETERS["lbfgs"]
    if impl == "ours-generic":
        import optim_core

        xp, clock = _array_library(device)
        params, grads = data.copies(xp.__name__)
        start = [p.copy() for p in params]
        objective = quadratic_objective(xp, params, grads)

        def closure() -> tuple[Any, list[Any]]:
            return objective(params)

        def step() -> None:
            for param, value in zip(params, start, strict=True):
                param[...] = value
            optim_core.LBFGS(params, **hyper).step(closure)

        return Runner(step, clock, "array API operations of the parameters' namespace")
    if impl != "torch-forloop":
        raise NotAvailable("L-BFGS is no elementwise rule: ours-generic against "
                           "torch.optim.LBFGS (torch-forloop)")
    if importlib.util.find_spec("torch") is None:
        raise NotAvailable("torch is not installed")
    import torch

    params, grads = data.copies("torch")
    start = [p.clone() for p in params]
    objective = quadratic_objective(torch, params, grads)
    for param in params:
        param.requires_grad_()

    def torch_closure() -> Any:
        loss, gradients = objective([p.detach() for p in params])
        for param, grad in zip(params, gradients, strict=True):
            param.grad = grad
        return loss

    def torch_step() -> None:
        with torch.no_grad():
            for param, value in zip(params, start, strict=True):
                param.copy_(value)
        torch.optim.LBFGS(params, **hyper).step(torch_closure)

    clock = timing.WallClock() if device == "cpu" else timing.TorchEventClock()
    return Runner(torch_step, clock, f"torch {torch.__version__}")


_BUILDERS = {"ours": _build_ours, "naive": _build_naive, "torch": _build_torch,
             "optax": _build_optax}
