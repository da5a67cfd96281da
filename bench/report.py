"""The printed form of a benchmark run: a Markdown table and the targets' verdicts."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report", "format_table", "format_targets"]

_HEADER = ("optimizer", "workload", "tensors", "impl", "median ms", "GB/s", "of floor",
           "vs torch-fused")


def format_report(report: dict[str, Any]) -> str:
    """Header line, floor, table, targets and the reasons of "n/a" cells."""
    meta, best = report["meta"], report["floor"]["best"]
    where = meta.get("gpu") or f"{meta['cpu']}, {meta['cpu_count']} cores"
    lines = [f"optim-core benchmark, {meta['date_utc']}, {meta['device']}: {where}, "
             f"{meta['dtype']}, load average {meta['load_average_start']} -> "
             f"{meta.get('load_average_end')}",
             f"floor: read-modify-write {best['GBps']:.1f} GB/s ({best['kernel']}, "
             f"{best['numel']:.3g} elements)", "", format_table(report["results"])]
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
            ratio = r["ratio_vs_torch_fused"]
            cells = (f"{r['median_s'] * 1e3:.3f}", f"{r['GBps']:.1f}",
                     f"{r['fraction_of_floor']:.2f}", "" if ratio is None else f"{ratio:.2f}x")
        else:
            cells = (r["status"], "", "", "")
        rows.append((r["optimizer"], r["workload"], str(r["n_tensors"]), r["impl"], *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    numeric = range(4, len(_HEADER))

    def line(row: tuple[str, ...]) -> str:
        padded = (cell.rjust(w) if i in numeric else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


def format_targets(targets: list[dict[str, Any]]) -> str:
    """One line per target: what was asked, what was measured, whether it holds."""
    lines = []
    for t in targets:
        if t["quantity"] == "ratio_vs_torch_fused":
            asked = f"{t['impl']} time / torch-fused time <= {t['bound']:.2f}"
            got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        else:
            asked = f"{t['impl']} fraction of floor >= {t['bound']:.2f}"
            got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "HOLDS", False: "FAILS", None: "UNKNOWN"}[t["holds"]]
        lines.append(f"target {t['optimizer']} {t['workload']}: {asked}: {got} -> {verdict}")
    return "\n".join(lines)
