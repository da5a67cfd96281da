"""CUDA kernels for rules with axis reductions and states shaped unlike the parameter.

The CUDA counterpart of :mod:`._factored`, generated from the same lowered
:class:`~._lowering.Kernel` and the same analysis of the axes each value varies along
(:func:`._factored.value_axes`): the tensor is seen as ``M = n / C`` rows of ``C``
columns, ``R`` rows per matrix, ``B = M / R`` matrices (the leading axes flattened).
A value without the column axis is a row value (read at ``[row]``, or at ``[b]`` for
one value per matrix), a value with the column axis but not the row axis a column value
(at ``[j] = [b * C + c]``), the others full (at ``[i]``).

Per reduction stage, before the update (as :func:`~._cuda.cuda_source`'s passes):

* ``name_rows{p}``: :data:`SPLIT` threads per row (grid-stride), thread ``t`` of a row
  taking columns ``t, t + SPLIT, ...`` (a warp reads adjacent addresses): a row mean's
  float64 partial sum is stored per thread; a column mean of a row value (the mean of
  the row factor) stores the row's value; a whole-tensor ``sum`` or ``norm``
  accumulates per thread and is added with one ``atomicAdd`` into a slot by lane, as in
  :mod:`._cuda`. A pass over row values only has one thread per row;
* ``name_cols{p}``: :data:`SPLIT` threads per column of each matrix, thread ``t`` taking
  rows ``t, t + SPLIT, ...`` (adjacent threads, adjacent columns): the column means'
  partial sums of full values;
* ``name_finish{p}``: the whole-tensor sums of their slots, and each row's, column's and
  matrix's sum of its partials, in order (deterministic, whatever the grid: no atomics
  but the whole-tensor slots').

The sums stay in a float64 workspace on the device (:meth:`FactoredCudaKernels.workspace`
values) and an accumulator zeroed per step (:func:`~._cuda.accumulator_length`); later
kernels read a mean as ``T(sum / C)`` (or ``/ R``), as the numba loops do. Then
``name_update``, one thread per element (grid-stride; its row and column advanced by
the stride's, not divided out per element), writes the parameter and the full-size
states (the row and column values are recomputed per element from the old states), and
``name_states`` writes the row states once per row and the column states once per
column, after the update has read their old values. No host synchronization: the
launches follow one another on the stream. A count (``size``) is known from the shape
and computed where read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ._cuda_text import PRELUDE, REDUCTION_SLOTS
from ._factored import _AXIS_KINDS, _FULL, _needed, value_axes
from ._lowering import Kernel, render

__all__ = ["factored_kernel_name", "factored_cuda_source", "factored_functions",
           "work_coefficients", "FactoredCudaKernels", "SPLIT"]

_WHOLE = ("sum", "norm")
#: Threads per row of a row pass (over every SPLIT-th column, so that a warp reads
#: adjacent addresses) and per column of a column pass (every SPLIT-th row); each
#: stores its float64 partial sum, and the finish pass adds a row's or column's SPLIT
#: partials in order: deterministic, whatever the grid.
SPLIT = 32


def factored_kernel_name(kernel: Kernel) -> str:
    """The C++ name prefix of ``kernel``'s factored ``__global__`` templates."""
    return f"optim_core_{kernel.rule}_{kernel.digest}_f"


def _regions(kernel: Kernel, state_shapes: Mapping[str, str]) -> dict[tuple[int, str], tuple]:
    """Each workspace region, ``(reduction, part) -> (offset, length)``, as coefficients of
    ``(M, B * C, B)``: a row mean's partials (``"part"``, SPLIT per row) and row sums
    (``"sum"``, M), a column mean's partials (SPLIT per column) and column sums (B * C),
    or a column mean of a row value's row terms (``"part"``, M) and per-matrix sums
    (``"sum"``, B)."""
    axes = value_axes(kernel, state_shapes)
    regions, offset = {}, (0, 0, 0)
    for i, reduction in enumerate(kernel.reductions):
        if reduction.kind == "row_mean":
            parts = [("part", (SPLIT, 0, 0)), ("sum", (1, 0, 0))]
        elif reduction.kind == "col_mean" and "cols" in axes.arguments[i]:
            parts = [("part", (0, SPLIT, 0)), ("sum", (0, 1, 0))]
        elif reduction.kind == "col_mean":
            parts = [("part", (1, 0, 0)), ("sum", (0, 0, 1))]
        else:
            parts = []
        for part, length in parts:
            regions[i, part] = (offset, length)
            offset = tuple(a + b for a, b in zip(offset, length, strict=True))
    regions[-1, "total"] = (offset, (0, 0, 0))
    return regions


