"""Fused numba loops for rules with axis reductions and states shaped unlike the parameter.

A rule such as Adafactor's (:mod:`optim_core.optim.rules_pertensor`) reduces over one of
the last two axes (``row_mean``, ``col_mean``) and keeps states of one value per row
(``"rows"``: ``(..., rows, 1)``) or per column (``"cols"``). Its lowered specialization
(:func:`~._lowering.lower`, the same body the elementwise kernels are generated from) is
turned here into loop nests over the tensor seen as ``M = size / C`` rows of ``C``
columns, ``R`` rows per matrix (``B = M / R`` matrices, the leading axes flattened):

* every value of the body has the axes it varies along (:func:`value_axes`): a value
  without the column axis (a row factor, the mean of a row factor, a whole-tensor
  reduction) is computed once per row, in the outer loop, the others per element, in
  the inner one; a row state is read at ``[row]``, a column state at ``[b * C + c]``;
* each reduction stage is one pass before the update (as for whole-tensor reductions,
  :mod:`._numba`): a pass whose reductions all lack the column axis (the mean of a row
  factor) runs over the rows only; row means accumulate per row (their mean stored as
  the row ends), column means in one float64 sum per column of each matrix, whole-tensor
  ones in one float64 sum per chunk; the results (small arrays of the parameter's
  dtype, or scalars) are read by the later passes. A reduction the body repeats (lerp
  reads its argument twice) is accumulated once;
* a reduction pass runs over :data:`CHUNKS` chunks, a ``prange`` in the multi-threaded
  variant: of whole matrices (16 or more of them), a chunk owning its matrices' column
  sums; or, for fewer matrices, of units that are row ranges of a matrix (``S`` per
  matrix, at most its rows), each with its own column sums, added in unit order after
  the pass. Whole-tensor sums add their chunks' sums in chunk order. Nothing depends on
  the thread count, so the serial variant, the same loops on the calling thread, gives
  the same bits;
* the update pass writes the parameter and the full-size states per element and the row
  states once per row; the column states are written by one more loop over the columns
  after it (the update pass still reads their old values).

So Adafactor's factored step reads the gradient three times, the parameter twice, and
writes the parameter once, with no full-size temporary; the row and column work is
``O(rows + columns)``. Accumulations are in float64, as in the other fused reductions.
The update pass, the means' finishing loops and the column states' loop are a
``prange`` in the multi-threaded variant too.
:func:`value_axes` is also the CUDA passes' analysis (:mod:`._cuda_factored`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

from ._lowering import Kernel, Reduction, references, render, renumber, substitute_reductions
from ._numba_operations import OPERATION_HELPERS

__all__ = ["is_factored", "unsupported", "factored_source", "FactoredKernels", "load",
           "collapsed"]

_FULL = frozenset({"leading", "rows", "cols"})
_AXES = {"full": _FULL, "unfactored": _FULL, "rows": frozenset({"leading", "rows"}),
         "cols": frozenset({"leading", "cols"})}
_AXIS_KINDS = ("row_mean", "col_mean")
_GENERATOR_VERSION = 6
#: The reduction passes' chunks: a constant, not the thread count, so the float64
#: partial sums, and so every result, are the same on any number of threads and on the
#: serial variant (the thread choice changes the speed only); 16 keeps 2 to 16 threads
#: busy.
CHUNKS = 16
#: Float64 lanes per chunk of a whole-tensor sum of per-element terms (see _columns):
#: without fastmath one accumulator is one serial chain of additions, which keeps the
#: loop around it scalar.
LANES = 256


def is_factored(kernel: Kernel, state_shapes: Mapping[str, str]) -> bool:
    """Whether ``kernel`` needs these loops: an axis reduction, or a shaped state."""
    return any(r.kind in _AXIS_KINDS for r in kernel.reductions) or any(
        state_shapes.get(a, "full") in ("rows", "cols") for a in kernel.arrays)


def _axes_of(expr: tuple, arrays: Mapping[str, frozenset], locals_: Mapping[str, frozenset],
             reduced: list[frozenset]) -> frozenset:
    kind = expr[0]
    if kind == "load":
        return arrays[expr[1]]
    if kind == "local":
        return locals_[expr[1]]
    if kind == "reduced":
        return reduced[expr[1]]
    if kind == "neg":
        return _axes_of(expr[1], arrays, locals_, reduced)
    if kind in ("bin", "cmp"):
        return _axes_of(expr[2], arrays, locals_, reduced) | _axes_of(
            expr[3], arrays, locals_, reduced)
    if kind == "call":
        return frozenset().union(*(_axes_of(a, arrays, locals_, reduced) for a in expr[2]))
    return frozenset()  # hoisted


class _Axes(NamedTuple):
    arrays: dict[str, frozenset]
    locals: dict[str, frozenset]
    #: Per reduction: the axes of its argument, and of its value.
    arguments: list[frozenset]
    reduced: list[frozenset]


def value_axes(kernel: Kernel, state_shapes: Mapping[str, str]) -> _Axes:
    """The axes each array, local and reduction of ``kernel`` varies along."""
    arrays = {a: _AXES[state_shapes.get(a, "full")] for a in kernel.arrays}
    locals_: dict[str, frozenset] = {}
    arguments: list[frozenset] = [frozenset()] * len(kernel.reductions)
    reduced: list[frozenset] = [frozenset()] * len(kernel.reductions)
    # Reductions are numbered by stage and a stage reads only earlier ones: resolve them
    # stage by stage, each time over the whole body.
    for _ in range(len(kernel.reductions) + 1):
        for target, expr in kernel.body:
            locals_[target] = _axes_of(expr, arrays, locals_, reduced)
        for i, reduction in enumerate(kernel.reductions):
            argument = _axes_of(reduction.expr, arrays, locals_, reduced)
            arguments[i] = argument
            reduced[i] = (argument - {"cols"} if reduction.kind == "row_mean" else
                          argument - {"rows"} if reduction.kind == "col_mean" else frozenset())
    return _Axes(arrays, locals_, arguments, reduced)


def unsupported(kernel: Kernel, state_shapes: Mapping[str, str]) -> str | None:
    """Why these loops cannot run ``kernel``, or None: the forms Adafactor's rule has are
    lowered (a row mean of a full value, a column mean of a full value or of a row
    value, any whole-tensor reduction)."""
    axes = value_axes(kernel, state_shapes)
    for reduction, argument in zip(kernel.reductions, axes.arguments):
        if reduction.kind == "row_mean" and not {"rows", "cols"} <= argument:
            return f"a row mean of a value varying along {sorted(argument)}"
        if reduction.kind == "col_mean" and "rows" not in argument:
            return f"a column mean of a value varying along {sorted(argument)}"
    for name in kernel.stores:
        if axes.locals[kernel.results[name]] - axes.arrays[name]:
            return f"state {name!r} is assigned a value of more axes than it has"
    return None


def _stage_of(expr: tuple, body: Mapping[str, tuple], stages: Mapping[int, int]) -> int:
    """0 if ``expr`` reads no reduction, else 1 + the latest stage it reads (through the
    locals of ``body``)."""
    kind = expr[0]
    if kind == "reduced":
        return stages[expr[1]] + 1
    if kind == "local":
        return _stage_of(body[expr[1]], body, stages) if expr[1] in body else 0
    if kind == "neg":
        return _stage_of(expr[1], body, stages)
    if kind in ("bin", "cmp"):
        return max(_stage_of(expr[2], body, stages), _stage_of(expr[3], body, stages))
    if kind == "call":
        return max((_stage_of(a, body, stages) for a in expr[2]), default=0)
    return 0


def collapsed(kernel: Kernel) -> Kernel:
    """``kernel`` for matrices of one element (``R == C == 1``, a 1x1 convolution's
    weight): every row and column state, and every row or column mean, has one value per
    element, and the mean of one term is that term (to float64 and back, exactly), so the
    loop nests are an elementwise kernel: each axis reduction inlined as its argument, the
    per-tensor ones (norms, sizes) renumbered and staged again (Adafactor's stages of
    means are gone: one pass for its norms, then the update), for :mod:`._numba`'s
    elementwise kernels over the states as 1-D arrays of the parameter's size."""
    values: dict[int, tuple] = {}
    for i, reduction in enumerate(kernel.reductions):
        if reduction.kind in _AXIS_KINDS:  # its argument reads only earlier reductions
            values[i] = substitute_reductions(reduction.expr, values)
    body = [(target, substitute_reductions(expr, values)) for target, expr in kernel.body]
    by_target = dict(body)
    stages: dict[int, int] = {}
    arguments: dict[int, tuple] = {}
    for i, reduction in enumerate(kernel.reductions):
        if i not in values:
            arguments[i] = substitute_reductions(reduction.expr, values)
            stages[i] = _stage_of(arguments[i], by_target, stages)
    ranked = sorted(stages, key=lambda i: (stages[i], i))
    order = {old: new for new, old in enumerate(ranked)}
    reductions = tuple(Reduction(kernel.reductions[i].kind, renumber(arguments[i], order),
                                 stages[i]) for i in ranked)
    return Kernel(kernel.rule, (*kernel.key, "one-element matrices"), kernel.loads,
                  kernel.stores, kernel.arrays, kernel.n_hoisted,
                  tuple((target, renumber(expr, order)) for target, expr in body),
                  kernel.results, reductions)


