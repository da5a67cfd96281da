"""The rule language: each optimizer's elementwise update, written exactly once.

An update rule is a plain Python function in a deliberately small language, so that
the same source can be

* called directly on arrays of any array API namespace (the generic path), and
* translated into compiled kernels (the NumPy/numba and CUDA fast paths of
  :mod:`optim_core.backends`), by walking its syntax tree.

This is public API: :func:`update_rule` turns such a function into an
:class:`UpdateRule`, and a subclass of :class:`optim_core.Optimizer` that names it as
its ``rule`` is a complete optimizer, with the generic path and both fused kernels
and no kernel code (the README's "Writing your own optimizer" shows one).

The language
------------
``def name(param, grad, state_1, ..., *, scalar_1, ...)``

Arguments
    Positional arguments are elementwise arrays: the parameter, its gradient, then
    the optimizer's per-element state buffers (any names, in a fixed order; each
    starts at zero, or at a hyperparameter's value, see
    ``Optimizer.initial_state``). Keyword-only arguments are scalars (Python floats
    and bools) computed on the host once per step: a hyperparameter of the
    optimizer by name (a pair by its parts: ``betas`` is ``beta1, beta2``), a value
    the optimizer's ``scalars()`` derives (bias corrections, decayed step sizes), or
    ``first_step`` (True on a step that allocates states: the group's first step, or
    a later one that allocates an optional state). No defaults, ``*args`` or
    ``**kwargs``.
Statements
    Assignments to one plain name (``m = beta1 * m + (1 - beta1) * grad``, no ``+=``)
    and ``if``/``else`` blocks whose test uses scalars only: every element takes the
    same branch, so kernels never diverge (each outcome is one kernel specialization,
    compiled once). The last statement, and the only ``return``, is
    ``return param, state_1, ...``: the new parameter and new states, in argument
    order, without ``grad``.
Expressions
    Names, numeric literals, ``+ - * /``, unary minus, and calls of the operations in
    :data:`OPERATIONS` (no attributes such as ``np.exp``, no indexing, no ``**``: write
    ``x * x``). Comparisons and ``and``/``or``/``not`` of scalars in ``if`` tests.
Operations
    ``sqrt(x)``, ``abs(x)``, ``sign(x)``; ``maximum(a, b)`` and ``minimum(a, b)``
    (NaN propagates; ``minimum(maximum(x, low), high)`` clamps); ``lerp(a, b, w)``,
    torch's two-sided ``a + w * (b - a)``, exact at both ends, with a scalar ``w``;
    ``where(condition, a, b)``, the elementwise choice: the condition is one
    comparison with an array on a side (``s < 0``), the only place arrays may be
    compared, and ``a`` or ``b`` (or both) is an array (a scalar side takes the
    array's dtype). And the per-tensor reductions ``sum(x)``, ``norm(x)`` and
    ``size(x)``, the axis reductions ``row_mean(x)`` and ``col_mean(x)`` and the matrix
    operation ``orthogonalize``, described below.
    :data:`OPERATIONS` is the authoritative list; each has the array API standard's
    meaning (generic path) and the same meaning in the kernels.
    Their names are bound when a rule runs, whatever the defining module holds;
    ``from optim_core.optim.language import sqrt, where, norm`` imports stand-ins that
    let linters and editors see them.

A call on scalars only (``sqrt(1 - beta2)``) and every other scalar-only
subexpression is computed once per step on the host in float64 and passed to the
kernel as an argument in the parameter's dtype, so a new learning rate is a new
argument value, never a new compilation.

Matrix operations
-----------------
A call of a matrix operation (:data:`MATRIX_OPERATIONS`: ``orthogonalize``, Newton-Schulz
orthogonalization, as ``torch.optim.Muon`` runs it) acts on the whole tensor, not per
element, so it may only be the whole value of an assignment,
``update = orthogonalize(update, a, b, c, eps, steps, bfloat16)``: its first argument an
elementwise expression, the others scalars. The generic path calls it like any other
operation; the fused paths cut the rule there into elementwise stages, each a generated
kernel, with the matrix operation run between them through the array library's own
``matmul`` (see :mod:`optim_core.backends._lowering`).

Optional states
---------------
A state listed in ``optional_states`` is only allocated when the optimizer needs it
(``amsgrad``'s running maximum, a momentum buffer: ``Optimizer.active_states`` says
which, from the hyperparameters); the rule must touch it only inside an ``if`` that is
false whenever the state is absent. The generic path then passes ``None`` for it and
kernels a dummy scalar. On the step that allocates it, ``first_step`` is True (SGD
copies the gradient into a new momentum buffer).

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
costs nothing.

Axis reductions and factored states
-----------------------------------
``row_mean(x)`` and ``col_mean(x)`` (:data:`AXIS_REDUCTIONS`) reduce an expression over
one of the last two axes of a tensor of two or more dimensions, keeping that axis with
length 1 (every leading axis is kept, as torch reduces ``dim=-1`` and ``dim=-2`` with
``keepdim=True``): ``row_mean`` is the mean of each row, shaped ``(..., rows, 1)``,
``col_mean`` the mean of each column, ``(..., 1, columns)``; the mean over an empty
axis is 0. Their values broadcast against the tensor like any array, so Adafactor's
factored second moment is::

    row_var = lerp(row_var, row_mean(grad * grad), one_minus_beta2_t)
    col_var = lerp(col_var, col_mean(grad * grad), one_minus_beta2_t)
    var_estimate = row_var * col_var / maximum(col_mean(row_var), eps1)

where ``row_var * col_var`` is the outer product and ``col_mean(row_var)`` the mean of
the row factor, one value per matrix. Each value of a rule has a shape *kind*, the set
of axes it varies along ("leading", "rows", "columns"): the parameter's is all three,
an axis reduction drops one, a whole-tensor reduction all, and an operation's is the
union of its arguments' (broadcasting). :func:`update_rule` infers them (over every
branch at once) and refuses a rule whose state is assigned a value that varies along
an axis the state does not have.

A state is full-size unless ``update_rule(state_shapes={name: kind})`` says otherwise:

``"rows"``
    ``(..., rows, 1)``: one value per row, for tensors of two or more dimensions only.
``"cols"``
    ``(..., 1, columns)``: one value per column, for tensors of two or more dimensions.
``"unfactored"``
    The parameter's shape, for tensors of fewer than two dimensions only (the full-size
    state that stands in for a factored pair where there is nothing to factor).

A tensor holds only the states its number of dimensions allows (a matrix Adafactor's
``row_var`` and ``col_var``, a vector its ``variance``), so such states are optional
states the rule touches only under an ``if`` on a per-tensor scalar that says which
(Adafactor's ``factored``, from ``Optimizer.tensor_scalars``). The generic path runs
them with the namespace's ``sum(x, axis=..., keepdims=True)``; the fused NumPy path
generates loop nests over the tensor's rows and columns from the same lowered body
(:mod:`optim_core.backends._factored`: each axis reduction in a pass before the update,
the update reading the row and column values broadcast); the CUDA kernels do not lower
them yet (CuPy arrays take the generic path, ``select_implementation`` says why). Such a
rule refuses ``flat=True`` (whose buffers hold the parameters' shapes).

Rule fragments
--------------
Lines that several rules share (the sign flip of ``maximize`` and the weight decay
before an update, Adam's two moments) are written once as a fragment,
:func:`rule_fragment`, a function in the same language whose positional arguments are
arrays and keyword-only ones scalars, ending with ``return a, b`` (or ``return a``)::

    @rule_fragment
    def adam_moments(grad, exp_avg, exp_avg_sq, *, beta1, beta2):
        exp_avg = lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        return exp_avg, exp_avg_sq

A rule (or another fragment) calls it as the whole value of an assignment to as many
names as it returns, arrays positionally and every scalar by keyword:
``exp_avg, exp_avg_sq = adam_moments(grad, exp_avg, exp_avg_sq, beta1=beta1,
beta2=beta2)``. :func:`update_rule` expands the call in place (its own names renamed
apart) before it checks the rule, so every backend and the generic path run the lines
as if written out, operation for operation, and ``UpdateRule.source`` shows them so.

What is refused, and when
-------------------------
:func:`update_rule` checks the whole function when it is decorated (at import time)
and raises :class:`RuleError` (a TypeError) naming the rule, the line and what is not
allowed: a construct outside the language, a call of anything but an operation, a
name that is neither an argument nor assigned, an ``if`` testing an array, a
comparison of arrays outside ``where``, a wrong ``return``.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import inspect
import textwrap
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optim_core.backends import (
    AXIS_REDUCTIONS,
    MATRIX_OPERATIONS,
    OPERATIONS,
    REDUCTIONS,
    generic_operations,
)
from optim_core.optim import _inline

__all__ = ["OPERATIONS", "REDUCTIONS", "AXIS_REDUCTIONS", "MATRIX_OPERATIONS", "STATE_SHAPES",
           "RuleError", "UpdateRule", "update_rule", "RuleFragment", "rule_fragment", "sqrt",
           "maximum", "minimum", "sign", "lerp", "where", "norm", "size", "row_mean",
           "col_mean", "orthogonalize"]

#: The shape kinds a state may be declared with (``update_rule(state_shapes=...)``);
#: "full", the parameter's shape on every tensor, is the default.
STATE_SHAPES = ("full", "rows", "cols", "unfactored")


class RuleError(TypeError):
    """A function outside the rule language, refused by :func:`update_rule` when it is
    decorated; the message names the rule, the line and what is not allowed."""


_ALLOWED_NODES = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Expr, ast.Constant,
    ast.Assign, ast.If, ast.Return, ast.Name, ast.Load, ast.Store, ast.Tuple,
    ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub, ast.Not,
    ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq,
    ast.BoolOp, ast.And, ast.Or, ast.Call,
)

# What the language lacks, said the way a user wrote it (the node's class name otherwise).
_REFUSED = {
    ast.Attribute: "attribute access (call the operations by their bare names)",
    ast.Subscript: "indexing (a rule sees every element alike)",
    ast.For: "a for loop (a rule is elementwise: write it for one element)",
    ast.While: "a while loop",
    ast.AugAssign: "augmented assignment (write x = x + y)",
    ast.AnnAssign: "annotated assignment",
    ast.Pow: "the power operator ** (write x * x, or use sqrt)",
    ast.FloorDiv: "the operator //", ast.Mod: "the operator %", ast.MatMult: "the operator @",
    ast.IfExp: "a conditional expression (use an if statement on scalars, or where)",
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.GeneratorExp: "a generator",
    ast.List: "a list", ast.Dict: "a dict", ast.Import: "an import",
    ast.ImportFrom: "an import", ast.Global: "global", ast.Nonlocal: "nonlocal",
    ast.With: "a with block", ast.Try: "a try block", ast.Raise: "raise",
    ast.Assert: "assert", ast.FunctionDef: "a nested function", ast.Starred: "unpacking",
}


def _stand_in(name: str) -> Callable[..., Any]:
    def operation(*args: Any) -> Any:
        raise RuntimeError(f"{name} is an operation of the rule language: it runs inside an "
                           "update rule, where each backend binds it (see "
                           "optim_core.update_rule)")

    operation.__name__ = operation.__qualname__ = name
    operation.__doc__ = (f"Stand-in for the rule language's ``{name}``, for linters and "
                         "editors; a rule's call is bound to the backend's operation.")
    return operation


# Importable stand-ins of the operations (a rule's own calls are bound per backend by
# UpdateRule.bind, whatever its module holds). abs and sum are Python's builtin names
# already (linters know them; __getattr__ gives their stand-ins, as for any operation
# added later).
sqrt = _stand_in("sqrt")
maximum = _stand_in("maximum")
minimum = _stand_in("minimum")
sign = _stand_in("sign")
lerp = _stand_in("lerp")
where = _stand_in("where")
norm = _stand_in("norm")
size = _stand_in("size")
row_mean = _stand_in("row_mean")
col_mean = _stand_in("col_mean")
orthogonalize = _stand_in("orthogonalize")


def __getattr__(name: str) -> Any:
    if name in OPERATIONS:
        return _stand_in(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer's elementwise update, parsed and checked when it was defined.

    Made by :func:`update_rule`; an :class:`~optim_core.Optimizer` subclass names one
    as its ``rule``.

    Attributes
    ----------
    function : callable
        The rule as written; its globals are rebound per backend by :meth:`bind`.
    states : tuple of str
        Names of the per-element state buffers, in argument order.
    optional_states : frozenset of str
        States that exist only under some hyperparameters (or, for shaped states, on
        tensors of some numbers of dimensions).
    scalars : tuple of str
        Names of the keyword-only scalar arguments.
    tree : ast.FunctionDef
        The checked syntax tree (decorators removed) the fused kernels are generated from.
    state_shapes : mapping of str to str
        Each state not of the parameter's shape, with its kind (see :data:`STATE_SHAPES`).
    """

    function: Callable[..., tuple]
    states: tuple[str, ...]
    optional_states: frozenset[str]
    scalars: tuple[str, ...]
    tree: ast.FunctionDef = field(repr=False, compare=False)
    state_shapes: Mapping[str, str] = field(default_factory=dict, compare=False)

    def holds_state(self, name: str, ndim: int) -> bool:
        """Whether a tensor of ``ndim`` dimensions can have state ``name``: "rows" and
        "cols" states need two or more, "unfactored" ones fewer, full ones any."""
        kind = self.state_shapes.get(name, "full")
        return kind == "full" or (ndim >= 2) == (kind != "unfactored")

    def state_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of state ``name`` of a parameter of ``shape`` (which can hold it)."""
        kind = self.state_shapes.get(name, "full")
        if kind == "rows":
            return (*shape[:-1], 1)
        if kind == "cols":
            return (*shape[:-2], 1, shape[-1])
        return tuple(shape)

    def same_states(self, names: tuple[str, ...], ndim: int,
                    expected: tuple[str, ...]) -> bool:
        """Whether a tensor of ``ndim`` dimensions holding ``names`` has the states of one
        that holds ``expected``, the states their shapes allow apart (a vector's
        ``variance`` is a matrix's ``row_var`` and ``col_var``)."""
        if not self.state_shapes:
            return names == expected
        # The other tensor's kind, from a shaped state it holds (the same as this one's
        # where it holds none: then neither may hold a shaped state the other lacks).
        other = ndim
        for name in expected:
            kind = self.state_shapes.get(name)
            if kind is not None:
                other = 1 if kind == "unfactored" else 2
                break

        def view(held: tuple[str, ...], dims: int) -> set[str]:
            return set(held) | {n for n in self.states if not self.holds_state(n, dims)}

        return view(names, ndim) == view(expected, other)

    @functools.cached_property
    def axis_reductions(self) -> tuple[str, ...]:
        """The axis reductions the rule calls (``row_mean``, ``col_mean``), in source
        order; a rule with any, or with shaped states, runs on the generic path."""
        return tuple(node.func.id for node in ast.walk(self.tree)
                     if isinstance(node, ast.Call) and node.func.id in AXIS_REDUCTIONS)

    @property
    def name(self) -> str:
        """The rule's function name (it names the generated kernels)."""
        return self.function.__name__

    @functools.cached_property
    def matrix_operations(self) -> tuple[str, ...]:
        """The matrix operations the rule calls (empty for an elementwise rule)."""
        return tuple(sorted({node.func.id for node in ast.walk(self.tree)
                             if isinstance(node, ast.Call)
                             and node.func.id in MATRIX_OPERATIONS}))

    # The tree never changes, so each walk is done once: steps ask these per tensor.
    @functools.cached_property
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
        """Apply the rule to arrays of namespace ``xp`` (the generic path).

        Parameters
        ----------
        xp : module
            An array API namespace (``array_api_compat.array_namespace(param)``).
        param, grad : arrays
        states : mapping
            The state arrays by name; an absent optional state is passed as None.
        scalars : mapping
            Every keyword scalar of the rule by name.

        Returns
        -------
        tuple
            The new parameter and new states, as the rule returns them (nothing is
            written in place).
        """
        fn = self.bind(generic_operations(xp))
        return fn(param, grad, *(states.get(name) for name in self.states), **scalars)


def update_rule(function: Callable | None = None, *,
                optional_states: tuple[str, ...] = (),
                state_shapes: Mapping[str, str] | None = None) -> Any:
    """Turn a function in the rule language into an :class:`UpdateRule`.

    Use it as a decorator, ``@update_rule`` or ``@update_rule(optional_states=(...))``.
    The function's source is read (:func:`inspect.getsource`: define rules in a file,
    a module or a notebook cell, not at an interactive prompt), parsed and checked
    against the language of :mod:`optim_core.optim.language` once, here.

    Parameters
    ----------
    function : callable, optional
        ``def name(param, grad, *states, *, scalars...)`` in the rule language.
    optional_states : tuple of str
        States allocated only when the optimizer's ``active_states`` asks for them;
        the rule touches them only under an ``if`` that is false when they are absent.
    state_shapes : mapping of str to str, optional
        States not of the parameter's shape, each with its kind ("rows", "cols" or
        "unfactored", see the module docstring); each must be optional.

    Returns
    -------
    UpdateRule, or a decorator making one

    Raises
    ------
    RuleError
        If the function is outside the language (a TypeError subclass; the message
        names the rule, the line and the construct).

    Examples
    --------
    Sign descent with momentum (the names of the operations are bound when the rule
    runs; ``from optim_core.optim.language import sign`` lets linters see ``sign``):

    >>> from optim_core import update_rule
    >>> @update_rule
    ... def signum(param, grad, momentum_buffer, *, lr, beta1):
    ...     momentum_buffer = beta1 * momentum_buffer + (1 - beta1) * grad
    ...     param = param - lr * sign(momentum_buffer)
    ...     return param, momentum_buffer                     # doctest: +SKIP
    """
    if function is not None:
        if not callable(function):
            raise TypeError("update_rule is used as @update_rule or "
                            "@update_rule(optional_states=(...)); got "
                            f"{type(function).__name__}")
        return update_rule(optional_states=optional_states,
                           state_shapes=state_shapes)(function)
    if isinstance(optional_states, str) or not all(
            isinstance(name, str) for name in optional_states):
        raise TypeError(f"optional_states must be a tuple of state names, got "
                        f"{optional_states!r}")
    shapes = dict(state_shapes or {})
    if not all(isinstance(k, str) and v in STATE_SHAPES for k, v in shapes.items()):
        raise TypeError(f"state_shapes maps state names to one of {STATE_SHAPES}, got "
                        f"{state_shapes!r}")

    def decorate(function: Callable) -> UpdateRule:
        name = getattr(function, "__name__", repr(function))
        tree = _parsed(function, name, name)
        args = tree.args
        at = _place(name, function, tree)
        if args.vararg or args.kwarg or args.posonlyargs or args.defaults or any(
                d is not None for d in args.kw_defaults):
            raise RuleError(f"{at}: arguments are (param, grad, *states, *, scalars...) "
                            "with no defaults, *args or **kwargs")
        positional = [a.arg for a in args.args]
        scalars = tuple(a.arg for a in args.kwonlyargs)
        if positional[:2] != ["param", "grad"]:
            raise RuleError(f"{at}: must start with (param, grad, ...), got "
                            f"({', '.join(positional)})")
        states = tuple(positional[2:])
        unknown = set(optional_states) - set(states)
        if unknown:
            raise RuleError(f"rule {name}: unknown optional states {sorted(unknown)} "
                            f"(its states are {list(states)})")
        shaped = {k for k, v in shapes.items() if v != "full"}
        if set(shapes) - set(states) or shaped - set(optional_states):
            raise RuleError(f"rule {name}: state_shapes names {sorted(shapes)}: each must be "
                            f"one of its states {list(states)} and optional (a tensor holds "
                            "it only where its number of dimensions allows)")
        written = function
        tree.body, inlined = _inline.inline(
            tree.body, functools.partial(_fragment_named, written),
            lambda node, message: RuleError(f"{_place(name, written, node)}: {message}"))
        _check_language(tree, name, set(scalars), ("param", *states),
                        lambda node: _place(name, written, node))
        _check_shapes(tree, states, shapes, set(scalars),
                      lambda node: _place(name, written, node))
        if inlined:
            # The generic path runs the expanded lines too (bind rebinds its globals).
            function = _compiled(tree, written)
        return UpdateRule(function, states, frozenset(optional_states), scalars, tree,
                          {k: v for k, v in shapes.items() if v != "full"})

    return decorate


@dataclass(frozen=True)
class RuleFragment:
    """Lines of the rule language shared by several rules, made by :func:`rule_fragment`.

    A rule calls it as ``a, b = fragment(array, ..., scalar=value, ...)``;
    :func:`update_rule` expands the call into the fragment's lines (see the module
    docstring), so a fragment is never called at run time.

    Attributes
    ----------
    name : str
    arrays : tuple of str
        The positional (array) arguments, in order.
    scalars : tuple of str
        The keyword-only (scalar) arguments.
    returns : tuple of str
        The names it returns, in order.
    tree : ast.FunctionDef
        Its checked syntax tree, fragment calls of its own expanded.
    """

    name: str
    arrays: tuple[str, ...]
    scalars: tuple[str, ...]
    returns: tuple[str, ...]
    tree: ast.FunctionDef = field(repr=False, compare=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} is a rule fragment: it is expanded inside the update "
                           "rules that call it (see optim_core.optim.language.rule_fragment)")


