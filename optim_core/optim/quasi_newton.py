r"""L-BFGS, a quasi-Newton method driven by a closure, on any array API namespace.

L-BFGS is not an elementwise rule: each iteration takes dot products over all
parameters, a two-loop recursion over a history of steps and, optionally, a line
search that evaluates the objective several times. So it is not an
:class:`~optim_core.Optimizer` (whose step is one rule applied tensor by tensor) but a
class of its own with the same conventions: parameters given as a list or dict of
arrays of one library, a checked param group, :meth:`LBFGS.state_dict` and
:meth:`LBFGS.load_state_dict`. It is not in the optimizer registry: :func:`optim_core.fit`
and the command line step with gradients, L-BFGS needs a closure.

Everything follows ``torch.optim.LBFGS`` (2.13), operation for operation, so float64
trajectories agree with it to rounding: the same flat layout of the parameters (their
elements concatenated in order), the same two-loop recursion, the same step-length
guesses and stopping tests, and the same strong-Wolfe line search (More & Thuente's
bracketing and zoom with cubic interpolation, ported from minFunc as torch did). The
vector work uses the parameters' namespace (``concat``, ``vecdot``, ``abs``, ``max``,
``sum``); the host reads a scalar only where the algorithm branches on one, where
torch's implementation synchronizes too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .. import _checks
from .. import _namespace as ns
from ..backends._generic import _no_autograd
from .base import STATE_DICT_VERSION, _check_grad_kind, _check_param, _parse_params, _sequence
from .memory import check_no_overlap
from .param_group import STRUCTURE_KEYS, GroupSchema, Hyperparameter, ParamGroup

__all__ = ["LBFGS"]

_LINE_SEARCHES = (None, "strong_wolfe")


def _positive_integer(name: str, value: Any) -> int:
    return _checks.integer(name, value, minimum=1)


def _nonnegative(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0)


def _line_search(name: str, value: Any) -> str | None:
    return _checks.choice(name, value, _LINE_SEARCHES)


class LBFGS:
    r"""L-BFGS (Liu & Nocedal, "On the limited memory BFGS method for large scale
    optimization", Math. Programming 45, 1989), as ``torch.optim.LBFGS``.

    Each :meth:`step` runs up to ``max_iter`` iterations of

    .. math::

        d_k &= -H_k g_k \quad\text{(two-loop recursion over the last
                \texttt{history\_size} pairs } s_i = t_i d_i,\ y_i = g_{i+1} - g_i
                \text{ with } y_i^\top s_i > 10^{-10}) \\
        H_k^0 &= \frac{y^\top s}{y^\top y}\ \text{(the newest pair)} \\
        \theta_{k+1} &= \theta_k + t_k d_k

    with :math:`t_k` = ``lr`` (the very first iteration:
    :math:`\min(1, 1/\lVert g\rVert_1)\,\text{lr}`), or the step a strong-Wolfe line
    search finds from there (:math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`, at most
    ``max_eval`` evaluations in the step). It stops early when
    :math:`\max|g| \le` ``tolerance_grad``, when :math:`g^\top d > -`
    ``tolerance_change``, when :math:`\max|t d|` or the change of the loss is below
    ``tolerance_change``, or after ``max_eval`` evaluations.

    Parameters
    ----------
    params : list or dict of arrays
        The arrays to optimize, of one array API library and device (one param group,
        as torch allows for L-BFGS).
    lr : float, default 1
    max_iter : int, default 20
        Iterations per :meth:`step`.
    max_eval : int, optional
        Evaluations of the closure per :meth:`step`; default ``max_iter * 5 // 4``.
    tolerance_grad : float, default 1e-7
    tolerance_change : float, default 1e-9
    history_size : int, default 100
    line_search_fn : {None, "strong_wolfe"}, default None

    Notes
    -----
    ``closure()`` (no arguments) evaluates the objective at the current parameters and
    returns ``(loss, grads)``: the loss (a number or a 0-d array) and the gradients in
    the parameters' structure (a list, or a dict with their names). With libraries
    whose arrays are updated in place (NumPy, CuPy, torch) the closure may read the
    arrays it was given; with immutable ones (JAX) it reads :attr:`params`, which
    always holds the current values.

    As in torch, the line search uses its own ``tolerance_change`` of ``1e-9``
    whatever the group's, and the history is kept in the parameters' namespace: it
    needs ``2 * history_size + 4`` vectors of the parameters' total size. A step that
    raises (a bad closure result) restores the parameters to their values at its start
    and leaves the state as it was.
    """

    #: Not in the registry (see the module docstring).
    cli_name: ClassVar[None] = None
    related_hyperparameters: ClassVar[frozenset[str]] = frozenset()
    hyperparameter_checks: ClassVar[Mapping[str, Hyperparameter]] = {
        "max_iter": Hyperparameter(_positive_integer),
        "max_eval": Hyperparameter(_positive_integer),
        "tolerance_grad": Hyperparameter(_nonnegative),
        "tolerance_change": Hyperparameter(_nonnegative),
        "history_size": Hyperparameter(_positive_integer),
        "line_search_fn": Hyperparameter(_line_search),
    }

    def __init__(self, params: Any, lr: float = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None) -> None:
        max_iter = _positive_integer("max_iter", max_iter)
        if max_eval is None:
            max_eval = max(max_iter * 5 // 4, 1)
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                        history_size=history_size, line_search_fn=line_search_fn)
        self._schema = GroupSchema(type(self), defaults)
        self.defaults = self._schema.check_group(defaults)
        groups, self._keyed = _parse_params(params)
        if len(groups) != 1:
            raise ValueError("LBFGS takes one param group (as torch.optim.LBFGS): pass a "
                             "list or dict of arrays")
        group = groups[0]
        if set(group) - set(STRUCTURE_KEYS):
            raise ValueError("LBFGS takes its hyperparameters as arguments, not in a group")
        arrays, names = group["params"], group["names"]
        self._xp = xp = ns.common_namespace(arrays, names)
        for name, array in zip(names, arrays, strict=True):
            _check_param(xp, name, array)
        check_no_overlap(arrays, names)
        self.param_groups: list[ParamGroup] = [
            ParamGroup(self._schema.check_group({**self.defaults, **group}), self._schema)]
        self._sizes = [math.prod(p.shape) for p in arrays]
        self._shapes = [tuple(p.shape) for p in arrays]
        self._flat_like = xp.zeros((0,), dtype=xp.result_type(*arrays),
                                   device=ns.device_of(arrays[0]))
        self.state: dict[str, Any] = {"func_evals": 0, "n_iter": 0}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- the class's checks
    @classmethod
    def check_relations(cls, group: Mapping[str, Any]) -> None:
        """L-BFGS's hyperparameters are independent of each other."""

    # ----------------------------------------------------------------- public API
    @property
    def params(self) -> list[Any] | dict[str, Any]:
        """The parameters, in the structure they were given (a list or a dict)."""
        group = self.param_groups[0]
        if self._keyed:
            return dict(zip(group["names"], group["params"], strict=True))
        return list(group["params"])

    def step(self, closure: Callable[[], tuple[Any, Any]]) -> Any:
        """Run up to ``max_iter`` L-BFGS iterations; return the loss of the first evaluation.

        Parameters
        ----------
        closure : callable
            ``closure()`` returns ``(loss, grads)`` at the current parameters (see the
            class's notes).
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        with self._lock:
            group = self.param_groups[0]
            self._check_params(group["params"])
            start = [self._copy(p) for p in group["params"]]
            try:
                return self._step(closure, group)
            except BaseException:
                self._set_params(start)
                raise

    def state_dict(self) -> dict[str, Any]:
        """A backend-neutral snapshot: NumPy arrays, Python scalars and a format version."""
        with self._lock:
            group = self.param_groups[0]
            entry = {k: v for k, v in group.items() if k not in STRUCTURE_KEYS}
            entry["params"] = list(range(len(group["params"])))
            entry["names"] = list(group["names"]) if self._keyed else None
            state = {}
            for key, value in self.state.items():
                if key in ("old_dirs", "old_stps"):
                    value = [ns.to_numpy(v) for v in value]
                elif key in ("d", "prev_flat_grad") and value is not None:
                    value = ns.to_numpy(value)
                elif key == "ro":
                    value = list(value)
                state[key] = value
            return {"format_version": STATE_DICT_VERSION, "optimizer": type(self).__name__,
                    "param_groups": [entry], "state": state}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; everything is checked before anything changes."""
        with self._lock:
            self._load_state_dict(state_dict)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({hyper})"

    # The namespace (a module) travels by name: found again from the parameters.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        del state["_xp"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        group = self.param_groups[0]
        self._xp = ns.common_namespace(group["params"], group["names"])

    # ----------------------------------------------------------------- the step
    def _step(self, closure: Callable[[], tuple[Any, Any]], group: Mapping[str, Any]) -> Any:
        lr = group["lr"]
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        history_size = group["history_size"]
        state = dict(self.state)  # this step's copy: installed only if the step succeeds

        orig_loss, flat_grad = self._evaluate(closure)
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        if self._abs_max(flat_grad) <= tolerance_grad:
            self.state = state
            return orig_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps = list(state.get("old_dirs", ())), list(state.get("old_stps", ()))
        ro, h_diag = list(state.get("ro", ())), state.get("H_diag")
        prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # The descent direction.
            if state["n_iter"] == 1:
                d = -flat_grad
                old_dirs, old_stps, ro = [], [], []
                h_diag = 1.0
            else:
                y = flat_grad - prev_flat_grad
                s = d * t
                ys = self._dot(y, s)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / self._dot(y, y)
                # The two-loop recursion, in one buffer (q and r are new arrays: updated
                # in place where the library allows, rebound where it does not).
                num_old = len(old_dirs)
                al = [0.0] * num_old
                q = -flat_grad
                for i in range(num_old - 1, -1, -1):
                    al[i] = self._dot(old_stps[i], q) * ro[i]
                    q += (-al[i]) * old_dirs[i]
                r = q * h_diag
                for i in range(num_old):
                    be_i = self._dot(old_dirs[i], r) * ro[i]
                    r += (al[i] - be_i) * old_stps[i]
                d = r

            prev_flat_grad = flat_grad
            prev_loss = loss

            # The step length.
            if state["n_iter"] == 1:
                abs_sum = self._abs_sum(flat_grad)
                t = min(1.0, 1.0 / abs_sum if abs_sum else math.inf) * lr
            else:
                t = lr
            gtd = self._dot(flat_grad, d)
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if group["line_search_fn"] == "strong_wolfe":
                x_init = [self._copy(p) for p in self.param_groups[0]["params"]]

                def obj_func(x: list[Any], t: float, d: Any) -> tuple[float, Any]:
                    return self._directional_evaluate(closure, x, t, d)

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    obj_func, self._abs_max, self._dot, x_init, t, d, loss, flat_grad, gtd,
                    max_ls=max_eval - current_evals)
                self._add_grad(t, d)
                opt_cond = self._abs_max(flat_grad) <= tolerance_grad
            else:
                self._add_grad(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    # As torch: the last iteration's point is not evaluated (in a
                    # stochastic setting the next step evaluates it anyway).
                    loss_value, flat_grad = self._evaluate(closure)
                    loss = float(loss_value)
                    opt_cond = self._abs_max(flat_grad) <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if abs(t) * self._abs_max(d) <= tolerance_change:  # max |t d|, no temporary
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                     prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
        self.state = state
        return orig_loss

    # ----------------------------------------------------------------- vector helpers
    def _dot(self, a: Any, b: Any) -> float:
        return float(self._xp.vecdot(a, b))

    def _abs_max(self, v: Any) -> float:
        if v.shape[0] == 0:
            return 0.0
        return float(self._xp.max(self._xp.abs(v)))

    def _abs_sum(self, v: Any) -> float:
        return float(self._xp.sum(self._xp.abs(v)))

    def _copy(self, x: Any) -> Any:
        detach = getattr(x, "detach", None)  # torch: a copy outside any autograd graph
        return self._xp.asarray(x if detach is None else detach(), copy=True)

    def _evaluate(self, closure: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """Call the closure; its loss and its gradients as one flat vector (checked)."""
        result = closure()
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("closure() must return a pair (loss, grads), got "
                            f"{type(result).__name__}")
        loss, grads = result
        group = self.param_groups[0]
        params, names = group["params"], group["names"]
        if self._keyed:
            if not isinstance(grads, Mapping):
                raise TypeError("params were given as a dict: the closure's grads must be a "
                                "dict too")
            missing, extra = set(names) - set(grads), set(grads) - set(names)
            if missing or extra:
                raise ValueError(f"the closure's grads keys differ from params: missing "
                                 f"{sorted(missing)}, unexpected {sorted(map(repr, extra))}")
            given = [grads[n] for n in names]
        else:
            if isinstance(grads, Mapping) or not isinstance(grads, Sequence):
                raise TypeError("params were given as a list: the closure's grads must be a "
                                "list too")
            if len(grads) != len(params):
                raise ValueError(f"the closure gave {len(grads)} grads for {len(params)} "
                                 "params")
            given = list(grads)
        xp = self._xp
        for name, grad, param, shape in zip(names, given, params, self._shapes, strict=True):
            _check_grad_kind(grad, param, name)
            if tuple(grad.shape) != shape:
                raise ValueError(f"grad of {name!r} has shape {tuple(grad.shape)}, the "
                                 f"parameter {shape}")
            if not ns.is_floating(xp, grad):
                raise TypeError(f"grad of {name!r} has dtype {grad.dtype}; gradients must be "
                                "floating point")
        # A copy (concat makes one): a closure may write its next gradients into the
        # same buffers, and the previous gradient is kept.
        flat = xp.concat([xp.reshape(g, (-1,)) for g in given])
        if flat.dtype != self._flat_like.dtype:
            flat = xp.astype(flat, self._flat_like.dtype)
        return loss, flat

    def _directional_evaluate(self, closure: Callable[[], tuple[Any, Any]], x: list[Any],
                              t: float, d: Any) -> tuple[float, Any]:
        self._add_grad(t, d)
        loss, flat_grad = self._evaluate(closure)
        self._set_params(x)
        return float(loss), flat_grad

    def _add_grad(self, step_size: float, update: Any) -> None:
        """``param += step_size * update[its slice]`` for each parameter (in place where
        the library allows; new arrays for immutable ones)."""
        xp = self._xp
        group = self.param_groups[0]
        params = group["params"]
        out, offset = [], 0
        with _no_autograd(params):
            for param, size, shape in zip(params, self._sizes, self._shapes, strict=True):
                view = xp.reshape(update[offset:offset + size], shape)
                if view.dtype != param.dtype:
                    view = xp.astype(view, param.dtype)
                if ns.is_writeable(param):
                    param += step_size * view
                    out.append(param)
                else:
                    out.append(param + step_size * view)
                offset += size
        if any(o is not p for o, p in zip(out, params, strict=True)):
            group._store_params(out)

    def _set_params(self, values: list[Any]) -> None:
        """Write ``values`` into the parameters (new arrays for immutable libraries)."""
        xp = self._xp
        group = self.param_groups[0]
        params = group["params"]
        out = []
        with _no_autograd(params):
            for param, value in zip(params, values, strict=True):
                if value.dtype != param.dtype:
                    value = xp.astype(value, param.dtype)
                if ns.is_writeable(param):
                    param[...] = value
                    out.append(param)
                else:
                    out.append(xp.asarray(value, dtype=param.dtype, copy=True))
        if any(o is not p for o, p in zip(out, params, strict=True)):
            group._store_params(out)

    def _check_params(self, params: list[Any]) -> None:
        if len(params) != len(self._shapes) or any(
                tuple(p.shape) != shape for p, shape in zip(params, self._shapes, strict=True)):
            raise ValueError("the parameters were replaced or resized after the optimizer "
                             "was made; make a new optimizer instead")

    # ----------------------------------------------------------------- state dicts
    def _load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"format_version", "optimizer", "param_groups", "state"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        if state_dict["format_version"] != STATE_DICT_VERSION:
            raise ValueError(f"unsupported state_dict format {state_dict['format_version']!r}")
        if state_dict["optimizer"] != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict['optimizer']!r}, not "
                             f"{type(self).__name__}")
        groups = _sequence(state_dict["param_groups"], "state_dict['param_groups']")
        if len(groups) != 1 or not isinstance(groups[0], Mapping):
            raise ValueError("an LBFGS state_dict has one param group")
        saved = groups[0]
        group = self.param_groups[0]
        if len(_sequence(saved.get("params", ()), "the group's params")) != len(group["params"]):
            raise ValueError(f"the state_dict's param group has {len(saved.get('params', ()))} "
                             f"params, this optimizer's {len(group['params'])}")
        hyper = {k: v for k, v in saved.items() if k not in STRUCTURE_KEYS}
        unknown = set(hyper) - self._schema.hyperparameters
        if unknown:
            raise ValueError(f"unknown hyperparameters in the state_dict: {sorted(unknown)}")
        new_group = ParamGroup(self._schema.check_group({**group, **hyper}), self._schema)
        state = self._checked_state(state_dict["state"])
        self.param_groups = [new_group]
        self.state = state

    def _checked_state(self, saved: Any) -> dict[str, Any]:
        if not isinstance(saved, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(saved).__name__}")
        known = {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
                 "prev_flat_grad", "prev_loss"}
        unknown = set(saved) - known
        if unknown:
            raise ValueError(f"unknown LBFGS state {sorted(unknown)}")
        state: dict[str, Any] = {}
        for key in ("func_evals", "n_iter"):
            state[key] = _checks.integer(f"state[{key!r}]", saved.get(key, 0), minimum=0)
        stepped = state["n_iter"] > 0
        needed = known - {"func_evals", "n_iter"}
        if stepped and needed - set(saved):
            raise ValueError(f"the state of a stepped LBFGS lacks {sorted(needed - set(saved))}")
        if not stepped:
            if set(saved) & needed:
                raise ValueError("an LBFGS state with n_iter 0 holds no history")
            return state
        total = sum(self._sizes)

        def vector(what: str, value: Any) -> np.ndarray:
            array = np.asarray(value) if isinstance(value, np.ndarray) else None
            if array is None or array.shape != (total,) or array.dtype.kind != "f":
                raise ValueError(f"state {what} must be a float NumPy array of shape "
                                 f"({total},), got {value!r:.80}")
            return array

        for key in ("d", "prev_flat_grad"):
            state[key] = vector(repr(key), saved[key])
        dirs = _sequence(saved["old_dirs"], "state['old_dirs']")
        steps = _sequence(saved["old_stps"], "state['old_stps']")
        ro = _sequence(saved["ro"], "state['ro']")
        if not len(dirs) == len(steps) == len(ro):
            raise ValueError("state['old_dirs'], ['old_stps'] and ['ro'] must be as long")
        state["old_dirs"] = [vector(f"old_dirs[{i}]", v) for i, v in enumerate(dirs)]
        state["old_stps"] = [vector(f"old_stps[{i}]", v) for i, v in enumerate(steps)]
        state["ro"] = [_checks.number(f"state['ro'][{i}]", v) for i, v in enumerate(ro)]
        for key in ("t", "H_diag", "prev_loss"):
            state[key] = _checks.number(f"state[{key!r}]", saved[key])
        # Everything checked: onto the parameters' namespace and device.
        like, xp = self._flat_like, self._xp
        for key in ("d", "prev_flat_grad"):
            state[key] = ns.from_numpy(xp, state[key], like=like)
        for key in ("old_dirs", "old_stps"):
            state[key] = [ns.from_numpy(xp, v, like=like) for v in state[key]]
        return state


def _cubic_interpolate(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                       bounds: tuple[float, float] | None = None) -> float:
    """The minimizer of the cubic through two points with their values and slopes,
    clamped to ``bounds`` (torch's port of minFunc's polyinterp)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(obj_func: Callable, abs_max: Callable, dot: Callable, x: list[Any],
                  t: float, d: Any, f: float, g: Any, gtd: float, c1: float = 1e-4,
                  c2: float = 0.9, tolerance_change: float = 1e-9,
                  max_ls: int = 25) -> tuple[float, Any, float, int]:
    """A step length satisfying the strong Wolfe conditions along ``d`` (torch's port of
    minFunc's lswolfe): bracketing, then zoom by cubic interpolation. Returns the loss and
    flat gradient there, the step and the number of evaluations."""
    d_norm = abs_max(d)
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = dot(g_new, d)

    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    ls_iter = 0
    bracket: list[float] = []
    bracket_f: list[float] = []
    bracket_g: list[Any] = []
    bracket_gtd: list[float] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # Extrapolate.
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                               bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = dot(g_new, d)
        ls_iter += 1

    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0.0, t], [f, f_new], [g, g_new]

    # Zoom: refine the bracket until a point satisfies the conditions.
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                               bracket[1], bracket_f[1], bracket_gtd[1])
        # Too close to an end of the bracket: move 0.1 of its length inside, if the last
        # step was too close as well or t is at (or past) an end.
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = dot(g_new, d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Not the sufficient decrease, or not below the low end: the new high end.
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # The old high end becomes the low end.
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

    t = bracket[low_pos]
    return bracket_f[low_pos], bracket_g[low_pos], t, ls_func_evals
