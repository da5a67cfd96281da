"""What the fused implementations share: checking a step's tensors and finding their kernels.

A fused implementation (:mod:`._numba`, :mod:`._cuda`) compiles one kernel per
specialization of a rule (see :mod:`._lowering`) and dtype, and launches it however
its library does. The walk over a step's tensors is the same for all of them and is
written here once: each tensor's arrays checked and put in the kernel's order, the
generic path for the tensors a kernel cannot take, and each specialization's kernels
and hoisted values looked up once per step.

Memory safety
-------------
A kernel runs over its parameter's element count and trusts every other array to be
as long, so before anything runs, :meth:`FusedImplementation.prepare` checks every
tensor: each state has the parameter's shape and dtype, the states present are the
group's, the gradient has the parameter's dtype and size, and all are contiguous.
What a tensor needs from one step to the next (its arrays in kernel order, as 1-D
arrays for numba) is kept in a :class:`_Tensor` record in the group's ``cache``; a
record is reused only while the parameter and each state are the same objects with the
same element counts, so a parameter replaced in ``param_groups``, a state replaced in
``optimizer.state`` or an array resized in place (``ndarray.resize`` reallocates only
when the element count changes) is checked again from scratch before any kernel runs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from operator import is_
from typing import TYPE_CHECKING, Any

import numpy as np

from ._generic import GENERIC, PreparedStep, TensorMismatch, checked_state_names
from ._lowering import reductions_taken
from ._quantized import is_quantized

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["FusedImplementation", "StateDict", "state_writes", "STATE_WRITES"]

#: How many writes any :class:`StateDict` has seen (one shared count: a state dict may
#: be shared by several optimizers, and any write must reach every plan that uses it).
_STATE_WRITES = [0]
#: The count itself, for a reader that compares it every step (one item read, no call).
STATE_WRITES = _STATE_WRITES


def state_writes() -> int:
    """The number of writes made so far to any :class:`StateDict` of this process."""
    return _STATE_WRITES[0]


def _counted(write: Any) -> Any:
    """``write`` (a dict method), then the count of state writes moved on."""
    @functools.wraps(write)
    def counted(self: dict, *args: Any, **kwargs: Any) -> Any:
        try:
            return write(self, *args, **kwargs)
        finally:
            _count_state_write()

    return counted


class StateDict(dict):
    """One parameter's states (name -> array): a dict that counts its writes.

    A step plan (see :meth:`FusedImplementation.plan_step`) keeps each state's address;
    it stays valid only while no state dict it uses was written, which this count tells
    in one comparison instead of a look at every entry of every dict each step. Every
    method that writes counts; anything else is a plain dict.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return (StateDict, (dict(self),))

    # Each write is counted after it is made (and even where it raises part-way): a step
    # that reads the count and then the states can pair an old count with a new state,
    # never a new count with an old state.
    __setitem__ = _counted(dict.__setitem__)
    __delitem__ = _counted(dict.__delitem__)
    __ior__ = _counted(dict.__ior__)
    update = _counted(dict.update)
    pop = _counted(dict.pop)
    popitem = _counted(dict.popitem)
    clear = _counted(dict.clear)
    setdefault = _counted(dict.setdefault)


_COUNT_LOCK = threading.Lock()


def _count_state_write() -> None:
    # Under a lock: "+= 1" is a read and a write, and two threads could lose one count.
    with _COUNT_LOCK:
        _STATE_WRITES[0] += 1


class _Spec:
    """A (states present, dtype, quantized states) triple, interned: a dict key hashed by
    identity, so a step looks each tensor's specialization up without building and hashing
    a tuple. ``layout`` is ``((state, bits, signed), ...)`` of the quantized states."""

    __slots__ = ("names", "dtype", "layout")

    def __init__(self, names: tuple[str, ...], dtype: np.dtype, layout: tuple = ()) -> None:
        self.names, self.dtype, self.layout = names, dtype, layout


_SPECS: dict[tuple, _Spec] = {}