def rule_fragment(function: Callable) -> RuleFragment:
    """Turn a function in the rule language into a :class:`RuleFragment` (a decorator).

    ``def name(array, ..., *, scalar, ...)``: its statements are those of a rule
    (assignments to plain names, ``if`` blocks on scalars), reading only its arguments
    and what it assigns, never assigning a scalar argument; it ends with ``return a,
    b`` or ``return a`` of names. Checked here, once; the rules that call it are checked
    again with its lines expanded.

    Raises
    ------
    RuleError
        If the function is outside the language or its form.

    Examples
    --------
    >>> from optim_core.optim.language import rule_fragment
    >>> @rule_fragment
    ... def sign_flipped(grad, *, maximize):
    ...     if maximize:
    ...         grad = -grad
    ...     return grad                                        # doctest: +SKIP
    """
    if not callable(function):
        raise TypeError(f"rule_fragment decorates a function, got {type(function).__name__}")
    name = getattr(function, "__name__", repr(function))
    label = f"fragment {name}"
    tree = _parsed(function, name, label)

    def place(node: ast.AST) -> str:
        return _place(label, function, node)

    args = tree.args
    if args.vararg or args.kwarg or args.posonlyargs or args.defaults or not args.args \
            or any(d is not None for d in args.kw_defaults):
        raise RuleError(f"{place(tree)}: arguments are (array, ..., *, scalar, ...), at "
                        "least one array, with no defaults, *args or **kwargs")
    if name in OPERATIONS:
        raise RuleError(f"rule {label}: {name} is the name of an operation")
    arrays = tuple(a.arg for a in args.args)
    scalars = tuple(a.arg for a in args.kwonlyargs)
    tree.body, _ = _inline.inline(tree.body, functools.partial(_fragment_named, function),
                                  lambda node, message: RuleError(f"{place(node)}: {message}"))
    last = tree.body[-1]
    value = getattr(last, "value", None)
    returned = value.elts if isinstance(value, ast.Tuple) else [value]
    if not isinstance(last, ast.Return) or not all(isinstance(v, ast.Name) for v in returned):
        raise RuleError(f"{place(last)}: a fragment ends with 'return a, b' (or 'return a') "
                        "of names")
    returns = tuple(v.id for v in returned)
    # Checked as a rule whose arrays are the fragment's, returning them all.
    checked = copy.deepcopy(tree)
    checked.body[-1] = ast.copy_location(ast.Return(ast.Tuple(
        [ast.Name(a, ast.Load()) for a in arrays], ast.Load())), last)
    _check_language(checked, label, set(scalars), arrays, place)
    assigned = {n.targets[0].id for n in ast.walk(tree) if isinstance(n, ast.Assign)}
    if assigned & set(scalars):
        raise RuleError(f"rule {label}: assigns its scalar arguments "
                        f"{sorted(assigned & set(scalars))}")
    unknown = set(returns) - set(arrays) - assigned
    if unknown:
        raise RuleError(f"{place(last)}: returns {sorted(unknown)}, neither an argument nor "
                        "assigned")
    return RuleFragment(name, arrays, scalars, returns, tree)


