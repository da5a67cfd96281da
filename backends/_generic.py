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
from ._quantized import QuantizedState, block_count, code_count, dequantize, store_quantized
from ._rounding import COMPENSATION, Rounding, is_16bit, stochastic_round

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
    if ns.is_read_only(param):
        # Made read-only after the optimizer checked it: stepping it out of place would
        # leave the caller's array behind while its states moved on.
        raise TensorMismatch(index, "is read-only (flags.writeable was cleared after the "
                                    "optimizer was made); the optimizer updates in place")
    names = tuple(n for n in rule.states if n in state)
    if expected is not None and not rule.same_states(names, len(shape), expected):
        raise TensorMismatch(index, f"has states {list(names)}, the group's first parameter "
                                    f"{list(expected)}; every parameter of a group must have "
                                    "the same state entries")
    for name in names:
        array = state[name]
        if type(array) is QuantizedState:
            _check_quantized(index, name, array, shape)
            continue
        got = getattr(array, "shape", None)
        if not rule.holds_state(name, len(shape)):
            raise TensorMismatch(index, f"has state {name!r}, which a {len(shape)}-D "
                                        f"parameter does not hold ({rule.state_shapes[name]}"
                                        "-shaped)")
        want = rule.state_shape(name, shape)
        if got is not None and ns.is_read_only(array):
            raise TensorMismatch(index, f"state {name!r} is read-only; the optimizer "
                                        "updates its states in place")
        if got is None or tuple(got) != want or array.dtype != state_dtype(dtype):
            what = (f"shape {tuple(got)} and dtype {array.dtype}" if got is not None
                    else f"type {type(array).__name__}")
            raise TensorMismatch(index, f"state {name!r} has {what}, the parameter shape "
                                        f"{shape} and dtype {dtype} (the state's shape "
                                        f"{want}): it was resized or replaced after its "
                                        "state was made")
    return names


def state_dtype(dtype: Any) -> Any:
    """The dtype of the (unquantized) states of a parameter of ``dtype``: float32 for
    float16, whose exponent range a second moment (a squared gradient) underflows, the
    parameter's own otherwise (bfloat16 has float32's exponent range)."""
    try:
        if np.dtype(dtype) == np.float16:
            return np.dtype(np.float32)
    except TypeError:
        name = str(dtype)
        if name.endswith("float16") and "bfloat16" not in name:
            return _float32_like(dtype)
    return dtype


def _float32_like(dtype: Any) -> Any:
    """float32 of the library ``dtype`` comes from (torch.float16 -> torch.float32)."""
    module = sys.modules.get(type(dtype).__module__.split(".")[0])
    return getattr(module, "float32", np.float32)


def _check_quantized(index: int, name: str, state: QuantizedState,
                     shape: tuple[int, ...]) -> None:
    """A quantized state's codes and scales are as long as its parameter needs."""
    codes, absmax = state.codes, state.absmax
    want_codes, want_blocks = code_count(state.bits, state.size), block_count(state.bits,
                                                                            state.size)
    if state.shape != shape or tuple(codes.shape) != (want_codes,) or \
            tuple(absmax.shape) != (want_blocks,) or str(codes.dtype).rsplit(".")[-1] != \
            "uint8" or str(absmax.dtype).rsplit(".")[-1] != "float32":
        raise TensorMismatch(index, f"quantized state {name!r} has shape {state.shape}, codes "
                                    f"{tuple(codes.shape)} {codes.dtype} and scales "
                                    f"{tuple(absmax.shape)} {absmax.dtype}; the parameter "
                                    f"shape {shape} needs {want_codes} uint8 codes and "
                                    f"{want_blocks} float32 scales")


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
                cache: dict | None = None, rounding: Rounding | None = None,
                tensor_scalars: Sequence[dict[str, Any]] | None = None) -> PreparedStep:
        """Check every tensor (:func:`checked_state_names`); the step, ready to run.

        ``cache`` is accepted for the fused implementations' sake and not used;
        ``rounding`` says how 16-bit parameters are stored (see :mod:`._rounding`;
        None: to nearest); ``tensor_scalars``, where given, are each tensor's own scalars
        beside ``scalars``.
        """
        expected = None
        for index, (param, state) in enumerate(zip(params, states, strict=True)):
            expected = checked_state_names(rule, index, param, state, expected)
        return PreparedStep(lambda: self._run(rule, xp, params, grads, states, scalars,
                                              rounding, None, tensor_scalars))

    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states``; return the (possibly new) parameter arrays."""
        return self.prepare(rule, xp, params, grads, states, scalars).run()

    def _run(self, rule: UpdateRule, xp: Any, params: Sequence[Any], grads: Sequence[Any],
             states: Sequence[dict[str, Any]], scalars: dict[str, Any],
             rounding: Rounding | None = None,
             indices: Sequence[int] | None = None,
             tensor_scalars: Sequence[dict[str, Any]] | None = None) -> list[Any]:
        """Step each tensor; ``indices`` are their positions in the group (for the keys of
        stochastic rounding), ``range(len(params))`` by default; ``tensor_scalars`` each
        tensor's own scalars beside ``scalars`` (in the order of ``params``)."""
        update = rule.bind(generic_operations(xp))
        out = []
        indices = range(len(params)) if indices is None else indices
        every = scalars
        with _no_autograd(params):
            for position, (index, param, grad, state) in enumerate(
                    zip(indices, params, grads, states)):
                if tensor_scalars is not None:
                    scalars = {**every, **tensor_scalars[position]}
                given = [state.get(name) for name in rule.states]
                compute = _compute_dtype(xp, param.dtype)
                kind = rounding.kind if rounding is not None and is_16bit(param.dtype) \
                    else "nearest"
                stored = param
                if kind == "compensated":
                    # Kahan: the step sees the parameter plus what rounding dropped.
                    param = xp.astype(param, compute) + xp.astype(state[COMPENSATION], compute)
                if any(type(s) is QuantizedState for s in given):
                    # The storage kind is not the rule's business: dequantized into the
                    # compute dtype, stepped by the same rule, quantized again.
                    values = compute if compute is not None else param.dtype
                    given = [dequantize(xp, s, values, like=param)
                             if type(s) is QuantizedState else s for s in given]
                if compute is None:
                    new_param, *new_states = update(param, grad, *given, **scalars)
                else:
                    given = [None if s is None else xp.astype(s, compute) for s in given]
                    new_param, *new_states = update(xp.astype(param, compute),
                                                    xp.astype(grad, compute), *given,
                                                    **scalars)
                if kind == "stochastic":
                    new_param = stochastic_round(xp, new_param, stored.dtype,
                                                 rounding.key(index))
                    param = _store(xp, stored, new_param)
                elif kind == "compensated":
                    param = _store(xp, stored, new_param)
                    residual = new_param - xp.astype(param, compute)
                    state[COMPENSATION] = _store(xp, state[COMPENSATION], residual)
                else:
                    param = _store(xp, param, new_param)
                for name, value, before in zip(rule.states, new_states, given):
                    if name in state and value is not before:
                        if type(state[name]) is QuantizedState:
                            store_quantized(xp, state[name], value)
                        else:
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
