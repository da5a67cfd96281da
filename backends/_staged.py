"""The fused path of rules with matrix operations: elementwise stages as generated kernels,
the matrix operations between them through the array library's own ``matmul``.

A rule that calls a matrix operation (Muon's ``orthogonalize``) is cut by
:func:`~._lowering.lower_stages` into elementwise stages. For each tensor a step runs
stage 0's kernel (numba on NumPy, CUDA on CuPy: the same emitters as every other rule),
which writes the operation's operand to a temporary; the operation itself
(:func:`~._operations.orthogonalize`, BLAS on NumPy, cuBLAS on CuPy, the very function
the generic path calls); then stage 1's kernel, which reads its result; and so on.
A group whose branches call no matrix operation (Muon's AdamW groups) is handed to
the elementwise implementation whole, in its usual few launches.

Matrix operations need their own temporaries (a Newton-Schulz step makes Gram
matrices and products of the tensor's size), as torch's do; the elementwise stages add
one array of the tensor's size for each operand, allocated per tensor and dropped after
it. No value is read back to the host: the norm Newton-Schulz divides by stays on the
device.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from ._fused import FusedImplementation
from ._generic import GENERIC, PreparedStep, TensorMismatch, checked_state_names
from ._lowering import StagedKernel, lower_stages
from ._operations import orthogonalize

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["StagedImplementation", "MATRIX_FUNCTIONS"]

#: The meaning of each matrix operation, ``function(xp, operand, *scalars)``: the one the
#: generic path binds (:func:`~._operations.generic_operations`).
MATRIX_FUNCTIONS = {"orthogonalize": orthogonalize}


class StagedImplementation:
    """Runs a rule with matrix operations on ``elementwise``'s kernels and the library's
    ``matmul``.

    Parameters
    ----------
    elementwise : FusedImplementation
        The numba or CUDA implementation whose emitter compiles the stages.

    Attributes
    ----------
    compiled : dict
        ``(rule name, key, dtype) -> (StagedKernel, compiled stages)``.
    """

    def __init__(self, elementwise: FusedImplementation) -> None:
        self.elementwise = elementwise
        self.name = f"staged-{elementwise.name}"
        self.compiled: dict[tuple, tuple[StagedKernel, list[Any]]] = {}

    @property
    def launches(self) -> int:
        """Kernel launches made by the elementwise implementation (stages included)."""
        return self.elementwise.launches

    def step(self, rule: UpdateRule, xp: Any, params: list[Any], grads: list[Any],
             states: list[dict[str, Any]], scalars: dict[str, Any],
             tensor_scalars: Sequence[dict[str, Any]] | None = None) -> list[Any]:
        """Update ``params`` and ``states`` in place; return the parameters."""
        return self.prepare(rule, xp, params, grads, states, scalars,
                            tensor_scalars=tensor_scalars).run()

    def staged(self, rule: UpdateRule, scalars: dict[str, Any], present: frozenset[str],
               dtype: np.dtype) -> tuple[StagedKernel, list[Any], list]:
        """This step's stages (compiled on first use) and hoisted values for one tensor."""
        key, hoisted, _ = lower_stages(rule, scalars, present, build=False)
        cache_key = (rule.name, key, dtype.name)
        entry = self.compiled.get(cache_key)
        if entry is None:
            _, _, staged = lower_stages(rule, scalars, present)
            kernels = [self.elementwise.compile_kernel(k, dtype) for k in staged.stages] \
                if staged.matrix else []
            entry = self.compiled[cache_key] = (staged, kernels)
        return entry[0], entry[1], hoisted

    def prepare(self, rule: UpdateRule, xp: Any, params: Sequence[Any], grads: Sequence[Any],
                states: Sequence[dict[str, Any]], scalars: dict[str, Any],
                cache: dict | None = None, rounding: Any = None,
                tensor_scalars: Sequence[dict[str, Any]] | None = None) -> PreparedStep:
        """Check every tensor and compile its stages; write nothing.

        ``rounding`` (16-bit parameters, which take the generic path) and
        ``tensor_scalars`` as for :meth:`FusedImplementation.prepare`.

        Raises
        ------
        TensorMismatch
            If a tensor's arrays disagree; nothing has been written.
        """
        elementwise = self.elementwise
        own = [dict(tensor_scalars[i]) if tensor_scalars is not None else {}
               for i in range(len(params))]
        if params:
            names = tuple(n for n in rule.states if n in states[0])
            first, _, _ = self.staged(rule, {**scalars, **own[0]}, frozenset(names),
                                      np.dtype(params[0].dtype))
            if not first.matrix:  # no matrix operation under these hyperparameters
                return elementwise.prepare(rule, xp, params, grads, states, scalars,
                                           cache=cache, rounding=rounding,
                                           tensor_scalars=tensor_scalars)
        tasks, generic = [], []
        expected = None
        for index, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
            names = expected = checked_state_names(rule, index, param, state, expected)
            if grad.size != param.size:
                raise TensorMismatch(index, f"the gradient has {grad.size} elements, the "
                                            f"parameter {param.size}")
            arrays = [param, *(state[n] for n in names)]
            dtype = np.dtype(param.dtype)
            if not (elementwise.fusable(arrays)
                    and elementwise.grad_fusable(grad, SimpleNamespace(dtype=dtype))):
                generic.append(index)
                continue
            if not param.size:
                continue
            staged, kernels, hoisted = self.staged(rule, {**scalars, **own[index]},
                                                   frozenset(names), dtype)
            large = param.size >= elementwise.large_size
            for kernel, compiled in zip(staged.stages, kernels):
                elementwise.ready(compiled, dtype, len(kernel.arrays), staged.n_hoisted,
                                  not large, large)
            tasks.append((index, staged, kernels, hoisted, dtype))

        def run() -> list[Any]:
            if generic:
                GENERIC._run(rule, xp, [params[i] for i in generic], [grads[i] for i in generic],
                             [states[i] for i in generic], scalars, rounding, generic,
                             tensor_scalars=[own[i] for i in generic])
            for index, staged, kernels, hoisted, dtype in tasks:
                self._run_tensor(xp, staged, kernels, hoisted, dtype, params[index],
                                 grads[index], states[index])
            return params if isinstance(params, list) else list(params)

        return PreparedStep(run)

    def _run_tensor(self, xp: Any, staged: StagedKernel, kernels: list[Any], hoisted: list,
                    dtype: np.dtype, param: Any, grad: Any, state: dict[str, Any]) -> None:
        """One tensor: each stage's kernel, each matrix operation between two."""
        flat = self.elementwise.kernel_array
        shape = tuple(param.shape)
        typed = [dtype.type(h) for h in hoisted]
        arrays = {"param": flat(param), "grad": flat(grad),
                  **{name: flat(array) for name, array in state.items()}}
        for name in staged.temporaries:
            arrays[name] = flat(xp.empty_like(param))
        for index, (kernel, compiled) in enumerate(zip(staged.stages, kernels, strict=True)):
            self.elementwise.launch([(compiled, typed, tuple(arrays[a] for a in kernel.arrays))])
            if index < len(staged.matrix):
                step = staged.matrix[index]
                operand = xp.reshape(arrays[step.source], shape)
                result = MATRIX_FUNCTIONS[step.operation](
                    xp, operand, *(hoisted[i] for i in step.arguments))
                # C order, the parameter's dtype, as the next stage's kernel takes it.
                result = xp.astype(result, param.dtype, copy=False)
                arrays[step.target] = flat(xp.reshape(result, (-1,)))
                del arrays[step.source]
