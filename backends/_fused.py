"""What the fused implementations share: which tensors a kernel takes, with which kernel.

A fused implementation (:mod:`._numba`, :mod:`._cuda`) compiles one kernel per
specialization of a rule (see :mod:`._lowering`) and dtype, and launches it however
its library does. The walk over a step's tensors is the same for all of them and is
written here once: each tensor's arrays in the kernel's order, the generic path for
the tensors a kernel cannot take, and each specialization's kernels and hoisted
values looked up once per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ._generic import GENERIC

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["FusedImplementation"]


class FusedImplementation:
    """Base of the fused implementations.

    Subclasses define :meth:`kernel_for` (the compiled kernels of a specialization and
    its hoisted values), :meth:`fusable` (whether a kernel takes these arrays as they
    are) and ``step``, which launches what :meth:`fused_tensors` yields.

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

    def kernel_for(self, rule: UpdateRule, scalars: dict[str, Any], present: frozenset[str],
                   dtype: np.dtype) -> tuple[Any, list[float]]:
        """The compiled kernels of this step's specialization and the hoisted values."""
        raise NotImplementedError

    def fusable(self, arrays: list[Any]) -> bool:
        """Whether a kernel takes ``arrays`` (param, grad, states) as they are."""
        raise NotImplementedError

    def fused_tensors(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
                      states: list[dict[str, Any]], scalars: dict[str, Any]
                      ) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        """``(kernels, hoisted values, arrays)`` of each non-empty tensor a kernel takes.

        The arrays are the parameter, the gradient and the states present, in the
        kernel's order; the hoisted values are typed to the parameter's dtype. A tensor
        no kernel takes is stepped by the generic path here, in its turn.
        """
        prepared: dict[tuple, tuple] = {}
        names_by_keys: dict[tuple, list[str]] = {}
        for param, grad, state in zip(params, grads, states, strict=True):
            keys = tuple(state)
            names = names_by_keys.get(keys)
            if names is None:
                names = names_by_keys[keys] = [n for n in rule.states if n in state]
            arrays = [param, grad, *[state[n] for n in names]]
            if not self.fusable(arrays):
                GENERIC.step(rule, xp, [param], [grad], [state], scalars)
                continue
            if not param.size:
                continue
            dtype = np.dtype(param.dtype)
            entry = prepared.get((keys, dtype))
            if entry is None:
                kernels, hoisted = self.kernel_for(rule, scalars, frozenset(names), dtype)
                entry = prepared[keys, dtype] = (kernels, [dtype.type(h) for h in hoisted])
            yield entry[0], entry[1], arrays
