"""Every registered optimizer as a real ``torch.optim.Optimizer`` (public: optim_core.torch).

``optim_core.torch.Adam(model.parameters(), lr=1e-3)`` is a subclass of
``torch.optim.Optimizer`` generated from the registry
(:data:`optim_core.optim.registry.OPTIMIZERS`): :func:`torch_optimizer` makes the class
of any optimizer, so one that lands in the registry needs no code here. The
update is the optimizer's own rule (:mod:`optim_core.optim.rules`), its host scalars
the one derivation :meth:`optim_core.Optimizer.step_scalars`, its kernels those the
core selects; this module only moves torch's bookkeeping in and out:

* **Construction as in torch**: tensors, ``named_parameters()``, param-group dicts,
  positional hyperparameters in torch's order, torch's own keys (``foreach``,
  ``fused``, ``capturable``, ``differentiable``) kept in the groups with torch's
  defaults so state dicts have torch's keys. Hyperparameters are checked when written
  (a group is a checked ``dict``; a scheduler's bad ``lr`` raises at the scheduler).
* **Step as in torch**: ``p.grad`` of every parameter, parameters whose ``grad`` is
  None skipped (their step count does not move), ``step(closure)`` evaluating the
  closure with grad enabled, and the step hooks, ``zero_grad``, ``add_param_group``
  of ``torch.optim.Optimizer``. Every group is checked and prepared before anything
  is written, so a step that raises changes nothing.
* **State as in torch**: ``optimizer.state[p]`` holds torch tensors under torch's names
  (``step``, ``exp_avg``, ``exp_avg_sq``, ..., NAdam's ``mu_product``), so
  ``state_dict()`` loads into ``torch.optim``'s same-named optimizer and a torch state
  dict loads here (``torch.optim.SGD`` keeps no ``step``: neither does ours).
* **Fast**: CPU tensors are stepped through zero-copy NumPy views
  (``t.detach().numpy()``) by the fused numba kernels, CUDA tensors through zero-copy
  CuPy views (DLPack) by the generated CUDA kernels on torch's current stream. Other
  devices and dtypes NumPy lacks (bfloat16) take the generic array API path on the
  tensors themselves. Complex parameters are stepped as their real views, as
  ``torch.optim`` does. No copy, no autograd: state never requires grad, and
  gradients built with ``create_graph=True`` do not pull it into the graph.
  After a full step, a group of float32/float64 CPU tensors keeps a step plan
  (:class:`_TorchPlan`): the core's table of addresses over those views, so each step
  gathers the gradients' addresses in one pass, checks what the table assumes (same
  tensors at the same addresses, gradients of the right kind, counts as written) and
  makes one compiled call per dtype, as :meth:`optim_core.Optimizer.step` does on
  NumPy arrays. Anything else takes the full path.

Families with methods beyond ``step`` keep them: the Schedule-Free optimizers have
``train()`` and ``eval()``. float16 parameters keep float32 states, as the core does
(torch's float16 states are widened exactly when a torch state dict is loaded).

Per-parameter step counts live in the state, as in torch; parameters of a group whose
counts differ (one was frozen for a while) are stepped in separate sets, each with its
own host scalars.

Rounding: host scalars (bias corrections, NAdam's ``mu_product``) are computed in
float64, as the core does; torch keeps ``step`` and ``mu_product`` in tensors of the
default dtype, so with the default float32 NAdam's ``mu_product`` differs from torch's
by float32 rounding (with ``torch.set_default_dtype(torch.float64)`` the two agree to
rounding of the parameters' dtype).

Not supported (refused when asked for): ``differentiable=True`` and
``capturable=True`` (CUDA graph capture), sparse gradients, and the core's options
beyond ``impl`` (``state_bits``, ``rounding``, ``nonfinite``, ``flat``). Tensors the
kernels cannot take as they are (not contiguous, such as ``channels_last`` weights)
are stepped by the generic path over the same views: correct, only slower.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from typing import Any, ClassVar

import numpy as np
import torch

from .. import _checks
from ..backends import _numba_plan
from ..backends._generic import TensorMismatch, state_dtype
from ..optim.base import Optimizer as CoreOptimizer
from ..optim.param_group import SCHEDULER_KEYS, GroupSchema
from ..optim.registry import OPTIMIZERS
from ..optim.rules_schedule_free import schedule_free_switch
from ..optim.schedule_free import ScheduleFreeOptimizer

__all__ = ["TorchOptimizer", "torch_optimizer", "torch_optimizers"]

#: torch optimizers whose per-parameter state has no ``step`` (their update does not
#: depend on it); ours of the same name keep none either, so state dicts match.
_NO_STEP_STATE = frozenset({"SGD"})
#: torch's implementation switches: kept in groups (state dicts carry them), checked here.
_TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")
#: The keys of a group besides hyperparameters: its tensors and their names.
_STRUCTURE = ("params", "param_names")


# --------------------------------------------------------------------------- groups
def _torch_flag(key: str, value: Any) -> Any:
    if key in ("foreach", "fused"):
        # Ours is always one fused pass per tensor: either value gives the same step.
        return None if value is None else _checks.boolean(key, value)
    if key == "differentiable" and value:
        raise ValueError("differentiable=True is not supported: optim_core.torch steps "
                         "run outside autograd (use torch.optim for a differentiable step)")
    if key == "capturable" and value:
        raise ValueError("capturable=True (CUDA graph capture) is not supported: a step "
                         "computes its scalars on the host")
    return _checks.boolean(key, value)


class _GroupRules:
    """What a group of one torch optimizer holds and how each write is checked: the
    core's checks (:class:`~optim_core.optim.param_group.GroupSchema`) for
    hyperparameters and scheduler keys, torch's flags, and the group's tensors."""

    def __init__(self, core: type[CoreOptimizer], hyperparameters: Iterable[str],
                 torch_keys: Iterable[str]) -> None:
        self.core = core
        self.schema = GroupSchema(core, hyperparameters)
        self.torch_keys = frozenset(torch_keys)
        self.related = self.schema.related

    def check(self, key: str, value: Any) -> Any:
        if key == "params":
            return _checked_params(value)
        if key == "param_names":
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError("param_names must be a list of strings")
            return list(value)
        if key in self.torch_keys:
            return _torch_flag(key, value)
        return self.schema.check(key, value)

    def check_group(self, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> _Group:
        """A whole group checked (missing hyperparameters from ``defaults``, as torch's
        ``add_param_group`` and ``__setstate__`` fill them); a new :class:`_Group`."""
        if "params" not in values:
            raise ValueError("a param group needs a 'params' entry")
        merged = {**defaults, **values}
        checked = {key: self.check(key, value) for key, value in merged.items()}
        self.core.check_relations(checked)
        return _Group(checked, self)

    def __reduce__(self) -> tuple:
        return (_GroupRules, (self.core, sorted(self.schema.hyperparameters),
                              sorted(self.torch_keys)))


class _Group(dict):
    """One param group: a ``dict`` (torch and its schedulers read and write it as one)
    whose every write is checked first; a bad value raises and changes nothing. Only
    scheduler keys such as ``initial_lr`` may be removed. :attr:`writes` counts the
    writes (a step plan reuses its scalars while it stays the same)."""

    __slots__ = ("_rules", "writes")

    def __init__(self, values: Mapping[str, Any], rules: _GroupRules) -> None:
        super().__init__(values)
        self._rules = rules
        self.writes = 0

    def __setitem__(self, key: str, value: Any) -> None:
        rules = self._rules
        checked = rules.check(key, value)
        if key in rules.related:
            rules.core.check_relations({**self, key: checked})
        super().__setitem__(key, checked)
        self.writes += 1

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        items = dict(other, **kwargs)
        checked = {key: self._rules.check(key, value) for key, value in items.items()}
        self._rules.core.check_relations({**self, **checked})
        super().update(checked)
        self.writes += 1

    def __ior__(self, other: Any) -> _Group:
        self.update(other)
        return self

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def _removable(self, key: str) -> None:
        if key in self and key not in SCHEDULER_KEYS:
            raise ValueError(f"{key!r} cannot be removed from a param group: every group "
                             f"holds its params and all hyperparameters of "
                             f"{self._rules.core.__name__}")

    def __delitem__(self, key: str) -> None:
        self._removable(key)
        super().__delitem__(key)
        self.writes += 1

    def pop(self, key: str, *default: Any) -> Any:
        self._removable(key)
        try:
            return super().pop(key, *default)
        finally:
            self.writes += 1  # after the write: a step never pairs a new count with old values

    def popitem(self) -> tuple[str, Any]:
        raise ValueError("entries cannot be removed from a param group")

    def clear(self) -> None:
        raise ValueError("entries cannot be removed from a param group")

    def copy(self) -> dict[str, Any]:
        """A plain dict of the entries (the ``params`` list itself is shared)."""
        return dict(self)

    def __reduce__(self) -> tuple:
        return (_Group, (dict(self), self._rules))


def _checked_params(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        value = [value]
    if isinstance(value, (set, str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError("params of a group must be an ordered collection of tensors, got "
                        f"{type(value).__name__}")
    params = list(value)
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                            f"{torch.typename(param)}")
        if param.layout != torch.strided:
            raise TypeError(f"parameters must be dense tensors, got layout {param.layout}")
        if not (param.is_floating_point() or param.is_complex()):
            raise TypeError(f"parameters must be floating point (or complex), got dtype "
                            f"{param.dtype}")
    return params


# --------------------------------------------------------------------------- tensors
_COMPLEX = frozenset({torch.complex64, torch.complex128})


def _real(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor outside autograd, complex ones as their real view (as torch.optim)."""
    if tensor.requires_grad or tensor.grad_fn is not None:
        tensor = tensor.detach()
    return torch.view_as_real(tensor) if tensor.dtype in _COMPLEX else tensor