def _loads(names: set[str], arrays: Mapping[str, frozenset], outer: bool) -> list[str]:
    """Reads of ``names``: row arrays at ``[row]`` (outer loop), full ones at ``[i]`` and
    column ones at ``[j]`` (inner loop)."""
    lines = []
    for name in sorted(names):
        axes = arrays[name]
        if outer and "cols" not in axes:
            lines.append(f"l_{name} = a_{name}[row]")
        elif not outer and "cols" in axes:
            lines.append(f"l_{name} = a_{name}[{'i' if 'rows' in axes else 'j'}]")
    return lines


def _reads(indices: set[int], reduced: list[frozenset], kinds: list[str],
           outer: bool) -> list[str]:
    """Reads of earlier reductions' values that are arrays (a whole-tensor one is a
    scalar ``r<i>`` already)."""
    lines = []
    for i in sorted(indices):
        axes = reduced[i]
        if kinds[i] not in _AXIS_KINDS:
            continue
        if outer and "cols" not in axes:
            lines.append(f"r{i} = q{i}[{'row' if 'rows' in axes else 'b'}]")
        elif not outer and "cols" in axes:
            lines.append(f"r{i} = q{i}[j]")
    return lines


def _needed(kernel: Kernel, roots: list[tuple]) -> tuple[list, set[str], set[int]]:
    """The body entries ``roots`` need (in body order), the arrays and reductions read."""
    needed: set[str] = set()
    loads: set[str] = set()
    reductions: set[int] = set()
    for root in roots:
        references(root, needed, loads, reductions)
    body = []
    for target, expr in reversed(kernel.body):
        if target in needed:
            body.append((target, expr))
            references(expr, needed, loads, reductions)
    return list(reversed(body)), loads, reductions


