r"""Every optimizer as a pair of pure functions, for JAX and other immutable libraries.

>>> import jax, jax.numpy as jnp                               # doctest: +SKIP
>>> import optim_core
>>> opt = optim_core.functional(optim_core.Adam, lr=1e-3)
>>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}       # doctest: +SKIP
>>> state = opt.init(params)                                   # doctest: +SKIP
>>> step = jax.jit(opt.update)                                 # doctest: +SKIP
>>> params, state = step(grads, state, params)                 # doctest: +SKIP

:func:`functional` takes an optimizer class (or its name) and its hyperparameters,
checks them once with the class's own checks, and returns a
:class:`FunctionalOptimizer`: ``init(params) -> state`` and
``update(grads, state, params) -> (params, state)``, pure functions over a tree of
arrays (nested dicts, lists, tuples and named tuples; any JAX pytree when JAX is
loaded). They write nothing, so ``jax.jit`` traces ``update`` into one XLA program,
and they run as they are on NumPy, CuPy, torch or any array API library.

One definition
--------------
Nothing is written twice. The element update is the class's
:class:`~optim_core.optim.language.UpdateRule`, bound to the arrays' namespace (found
through array-api-compat) as the generic path binds it. The step's scalars come from
the class's :meth:`~optim_core.Optimizer.step_scalars` and
:meth:`~optim_core.Optimizer.scalars`, called with the step count and the group
state as 0-d arrays instead of host numbers (:mod:`.scalar_math` covers what
Python's operators do not). The step count lives in the state as an int32 array, so
a jitted ``update`` is traced once and serves every step.

A scalar that depends on the step is an array, and an ``if`` of the rule that tests
one (SGD's ``first_step``, RAdam's ``rectify``, ASGD's ``mu != 1``) has no host truth
value under ``jax.jit``. For those ifs only, the rule's tree is rewritten once: both
branches run and each name they assign is chosen with ``where`` (:func:`selecting`).
Ifs that test hyperparameters stay ifs, decided while tracing, so the program holds
only the branches the hyperparameters take; a rule without such an if runs as bound.

Rounding
--------
In float64 (``jax_enable_x64``, or float64 NumPy arrays) the trajectory equals the
eager path's to a few ulps. In float32 it differs where the eager path computes on
the host in float64 and the functional path in float32, traced:

* the scalars derived from the step: bias corrections and step sizes (Adam, AdamW,
  Adamax, NAdam, RAdam), Adagrad's decayed step, ASGD's ``eta`` and ``mu``, RAdam's
  rectification. ``1 - beta2**t`` cancels: float32's ``0.999`` is ``0.99900001``, so
  with ``beta2 = 0.999`` Adam's ``sqrt(1 - beta2**t)`` is off by about 6e-6 relative
  for the first thousand steps (3e-9 by step 10,000) and so is its step, as in
  optax's float32 Adam; ``lr / (1 - beta1**t)`` by about 2e-7;
* the running products of the group state (NAdam's ``mu_product``, DGD's
  ``decay_product``) and ASGD's ``eta``, accumulated in float32 step after step
  instead of in float64 (relative drift about 1e-7 per step);
* the step count as a float32 is exact up to 2**24 steps; beyond, ``beta**t`` and
  ``t``-dependent terms see ``t`` rounded.

Hyperparameters are Python floats in both paths and round the same way; the element
math (the rule) is the same operations in the same order. 16-bit parameters compute
in float32, as on the eager generic path, and their scalars are float32.

To donate buffers to a jitted step, jit a function taking ``(params, state, ...)`` in
the order ``update`` returns them, with ``donate_argnums=(0, 1)``: JAX pairs donated
inputs with outputs of the same shape in order, and ``jax.jit(opt.update,
donate_argnums=(1, 2))`` would pair the state's buffers with the parameters, which
costs copies.

Not here: param groups (use ``optax.multi_transform`` or one functional optimizer per
subtree), the ``nonfinite`` policy (``optax.apply_if_finite``), flat buffers, and
hyperparameters that change between steps (they are constants of the program; make a
new functional optimizer).
"""

from __future__ import annotations

import ast
import builtins
import copy
import inspect
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import _namespace as ns
from ..backends import generic_operations
from ..backends._generic import _compute_dtype
from .base import Optimizer
from .language import UpdateRule, dependents, mentions
from .registry import optimizer_class

__all__ = ["functional", "FunctionalOptimizer", "FunctionalState", "selecting"]