def _parsed(function: Callable, name: str, label: str) -> ast.FunctionDef:
    """The syntax tree of ``function`` (a rule or fragment named ``name``, called ``label``
    in messages), read from its source, decorators removed."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as exc:
        raise RuleError(f"rule {label}: its source cannot be read ({exc}); define it with "
                        "def in a file, a module or a notebook cell") from None
    tree = ast.parse(source).body[0]
    if not isinstance(tree, ast.FunctionDef) or tree.name != name:
        raise RuleError(f"rule {label}: a rule or fragment is a function defined with def")
    tree.decorator_list = []
    return tree


def _fragment_named(function: Callable, name: str) -> RuleFragment | None:
    """The fragment ``name`` means where ``function`` was defined (a closure variable
    or a global of its module), or None."""
    if name in OPERATIONS:
        return None
    code = getattr(function, "__code__", None)
    cells = dict(zip(code.co_freevars, getattr(function, "__closure__", None) or ())) \
        if code is not None else {}
    try:
        value = cells[name].cell_contents if name in cells \
            else getattr(function, "__globals__", {}).get(name)
    except ValueError:  # an empty cell
        return None
    return value if isinstance(value, RuleFragment) else None


def _compiled(tree: ast.FunctionDef, written: Callable) -> Callable:
    """The function of ``tree`` (a rule with its fragments expanded), placed at
    ``written``'s lines for tracebacks."""
    module = ast.Module(body=[copy.deepcopy(tree)], type_ignores=[])
    ast.fix_missing_locations(module)
    code = written.__code__
    ast.increment_lineno(module, code.co_firstlineno - 1)
    compiled = compile(module, code.co_filename, "exec")
    (function_code,) = [c for c in compiled.co_consts if isinstance(c, types.CodeType)]
    function = types.FunctionType(function_code, written.__globals__, written.__name__)
    function.__qualname__ = written.__qualname__
    function.__module__ = written.__module__
    function.__doc__ = written.__doc__
    return function