def _items(coefficients: tuple) -> str:
    """C text of ``a + b * M + c * B * C + d * B``."""
    terms = [f"{k}LL" if name is None else f"{k}LL * {name}" for k, name in
             zip(coefficients, (None, "M", "B * C", "B"), strict=True) if k]
    return f"({' + '.join(terms)})" if terms else "0LL"


def _count(argument: frozenset) -> str:
    """The elements a ``size`` counts: those of its argument's axes."""
    return ("n" if {"rows", "cols"} <= argument else "M" if "rows" in argument
            else "B * C" if "cols" in argument else "B")


def factored_cuda_source(kernel: Kernel, state_shapes: Mapping[str, str]) -> str:
    """CUDA C++ source of ``kernel``'s factored passes (see the module docstring).

    Every ``__global__`` template (``T``: ``float`` or ``double``) takes ``(long long n,
    long long R, long long C, <arrays in kernel order>, T h0, ..., double* oc_acc,
    double* oc_work)`` but ``name_finish{p}``, which takes ``(long long n, long long R,
    long long C, double* oc_acc, double* oc_work)``; ``oc_acc`` holds
    :func:`~._cuda.accumulator_length` values zeroed before the step, ``oc_work``
    :meth:`FactoredCudaKernels.workspace` (written before it is read: no zeroing).
    """
    name = factored_kernel_name(kernel)
    axes = value_axes(kernel, state_shapes)
    kinds = [r.kind for r in kernel.reductions]
    regions = _regions(kernel, state_shapes)
    m = len(kernel.reductions)

    def work(i: int, part: str) -> str:
        return f"oc_work[{_items((0, *regions[i, part][0]))}"

    def index_of(array_axes: frozenset) -> str:
        if "cols" in array_axes:
            return "i" if "rows" in array_axes else "j"
        return "row" if "rows" in array_axes else "b"

    def loads(names: set[str]) -> list[str]:
        return [f"const T l_{a} = a_{a}[{index_of(axes.arrays[a])}];" for a in sorted(names)]

    def reads(indices: set[int]) -> list[str]:
        """The axis reductions' values, typed from their float64 sums (the whole-tensor
        ones and counts are read at the kernel's start, :func:`scalars`)."""
        lines = []
        for i in sorted(indices):
            if kinds[i] not in _AXIS_KINDS:
                continue
            divisor = "C" if kinds[i] == "row_mean" else "R"
            lines.append(f"const T r{i} = T({work(i, 'sum')} + {index_of(axes.reduced[i])}] "
                         f"/ (double){divisor});")
        return lines

    def scalars(indices: set[int]) -> list[str]:
        lines = []
        for i in sorted(indices):
            if kinds[i] == "size":
                lines.append(f"    const T r{i} = T({_count(axes.arguments[i])});")
            elif kinds[i] == "norm":
                lines.append(f"    const T r{i} = T(oc_sqrt(oc_acc[{i}]));")
            elif kinds[i] == "sum":
                lines.append(f"    const T r{i} = T(oc_acc[{i}]);")
        return lines

    def assigns(entries: list, outer: bool | None = None) -> list[str]:
        return [f"const T v_{t} = {render(e, 'oc_')};" for t, e in entries
                if outer is None or ("cols" not in axes.locals[t]) == outer]

    def parameters(stored: set[str]) -> str:
        arrays = [f"{'' if a in stored else 'const '}T* __restrict__ a_{a}"
                  for a in kernel.arrays]
        return ", ".join(["long long n", "long long R", "long long C", *arrays,
                          *(f"T h{i}" for i in range(kernel.n_hoisted)),
                          "double* __restrict__ oc_acc", "double* __restrict__ oc_work"])

    def value(i: int) -> str:
        return f"(double)({render(kernel.reductions[i].expr, 'oc_')})"

    head = ["    const long long M = n / C;", "    const long long B = M / R;",
            "    const long long stride = (long long)blockDim.x * gridDim.x;",
            "    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
            "    (void)M; (void)B;"]

    def indent(lines: list[str], depth: int) -> list[str]:
        return [" " * (4 * depth) + line for line in lines]

    lines = [f"// Generated by optim_core from rule {kernel.rule!r} (factored passes); key "
             f"{kernel.key!r}.", PRELUDE]
    for stage, (by_row, by_column, whole, per_matrix, split) in enumerate(
            _stages(kernel, axes)):
        if by_row:
            entries, loaded, read = _needed(kernel, [kernel.reductions[i].expr for i in by_row])
            inner = split > 1
            outer_acc, inner_acc, row_end = [], [], []
            for i in by_row:
                argument = axes.arguments[i]
                if kinds[i] in _WHOLE:
                    slot = whole.index(i)
                    term = (f"s[{slot}] += {value(i)};" if kinds[i] == "sum" else
                            f"{{ const double x = {value(i)}; s[{slot}] += x * x; }}")
                    # One term per matrix, not per row, of a value without the row axis;
                    # one per row (not per thread of the row) of a row value.
                    guard = " && ".join(([] if "rows" in argument else ["r == 0"]) +
                                        ([] if "cols" in argument else ["t == 0"]))
                    statement = [f"if ({guard}) {term}"] if guard else [term]
                    (inner_acc if "cols" in argument else outer_acc).extend(statement)
                elif kinds[i] == "row_mean":
                    outer_acc.append(f"double a{i} = 0.0;")
                    inner_acc.append(f"a{i} += {value(i)};")
                    row_end.append(f"{work(i, 'part')} + row * {split} + t] = a{i};")
                else:  # the column mean of a row value: the row's term, summed per matrix
                    outer_acc.append(f"if (t == 0) {work(i, 'part')} + row] = {value(i)};")
            outer_loads = {a for a in loaded if "cols" not in axes.arrays[a]}
            outer_reads = {i for i in read if "cols" not in axes.reduced[i]}
            body = [*loads(outer_loads), *reads(outer_reads), *assigns(entries, True), *outer_acc]
            if inner:
                body += [f"for (long long c = t; c < C; c += {split}) {{",
                         "    const long long i = row * C + c;",
                         "    const long long j = b * C + c;",
                         "    (void)i; (void)j;",
                         *indent([*loads(loaded - outer_loads), *reads(read - outer_reads),
                                  *assigns(entries, False), *inner_acc], 1),
                         "}"]
            body += row_end
            lines += [
                "template <typename T>",
                f"__global__ void {name}_rows{stage}({parameters(set())}) {{",
                *head,
                *scalars(read),
                *([f"    double s[{len(whole)}] = {{}};"] if whole else []),
                f"    for (long long u = start; u < M * {split}; u += stride) {{",
                f"        const long long row = u / {split};",
                f"        const long long t = u - row * {split};",
                "        const long long b = row / R;",
                "        const long long r = row - b * R;",
                "        (void)b; (void)r; (void)t;",
                *indent(body, 2),
                "    }",
                *([f"    const int lane = threadIdx.x % {REDUCTION_SLOTS};"] if whole else []),
                *(f"    atomicAdd(&oc_acc[{m + i * REDUCTION_SLOTS} + lane], s[{slot}]);"
                  for slot, i in enumerate(whole)),
                "}",
                "",
            ]
        if by_column:
            entries, loaded, read = _needed(kernel, [kernel.reductions[i].expr
                                                     for i in by_column])
            lines += [
                "template <typename T>",
                f"__global__ void {name}_cols{stage}({parameters(set())}) {{",
                *head,
                *scalars(read),
                f"    for (long long u = start; u < {SPLIT}LL * B * C; u += stride) {{",
                "        const long long t = u / (B * C);",
                "        const long long j = u - t * (B * C);",
                "        const long long b = j / C;",
                "        const long long c = j - b * C;",
                *(f"        double a{i} = 0.0;" for i in by_column),
                f"        for (long long r = t; r < R; r += {SPLIT}) {{",
                "            const long long row = b * R + r;",
                "            const long long i = row * C + c;",
                "            (void)row; (void)i;",
                *indent([*loads(loaded), *reads(read), *assigns(entries)], 3),
                *(f"            a{i} += {value(i)};" for i in by_column),
                "        }",
                *(f"        {work(i, 'part')} + t * (B * C) + j] = a{i};" for i in by_column),
                "    }",
                "}",
                "",
            ]
        row_means = [i for i in by_row if kinds[i] == "row_mean"]
        if whole or per_matrix or row_means or by_column:
            # Items: each whole-tensor reduction (its slots), each per-matrix mean's
            # matrices, each row mean's rows, each column mean's columns; item k of its
            # kind, its partials summed in order.
            items = []
            for i in whole:
                items.append(((1, 0, 0, 0), [
                    "double total = 0.0;",
                    f"for (int slot = 0; slot < {REDUCTION_SLOTS}; ++slot) "
                    f"total += oc_acc[{m + i * REDUCTION_SLOTS} + slot];",
                    f"oc_acc[{i}] = total;"]))
            for i in per_matrix:
                items.append(((0, 0, 0, 1), [
                    "double total = 0.0;",
                    f"for (long long r = 0; r < R; ++r) total += {work(i, 'part')} + k * R + r];",
                    f"{work(i, 'sum')} + k] = total;"]))
            for i in row_means:
                items.append(((0, 1, 0, 0), [
                    "double total = 0.0;",
                    f"for (int t = 0; t < {split}; ++t) total += {work(i, 'part')} + k * {split}"
                    " + t];",
                    f"{work(i, 'sum')} + k] = total;"]))
            for i in by_column:
                items.append(((0, 0, 1, 0), [
                    "double total = 0.0;",
                    f"for (int t = 0; t < {SPLIT}; ++t) total += {work(i, 'part')} + t * (B * C)"
                    " + k];",
                    f"{work(i, 'sum')} + k] = total;"]))
            chain, begin = [], (0, 0, 0, 0)
            for index, (count, statements) in enumerate(items):
                end = tuple(x + y for x, y in zip(begin, count, strict=True))
                chain += [f"{'} else ' if index else ''}if (u < {_items(end)}) {{",
                          f"    const long long k = u - {_items(begin)};",
                          "    (void)k;",
                          *indent(statements, 1)]
                begin = end
            lines += [
                f"__global__ void {name}_finish{stage}(long long n, long long R, long long C, "
                "double* __restrict__ oc_acc, double* __restrict__ oc_work) {",
                *head,
                f"    for (long long u = start; u < {_items(begin)}; u += stride) {{",
                *indent(chain, 2),
                "        }",
                "    }",
                "}",
                "",
            ]
    # The update: one thread per element, the parameter and full-size states written.
    stored = [(a, kernel.results[a]) for a in kernel.stores]
    full = [(a, local) for a, local in stored if axes.arrays[a] == _FULL]
    entries, loaded, read = _needed(kernel, [("local", local) for _, local in full])
    lines += [
        "template <typename T>",
        f"__global__ void {name}_update({parameters({a for a, _ in full})}) {{",
        *head,
        *scalars(read),
        "    // The element's column, row, matrix and row in it, divided out once, then",
        "    // advanced by the stride's (a 64-bit division per element would cost more",
        "    // than the element's memory traffic).",
        "    const long long step_rows = stride / C;",
        "    const long long step_columns = stride - step_rows * C;",
        "    const long long step_matrices = step_rows / R;",
        "    const long long step_in_matrix = step_rows - step_matrices * R;",
        "    long long row = start / C;",
        "    long long c = start - row * C;",
        "    long long b = row / R;",
        "    long long r = row - b * R;",
        "    for (long long i = start; i < n; i += stride) {",
        "        const long long j = b * C + c;",
        "        (void)j; (void)row;",
        *indent([*loads(loaded), *reads(read), *assigns(entries)], 2),
        *(f"        a_{a}[i] = v_{local};" for a, local in full),
        "        c += step_columns;",
        "        const long long carry = c >= C ? 1 : 0;",
        "        c -= carry * C;",
        "        row += step_rows + carry;",
        "        b += step_matrices;",
        "        r += step_in_matrix + carry;",
        "        if (r >= R) { r -= R; b += 1; }",
        "    }",
        "}",
        "",
    ]
    # The row and column states, once each, after the update read their old values.
    shaped = [(a, local) for a, local in stored if axes.arrays[a] != _FULL]
    rows = [(a, local) for a, local in shaped if "cols" not in axes.arrays[a]]
    columns = [(a, local) for a, local in shaped if "cols" in axes.arrays[a]]
    if shaped:
        branches = []
        for group, extent, setup in (
                (rows, "M", ["const long long row = u;", "const long long b = row / R;",
                              "(void)b;"]),
                (columns, "B * C", ["const long long j = u - M;",
                                    "const long long b = j / C;", "(void)b;"])):
            if not group:
                continue
            entries, loaded, read = _needed(kernel, [("local", local) for _, local in group])
            branches.append((extent, read, [
                *setup, *loads(loaded), *reads(read), *assigns(entries),
                *(f"a_{a}[{index_of(axes.arrays[a])}] = v_{local};" for a, local in group)]))
        used = set().union(*(read for _, read, _ in branches))
        limit = " + ".join(extent for extent, _, _ in branches) if len(branches) == 2 else \
            branches[0][0]
        if len(branches) == 2:
            body = ["if (u < M) {", *indent(branches[0][2], 1), "} else {",
                    *indent(branches[1][2], 1), "}"]
        elif rows:
            body = branches[0][2]
        else:  # the column states alone: u counts from M
            body = branches[0][2]
            limit = "M + B * C"
        lines += [
            "template <typename T>",
            f"__global__ void {name}_states({parameters({a for a, _ in shaped})}) {{",
            *head,
            *scalars(used),
            f"    for (long long u = {'start' if rows else 'M + start'}; u < {limit}; "
            "u += stride) {",
            *indent(body, 2),
            "    }",
            "}",
            "",
        ]
    return "\n".join(lines) + "\n"


