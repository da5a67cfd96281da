"""The generic implementation: an update rule run with array API calls, on any namespace.

It allocates temporaries for each operation (it is written for portability, not
speed); the fused implementations beside it are the fast path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from optim_core import _namespace as ns

from ._operations import generic_operations

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule


class GenericImplementation:
    """Runs a rule with the standard functions of the parameters' namespace."""

    name = "generic"

    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states``; return the (possibly new) parameter arrays."""
        update = rule.bind(generic_operations(xp))
        out = []
        for param, grad, state in zip(params, grads, states):
            given = [state.get(name) for name in rule.states]
            compute = _compute_dtype(xp, param.dtype)
            if compute is None:
                new_param, *new_states = update(param, grad, *given, **scalars)
            else:
                given = [None if s is None else xp.astype(s, compute) for s in given]
                new_param, *new_states = update(xp.astype(param, compute),
                                                xp.astype(grad, compute), *given, **scalars)
            param = _store(xp, param, new_param)
            for name, value, before in zip(rule.states, new_states, given):
                if name in state and value is not before:
                    state[name] = _store(xp, state[name], value)
            out.append(param)
        return out


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