class FunctionalState(NamedTuple):
    """The state of a functional optimizer: a tree of arrays (a JAX pytree as it is).

    Attributes
    ----------
    count : array
        The number of steps taken, an int32 0-d array.
    group : dict of str -> array
        The optimizer's scalar group state beyond the count (NAdam's ``mu_product``,
        DGD's ``decay_product``, ASGD's ``eta`` and ``mu``), 0-d arrays of the
        parameters' floating dtype; empty for most optimizers.
    states : dict of str -> tree
        Each per-element state of the rule (Adam's ``exp_avg``, ``exp_avg_sq``), a
        tree shaped like the parameters; optional states only where the
        hyperparameters use them (``max_exp_avg_sq`` with ``amsgrad=True``).
    """

    count: Any
    group: dict[str, Any]
    states: dict[str, Any]


#: The keyword options of the eager optimizers, which a functional one does not take.
_EAGER_OPTIONS = frozenset(
    name for name, p in inspect.signature(Optimizer.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY)


def functional(optimizer: type[Optimizer] | str, /, **hyperparameters: Any
               ) -> FunctionalOptimizer:
    """The pure ``init``/``update`` form of an optimizer, for ``jax.jit`` and immutable arrays.

    Parameters
    ----------
    optimizer : Optimizer subclass or str
        A registered optimizer class (``optim_core.Adam``) or its name (``"adam"``).
    **hyperparameters
        Its hyperparameters, as its constructor takes them (``lr=1e-3,
        betas=(0.9, 0.999)``); the others take the class's defaults. Checked here,
        once, with the class's checks: a bad value raises the same error as
        ``Adam(params, lr=-1)`` would.

    Returns
    -------
    FunctionalOptimizer

    Raises
    ------
    TypeError
        For an unknown hyperparameter, or an option of the eager optimizers (``impl``,
        ``backend``, ``nonfinite``, ``flat``).
    ValueError
        For a hyperparameter out of range, or contradicting another.
    """
    return FunctionalOptimizer(optimizer, **hyperparameters)


class FunctionalOptimizer:
    """Pure ``init(params)`` and ``update(grads, state, params)`` of one optimizer.

    Made by :func:`functional` (see there and the module docstring). Both functions
    take a tree of arrays: nested dicts, lists, tuples, named tuples and ``None``
    (an empty subtree), or any JAX pytree when JAX is loaded; the leaves share one
    array library and device.

    Attributes
    ----------
    optimizer : type
        The optimizer class.
    hyperparameters : dict
        The checked hyperparameters, defaults filled in.
    rule : UpdateRule
        The class's rule, which :meth:`update` runs.
    """

    def __init__(self, optimizer: type[Optimizer] | str, /, **hyperparameters: Any) -> None:
        cls = optimizer_class(optimizer) if isinstance(optimizer, str) else optimizer
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)
                and getattr(cls, "rule", None) is not None):
            raise TypeError(f"functional needs an optimizer class or name, got {optimizer!r}")
        if cls.rule.state_shapes:
            raise TypeError(f"functional keeps every state in its parameter's shape; "
                            f"{cls.__name__}'s states {sorted(cls.rule.state_shapes)} are "
                            "shaped otherwise: use the eager optimizer")
        options = sorted(_EAGER_OPTIONS & set(hyperparameters))
        if options:
            raise TypeError(f"{options} are options of the eager optimizers; functional "
                            f"takes hyperparameters only ({cls.__name__}'s)")
        # The class itself checks the hyperparameters and derives the scalars: a template
        # on one NumPy element, which never steps.
        self._template = cls([np.zeros(1)], impl="generic", **hyperparameters)
        self.optimizer = cls
        self.hyperparameters = dict(self._template.defaults)
        self.rule: UpdateRule = cls.rule
        active = (frozenset(self.rule.states) - self.rule.optional_states) \
            | self._template.active_states(self.hyperparameters)
        self._states = tuple(name for name in self.rule.states if name in active)
        self._fills = {name: self.hyperparameters[cls.initial_state[name]]
                       if name in cls.initial_state else 0 for name in self._states}
        self._group_keys = tuple(k for k in self._template._initial_group_state()
                                 if k != "step")
        self._runners: dict[Any, Callable[..., tuple]] = {}

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"functional({self.optimizer.__name__}, {hyper})"

    # ----------------------------------------------------------------- public API
    def init(self, params: Any) -> FunctionalState:
        """The state before the first step: step count 0, each state buffer at its
        initial value (zero, or Adagrad's ``initial_accumulator_value``)."""
        leaves, paths, structure = _flatten(params)
        xp = _checked_params(leaves, paths)
        scalar_dtype = _scalar_dtype(xp, leaves)
        device = ns.device_of(leaves[0]) if leaves else None
        count = xp.asarray(0, dtype=xp.int32, device=device)
        initial = self._template._initial_group_state()
        group = {k: xp.asarray(initial[k], dtype=scalar_dtype, device=device)
                 for k in self._group_keys}
        states = {name: structure.unflatten(
                      [xp.full(p.shape, self._fills[name], dtype=p.dtype,
                               device=ns.device_of(p)) for p in leaves])
                  for name in self._states}
        return FunctionalState(count, group, states)

    def update(self, grads: Any, state: FunctionalState, params: Any
               ) -> tuple[Any, FunctionalState]:
        """One step: the new parameters and the new state. Writes nothing.

        Parameters
        ----------
        grads : tree of arrays
            One gradient per parameter, in the parameters' structure and shapes; cast
            to each parameter's dtype, as the eager path does.
        state : FunctionalState
            From :meth:`init` or the previous ``update``.
        params : tree of arrays
            The parameters before the step.
        """
        leaves, paths, structure = _flatten(params)
        grad_leaves, _, grad_structure = _flatten(grads)
        if grad_structure != structure:
            raise ValueError("grads must have the structure of params (the same keys, "
                             "lengths and nesting)")
        xp = _checked_params(leaves, paths)
        state_leaves = self._checked_state(state, structure, leaves, paths)
        for path, param, grad in zip(paths, leaves, grad_leaves, strict=True):
            ns.check_same_library(grad, param, f"grad of {path}")
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(f"grad of {path} has shape {tuple(grad.shape)}, the "
                                 f"parameter {tuple(param.shape)}")
            if not ns.is_floating(xp, grad):
                raise TypeError(f"grad of {path} has dtype {grad.dtype}; gradients must be "
                                "floating point")
        if not leaves:
            count_xp = ns.namespace_of(state.count)
            return params, FunctionalState(count_xp.asarray(state.count + 1), dict(state.group),
                                           dict(state.states))

        # The step's scalars, derived by the class from the count and group state as 0-d
        # arrays (copies: a scalars() that updates them in place must not write the caller's).
        count = state.count
        scalar_dtype = _scalar_dtype(xp, leaves)
        device = ns.device_of(count)
        group_state = {"step": xp.astype(count, scalar_dtype),
                       **{k: xp.asarray(state.group[k], dtype=scalar_dtype, copy=True)
                          for k in self._group_keys}}
        values, after = self._template.step_scalars(self.hyperparameters, group_state,
                                                    first_step=count == 0)
        by_dtype: dict[Any, tuple[dict[str, Any], Callable[..., tuple]]] = {}

        new_params, new_states = [], [[] for _ in self._states]
        for index, (param, grad) in enumerate(zip(leaves, grad_leaves, strict=True)):
            dtype = param.dtype
            compute = _compute_dtype(xp, dtype) or dtype
            if compute not in by_dtype:
                scalars = _scalars_in(xp, values, compute)
                by_dtype[compute] = (scalars, self._runner(xp, compute, scalars))
            scalars, run = by_dtype[compute]
            if grad.dtype != dtype:
                grad = xp.astype(grad, dtype)
            given = {name: leaves_of[index] for name, leaves_of in state_leaves.items()}
            arrays = [param, grad] + [given.get(name) for name in self.rule.states]
            if compute != dtype:
                arrays = [None if a is None else xp.astype(a, compute) for a in arrays]
            new_param, *outs = run(*arrays, **scalars)
            new_params.append(_cast(xp, new_param, dtype))
            out = dict(zip(self.rule.states, outs, strict=True))
            for position, name in enumerate(self._states):
                new_states[position].append(_cast(xp, out[name], dtype))

        group = {k: xp.asarray(after[k], dtype=scalar_dtype, device=device)
                 for k in self._group_keys}
        states = {name: structure.unflatten(values)
                  for name, values in zip(self._states, new_states, strict=True)}
        return structure.unflatten(new_params), FunctionalState(count + 1, group, states)

    # ----------------------------------------------------------------- internals
    def _checked_state(self, state: Any, structure: _Structure, leaves: list[Any],
                       paths: list[str]) -> dict[str, list[Any]]:
        """Each state's leaves, after checking the state matches the parameters."""
        if not isinstance(state, FunctionalState):
            raise TypeError(f"state must be the FunctionalState of init or update, got "
                            f"{type(state).__name__}")
        if not isinstance(state.states, Mapping) or set(state.states) != set(self._states):
            raise ValueError(f"state holds {sorted(getattr(state.states, 'keys', list)())}, "
                             f"{self!r} keeps {sorted(self._states)}: a state of another "
                             "optimizer or hyperparameters")
        if not isinstance(state.group, Mapping) or set(state.group) != set(self._group_keys):
            raise ValueError(f"state.group must hold {sorted(self._group_keys)}")
        checked = {}
        for name in self._states:
            state_leaves, _, state_structure = _flatten(state.states[name])
            if state_structure != structure:
                raise ValueError(f"state {name!r} has another structure than params")
            for path, param, value in zip(paths, leaves, state_leaves, strict=True):
                if tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype:
                    raise ValueError(f"state {name!r} of {path} has shape {tuple(value.shape)} "
                                     f"and dtype {value.dtype}, the parameter "
                                     f"{tuple(param.shape)} and {param.dtype}")
            checked[name] = state_leaves
        return checked

    def _runner(self, xp: Any, compute: Any, scalars: Mapping[str, Any]
                ) -> Callable[..., tuple]:
        """The rule bound to ``xp``, its ifs on array scalars rewritten (:func:`selecting`)."""
        arrays = frozenset(k for k, v in scalars.items() if not _is_host(v))
        key = (xp, compute, arrays)
        runner = self._runners.get(key)
        if runner is None:
            runner = selecting(self.rule, arrays, xp, compute)
            self._runners[key] = runner
        return runner


