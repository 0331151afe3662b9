"""Reports from the metrics catalogue (`aepo.catalogue.METRICS`): the demo report's training
table, `aepo compare`'s table columns and curve panels, and docs/metrics.md."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aepo.catalogue import METRICS as CATALOGUE
from aepo.catalogue import VIEWS, Metric, format_value, shown

__all__ = ["compare_columns", "metrics_reference", "training_table"]


def _cell(metric: Metric, value: Any) -> str:
    return format_value(metric, value) if isinstance(value, (int, float)) else "-"


def training_table(first: Mapping[str, Any], last: Mapping[str, Any]) -> list[str]:
    """Markdown rows of the demo report's training table: each `report` metric at the first and
    the last step ("-" where a step has no value)."""
    lines = ["| | first step | last step |", "|---|---|---|"]
    lines += [f"| {m.key} | {_cell(m, first.get(m.key))} | {_cell(m, last.get(m.key))} |" for m in shown("report")]
    return lines


def compare_columns(k: int) -> list[tuple[str, str, float]]:
    """(run-level key, label, scale) of `aepo compare`'s table columns, pass@{k} filled in."""
    return [(m.key.format(k=k), m.label.format(k=k), m.scale) for m in shown("table")]


def metrics_reference() -> str:
    """docs/metrics.md: every catalogue row, by namespace, with where it is stored and shown."""
    out = ["# Metrics", "",
           "Generated from `aepo.catalogue.METRICS` (`python -c \"from aepo.eval.report import metrics_reference; "
           "print(metrics_reference(), end='')\" > docs/metrics.md`); a test checks this file against it.", "",
           "A metric is emitted once, under its final key, where it is computed (`aepo.rollout.metrics` for "
           "`reward/`, `rollout/`, `tools/`, `audit/`; `aepo.train.update` for `actor/`); one catalogue row "
           "labels it and says where it shows. Views: " + ", ".join(f"`{v}`" for v in VIEWS) +
           " (see `aepo.catalogue`). `<name>` marks a family of keys.", ""]
    groups: dict[str, list[Metric]] = {}
    for m in CATALOGUE:
        ns = m.key.split("/")[0] + "/" if "/" in m.key else ("run level" if m.where == "result.json" else "progress")
        groups.setdefault(ns, []).append(m)
    for ns, rows in groups.items():
        out += [f"## {ns}", "", "| key | label | stored in | shown in | scale | meaning |", "|---|---|---|---|---|---|"]
        for m in rows:
            views = ", ".join(m.views) + (f" (`{m.short}`)" if m.short else "") if m.views else "-"
            scale = "%" if m.scale == 100 else ("" if m.scale == 1 else f"x{m.scale:g}")
            out.append(f"| `{m.key}` | {m.label} | {m.where} | {views} | {scale} | {m.doc} |")
        out.append("")
    return "\n".join(out)
