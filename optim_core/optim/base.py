"""The optimizer base class: parameters, groups, state, checks and one step.

An optimizer is an :class:`~optim_core.optim.language.UpdateRule` (its elementwise
math), a table of hyperparameter defaults, and a ``scalars`` method computing the host
values the rule needs each step. Everything else lives here, once. Subclassing
:class:`Optimizer` is public API: see its Notes for what a subclass sets.

Validate first, then write
--------------------------
Hyperparameters are checked when they are written (:mod:`.param_group`), so a step
does not check them again. A step checks everything else before it writes anything,
for every group: the gradients (structure, library, device, shape, dtype; no masked
or sparse arrays), the parameters (one replaced in ``param_groups`` or resized in
place is checked again in full: library, dtype, writability, overlap with the
others), every state against its parameter, the kernels it will run (compiled now if
need be), and the non-finite policy. Then it writes: each group's prepared step runs,
and the new states and group states (step counts, NAdam's ``mu_product``, DGD's
``decay_product``) are installed. A step that raises has changed nothing.

Host scalars
------------
A step's host values are derived in one place, :meth:`Optimizer.step_scalars`: the
rule's keyword scalars are the group's hyperparameters by name (a pair by its parts:
``betas`` is ``beta1, beta2``), then what the optimizer's :meth:`~Optimizer.scalars`
derives (bias corrections, decayed step sizes), then ``first_step``. The lowering
(:mod:`optim_core.backends._lowering`) then only folds the rule's own scalar-only
expressions into kernel arguments.

Threads
-------
``step``, ``state_dict`` and ``load_state_dict`` hold a lock of the optimizer, so
calls from several threads run one at a time and lose no update.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any, ClassVar

import numpy as np

from .. import _checks, backends
from .. import _namespace as ns
from ..backends._fused import STATE_WRITES, StateDict
from ..backends._generic import TensorMismatch, state_dtype
from ..backends._lowering import reductions_taken
from ..backends._quantized import (
    QUANTIZE_MIN_SIZE,
    STATE_BITS,
    QuantizedState,
    block_count,
    code_count,
    new_quantized_state,
)
from ..backends._rounding import COMPENSATION, Rounding, is_16bit
from ._steady import SteadyRecord
from .flat import FlatStorage
from .language import UpdateRule
from .memory import check_no_overlap
from .param_group import (
    GROUP_WRITES,
    SCHEDULER_KEYS,
    STRUCTURE_KEYS,
    GroupSchema,
    Hyperparameter,
    ParamGroup,
)
from .registry import WEIGHT_DECAY_KINDS, register

__all__ = ["Optimizer", "STATE_DICT_VERSION"]

STATE_DICT_VERSION = 1
_NONFINITE_POLICIES = ("propagate", "skip", "raise")


class Optimizer:
    """Base class of every optimizer.

    Parameters
    ----------
    params : list of arrays, dict of name -> array, or list of group dicts
        The arrays to optimize, from any array API library; all must share one
        namespace and device, and no two may share memory. A group dict has
        ``"params"`` (a list or dict of arrays) and any hyperparameter overrides, as
        in ``torch.optim``. Names (dict keys) are strings.
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
        arrays only. See :mod:`optim_core.optim.flat`.
    state_bits : {32, 8, 4}
        Width of the states listed in :attr:`quantized_states` (first and second
        moments, momentum buffers). 8 and 4 store each state of a tensor of at least
        :data:`~optim_core.backends._quantized.QUANTIZE_MIN_SIZE` (4096) elements as
        block-wise codes with one float32 absmax scale per block (256 elements at 8 bits,
        128 at 4), with the dynamic maps of Dettmers et al. 2022 and the 4-bit maps of Li
        et al. 2023; smaller tensors keep float32 states. A step dequantizes, updates and
        quantizes again in one pass (see :mod:`optim_core.backends._quantized`). Adam
        then holds about 2.03 bytes of state per parameter at 8 bits and 1.06 at 4,
        instead of 8; :meth:`state_nbytes` tells. Not with ``flat=True``.
    stochastic_rounding : bool
        For bfloat16 and float16 parameters: store each step's float32 result rounded
        stochastically (up with the probability of its distance from the value below),
        so that updates under half a unit in the last place are kept on average instead of
        lost (Zamirai et al. 2020). The random numbers are a counter-based hash of
        ``seed``, the step, the tensor and the element: a run is reproducible and the same
        on NumPy, torch and CuPy. See :mod:`optim_core.backends._rounding`.
    compensated : bool
        The other remedy for 16-bit parameters: a Kahan-compensated update. A state
        ``"compensation"`` of the parameter's dtype keeps what rounding dropped, and the
        next step updates ``param + compensation``. Costs one 16-bit buffer a parameter;
        deterministic. Not with ``flat=True`` or ``stochastic_rounding``.
    seed : int
        Seeds stochastic rounding.

    Attributes
    ----------
    param_groups : list of ParamGroup
        Each group's ``params``, ``names`` and hyperparameters; writing a
        hyperparameter checks it at once (see :mod:`optim_core.optim.param_group`).
    state : list of list of dict
        Per group, per parameter: its state arrays by name.
    group_state : list of dict
        Per group: the step count and any scalar state of the optimizer.

    Notes
    -----
    **Writing an optimizer.** A subclass is a complete optimizer (generic path on
    every array API library, fused numba and CUDA kernels, state dicts, checkpoints,
    param groups, every option above) once it sets:

    ``rule`` (required)
        An :class:`~optim_core.optim.language.UpdateRule`, a function decorated with
        :func:`optim_core.update_rule`. Its keyword scalars are filled each step from
        the group's hyperparameters by name (a pair by its parts: ``betas`` gives
        ``beta1, beta2``), then from :meth:`scalars`, then ``first_step``.
    ``__init__``
        Takes ``params``, the hyperparameters with their defaults, and ``**options``
        (``impl``, ``backend``, ``nonfinite``, ``flat``, ...), and calls
        ``super().__init__(params, dict(lr=lr, ...), **options)``.
    :meth:`scalars`
        Host values the rule needs beyond the hyperparameters (bias corrections,
        a decayed step size), in float64, from the group and the exact integer
        ``group_state["step"]``.
    ``hyperparameter_checks``
        ``{name: Hyperparameter(check, parts)}`` for each hyperparameter that the
        shared table :data:`~optim_core.optim.param_group.HYPERPARAMETERS` (``lr``,
        ``betas``, ``eps``, ``weight_decay``, ``momentum``, ``maximize``, ...) lacks;
        ``check(name, value)`` returns the value to store or raises ValueError or
        TypeError. A hyperparameter no check covers is refused when the optimizer is
        made. Relations between hyperparameters: :meth:`check_relations` and
        ``related_hyperparameters``.
    ``initial_state``, ``initial_group_state``, :meth:`active_states`, ``quantized_states``
        Optional: a state's fill (a hyperparameter's name; zero otherwise), scalar
        state kept per group beyond the step count, which optional states a group
        needs, which states ``state_bits=8`` or ``4`` may quantize.
    ``weight_decay_kind``
        How the class applies ``weight_decay`` ("none", "l2", "decoupled",
        "switchable"), which :func:`optim_core.fit` reads to hand its decoupled
        ``weight_decay`` over or apply it itself.
    ``cli_name``
        Optional. A class that sets one joins the registry
        (:data:`optim_core.optim.registry.OPTIMIZERS`), so ``fit(optimizer=name)``,
        the command line and the tools know it by that name; a class without one is
        used as ``fit(optimizer=MyOptimizer)`` or as an instance.

    The class attributes are checked when the class is defined (TypeError), the rule
    when it is decorated (:class:`~optim_core.optim.language.RuleError`).
    """

    rule: ClassVar[UpdateRule]
    #: The value each state buffer starts at: the name of a hyperparameter whose value
    #: fills it (Adagrad's ``{"sum": "initial_accumulator_value"}``); zero when not listed.
    initial_state: ClassVar[Mapping[str, str]] = {}
    #: Scalar state of each group beyond the step count, with its starting value
    #: (DGD's ``{"decay_product": 1.0}``): :meth:`scalars` reads and updates it in the
    #: step's copy of the group state, and state dicts keep it.
    initial_group_state: ClassVar[Mapping[str, float]] = {}
    #: The lower-case name fit, the CLI and the tools know it by; a class that defines
    #: one joins :data:`optim_core.optim.registry.OPTIMIZERS`. Optional.
    cli_name: ClassVar[str | None] = None
    #: How ``weight_decay`` is applied; see :data:`optim_core.optim.registry.WEIGHT_DECAY_KINDS`.
    weight_decay_kind: ClassVar[str] = "none"
    #: The hyperparameters :meth:`check_relations` relates; writing one of them checks
    #: the relations again.
    related_hyperparameters: ClassVar[frozenset[str]] = frozenset()
    #: Checks of hyperparameters this optimizer has and the shared table
    #: (:data:`~optim_core.optim.param_group.HYPERPARAMETERS`) lacks, by name.
    hyperparameter_checks: ClassVar[Mapping[str, Hyperparameter]] = {}
    #: The rule's scalars that differ from one tensor of a group to the next (Muon's
    #: learning rate scaled by the matrix's shape): :meth:`tensor_scalars` derives them.
    tensor_scalar_names: ClassVar[tuple[str, ...]] = ()
    #: The states ``state_bits=8`` or ``4`` quantizes, each with its map: True for the
    #: signed map (first moments, momentum), False for the unsigned one (second moments).
    #: An optimizer without any refuses ``state_bits`` other than 32.
    quantized_states: ClassVar[Mapping[str, bool]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_class(cls)
        if "cli_name" in cls.__dict__ and cls.cli_name is not None:
            register(cls)

    def __init__(self, params: Any, defaults: dict[str, Any], *, impl: str = "auto",
                 backend: Any = "auto", nonfinite: str = "propagate",
                 flat: bool = False, state_bits: int = 32, stochastic_rounding: bool = False,
                 compensated: bool = False, seed: int = 0) -> None:
        if not isinstance(getattr(type(self), "rule", None), UpdateRule):
            raise TypeError(f"{type(self).__name__} has no update rule: set the class "
                            "attribute rule to a function decorated with "
                            "@optim_core.update_rule")
        self.nonfinite = nonfinite
        flat = _checks.boolean("flat", flat)
        state_bits = _checks.choice("state_bits", _checks.integer("state_bits", state_bits),
                                    STATE_BITS)
        if state_bits != 32 and not self.quantized_states:
            raise ValueError(f"{type(self).__name__} has no state that state_bits={state_bits} "
                             "could quantize; use state_bits=32")
        if state_bits != 32 and flat:
            raise ValueError("flat=True keeps every state in one float buffer: state_bits="
                             f"{state_bits} needs flat=False")
        self.state_bits = state_bits
        stochastic_rounding = _checks.boolean("stochastic_rounding", stochastic_rounding)
        compensated = _checks.boolean("compensated", compensated)
        if stochastic_rounding and compensated:
            raise ValueError("stochastic_rounding and compensated are two ways to store a "
                             "16-bit parameter: choose one")
        if compensated and flat:
            raise ValueError("compensated=True needs flat=False")
        if flat and self.rule.state_shapes:
            raise ValueError(f"flat=True keeps states in buffers shaped like the parameters', "
                             f"but {type(self).__name__} keeps states of other shapes "
                             f"({', '.join(sorted(self.rule.state_shapes))}); use flat=False")
        self.rounding = "stochastic" if stochastic_rounding else \
            "compensated" if compensated else "nearest"
        self.seed = _checks.integer("seed", seed, minimum=0)
        self._schema = GroupSchema(type(self), defaults)
        self.defaults = self._schema.check_group(defaults)
        groups, self._keyed = _parse_params(params)
        all_arrays = [a for g in groups for a in g["params"]]
        all_names = [n for g in groups for n in g["names"]]
        self._xp = ns.common_namespace(all_arrays, all_names)
        for name, array in zip(all_names, all_arrays, strict=True):
            _check_param(self._xp, name, array)
        check_no_overlap(all_arrays, all_names)
        self.param_groups: list[ParamGroup] = [
            ParamGroup(self._schema.check_group({**self.defaults, **group}), self._schema)
            for group in groups]
        self.backend = backends.select_backend(backend, self._xp)
        self.impl = impl
        self.implementation, self.implementation_reason = backends.select_implementation(
            impl, self.backend, self.rule)
        self._flat = FlatStorage(self._xp, self.backend.name, self.param_groups) if flat else None
        self.skipped_steps = 0
        self.group_state: list[dict[str, Any]] = [self._initial_group_state() for _ in groups]
        self.state: list[list[dict[str, Any]]] = [[StateDict() for _ in g["params"]]
                                                  for g in groups]
        self._sources = self._scalar_sources()
        self._required_states = frozenset(self.rule.states) - self.rule.optional_states
        self._lock = threading.Lock()
        self._remember_params()
        if self._flat is not None:
            for index in range(len(self.param_groups)):
                self._check_flat_reductions(index)

    # ----------------------------------------------------------------- per optimizer
    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        """Host scalars of this step beyond the hyperparameters (override in a subclass).

        Parameters
        ----------
        group : mapping
            The param group's hyperparameters (checked values: Python floats, bools,
            tuples for pairs).
        group_state : dict
            This step's own copy of the group state, its ``step`` (an exact Python
            int) already counting this step, so the first step sees 1. An optimizer
            with scalar state (a running product, declared in
            ``initial_group_state``) updates it here; the copy becomes the group
            state only if the step succeeds.

        Returns
        -------
        dict
            Keyword scalars of the rule by name, Python numbers or bools; they take
            precedence over hyperparameters of the same name.
        """
        return {}

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        """The rule's optional states this group needs under its current hyperparameters
        (SGD's ``momentum_buffer`` when ``momentum != 0``); override in a subclass."""
        return set()

    def tensor_scalars(self, group: Mapping[str, Any], scalars: Mapping[str, Any],
                       shape: tuple[int, ...], dtype: Any = None) -> dict[str, Any]:
        """The scalars of :attr:`tensor_scalar_names` for one tensor of ``shape`` and
        ``dtype``, from the group's hyperparameters and this step's ``scalars`` (host
        values; shapes and dtypes are known on the host, so no device value is read)."""
        return {}

    def _initial_group_state(self) -> dict[str, Any]:
        return {"step": 0, **self.initial_group_state}

    @classmethod
    def check_relations(cls, group: Mapping[str, Any]) -> None:
        """Check relations between a group's hyperparameters (ValueError); each value has
        been checked on its own already. Called when a group is made and whenever one of
        :attr:`related_hyperparameters` is written."""

    # ----------------------------------------------------------------- public API
    @property
    def nonfinite(self) -> str:
        """The non-finite gradient policy: "propagate", "skip" or "raise" (checked when set)."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        self._nonfinite = _checks.choice("nonfinite", value, _NONFINITE_POLICIES)
        self._steady: SteadyRecord | None = None  # it records the policy

    @property
    def params(self) -> list[Any] | dict[str, Any]:
        """The parameters, in the structure they were given (a list or a dict)."""
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        return dict(zip(self._names, params)) if self._keyed else list(params)

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
        """Apply one update; a call that raises changes nothing.

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
        with self._lock:
            return self._step(grads)

    def step_scalars(self, group: Mapping[str, Any], group_state: Mapping[str, Any], *,
                     first_step: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """The rule's keyword scalars for one step of ``group``, and the group state after it.

        The one derivation of a step's host values (see the module docstring); changes
        nothing.

        Parameters
        ----------
        group : mapping
            A param group's hyperparameters.
        group_state : mapping
            The group state before the step.
        first_step : bool
            Whether the step allocates the group's optional states (SGD copies the
            gradient into a new momentum buffer).
        """
        after = dict(group_state)
        after["step"] += 1
        # Read through the plain dict under a ParamGroup: each step reads every
        # hyperparameter, and a Python-level __getitem__ per read costs more than the rest.
        if type(group) is ParamGroup:
            group = group.values_view()
        derived = self.scalars(group, after)
        values = {}
        for name, source, part in self._sources:
            if name in derived:
                values[name] = derived[name]
            elif source is not None:
                values[name] = group[source] if part is None else group[source][part]
            elif name == "first_step":
                values[name] = first_step
            elif name in self.tensor_scalar_names:
                continue  # per tensor: tensor_scalars()
            else:
                raise TypeError(f"rule {self.rule.name} needs the scalar {name!r}, which "
                                f"{type(self).__name__} neither has as a hyperparameter nor "
                                "derives in scalars()")
        return values, after

    def state_dict(self) -> dict[str, Any]:
        """A backend-neutral snapshot: NumPy arrays, Python scalars and a format version."""
        with self._lock:
            index = 0
            groups = []
            for group in self.param_groups:
                entry = {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in group.items() if k not in STRUCTURE_KEYS}
                entry["params"] = list(range(index, index + len(group["params"])))
                entry["names"] = list(group["names"]) if self._keyed else None
                index += len(group["params"])
                groups.append(entry)
            return {
                "format_version": STATE_DICT_VERSION,
                "optimizer": type(self).__name__,
                "param_groups": groups,
                "group_state": [dict(s) for s in self.group_state],
                "state": [{name: _exported(arr) for name, arr in st.items()}
                          for states in self.state for st in states],
            }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto the parameters' namespace and device.

        Everything is checked before anything is changed: the format, every group's
        hyperparameters (scheduler keys such as ``initial_lr`` included), every state
        array (shape, kind, and the same states for every parameter of a group, all of
        the rule's required ones once the group has stepped) and every group state.
        """
        with self._lock:
            self._load_state_dict(state_dict)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({hyper}, impl={self.implementation.name!r})"

    # Copies and pickles get a lock of their own and no cached per-step records; the
    # namespace, backend and implementation (modules and compiled kernels) travel by name
    # and are found again from the parameters, as when the optimizer was made.
    def __getstate__(self) -> dict[str, Any]:
        if self._flat is not None:
            raise TypeError(f"a {type(self).__name__} with flat=True cannot be deep-copied "
                            "or pickled: its parameters are views of its buffers, which such "
                            "a copy would not keep; copy its state_dict() instead")
        state = self.__dict__.copy()
        del state["_lock"]
        state["_caches"] = [{} for _ in state["_caches"]]
        state["_steady"] = None
        for key in ("_xp", "backend", "implementation", "implementation_reason"):
            state.pop(key, None)
        state["_backend_name"] = self.backend.name
        state.pop("_plannable", None)  # a cached property, found again
        return state

    def __copy__(self) -> Optimizer:
        # A shallow copy shares the parameters, states and buffers (flat=True too), and
        # the namespace and kernels; it gets its own lock and per-step records.
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._lock = threading.Lock()
        other._caches = [{} for _ in self._caches]
        other._steady = None
        return other

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        backend = state.pop("_backend_name", None)
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if backend is not None:
            arrays = [p for group in self.param_groups for p in group["params"]]
            self._xp = ns.common_namespace(arrays, self._names)
            self.backend = backends.select_backend(backend, self._xp)
            self.implementation, self.implementation_reason = \
                backends.select_implementation(self.impl, self.backend, self.rule)

    # ----------------------------------------------------------------- the step
    def _step(self, grads: Any) -> list[Any] | dict[str, Any]:
        steady = self._steady
        if steady is not None and steady.holds(self):
            planned = self._steady_step(steady, grads)
            if planned is not None:
                return planned
            # A gradient or array the plans do not take now: the full path below, as the
            # plans themselves would decline it for the same reason.
        else:
            self._steady = None
            planned = self._planned_step(grads)
            if planned is not None:
                return planned
        self._check_group_structure()
        flat = self._flat
        # The optimizer's own gradient views need no checks: hundreds of tensors cost
        # one identity test each instead.
        grouped = flat.own_grad_views(grads, self._keyed) if flat is not None else None
        if grouped is None:
            grouped = self._checked_grads(grads)
        prepared = [self._prepare_group(index, group_grads)
                    for index, group_grads in enumerate(grouped)]
        if self._nonfinite != "propagate" and not self._all_finite(grouped):
            self.skipped_steps += 1
            return self.params
        # Everything is checked and ready: from here on the step writes.
        for run in prepared:
            run()
        return self.params

    @functools.cached_property
    def _plannable(self) -> bool:
        """Whether step plans can take this rule: the same scalars for every tensor and no
        matrix operation (those steps take the full path; so does a specialization with a
        reduction pass, which the implementation declines)."""
        return not (self.rule.matrix_operations or self.tensor_scalar_names)

    def _planned_step(self, grads: Any) -> list[Any] | dict[str, Any] | None:
        """The step through each group's kept plan (see
        :meth:`~optim_core.backends._fused.FusedImplementation.plan_step`), or None, having
        written nothing, where a plan does not apply: then the full path checks everything.
        Where every group has a plan, the step leaves a :class:`SteadyRecord` for the next
        (:meth:`_steady_step`).

        Only the gradients' structure is looked at here (a list or dict of the right
        length and keys); the implementation checks each gradient against its parameter
        in one compiled pass, with the parameters and states.
        """
        # The write counts before anything is checked (see SteadyRecord).
        writes = (STATE_WRITES[0], GROUP_WRITES[0])
        implementation = self.implementation
        if not getattr(implementation, "keeps_plans", False) or self._flat is not None \
                or self.rounding != "nearest" or not self._plannable:
            return None
        # Other policies: the plan checks that every gradient is finite (compiled), and
        # leaves a step that has one that is not to the full path, which skips or raises.
        finite = self._nonfinite != "propagate"
        self._check_group_structure()
        given = self._given_grads(grads)
        if given is None:
            return None
        prepared, position, plans, needed = [], 0, [], []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            count = len(params)
            scalars, after = self.step_scalars(group, self.group_state[index])
            active = self._required_states | self.active_states(group)
            cache = self._caches[index]
            ready = implementation.plan_step(
                self.rule, params, given[position:position + count], self.state[index],
                scalars, active, self._known[index], self._shapes[index], cache, finite)
            if ready is None:
                return None
            prepared.append((index, ready, after))
            plan = cache.get("plan")
            plans.append(None if plan is None else plan.data)
            needed.append(active)
            position += count
        # Everything is checked and ready: from here on the step writes.
        for index, ready, after in prepared:
            ready.run()
            self.group_state[index].update(after)
        if all(data is not None for data in plans):
            self._steady = SteadyRecord(self, plans, needed, writes)
        return self.params

    def _steady_step(self, steady: SteadyRecord, grads: Any) -> list[Any] | dict[str, Any] | None:
        """:meth:`_planned_step` on the structure and plans ``steady`` recorded (it holds):
        the scalars derived, the gradients and planned arrays checked (compiled), then the
        kernels run; None, having written nothing, where a check fails."""
        given = self._given_grads(grads)
        if given is None:
            return None
        implementation, rule, finite = self.implementation, self.rule, steady.finite
        group_state = self.group_state
        prepared, position = [], 0
        for index, (group, data, count, (params, _)) in enumerate(
                zip(steady.groups, steady.plans, steady.counts, steady.params)):
            scalars, after = self.step_scalars(group, group_state[index])
            ready = implementation.planned_step(
                rule, data, given if count == len(given) else given[position:position + count],
                scalars, params, finite)
            if ready is None:
                return None
            prepared.append((ready, after))
            position += count
        # Everything is checked and ready: from here on the step writes.
        for index, (ready, after) in enumerate(prepared):
            ready.run()
            group_state[index].update(after)
        # The parameters as self.params gives them: those recorded (holds() saw them).
        return dict(zip(self._names, steady.flat)) if self._keyed else list(steady.flat)

    def _given_grads(self, grads: Any) -> Sequence[Any] | None:
        """The gradients in parameter order, if ``grads`` has the parameters' structure
        (a list or tuple of their number, or a dict of their names); else None."""
        names = self._names
        if self._keyed:
            if type(grads) is not dict or len(grads) != len(names):
                return None
            try:
                return list(map(grads.__getitem__, names))
            except KeyError:
                return None
        if (type(grads) is not list and type(grads) is not tuple) or len(grads) != len(names):
            return None
        return grads

    def _check_group_structure(self) -> None:
        """The groups, their parameter lists and states are still the optimizer's."""
        groups = self.param_groups
        if type(groups) is not list or len(groups) != len(self._known):
            raise ValueError("param groups were added or removed after the optimizer was "
                             "made; make a new optimizer instead")
        for index, group in enumerate(groups):
            if type(group) is not ParamGroup:
                raise TypeError(f"param_groups[{index}] was replaced by a "
                                f"{type(group).__name__}; write hyperparameters into the "
                                "optimizer's own groups instead")
            if len(group["params"]) != len(self._known[index]):
                raise ValueError(f"param group {index} now has {len(group['params'])} params, "
                                 f"it was made with {len(self._known[index])}")
        if len(self.state) != len(groups) or len(self.group_state) != len(groups) or any(
                len(states) != len(g["params"]) for states, g in zip(self.state, groups)):
            raise ValueError("optimizer.state or group_state no longer has one entry per "
                             "param group and parameter")
        if self._flat is not None:
            self._flat.check_params(groups)

    def _checked_grads(self, grads: Any) -> list[list[Any]]:
        """Each group's gradients, checked against its parameters (cast to their dtypes);
        a parameter replaced or resized since the last step is checked again first."""
        names = [n for g in self.param_groups for n in g["names"]]
        if self._keyed:
            if not isinstance(grads, Mapping):
                raise TypeError("params were given as a dict: grads must be a dict too")
            missing, extra = set(names) - set(grads), set(grads) - set(names)
            if missing or extra:
                raise ValueError(f"grads keys differ from params: missing {sorted(missing)}, "
                                 f"unexpected {sorted(map(repr, extra))}")
            given = [grads[n] for n in names]
        else:
            if isinstance(grads, Mapping) or not isinstance(grads, Sequence):
                raise TypeError("params were given as a list: grads must be a list too")
            if len(grads) != len(names):
                raise ValueError(f"got {len(grads)} grads for {len(names)} params")
            given = grads
        self._check_changed_params()
        xp = self._xp
        grouped = []
        position = 0
        for group, shapes in zip(self.param_groups, self._shapes):
            checked = []
            for param, shape in zip(group["params"], shapes):
                grad = given[position]
                if type(grad) is not np.ndarray or type(param) is not np.ndarray:
                    _check_grad_kind(grad, param, names[position])
                if grad.shape != shape:
                    raise ValueError(f"grad of {names[position]!r} has shape "
                                     f"{tuple(grad.shape)}, the parameter {shape}")
                # The parameter's dtype is floating (checked when it was given): a gradient
                # of the same dtype needs no dtype check.
                if grad.dtype != param.dtype:
                    if not ns.is_floating(xp, grad):
                        raise TypeError(f"grad of {names[position]!r} has dtype {grad.dtype}; "
                                        "gradients must be floating point")
                    grad = xp.astype(grad, param.dtype)
                checked.append(grad)
                position += 1
            grouped.append(checked)
        return grouped

    def _check_changed_params(self) -> None:
        """Check again, in full, every parameter that is not the array last checked or has
        another shape (replaced in ``param_groups``, or resized in place); remember them
        once all pass."""
        changed = []
        for group_index, (group, known, shapes) in enumerate(
                zip(self.param_groups, self._known, self._shapes)):
            for i, (param, before, shape) in enumerate(zip(group["params"], known, shapes)):
                if param is not before or param.shape != shape:
                    changed.append((group_index, i, param))
        if not changed:
            return
        reference = next((p for known in self._known for p in known), None)
        for group_index, i, param in changed:
            name = self.param_groups[group_index]["names"][i]
            if reference is not None:
                ns.check_same_library(param, reference, f"parameter {name!r}")
            _check_param(self._xp, name, param)
        check_no_overlap([p for g in self.param_groups for p in g["params"]],
                         [n for g in self.param_groups for n in g["names"]])
        for group_index, i, param in changed:
            self._known[group_index][i] = param
            self._shapes[group_index][i] = tuple(param.shape)

    def _prepare_group(self, index: int, grads: list[Any]) -> Any:
        """Everything one group's step needs, checked and computed, written nowhere; the
        function that writes it."""
        group, states = self.param_groups[index], self.state[index]
        flat, xp, rule = self._flat, self._xp, self.rule
        active = self._required_states | self.active_states(group)
        new = self._new_state_names(group, states, active)
        fills = {name: group[self.initial_state[name]] if name in self.initial_state else 0
                 for name in new}
        scalars, after = self.step_scalars(group, self.group_state[index],
                                           first_step=bool(new and states))
        fresh = None
        if flat is not None:
            self._check_flat_reductions(index, scalars)
            params, step_grads, step_states = flat.buffers(index)
            if new:
                fresh = flat.new_states(index, fills)
                step_states = [{**st, **f} for st, f in zip(step_states, fresh, strict=True)]
            names = None
        else:
            params, step_grads, step_states = group["params"], grads, states
            if new:
                fresh = [{name: self._new_state(param, name, value)
                          for name, value in fills.items()
                          if rule.holds_state(name, len(param.shape))} for param in params]
                step_states = [{**st, **f} for st, f in zip(states, fresh, strict=True)]
            names = group["names"]
        rounding = {}
        if self.rounding != "nearest":
            rounding["rounding"] = Rounding(self.rounding, self.seed, after["step"], index)
        if self.rounding == "compensated" and flat is None and not all(
                COMPENSATION in st for st in states):
            # Made at the first step, as the rule's states; every 16-bit parameter has one.
            extra = [{COMPENSATION: xp.zeros(param.shape, dtype=param.dtype,
                                             device=ns.device_of(param))}
                     if is_16bit(param.dtype) and COMPENSATION not in st else {}
                     for param, st in zip(params, states)]
            fresh = extra if fresh is None else [{**f, **e} for f, e in zip(fresh, extra)]
            step_states = [{**st, **e} for st, e in zip(step_states, extra, strict=True)]
        if self.tensor_scalar_names:
            rounding["tensor_scalars"] = [self.tensor_scalars(group, scalars, tuple(p.shape),
                                                              p.dtype) for p in params]
        try:
            ready = self.implementation.prepare(rule, xp, params, step_grads, step_states,
                                                scalars, cache=self._caches[index], **rounding)
        except TensorMismatch as exc:
            where = f"parameter {names[exc.index]!r}" if names is not None \
                else f"flat buffer {exc.index} of param group {index}"
            raise ValueError(f"{where}: {exc.detail}; nothing was updated") from None

        def run() -> None:
            if flat is not None:
                flat.copy_grads(index, grads)
            out = ready.run()
            if flat is not None:
                if fresh is not None:
                    flat.install(index, states, fresh)
            else:
                if fresh is not None:
                    for st, merged in zip(states, step_states, strict=True):
                        st.update(merged)
                if out is not params and any(o is not p for o, p in zip(out, params)):
                    # New arrays (immutable libraries): the group's from now on.
                    group._store_params(out)
                    self._known[index] = list(out)
            self.group_state[index].update(after)

        return run

    def _new_state_names(self, group: Mapping[str, Any], states: list[dict[str, Any]],
                         active: frozenset[str] | set[str]) -> list[str]:
        """The active states no parameter of the group has yet (this step makes them):
        each on every parameter whose number of dimensions allows it (see
        :meth:`UpdateRule.holds_state`). ValueError if some have one and others not."""
        rule, params = self.rule, group["params"]
        new = []
        for name in rule.states:
            if name not in active:
                continue
            holders = [i for i, p in enumerate(params) if rule.holds_state(name, len(p.shape))]
            have = [i for i in holders if name in states[i]]
            if not have:
                if holders:
                    new.append(name)
            elif len(have) != len(holders):
                holder = group["names"][have[0]]
                lacking = group["names"][next(i for i in holders if i not in have)]
                raise ValueError(f"parameter {holder!r} has state {name!r}, {lacking!r} "
                                 "lacks it; every parameter of a group must have the same "
                                 "state entries")
        return new

    def _check_flat_reductions(self, index: int, scalars: dict[str, Any] | None = None) -> None:
        """A flat buffer holds many tensors: a step that reduces each tensor (``norm``,
        ``sum``) cannot run on it. ValueError if group ``index``'s step would."""
        if not self.rule.reductions:
            return
        if scalars is None:
            scalars, _ = self.step_scalars(self.param_groups[index], self.group_state[index])
        present = frozenset(self.rule.states) - self.rule.optional_states \
            | self.active_states(self.param_groups[index])
        if reductions_taken(self.rule, scalars, present):
            raise ValueError(f"flat=True stores many tensors in one buffer, but "
                             f"{type(self).__name__}'s step reduces each tensor on its own "
                             f"(param group {index}); use flat=False")

    def _quantizes(self, name: str, param: Any) -> bool:
        """Whether state ``name`` of ``param`` is stored quantized."""
        return self.state_bits != 32 and name in self.quantized_states and \
            math.prod(param.shape) >= QUANTIZE_MIN_SIZE

    def _new_state(self, param: Any, name: str, fill: float) -> Any:
        """A new state buffer of ``param`` holding ``fill``: quantized where
        :attr:`state_bits` says so, else of :func:`~optim_core.backends._generic.state_dtype`
        (float32 for a float16 parameter, whose exponent range a second moment underflows)."""
        xp = self._xp
        if self._quantizes(name, param):
            return new_quantized_state(xp, param, self.state_bits, self.quantized_states[name],
                                       fill)
        return xp.full(self.rule.state_shape(name, tuple(param.shape)), fill,
                       dtype=state_dtype(param.dtype), device=ns.device_of(param))

    def state_nbytes(self) -> int:
        """Bytes the optimizer's per-parameter state holds: every state buffer, quantized
        ones as their codes and float32 scales (the maps, 1 KiB shared by all, not counted).

        Examples
        --------
        Adam's two float32 states cost 8 bytes a parameter; at ``state_bits=8`` about
        2.03 on tensors of 4096 elements or more, at 4 bits about 1.06.
        """
        with self._lock:
            total = 0
            for states in self.state:
                for st in states:
                    for value in st.values():
                        if type(value) is QuantizedState:
                            total += value.nbytes
                        else:
                            total += math.prod(value.shape) * _itemsize(value.dtype)
            return total

    def _all_finite(self, grouped: list[list[Any]]) -> bool:
        xp = self._xp
        checks = [xp.all(xp.isfinite(grad)) for grads in grouped for grad in grads]
        every = checks[0]
        for check in checks[1:]:
            every = xp.logical_and(every, check)
        # One host synchronization a step however many parameters; names only on failure.
        if bool(every):
            return True
        if self._nonfinite == "raise":
            names = [name for group in self.param_groups for name in group["names"]]
            name = next(n for n, check in zip(names, checks, strict=True) if not bool(check))
            raise ValueError(f"non-finite gradient for parameter {name!r}; nothing was updated")
        return False

    # ----------------------------------------------------------------- internals
    def _remember_params(self) -> None:
        """Record the parameters as checked (identity and shape), and drop cached records."""
        self._known = [list(g["params"]) for g in self.param_groups]
        self._names = [n for g in self.param_groups for n in g["names"]]
        self._shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        self._caches: list[dict] = [{} for _ in self.param_groups]
        self._steady = None

    def _scalar_sources(self) -> list[tuple[str, str | None, int | None]]:
        """Where each of the rule's scalars comes from: ``(name, hyperparameter, part)``;
        a hyperparameter of None for one only ``scalars`` (or ``first_step``) gives."""
        parts = {part: (hyper, i) for hyper in self.defaults
                 for i, part in enumerate(self._schema.specs[hyper].parts)}
        sources = []
        for name in self.rule.scalars:
            if name in parts:
                sources.append((name, *parts[name]))
            elif name in self.defaults:
                sources.append((name, name, None))
            else:
                sources.append((name, None, None))
        return sources

    def _load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
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
        groups = _sequence(state_dict["param_groups"], "state_dict['param_groups']")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        flat_state = _sequence(state_dict["state"], "state_dict['state']")
        params = [p for g in self.param_groups for p in g["params"]]
        names = [n for g in self.param_groups for n in g["names"]]
        if len(flat_state) != len(params):
            raise ValueError(f"state_dict has state for {len(flat_state)} params, "
                             f"this optimizer has {len(params)}")
        new_groups = []
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping):
                raise TypeError(f"param group {index} of the state_dict must be a dict, got "
                                f"{type(saved).__name__}")
            if "params" not in saved:
                raise ValueError(f"param group {index} of the state_dict has no 'params'")
            if not isinstance(saved["params"], Sequence) or \
                    len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {index} of the state_dict has "
                                 f"{_count(saved['params'])} params, this optimizer's "
                                 f"{len(group['params'])}")
            hyper = {k: v for k, v in saved.items() if k not in STRUCTURE_KEYS}
            unknown = set(hyper) - self._schema.hyperparameters - set(SCHEDULER_KEYS)
            if unknown:
                raise ValueError(f"unknown hyperparameters in the state_dict: {sorted(unknown)}")
            new_groups.append(ParamGroup(self._schema.check_group({**group, **hyper}),
                                         self._schema))
        group_state = self._checked_group_state(state_dict["group_state"])
        new_state = []
        position = 0
        for group_index, group in enumerate(self.param_groups):
            group_states = []
            for _ in group["params"]:
                group_states.append(self._checked_state(flat_state[position], params[position],
                                                        names[position]))
                position += 1
            self._check_group_states(group_states, group["names"],
                                     group_state[group_index]["step"], group["params"])
            new_state.append(group_states)
        # Everything checked: convert, then write.
        converted = [[StateDict({name: self._restored(value, param, name)
                                 for name, value in st.items()})
                      for param, st in zip(group["params"], group_states)]
                     for group, group_states in zip(self.param_groups, new_state)]
        state = converted if self._flat is None else self._flat.adopt(converted)
        self.state = state
        self.param_groups = new_groups
        self.group_state = group_state
        self._remember_params()

    def _checked_state(self, saved: Any, param: Any, name: str) -> dict[str, Any]:
        if not isinstance(saved, Mapping):
            raise TypeError(f"state of parameter {name!r} must be a dict, got {saved!r:.80}")
        checked = {}
        for key, value in saved.items():
            if key == COMPENSATION and self.rounding == "compensated" and \
                    is_16bit(param.dtype):
                if not hasattr(value, "shape") or tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"state {key!r} of parameter {name!r} must have the "
                                     f"parameter's shape {tuple(param.shape)}")
                checked[key] = value
                continue
            if key not in self.rule.states:
                raise ValueError(f"unknown state {key!r} for {type(self).__name__}")
            if isinstance(value, Mapping) or self._quantizes(key, param):
                checked[key] = self._checked_quantized(key, value, param, name)
                continue
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise TypeError(f"state {key!r} of parameter {name!r} is a "
                                f"{type(value).__name__}, not an array")
            if not self.rule.holds_state(key, len(param.shape)):
                raise ValueError(f"state {key!r} of parameter {name!r}: a parameter of shape "
                                 f"{tuple(param.shape)} has no such state "
                                 f"({self.rule.state_shapes[key]}-shaped)")
            want = self.rule.state_shape(key, tuple(param.shape))
            if tuple(value.shape) != want:
                raise ValueError(f"state {key!r} of parameter {name!r} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}"
                                 + (f" (the state {want})" if want != tuple(param.shape)
                                    else ""))
            if not _is_numeric(value):
                raise TypeError(f"state {key!r} of parameter {name!r} has dtype {value.dtype}, "
                                "not a number type")
            checked[key] = value
        # The rule's order, not the file's: state_dict() is then the same in every process.
        return {key: checked[key] for key in (*self.rule.states, COMPENSATION)
                if key in checked}

    def _checked_quantized(self, key: str, value: Any, param: Any, name: str) -> dict:
        """A saved quantized state: codes and scales of the lengths this optimizer's
        state_bits needs for ``param``, and the map it uses (nothing is converted)."""
        where = f"state {key!r} of parameter {name!r}"
        if not self._quantizes(key, param):
            raise ValueError(f"{where} is quantized, but this optimizer keeps it unquantized "
                             f"(state_bits={self.state_bits}); load it into an optimizer "
                             "made with the state_bits it was saved with")
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} is unquantized, but this optimizer stores it with "
                             f"state_bits={self.state_bits}; load it into an optimizer made "
                             "with the state_bits it was saved with")
        if set(value) != {"codes", "absmax", "bits", "signed"}:
            raise ValueError(f"{where} must hold codes, absmax, bits and signed, got "
                             f"{sorted(map(str, value))}")
        bits, signed = value["bits"], value["signed"]
        if type(bits) is not int or bits != self.state_bits or type(signed) is not bool or \
                signed != self.quantized_states[key]:
            raise ValueError(f"{where} was saved with bits={bits!r}, signed={signed!r}; this "
                             f"optimizer uses bits={self.state_bits}, "
                             f"signed={self.quantized_states[key]}")
        size = math.prod(param.shape)
        for part, dtype, length in (("codes", "uint8", code_count(bits, size)),
                                    ("absmax", "float32", block_count(bits, size))):
            array = value[part]
            if not (hasattr(array, "shape") and hasattr(array, "dtype")) or \
                    str(array.dtype) != dtype or tuple(array.shape) != (length,):
                got = (f"{tuple(array.shape)} {array.dtype}" if hasattr(array, "dtype")
                       else type(array).__name__)
                raise ValueError(f"{where}: {part} must be {length} {dtype} values, got {got}")
        return {"codes": value["codes"], "absmax": value["absmax"], "bits": bits,
                "signed": signed}

    def _restored(self, value: Any, param: Any, name: str) -> Any:
        """A checked saved state on the parameters' namespace and device, exactly."""
        xp = self._xp
        if isinstance(value, Mapping):
            return QuantizedState(_on_device(xp, value["codes"], param),
                                  _on_device(xp, value["absmax"], param), value["bits"],
                                  value["signed"], tuple(param.shape))
        out = ns.from_numpy(xp, value, like=param)
        wanted = param.dtype if name == COMPENSATION else state_dtype(param.dtype)
        return out if out.dtype == wanted else xp.astype(out, wanted)

    def _check_group_states(self, states: list[dict[str, Any]], names: list[str],
                            step: int, params: list[Any]) -> None:
        """Every parameter of a group has the same states (those its number of dimensions
        allows), and all required ones once the group has stepped: a step would otherwise
        start some buffers afresh."""
        if not states:
            return
        # A compensation buffer belongs to 16-bit parameters only, of any group.
        first = set(states[0]) - {COMPENSATION}
        first_names = tuple(n for n in self.rule.states if n in first)
        for name, st, param in zip(names, states, params, strict=True):
            held = tuple(n for n in self.rule.states if n in st)
            if not self.rule.same_states(held, len(param.shape), first_names):
                raise ValueError(f"state of parameter {name!r} has {sorted(st)}, that of "
                                 f"{names[0]!r} {sorted(first)}: every parameter of a group "
                                 "must have the same state entries")
        lacking = [s for s in self.rule.states if s in self._required_states and s not in first]
        if step > 0 and lacking:
            raise ValueError(f"state of parameter {names[0]!r} lacks {lacking} after {step} "
                             "steps; a state_dict holds every state of a stepped group")

    def _checked_group_state(self, saved: Any) -> list[dict[str, Any]]:
        saved = _sequence(saved, "state_dict['group_state']")
        keys = set(self._initial_group_state())
        if len(saved) != len(self.param_groups) or not all(
                isinstance(s, Mapping) and set(s) == keys for s in saved):
            raise ValueError(f"group_state must hold {sorted(keys)} with an integer step >= 0 "
                             "for every group")
        checked = []
        for index, entry in enumerate(saved):
            step = entry["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"group_state must hold {sorted(keys)} with an integer "
                                 f"step >= 0 for every group; group {index} has step {step!r}")
            values = {"step": int(step)}
            for key in sorted(keys - {"step"}):
                values[key] = _checks.number(f"group_state[{index}][{key!r}]", entry[key])
            checked.append({key: values[key] for key in entry})
        return checked


