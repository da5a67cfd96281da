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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._generic import GENERIC, PreparedStep, TensorMismatch, checked_state_names
from ._lowering import reductions_taken
from ._quantized import is_quantized

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["FusedImplementation"]


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

    # ----------------------------------------------------------------- shared
    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states`` in place; return the parameters."""
        return self.prepare(rule, xp, params, grads, states, scalars).run()

    def prepare(self, rule: UpdateRule, xp: Any, params: Sequence[Any], grads: Sequence[Any],
                states: Sequence[dict[str, Any]], scalars: dict[str, Any],
                cache: dict | None = None, rounding: Any = None) -> PreparedStep:
        """Check every tensor and find its kernels (compiling where needed); write nothing.

        Parameters
        ----------
        cache : dict, optional
            Kept by the caller for one group across steps: the checked records of its
            tensors (see the module docstring). Without it every tensor is checked in full.
        rounding : Rounding, optional
            How 16-bit parameters are stored (see :mod:`._rounding`); those always take
            the generic path.

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
        for index, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
            record = records[index]
            if record is None or not record.holds(param, state) or (
                    names is not None and record.names is not names
                    and record.names != names):
                record = records[index] = self._record(rule, index, param, state, names)
            names = record.names
            if grad.size != record.size:
                raise TensorMismatch(index, f"the gradient has {grad.size} elements, the "
                                            f"parameter {record.size}")
            if not (record.fused and grad_fusable(grad, record)):
                generic.append(index)
                continue
            if record.spec.layout and rule.reductions and reductions_taken(
                    rule, scalars, frozenset(names)):
                # The quantized kernels have no reduction pass: the generic path steps it.
                generic.append(index)
                continue
            if not record.size:
                continue
            entry = kernels_of.get(record.spec)
            if entry is None:
                layout = record.spec.layout
                kernels, hoisted = self.kernel_for(rule, scalars, frozenset(names), record.dtype,
                                                   *((layout,) if layout else ()))
                entry = kernels_of[record.spec] = [
                    kernels, [record.dtype.type(h) for h in hoisted], False, False]
            # Which variants (below, at or above large_size) this step needs, to have them
            # ready before anything runs.
            entry[2 + (record.size >= large)] = True
            arrays = record.arrays
            tensors.append((entry[0], entry[1], (arrays[0], kernel_array(grad), *arrays[1:])))
        for spec, (kernels, hoisted, small_ones, large_ones) in kernels_of.items():
            self.ready(kernels, spec.dtype, len(spec.names) + 2, len(hoisted), small_ones,
                       large_ones)

        def run() -> list[Any]:
            if generic:
                GENERIC._run(rule, xp, [params[i] for i in generic], [grads[i] for i in generic],
                             [states[i] for i in generic], scalars, rounding, generic)
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