# --------------------------------------------------------------------- scalars
def _is_host(value: Any) -> bool:
    return isinstance(value, (int, float, np.generic))


def _scalars_in(xp: Any, values: Mapping[str, Any], compute: Any) -> dict[str, Any]:
    """The step's scalars for arrays of dtype ``compute``.

    Python numbers (the hyperparameters) stay as they are. NumPy scalars (what NumPy's
    0-d arithmetic returns) stay host values, booleans as Python bools and numbers in
    ``compute``. Arrays (JAX's, traced or not) become 0-d arrays of ``compute``: a
    float32 parameter is not promoted by a float64 scalar.
    """
    out = {}
    for name, value in values.items():
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, np.generic):
            out[name] = bool(value) if value.dtype == np.bool_ \
                else np.asarray(value, dtype=compute)[()]
        elif value.dtype == xp.bool:
            out[name] = value
        else:
            out[name] = xp.astype(value, compute) if value.dtype != compute else value
    return out


def _scalar_dtype(xp: Any, leaves: list[Any]) -> Any:
    """The dtype the step's scalars are computed in: the widest compute dtype of the
    parameters (float32 for 16-bit ones)."""
    dtypes = {_compute_dtype(xp, p.dtype) or p.dtype for p in leaves}
    if not dtypes:
        return xp.float32
    return xp.result_type(*dtypes) if len(dtypes) > 1 else dtypes.pop()