def _check_class(cls: type) -> None:
    """The class attributes a subclass sets, checked when it is defined (TypeError)."""
    name = cls.__name__
    rule = getattr(cls, "rule", None)
    if rule is None:
        return  # an abstract base (ScheduleFreeOptimizer); __init__ refuses to run one
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"{name}.rule must be an UpdateRule (a function decorated with "
                        f"@optim_core.update_rule), got {type(rule).__name__}")
    if cls.weight_decay_kind not in WEIGHT_DECAY_KINDS:
        raise TypeError(f"{name}.weight_decay_kind must be one of {WEIGHT_DECAY_KINDS}, "
                        f"got {cls.weight_decay_kind!r}")
    for attribute, mapping, kind in (("initial_state", cls.initial_state, str),
                                     ("quantized_states", cls.quantized_states, bool)):
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{name}.{attribute} must be a dict, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - set(rule.states))
        if unknown:
            raise TypeError(f"{name}.{attribute} names {unknown}, which are not states of "
                            f"its rule {rule.name} ({list(rule.states)})")
        wrong = [k for k, v in mapping.items() if not isinstance(v, kind)]
        if wrong:
            raise TypeError(f"{name}.{attribute}[{wrong[0]!r}] must be a {kind.__name__}, "
                            f"got {mapping[wrong[0]]!r}")
    group_state = cls.initial_group_state
    if not isinstance(group_state, Mapping) or "step" in group_state or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in group_state.items()):
        raise TypeError(f"{name}.initial_group_state must map names other than 'step' to "
                        f"numbers, got {group_state!r:.80}")
    checks = cls.hyperparameter_checks
    if not isinstance(checks, Mapping) or not all(
            isinstance(v, Hyperparameter) for v in checks.values()):
        raise TypeError(f"{name}.hyperparameter_checks must map names to "
                        "optim_core.Hyperparameter(check, parts)")
    if not isinstance(cls.related_hyperparameters, (set, frozenset)):
        raise TypeError(f"{name}.related_hyperparameters must be a set of names")


