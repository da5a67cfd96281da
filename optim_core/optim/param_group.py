"""Param groups: a set of parameters and their hyperparameters, checked when written.

``optimizer.param_groups[i]`` is a :class:`ParamGroup`, a mutable mapping like
torch's group dicts. Writing a hyperparameter checks it at once, with the checks of
:mod:`optim_core._checks` and the optimizer's own relations between hyperparameters
(SGD's ``nesterov`` needs ``momentum > 0`` and ``dampening == 0``), and stores the
checked value (a Python float for any real number, a tuple for a pair). A bad value
raises and leaves the group as it was, so ``step`` never re-checks hyperparameters:

>>> opt.param_groups[0]["lr"] = -1          # doctest: +SKIP
ValueError: lr must be >= 0, got -1

A group always holds every hyperparameter of its optimizer (deleting one is refused),
the keys ``params`` and ``names``, and may hold the bookkeeping keys that learning
rate schedulers add (:data:`SCHEDULER_KEYS`, such as ``initial_lr``); any other key
is refused, so a misspelt hyperparameter never passes silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from types import MappingProxyType
from typing import Any, NamedTuple

from .. import _checks

__all__ = ["ParamGroup", "GroupSchema", "Hyperparameter", "HYPERPARAMETERS", "SCHEDULER_KEYS",
           "STRUCTURE_KEYS", "GROUP_WRITES"]


class Hyperparameter(NamedTuple):
    """How one hyperparameter is checked, and what the rules call its parts.

    Public as ``optim_core.Hyperparameter``: an optimizer of your own declares each
    hyperparameter that :data:`HYPERPARAMETERS` lacks in its ``hyperparameter_checks``.

    Attributes
    ----------
    check : callable
        ``check(name, value)`` returns the value to store (a Python float, bool or
        tuple) or raises TypeError (a wrong kind of value) or ValueError (out of
        range), with a message naming ``name``. It runs whenever the value is written:
        when the optimizer is made, and on ``opt.param_groups[i][name] = value``.
    parts : tuple of str
        For a pair, the rule's scalar names of its elements (``betas`` is
        ``beta1, beta2`` in every rule); empty when the rule takes the value by name.

    Examples
    --------
    >>> def positive(name, value):
    ...     if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    ...         raise ValueError(f"{name} must be a number > 0, got {value!r}")
    ...     return float(value)
    >>> checks = {"gamma": Hyperparameter(positive)}
    """

    check: Callable[[str, Any], Any]
    parts: tuple[str, ...] = ()


def _nonnegative(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0)


def _fraction(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0, high=1)


def _beta_pair(name: str, value: Any) -> tuple[float, float]:
    return _checks.number_pair(name, value, low=0, high=1, high_open=True)


#: The hyperparameters the optimizers share, and how each is checked wherever it appears;
#: an optimizer with one of its own declares it in ``Optimizer.hyperparameter_checks``.
HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "lr": Hyperparameter(_nonnegative),
    "eps": Hyperparameter(_nonnegative),
    "weight_decay": Hyperparameter(_nonnegative),
    "momentum": Hyperparameter(_nonnegative),
    "dampening": Hyperparameter(_fraction),
    "alpha": Hyperparameter(_nonnegative),
    "rho": Hyperparameter(_fraction),
    "lr_decay": Hyperparameter(_nonnegative),
    "initial_accumulator_value": Hyperparameter(_nonnegative),
    "momentum_decay": Hyperparameter(_nonnegative),
    "decay": Hyperparameter(_fraction),
    "betas": Hyperparameter(_beta_pair, ("beta1", "beta2")),
    "nesterov": Hyperparameter(_checks.boolean),
    "maximize": Hyperparameter(_checks.boolean),
    "amsgrad": Hyperparameter(_checks.boolean),
    "centered": Hyperparameter(_checks.boolean),
    "decoupled_weight_decay": Hyperparameter(_checks.boolean),
}

#: Keys learning rate schedulers keep in a group for themselves (torch's ``LRScheduler``
#: adds ``initial_lr``, ``OneCycleLR`` and ``CyclicLR`` the others, ``SWALR``
#: ``swa_lr``): numbers >= 0, allowed in any group, kept by ``state_dict`` and restored
#: by ``load_state_dict``; a step does not read them.
SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr")

#: The keys that hold the group's parameters, not hyperparameters.
STRUCTURE_KEYS = ("params", "names")


class GroupSchema:
    """What a group of one optimizer holds and how writes to it are checked.

    Parameters
    ----------
    optimizer : type
        The optimizer class: its :meth:`~optim_core.Optimizer.check_relations` checks
        the relations between hyperparameters, on writes of the keys it names in
        ``related_hyperparameters``.
    hyperparameters : iterable of str
        The names of its hyperparameters (its defaults' keys).
    """

    __slots__ = ("optimizer", "hyperparameters", "related", "specs")

    def __init__(self, optimizer: type, hyperparameters: Iterable[str]) -> None:
        self.optimizer = optimizer
        self.hyperparameters = frozenset(hyperparameters)
        self.related = frozenset(optimizer.related_hyperparameters)
        table = {**HYPERPARAMETERS, **optimizer.hyperparameter_checks}
        unchecked = sorted(self.hyperparameters - set(table))
        if unchecked:
            raise TypeError(f"{optimizer.__name__} has hyperparameters {unchecked} that no "
                            "check covers: declare them in its hyperparameter_checks")
        self.specs = {name: table[name] for name in self.hyperparameters}

    def check(self, key: str, value: Any) -> Any:
        """The value to store under ``key``, or an error naming it."""
        spec = self.specs.get(key)
        if spec is not None:
            return spec.check(key, value)
        if key == "params":
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                raise _checks.WrongTypeError(f"params of a group must be a list of arrays, "
                                             f"got {type(value).__name__}")
            return list(value)  # each array is checked by the next step
        if key in SCHEDULER_KEYS:
            return _nonnegative(key, value)
        if key == "names":
            raise ValueError("the names of a group's parameters are fixed when the "
                             "optimizer is made")
        raise ValueError(f"unknown hyperparameters in a param group: [{key!r}] "
                         f"({self.optimizer.__name__} has {sorted(self.hyperparameters)}; "
                         f"schedulers may add {list(SCHEDULER_KEYS)})")

    def check_group(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every entry of a whole new group checked, relations included; a new dict."""
        missing = self.hyperparameters - set(values)
        if missing:
            raise ValueError(f"a param group lacks hyperparameters {sorted(missing)}")
        unknown = [k for k in values if k not in self.hyperparameters
                   and k not in STRUCTURE_KEYS and k not in SCHEDULER_KEYS]
        if unknown:
            raise ValueError(f"unknown hyperparameters in a param group: {sorted(unknown)}")
        checked = {k: (v if k in STRUCTURE_KEYS else self.check(k, v))
                   for k, v in values.items()}
        self.optimizer.check_relations(checked)
        return checked

    def __reduce__(self) -> tuple:
        return (GroupSchema, (self.optimizer, sorted(self.hyperparameters)))


#: How many writes any :class:`ParamGroup` has seen (one count for all: a step's kept
#: record of what the hyperparameters imply, see :mod:`._steady`, is valid while it
#: stands). Counted after each write, under a lock (as the state dicts' count).
GROUP_WRITES = [0]
_COUNT_LOCK = threading.Lock()


def _count_group_write() -> None:
    with _COUNT_LOCK:
        GROUP_WRITES[0] += 1


class ParamGroup(MutableMapping):
    """One param group: ``params``, ``names`` and hyperparameters, checked when written.

    Made by the optimizer; see the module docstring. Reading is a dict lookup and
    writing one hyperparameter costs one check (about a microsecond), so a schedule
    may write ``lr`` every step.

    Parameters
    ----------
    values : mapping
        The group's entries, already checked (:meth:`GroupSchema.check_group`).
    schema : GroupSchema
        The optimizer's hyperparameters and checks.
    """

    __slots__ = ("_values", "_schema")

    def __init__(self, values: Mapping[str, Any], schema: GroupSchema) -> None:
        self._values = dict(values)
        self._schema = schema

    # Reading: a plain dict underneath.
    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def values_view(self) -> Mapping[str, Any]:
        """The entries as a read-only mapping (a view, no copy): the step reads every
        hyperparameter each step, faster through a plain mapping than this class."""
        return MappingProxyType(self._values)

    # Writing: checked first, then stored.
    def __setitem__(self, key: str, value: Any) -> None:
        schema = self._schema
        checked = schema.check(key, value)
        if key in schema.related:
            schema.optimizer.check_relations({**self._values, key: checked})
        self._values[key] = checked
        _count_group_write()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Write several entries at once: all are checked (each, then their relations)
        before any is stored, so ``update(momentum=0, nesterov=False)`` works from
        ``nesterov=True`` where one write at a time could not."""
        items = dict(other, **kwargs)
        checked = {key: self._schema.check(key, value) for key, value in items.items()}
        self._schema.optimizer.check_relations({**self._values, **checked})
        self._values.update(checked)
        _count_group_write()

    def __delitem__(self, key: str) -> None:
        if key not in self._values:
            raise KeyError(key)
        if key not in SCHEDULER_KEYS:
            raise ValueError(f"{key!r} cannot be removed from a param group: every group "
                             "holds its params, their names and all hyperparameters of "
                             f"{self._schema.optimizer.__name__}")
        del self._values[key]
        _count_group_write()

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self._values:
            self[key] = default
        return self._values[key]

    def copy(self) -> dict[str, Any]:
        """A plain dict of the entries (the ``params`` list itself is shared)."""
        return dict(self._values)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._values.items() if k != "params"}
        return f"ParamGroup({len(self._values['params'])} params, {shown!r})"

    def __reduce__(self) -> tuple:
        return (ParamGroup, (self._values, self._schema))

    def _store_params(self, params: Iterable[Any]) -> None:
        """The optimizer's own write of new parameter arrays (immutable libraries)."""
        self._values["params"] = list(params)
        _count_group_write()
