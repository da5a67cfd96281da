"""Lowering of an update rule into a straight-line elementwise kernel body.

Both fused emitters (:mod:`optim_core.backends._numba`, :mod:`optim_core.backends._cuda`)
start from the rule's syntax tree through this module, so the math of every fused
kernel is the rule as written, never a retyped copy.

For one step, :func:`lower` walks ``rule.tree`` with that step's scalars:

* Every ``if`` tests scalars only, so its outcome is known on the host: the taken
  branch is inlined and the outcome becomes part of the specialization key. A key
  changes only when a structural flag flips (``amsgrad``, ``weight_decay != 0``,
  RAdam's ``rectify``, SGD's ``first_step``), never when a value such as ``lr`` changes.
* Every maximal scalar-only subexpression that feeds elementwise math (``1 - beta2``,
  ``step_size``, a bare literal) is *hoisted*: evaluated here in Python float64, exactly
  as the generic path evaluates it, and passed to the kernel as an argument cast to the
  parameter dtype. Kernels therefore contain no literals and never promote float32
  math to float64, and a new ``lr`` is only a new argument value.
* ``lerp`` with a scalar weight is expanded into torch's two-sided formula, the side
  chosen on the host (``abs(weight) < 0.5``) as the generic ``lerp`` of
  :mod:`._operations` does, so the emitters only implement
  :data:`ELEMENTWISE_OPERATIONS`.
* ``where``'s condition, a comparison of arrays, becomes a ``("cmp", ...)``
  expression: the one place a kernel body compares, element by element (no branch:
  both sides are computed, then one is selected).

* A per-tensor reduction (``sum``, ``norm``) becomes a :class:`Reduction` of its
  lowered argument, and its value a leaf ``("reduced", index)`` of the expressions
  after it. Each reduction has a *stage*: 0 if its argument depends on no reduction,
  else one more than the latest stage it depends on. A fused step runs one pass per
  stage, accumulating that stage's reductions (:meth:`Kernel.reduction_pass` gives
  the body each needs), then the elementwise pass, which reads them all. Reductions
  are numbered by stage, so the values a pass reads are those before its own.

The result, a :class:`Kernel`, lists which arrays are read and written and the body as
nested tuples; :attr:`Kernel.key` identifies the specialization for caching.

A rule that calls a matrix operation (Muon's ``orthogonalize``) is lowered by
:func:`lower_stages` instead: the same walk, cut at each matrix operation into
elementwise stages (a :class:`StagedKernel`), whose operands and results pass through
arrays; :mod:`._staged` runs the stages as kernels and the operations between them.

Where a step's host values come from
------------------------------------
Two stages, each in one place. The optimizer derives the rule's keyword scalars
(hyperparameters, bias corrections, ...) in
:meth:`optim_core.optim.base.Optimizer.step_scalars`. This module then evaluates the
rule's own scalar-only expressions on them (the branch tests, the lerp sides, the
hoisted values) by walking the tree, as above. The walk is the definition; since it
does the same host work every step of a specialization, each walk's record of that
work is also compiled into a :class:`HostProgram`, straight-line Python that later
steps call instead of walking again: it checks the branch outcomes still hold and
returns the hoisted values, evaluated by the same expressions in the same order
(``HostProgram.source`` shows it). A step whose outcomes differ from every program's
walks the tree, and its walk becomes another program.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._operations import AXIS_REDUCTIONS, MATRIX_OPERATIONS, REDUCTIONS
from ._operations import HOST_OPERATIONS as _HOST_OPERATIONS

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["Kernel", "Reduction", "ReductionPass", "HostProgram", "lower", "host_programs",
           "program_entry", "known_program", "render", "reductions_taken", "unsupported_reason",
           "ELEMENTWISE_OPERATIONS", "lower_stages", "StagedKernel", "MatrixStep"]

#: Operations an emitter must implement (``lerp`` is expanded before emission).
ELEMENTWISE_OPERATIONS = ("sqrt", "abs", "maximum", "minimum", "sign", "where")

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_COMPARISONS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
                ast.NotEq: "!="}


@dataclass(frozen=True)
class Reduction:
    """One per-tensor reduction of a kernel.

    Attributes
    ----------
    kind : str
        ``"sum"`` (the sum of ``expr``), ``"norm"`` (the square root of the sum of its
        squares) or ``"size"`` (the number of elements: 1 per element); accumulated in
        float64. Or an axis reduction, ``"row_mean"`` or ``"col_mean"``, whose value is
        one per row or column (:mod:`._factored` lowers those).
    expr : tuple
        The lowered argument, an expression as in :attr:`Kernel.body`.
    stage : int
        The pass that accumulates it: 0 if it depends on no other reduction.
    """

    kind: str
    expr: tuple
    stage: int


@dataclass(frozen=True)
class ReductionPass:
    """What one reduction pass computes per element: the arrays it reads, the part of
    the body its reductions need, and which reductions (indices) it accumulates; it reads
    the values of reductions ``0 .. first - 1`` (earlier stages)."""

    loads: tuple[str, ...]
    body: tuple
    reductions: tuple[int, ...]
    first: int


@dataclass(frozen=True)
class Kernel:
    """One specialization of a rule: a straight-line elementwise body.

    Attributes
    ----------
    rule : str
        The rule's name.
    key : tuple
        The host decisions (branch outcomes, lerp sides) and present states that
        produced this body; equal keys give identical bodies.
    loads : tuple of str
        Arrays (``param``, ``grad``, states) read by the body, in argument order.
    stores : tuple of str
        Arrays written back (``param`` and states), in argument order.
    arrays : tuple of str
        Every array argument of the kernel, in order: ``param``, ``grad``, then the
        present states.
    n_hoisted : int
        Number of scalar arguments ``h0 .. h{n-1}`` following the arrays.
    body : tuple
        ``(target, expr)`` assignments. An ``expr`` is ``("load", name)``,
        ``("local", name)``, ``("hoisted", index)``, ``("neg", expr)``,
        ``("bin", op, left, right)`` with op in ``+ - * /``,
        ``("call", operation, (expr, ...))``, ``("cmp", op, left, right)`` with op
        in ``< <= > >= == !=`` (only as ``where``'s first argument), or
        ``("reduced", index)``, the value of a reduction.
    results : dict
        For each stored array, the local holding its new value.
    reductions : tuple of Reduction
        The per-tensor reductions, ordered by stage (empty for an elementwise rule).
    """

    rule: str
    key: tuple
    loads: tuple[str, ...]
    stores: tuple[str, ...]
    arrays: tuple[str, ...]
    n_hoisted: int
    body: tuple
    results: Mapping[str, str] = field(compare=False)
    reductions: tuple[Reduction, ...] = ()

    @property
    def digest(self) -> str:
        """A short stable hash of the rule and this specialization, for names and caches."""
        text = repr((self.rule, self.key, self.body, self.reductions))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def n_stages(self) -> int:
        """Number of reduction passes before the elementwise pass (0 for none)."""
        return 1 + self.reductions[-1].stage if self.reductions else 0

    def reduction_pass(self, stage: int) -> ReductionPass:
        """The per-element work of reduction pass ``stage``: only the assignments its
        reductions' arguments need, and only the arrays those read."""
        indices = tuple(i for i, r in enumerate(self.reductions) if r.stage == stage)
        needed: set[str] = set()
        loads: set[str] = set()
        for i in indices:
            if self.reductions[i].kind != "size":  # a count: its argument is not computed
                references(self.reductions[i].expr, needed, loads)
        body = []
        for target, expr in reversed(self.body):
            if target in needed:
                body.append((target, expr))
                references(expr, needed, loads)
        return ReductionPass(tuple(a for a in self.arrays if a in loads), tuple(reversed(body)),
                             indices, indices[0])


def references(expr: tuple, locals_: set[str], loads: set[str],
               reductions: set[int] | None = None) -> None:
    """Add the locals, arrays and (where ``reductions`` is given) reductions ``expr`` reads
    to ``locals_``, ``loads`` and ``reductions``: every part of it, ``where``'s condition
    (a ``cmp``) included."""
    kind = expr[0]
    if kind == "local":
        locals_.add(expr[1])
    elif kind == "load":
        loads.add(expr[1])
    elif kind == "reduced":
        if reductions is not None:
            reductions.add(expr[1])
    elif kind == "neg":
        references(expr[1], locals_, loads, reductions)
    elif kind in ("bin", "cmp"):
        references(expr[2], locals_, loads, reductions)
        references(expr[3], locals_, loads, reductions)
    elif kind == "call":
        for argument in expr[2]:
            references(argument, locals_, loads, reductions)


def _level(expr: tuple, levels: Mapping[str, int], reductions: list) -> int:
    """0 if ``expr`` reads no reduction, else 1 + the latest stage it reads."""
    kind = expr[0]
    if kind == "reduced":
        return reductions[expr[1]].stage + 1
    if kind == "local":
        return levels.get(expr[1], 0)
    if kind == "neg":
        return _level(expr[1], levels, reductions)
    if kind in ("bin", "cmp"):
        return max(_level(expr[2], levels, reductions), _level(expr[3], levels, reductions))
    if kind == "call":
        return max((_level(a, levels, reductions) for a in expr[2]), default=0)
    return 0


def substitute_reductions(expr: tuple, values: Mapping[int, tuple]) -> tuple:
    """``expr`` with each ``("reduced", i)`` of ``values`` replaced by ``values[i]``."""
    kind = expr[0]
    if kind == "reduced":
        return values.get(expr[1], expr)
    if kind == "neg":
        return ("neg", substitute_reductions(expr[1], values))
    if kind in ("bin", "cmp"):
        return (kind, expr[1], substitute_reductions(expr[2], values),
                substitute_reductions(expr[3], values))
    if kind == "call":
        return ("call", expr[1], tuple(substitute_reductions(a, values) for a in expr[2]))
    return expr


def renumber(expr: tuple, order: Mapping[int, int]) -> tuple:
    """``expr`` with each ``("reduced", i)`` read as ``("reduced", order[i])``."""
    return substitute_reductions(expr, {i: ("reduced", j) for i, j in order.items()})


@dataclass
class _Lowering:
    rule: UpdateRule
    scalars: Mapping[str, Any]
    present: frozenset[str]
    build: bool
    decisions: list = field(default_factory=list)
    hoisted: list = field(default_factory=list)
    body: list = field(default_factory=list)
    # Per name: "array" (elementwise local or argument) or the scalar's host value.
    env: dict = field(default_factory=dict)
    local_names: dict = field(default_factory=dict)
    loads: set = field(default_factory=set)
    versions: dict = field(default_factory=dict)
    # Every host evaluation in order, for this specialization's HostProgram.
    trace: list = field(default_factory=list)
    # Staged lowering (rules with matrix operations, see lower_stages): the current
    # stage, the stage of each body entry, the arrays each stage loads, the matrix
    # operations met, and the locals a later stage reads.
    staged: bool = False
    stage: int = 0
    body_stages: list = field(default_factory=list)
    stage_loads: list = field(default_factory=lambda: [set()])
    local_stage: dict = field(default_factory=dict)
    matrix: list = field(default_factory=list)
    carries: dict = field(default_factory=dict)
    # Per-tensor reductions in the order met, and each local's level (see _level).
    reductions: list = field(default_factory=list)
    levels: dict = field(default_factory=dict)

    def run(self) -> None:
        self.env.update(self.scalars)
        self.env["param"] = self.env["grad"] = _ARRAY
        for name in self.rule.states:
            self.env[name] = _ARRAY if name in self.present else _ABSENT
        self.block(self.rule.tree.body[:-1])

    # ---------------------------------------------------------------- statements
    def block(self, statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Expr):
                continue  # docstring
            if isinstance(statement, ast.If):
                taken = bool(self.evaluate(statement.test))
                self.decisions.append(taken)
                self.trace.append(("test", statement.test, taken))
                self.block(statement.body if taken else statement.orelse)
                continue
            assert isinstance(statement, ast.Assign)
            target = statement.targets[0].id
            value = statement.value
            if isinstance(value, ast.Call) and value.func.id in MATRIX_OPERATIONS:
                self.matrix_operation(target, value)
                continue
            if self.is_scalar(statement.value):
                self.env[target] = self.evaluate(statement.value)
                self.trace.append(("assign", target, statement.value))
                self.local_names.pop(target, None)
                continue
            expr = self.expression(statement.value)
            self.env[target] = _ARRAY
            if self.build:
                version = self.versions[target] = self.versions.get(target, -1) + 1
                local = f"{target}_{version}"
                self.body.append((local, expr))
                self.body_stages.append(self.stage)
                self.local_stage[local] = self.stage
                self.local_names[target] = local
                self.levels[local] = _level(expr, self.levels, self.reductions)

    # ---------------------------------------------------------------- expressions
    def is_scalar(self, node: ast.expr) -> bool:
        _, names, _, reduces = _analysis(node)
        if reduces:
            return False
        env = self.env
        for name in names:
            value = env.get(name)
            if value is _ARRAY or value is _ABSENT:
                return False
        return True

    def evaluate(self, node: ast.expr) -> Any:
        try:
            return eval(_analysis(node)[2], _HOST_GLOBALS, self.env)  # noqa: S307
        except NameError as exc:
            raise ValueError(f"rule {self.rule.name}: scalar missing: {exc}") from None

    def expression(self, node: ast.expr) -> tuple | None:
        if self.is_scalar(node):
            value = self.evaluate(node)
            self.hoisted.append(value)
            self.trace.append(("hoist", None, node))
            return ("hoisted", len(self.hoisted) - 1)
        if isinstance(node, ast.Name):
            if self.env[node.id] is _ABSENT:
                raise ValueError(f"rule {self.rule.name}: state {node.id!r} is used but was "
                                 "not allocated under these hyperparameters")
            if node.id in self.local_names:
                local = self.local_names[node.id]
                if isinstance(local, tuple):  # a matrix operation's result, an array
                    self.stage_loads[self.stage].add(local[1])
                    return ("load", local[1])
                stage = self.local_stage.get(local, self.stage)
                if stage != self.stage:  # computed by an earlier stage: kept in an array
                    self.carries[local] = stage
                    self.stage_loads[self.stage].add(f"t_keep_{local}")
                    return ("load", f"t_keep_{local}")
                return ("local", local)
            self.loads.add(node.id)
            self.stage_loads[self.stage].add(node.id)
            return ("load", node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return self.wrap("neg", self.expression(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.wrap("bin", _BINOPS[type(node.op)], self.expression(node.left),
                             self.expression(node.right))
        if isinstance(node, ast.Call) and (node.func.id in REDUCTIONS
                                           or node.func.id in AXIS_REDUCTIONS):
            if self.is_scalar(node.args[0]):
                raise ValueError(f"rule {self.rule.name}: {ast.unparse(node)!r} reduces "
                                 "scalars only; a reduction is of an elementwise expression")
            argument = self.expression(node.args[0])
            stage = _level(argument, self.levels, self.reductions) if self.build else 0
            self.reductions.append(Reduction(node.func.id, argument, stage))
            return self.wrap("reduced", len(self.reductions) - 1)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 \
                and type(node.ops[0]) in _COMPARISONS:
            return self.wrap("cmp", _COMPARISONS[type(node.ops[0])],
                             self.expression(node.left), self.expression(node.comparators[0]))
        if isinstance(node, ast.Call) and node.func.id == "lerp":
            return self.expression(self.expand_lerp(node))
        if isinstance(node, ast.Call) and node.func.id in ELEMENTWISE_OPERATIONS:
            return self.wrap("call", node.func.id,
                             tuple(self.expression(a) for a in node.args))
        raise NotImplementedError(
            f"rule {self.rule.name}: {ast.unparse(node)!r} has no elementwise lowering")

    def matrix_operation(self, target: str, call: ast.Call) -> None:
        """``target = operation(operand, scalars...)``: the stage ends with the operand
        written to an array, the operation runs on it, and the next stage reads its result."""
        if not self.staged:
            raise NotImplementedError(
                f"rule {self.rule.name}: {call.func.id} is a matrix operation, which no "
                "elementwise kernel can run (lower_stages cuts the rule there)")
        operand = self.expression(call.args[0])
        arguments = []
        for argument in call.args[1:]:
            self.hoisted.append(self.evaluate(argument))
            self.trace.append(("hoist", None, argument))
            arguments.append(len(self.hoisted) - 1)
        index = len(self.matrix)
        self.matrix.append((call.func.id, operand, tuple(arguments)))
        self.env[target] = _ARRAY
        if self.build:
            self.body.append((f"t_in{index}", operand))
            self.body_stages.append(self.stage)
            self.local_stage[f"t_in{index}"] = self.stage
        self.stage += 1
        self.stage_loads.append(set())
        self.local_names[target] = ("array", f"t_out{index}")

    def wrap(self, *parts: Any) -> tuple | None:
        return parts if self.build else None

    def expand_lerp(self, node: ast.Call) -> ast.expr:
        start, end, weight = node.args
        if not self.is_scalar(weight):
            raise NotImplementedError(f"rule {self.rule.name}: lerp needs a scalar weight")
        near_start = abs(self.evaluate(weight)) < 0.5
        self.decisions.append(near_start)
        self.trace.append(("lerp", weight, near_start))
        expanded = _LERP_CACHE.get((id(node), near_start))
        if expanded is None or expanded[0] is not node:
            expanded = _LERP_CACHE[id(node), near_start] = (node, _lerp_tree(node, near_start))
        return expanded[1]


def _lerp_tree(node: ast.Call, near_start: bool) -> ast.expr:
    start, end, weight = node.args
    difference = ast.BinOp(end, ast.Sub(), start)
    if near_start:  # start + weight * (end - start)
        return ast.BinOp(start, ast.Add(), ast.BinOp(weight, ast.Mult(), difference))
    # end - (end - start) * (1 - weight)
    return ast.BinOp(end, ast.Sub(), ast.BinOp(
        difference, ast.Mult(), ast.BinOp(ast.Constant(1), ast.Sub(), weight)))


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_ARRAY = _Marker("<array>")
_ABSENT = _Marker("<absent state>")
_ANALYSIS_CACHE: dict[int, Any] = {}
_HOST_GLOBALS = {"__builtins__": {}, **_HOST_OPERATIONS}
_LERP_CACHE: dict[tuple[int, bool], Any] = {}


def _analysis(node: ast.expr) -> tuple[ast.expr, frozenset[str], Any, bool]:
    """(node, names it reads, compiled code, whether it calls a reduction), cached: this
    runs every step."""
    # Keyed by node identity: rule trees and cached lerp expansions live as long as
    # the process, and the stored node guards against a recycled id.
    entry = _ANALYSIS_CACHE.get(id(node))
    if entry is None or entry[0] is not node:
        calls = {n.func for n in ast.walk(node) if isinstance(n, ast.Call)}
        names = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                          and n not in calls)
        reduces = any(f.id in REDUCTIONS or f.id in AXIS_REDUCTIONS for f in calls)
        code = compile(ast.fix_missing_locations(ast.Expression(node)), "<rule>", "eval")
        entry = _ANALYSIS_CACHE[id(node)] = (node, names, code, reduces)
    return entry


@dataclass(frozen=True)
class HostProgram:
    """The host half of one specialization: a Python function of the step's scalars.

    A walk of the rule (:class:`_Lowering`) evaluates the same scalar expressions in the
    same order for as long as its branch outcomes are the same. Its record of them
    (``trace``: every ``if`` test and lerp side with its outcome, every scalar
    assignment, every hoisted value) is turned once into straight-line Python source,
    compiled, and called on later steps instead of a new walk: it re-checks each
    outcome (None as soon as one differs: another specialization) and returns the
    hoisted values, bit for bit what the walk computes, since it is the same
    expressions evaluated by Python in the same order.
    """

    key: tuple
    source: str
    function: Any = field(repr=False, compare=False)

    def hoisted(self, scalars: Mapping[str, Any]) -> list | None:
        """This step's hoisted values if its decisions are this program's, else None."""
        try:
            return self.function(scalars)
        except KeyError:
            return None  # a scalar missing: the walk reports it


def _host_program(rule: UpdateRule, key: tuple, trace: list) -> HostProgram:
    """Straight-line source of ``trace`` (see :class:`HostProgram`), compiled."""
    body, inputs, assigned, hoisted = [], [], set(), 0
    for kind, target, node in trace:
        expression = target if kind in ("test", "lerp") else node
        for name in sorted(_analysis(expression)[1] - assigned):
            if name not in inputs:
                inputs.append(name)
        text = ast.unparse(expression)
        if kind == "assign":
            body.append(f"{target} = {text}")
            assigned.add(target)
        elif kind == "hoist":
            body.append(f"__h{hoisted} = {text}")
            hoisted += 1
        else:  # "test" or "lerp", with the outcome recorded in ``node``
            condition = f"({text})" if kind == "test" else f"(abs({text}) < 0.5)"
            body.append(f"if {'not ' if node else ''}{condition}: return None")
    source = "\n".join([
        f"def host(__scalars):  # rule {rule.name}, key {key!r}",
        *(f"    {name} = __scalars[{name!r}]" for name in inputs),
        *(f"    {line}" for line in body),
        f"    return [{', '.join(f'__h{i}' for i in range(hoisted))}]",
    ]) + "\n"
    namespace = dict(_HOST_GLOBALS)
    exec(compile(source, f"<host program of rule {rule.name}>", "exec"), namespace)  # noqa: S102
    return HostProgram(key, source, namespace["host"])


#: (rule function, present states) -> [index of the last one used, [HostProgram, ...]].
_HOST_PROGRAMS: dict[tuple[Any, frozenset[str]], list] = {}


def program_entry(rule: UpdateRule, present: frozenset[str]) -> list:
    """The live record of ``rule``'s host programs with ``present`` states, ``[index of
    the last one used, [HostProgram, ...]]``, which :func:`lower` extends: kept by a step
    plan, so a step finds its program without hashing the rule and the states again."""
    return _HOST_PROGRAMS.setdefault((rule.function, present), [0, []])


def known_program(entry: list, scalars: Mapping[str, Any]) -> tuple | None:
    """``(key, hoisted)`` from a kept host program of ``entry`` (:func:`program_entry`)
    that takes these scalars, or None (then :func:`lower` walks the rule)."""
    found = _known_program(entry, scalars)
    return None if found is None else found[:2]


def host_programs(rule: UpdateRule, present: frozenset[str] | set[str]) -> list[HostProgram]:
    """The host programs made so far for ``rule`` with ``present`` states (for tests)."""
    return list(_HOST_PROGRAMS.get((rule.function, frozenset(present)), [0, []])[1])


def _known_program(entry: list, scalars: Mapping[str, Any]) -> tuple | None:
    """``(key, hoisted, None)`` from the first kept host program of ``entry`` that takes
    these scalars (the last one used first: keys change rarely, as when a schedule crosses
    a threshold), or None."""
    last, programs = entry
    for index in (last, *range(len(programs))):
        if index < len(programs):
            hoisted = programs[index].hoisted(scalars)
            if hoisted is not None:
                entry[0] = index
                return programs[index].key, hoisted, None
    return None


def lower(rule: UpdateRule, scalars: Mapping[str, Any], present: frozenset[str] | set[str],
          *, build: bool = True) -> tuple[tuple, list[float], Kernel | None]:
    """Specialize ``rule`` for this step's ``scalars`` and the ``present`` optional states.

    Parameters
    ----------
    rule : UpdateRule
    scalars : mapping
        The keyword scalars of the rule for this step.
    present : set of str
        The states that are allocated (every non-optional state must be).
    build : bool
        False only decides the key and the hoisted values (cheap, every step: a
        :class:`HostProgram` of an earlier walk where one matches);
        True also builds the :class:`Kernel` (once per key).

    Returns
    -------
    key : tuple
        Specialization key: branch outcomes and the present states.
    hoisted : list of float
        The hoisted scalar arguments, host float64 values, in argument order.
    kernel : Kernel or None
        The lowered body when ``build`` is true.
    """
    present = frozenset(present)
    entry = _HOST_PROGRAMS.setdefault((rule.function, present), [0, []])
    if not build:
        found = _known_program(entry, scalars)
        if found is not None:
            return found
    lowering = _Lowering(rule, scalars, present, build)
    lowering.run()
    states = tuple(s for s in rule.states if s in present)
    key = (tuple(lowering.decisions), states)
    programs = entry[1]
    if all(program.key != key for program in programs):
        programs.append(_host_program(rule, key, lowering.trace))
    if not build:
        return key, lowering.hoisted, None
    stores, results = [], {}
    for name in ("param", *states):
        local = lowering.local_names.get(name)
        if local is not None:
            stores.append(name)
            results[name] = local
    arrays = ("param", "grad", *states)
    # Reductions numbered by stage (stable), so a pass reads a prefix of them.
    found = lowering.reductions
    order = {old: new for new, old in enumerate(
        sorted(range(len(found)), key=lambda i: found[i].stage))}
    reductions = tuple(Reduction(r.kind, renumber(r.expr, order), r.stage)
                       for r in sorted(found, key=lambda r: r.stage))
    body = tuple((target, renumber(expr, order)) for target, expr in lowering.body)
    loads: set[str] = set()
    for _, expr in body:  # the elementwise pass reads what its body reads
        references(expr, set(), loads)
    kernel = Kernel(rule=rule.name, key=key,
                    loads=tuple(a for a in arrays if a in loads),
                    stores=tuple(stores), arrays=arrays, n_hoisted=len(lowering.hoisted),
                    body=body, results=results, reductions=reductions)
    return key, lowering.hoisted, kernel


@dataclass(frozen=True)
class MatrixStep:
    """A matrix operation between two stages of a :class:`StagedKernel`.

    Attributes
    ----------
    operation : str
        Its name in :data:`~._operations.MATRIX_OPERATIONS`.
    source : str
        The array (``t_in<k>``) the previous stage wrote its operand to.
    target : str
        The array (``t_out<k>``) its result is, read by the following stages.
    arguments : tuple of int
        Indices into the hoisted values of its scalar arguments (host values, passed
        as they are, not cast to the parameter's dtype).
    """

    operation: str
    source: str
    target: str
    arguments: tuple[int, ...]


@dataclass(frozen=True)
class StagedKernel:
    """A rule with matrix operations, cut into elementwise stages (see :func:`lower_stages`).

    Stage ``k`` is a :class:`Kernel` whose arrays are ``param``, ``grad``, the present
    states, then the temporaries it reads or writes; :attr:`matrix` ``[k]`` runs after
    it. Every stage takes all the hoisted values (the matrix steps' arguments among
    them), so one list serves the whole step.

    Attributes
    ----------
    temporaries : tuple of str
        The arrays of the parameter's size and dtype a step allocates for its stages:
        each matrix operand ``t_in<k>`` and each local one stage computes and a later
        one reads (``t_keep_<local>``). Results ``t_out<k>`` are the matrix steps' own.
    """

    rule: str
    key: tuple
    stages: tuple[Kernel, ...]
    matrix: tuple[MatrixStep, ...]
    temporaries: tuple[str, ...]
    n_hoisted: int


def lower_stages(rule: UpdateRule, scalars: Mapping[str, Any],
                 present: frozenset[str] | set[str], *,
                 build: bool = True) -> tuple[tuple, list, StagedKernel | None]:
    """:func:`lower` for a rule that may call matrix operations.

    The walk is the same (branches and lerp sides decided on the host, scalar
    subexpressions hoisted); at each matrix operation the current stage ends: it writes
    the operand to the array ``t_in<k>``, the operation runs on it with the namespace's
    own ``matmul`` (:func:`~._operations.orthogonalize`), and the following stages read
    its result ``t_out<k>``. A parameter or state is written by the stage that computes
    its last value (the last stage reading its old value, if later), and a local one
    stage computes and a later one reads goes through an array ``t_keep_<local>``.
    Where the branches taken call no matrix operation the result has one stage and no
    matrix step, the kernel :func:`lower` gives.

    Returns
    -------
    key, hoisted
        As :func:`lower`; the hoisted values include the matrix steps' arguments.
    staged : StagedKernel or None
        When ``build`` is true.
    """
    present = frozenset(present)
    entry = _HOST_PROGRAMS.setdefault((rule.function, present), [0, []])
    if not build:
        found = _known_program(entry, scalars)
        if found is not None:
            return found
    lowering = _Lowering(rule, scalars, present, build, staged=True)
    lowering.run()
    states = tuple(s for s in rule.states if s in present)
    key = (tuple(lowering.decisions), states)
    if all(program.key != key for program in entry[1]):
        entry[1].append(_host_program(rule, key, lowering.trace))
    if not build:
        return key, lowering.hoisted, None
    if lowering.matrix and lowering.reductions:
        raise NotImplementedError(f"rule {rule.name}: reductions beside a matrix operation "
                                  "have no staged lowering")
    n_stages = len(lowering.matrix) + 1
    bodies: list[list] = [[] for _ in range(n_stages)]
    for (target, expr), stage in zip(lowering.body, lowering.body_stages, strict=True):
        bodies[stage].append((target, expr))
    stores: list[dict[str, str]] = [{} for _ in range(n_stages)]
    carries = dict(lowering.carries)
    for index in range(len(lowering.matrix)):
        stores[index][f"t_in{index}"] = f"t_in{index}"
    for name in ("param", *states):
        local = lowering.local_names.get(name)
        if local is None:
            continue
        readers = [s for s in range(n_stages) if name in lowering.stage_loads[s]]
        if isinstance(local, tuple):  # the result of a matrix operation itself
            made, value = int(local[1][len("t_out"):]) + 1, ("load", local[1])
        else:
            made, value = lowering.local_stage[local], ("local", local)
        stage = max([made, *readers])
        if stage != made and value[0] == "local":  # its old value is read after: later
            carries[local] = made
            value = ("load", f"t_keep_{local}")
        if value[0] == "load":
            result = f"{name}_result"
            bodies[stage].append((result, value))
            lowering.stage_loads[stage].add(value[1])
        else:
            result = local
        stores[stage][name] = result
    for local, stage in carries.items():
        stores[stage][f"t_keep_{local}"] = local
    temporaries = tuple(sorted({a for st in stores for a in st if a.startswith("t_")}))
    kernels = []
    base = ("param", "grad", *states)
    for stage in range(n_stages):
        loads = lowering.stage_loads[stage]
        temps = sorted({a for a in loads | set(stores[stage]) if a.startswith("t_")})
        arrays = (*base, *temps)
        kernels.append(Kernel(
            rule=rule.name, key=(*key, ("stage", stage)),
            loads=tuple(a for a in arrays if a in loads),
            stores=tuple(a for a in arrays if a in stores[stage]), arrays=arrays,
            n_hoisted=len(lowering.hoisted), body=tuple(bodies[stage]),
            results=dict(stores[stage])))
    matrix = tuple(MatrixStep(operation, f"t_in{index}", f"t_out{index}", arguments)
                   for index, (operation, _, arguments) in enumerate(lowering.matrix))
    return key, lowering.hoisted, StagedKernel(rule.name, key, tuple(kernels), matrix,
                                               temporaries, len(lowering.hoisted))


def reductions_taken(rule: UpdateRule, scalars: Mapping[str, Any],
                     present: frozenset[str] | set[str]) -> int:
    """How many per-tensor reductions a step with ``scalars`` runs (its branches taken):
    0 for a step of a rule without reductions, or whose reductions sit in branches not
    taken (Adam without ``cautious``)."""
    if not rule.reductions:
        return 0
    present = frozenset(present)
    key, _, _ = lower(rule, scalars, present, build=False)  # a host program: cheap
    count = _REDUCTIONS_TAKEN.get((rule.function, key))
    if count is None:
        lowering = _Lowering(rule, scalars, present, False)
        lowering.run()
        count = _REDUCTIONS_TAKEN[rule.function, key] = len(lowering.reductions)
    return count


#: (rule function, specialization key) -> number of reductions its steps run.
_REDUCTIONS_TAKEN: dict[tuple[Any, tuple], int] = {}


def render(expr: tuple, call_prefix: str) -> str:
    """Source text of a lowered expression, shared by the Python (numba) and C++ emitters.

    Loads are ``l_<array>``, locals ``v_<name>``, hoisted scalars ``h<index>``, and an
    operation ``op`` is called as ``<call_prefix>op``; every subexpression is
    parenthesized, so both languages evaluate in the rule's order.
    """
    kind = expr[0]
    if kind == "load":
        return f"l_{expr[1]}"
    if kind == "local":
        return f"v_{expr[1]}"
    if kind == "hoisted":
        return f"h{expr[1]}"
    if kind == "reduced":
        return f"r{expr[1]}"
    if kind == "neg":
        return f"(-{render(expr[1], call_prefix)})"
    if kind == "bin":
        return f"({render(expr[2], call_prefix)} {expr[1]} {render(expr[3], call_prefix)})"
    if kind == "cmp":
        return f"({render(expr[2], call_prefix)} {expr[1]} {render(expr[3], call_prefix)})"
    if kind == "call":
        args = ", ".join(render(a, call_prefix) for a in expr[2])
        return f"{call_prefix}{expr[1]}({args})"
    raise AssertionError(kind)


def unsupported_reason(rule: UpdateRule) -> str | None:
    """Why ``rule`` cannot be lowered to an elementwise kernel, or None if it can.

    The language allows comparisons and boolean operators of scalars anywhere, but
    kernels only support them in ``if`` tests, which are resolved on the host, and a
    comparison as ``where``'s condition, which kernels evaluate per element.
    """
    tests = {id(n) for s in ast.walk(rule.tree) if isinstance(s, ast.If)
             for n in ast.walk(s.test)}
    tests |= {id(call.args[0]) for call in ast.walk(rule.tree)
              if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "where"}
    for node in ast.walk(rule.tree):
        logical = isinstance(node, (ast.Compare, ast.BoolOp)) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
        if logical and id(node) not in tests:
            return f"rule {rule.name} uses {ast.unparse(node)!r} outside an if test"
    return None
