"""The generic implementation: an update rule run with array API calls, on any namespace.

It allocates temporaries for each operation (it is written for portability, not
speed); the fused implementations beside it are the fast path.

Every implementation works in two phases, so that a step that cannot run changes
nothing: :meth:`~GenericImplementation.prepare` checks every tensor's arrays (and a
fused one finds or compiles its kernels) without writing anything, and the
:class:`PreparedStep` it returns writes when run. An optimizer prepares all its
groups before it runs any.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from optim_core import _namespace as ns

from ._operations import generic_operations

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["GENERIC", "GenericImplementation", "PreparedStep", "TensorMismatch",
           "checked_state_names"]


class TensorMismatch(ValueError):
    """A tensor's arrays disagree (a state of another shape or dtype than its parameter).

    Attributes
    ----------
    index : int
        The tensor's position in the group, so the optimizer can name the parameter.
    detail : str
        What disagrees.
    """

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"tensor {index}: {detail}")
        self.index, self.detail = index, detail


def checked_state_names(rule: UpdateRule, index: int, param: Any, state: Mapping[str, Any],
                        expected: tuple[str, ...] | None) -> tuple[str, ...]:
    """The states present for one tensor, in the rule's order, after checking each.

    Every state must have the parameter's shape and dtype, and the states present must
    be ``expected`` (those of the group's first tensor) when given: a kernel is sized by
    its parameter, so a state of another size would be read and written out of bounds.

    Raises
    ------
    TensorMismatch
        Naming the state that disagrees.
    """
    shape, dtype = tuple(param.shape), param.dtype
    names = tuple(n for n in rule.states if n in state)
    if expected is not None and names != expected:
        raise TensorMismatch(index, f"has states {list(names)}, the group's first parameter "
                                    f"{list(expected)}; every parameter of a group must have "
                                    "the same state entries")
    for name in names:
        array = state[name]
        got = getattr(array, "shape", None)
        if got is None or tuple(got) != shape or array.dtype != dtype:
            what = (f"shape {tuple(got)} and dtype {array.dtype}" if got is not None
                    else f"type {type(array).__name__}")
            raise TensorMismatch(index, f"state {name!r} has {what}, the parameter shape "
                                        f"{shape} and dtype {dtype}: it was resized or "
                                        "replaced after its state was made")
    return names


class PreparedStep:
    """One group's step, checked and ready: :meth:`run` writes and returns the parameters."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def run(self) -> list[Any]:
        return self._run()


class GenericImplementation:
    """Runs a rule with the standard functions of the parameters' namespace."""

    name = "generic"

    def prepare(self, rule: UpdateRule, xp: Any, params: Sequence[Any], grads: Sequence[Any],
                states: Sequence[dict[str, Any]], scalars: dict[str, Any],
                cache: dict | None = None,
                tensor_scalars: Sequence[dict[str, Any]] | None = None) -> PreparedStep:
        """Check every tensor (:func:`checked_state_names`); the step, ready to run.

        ``cache`` is accepted for the fused implementations' sake and not used;
        ``tensor_scalars``, where given, are each tensor's own scalars beside ``scalars``.
        """
        expected = None
        for index, (param, state) in enumerate(zip(params, states, strict=True)):
            expected = checked_state_names(rule, index, param, state, expected)
        return PreparedStep(lambda: self._run(rule, xp, params, grads, states, scalars,
                                              tensor_scalars))

    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states``; return the (possibly new) parameter arrays."""
        return self.prepare(rule, xp, params, grads, states, scalars).run()

    def _run(self, rule: UpdateRule, xp: Any, params: Sequence[Any], grads: Sequence[Any],
             states: Sequence[dict[str, Any]], scalars: dict[str, Any],
             tensor_scalars: Sequence[dict[str, Any]] | None = None) -> list[Any]:
        update = rule.bind(generic_operations(xp))
        out = []
        every = scalars
        with _no_autograd(params):
            for index, (param, grad, state) in enumerate(zip(params, grads, states)):
                if tensor_scalars is not None:
                    scalars = {**every, **tensor_scalars[index]}
                given = [state.get(name) for name in rule.states]
                compute = _compute_dtype(xp, param.dtype)
                if compute is None:
                    new_param, *new_states = update(param, grad, *given, **scalars)
                else:
                    given = [None if s is None else xp.astype(s, compute) for s in given]
                    new_param, *new_states = update(xp.astype(param, compute),
                                                    xp.astype(grad, compute), *given,
                                                    **scalars)
                param = _store(xp, param, new_param)
                for name, value, before in zip(rule.states, new_states, given):
                    if name in state and value is not before:
                        state[name] = _store(xp, state[name], value)
                out.append(param)
        return out


def _no_autograd(params: Sequence[Any]) -> Any:
    """``torch.no_grad()`` for torch tensors, as torch.optim steps: a leaf tensor that
    requires grad refuses in-place writes otherwise, and the update is no part of any
    graph. Nothing for other libraries (torch is never imported for them)."""
    if params and type(params[0]).__module__.startswith("torch"):
        return sys.modules["torch"].no_grad()
    return contextlib.nullcontext()


def _compute_dtype(xp: Any, dtype: Any) -> Any:
    """float32 for 16-bit floats, else None (compute in the parameter's dtype).

    float16 and bfloat16 are computed in float32 and rounded once when stored, as
    fused GPU kernels do: in float16 itself, the default ``eps=1e-8`` rounds to 0 and
    a zero gradient would give 0/0 = NaN.
    """
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is None:
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:
            return None
    return xp.float32 if itemsize < 4 else None


def _store(xp: Any, target: Any, value: Any) -> Any:
    if value.dtype != target.dtype:
        value = xp.astype(value, target.dtype)
    if ns.is_writeable(target):
        target[...] = value
        return target
    return xp.asarray(value, dtype=target.dtype)


GENERIC = GenericImplementation()