_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.complex64,
                           torch.complex128})


def _kind(param: torch.Tensor) -> tuple[str, Any]:
    """Which engine steps ``param``: ("numpy", None) for CPU tensors NumPy can view,
    ("cupy", index) for CUDA tensors where CuPy is installed, else ("torch", device):
    the generic path on the tensors themselves."""
    device = param.device
    if device.type == "cpu":
        if param.dtype in _NUMPY_DTYPES:
            return ("numpy", None)
    elif device.type == "cuda" and param.dtype in _NUMPY_DTYPES and _cupy() is not None:
        return ("cupy", device.index)
    return ("torch", device)


_CUPY: list[Any] = []


def _cupy() -> Any:
    """CuPy, or None where it is not installed (imported on the first CUDA tensor)."""
    if not _CUPY:
        try:
            import cupy
        except ImportError:
            cupy = None
        _CUPY.append(cupy)
    return _CUPY[0]


def _view(kind: str, tensor: torch.Tensor) -> Any:
    """``tensor``'s memory as the engine of ``kind`` takes it, without a copy."""
    real = _real(tensor)
    if kind == "numpy":
        # Through a detached alias: the view then holds the storage itself, so it stays
        # allocated even if the tensor is given other storage (``t.data = ...``).
        return (real.detach() if real is tensor else real).numpy()
    if kind == "cupy":
        return _cupy().from_dlpack(real)
    return real


class _Slot:
    """One parameter's arrays as its engine takes them, kept across steps while the
    parameter and its state tensors are the same objects at the same addresses."""

    __slots__ = ("param", "ptr", "shape", "strides", "kind", "view", "state", "ids", "ptrs",
                 "tensors", "states", "present", "counters", "grad", "grad_layout", "grad_view",
                 "view_dtype")

    def __init__(self, param: torch.Tensor, kind: tuple[str, Any], state: dict | None,
                 counter_names: tuple[str, ...], rule_states: tuple[str, ...]) -> None:
        self.param, self.ptr, self.shape, self.kind = param, param.data_ptr(), param.shape, kind
        self.strides, self.view_dtype = param.stride(), param.dtype
        self.view = _view(kind[0], param)
        self.state = state
        values = tuple(state.values()) if state is not None else ()
        # The record holds the tensors, so no other object can take one of these ids.
        self.ids, self.tensors = tuple(map(id, values)), values
        self.ptrs = tuple(map(_address, values))
        # A state set to None is one to start afresh, as torch.optim takes it (SGD's
        # ``momentum_buffer``): absent here, so the step makes it.
        self.states = {name: _view(kind[0], state[name]) for name in rule_states
                       if state is not None and state.get(name) is not None}
        self.present = tuple(self.states)
        # Host views of the scalar state (step, mu_product): read and written per step.
        self.counters = {name: (state[name], _scalar_view(state[name])) for name in counter_names
                         if state is not None and name in state}
        self.grad = self.grad_layout = self.grad_view = None

    def holds(self, param: torch.Tensor, state: dict | None) -> bool:
        """Whether the record still describes ``param`` and its ``state``: the same
        objects and storage (``p.data = ...`` moves a parameter to new storage, or gives
        it another view of its own, ``p.data = p.data.t()``)."""
        if param is not self.param or state is not self.state or param.data_ptr() != self.ptr \
                or param.shape != self.shape or param.stride() != self.strides \
                or param.dtype is not self.view_dtype:
            return False
        return state is None or (tuple(map(id, state.values())) == self.ids
                                 and tuple(map(_address, self.tensors)) == self.ptrs)

    def grad_of(self, grad: torch.Tensor) -> Any:
        # The gradient kept from the last step (zero_grad(set_to_none=False)) is viewed
        # again where its memory or its layout there changed (``grad.t_()``).
        layout = _address(grad)
        if grad is not self.grad or layout != self.grad_layout:
            self.grad, self.grad_layout = grad, layout
            self.grad_view = _view(self.kind[0], grad)
        return self.grad_view