def _exported(value: Any) -> Any:
    """A state as :meth:`Optimizer.state_dict` holds it: a NumPy array, or a quantized
    state's codes and scales (exact) with its map's name."""
    if type(value) is QuantizedState:
        return {"codes": ns.to_numpy(value.codes), "absmax": ns.to_numpy(value.absmax),
                "bits": value.bits, "signed": value.signed}
    return ns.to_numpy(value)


def _on_device(xp: Any, array: Any, like: Any) -> Any:
    """A host array on ``like``'s namespace and device, keeping its own dtype."""
    return xp.asarray(np.array(array, copy=True), device=ns.device_of(like))


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        size = getattr(dtype, "itemsize", None)
        if size is None:  # array_api_strict dtypes
            size = np.dtype(str(dtype).rsplit(".", 1)[-1]).itemsize
        return int(size)


def _sequence(value: Any, what: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, Sequence) else repr(value)


def _is_numeric(value: Any) -> bool:
    try:
        kind = np.dtype(value.dtype).kind
    except TypeError:
        return "float" in str(value.dtype) or "int" in str(value.dtype)
    return kind in "fiu" or (kind == "V" and "float" in np.dtype(value.dtype).name)


def _check_param(xp: Any, name: str, x: Any) -> None:
    """A parameter the optimizer can update in place: floating, writable, not masked or
    sparse."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"parameter {name!r} is a masked array; pass its data (x.data) or "
                        "a filled copy")
    if _is_sparse(x):
        raise TypeError(f"parameter {name!r} is a sparse tensor; parameters must be dense")
    if not ns.is_floating(xp, x):
        raise TypeError(f"parameter {name!r} has dtype {x.dtype}; parameters must be "
                        "floating point")
    if ns.is_read_only(x):
        raise ValueError(f"parameter {name!r} is read-only; the optimizer updates "
                         "parameters in place")


def _is_sparse(x: Any) -> bool:
    layout = getattr(x, "layout", None)
    return layout is not None and "strided" not in str(layout)


def _check_grad_kind(grad: Any, param: Any, name: str) -> None:
    """The checks a NumPy gradient of a NumPy parameter needs none of: library, device,
    masked or sparse."""
    if isinstance(grad, np.ma.MaskedArray):
        raise TypeError(f"grad of {name!r} is a masked array; masked elements would be "
                        "stepped with whatever the array holds there: pass a filled array")
    ns.check_same_library(grad, param, f"grad of {name!r}")
    if _is_sparse(grad):
        raise TypeError(f"grad of {name!r} is a sparse tensor ({grad.layout}); pass a dense "
                        "gradient (grad.to_dense())")


def _parse_params(params: Any) -> tuple[list[dict[str, Any]], bool]:
    """Normalize params to groups ``{"params": [...], "names": [...], **overrides}``."""
    if isinstance(params, Mapping):
        if "params" in params:
            raise TypeError("a single param group must be wrapped in a list: [group]")
        return [{"params": list(params.values()), "names": _names(params)}], True
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
            overrides = {k: v for k, v in g.items() if k not in STRUCTURE_KEYS}
            if is_keyed:
                groups.append({"params": list(inner.values()), "names": _names(inner),
                               **overrides})
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


def _names(params: Mapping[Any, Any]) -> list[str]:
    """The dict's keys, which must be strings: they name the parameters in gradients,
    state dicts and checkpoints, and a key ``1`` could not be told from ``"1"`` there."""
    for key in params:
        if not isinstance(key, str):
            raise _checks.WrongTypeError(f"parameter names (dict keys) must be strings, got "
                                         f"{key!r} ({type(key).__name__}); use str(key)")
    return list(params)