def _cast(xp: Any, value: Any, dtype: Any) -> Any:
    if value is None or value.dtype == dtype:
        return value
    return xp.astype(value, dtype)


def _checked_params(leaves: list[Any], paths: list[str]) -> Any:
    """The parameters' namespace; each leaf a floating array of it."""
    if not leaves:
        return np
    xp = ns.common_namespace(leaves, paths)
    for path, leaf in zip(paths, leaves, strict=True):
        if not ns.is_floating(xp, leaf):
            raise TypeError(f"parameter {path} has dtype {leaf.dtype}; parameters must be "
                            "floating point")
    return xp


# --------------------------------------------------------------------- ifs on arrays
_UNSET = type("Unset", (), {"__repr__": lambda self: "<unset>"})()
_PREFIX = "_sel_"


def selecting(rule: UpdateRule, array_scalars: frozenset[str], xp: Any, compute: Any
              ) -> Callable[..., tuple]:
    """The rule on namespace ``xp``, able to take the scalars ``array_scalars`` as arrays.

    Without ifs, ``and``/``or``/``not`` or chained comparisons on those scalars, this is
    ``rule.bind(generic_operations(xp))``, the generic path's function. Otherwise the
    rule's tree is rewritten, once per set of array scalars: an ``if`` whose test
    mentions one (or a name computed from one) runs both branches and then chooses
    each name they assign with ``xp.where(test, then_value, else_value)``; logic on
    such values becomes ``xp.logical_and/or/not``. Other ifs stay as written.

    Parameters
    ----------
    rule : UpdateRule
    array_scalars : frozenset of str
        The rule's scalars that are arrays (they depend on the step) this time.
    xp : namespace
    compute : dtype
        The dtype of the arrays it runs on (a chosen number takes it).
    """
    operations = generic_operations(xp)
    tree = copy.deepcopy(rule.tree)
    dynamic = dependents(tree, set(array_scalars))
    rewriter = _Rewriter(dynamic)
    tree = rewriter.visit(tree)
    if not rewriter.changed:
        return rule.bind(operations)
    arguments = {a.arg for a in (*tree.args.args, *tree.args.kwonlyargs)}
    assigned = sorted({n.targets[0].id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                       and not n.targets[0].id.startswith(_PREFIX)} - arguments)
    tree.body[:0] = [ast.parse(f"{name} = {_PREFIX}unset").body[0] for name in assigned]
    module = ast.fix_missing_locations(ast.Module(body=[tree], type_ignores=[]))
    namespace = {"__builtins__": builtins, **operations, **_helpers(xp, compute, rule.name)}
    # The rule's own tree, rewritten: nothing from outside the package's rules runs here.
    exec(compile(module, f"<rule {rule.name}, selecting on {sorted(array_scalars)}>",  # noqa: S102
                 "exec"), namespace)
    function = namespace[rule.name]
    return types.FunctionType(function.__code__, namespace, rule.name)


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(id=_PREFIX + name, ctx=ast.Load()), args=list(args),
                    keywords=[])