def factored_functions(kernel: Kernel, state_shapes: Mapping[str, str]) -> list[tuple]:
    """The ``__global__`` templates :func:`factored_cuda_source` defines, in launch
    order: ``(pass, suffix, extent)``, ``pass`` one of ``"rows"``, ``"cols"``,
    ``"finish"`` (a stage's; not a template), ``"update"``, ``"states"``; the kernel's
    name is ``factored_kernel_name(kernel) + suffix``; ``extent``, the items its
    grid-stride loop covers, as coefficients of ``(1, n, M, B * C, B)``."""
    axes = value_axes(kernel, state_shapes)
    found = []
    kinds = [r.kind for r in kernel.reductions]
    for stage, (by_row, by_column, whole, per_matrix, split) in enumerate(
            _stages(kernel, axes)):
        row_means = sum(kinds[i] == "row_mean" for i in by_row)
        if by_row:
            found.append(("rows", f"_rows{stage}", (0, 0, split, 0, 0)))
        if by_column:
            found.append(("cols", f"_cols{stage}", (0, 0, 0, SPLIT, 0)))
        if whole or per_matrix or row_means or by_column:
            found.append(("finish", f"_finish{stage}",
                          (len(whole), 0, row_means, len(by_column), len(per_matrix))))
    found.append(("update", "_update", (0, 1, 0, 0, 0)))
    shaped = [axes.arrays[a] for a in kernel.stores if axes.arrays[a] != _FULL]
    if shaped:
        found.append(("states", "_states", (0, 0, int(any("cols" not in a for a in shaped)),
                                            int(any("cols" in a for a in shaped)), 0)))
    return found


