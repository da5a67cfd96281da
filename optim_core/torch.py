"""``optim_core.torch``: every optimizer as a ``torch.optim.Optimizer``.

A drop-in for ``torch.optim``: the same names, arguments, param groups, state dicts,
hooks and schedulers, stepped by optim-core's fused kernels on the tensors' own
memory (NumPy views on the CPU, CuPy views through DLPack on CUDA)::

    import optim_core.torch as oct

    opt = oct.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

Every optimizer of the registry (:data:`optim_core.optim.registry.OPTIMIZERS`) is here
under its class name, including those torch lacks (``Lion``, ``DGD``, ...); the
classes are generated (:func:`torch_optimizer`), so a new optimizer appears here as
soon as it is registered. Importing this module imports torch; ``import optim_core``
does not. See :mod:`optim_core.integrations.torch_optim` for what is kept as torch
keeps it and what differs.
"""

from __future__ import annotations

from typing import Any

from .integrations.torch_optim import TorchOptimizer, torch_optimizer, torch_optimizers
from .optim.registry import OPTIMIZERS as _OPTIMIZERS

globals().update(torch_optimizers())

__all__ = ["TorchOptimizer", "torch_optimizer", *torch_optimizers()]


def __getattr__(name: str) -> Any:
    # An optimizer registered after this module was imported (and pickles naming it).
    for core in _OPTIMIZERS.values():
        if core.__name__ == name:
            return torch_optimizer(core)
    raise AttributeError(f"module 'optim_core.torch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *torch_optimizers()})