class _Tensor:
    """One tensor's arrays as its kernel takes them, checked; kept across steps.

    ``arrays`` are the parameter and its states, in the kernel's order (the rule's),
    as the kernel takes them (:meth:`FusedImplementation.kernel_array`); ``fused`` is
    false for a tensor the generic path steps (another dtype, not contiguous).
    ``state_ids`` are the identities of the state dict's values, in its order: the
    record holds the arrays, so no other object can take one of those ids meanwhile.
    """

    __slots__ = ("param", "size", "names", "state_ids", "arrays", "dtype", "fused", "spec")

    def __init__(self, param: Any, names: tuple[str, ...], state: dict[str, Any],
                 arrays: tuple[Any, ...], dtype: Any, fused: bool, layout: tuple = ()) -> None:
        self.param, self.size, self.names = param, param.size, names
        # The states themselves stay referenced through ``arrays`` (or this tuple).
        self.state_ids = (tuple(map(id, state.values())), tuple(state.values()))
        self.arrays, self.dtype, self.fused = arrays, dtype, fused
        key = (names, dtype, layout)
        spec = _SPECS.get(key)
        if spec is None:
            spec = _SPECS.setdefault(key, _Spec(names, dtype, layout))
        self.spec, self.names = spec, spec.names  # one tuple per spec: compared by identity

    def holds(self, param: Any, state: dict[str, Any]) -> bool:
        """Whether this record still describes ``param`` and ``state``: the same objects,
        the same element counts (cheap: no shape tuples, no flags)."""
        if param is not self.param or param.size != self.size \
                or tuple(map(id, state.values())) != self.state_ids[0]:
            return False
        size = self.size
        for array in state.values():
            if array.size != size:
                return False
        return True