def _place(name: str, function: Callable, node: ast.AST) -> str:
    """``rule NAME (file, line N)`` for messages: where the user wrote ``node``."""
    code = getattr(function, "__code__", None)
    line = getattr(node, "lineno", None)
    if code is None or line is None:
        return f"rule {name}"
    return f"rule {name} ({code.co_filename}, line {code.co_firstlineno + line - 1})"


def _check_language(tree: ast.FunctionDef, name: str, scalars: set[str],
                    returned: tuple[str, ...],
                    place: Callable[[ast.AST], str] | None = None) -> None:
    place = place or (lambda node: f"rule {name}")
    # ast.walk visits an assignment before its value: the calls seen as whole values.
    matrix_calls: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        # An operator has no line of its own: it is refused with its expression's.
        operators = [node.op] if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp)) \
            else list(node.ops) if isinstance(node, ast.Compare) else []
        for refused in [n for n in operators if not isinstance(n, _ALLOWED_NODES)] + (
                [node] if not isinstance(node, _ALLOWED_NODES) or (
                    isinstance(node, ast.FunctionDef) and node is not tree) else []):
            what = _REFUSED.get(type(refused), f"{type(refused).__name__}")
            raise RuleError(f"{place(node)}: {what} is not allowed in a rule")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in OPERATIONS):
                called = ast.unparse(node.func)
                raise RuleError(f"{place(node)}: {called}() cannot be called in a rule; "
                                f"only the operations {', '.join(OPERATIONS)} can")
            if node.keywords or (node.func.id in (*REDUCTIONS, *AXIS_REDUCTIONS)
                                 and len(node.args) != 1):
                raise RuleError(f"{place(node)}: {ast.unparse(node)!r}: operations take "
                                "positional arguments, a reduction exactly one")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "id", None) in MATRIX_OPERATIONS:
            matrix_calls.add(id(node.value))
            _check_matrix_call(node.value, name, scalars)
        if isinstance(node, ast.Call) and node.func.id in MATRIX_OPERATIONS \
                and id(node) not in matrix_calls:
            raise RuleError(f"{place(node)}: a matrix operation ({node.func.id}) must be "
                            "the whole value of an assignment")
        if isinstance(node, ast.If):
            used = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if not used <= scalars:
                raise RuleError(f"{place(node)}: an if may only test scalars, not "
                                f"{sorted(used - scalars)} (choose per element with where)")
        if isinstance(node, ast.Assign) and not (
            len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            raise RuleError(f"{place(node)}: assign to one plain name at a time")
    # A rule's own name for an operation it calls would shadow it on the generic path.
    bound = {a.arg for a in (*tree.args.args, *tree.args.kwonlyargs)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)}
    if bound & called:
        raise RuleError(f"rule {name}: {sorted(bound & called)} both names a value and is "
                        "called")
    _check_names(tree, scalars, returned, place)
    _check_elementwise_choices(tree, name, _array_names(tree, returned))
    last = tree.body[-1]
    if not (isinstance(last, ast.Return) and isinstance(last.value, ast.Tuple)
            and tuple(getattr(e, "id", None) for e in last.value.elts) == returned):
        raise RuleError(f"{place(last)}: must end with 'return {', '.join(returned)}'")
    if any(isinstance(n, ast.Return) for n in ast.walk(tree) if n is not last):
        raise RuleError(f"rule {name}: only one return, at the end")