def _columns() -> list[tuple[list[str], int]]:
    """The loop over a row's columns in a reduction pass, in two parts ``(lines, depth)``,
    each followed by the per-element body indented by ``depth``. Column ``c`` is
    in lane ``cl = c % LANES`` of the whole-tensor sums, so the inner loop is elementwise
    in its lanes (and vectorizes where nothing else in it is a chain): one loop where the
    row has at most :data:`LANES` columns (a loop over blocks of them costs a 3x3
    convolution's rows some 20%), else blocks of :data:`LANES`. Elements are indexed by
    unsigned ints: a signed index would be checked for wrapping around from the end at
    every element, which keeps a loop from vectorizing."""
    index = ["i = np.uint64(row * C + c)", "j = np.uint64(b * C + c)"]
    return [([f"if C <= {LANES}:", "    for c in range(C):",
              *(f"        {x}" for x in ("cl = c", *index))], 8),
            (["else:", f"    for c0 in range(0, C, {LANES}):",
              f"        for cl in range(min({LANES}, C - c0)):",
              *(f"            {x}" for x in ("c = c0 + cl", *index))], 12)]


def _row_loop(loop: str) -> list[str]:
    """The loop over rows, with ``b`` (the matrix) and ``r`` (the row in it): counted on
    the calling thread (an integer division per row costs more than a short row's
    elements: a 1x1 convolution's matrices are 1 x 1), divided out under ``prange``."""
    if loop == "range":
        return ["    b = 0", "    r = -1", "    for row in range(M):", "        r += 1",
                "        if r == R:", "            r = 0", "            b += 1"]
    return [f"    for row in {loop}(M):", "        b = row // R", "        r = row - b * R"]