#: From this size a contiguous CPU state is allocated by NumPy, which asks Linux for
#: transparent huge pages (``madvise``; torch's CPU allocator does not, unless
#: ``THP_MEM_ALLOC_ENABLE=1``). A step streams its states, and on 4 KiB pages each page is
#: a TLB miss that stops the prefetcher: here (a VM) Adam's step on 1e7 float32 elements
#: took 6-20% longer with half of its arrays on torch's pages than all on NumPy's.
_HUGE_PAGE_BYTES = 1 << 22
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64,
                 torch.float16: np.float16}


def _new_state(rule: Any, name: str, param: torch.Tensor, value: float) -> torch.Tensor:
    """State ``name`` of ``param`` holding ``value``: the parameter's shape and layout, or
    the rule's shape for it (Adafactor's row and column factors); a large contiguous CPU
    one on huge pages where the system gives them (:data:`_HUGE_PAGE_BYTES`)."""
    shape = rule.state_shape(name, tuple(param.shape))
    dtype = state_dtype(param.dtype)
    same = shape == tuple(param.shape)
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if param.device.type == "cpu" and numpy_dtype is not None \
            and (param.is_contiguous() or not same) \
            and math.prod(shape) * np.dtype(numpy_dtype).itemsize >= _HUGE_PAGE_BYTES:
        return torch.from_numpy(np.full(shape, value, dtype=numpy_dtype))
    if not same:
        return torch.full(shape, value, dtype=dtype, device=param.device)
    return torch.full_like(param, value, dtype=dtype, memory_format=torch.preserve_format)


def _check_grad(owner: str, grad: torch.Tensor, param: torch.Tensor) -> None:
    """A gradient a kernel can take beside its parameter (checked when it is new)."""
    if grad.layout != torch.strided:
        raise RuntimeError(f"{owner} does not support sparse gradients; nothing was updated")
    if grad.dtype != param.dtype or grad.shape != param.shape or grad.device != param.device:
        raise ValueError(f"a gradient of dtype {grad.dtype}, shape {tuple(grad.shape)} on "
                         f"{grad.device} for a parameter of dtype {param.dtype}, shape "
                         f"{tuple(param.shape)} on {param.device}; nothing was updated")


def _scalar_view(tensor: torch.Tensor) -> Any:
    """A 0-d host tensor's value as a NumPy view (reads and writes cost no dispatch),
    holding the tensor's storage (see :func:`_view`)."""
    return tensor.detach().numpy() if tensor.device.type == "cpu" else None


def _address(value: Any) -> tuple | None:
    """Where a tensor's data is and how it is laid out there (``t.data = ...`` moves it,
    or views it otherwise: another shape, strides or dtype of the same memory); None for
    other values."""
    return (value.data_ptr(), value.shape, value.stride(), value.dtype) \
        if isinstance(value, torch.Tensor) else None


def _read(counter: tuple[torch.Tensor, Any]) -> float:
    tensor, view = counter
    return float(view) if view is not None else tensor.item()


def _write(counter: tuple[torch.Tensor, Any], value: float) -> None:
    tensor, view = counter
    if view is not None:
        view[()] = value
    else:
        tensor.fill_(value)


def _scalar_dtype() -> torch.dtype:
    # torch.optim's _get_scalar_dtype: float64 under a float64 default dtype, else float32.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


_GRAD, _DTYPE, _SHAPE = attrgetter("grad"), attrgetter("dtype"), attrgetter("shape")
_LAYOUT, _IS_CPU = attrgetter("layout"), attrgetter("is_cpu")
_DATA_PTR, _CONTIGUOUS, _IS_NEG = (torch.Tensor.data_ptr, torch.Tensor.is_contiguous,
                                   torch.Tensor.is_neg)
_PLANNED_DTYPES = frozenset({torch.float32, torch.float64})


