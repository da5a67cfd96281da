"""The printed form of a benchmark run: a Markdown table and the targets' verdicts."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report", "format_table", "format_summary", "format_targets",
           "format_paired"]

_HEADER = ("optimizer", "workload", "tensors", "impl", "median ms", "GB/s", "of floor",
           "vs torch-fused")


def format_report(report: dict[str, Any]) -> str:
    """Header line, floor, table, targets and the reasons of "n/a" cells."""
    meta, best = report["meta"], report["floor"]["best"]
    where = meta.get("gpu") or f"{meta['cpu']}, {meta['cpu_count']} cores"
    lines = [f"optim-core benchmark, {meta['date_utc']}, {meta['device']}: {where}, "
             f"{meta['dtype']}, load average {meta['load_average_start']} -> "
             f"{meta.get('load_average_end')}",
             f"floor: {best['GBps']:.1f} GB/s ({best['kernel']}, "
             f"{best['numel']:.3g} elements)", "",
             "Median step time in ms (fraction of the floor):", "",
             format_summary(report["results"]), "", "All measurements:", "",
             format_table(report["results"])]
    paired = format_paired(report["results"])
    if paired:
        lines += ["", "Timed in alternation with the floor kernel, one call of each per "
                  "round (the fraction a floor target is judged on):", "", paired]
    targets = format_targets(report["targets"])
    if targets:
        lines += ["", targets]
    reasons = sorted({f"{r['impl']} {r['optimizer']}: {r['reason']}" for r in report["results"]
                      if r["status"] not in ("ok",)})
    if reasons:
        lines += ["", "not measured:"] + [f"- {reason}" for reason in reasons]
    return "\n".join(lines)


def format_table(results: list[dict[str, Any]]) -> str:
    """One Markdown row per cell; "n/a", "error" or "skipped" where nothing was timed."""
    rows = [_HEADER]
    for r in results:
        if r["status"] == "ok":
            # vs torch-fused; vs torch's only implementation where it has no fused (Muon).
            ratio, against = r.get("ratio_vs_torch_fused"), ""
            if ratio is None and r.get("ratio_vs_torch_forloop") is not None:
                ratio, against = r["ratio_vs_torch_forloop"], " (forloop)"
            cells = (f"{r['median_s'] * 1e3:.3f}", f"{r['GBps']:.1f}",
                     f"{r['fraction_of_floor']:.2f}",
                     "" if ratio is None else f"{ratio:.2f}x{against}")
        else:
            cells = (r["status"], "", "", "")
        rows.append((r["optimizer"], r["workload"], str(r["n_tensors"]), r["impl"], *cells))
    return _markdown(rows, numeric_from=4)


def format_paired(results: list[dict[str, Any]]) -> str:
    """The cells timed in alternation with the floor kernel: both medians and the
    fraction; empty where there are none."""
    rows = [("optimizer", "workload", "impl", "rounds", "floor GB/s", "floor ms", "step ms",
             "of floor")]
    for r in results:
        if r.get("fraction_of_floor_paired") is not None:
            floor_ms = r["bytes"] / (r["paired_floor_GBps"] * 1e9) * 1e3
            rows.append((r["optimizer"], r["workload"], r["impl"], str(r["paired_rounds"]),
                         f"{r['paired_floor_GBps']:.1f}", f"{floor_ms:.3f}",
                         f"{r['paired_step_median_s'] * 1e3:.3f}",
                         f"{r['fraction_of_floor_paired']:.3f}"))
    return _markdown(rows, numeric_from=3) if len(rows) > 1 else ""


def _markdown(rows: list[tuple[str, ...]], numeric_from: int) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        padded = (cell.rjust(w) if i >= numeric_from else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= numeric_from else "-")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


def format_summary(results: list[dict[str, Any]]) -> str:
    """One row per optimizer and workload, one column per implementation: "ms (floor %)"."""
    impls = list(dict.fromkeys(r["impl"] for r in results))
    keys = list(dict.fromkeys((r["optimizer"], r["workload"]) for r in results))
    cells = {(r["optimizer"], r["workload"], r["impl"]): r for r in results}
    rows = [("optimizer", "workload", "floor ms", *impls)]
    for optimizer, workload in keys:
        floor_ms = next((f"{r['floor_s'] * 1e3:.3g}" for r in results
                         if (r["optimizer"], r["workload"]) == (optimizer, workload)
                         and r["floor_s"] is not None), "")
        row = [optimizer, workload, floor_ms]
        for impl in impls:
            r = cells.get((optimizer, workload, impl))
            if r is None:
                row.append("")
            elif r["status"] != "ok":
                row.append(r["status"])
            else:
                row.append(f"{r['median_s'] * 1e3:.3g} ({r['fraction_of_floor']:.2f})")
        rows.append(tuple(row))
    return _markdown(rows, numeric_from=2)


def format_targets(targets: list[dict[str, Any]]) -> str:
    """One line per target: what was asked, what was measured, whether it holds."""
    lines = []
    for t in targets:
        if t["quantity"].startswith("ratio_vs_"):
            torch_impl = t["quantity"].removeprefix("ratio_vs_").replace("_", "-")
            asked = f"{t['impl']} time / {torch_impl} time <= {t['bound']:.2f}"
            got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        else:
            paired = " (in alternation)" if t["quantity"].endswith("_paired") else ""
            asked = f"{t['impl']} fraction of floor{paired} >= {t['bound']:.2f}"
            got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "HOLDS", False: "FAILS", None: "UNKNOWN"}[t["holds"]]
        lines.append(f"target {t['optimizer']} {t['workload']}: {asked}: {got} -> {verdict}")
    return "\n".join(lines)