def _unit_bounds() -> list[str]:
    """The loop over chunk ``k``'s units ``uu`` of split matrices: the rows ``lo .. hi - 1``,
    the ``part``-th of ``S`` of matrix ``b`` (``uu = b * S + part``)."""
    return [f"            for uu in range(np.int64(k) * U // {CHUNKS}, "
            f"(np.int64(k) + 1) * U // {CHUNKS}):",
            "                b = uu // S", "                part = uu - b * S",
            "                lo = b * R + part * R // S",
            "                hi = b * R + (part + 1) * R // S"]


def _mean_of_sums(i: int, slots: str, width: str, loop: str) -> list[str]:
    """Column means from the float64 sums: of whole matrices, or of split ones' units
    added in unit order (``width`` sums per unit: ``C``, or 1 for a mean of a row
    value)."""
    return [f"    q{i} = np.empty({slots}, T)", "    if S == 1:",
            f"        for x in {loop}({slots}):", f"            q{i}[x] = T(p{i}[x] / R)",
            "    else:", f"        for x in {loop}({slots}):",
            f"            b = x // {width}", f"            c = x - b * {width}",
            f"            e{i} = p{i}[b * S * {width} + c]",
            "            for part in range(1, S):",
            f"                e{i} += p{i}[(b * S + part) * {width} + c]",
            f"            q{i}[x] = T(e{i} / R)"]


def _same(kernel: Kernel) -> list[int]:
    """For each reduction, the first one of the same kind, stage and argument (itself if
    none): ``lerp(state, row_mean(g * g), w)`` reads its argument twice."""
    first: dict[tuple, int] = {}
    return [first.setdefault((r.kind, r.stage, r.expr), i)
            for i, r in enumerate(kernel.reductions)]


