"""Update rules: each optimizer's elementwise math, written exactly once.

An update rule is a plain Python function in a deliberately small language, so
that the same source can be

* called directly on arrays of any array API namespace (the generic path), and
* translated into compiled kernels (NumPy/numba and CUDA fast paths in
  :mod:`optim_core.backends`), by walking its syntax tree.

The language
------------
``def name(param, grad, state_1, ..., *, scalar_1, ...)``

* Positional arguments are elementwise arrays: the parameter, its gradient, then
  the optimizer's per-element state buffers, in a fixed order.
* Keyword-only arguments are scalars (Python floats and bools) computed on the
  host once per step: hyperparameters and derived values such as bias corrections.
* The body is a sequence of assignments and ``if``/``else`` blocks. Expressions use
  ``+ - * /``, unary minus, numeric literals, comparisons of scalars, and the calls
  in :data:`OPERATIONS`. An ``if`` may test scalars only: every element takes the
  same branch, so kernels never diverge.
* Elementwise choices are ``where(condition, a, b)``: the condition is one comparison
  with an array on a side (``s < 0``), the only place a comparison of arrays may
  appear, and ``a`` or ``b`` (or both) is an array; a scalar side takes the array's
  dtype. ``minimum`` and ``maximum`` clamp (``minimum(maximum(x, low), high)``).
* The last statement is ``return param, state_1, ...``: the new parameter and new
  states, in argument order (without ``grad``).

A state listed in ``optional_states`` is only allocated when the optimizer needs it
(``amsgrad``'s running maximum, a momentum buffer); the rule must touch it only
inside an ``if`` that is false whenever the state is absent. The generic path then
passes ``None`` for it and kernels a dummy scalar.

Per-tensor reductions
---------------------
``sum(x)`` and ``norm(x)`` (:data:`REDUCTIONS`) reduce an elementwise expression
``x`` over every element of the tensor: the sum, and the Euclidean norm
``sqrt(sum(x * x))`` (both 0 for an empty tensor); ``size(x)`` is its number of
elements (torch's ``numel()``, a float). The result is one value
per tensor, which broadcasts in elementwise expressions, so LAMB's trust ratio is
(without its zero-norm guard)::

    trust = norm(param) / norm(update)
    param = param - lr * trust * update

A reduction's value stays with the tensor (an ``if`` cannot test it: that would
synchronize a device with the host); it may feed another reduction
(``norm(x / norm(y))``). Each reduction takes exactly one argument and is never
applied to scalars only. The generic path evaluates them with the namespace's own
functions (``xp.sum``, ``xp.linalg.vector_norm``). The fused paths run every
reduction that depends on no other as one pass over the tensor before the
elementwise pass, which then reads their values (so a rule with reductions reads
each tensor twice and writes it once); a reduction of a reduction adds a pass. Fused
reductions accumulate in float64 whatever the tensor's dtype. A step whose branches
reach a reduction is per tensor, so it refuses ``flat=True`` (whose buffers hold many
tensors); a reduction inside an ``if`` that is false (Adam without ``cautious``)
costs nothing. Reductions are over the whole tensor; reductions over one axis
(Adafactor's row and column means) are not in the language yet.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optim_core.backends import OPERATIONS, REDUCTIONS, generic_operations

__all__ = ["OPERATIONS", "REDUCTIONS", "UpdateRule", "update_rule"]


_ALLOWED_NODES = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Expr, ast.Constant,
    ast.Assign, ast.If, ast.Return, ast.Name, ast.Load, ast.Store, ast.Tuple,
    ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub, ast.Not,
    ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq,
    ast.BoolOp, ast.And, ast.Or, ast.Call,
)


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer's elementwise update, parsed and checked at import time.

    Attributes
    ----------
    function : callable
        The rule as written; its globals are rebound per backend by :meth:`bind`.
    states : tuple of str
        Names of the per-element state buffers, in argument order.
    optional_states : frozenset of str
        States that exist only under some hyperparameters.
    scalars : tuple of str
        Names of the keyword-only scalar arguments.
    """

    function: Callable[..., tuple]
    states: tuple[str, ...]
    optional_states: frozenset[str]
    scalars: tuple[str, ...]
    tree: ast.FunctionDef = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.function.__name__

    @property
    def reductions(self) -> tuple[str, ...]:
        """The per-tensor reductions the rule calls (``sum``, ``norm``, ``size``), in
        source order (in any branch).

        A rule with any is per tensor: its fused step reads each tensor once more.
        """
        return tuple(node.func.id for node in ast.walk(self.tree)
                     if isinstance(node, ast.Call) and node.func.id in REDUCTIONS)

    @property
    def source(self) -> str:
        """The rule's source text, the single definition every backend starts from."""
        return ast.unparse(self.tree)

    def bind(self, operations: Mapping[str, Callable]) -> Callable[..., tuple]:
        """Return the rule with its operations bound to ``operations``.

        The code object is shared, only the globals differ, so every backend runs
        the very same definition.
        """
        missing = set(OPERATIONS) - set(operations)
        if missing:
            raise ValueError(f"operations missing: {sorted(missing)}")
        namespace = {"__builtins__": builtins, **operations}
        return types.FunctionType(self.function.__code__, namespace, self.name)

    def __call__(self, xp: Any, param: Any, grad: Any, states: Mapping[str, Any],
                 scalars: Mapping[str, Any]) -> tuple:
        """Apply the rule to arrays of namespace ``xp`` (the generic path)."""
        fn = self.bind(generic_operations(xp))
        return fn(param, grad, *(states.get(name) for name in self.states), **scalars)


