r"""One training step as a chain of small gradient transforms, in the spirit of optax's ``chain``.

:func:`~optim_core.fit` computes a batch's gradients ``g`` and hands them to
:func:`training_step`'s chain, which runs, in this order, only the transforms the run
asks for:

1. :class:`AddL2`: :math:`g \leftarrow g + \lambda_2 W` (the gradient of the penalty
   :math:`\tfrac{\lambda_2}{2}\lVert W\rVert^2`);
2. :class:`ClipByValue`: each element into :math:`[-c, c]`;
3. :class:`ClipByGlobalNorm`: :math:`g \leftarrow g \min(1, c / (\lVert g\rVert + 10^{-6}))`;
4. :class:`DecoupledDecay`: :math:`W \leftarrow (1 - \gamma\lambda) W` with the group's
   current learning rate :math:`\gamma` (Loshchilov & Hutter, ICLR 2019), for optimizers
   that do not apply decoupled decay themselves;
5. :class:`OptimizerStep`: the optimizer's own update;
6. :class:`L1Proximal`: the soft threshold :math:`W \leftarrow \mathrm{sign}(W)
   \max(|W| - \gamma\lambda_1, 0)` (ISTA: Daubechies, Defrise & De Mol, 2004), after a
   step that was taken.

With a mask source (a callback with ``step_masks``, such as
:class:`~optim_core.pruning.MagnitudePruning`), :class:`MaskGradients` comes first,
:math:`g \leftarrow g \odot M` (so penalties, clipping and the optimizer see the masked
network's gradient), and :class:`ApplyMasks` last, :math:`W \leftarrow W \odot M` and
every optimizer state buffer :math:`s \leftarrow s \odot M`, so a pruned weight is exactly
zero after every step whatever the optimizer, its momentum or its weight decay does.

Penalties and decay touch the weights the model names (``Model.regularized``), never the
biases. Everything a transform needs that does not change between steps (which
parameters, in which group, the namespace) is prepared when the chain is built; a step
does no lookups, checks or copies beyond its arithmetic.

:class:`TrainedParams` owns the parameters of the run: one dict of arrays, which is the
model's ``params`` and whose arrays are the optimizer's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .. import _namespace as ns
from .regularization import add_l2_gradient, clip_by_global_norm, clip_by_value, soft_threshold

__all__ = ["TrainedParams", "Chain", "chain", "AddL2", "ClipByValue", "ClipByGlobalNorm",
           "DecoupledDecay", "OptimizerStep", "L1Proximal", "MaskGradients", "ApplyMasks",
           "training_step"]

Grads = dict[str, Any]


class TrainedParams:
    """The arrays a run trains, owned in one place.

    :attr:`arrays` (name -> array) is the model's ``params`` dict, and its arrays are
    the optimizer's own (with ``flat=True``, views into the optimizer's buffer, adopted
    by the model once, here). Libraries that update arrays in place (NumPy, CuPy,
    torch) never replace one, so nothing is copied or re-synchronized between the two
    per step; immutable ones (JAX) get new arrays from every write, which
    :meth:`write` and :meth:`pull` put into both.

    Parameters
    ----------
    model : Model
    optimizer : Optimizer
        Built on the model's parameters (as a dict, so gradients match by name).
    """

    def __init__(self, model: Any, optimizer: Any) -> None:
        model.params = optimizer.params
        self.arrays: dict[str, Any] = model.params
        self.optimizer = optimizer
        self.xp = ns.namespace_of(next(iter(self.arrays.values())))
        self.in_place = all(ns.is_writeable(a) for a in self.arrays.values())
        # The names of each param group, in the optimizer's order: its own (the model's
        # order may differ, Muon puts the matrices in a group of their own).
        self.group_names = [list(group["names"]) for group in optimizer.param_groups]

    def regularized_by_group(self, names: Iterable[str]) -> list[tuple[int, list[str]]]:
        """``(group index, the group's parameters among names)`` for groups that have any."""
        chosen = set(names)
        return [(i, [n for n in group if n in chosen])
                for i, group in enumerate(self.group_names) if chosen.intersection(group)]

    def lr(self, group: int) -> float:
        """The current learning rate of param group ``group``."""
        return float(self.optimizer.param_groups[group]["lr"])

    def write(self, group: int, names: Sequence[str], values: Sequence[Any]) -> None:
        """Store ``values`` as the parameters ``names`` of param group ``group``.

        In place where the library allows it; otherwise as new arrays of the same dtype,
        in :attr:`arrays` and in the optimizer's group.
        """
        arrays = self.arrays
        if self.in_place:
            for name, value in zip(names, values, strict=True):
                arrays[name][...] = value
            return
        for name, value in zip(names, values, strict=True):
            arrays[name] = self.xp.asarray(value, dtype=arrays[name].dtype)
        self.optimizer.param_groups[group]["params"] = [arrays[n]
                                                        for n in self.group_names[group]]

    def pull(self) -> None:
        """After a step of an immutable library, take the optimizer's new arrays."""
        if not self.in_place:
            self.arrays.update(self.optimizer.params)

    def reattach(self, params: Mapping[str, Any]) -> None:
        """Point the optimizer at ``params`` (the model's, after a callback replaced some)."""
        for i, names in enumerate(self.group_names):
            group = self.optimizer.param_groups[i]
            if any(a is not params[n] for a, n in zip(group["params"], names, strict=True)):
                group["params"] = [params[n] for n in names]


class Chain:
    """Transforms applied in order: ``grads = t(grads)`` for each ``t``."""

    def __init__(self, transforms: Iterable[Callable[[Grads], Grads]]) -> None:
        self.transforms = tuple(transforms)

    def __call__(self, grads: Grads) -> Grads:
        for transform in self.transforms:
            grads = transform(grads)
        return grads

    def __repr__(self) -> str:
        return f"chain({', '.join(type(t).__name__ for t in self.transforms)})"


def chain(*transforms: Callable[[Grads], Grads]) -> Chain:
    """One transform running ``transforms`` in order (as ``optax.chain``)."""
    return Chain(transforms)


class AddL2:
    r""":math:`g_W \leftarrow g_W + \lambda_2 W` for the parameters ``names``.

    Parameters
    ----------
    l2 : float
        :math:`\lambda_2` of the penalty :math:`\tfrac{\lambda_2}{2}\lVert W\rVert^2`.
    params : TrainedParams
    names : iterable of str
    """

    def __init__(self, l2: float, params: TrainedParams, names: Iterable[str]) -> None:
        self.l2, self.params, self.names = l2, params, frozenset(names)

    def __call__(self, grads: Grads) -> Grads:
        return add_l2_gradient(grads, self.params.arrays, self.l2, self.names)


class ClipByValue:
    r""":math:`g \leftarrow \min(\max(g, -c), c)` elementwise
    (:func:`~optim_core.regularization.clip_by_value`)."""

    def __init__(self, clip_value: float, xp: Any) -> None:
        self.clip_value, self.xp = clip_value, xp

    def __call__(self, grads: Grads) -> Grads:
        return clip_by_value(grads, self.clip_value, xp=self.xp)


class ClipByGlobalNorm:
    r""":math:`g \leftarrow g \min(1, c / (\lVert g\rVert_2 + 10^{-6}))` over all gradients
    together, as ``torch.nn.utils.clip_grad_norm_``
    (:func:`~optim_core.regularization.clip_by_global_norm`)."""

    def __init__(self, max_norm: float, xp: Any) -> None:
        self.max_norm, self.xp = max_norm, xp

    def __call__(self, grads: Grads) -> Grads:
        return clip_by_global_norm(grads, self.max_norm, xp=self.xp)[0]


class DecoupledDecay:
    r""":math:`W \leftarrow (1 - \gamma\lambda) W` before the step, :math:`\gamma` the
    group's current learning rate (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019). Gradients pass unchanged.

    Parameters
    ----------
    weight_decay : float
        :math:`\lambda`.
    params : TrainedParams
    names : iterable of str
        The parameters decayed (the weights).
    """

    def __init__(self, weight_decay: float, params: TrainedParams,
                 names: Iterable[str]) -> None:
        self.weight_decay, self.params = weight_decay, params
        self.groups = params.regularized_by_group(names)

    def __call__(self, grads: Grads) -> Grads:
        params, arrays = self.params, self.params.arrays
        for group, names in self.groups:
            factor = 1.0 - params.lr(group) * self.weight_decay
            if factor != 1:
                params.write(group, names, [arrays[name] * factor for name in names])
        return grads


class OptimizerStep:
    """The optimizer's update with the gradients; records whether the step was taken.

    A step the optimizer skips (``nonfinite="skip"``) leaves :attr:`taken` False.
    """

    def __init__(self, params: TrainedParams) -> None:
        self.params, self.optimizer = params, params.optimizer
        self.taken = False

    def __call__(self, grads: Grads) -> Grads:
        optimizer = self.optimizer
        skipped = optimizer.skipped_steps
        optimizer.step(grads)
        self.taken = optimizer.skipped_steps == skipped
        self.params.pull()
        return grads


class L1Proximal:
    r"""The proximal step of :math:`\lambda_1\lVert W\rVert_1` after a step that was taken:
    :math:`W \leftarrow \mathrm{sign}(W)\max(|W| - \gamma\lambda_1, 0)`, which makes small
    weights exactly zero (ISTA; Daubechies, Defrise & De Mol, 2004).

    Parameters
    ----------
    l1 : float
        :math:`\lambda_1`.
    params : TrainedParams
    names : iterable of str
    step : OptimizerStep
        The step it follows (nothing is thresholded after a skipped step).
    """

    def __init__(self, l1: float, params: TrainedParams, names: Iterable[str],
                 step: OptimizerStep) -> None:
        self.l1, self.params, self.step = l1, params, step
        self.groups = params.regularized_by_group(names)

    def __call__(self, grads: Grads) -> Grads:
        if not self.step.taken:
            return grads
        params, arrays, xp = self.params, self.params.arrays, self.params.xp
        for group, names in self.groups:
            threshold = params.lr(group) * self.l1
            if threshold != 0:
                params.write(group, names,
                             [soft_threshold(arrays[name], threshold, xp=xp) for name in names])
        return grads


def _multiply(array: Any, keep: Any) -> Any:
    """``array * keep``, in place where the library allows it (no temporary then)."""
    if ns.is_writeable(array):
        array *= keep
        return array
    return array * keep


class MaskGradients:
    r""":math:`g_W \leftarrow g_W \odot M_W` for every masked parameter, first in the chain.

    The masks come from ``source.step_masks(params)``, asked once per step: it returns
    the masks of the step (name -> array of 0 and 1 in the parameter's dtype, empty for
    none) and may change them first (a pruning event; it then writes the masked
    parameters itself). :class:`ApplyMasks` reuses them after the step.

    Parameters
    ----------
    source : object with ``step_masks(params)``
        E.g. :class:`~optim_core.pruning.MagnitudePruning`.
    params : TrainedParams
    """

    def __init__(self, source: Any, params: TrainedParams) -> None:
        self.source, self.params = source, params
        self.masks: Mapping[str, Any] = {}

    def __call__(self, grads: Grads) -> Grads:
        self.masks = masks = self.source.step_masks(self.params)
        for name, keep in masks.items():
            grads[name] = _multiply(grads[name], keep)
        return grads


class ApplyMasks:
    r"""After the step: :math:`W \leftarrow W \odot M_W`, and :math:`s \leftarrow s \odot M_W`
    for every state buffer :math:`s` the optimizer keeps for :math:`W` (momentum, moment
    estimates...), so masked weights stay exactly zero and carry no state into later
    steps. Last in the chain.

    Parameters
    ----------
    gradients : MaskGradients
        The transform that fetched this step's masks.
    params : TrainedParams
    """

    def __init__(self, gradients: MaskGradients, params: TrainedParams) -> None:
        self.gradients, self.params = gradients, params
        # name -> (param group, position in it): where the optimizer keeps its state.
        self.where = {name: (group, index) for group, names in enumerate(params.group_names)
                      for index, name in enumerate(names)}

    def __call__(self, grads: Grads) -> Grads:
        masks = self.gradients.masks
        if not masks:
            return grads
        params, arrays = self.params, self.params.arrays
        optimizer = params.optimizer
        for name, keep in masks.items():
            group, index = self.where[name]
            if params.in_place:
                arrays[name] *= keep
            else:
                params.write(group, [name], [arrays[name] * keep])
            state = optimizer.state[group][index]
            shape = tuple(arrays[name].shape)
            for key, buffer in state.items():
                if tuple(getattr(buffer, "shape", ())) == shape:
                    state[key] = _multiply(buffer, keep)
        return grads


def training_step(params: TrainedParams, regularized: Iterable[str], *, l2: float = 0.0,
                  clip_value: float | None = None, clip_norm: float | None = None,
                  weight_decay: float | None = None, l1: float = 0.0,
                  masks: Sequence[Any] = ()) -> Chain:
    """The chain of one training step: only the transforms these settings need.

    ``weight_decay`` is applied here only for optimizers whose ``weight_decay_kind``
    is neither "decoupled" nor "switchable" (the others were given it; see
    :func:`~optim_core.train.fit.make_optimizer`). Each of ``masks`` (objects with
    ``step_masks``) adds a :class:`MaskGradients` at the start and an
    :class:`ApplyMasks` at the end.
    """
    regularized = tuple(regularized)
    transforms: list[Callable[[Grads], Grads]] = []
    maskers = [MaskGradients(source, params) for source in masks]
    transforms.extend(maskers)
    if l2:
        transforms.append(AddL2(l2, params, regularized))
    if clip_value is not None:
        transforms.append(ClipByValue(clip_value, params.xp))
    if clip_norm is not None:
        transforms.append(ClipByGlobalNorm(clip_norm, params.xp))
    if weight_decay and params.optimizer.weight_decay_kind not in ("decoupled", "switchable"):
        transforms.append(DecoupledDecay(weight_decay, params, regularized))
    step = OptimizerStep(params)
    transforms.append(step)
    if l1:
        transforms.append(L1Proximal(l1, params, regularized, step))
    transforms.extend(ApplyMasks(masker, params) for masker in maskers)
    return Chain(transforms)