def _same_scalars(scalars: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two steps' scalars are the same values: equal, of the same types, and
    zeros of the same sign (``0.0 == -0.0``, yet a kernel may tell them apart)."""
    if scalars != other:
        return False
    for name, value in scalars.items():
        theirs = other[name]
        if type(value) is not type(theirs) or (
                value == 0 and isinstance(value, float)
                and math.copysign(1.0, value) != math.copysign(1.0, theirs)):
            return False
    return True


def _getter(indices: list[int]) -> Callable[[list], tuple]:
    pick = itemgetter(*indices)
    return (lambda items: (pick(items),)) if len(indices) == 1 else pick


class _TorchPlan:
    """One group's step plan on CPU tensors: the core's table of addresses
    (:func:`optim_core.backends._numba_plan.make_plan`, over the NumPy views of the
    parameters and states) and what each step checks before the table is used.

    Made after a full step, from that step's checked records. A step then checks, in
    a few passes over the group in C, that the group has the same parameter objects
    and the same ones have a gradient; that every gradient is a dense, contiguous CPU
    ``torch.Tensor`` of its parameter's dtype and shape (its address then goes into
    the table); that ``optimizer.state`` holds the same keys and dicts in the same
    order (so each parameter the same dict), those the same tensor objects, every
    parameter, state and count still at its address (``p.data = ...`` moves it) and
    every parameter of its shape; and, in one compiled pass, that each count
    (``state["step"]``) still holds the value the plan wrote. Anything else takes the
    full path, which checks everything and makes the plan again. A step whose scalars
    are those of the last one reuses its kernel calls.

    The plan holds detached aliases of every planned tensor, so their memory stays
    allocated while it lives: an address equal to the planned one is the planned
    memory, never a new allocation that happens to start there.
    """

    __slots__ = ("group", "params", "pick", "unpicked", "stepped", "types", "dtypes",
                 "shapes", "layouts", "state_map", "state_keys", "state_dicts", "dicts",
                 "entries", "values", "tensors", "addresses", "keep", "names", "tensor_shapes",
                 "tensor_dtypes",
                 "counter_table", "counter_names", "counts", "count_values", "scalar_ops",
                 "engine", "data", "last_calls")

    def __init__(self, owner: TorchOptimizer, group: _Group, params: list[torch.Tensor],
                 picked: list[int], stepped: list[torch.Tensor], dicts: list[dict],
                 names: tuple[str, ...], counts: tuple[float, ...], counter_dtypes: set,
                 engine: CoreOptimizer, data: Any) -> None:
        self.group, self.params, self.stepped = group, params, stepped
        everything = len(picked) == len(params)
        self.pick = None if everything else _getter(picked)
        others = [i for i in range(len(params)) if i not in set(picked)]
        self.unpicked = _getter(others) if others else (lambda items: ())
        self.types = [torch.Tensor] * len(stepped)
        self.dtypes = list(map(_DTYPE, stepped))
        self.shapes = list(map(_SHAPE, stepped))
        self.layouts = [torch.strided] * len(stepped)
        # ``optimizer.state`` as it is now, every key and value: while the same objects
        # are there in the same order, each planned parameter maps to the same dict
        # (compared by identity in two passes, where looking each parameter up would
        # call torch's Tensor.__hash__, a Python function, once per parameter).
        state_map = owner.state
        self.state_map, self.dicts = state_map, dicts
        self.state_keys, self.state_dicts = list(state_map), list(state_map.values())
        counter_names = owner._counter_names
        keys = (*counter_names, *names)
        self.entries = _getter(list(keys)) if len(keys) != 1 else (
            lambda entry, key=keys[0]: (entry[key],))
        self.values = list(chain.from_iterable(map(self.entries, dicts)))
        self.tensors = [*stepped, *self.values]
        self.addresses = list(map(_DATA_PTR, self.tensors))
        # Every planned tensor's shape and dtype: a state given another view of its own
        # memory (``exp_avg.data = exp_avg.data.view(-1)``) keeps its address.
        self.tensor_shapes = list(map(_SHAPE, self.tensors))
        self.tensor_dtypes = list(map(_DTYPE, self.tensors))
        self.keep = [tensor.detach() for tensor in self.tensors]
        self.names = frozenset(names)
        self.counter_names = counter_names
        if counter_names:
            (dtype,) = counter_dtypes
            self.counter_table = np.array(
                [[dict_[name].data_ptr() for name in counter_names] for dict_ in dicts],
                dtype=np.int64).reshape(len(dicts), len(counter_names))
            self.counts = np.array(counts, dtype=dtype)
            self.scalar_ops = _numba_plan.scalars_module()
        else:
            self.counter_table = self.counts = self.scalar_ops = None
        # The group state those counts stand for, as the full path reads them.
        self.count_values = {name: int(value) if name == "step" else value
                             for name, value in zip(counter_names, counts)}
        self.engine, self.data = engine, data
        #: (the group's writes, scalars, calls) of the last planned step (see
        #: TorchOptimizer._planned_group).
        self.last_calls: tuple[int, dict, list] | None = None


# torch's global step hooks (torch.optim.optimizer.register_optimizer_step_pre_hook and
# _post_hook), read by TorchOptimizer.step; None where a torch keeps them elsewhere: then
# every step goes through torch's wrapper.
try:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    _GLOBAL_HOOKS: tuple | None = (_global_optimizer_pre_hooks, _global_optimizer_post_hooks)
except ImportError:  # pragma: no cover - another torch
    _GLOBAL_HOOKS = None


def _step_through_hooks(self: TorchOptimizer, closure: Callable[[], Any] | None = None) -> Any:
    return self._apply_step(closure)


#: torch's own hooks-and-profiler wrapper around the step (see TorchOptimizer.step).
_hooked_step = torch.optim.Optimizer.profile_hook_step(_step_through_hooks)


# --------------------------------------------------------------------------- optimizer
class TorchOptimizer(torch.optim.Optimizer):
    """Base of the ``torch.optim.Optimizer`` classes of :mod:`optim_core.torch`.

    Each subclass wraps one optimizer of the registry (:attr:`core`), made by
    :func:`torch_optimizer`; see the module docstring. Construct it as its
    ``torch.optim`` namesake: ``Adam(model.parameters(), lr=1e-3)``,
    ``Adam(model.named_parameters())``, or a list of param-group dicts.

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    *args, **kwargs
        The hyperparameters of :attr:`core`, positional in its (torch's) order, and
        torch's own switches (``foreach``, ``fused``, ``capturable``,
        ``differentiable``) where its ``torch.optim`` namesake has them.
    impl : {"auto", "fused", "generic"}, optional
        As for the core optimizers: "auto" takes the fused kernels where the tensors
        allow them.
    """

    #: The optimizer of the registry this class steps with.
    core: ClassVar[type[CoreOptimizer]]
    #: torch's keys the core optimizer lacks, with the defaults of torch's namesake.
    torch_keys: ClassVar[dict[str, Any]] = {}
    #: Whether each parameter's state keeps a ``step`` count (torch's SGD keeps none).
    keeps_step: ClassVar[bool] = True
    _signature: ClassVar[inspect.Signature]
    _core_arguments: ClassVar[tuple[str, ...]]

    def __init__(self, params: Any, *args: Any, impl: str = "auto", **kwargs: Any) -> None:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}: {exc}") from None
        given = dict(bound.arguments)
        flags = {key: _torch_flag(key, given.pop(key, default))
                 for key, default in self.torch_keys.items()}
        # A (1, 1) dummy: a matrix, which every optimizer takes (Muon takes nothing else).
        engine = self.core([np.zeros((1, 1))], **given, impl=impl)  # checks every hyperparameter
        self._impl = impl
        self._setup({**engine.defaults, **flags})
        self._engines[("numpy", None)] = engine
        super().__init__(params, dict(self._defaults_checked))
        self.defaults = dict(self._defaults_checked)

    # The hook of torch's __init__ and add_param_group: a group, checked before any write.
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group``; its
        hyperparameters and tensors are checked before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        staged = dict(param_group)  # torch's checks below rewrite the dict they are given
        pending = {k: v for k, v in staged.items() if k not in _STRUCTURE}
        self._rules.check_group({"params": [], **pending}, self._defaults_checked)
        super().add_param_group(staged)  # structure, names, leaves, disjointness
        try:
            group = self._rules.check_group(staged, self._defaults_checked)
        except Exception:
            self.param_groups.pop()
            raise
        self.param_groups[-1] = group

    def _setup(self, defaults: dict[str, Any]) -> None:
        """What a step needs besides torch's attributes, made again after unpickling."""
        self._defaults_checked = defaults
        hyper = [k for k in defaults if k not in self.torch_keys]
        self._rules = _GroupRules(self.core, hyper, self.torch_keys)
        self._engines: dict[tuple[str, Any], CoreOptimizer] = {}
        # By id(param): a tensor's own hash runs Python code; the record holds the tensor.
        self._slots: dict[int, _Slot] = {}
        self._caches: dict[tuple, dict] = {}
        self._counters: tuple[str, ...] | None = None
        # Per group index: its step plan (see _TorchPlan), and the tensors a plan was
        # declined for (not tried again while they are the same).
        self._plans: dict[int, _TorchPlan] = {}
        self._declined: dict[int, tuple] = {}

    # ----------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter whose ``grad`` is not None.

        Step hooks (``register_step_pre_hook``, ``register_step_post_hook`` and torch's
        global ones) and the profiler's ``Optimizer.step#<Name>.step`` range run as
        torch.optim runs them, through torch's own wrapper, whenever there is a hook or
        the profiler is on.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss; called with grad enabled
            before the update, as torch.optim does.

        Returns
        -------
        The closure's loss, or None.
        """
        if _GLOBAL_HOOKS is None or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] \
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks \
                or torch.autograd._profiler_enabled():
            return _hooked_step(self, closure)
        return self._apply_step(closure)

    # torch.optim.Optimizer.__init__ wraps a class's step in its hooks-and-profiler wrapper
    # unless the step is marked hooked: this one takes that wrapper only when it has
    # something to do (it costs 17 us a step on warm caches, 130 us on caches a large
    # step has emptied).
    step.hooked = True  # type: ignore[attr-defined]

    def _apply_step(self, closure: Callable[[], Any] | None = None) -> Any:
        """:meth:`step` without its hooks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        runs, unplanned = [], []
        for index in range(len(self.param_groups)):
            planned = self._planned_group(index)
            if planned is not None:
                runs.append(planned)
            else:
                runs += self._prepare_group(index)
                unplanned.append(index)
        # Everything is checked and ready: from here on the step writes.
        stepped = []
        for run in runs:
            stepped.extend(run())
        if stepped:
            # As torch.optim's in-place updates do: autograd notices a parameter changed
            # under a graph that saved it.
            torch.autograd.graph.increment_version(stepped)
        for index in unplanned:
            self._plan_group(index)
        return loss

    # ----------------------------------------------------------------- step plans
    def _planned_group(self, index: int) -> Callable[[], list[torch.Tensor]] | None:
        """The step of group ``index`` through its plan, checked and ready (nothing
        written), or None where the plan does not apply: the full path then checks
        everything (and reports what is wrong). The step's function counts the
        parameters' versions itself and returns no tensors."""
        plan = self._plans.get(index)
        if plan is None:
            return None
        group = self.param_groups[index]
        if group is not plan.group:
            return None
        params = group["params"]
        if len(params) != len(plan.params) or not all(map(is_, params, plan.params)):
            return None
        grads = list(map(_GRAD, params))
        if plan.pick is not None:
            # The parameters without a gradient when the plan was made must still have none.
            if not all(map(is_, plan.unpicked(grads), repeat(None))):
                return None
            grads = list(plan.pick(grads))
        # Every gradient a dense, contiguous CPU tensor of its parameter's dtype and shape
        # (one pass per property, in C): the kernels read its size from the table.
        if list(map(type, grads)) != plan.types or list(map(_DTYPE, grads)) != plan.dtypes \
                or list(map(_SHAPE, grads)) != plan.shapes \
                or list(map(_LAYOUT, grads)) != plan.layouts \
                or not all(map(_IS_CPU, grads)) or not all(map(_CONTIGUOUS, grads)) \
                or any(map(_IS_NEG, grads)):
            return None
        # The parameters and states are those planned, where they were: the state map
        # holds the same dicts under the same keys, those the same tensors, and every
        # parameter, state and count is where it was, parameters of their shape.
        state = self.state
        if state is not plan.state_map:
            return None
        keys, dicts = plan.state_keys, plan.state_dicts
        if len(state) != len(keys) or not all(map(is_, state, keys)) \
                or not all(map(is_, state.values(), dicts)):
            return None
        try:
            values = list(chain.from_iterable(map(plan.entries, plan.dicts)))
        except KeyError:
            return None
        if not all(map(is_, values, plan.values)) \
                or list(map(_DATA_PTR, plan.tensors)) != plan.addresses \
                or list(map(_SHAPE, plan.tensors)) != plan.tensor_shapes \
                or list(map(_DTYPE, plan.tensors)) != plan.tensor_dtypes \
                or not all(map(_CONTIGUOUS, plan.tensors)):
            return None  # (contiguous at the same address, shape and dtype: as planned)
        engine, scalar_ops = plan.engine, plan.scalar_ops
        implementation, data = engine.implementation, plan.data
        last = plan.last_calls
        # The group not written since the last step: the same states are active (a
        # function of the group); without counts (SGD's), step_scalars, a function of
        # the group and its state, gives the same scalars too.
        unwritten = last is not None and last[0] == group.writes
        if scalar_ops is None and unwritten:
            calls = last[2]
        else:
            if not unwritten and not engine.active_states(group) <= plan.names:
                return None
            group_state = engine._initial_group_state()
            if scalar_ops is not None:
                if scalar_ops.differing(plan.counter_table, plan.counts) >= 0:
                    return None  # a count was written since (or differs between parameters)
                group_state.update(plan.count_values)
            scalars, after = engine.step_scalars(group, group_state)
            # The calls are those of the last step where its scalars are the same
            # (Adagrad's are, step after step): table_calls is a function of the rule,
            # the plan and the scalars.
            if last is not None and _same_scalars(scalars, last[1]):
                calls = last[2]
            else:
                calls = implementation.table_calls(engine.rule, data, scalars)
                if calls is None:
                    return None
            plan.last_calls = (group.writes, scalars, calls)
        ordered = grads if data.order is None else data.order(grads)
        data.table[:, 2] = np.fromiter(map(_DATA_PTR, ordered), np.int64, len(grads))
        if scalar_ops is not None:
            counts = np.array([after[name] for name in plan.counter_names],
                              dtype=plan.counts.dtype)
            # As the full path reads them back: rounded to the counts' dtype.
            count_values = {name: int(value) if name == "step" else value
                            for name, value in zip(plan.counter_names, counts.tolist())}

        def run() -> list[torch.Tensor]:
            # The counts and the parameters' version counters are written before the
            # kernels, while the checks above have left them in cache (after a large
            # step's kernels they are not: on ResNet-50's 161 tensors the version bump
            # took several times longer there). Nothing else writes them; the counts go
            # back if the kernels raise.
            stepped = plan.stepped
            torch.autograd.graph.increment_version(stepped)
            if scalar_ops is None:
                implementation.run_table(calls, data)
                return []
            scalar_ops.write(plan.counter_table, counts)
            try:
                implementation.run_table(calls, data)
            except BaseException:
                scalar_ops.write(plan.counter_table, plan.counts)
                raise
            plan.counts, plan.count_values = counts, count_values
            return []  # their versions are counted already

        return run

    def _plan_group(self, index: int) -> None:
        """After a full step of group ``index``: its plan, where one can take it (every
        stepped parameter a float32 or float64 CPU tensor the fused kernels take, with the
        same states and counts, a rule without per-tensor scalars or reduction passes)."""
        self._plans.pop(index, None)
        group = self.param_groups[index]
        engine = self._engine(("numpy", None))
        implementation = engine.implementation
        if type(group) is not _Group or not engine._plannable \
                or not hasattr(implementation, "table_calls"):
            return
        params = list(group["params"])
        grads = list(map(_GRAD, params))
        picked = [i for i, grad in enumerate(grads) if grad is not None]
        if not picked:
            return
        declined = self._declined.get(index)
        if declined is not None and len(declined[0]) == len(params) \
                and all(map(is_, params, declined[0])) \
                and list(map(_DATA_PTR, params)) == declined[1]:
            return
        stepped = [params[i] for i in picked]
        counter_names, rule = self._counter_names, engine.rule
        slots, dicts = [], []
        for param in stepped:
            state = self.state.get(param) or None
            slot = self._slots.get(id(param))
            if state is None or slot is None or not slot.holds(param, state) \
                    or slot.kind != ("numpy", None) or len(slot.counters) != len(counter_names) \
                    or any(view is None or view.ndim for _, view in slot.counters.values()):
                return
            slots.append(slot)
            dicts.append(state)
        names = slots[0].present
        counters = [tuple(_read(slot.counters[n]) for n in counter_names) for slot in slots]
        counter_dtypes = {slot.counters[n][1].dtype for slot in slots for n in counter_names}
        if any(slot.present != names for slot in slots) or len(set(counters)) != 1 \
                or len(counter_dtypes) > 1 \
                or not (engine._required_states | engine.active_states(group)) <= set(names):
            return
        try:
            if any(p.dtype not in _PLANNED_DTYPES for p in stepped):
                raise TensorMismatch(0, "not a dtype of the fused kernels")
            records = [implementation._record(rule, i, slot.view, slot.states, names)
                       for i, slot in enumerate(slots)]
            if any(not record.fused or record.spec.layout for record in records):
                raise TensorMismatch(0, "not a layout of the fused kernels")
            data = implementation.make_plan(names, records, [slot.states for slot in slots])
            if data is None:
                raise TensorMismatch(0, "no plan")
        except TensorMismatch:
            self._declined[index] = (params, list(map(_DATA_PTR, params)))
            return
        self._declined.pop(index, None)
        self._plans[index] = _TorchPlan(self, group, params, picked, stepped, dicts, names,
                                        counters[0], counter_dtypes, engine, data)

    def _prepare_group(self, index: int) -> list[Callable[[], list[torch.Tensor]]]:
        group = self.param_groups[index]
        # A plain dict put in place of a group is checked here and replaced by the checked
        # group only when the step writes (the first run below): a step that raises leaves
        # the user's dict where it was.
        replaced = type(group) is not _Group
        if replaced:
            group = self._rules.check_group(group, self._defaults_checked)
        counter_names = self._counter_names
        rule_states = self.core.rule.states
        slots, state_of = self._slots, self.state.get
        empty = (None,) * len(counter_names)
        buckets: dict[tuple, list] = {}
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            state = state_of(param) or None  # an empty entry is no state yet
            slot = slots.get(id(param))
            if slot is None or not slot.holds(param, state):
                slot = slots[id(param)] = _Slot(param, _kind(param), state, counter_names,
                                                rule_states)
            if grad is not slot.grad or _address(grad) != slot.grad_layout:
                _check_grad(type(self).__name__, grad, param)
            counters = slot.counters
            values = tuple(_read(counters[n]) if n in counters else None
                           for n in counter_names) if counters else empty
            key = (slot.kind, slot.present, values)
            buckets.setdefault(key, []).append((param, slot, grad))
        runs = [self._prepare_bucket(index, ordinal, group, key, members)
                for ordinal, (key, members) in enumerate(buckets.items())]
        if replaced:
            def store() -> list[torch.Tensor]:
                self.param_groups[index] = group
                return []

            runs.insert(0, store)
        return runs

    def _prepare_bucket(self, index: int, ordinal: int, group: _Group, key: tuple,
                        members: list) -> Callable[[], list[torch.Tensor]]:
        """One set of parameters stepped with the same scalars: checked, kernels ready,
        new state allocated but not installed; the function that writes."""
        kind, present, counters = key
        engine = self._engine(kind)
        rule = engine.rule
        active = (frozenset(rule.states) - rule.optional_states) | engine.active_states(group)
        new = [name for name in rule.states if name in active and name not in present]
        group_state = engine._initial_group_state()
        for name, value in zip(self._counter_names, counters):
            if value is not None:
                group_state[name] = int(value) if name == "step" else value
        scalars, after = engine.step_scalars(group, group_state, first_step=bool(new))
        fills = {name: group[engine.initial_state[name]] if name in engine.initial_state else 0
                 for name in new}
        params = [slot.view for _, slot, _ in members]
        grads = [slot.grad_of(grad) for _, slot, grad in members]
        if fills:
            # The core's state dtype: float32 for float16 parameters (a second moment
            # underflows float16), the parameter's own otherwise.
            fresh = [{name: _new_state(rule, name, param, value) for name, value in fills.items()
                      if rule.holds_state(name, param.dim())} for param, _, _ in members]
            states = [{**slot.states, **{n: _view(kind[0], t) for n, t in made.items()}}
                      for (_, slot, _), made in zip(members, fresh)]
        else:
            fresh, states = None, [slot.states for _, slot, _ in members]
        cache = self._caches.setdefault((index, ordinal), {})
        extra = {}
        if engine.tensor_scalar_names:  # Muon's lr scaled by each matrix's shape
            extra["tensor_scalars"] = [engine.tensor_scalars(group, scalars, tuple(p.shape),
                                                             p.dtype) for p, _, _ in members]
        with self._on_stream(kind, members[0][0]):
            ready = engine.implementation.prepare(rule, engine._xp, params, grads, states,
                                                  scalars, cache=cache, **extra)
        counters_after = {name: after[name] for name in self._counter_names}

        def run() -> list[torch.Tensor]:
            with self._on_stream(kind, members[0][0]):
                ready.run()
            for position, (param, slot, _) in enumerate(members):
                made = fresh[position] if fresh is not None else None
                if made or len(slot.counters) != len(counters_after):
                    slot = self._install(param, slot, made or {})
                for name, counter in slot.counters.items():
                    _write(counter, counters_after[name])
            return [param for param, _, _ in members]

        return run

    def _install(self, param: torch.Tensor, slot: _Slot, made: dict[str, torch.Tensor]
                 ) -> _Slot:
        """A parameter's new state tensors (and its first counters) into ``self.state``, in
        the order torch keeps them (counters, then the rule's states)."""
        state = self.state[param]
        for name in self._counter_names:
            if name not in state:
                state[name] = torch.tensor(0.0, dtype=_scalar_dtype())
        for name in self.core.rule.states:
            if name in made:
                state[name] = made[name]
        order = [*self._counter_names, *self.core.rule.states]
        ordered = {name: state[name] for name in order if name in state}
        state.clear()
        state.update(ordered)
        # The record of the parameter again, over the state it has now (the caller writes
        # the counters' values).
        slot = self._slots[id(param)] = _Slot(param, slot.kind, state, self._counter_names,
                                              self.core.rule.states)
        return slot

    @property
    def _counter_names(self) -> tuple[str, ...]:
        """The scalar state each parameter keeps as a 0-d tensor: ``step`` (where torch's
        namesake keeps one) and the core's other group state (NAdam's ``mu_product``)."""
        names = self._counters
        if names is None:
            names = tuple(self._engine(("numpy", None))._initial_group_state())
            if not self.keeps_step:
                names = tuple(n for n in names if n != "step")
            self._counters = names
        return names

    def _engine(self, kind: tuple[str, Any]) -> CoreOptimizer:
        """The core optimizer that runs the rule for tensors of ``kind`` (its rule,
        scalars and implementation; its own one-element parameter is never stepped)."""
        engine = self._engines.get(kind)
        if engine is None:
            library, where = kind
            impl = self._impl
            if library == "numpy":
                dummy = np.zeros((1, 1))
            elif library == "cupy":
                cupy = _cupy()
                with cupy.cuda.Device(where):
                    dummy = cupy.zeros((1, 1))
            else:
                dummy = torch.zeros((1, 1), device=where)
                impl = "generic" if impl == "auto" else impl
            given = {k: self._defaults_checked[k] for k in self._core_arguments
                     if k in self._defaults_checked}
            engine = self._engines[kind] = self.core([dummy], **given, impl=impl)
        return engine

    @staticmethod
    def _on_stream(kind: tuple[str, Any], param: torch.Tensor) -> Any:
        """CuPy launches on torch's current stream of the parameter's device."""
        if kind[0] != "cupy":
            return _NULL
        cupy = _cupy()
        stream = torch.cuda.current_stream(param.device)
        return _Both(cupy.cuda.Device(kind[1]),
                     cupy.cuda.ExternalStream(stream.cuda_stream, kind[1]))

    # ----------------------------------------------------------------- state
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_impl": self._impl}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and torch's ``load_state_dict`` (which passes the loaded groups and
        state): everything is checked before anything is installed."""
        if "defaults" in state:  # unpickling: the instance is empty
            self._impl = state.get("_impl", "auto")
            self._setup(dict(state["defaults"]))
        defaults = self._defaults_checked
        state = dict(state)
        if "param_groups" in state:
            state["param_groups"] = [self._rules.check_group(g, defaults)
                                     for g in state["param_groups"]]
        groups = state.get("param_groups", getattr(self, "param_groups", []))
        if "state" in state:
            state["state"] = self._checked_state(state["state"], groups)
        super().__setstate__(state)
        self.defaults = dict(defaults)
        self._slots = {}
        self._caches = {}
        self._plans = {}
        self._declined = {}

    def _checked_state(self, saved: Mapping[Any, Any], groups: list) -> Any:
        """Loaded per-parameter state: only known names, arrays shaped and typed as their
        parameter, counters as 0-d host tensors of torch's scalar dtype."""
        from collections import defaultdict

        known = {id(p): p for g in groups for p in g["params"]}
        arrays = set(self.core.rule.states)
        counters = set(self._counter_names)
        checked: defaultdict[torch.Tensor, dict] = defaultdict(dict)
        for param, entry in saved.items():
            if not isinstance(param, torch.Tensor) or id(param) not in known:
                raise ValueError(f"the state has an entry for {param!r:.60}, which is none of "
                                 "this optimizer's parameters")
            if not isinstance(entry, Mapping):
                raise TypeError(f"a parameter's state must be a dict, got {type(entry).__name__}")
            out = {}
            for name, value in entry.items():
                if name in counters:
                    number = value.item() if isinstance(value, torch.Tensor) else value
                    number = _checks.number(f"state {name!r}", number)
                    out[name] = torch.tensor(float(number), dtype=_scalar_dtype())
                elif name in arrays and value is None:
                    continue  # older torch kept momentum_buffer=None for no momentum
                elif name in arrays:
                    wanted = state_dtype(param.dtype)
                    rule = self.core.rule
                    shape = rule.state_shape(name, tuple(param.shape)) \
                        if rule.holds_state(name, param.dim()) else None
                    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape \
                            or value.dtype not in (param.dtype, wanted) \
                            or value.device != param.device:
                        what = (f"shape {tuple(value.shape)}, dtype {value.dtype} on "
                                f"{value.device}" if isinstance(value, torch.Tensor)
                                else type(value).__name__)
                        raise ValueError(f"state {name!r} has {what}; its parameter shape "
                                         f"{tuple(param.shape)}, dtype {param.dtype} on "
                                         f"{param.device}" + (
                                             "" if shape == tuple(param.shape) else
                                             f" (the state's shape {shape})"))
                    # torch.optim keeps a float16 parameter's states in float16: widened
                    # (exactly) to the float32 the core keeps them in.
                    out[name] = value.detach().to(wanted)
                elif name == "step" and not self.keeps_step:
                    continue  # a count this optimizer does not keep
                else:
                    raise ValueError(f"unknown state {name!r} for {type(self).__name__} "
                                     f"(it keeps {sorted(counters | arrays)})")
            order = [*self._counter_names, *self.core.rule.states]
            checked[param] = {name: out[name] for name in order if name in out}
        return checked