def _check_names(tree: ast.FunctionDef, scalars: set[str], arrays: tuple[str, ...],
                 place: Callable[[ast.AST], str]) -> None:
    """Every name read is an argument, an operation called, or assigned somewhere."""
    known = {"grad", *arrays, *scalars,
             *(n.targets[0].id for n in ast.walk(tree) if isinstance(n, ast.Assign))}
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and \
                node.id not in known and id(node) not in called:
            hint = " (an operation is only called, as in sqrt(x))" \
                if node.id in OPERATIONS else ""
            raise RuleError(f"{place(node)}: {node.id!r} is neither an argument nor assigned "
                            f"in the rule{hint}")


def _check_matrix_call(call: ast.Call, name: str, scalars: set[str]) -> None:
    """A matrix operation: one elementwise operand, then scalar arguments, no keywords."""
    if call.keywords or len(call.args) < 2:
        raise RuleError(f"rule {name}: {call.func.id} takes an array and scalar arguments, "
                        "positionally")
    for argument in call.args[1:]:
        used = {n.id for n in ast.walk(argument) if isinstance(n, ast.Name)} \
            - set(OPERATIONS)
        if not used <= scalars:
            raise RuleError(f"rule {name}: the arguments of {call.func.id} after the first "
                            f"must be scalars, not {sorted(used - scalars)}")
    if any(isinstance(n, ast.Call) and n.func.id in MATRIX_OPERATIONS
           for n in ast.walk(call.args[0])):
        raise RuleError(f"rule {name}: matrix operations may not be nested")