class FusedImplementation:
    """Base of the fused implementations.

    Subclasses define :meth:`kernel_for` (the compiled kernels of a specialization and
    its hoisted values), :meth:`fusable` (whether a kernel takes these arrays as they
    are), :meth:`grad_fusable`, :meth:`kernel_array`, :meth:`ready` and :meth:`launch`,
    which runs the kernels of the tensors :meth:`prepare` checked.

    Attributes
    ----------
    compiled : dict
        ``(rule name, key, dtype) -> kernels`` for every specialization this process has
        compiled; a new ``lr`` adds none.
    launches : int
        Number of kernel launches made, for tests and benchmarks.
    """

    name = "fused"

    def __init__(self) -> None:
        self.compiled: dict[tuple, Any] = {}
        self.launches = 0

    # ----------------------------------------------------------------- per library
    def kernel_for(self, rule: UpdateRule, scalars: dict[str, Any], present: frozenset[str],
                   dtype: np.dtype, layout: tuple = ()) -> tuple[Any, list[float]]:
        """The compiled kernels of this step's specialization and the hoisted values;
        ``layout`` lists the quantized states, ``((state, bits, signed), ...)``."""
        raise NotImplementedError

    def quantized_arrays(self, state: Any) -> tuple:
        """A quantized state's kernel arguments (codes, scales, map, midpoints)."""
        raise NotImplementedError

    def quantized_fusable(self, param: Any, states: tuple) -> bool:
        """Whether a quantized kernel takes this tensor's arrays as they are."""
        return False

    def fusable(self, arrays: list[Any]) -> bool:
        """Whether a kernel takes ``arrays`` (param, grad, states) as they are."""
        raise NotImplementedError

    def grad_fusable(self, grad: Any, record: _Tensor) -> bool:
        """Whether a kernel takes ``grad`` beside the record's arrays (checked per step)."""
        raise NotImplementedError

    def kernel_array(self, array: Any) -> Any:
        """``array`` as the kernel takes it (numba: 1-D)."""
        return array

    #: Tensors of at least this many elements take another variant of a kernel (numba: the
    #: multi-threaded loop); :meth:`ready` is told which variants a step needs.
    large_size = 1 << 62

    def ready(self, kernels: Any, dtype: np.dtype, n_arrays: int, n_hoisted: int,
              small: bool, large: bool) -> None:
        """Make the variants of ``kernels`` a step needs runnable (compile them) before
        any kernel of the step runs; by default they already are."""

    def launch(self, tensors: list[tuple[Any, list[Any], tuple[Any, ...]]]) -> None:
        """Run ``(kernels, hoisted values, arrays)`` of each checked tensor; arrays are
        the parameter, the gradient and the states, in the kernel's order."""
        raise NotImplementedError

    # ----------------------------------------------------------------- step plans
    #: Whether this implementation keeps step plans (see :meth:`plan_step`).
    keeps_plans = False

    def plan_step(self, rule: UpdateRule, params: list[Any], grads: Sequence[Any],
                  states: list[dict[str, Any]], scalars: dict[str, Any],
                  active: frozenset[str], known: list[Any], shapes: list[tuple[int, ...]],
                  cache: dict, finite: bool = False) -> PreparedStep | None:
        """One group's step through its kept plan, checked and ready; or None.

        A plan holds what the group's steps need of every tensor (addresses, sizes,
        kernel specializations), made once by a full check of the parameters and states
        (:meth:`_plan`), and kept in ``cache`` while the parameters are the same objects
        as ``known`` (those the optimizer last checked, of ``shapes``), the state dicts
        the same :class:`StateDict` objects, none of which was written since
        (:func:`state_writes`), and the group needs the same states (``active``). Each
        step then checks, in one compiled pass, that every array is still where and
        what it was (not resized, replaced or made non-contiguous) and every gradient
        fits its parameter, and runs one compiled call per specialization.

        With ``finite`` (a non-finite policy other than "propagate"), a gradient that is
        not finite also gives None.

        None means the plan does not apply (the first step, a gradient of another dtype,
        anything not as planned): the caller takes the full path, which checks
        everything again and reports what is wrong. Nothing is written either way.
        """
        if not self.keeps_plans:
            return None
        if not params:
            return PreparedStep(lambda: params)
        plan = cache.get("plan")
        if plan is None or not plan.holds(params, states, active):
            cache.pop("plan", None)
            plan = _Plan(params, states, active)
            if not plan.params_checked(known, shapes):
                return None  # the full path checks them first
            try:
                plan.data = self._plan(rule, plan)
            except TensorMismatch:
                return None  # the full path reports it; no plan is kept for it
            # A plan of None (tensors it cannot take) is kept too: not tried every step.
            cache["plan"] = plan
        if plan.data is None:
            return None
        return self.planned_step(rule, plan.data, grads, scalars, params, finite)

    def _plan(self, rule: UpdateRule, plan: _Plan) -> Any:
        """Check every tensor of ``plan`` in full and make what its steps need, or None if
        a tensor is not one a plan can take (not fusable, a plain dict of states).

        Raises
        ------
        TensorMismatch
            If a tensor's arrays disagree.
        """
        names = tuple(s for s in rule.states if s in plan.active)
        records = []
        for index, (param, state) in enumerate(zip(plan.params, plan.states, strict=True)):
            if type(state) is not StateDict:
                return None
            record = self._record(rule, index, param, state, names)
            if not record.fused or record.spec.layout:  # quantized states: the full path
                return None
            records.append(record)
        return self.make_plan(names, records, plan.states)

    def make_plan(self, names: tuple[str, ...], records: list[_Tensor],
                  states: list[dict[str, Any]]) -> Any:
        """What :meth:`planned_step` needs of these checked tensors (per library)."""
        raise NotImplementedError

    def planned_step(self, rule: UpdateRule, data: Any, grads: Sequence[Any],
                     scalars: dict[str, Any], params: list[Any],
                     finite: bool = False) -> PreparedStep | None:
        """Check the gradients and the planned arrays (and, with ``finite``, that every
        gradient is finite); the step, or None (per library)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states`` in place; return the parameters."""
        return self.prepare(rule, xp, params, grads, states, scalars).run()

    def prepare(self, rule: UpdateRule, xp: Any, params: Sequence[Any], grads: Sequence[Any],
                states: Sequence[dict[str, Any]], scalars: dict[str, Any],
                cache: dict | None = None, rounding: Any = None,
                tensor_scalars: Sequence[dict[str, Any]] | None = None) -> PreparedStep:
        """Check every tensor and find its kernels (compiling where needed); write nothing.

        Parameters
        ----------
        cache : dict, optional
            Kept by the caller for one group across steps: the checked records of its
            tensors (see the module docstring). Without it every tensor is checked in full.
        rounding : Rounding, optional
            How 16-bit parameters are stored (see :mod:`._rounding`); those always take
            the generic path.
        tensor_scalars : list of dict, optional
            Each tensor's own scalars beside ``scalars`` (tensors with equal ones share
            their hoisted values).

        Raises
        ------
        TensorMismatch
            If a tensor's arrays disagree; nothing has been written.
        """
        records = cache.setdefault(self, []) if cache is not None else []
        if len(records) != len(params):
            records[:] = [None] * len(params)
        tensors: list[tuple[Any, list[Any], tuple[Any, ...]]] = []
        generic: list[int] = []
        kernels_of: dict[_Spec, list] = {}
        names = None
        large = self.large_size
        grad_fusable, kernel_array = self.grad_fusable, self.kernel_array
        taken: dict[frozenset, int] = {}

        def _taken(names: Any) -> int:
            # Once per step and set of states, not once per tensor (a lowering each).
            key = frozenset(names)
            if key not in taken:
                taken[key] = reductions_taken(rule, scalars, key)
            return taken[key]

        for index, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
            record = records[index]
            # A kept record is checked again if its arrays were made read-only or
            # non-contiguous since (flags change in place; the kernel's 1-D views would
            # not see it).
            if record is None or not record.holds(param, state) or (
                    names is not None and record.names is not names
                    and record.names != names) or (
                    record.fused and not (
                        self.quantized_fusable(param, record.state_ids[1]) if record.spec.layout
                        else self.fusable([param, *record.state_ids[1]]))):
                record = records[index] = self._record(rule, index, param, state, names)
            names = record.names
            if grad.size != record.size:
                raise TensorMismatch(index, f"the gradient has {grad.size} elements, the "
                                            f"parameter {record.size}")
            if not (record.fused and grad_fusable(grad, record)):
                generic.append(index)
                continue
            if record.spec.layout and rule.reductions and _taken(names):
                # The quantized kernels have no reduction pass: the generic path steps it.
                generic.append(index)
                continue
            if not record.size:
                continue
            spec: Any = record.spec
            step_scalars = scalars
            if tensor_scalars is not None and tensor_scalars[index]:
                spec = (spec, tuple(tensor_scalars[index].items()))
                step_scalars = {**scalars, **tensor_scalars[index]}
            entry = kernels_of.get(spec)
            if entry is None:
                layout = record.spec.layout
                kernels, hoisted = self.kernel_for(rule, step_scalars, frozenset(names),
                                                   record.dtype, *((layout,) if layout else ()))
                entry = kernels_of[spec] = [
                    kernels, [record.dtype.type(h) for h in hoisted], False, False]
            if entry[0] is None:  # a form the fused loops do not lower: the generic path
                generic.append(index)
                continue
            # Which variants (below, at or above large_size: the kernels' own where they
            # have one) this step needs, to have them ready before anything runs.
            entry[2 + (record.size >= getattr(entry[0], "large_size", large))] = True
            arrays = (record.arrays[0], kernel_array(grad), *record.arrays[1:])
            if getattr(entry[0], "factored", False):
                # Loops over the last two axes (see ._factored): its rows and columns.
                shape = record.param.shape
                arrays = (*arrays, shape[-2], shape[-1])
            tensors.append((entry[0], entry[1], arrays))
        for spec, (kernels, hoisted, small_ones, large_ones) in kernels_of.items():
            if kernels is None:
                continue
            spec = spec[0] if isinstance(spec, tuple) else spec
            self.ready(kernels, spec.dtype, len(spec.names) + 2, len(hoisted), small_ones,
                       large_ones)

        def run() -> list[Any]:
            if generic:
                GENERIC._run(rule, xp, [params[i] for i in generic], [grads[i] for i in generic],
                             [states[i] for i in generic], scalars, rounding, generic,
                             None if tensor_scalars is None
                             else [tensor_scalars[i] for i in generic])
            self.launch(tensors)
            return params if isinstance(params, list) else list(params)

        return PreparedStep(run)

    def _record(self, rule: UpdateRule, index: int, param: Any,
                state: dict[str, Any], expected: tuple[str, ...] | None) -> _Tensor:
        """Check one tensor in full and record it."""
        names = checked_state_names(rule, index, param, state, expected)
        states = tuple(state[n] for n in names)
        dtype = np.dtype(param.dtype)
        layout = tuple((n, s.bits, s.signed) for n, s in zip(names, states) if is_quantized(s))
        if layout:
            # A quantized state is four kernel arguments: codes, scales, map, midpoints.
            fused = self.quantized_fusable(param, states)
            arrays = (self.kernel_array(param), *(
                a for s in states for a in (self.quantized_arrays(s) if is_quantized(s)
                                            else (self.kernel_array(s),)))) if fused else ()
        else:
            fused = self.fusable([param, *states])
            arrays = tuple(self.kernel_array(a) for a in (param, *states)) if fused else ()
        return _Tensor(param, names, state, arrays, dtype, fused, layout)