class _ScheduleFreeModes:
    """``train()`` and ``eval()`` of the Schedule-Free optimizers on torch tensors, as
    :class:`~optim_core.optim.schedule_free.ScheduleFreeOptimizer` has them: eval puts
    every stepped parameter at the average :math:`x`, train back at :math:`y`, with the
    core's ``schedule_free_switch`` rule; ``step`` refuses in eval mode. The mode is
    pickled and kept in ``state_dict()["train_mode"]``."""

    _train_mode = True

    @property
    def train_mode(self) -> bool:
        return self._train_mode

    def train(self) -> None:
        r"""Put the parameters at the training point :math:`y` (nothing in train mode)."""
        if not self._train_mode:
            self._switch_mode(lambda beta: 1 - beta)
            self._train_mode = True

    def eval(self) -> None:
        r"""Put the parameters at the average :math:`x`, to evaluate or save the model."""
        if self._train_mode:
            self._switch_mode(lambda beta: 1 - 1 / beta)
            self._train_mode = False

    def _apply_step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not self._train_mode:
            raise RuntimeError(f"{type(self).__name__} is in eval mode: its parameters hold "
                               "the average x, not the training point y. Call .train() "
                               "before step() (and .eval() before evaluating or saving)")
        return TorchOptimizer._apply_step(self, closure)

    def _switch_mode(self, weight_of: Callable[[float], float]) -> None:
        prepared, moved = [], []
        for group in self.param_groups:
            by_kind: dict[tuple, list] = {}
            for param in group["params"]:
                state = self.state.get(param)
                if not state or "z" not in state:
                    continue  # not stepped yet: y, x and z coincide
                slot = _Slot(param, _kind(param), state, (), self.core.rule.states)
                by_kind.setdefault(slot.kind, []).append((param, slot))
            for kind, members in by_kind.items():
                engine = self._engine(kind)
                views = [slot.view for _, slot in members]
                states = [{"z": slot.states["z"]} for _, slot in members]
                scalars = {"weight": weight_of(engine.interpolation(group))}
                with self._on_stream(kind, members[0][0]):
                    ready = engine.implementation.prepare(schedule_free_switch, engine._xp,
                                                          views, views, states, scalars)
                prepared.append((kind, members[0][0], ready))
                moved += [param for param, _ in members]
        for kind, param, ready in prepared:
            with self._on_stream(kind, param):
                ready.run()
        if moved:
            torch.autograd.graph.increment_version(moved)

    def state_dict(self) -> dict[str, Any]:
        state_dict = TorchOptimizer.state_dict(self)
        state_dict["train_mode"] = self._train_mode
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, its mode included (the parameters are the
        caller's: restore them as they were saved, in that mode)."""
        mode = _checks.boolean("state_dict['train_mode']", state_dict.get("train_mode", True))
        TorchOptimizer.load_state_dict(
            self, {k: v for k, v in state_dict.items() if k != "train_mode"})
        self._train_mode = mode

    def __getstate__(self) -> dict[str, Any]:
        return {**TorchOptimizer.__getstate__(self), "_train_mode": self._train_mode}


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL = _NullContext()


class _Both:
    def __init__(self, *contexts: Any) -> None:
        self.contexts = contexts

    def __enter__(self) -> None:
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)