def mentions(node: ast.AST, names: set[str]) -> bool:
    """Whether the expression or statement ``node`` reads any of ``names``."""
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def _array_names(tree: ast.FunctionDef, arrays: tuple[str, ...]) -> set[str]:
    """The names that hold an array somewhere: the array arguments, and any name assigned
    an expression of arrays (flow-insensitive, so a name that is an array in one branch
    counts as one everywhere)."""
    return dependents(tree, {"grad", *arrays})


def dependents(tree: ast.FunctionDef, names: set[str]) -> set[str]:
    """``names`` and every name the rule assigns an expression of them (flow-insensitive:
    a name assigned from them in any branch counts everywhere)."""
    names = set(names)
    assignments = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)]
    changed = True
    while changed:
        changed = False
        for node in assignments:
            target = node.targets[0].id
            if target not in names and mentions(node.value, names):
                names.add(target)
                changed = True
    return names


def _check_elementwise_choices(tree: ast.FunctionDef, name: str, arrays: set[str]) -> None:
    """``where``'s form, and no comparison or logic of arrays anywhere else."""
    conditions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.func.id == "where":
            if len(node.args) != 3:
                raise RuleError(f"rule {name}: where takes (condition, a, b)")
            condition, *sides = node.args
            if not (isinstance(condition, ast.Compare) and len(condition.ops) == 1
                    and mentions(condition, arrays)):
                raise RuleError(f"rule {name}: where's condition must be one comparison "
                                f"of arrays, not {ast.unparse(condition)!r} (test scalars "
                                "with an if)")
            if not any(mentions(side, arrays) for side in sides):
                raise RuleError(f"rule {name}: where needs an array as a or b, got "
                                f"{ast.unparse(node)!r}")
            conditions.add(id(condition))
    for node in ast.walk(tree):
        logical = isinstance(node, (ast.Compare, ast.BoolOp)) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
        if logical and id(node) not in conditions and mentions(node, arrays):
            raise RuleError(f"rule {name}: {ast.unparse(node)!r} compares arrays outside "
                            "where's condition")