def _stages(kernel: Kernel, axes: Any) -> list[tuple[list[int], ...]]:
    """Per stage, its reductions by pass: those of the row pass, of the column pass, the
    whole-tensor ones and the per-matrix means (both of the row pass, finished after),
    and the threads per row of its row pass (1 for a pass over row values only)."""
    kinds = [r.kind for r in kernel.reductions]
    stages = []
    for stage in range(kernel.n_stages):
        indices = [i for i, r in enumerate(kernel.reductions) if r.stage == stage]
        by_column = [i for i in indices
                     if kinds[i] == "col_mean" and "cols" in axes.arguments[i]]
        by_row = [i for i in indices if kinds[i] != "size" and i not in by_column]
        whole = [i for i in indices if kinds[i] in _WHOLE]
        per_matrix = [i for i in by_row if kinds[i] == "col_mean"]
        split = SPLIT if any("cols" in axes.arguments[i] for i in by_row) else 1
        stages.append((by_row, by_column, whole, per_matrix, split))
    return stages


class FactoredCudaKernels(NamedTuple):
    """One factored specialization's compiled kernels: ``functions``, ``(pass, extent,
    function)`` in launch order (see :func:`factored_functions`; a finish pass takes
    ``(n, R, C, oc_acc, oc_work)``, the others the arrays and scalars too); ``work``, the
    workspace length's coefficients of ``(M, B * C, B)``; ``accumulator``, the float64
    accumulator's length. ``stages`` is empty and ``table`` None: these take neither the
    elementwise rules' reduction launches nor the step plans."""

    functions: tuple
    work: tuple
    accumulator: int
    stages: tuple = ()
    table: Any = None
    factored: bool = True

    def workspace(self, M: int, B: int, C: int) -> int:
        """float64 values of a tensor's workspace."""
        a, b, c = self.work
        return a * M + b * B * C + c * B


def work_coefficients(kernel: Kernel, state_shapes: Mapping[str, str]) -> tuple:
    """The workspace length's coefficients of ``(M, B * C, B)``."""
    return _regions(kernel, state_shapes)[-1, "total"][0]