def update_rule(*, optional_states: tuple[str, ...] = ()) -> Callable[[Callable], UpdateRule]:
    """Decorator turning a function in the rule language into an :class:`UpdateRule`."""

    def decorate(function: Callable) -> UpdateRule:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        assert isinstance(tree, ast.FunctionDef)
        tree.decorator_list = []
        args = tree.args
        positional = [a.arg for a in args.args]
        scalars = tuple(a.arg for a in args.kwonlyargs)
        if positional[:2] != ["param", "grad"]:
            raise TypeError(f"rule {function.__name__}: must start with (param, grad, ...)")
        states = tuple(positional[2:])
        unknown = set(optional_states) - set(states)
        if unknown:
            raise TypeError(f"rule {function.__name__}: unknown optional states {unknown}")
        _check_language(tree, function.__name__, set(scalars), ("param", *states))
        return UpdateRule(function, states, frozenset(optional_states), scalars, tree)

    return decorate


def _check_language(tree: ast.FunctionDef, name: str, scalars: set[str],
                    returned: tuple[str, ...]) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not isinstance(node, _ALLOWED_NODES):
            raise TypeError(f"rule {name}: {type(node).__name__} is not allowed in a rule")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in OPERATIONS):
                raise TypeError(f"rule {name}: only {OPERATIONS} may be called")
            if node.keywords or (node.func.id in REDUCTIONS and len(node.args) != 1):
                raise TypeError(f"rule {name}: {ast.unparse(node)!r}: operations take "
                                "positional arguments, a reduction exactly one")
        if isinstance(node, ast.If):
            used = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if not used <= scalars:
                raise TypeError(f"rule {name}: an if may only test scalars, not {used - scalars}")
        if isinstance(node, ast.Assign) and not (
            len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            raise TypeError(f"rule {name}: assign to one plain name at a time")
    # A rule's own name for an operation it calls would shadow it on the generic path.
    bound = {a.arg for a in (*tree.args.args, *tree.args.kwonlyargs)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)}
    if bound & called:
        raise TypeError(f"rule {name}: {sorted(bound & called)} both names a value and is "
                        "called")
    _check_elementwise_choices(tree, name, _array_names(tree, returned))
    last = tree.body[-1]
    if not (isinstance(last, ast.Return) and isinstance(last.value, ast.Tuple)
            and tuple(getattr(e, "id", None) for e in last.value.elts) == returned):
        raise TypeError(f"rule {name}: must end with 'return {', '.join(returned)}'")
    if any(isinstance(n, ast.Return) for n in ast.walk(tree) if n is not last):
        raise TypeError(f"rule {name}: only one return, at the end")


def _mentions(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def _array_names(tree: ast.FunctionDef, arrays: tuple[str, ...]) -> set[str]:
    """The names that hold an array somewhere: the array arguments, and any name assigned
    an expression of arrays (flow-insensitive, so a name that is an array in one branch
    counts as one everywhere)."""
    names = {"grad", *arrays}
    assignments = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)]
    changed = True
    while changed:
        changed = False
        for node in assignments:
            target = node.targets[0].id
            if target not in names and _mentions(node.value, names):
                names.add(target)
                changed = True
    return names


def _check_elementwise_choices(tree: ast.FunctionDef, name: str, arrays: set[str]) -> None:
    """``where``'s form, and no comparison or logic of arrays anywhere else."""
    conditions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.func.id == "where":
            if len(node.args) != 3:
                raise TypeError(f"rule {name}: where takes (condition, a, b)")
            condition, *sides = node.args
            if not (isinstance(condition, ast.Compare) and len(condition.ops) == 1
                    and _mentions(condition, arrays)):
                raise TypeError(f"rule {name}: where's condition must be one comparison "
                                f"of arrays, not {ast.unparse(condition)!r} (test scalars "
                                "with an if)")
            if not any(_mentions(side, arrays) for side in sides):
                raise TypeError(f"rule {name}: where needs an array as a or b, got "
                                f"{ast.unparse(node)!r}")
            conditions.add(id(condition))
    for node in ast.walk(tree):
        logical = isinstance(node, (ast.Compare, ast.BoolOp)) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
        if logical and id(node) not in conditions and _mentions(node, arrays):
            raise TypeError(f"rule {name}: {ast.unparse(node)!r} compares arrays outside "
                            "where's condition")