def factored_source(kernel: Kernel, dtype: str, state_shapes: Mapping[str, str]) -> str:
    """The numba module of ``kernel``'s loops: ``kernel(a_param, a_grad, *states, R, C,
    h0, ...)`` (multi-threaded) and ``kernel_serial`` (the same loops on the calling
    thread, the same bits), over 1-D C-contiguous arrays, for a parameter of at least one
    element."""
    axes = value_axes(kernel, state_shapes)
    kinds = [r.kind for r in kernel.reductions]
    same = _same(kernel)
    arrays = ", ".join(f"a_{a}" for a in kernel.arrays)
    hoisted = "".join(f", h{i}" for i in range(kernel.n_hoisted))

    stored = [(a, kernel.results[a]) for a in kernel.stores]

    def assign(entries: list, outer: bool, indent: str) -> list[str]:
        return [f"{indent}v_{t} = {render(e, '_')}" for t, e in entries
                if ("cols" not in axes.locals[t]) == outer]

    def body_lines(parallel: bool) -> list[str]:
        loop = "numba.prange" if parallel else "range"
        lines = ["    n = a_param.shape[0]", "    M = n // C", "    B = M // R",
                 # The reduction passes' units (see _unit_bounds): whole matrices, or for
                 # fewer than CHUNKS matrices S row ranges of each (at most R of them).
                 f"    S = 1 if B >= {CHUNKS} else min(({CHUNKS} + B - 1) // B, R)",
                 "    U = B * S"]
        for stage in range(kernel.n_stages):
            indices = [i for i, r in enumerate(kernel.reductions) if r.stage == stage]
            roots = [kernel.reductions[i].expr for i in indices
                     if kinds[i] != "size" and same[i] == i]
            entries, loads, reads = _needed(kernel, roots)
            inner = any("cols" in axes.arguments[i] for i in indices
                        if kinds[i] != "size" and same[i] == i)
            # The accumulations (a pair: on whole matrices, on units of split ones).
            outer_acc: list = []
            inner_acc: list = []
            start, unit_alloc, unit_start, unit_end, row_end = [], [], [], [], []
            chunk_end, finish = [], []
            for i in indices:
                kind, argument = kinds[i], axes.arguments[i]
                value = "1.0" if kind == "size" else \
                    f"np.float64({render(kernel.reductions[i].expr, '_')})"
                if same[i] != i:
                    # The same reduction as an earlier one (lerp repeats its argument):
                    # its value, not a second accumulation.
                    letter = "q" if kind in _AXIS_KINDS else "r"
                    finish.append(f"    {letter}{i} = {letter}{same[i]}")
                elif kind == "size":
                    # A count, known from the shape: the elements of its argument's axes.
                    count = ("n" if {"rows", "cols"} <= argument else
                             "M" if "rows" in argument else "B * C" if "cols" in argument
                             else "B")
                    finish.append(f"    r{i} = T({count})")
                elif kind in ("sum", "norm"):
                    # One float64 partial per chunk, added in chunk order; of per-element
                    # terms, LANES of them per chunk (column c into lane c % LANES, see
                    # _columns), added in lane order at the chunk's end.
                    lines.append(f"    w{i} = np.zeros({CHUNKS}, np.float64)")
                    term = f"t{i} * t{i}" if kind == "norm" else f"t{i}"
                    if "cols" in argument:
                        start.append(f"z{i} = np.zeros({LANES}, np.float64)")
                        statement = [f"t{i} = {value}", f"z{i}[cl] += {term}"]
                        chunk_end += [f"s{i} = 0.0", f"for cl in range({LANES}):",
                                      f"    s{i} += z{i}[cl]"]
                    else:
                        start.append(f"s{i} = 0.0")
                        statement = [f"t{i} = {value}", f"s{i} += {term}"]
                    guard = "rows" not in argument  # one term per matrix, not per row
                    target = inner_acc if "cols" in argument else outer_acc
                    target += (["if r == 0:", *(f"    {s}" for s in statement)] if guard
                               else statement)
                    chunk_end.append(f"w{i}[k] = s{i}")
                    finish += [f"    u{i} = 0.0", f"    for k in range({CHUNKS}):",
                               f"        u{i} += w{i}[k]"]
                    finish.append(f"    r{i} = T(np.sqrt(u{i}))" if kind == "norm"
                                  else f"    r{i} = T(u{i})")
                elif kind == "row_mean":
                    lines.append(f"    q{i} = np.empty(M, T)")
                    # A register accumulator per row, its mean stored once the row is done.
                    outer_acc.append(f"a{i} = 0.0")
                    inner_acc.append(f"a{i} += {value}")
                    row_end.append(f"q{i}[row] = T(a{i} / C)")
                elif "cols" in argument:  # col_mean of a full value: one sum per column
                    # Whole matrices: a float64 sum per column, in the chunk that holds
                    # the matrix; split ones: each unit's sums (a row of C) kept apart.
                    lines.append(f"    p{i} = np.zeros(B * C if S == 1 else U * C, np.float64)")
                    unit_alloc.append(f"cb{i} = np.empty(C, np.float64)")
                    unit_start += ["for c in range(C):", f"    cb{i}[c] = 0.0"]
                    inner_acc.append((f"p{i}[j] += {value}", f"cb{i}[c] += {value}"))
                    unit_end += ["for c in range(C):", f"    p{i}[uu * C + c] = cb{i}[c]"]
                    finish += _mean_of_sums(i, "(B * C)", "C", loop)
                else:  # col_mean of a row value: one sum per matrix
                    lines.append(f"    p{i} = np.zeros(B if S == 1 else U, np.float64)")
                    unit_start.append(f"ce{i} = 0.0")
                    outer_acc.append((f"p{i}[b] += {value}", f"ce{i} += {value}"))
                    unit_end.append(f"p{i}[uu] = ce{i}")
                    finish += _mean_of_sums(i, "B", "1", loop)

            def per_row(whole: bool, indent: str, loads: set = loads, reads: set = reads,
                        entries: list = entries, inner: bool = inner,
                        outer_acc: list = outer_acc, inner_acc: list = inner_acc,
                        row_end: list = row_end) -> list[str]:
                """One row's accumulations (``whole``: of a chunk of whole matrices); this
                stage's values bound as defaults."""
                def pick(acc: list) -> list[str]:
                    return [x if isinstance(x, str) else x[0 if whole else 1] for x in acc]

                lines = [indent + x for x in _loads(loads, axes.arrays, True)]
                lines += [indent + x for x in _reads(reads, axes.reduced, kinds, True)]
                lines += assign(entries, True, indent)
                lines += [indent + x for x in pick(outer_acc)]
                if inner:
                    element = [*_loads(loads, axes.arrays, False),
                               *_reads(reads, axes.reduced, kinds, False)]
                    element += [x.strip() for x in assign(entries, False, "")]
                    element += pick(inner_acc)
                    for head, depth in _columns():
                        lines += [f"{indent}{x}" for x in head]
                        lines += [f"{indent}{' ' * depth}{x}" for x in element]
                return lines + [indent + x for x in row_end]

            lines += [f"    for k in {loop}({CHUNKS}):"]
            lines += [f"        {x}" for x in start]
            # A chunk of whole matrices: rows counted as in the update pass.
            lines += ["        if S == 1:",
                      f"            lo = (np.int64(k) * B // {CHUNKS}) * R",
                      f"            hi = ((np.int64(k) + 1) * B // {CHUNKS}) * R",
                      "            b = lo // R", "            r = -1",
                      "            for row in range(lo, hi):", "                r += 1",
                      "                if r == R:", "                    r = 0",
                      "                    b += 1"]
            lines += per_row(True, "                ")
            # Units of fewer matrices (S parts of each).
            lines += ["        else:"]
            lines += [f"            {x}" for x in unit_alloc]
            lines += _unit_bounds()
            lines += [f"                {x}" for x in unit_start]
            lines += ["                for row in range(lo, hi):",
                      "                    r = row - b * R"]
            lines += per_row(False, "                    ")
            lines += [f"                {x}" for x in unit_end]
            lines += [f"        {x}" for x in chunk_end]
            lines += finish
        # The update pass.
        roots = [("local", local) for _, local in stored]
        entries, loads, reads = _needed(kernel, roots)
        lines += _row_loop(loop)
        lines += [f"        {x}" for x in _loads(loads, axes.arrays, True)]
        lines += [f"        {x}" for x in _reads(reads, axes.reduced, kinds, True)]
        lines += assign(entries, True, "        ")
        lines += ["        for c in range(C):", "            i = np.uint64(row * C + c)",
                  "            j = np.uint64(b * C + c)"]
        lines += [f"            {x}" for x in _loads(loads, axes.arrays, False)]
        lines += [f"            {x}" for x in _reads(reads, axes.reduced, kinds, False)]
        lines += assign(entries, False, "            ")
        lines += [f"            a_{a}[i] = v_{local}" for a, local in stored
                  if axes.arrays[a] == _FULL]
        lines += [f"        a_{a}[row] = v_{local}" for a, local in stored
                  if "cols" not in axes.arrays[a]]
        # The column states, once per column, after the pass that read their old values.
        columns = [(a, local) for a, local in stored
                   if "cols" in axes.arrays[a] and "rows" not in axes.arrays[a]]
        if columns:
            entries, loads, reads = _needed(kernel, [("local", x) for _, x in columns])
            lines += [f"    for b in {loop}(B):", "        for c in range(C):",
                      "            j = np.uint64(b * C + c)"]
            lines += [f"            l_{a} = a_{a}[j]" for a in sorted(loads)]
            lines += [f"            r{i} = q{i}[{'j' if 'cols' in axes.reduced[i] else 'b'}]"
                      for i in sorted(reads) if kinds[i] in _AXIS_KINDS]
            lines += [f"            v_{t} = {render(e, '_')}" for t, e in entries]
            lines += [f"            a_{a}[j] = v_{local}" for a, local in columns]
        return lines

    head = [
        f'"""Generated by optim_core from rule {kernel.rule!r} (factored loops); key '
        f'{kernel.key!r}."""',
        "import numba",
        "import numpy as np",
        "",
        f"T = np.{dtype}",
        "",
        "",
        *OPERATION_HELPERS,
    ]
    # cache=False: the disk cache, where there is a trusted folder, is attached by
    # _kernel_cache.import_kernel_module, as for the other kernels.
    for name, parallel in (("kernel", True), ("kernel_serial", False)):
        head += [f"@numba.njit(parallel={parallel}, cache=False, fastmath=False, "
                 "error_model='numpy', nogil=True, boundscheck=False)",
                 f"def {name}({arrays}, R, C{hoisted}):", *body_lines(parallel), "", ""]
    return "\n".join(head[:-2]) + "\n"