class _Plan:
    """The objects a step plan was made for (see :meth:`FusedImplementation.plan_step`),
    and what the implementation made of them (``data``; None: no plan applies)."""

    __slots__ = ("params", "states", "active", "writes", "data")

    def __init__(self, params: list[Any], states: list[dict[str, Any]],
                 active: frozenset[str]) -> None:
        # The count first: a write while the plan is made makes it stale at once.
        self.writes = _STATE_WRITES[0]
        self.params, self.states, self.active = list(params), list(states), active
        self.data: Any = None

    def holds(self, params: list[Any], states: list[dict[str, Any]],
              active: frozenset[str]) -> bool:
        """The same parameter and state-dict objects, no state written, the same states
        needed: one comparison per object, in C (``map``)."""
        return (_STATE_WRITES[0] == self.writes and active == self.active
                and len(params) == len(self.params) and len(states) == len(self.states)
                and all(map(is_, params, self.params)) and all(map(is_, states, self.states)))

    def params_checked(self, known: list[Any], shapes: list[tuple[int, ...]]) -> bool:
        """Whether the parameters are those the optimizer checked last, as they were then."""
        return len(known) == len(self.params) and all(map(is_, self.params, known)) and all(
            tuple(p.shape) == shape for p, shape in zip(self.params, shapes, strict=True))
