"""The generic implementation: an update rule run with array API calls, on any namespace.

It allocates temporaries for each operation (it is written for portability, not
speed); the fused implementations in :mod:`optim_core.backends` are the fast path.
"""

from __future__ import annotations

from typing import Any

from . import _namespace as ns
from .rule import UpdateRule, generic_operations


class GenericImplementation:
    """Runs a rule with the standard functions of the parameters' namespace."""

    name = "generic"

    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any]) -> list[Any]:
        """Update ``params`` and ``states``; return the (possibly new) parameter arrays."""
        update = rule.bind(generic_operations(xp))
        out = []
        for param, grad, state in zip(params, grads, states):
            new_param, *new_states = update(
                param, grad, *(state.get(name) for name in rule.states), **scalars)
            param = _store(xp, param, new_param)
            for name, value in zip(rule.states, new_states):
                if name in state and value is not state[name]:
                    state[name] = _store(xp, state[name], value)
            out.append(param)
        return out


def _store(xp: Any, target: Any, value: Any) -> Any:
    if ns.is_writeable(target):
        target[...] = value
        return target
    return xp.asarray(value, dtype=target.dtype)


GENERIC = GenericImplementation()