class _Rewriter(ast.NodeTransformer):
    """Ifs and logic on array values become selections (see :func:`selecting`)."""

    def __init__(self, dynamic: set[str]) -> None:
        self.dynamic = dynamic
        self.changed = False
        self.count = 0

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        if not mentions(node, self.dynamic):
            return node
        self.changed = True
        name = "and" if isinstance(node.op, ast.And) else "or"
        result = node.values[0]
        for value in node.values[1:]:
            result = _call(name, result, value)
        return result

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and mentions(node, self.dynamic):
            self.changed = True
            return _call("not", node.operand)
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) == 1 or not mentions(node, self.dynamic):
            return node
        self.changed = True  # a < b < c: (a < b) and (b < c), element by element
        sides = [node.left, *node.comparators]
        pairs = [ast.Compare(left=left, ops=[op], comparators=[right])
                 for left, op, right in zip(sides, node.ops, sides[1:], strict=True)]
        result = pairs[0]
        for pair in pairs[1:]:
            result = _call("and", result, pair)
        return result

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt]:
        self.generic_visit(node)
        if not mentions(node.test, self.dynamic):
            return node
        self.changed = True
        k = self.count
        self.count += 1
        names = sorted({n.targets[0].id for branch in (node.body, node.orelse)
                        for statement in branch for n in ast.walk(statement)
                        if isinstance(n, ast.Assign)
                        and not n.targets[0].id.startswith(_PREFIX)})
        condition = f"{_PREFIX}c{k}"
        saved = {name: f"{_PREFIX}s{k}_{name}" for name in names}
        taken = {name: f"{_PREFIX}t{k}_{name}" for name in names}

        def assign(target: str, value: ast.expr) -> ast.stmt:
            return ast.Assign(targets=[ast.Name(id=target, ctx=ast.Store())], value=value)

        def load(name: str) -> ast.Name:
            return ast.Name(id=name, ctx=ast.Load())

        out: list[ast.stmt] = [assign(condition, node.test)]
        out += [assign(saved[n], load(n)) for n in names]
        out += node.body
        out += [assign(taken[n], load(n)) for n in names]
        out += [assign(n, load(saved[n])) for n in names]
        out += node.orelse
        out += [assign(n, _call("select", load(condition), load(taken[n]), load(n)))
                for n in names]
        return out


