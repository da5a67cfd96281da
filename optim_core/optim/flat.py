"""Flat multi-tensor storage: one contiguous buffer per param group and dtype.

With ``flat=True`` an optimizer copies its parameters once into one 1-D buffer per
(param group, dtype) and hands back views into it (:attr:`Optimizer.params`); its
state buffers and a gradient buffer are laid out the same way. A step then runs the
update rule on each whole buffer: one kernel launch for a group of hundreds of
tensors instead of one per tensor.

Gradients arrive in either of two ways:

* written in place into :attr:`Optimizer.grad_views` (views into the gradient buffer)
  and passed back to ``step``: no copy at all;
* as any arrays of the right shapes: each is copied once into the gradient buffer.

Only libraries whose slices and reshapes of contiguous arrays are views qualify
(NumPy, CuPy, torch): the user's views and the buffers must be the same memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import _namespace as ns
from ..backends._generic import state_dtype

__all__ = ["FlatStorage", "Segment"]

#: Libraries where a slice of a contiguous 1-D array, reshaped, is a view of it.
_VIEW_LIBRARIES = ("numpy", "cupy", "torch")


@dataclass
class Segment:
    """The parameters of one group and one dtype, in one buffer.

    Attributes
    ----------
    indices : list of int
        Positions, within the group, of the parameters stored here.
    param, grad : array
        The 1-D buffers.
    states : dict
        State name -> 1-D buffer, for the states allocated so far.
    spans : list of (start, stop, shape)
        Where each parameter lives in the buffers.
    """

    indices: list[int]
    param: Any
    grad: Any
    spans: list[tuple[int, int, tuple[int, ...]]]
    param_views: list[Any]
    grad_views: list[Any]
    states: dict[str, Any] = field(default_factory=dict)


class FlatStorage:
    """The flat buffers of every param group; see the module docstring.

    Parameters
    ----------
    xp : module
        The parameters' namespace.
    library : str
        Backend name ("numpy", "cupy", "torch"...), to refuse libraries without views.
    groups : list of dict
        The optimizer's param groups; each ``group["params"]`` is replaced by views
        into the new buffers, holding the same values.
    """

    def __init__(self, xp: Any, library: str, groups: list[dict[str, Any]]) -> None:
        if library not in _VIEW_LIBRARIES:
            raise ValueError("flat=True needs arrays whose slices are views "
                             f"({', '.join(_VIEW_LIBRARIES)}); got {library} arrays")
        self._xp = xp
        self.segments: list[list[Segment]] = []
        for group in groups:
            params = group["params"]
            by_dtype: dict[Any, list[int]] = {}
            for i, param in enumerate(params):
                by_dtype.setdefault(param.dtype, []).append(i)
            segments = []
            views: list[Any] = [None] * len(params)
            for dtype, indices in by_dtype.items():
                segment = self._segment(params, dtype, indices)
                for i, view in zip(indices, segment.param_views, strict=True):
                    view[...] = params[i]
                    views[i] = view
                segments.append(segment)
            self.segments.append(segments)
            group["params"] = views
        self._grouped_grad_views = [self.grad_views(i, len(g["params"]))
                                    for i, g in enumerate(groups)]
        self._all_grad_views = [v for views in self._grouped_grad_views for v in views]
        self._names = [n for g in groups for n in g["names"]]

    # ----------------------------------------------------------------- layout
    def _segment(self, params: list[Any], dtype: Any, indices: list[int]) -> Segment:
        xp = self._xp
        device = ns.device_of(params[indices[0]])
        spans, offset = [], 0
        for i in indices:
            shape = tuple(params[i].shape)
            size = math.prod(shape)
            spans.append((offset, offset + size, shape))
            offset += size
        param = xp.empty((offset,), dtype=dtype, device=device)
        grad = xp.zeros((offset,), dtype=dtype, device=device)
        return Segment(indices, param, grad, spans,
                       param_views=[self._view(param, *span) for span in spans],
                       grad_views=[self._view(grad, *span) for span in spans])

    def _view(self, buffer: Any, start: int, stop: int, shape: tuple[int, ...]) -> Any:
        return self._xp.reshape(buffer[start:stop], shape)

    def grad_views(self, group_index: int, count: int) -> list[Any]:
        """The gradient views of one group, in parameter order."""
        views: list[Any] = [None] * count
        for segment in self.segments[group_index]:
            for i, view in zip(segment.indices, segment.grad_views, strict=True):
                views[i] = view
        return views

    def own_grad_views(self, grads: Any, keyed: bool) -> list[list[Any]] | None:
        """``grads`` grouped per param group if it holds exactly this storage's gradient
        views (a dict by parameter name if ``keyed``, else a list), else None."""
        if keyed != isinstance(grads, Mapping):
            return None
        if keyed:
            if len(grads) != len(self._names):
                return None
            given = [grads.get(name) for name in self._names]
        elif isinstance(grads, (list, tuple)) and len(grads) == len(self._all_grad_views):
            given = grads
        else:
            return None
        if all(a is b for a, b in zip(given, self._all_grad_views, strict=True)):
            return self._grouped_grad_views
        return None

    # ----------------------------------------------------------------- state
    def new_states(self, group_index: int, fills: Mapping[str, Any]) -> list[dict[str, Any]]:
        """New flat buffers for each state in ``fills`` (name -> initial value), one dict per
        segment of the group, not yet installed (:meth:`install` does, once the step has
        run)."""
        xp = self._xp
        return [{name: xp.full(segment.param.shape, value, dtype=state_dtype(segment.param.dtype),
                               device=ns.device_of(segment.param))
                 for name, value in fills.items()} for segment in self.segments[group_index]]

    def install(self, group_index: int, states: list[dict[str, Any]],
                buffers: list[dict[str, Any]]) -> None:
        """Make :meth:`new_states`' buffers the group's, with views into ``states``."""
        for segment, new in zip(self.segments[group_index], buffers, strict=True):
            for name, buffer in new.items():
                segment.states[name] = buffer
                for i, span in zip(segment.indices, segment.spans, strict=True):
                    states[i][name] = self._view(buffer, *span)

    def adopt(self, state: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        """Move restored per-parameter state into new flat buffers; return the views.

        Raises ValueError, changing nothing, if parameters sharing a buffer do not
        all have the same states (a flat state buffer covers all of them or none).
        """
        xp = self._xp
        plans = []
        for group_index, group_state in enumerate(state):
            for segment in self.segments[group_index]:
                names = [set(group_state[i]) for i in segment.indices]
                if any(n != names[0] for n in names):
                    raise ValueError("with flat=True, every parameter of a group and dtype must "
                                     "have the same state entries")
                # The saved order, so state_dict() after a reload lists states as before.
                plans.append((group_index, segment, list(group_state[segment.indices[0]])))
        adopted = [[{} for _ in group_state] for group_state in state]
        new_buffers = []
        for group_index, segment, names in plans:
            buffers = {}
            for name in names:
                buffer = xp.empty(segment.param.shape, dtype=state_dtype(segment.param.dtype),
                                  device=ns.device_of(segment.param))
                for i, span in zip(segment.indices, segment.spans, strict=True):
                    view = self._view(buffer, *span)
                    view[...] = state[group_index][i][name]
                    adopted[group_index][i][name] = view
                buffers[name] = buffer
            new_buffers.append((segment, buffers))
        for segment, buffers in new_buffers:
            segment.states = buffers
        return adopted

    # ----------------------------------------------------------------- step
    def check_params(self, groups: list[dict[str, Any]]) -> None:
        """ValueError if a group's ``params`` no longer holds this storage's views."""
        for group, segments in zip(groups, self.segments, strict=True):
            params = group["params"]
            for segment in segments:
                for i, view in zip(segment.indices, segment.param_views, strict=True):
                    if params[i] is not view:
                        raise ValueError(
                            f"parameter {group['names'][i]!r} was replaced in param_groups; "
                            "with flat=True the optimizer steps its own buffer: write new "
                            "values into optimizer.params instead")

    def buffers(self, group_index: int) -> tuple[list, list, list]:
        """(params, grads, states) of one group as whole buffers, one entry per dtype."""
        segments = self.segments[group_index]
        return ([segment.param for segment in segments], [segment.grad for segment in segments],
                [segment.states for segment in segments])

    def copy_grads(self, group_index: int, grads: list[Any]) -> None:
        """Copy into the gradient buffer each gradient that is not already the group's own
        gradient view (the step's first write)."""
        if grads is self._grouped_grad_views[group_index]:
            return
        for segment in self.segments[group_index]:
            for i, view in zip(segment.indices, segment.grad_views, strict=True):
                if grads[i] is not view:
                    view[...] = grads[i]