#: The axes a value varies along: leading ones, rows (axis -2), columns (axis -1).
_ALL_AXES = frozenset({"leading", "rows", "cols"})
_KIND_AXES = {"full": _ALL_AXES, "unfactored": _ALL_AXES,
              "rows": frozenset({"leading", "rows"}), "cols": frozenset({"leading", "cols"})}


def _check_shapes(tree: ast.FunctionDef, states: tuple[str, ...], shapes: Mapping[str, str],
                  scalars: set[str], place: Callable[[ast.AST], str]) -> None:
    """Infer each value's axes (flow-insensitive, to a fixed point) and refuse a state
    assigned a value varying along an axis it lacks, and an axis reduction of scalars."""
    declared = {"param": _ALL_AXES, "grad": _ALL_AXES,
                **{s: _KIND_AXES[shapes.get(s, "full")] for s in states}}
    axes: dict[str, frozenset] = dict(declared)
    assignments = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)]

    def of(node: ast.AST) -> frozenset | None:  # None: a host scalar
        if isinstance(node, ast.Name):
            return axes.get(node.id)
        if isinstance(node, ast.Call):
            parts = [of(a) for a in node.args]
            if node.func.id in REDUCTIONS:
                return frozenset()
            if node.func.id in AXIS_REDUCTIONS:
                if parts[0] is None:
                    raise RuleError(f"{place(node)}: {ast.unparse(node)!r}: an axis "
                                    "reduction is of an array expression, not of scalars")
                return parts[0] - {"cols" if node.func.id == "row_mean" else "rows"}
        else:
            parts = [of(child) for child in ast.iter_child_nodes(node)
                     if isinstance(child, ast.expr)]
        known = [p for p in parts if p is not None]
        return frozenset().union(*known) if known else None

    changed = True
    while changed:
        changed = False
        for node in assignments:
            target, value = node.targets[0].id, of(node.value)
            if value is None or target in declared:
                continue
            merged = axes.get(target, frozenset()) | value
            if merged != axes.get(target):
                axes[target], changed = merged, True
    for node in assignments:
        target, value = node.targets[0].id, of(node.value)
        if target in declared and value is not None and not value <= declared[target]:
            kind = shapes.get(target, "full")
            raise RuleError(f"{place(node)}: state {target!r} is {kind!r}-shaped but is "
                            f"assigned {ast.unparse(node.value)!r}, which varies along "
                            f"{sorted(value - declared[target])} too")