def _helpers(xp: Any, compute: Any, rule_name: str) -> dict[str, Any]:
    """The functions a rewritten rule calls, on namespace ``xp``."""

    def is_host(value: Any) -> bool:
        return isinstance(value, (bool, int, float, np.generic))

    def select(condition: Any, a: Any, b: Any) -> Any:
        if a is b or a is _UNSET:
            return b
        if b is _UNSET:
            return a
        if is_host(condition):
            return a if condition else b
        if a is None or b is None:
            raise TypeError(f"rule {rule_name}: a state is set in one branch of an if on "
                            "a step-dependent scalar and absent in the other")
        if is_host(a):
            a = xp.asarray(a, dtype=compute if is_host(b) else b.dtype)
        if is_host(b):
            b = xp.asarray(b, dtype=a.dtype)
        return xp.where(condition, a, b)

    def logical_and(a: Any, b: Any) -> Any:
        if is_host(a):
            return b if a else False
        if is_host(b):
            return a if b else False
        return xp.logical_and(a, b)

    def logical_or(a: Any, b: Any) -> Any:
        if is_host(a):
            return True if a else b
        if is_host(b):
            return True if b else a
        return xp.logical_or(a, b)

    def logical_not(a: Any) -> Any:
        return (not a) if is_host(a) else xp.logical_not(a)

    return {f"{_PREFIX}unset": _UNSET, f"{_PREFIX}select": select,
            f"{_PREFIX}and": logical_and, f"{_PREFIX}or": logical_or,
            f"{_PREFIX}not": logical_not}


# --------------------------------------------------------------------- trees
_LEAF = "leaf"


class _Structure:
    """How a tree holds its leaves: compared with ``==``, rebuilt by :meth:`unflatten`."""

    __slots__ = ("spec", "jax_treedef")

    def __init__(self, spec: Any, jax_treedef: Any = None) -> None:
        self.spec, self.jax_treedef = spec, jax_treedef

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Structure) and self.spec == other.spec \
            and self.jax_treedef == other.jax_treedef

    def __hash__(self) -> int:
        return hash(self.spec)

    def unflatten(self, leaves: list[Any]) -> Any:
        if self.jax_treedef is not None:
            return self.jax_treedef.unflatten(leaves)
        iterator = iter(leaves)
        return _build(self.spec, iterator)


class _Unknown(Exception):
    """A node that is neither a container this module knows nor an array."""


def _flatten(tree: Any) -> tuple[list[Any], list[str], _Structure]:
    """The leaves of ``tree``, their paths (for messages) and its structure.

    Dicts (keys in sorted order, as JAX orders them), lists, tuples, named tuples and
    ``None`` (no leaf) are walked here; a tree with any other kind of node is
    flattened by ``jax.tree_util`` when JAX is loaded (its registered pytrees), and
    refused otherwise.
    """
    leaves: list[Any] = []
    paths: list[str] = []
    try:
        spec = _walk(tree, "", leaves, paths)
    except _Unknown as unknown:
        jax = sys.modules.get("jax")
        if jax is None:
            raise TypeError(f"params must be a tree of dicts, lists and tuples of arrays; "
                            f"{unknown.args[0] or 'the tree'} is a "
                            f"{unknown.args[1]}") from None
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = [leaf for _, leaf in with_paths]
        paths = [jax.tree_util.keystr(path) or "(root)" for path, _ in with_paths]
        for path, leaf in zip(paths, leaves, strict=True):
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise TypeError(f"leaf {path} of the tree is a {type(leaf).__name__}, "
                                "not an array") from None
        return leaves, paths, _Structure(None, treedef)
    return leaves, paths, _Structure(spec)


def _walk(tree: Any, path: str, leaves: list[Any], paths: list[str]) -> Any:
    if tree is None:
        return None
    if type(tree) is dict:
        try:
            keys = sorted(tree)
        except TypeError:
            keys = list(tree)
        return ("dict", tuple(keys),
                tuple(_walk(tree[k], f"{path}[{k!r}]", leaves, paths) for k in keys))
    if type(tree) in (list, tuple) or (isinstance(tree, tuple) and hasattr(tree, "_fields")):
        return (type(tree), tuple(_walk(item, f"{path}[{i}]", leaves, paths)
                                  for i, item in enumerate(tree)))
    if hasattr(tree, "shape") and hasattr(tree, "dtype") and not isinstance(tree, Mapping):
        leaves.append(tree)
        paths.append(path or "(root)")
        return _LEAF
    raise _Unknown(path, type(tree).__name__)


def _build(spec: Any, leaves: Any) -> Any:
    if spec is None:
        return None
    if spec == _LEAF:
        return next(leaves)
    if spec[0] == "dict":
        return {key: _build(child, leaves) for key, child in zip(spec[1], spec[2], strict=True)}
    kind, children = spec
    items = [_build(child, leaves) for child in children]
    return kind(*items) if hasattr(kind, "_fields") else kind(items)