# --------------------------------------------------------------------------- classes
_CLASSES: dict[type[CoreOptimizer], type[TorchOptimizer]] = {}


def torch_optimizer(core: type[CoreOptimizer]) -> type[TorchOptimizer]:
    """The ``torch.optim.Optimizer`` subclass of an optimizer class (made once, then cached).

    Its name and positional hyperparameters are the core class's; where
    ``torch.optim`` has an optimizer of that name, the groups also keep torch's own
    keys with that class's defaults (so state dicts have the same keys).
    """
    if not (isinstance(core, type) and issubclass(core, CoreOptimizer)):
        raise TypeError(f"expected an optim_core Optimizer class, got {core!r}")
    cls = _CLASSES.get(core)
    if cls is not None:
        return cls
    name = core.__name__
    namesake = getattr(torch.optim, name, None)
    core_signature = inspect.signature(core.__init__)
    arguments = [p for p in list(core_signature.parameters.values())[2:]
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    ours = {p.name for p in arguments}
    torch_keys: dict[str, Any] = {}
    if isinstance(namesake, type) and issubclass(namesake, torch.optim.Optimizer):
        for parameter in inspect.signature(namesake).parameters.values():
            if parameter.name in _TORCH_FLAGS and parameter.name not in ours:
                torch_keys[parameter.name] = parameter.default
    keyword_only = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                    for k, v in torch_keys.items()]
    signature = inspect.Signature(arguments + keyword_only)
    public = inspect.Signature([
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD), *arguments,
        *keyword_only,
        inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default="auto")])
    registered = OPTIMIZERS.get(getattr(core, "cli_name", None) or "") is core
    doc = (f"{name} as a ``torch.optim.Optimizer``: :class:`optim_core.{name}`'s update on "
           "torch tensors (see :mod:`optim_core.torch`).\n\n"
           f"Construct it as ``torch.optim.{name}``; ``impl`` as for the core class.\n\n"
           f"{inspect.cleandoc(core.__doc__ or '')}")
    # Families with methods of their own beyond step (Schedule-Free's train and eval).
    bases = (_ScheduleFreeModes, TorchOptimizer) if issubclass(core, ScheduleFreeOptimizer) \
        else (TorchOptimizer,)
    cls = type(name, bases, {
        "__module__": "optim_core.torch" if registered else __name__,
        "__qualname__": name,
        "__doc__": doc,
        "__signature__": public,
        "core": core,
        "torch_keys": torch_keys,
        "keeps_step": name not in _NO_STEP_STATE,
        "_signature": signature,
        "_core_arguments": tuple(p.name for p in arguments),
    })
    return _CLASSES.setdefault(core, cls)


def torch_optimizers() -> dict[str, type[TorchOptimizer]]:
    """The torch class of every optimizer in the registry, by class name."""
    return {core.__name__: torch_optimizer(core) for core in OPTIMIZERS.values()}