class FactoredKernels(NamedTuple):
    """One factored specialization's loops (multi-threaded, or all serial);
    ``table`` is None: step plans do not take them."""

    parallel: Any
    serial: Any
    table: Any = None
    factored: bool = True
    #: The elementwise kernels (:mod:`._numba`'s) of :func:`collapsed`, for tensors whose
    #: matrices have one element (None where not loaded).
    one_element: Any = None

    #: Elements from which a tensor may take the multi-threaded loops (the thread choice
    #: then times both): lower than the elementwise kernels' 2**20, as a factored step is
    #: four or five passes of more work per element (a 2**18-element one takes about
    #: 3 ms on one thread, against some 0.1 ms for its parallel regions' start-up).
    large_size = 1 << 18

    def compile(self, dtype: Any, n_arrays: int, n_hoisted: int, small: bool,
                large: bool) -> None:
        """Compile the variants a step needs before anything is written."""
        import numba

        scalar = numba.from_dtype(dtype)
        signature = ((numba.types.Array(scalar, 1, "C"),) * n_arrays
                     + (numba.types.int64,) * 2 + (scalar,) * n_hoisted)
        for needed, dispatcher in ((small, self.serial), (large, self.parallel)):
            if needed and not dispatcher.overloads:
                dispatcher.compile(signature)


def load(kernel: Kernel, dtype: str, state_shapes: Mapping[str, str],
         import_module: Any, one_element: Any = None) -> FactoredKernels:
    """Import (through ``import_module(name, source, names)``, the kernel cache) the loops;
    ``one_element`` is kept as :attr:`FactoredKernels.one_element`."""
    source = factored_source(kernel, dtype, state_shapes)
    digest = hashlib.sha256(f"{_GENERATOR_VERSION}\n{source}".encode()).hexdigest()[:20]
    module = import_module(f"optim_core_factored_{kernel.rule}_{dtype}_{digest}", source,
                           ("kernel", "kernel_serial"))
    return FactoredKernels(module.kernel, module.kernel_serial,
                           one_element=one_element)
