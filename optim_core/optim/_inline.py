"""Inlining of rule fragments: the syntax-tree rewrite behind :func:`~.language.rule_fragment`.

A fragment call in a rule, ``param, grad = decayed(param, grad, lr=lr, ...)``, is
replaced, before the rule is checked, by the fragment's statements, with

* each of the fragment's array arguments first assigned the caller's expression, under
  a name of its own (``decayed_1_param``), unless the fragment only reads it and the
  caller passes a plain name, which is then read as it is,
* every name the fragment assigns renamed the same way, so nothing it computes can
  collide with the rule's names or with another call's,
* each scalar argument replaced, where the fragment reads it, by the caller's
  expression (so ``if maximize:`` still tests a host scalar, and the kernels see the
  same scalar subexpressions they would if the lines were written out),
* and then each target of the call assigned the returned name.

The result is a rule in the plain language, which every backend and the generic path
run; the arithmetic is the fragment's, operation for operation.
"""

from __future__ import annotations

import ast
import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any


class _Rename(ast.NodeTransformer):
    def __init__(self, names: Mapping[str, str], scalars: Mapping[str, ast.expr]) -> None:
        self.names, self.scalars = names, scalars

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.scalars and isinstance(node.ctx, ast.Load):
            return ast.copy_location(copy.deepcopy(self.scalars[node.id]), node)
        if node.id in self.names:
            return ast.copy_location(ast.Name(self.names[node.id], node.ctx), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        # An operation's name is never renamed (a fragment cannot assign one).
        node.args = [self.visit(a) for a in node.args]
        return node


def _at(node: ast.AST, where: ast.AST) -> ast.AST:
    """``node`` and every node below it placed on ``where``'s line."""
    for child in ast.walk(node):
        if "lineno" in child._attributes:
            ast.copy_location(child, where)
    return node


def inline(body: list[ast.stmt], fragment_of: Callable[[str], Any],
           fail: Callable[[ast.AST, str], Exception],
           counter: itertools.count | None = None,
           taken: set[str] | None = None) -> tuple[list[ast.stmt], bool]:
    """``body`` with every fragment call expanded, and whether there was one.

    ``fragment_of(name)`` is the :class:`~.language.RuleFragment` a called name refers
    to, or None; ``fail(node, message)`` makes the error to raise for a malformed call.
    Calls inside ``if`` blocks are expanded in place. A fragment's own tree has its
    calls expanded already. A call's names (``decayed_1_grad``) are numbered past any the
    rule itself uses (``taken``: every name of ``body``, found here at the top level).
    """
    counter = counter or itertools.count(1)
    if taken is None:
        taken = {n.id for s in body for n in ast.walk(s) if isinstance(n, ast.Name)}
    out: list[ast.stmt] = []
    changed = False
    for statement in body:
        if isinstance(statement, ast.If):
            statement = copy.copy(statement)
            statement.body, a = inline(statement.body, fragment_of, fail, counter, taken)
            statement.orelse, b = inline(statement.orelse, fragment_of, fail, counter, taken)
            changed |= a or b
            out.append(statement)
            continue
        call = statement.value if isinstance(statement, ast.Assign) else None
        fragment = fragment_of(call.func.id) if isinstance(call, ast.Call) \
            and isinstance(call.func, ast.Name) else None
        if fragment is None:
            out.append(statement)
            continue
        number = next(counter)
        while any(name.startswith(f"{fragment.name}_{number}_") for name in taken):
            number = next(counter)
        out += _expand(statement, call, fragment, number, fail)
        changed = True
    return out, changed


def _expand(statement: ast.Assign, call: ast.Call, fragment: Any, number: int,
            fail: Callable[[ast.AST, str], Exception]) -> list[ast.stmt]:
    name = fragment.name
    (target,) = statement.targets if len(statement.targets) == 1 else (None,)
    targets = target.elts if isinstance(target, ast.Tuple) else [target]
    if not all(isinstance(t, ast.Name) for t in targets) \
            or len(targets) != len(fragment.returns):
        raise fail(statement, f"{name} returns {len(fragment.returns)} value(s) "
                   f"({', '.join(fragment.returns)}): assign them to as many plain names")
    if len(call.args) != len(fragment.arrays) or any(
            isinstance(a, ast.Starred) for a in call.args):
        raise fail(statement, f"{name} takes the arrays ({', '.join(fragment.arrays)}) "
                   "positionally")
    given = [k.arg for k in call.keywords]
    if None in given or sorted(given) != sorted(fragment.scalars):
        raise fail(statement, f"{name} takes the scalars {list(fragment.scalars)} by "
                   f"keyword, each once; got {given}")
    prefix = f"{name}_{number}_"
    assigned = {n.targets[0].id for n in ast.walk(fragment.tree) if isinstance(n, ast.Assign)}
    # An array argument the fragment only reads, given as a plain name, is read under
    # that name; any other is first copied into a name of the call's own.
    direct = {a: value.id for a, value in zip(fragment.arrays, call.args)
              if isinstance(value, ast.Name) and a not in assigned}
    names = {local: direct.get(local, prefix + local) for local in (*fragment.arrays, *assigned)}
    scalars = {k.arg: k.value for k in call.keywords}
    rename = _Rename(names, scalars)
    lines: list[ast.stmt] = [
        ast.Assign([ast.Name(names[a], ast.Store())], copy.deepcopy(value))
        for a, value in zip(fragment.arrays, call.args) if a not in direct]
    for line in fragment.tree.body[:-1]:
        if isinstance(line, ast.Expr) and isinstance(line.value, ast.Constant):
            continue  # the fragment's docstring
        lines.append(rename.visit(copy.deepcopy(line)))
    lines += [ast.Assign([ast.Name(t.id, ast.Store())], ast.Name(names[r], ast.Load()))
              for t, r in zip(targets, fragment.returns)]
    return [_at(line, statement) for line in lines]
