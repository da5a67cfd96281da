"""The optimizer base class: parameters, groups, state, validation and one step.

An optimizer is an :class:`~optim_core.rule.UpdateRule` (its elementwise math),
a table of hyperparameter defaults, and a ``scalars`` method computing the host
values the rule needs each step. Everything else lives here, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .. import _namespace as ns
from .. import backends
from .flat import FlatStorage
from .language import UpdateRule
from .registry import register

__all__ = ["Optimizer", "STATE_DICT_VERSION"]

STATE_DICT_VERSION = 1
_NONFINITE_POLICIES = ("propagate", "skip", "raise")
_GROUP_KEYS = ("params", "names")


def _check_nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_unit_interval(name: str, value: Any, *, closed: bool = False) -> None:
    _check_nonnegative(name, value)
    if value > 1 or (value == 1 and not closed):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")


def _check_betas(name: str, value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for i, beta in enumerate(value):
        _check_unit_interval(f"{name}[{i}]", beta)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


#: How each hyperparameter name is checked, wherever it appears.
_HYPERPARAMETER_CHECKS = {
    "lr": _check_nonnegative,
    "eps": _check_nonnegative,
    "weight_decay": _check_nonnegative,
    "momentum": _check_nonnegative,
    "dampening": lambda n, v: _check_unit_interval(n, v, closed=True),
    "alpha": _check_nonnegative,
    "rho": lambda n, v: _check_unit_interval(n, v, closed=True),
    "lr_decay": _check_nonnegative,
    "initial_accumulator_value": _check_nonnegative,
    "momentum_decay": _check_nonnegative,
    "decay": lambda n, v: _check_unit_interval(n, v, closed=True),
    "betas": _check_betas,
    "nesterov": _check_bool,
    "maximize": _check_bool,
    "amsgrad": _check_bool,
    "centered": _check_bool,
    "decoupled_weight_decay": _check_bool,
}


class Optimizer:
    """Base class of every optimizer.

    Parameters
    ----------
    params : list of arrays, dict of name -> array, or list of group dicts
        The arrays to optimize, from any array API library; all must share one
        namespace and device. A group dict has ``"params"`` (a list or dict of
        arrays) and any hyperparameter overrides, as in ``torch.optim``.
    defaults : dict
        Hyperparameters of every group that does not override them.
    impl : {"auto", "fused", "generic"}
        Which implementation runs the step; see :func:`optim_core.backends.select_implementation`.
    backend : "auto", "numpy", "cupy" or an array API module
        Must agree with the parameters' library; "auto" infers it from them.
    nonfinite : {"propagate", "skip", "raise"}
        What a step does with NaN or infinite gradients. "propagate" checks nothing
        and costs nothing; "skip" leaves parameters, state and step count untouched
        and counts the step in :attr:`skipped_steps`; "raise" raises ValueError
        naming the parameter before anything is written.
    flat : bool
        Store the parameters of each group and dtype in one contiguous buffer (with
        state and gradient buffers alike), so a step is one kernel launch per group
        and dtype however many tensors there are. The parameters are copied once:
        use :attr:`params` (views into the buffer) from then on, and write gradients
        into :attr:`grad_views` to pass them without a copy. NumPy, CuPy and torch
        arrays only. See :mod:`optim_core.flat`.
    """

    rule: ClassVar[UpdateRule]
    #: Initial value of each state buffer (zero when not listed).
    initial_state: ClassVar[Mapping[str, str]] = {}
    #: The lower-case name fit, the CLI and the tools know it by; a class that defines
    #: one joins :data:`optim_core.optim.registry.OPTIMIZERS`.
    cli_name: ClassVar[str | None] = None
    #: How ``weight_decay`` is applied; see :data:`optim_core.optim.registry.WEIGHT_DECAY_KINDS`.
    weight_decay_kind: ClassVar[str] = "none"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "cli_name" in cls.__dict__:
            register(cls)

    def __init__(self, params: Any, defaults: dict[str, Any], *, impl: str = "auto",
                 backend: Any = "auto", nonfinite: str = "propagate",
                 flat: bool = False) -> None:
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
        self._check_group(defaults)
        groups, self._keyed = _parse_params(params)
        all_arrays = [a for g in groups for a in g["params"]]
        all_names = [n for g in groups for n in g["names"]]
        self._xp = ns.common_namespace(all_arrays, all_names)
        _check_params(self._xp, all_arrays, all_names)
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        for group in groups:
            merged = {**self.defaults, **group}
            unknown = set(group) - set(self.defaults) - set(_GROUP_KEYS)
            if unknown:
                raise ValueError(f"unknown hyperparameters in a param group: {sorted(unknown)}")
            self._check_group(merged)
            self.param_groups.append(merged)
        self.backend = backends.select_backend(backend, self._xp)
        self.impl = impl
        self.implementation, self.implementation_reason = backends.select_implementation(
            impl, self.backend, self.rule)
        _check_bool("flat", flat)
        self._flat = FlatStorage(self._xp, self.backend.name, self.param_groups) if flat else None
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.group_state: list[dict[str, Any]] = [self._initial_group_state() for _ in groups]
        self.state: list[list[dict[str, Any]]] = [[{} for _ in g["params"]] for g in groups]

    # ----------------------------------------------------------------- per optimizer
    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        """Host scalars of this step beyond the hyperparameters (after ``step`` is incremented).

        May advance scalar state kept in ``group_state`` (a running product, say).
        """
        return {}

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        """Optional states this group needs under its current hyperparameters."""
        return set()

    def _initial_group_state(self) -> dict[str, Any]:
        return {"step": 0}

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Validate one group's hyperparameters (ValueError/TypeError)."""
        for name, value in group.items():
            check = _HYPERPARAMETER_CHECKS.get(name)
            if check is not None:
                check(name, value)

    # ----------------------------------------------------------------- public API
    @property
    def params(self) -> list[Any] | dict[str, Any]:
        """The parameters, in the structure they were given (a list or a dict)."""
        if self._keyed:
            return {n: p for g in self.param_groups for n, p in zip(g["names"], g["params"])}
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def grad_views(self) -> list[Any] | dict[str, Any]:
        """Arrays to write gradients into, in the structure of :attr:`params` (``flat=True``).

        They are views into the optimizer's gradient buffer: ``step(opt.grad_views)``
        copies nothing.
        """
        if self._flat is None:
            raise ValueError("grad_views exist only with flat=True")
        views = [v for i, g in enumerate(self.param_groups)
                 for v in self._flat.grad_views(i, len(g["params"]))]
        if self._keyed:
            return dict(zip((n for g in self.param_groups for n in g["names"]), views,
                            strict=True))
        return views

    def step(self, grads: Sequence[Any] | Mapping[str, Any]) -> list[Any] | dict[str, Any]:
        """Apply one update.

        Parameters
        ----------
        grads : list or dict of arrays
            One gradient per parameter, in the structure the parameters were given,
            with their shapes; cast to each parameter's dtype (a float64 gradient of a
            float32 parameter is rounded, the parameter stays float32).

        Returns
        -------
        list or dict
            The parameters: the same arrays, updated in place where the library
            allows it, or new arrays for immutable libraries (JAX).
        """
        # The optimizer's own gradient views need no checks: hundreds of tensors cost
        # one identity test each instead.
        grouped = self._flat.own_grad_views(grads, self._keyed) if self._flat is not None \
            else None
        if grouped is None:
            grouped = self._validated_grads(grads)
        if self._flat is not None:
            self._flat.check_params(self.param_groups)
        for group in self.param_groups:
            missing = set(self.defaults) - set(group)
            if missing:
                raise ValueError(f"a param group lacks hyperparameters {sorted(missing)}")
            self._check_group(group)
        if self.nonfinite != "propagate" and not self._all_finite(grouped):
            self.skipped_steps += 1
            return self.params
        for index, (group, gstate, states, group_grads) in enumerate(zip(
                self.param_groups, self.group_state, self.state, grouped)):
            self._step_group(group, gstate, states, group_grads, index)
        return self.params

    def state_dict(self) -> dict[str, Any]:
        """A backend-neutral snapshot: NumPy arrays, Python scalars and a format version."""
        index = 0
        groups = []
        for group in self.param_groups:
            entry = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in group.items() if k not in _GROUP_KEYS}
            entry["params"] = list(range(index, index + len(group["params"])))
            entry["names"] = list(group["names"]) if self._keyed else None
            index += len(group["params"])
            groups.append(entry)
        return {
            "format_version": STATE_DICT_VERSION,
            "optimizer": type(self).__name__,
            "param_groups": groups,
            "group_state": [dict(s) for s in self.group_state],
            "state": [{name: ns.to_numpy(arr) for name, arr in st.items()}
                      for states in self.state for st in states],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto the parameters' namespace and device.

        Everything is checked before anything is changed.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"format_version", "optimizer", "param_groups", "group_state", "state"} \
            - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        if state_dict.get("format_version") != STATE_DICT_VERSION:
            raise ValueError(f"unsupported state_dict format {state_dict.get('format_version')!r}")
        if state_dict.get("optimizer") != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict.get('optimizer')!r}, "
                             f"not {type(self).__name__}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        flat_state = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(flat_state) != len(params):
            raise ValueError(f"state_dict has state for {len(flat_state)} params, "
                             f"this optimizer has {len(params)}")
        new_groups = []
        for saved, group in zip(groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("param group sizes differ from the state_dict's")
            hyper = {k: (tuple(v) if k == "betas" else v)
                     for k, v in saved.items() if k not in _GROUP_KEYS}
            unknown = set(hyper) - set(self.defaults)
            if unknown:
                raise ValueError(f"unknown hyperparameters in the state_dict: {sorted(unknown)}")
            merged = {**group, **hyper}
            self._check_group(merged)
            new_groups.append(merged)
        new_state = []
        for i, (param, saved) in enumerate(zip(params, flat_state)):
            st = {}
            if not isinstance(saved, Mapping):
                raise TypeError(f"state of parameter {i} must be a dict, got {saved!r:.80}")
            for name, value in saved.items():
                if name not in self.rule.states:
                    raise ValueError(f"unknown state {name!r} for {type(self).__name__}")
                if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                    raise TypeError(f"state {name!r} of parameter {i} is a "
                                    f"{type(value).__name__}, not an array")
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"state {name!r} of parameter {i} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
                st[name] = value
            new_state.append(st)
        group_state = [dict(s) for s in state_dict["group_state"]]
        keys = set(self._initial_group_state())
        if len(group_state) != len(self.param_groups) or not all(
                set(s) == keys and isinstance(s["step"], int)
                and not isinstance(s["step"], bool) and s["step"] >= 0 for s in group_state):
            raise ValueError(f"group_state must hold {sorted(keys)} with an integer step >= 0 "
                             "for every group")
        # Everything checked: convert, then write.
        converted = [{name: ns.from_numpy(self._xp, value, like=param)
                      for name, value in st.items()} for param, st in zip(params, new_state)]
        it = iter(converted)
        state = [[next(it) for _ in g["params"]] for g in self.param_groups]
        self.state = state if self._flat is None else self._flat.adopt(state)
        self.param_groups = new_groups
        self.group_state = group_state

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({hyper}, impl={self.implementation.name!r})"

    # ----------------------------------------------------------------- internals
    def _validated_grads(self, grads: Any) -> list[list[Any]]:
        names = [n for g in self.param_groups for n in g["names"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if self._keyed:
            if not isinstance(grads, Mapping):
                raise TypeError("params were given as a dict: grads must be a dict too")
            missing, extra = set(names) - set(grads), set(grads) - set(names)
            if missing or extra:
                raise ValueError(f"grads keys differ from params: missing {sorted(missing)}, "
                                 f"unexpected {sorted(map(str, extra))}")
            flat = [grads[n] for n in names]
        else:
            if isinstance(grads, Mapping) or not isinstance(grads, Sequence):
                raise TypeError("params were given as a list: grads must be a list too")
            if len(grads) != len(params):
                raise ValueError(f"got {len(grads)} grads for {len(params)} params")
            flat = list(grads)
        checked = []
        for name, param, grad in zip(names, params, flat):
            ns.check_same_library(grad, param, f"grad of {name!r}")
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(f"grad of {name!r} has shape {tuple(grad.shape)}, "
                                 f"the parameter {tuple(param.shape)}")
            # The parameter's dtype is floating (checked at construction): a gradient of
            # the same dtype needs no dtype check.
            if grad.dtype != param.dtype:
                if not ns.is_floating(self._xp, grad):
                    raise TypeError(f"grad of {name!r} has dtype {grad.dtype}; gradients "
                                    "must be floating point")
                grad = self._xp.astype(grad, param.dtype)
            checked.append(grad)
        it = iter(checked)
        return [[next(it) for _ in g["params"]] for g in self.param_groups]

    def _all_finite(self, grouped: list[list[Any]]) -> bool:
        xp = self._xp
        checks = [xp.all(xp.isfinite(grad)) for grads in grouped for grad in grads]
        every = checks[0]
        for check in checks[1:]:
            every = xp.logical_and(every, check)
        # One host synchronization a step however many parameters; names only on failure.
        if bool(every):
            return True
        if self.nonfinite == "raise":
            names = [name for group in self.param_groups for name in group["names"]]
            name = next(n for n, check in zip(names, checks, strict=True) if not bool(check))
            raise ValueError(f"non-finite gradient for parameter {name!r}; nothing was updated")
        return False

    def _rule_scalars(self, group: Mapping[str, Any], derived: Mapping[str, Any]) -> dict:
        available = {k: v for k, v in group.items() if k not in _GROUP_KEYS}
        if "betas" in available:
            available["beta1"], available["beta2"] = available.pop("betas")
        available.update(derived)
        return {name: available[name] for name in self.rule.scalars}

    def _step_group(self, group: dict, gstate: dict, states: list[dict], grads: list,
                    index: int) -> None:
        active = (set(self.rule.states) - self.rule.optional_states) | self.active_states(group)
        new_states = frozenset(name for name in active if name not in states[0]) \
            if states else frozenset()
        if self._flat is not None:
            if new_states:
                self._flat.allocate(index, states, {
                    name: group[self.initial_state[name]] if name in self.initial_state else 0
                    for name in self.rule.states if name in new_states})
        else:
            for param, st in zip(group["params"], states):
                # The rule's order, not a set's: state_dict() is then the same in every process.
                for name in [n for n in self.rule.states if n in active and n not in st]:
                    fill = self.initial_state.get(name)
                    value = group[fill] if fill else 0
                    st[name] = self._xp.full(param.shape, value, dtype=param.dtype,
                                             device=ns.device_of(param))
        gstate["step"] += 1
        derived = self.scalars(group, gstate)
        derived.setdefault("first_step", bool(new_states))
        scalars = self._rule_scalars(group, derived)
        if self._flat is not None:
            # Whole buffers: one kernel launch per dtype; the views in group["params"]
            # and in states see the update.
            self.implementation.step(self.rule, self._xp, *self._flat.buffers(index, grads),
                                     scalars)
            return
        group["params"] = self.implementation.step(
            self.rule, self._xp, group["params"], grads, states, scalars)


def _parse_params(params: Any) -> tuple[list[dict[str, Any]], bool]:
    """Normalize params to groups ``{"params": [...], "names": [...], **overrides}``."""
    if isinstance(params, Mapping):
        if "params" in params:
            raise TypeError("a single param group must be wrapped in a list: [group]")
        return [{"params": list(params.values()), "names": [str(k) for k in params]}], True
    if not isinstance(params, Sequence) or isinstance(params, (str, bytes)):
        raise TypeError("params must be a list of arrays, a dict of name -> array, or a list "
                        f"of param group dicts; got {type(params).__name__}")
    params = list(params)
    if params and all(isinstance(g, Mapping) for g in params):
        groups, keyed = [], None
        for i, g in enumerate(params):
            if "params" not in g:
                raise ValueError(f"param group {i} has no 'params' entry")
            inner = g["params"]
            is_keyed = isinstance(inner, Mapping)
            if keyed is not None and keyed != is_keyed:
                raise TypeError("param groups must all give params as lists, or all as dicts")
            keyed = is_keyed
            overrides = {k: v for k, v in g.items() if k != "params"}
            if is_keyed:
                groups.append({"params": list(inner.values()),
                               "names": [str(k) for k in inner], **overrides})
            else:
                groups.append({"params": list(inner), "names": [], **overrides})
        if not keyed:
            index = 0
            for g in groups:
                g["names"] = [str(index + i) for i in range(len(g["params"]))]
                index += len(g["params"])
        names = [n for g in groups for n in g["names"]]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique across param groups")
        return groups, bool(keyed)
    if any(isinstance(g, Mapping) for g in params):
        raise TypeError("params mixes arrays and param group dicts")
    return [{"params": params, "names": [str(i) for i in range(len(params))]}], False


def _check_params(xp: Any, arrays: list[Any], names: list[str]) -> None:
    seen: dict[int, str] = {}
    for name, x in zip(names, arrays):
        if not ns.is_floating(xp, x):
            raise TypeError(f"parameter {name!r} has dtype {x.dtype}; parameters must be "
                            "floating point")
        if ns.is_read_only(x):
            raise ValueError(f"parameter {name!r} is read-only; the optimizer updates "
                             "parameters in place")
        key = ns.identity_key(x)
        if key in seen:
            raise ValueError(f"parameters {seen[key]!r} and {name!r} are the same array")
        seen[key] = name
