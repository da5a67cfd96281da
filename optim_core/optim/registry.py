"""The one table of optimizers: every concrete :class:`~optim_core.Optimizer` by its name.

A class joins by defining ``cli_name`` (the lower-case name :func:`optim_core.fit`, the
command line and the tools accept); :meth:`Optimizer.__init_subclass__` registers it
when the class is created, so adding an optimizer never means editing a list here or
in the training code. Joining is optional: a class of your own without a ``cli_name``
is an optimizer all the same (``fit(optimizer=MyOptimizer)``, or an instance), only
unknown by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Optimizer

__all__ = ["OPTIMIZERS", "WEIGHT_DECAY_KINDS", "register", "optimizer_class"]

#: How an optimizer applies ``weight_decay``:
#: "none": it has no weight decay; "l2": an L2 term added to the gradient;
#: "decoupled": the parameter is shrunk by ``1 - lr * weight_decay`` (AdamW, Lion);
#: "switchable": L2, or decoupled with ``decoupled_weight_decay=True`` (Adam, NAdam, RAdam).
WEIGHT_DECAY_KINDS = ("none", "l2", "decoupled", "switchable")

#: Optimizer classes by their ``cli_name``, in the order they were defined.
OPTIMIZERS: dict[str, type[Optimizer]] = {}


def register(cls: type[Optimizer]) -> None:
    """Add ``cls`` under its ``cli_name`` (TypeError for a duplicate or a bad kind)."""
    name = cls.cli_name
    if not isinstance(name, str) or not name or name != name.lower():
        raise TypeError(f"{cls.__name__}.cli_name must be a non-empty lower-case string, "
                        f"got {name!r}")
    if cls.weight_decay_kind not in WEIGHT_DECAY_KINDS:
        raise TypeError(f"{cls.__name__}.weight_decay_kind must be one of {WEIGHT_DECAY_KINDS}, "
                        f"got {cls.weight_decay_kind!r}")
    existing = OPTIMIZERS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"optimizer name {name!r} is taken by {existing.__name__}")
    OPTIMIZERS[name] = cls


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimizer class called ``name`` (case-insensitive).

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If no optimizer has that name; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"optimizer must be a name or an Optimizer, got {type(name).__name__}")
    cls = OPTIMIZERS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return cls
