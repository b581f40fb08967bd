"""The printed result table and the run's plain-text report (report.md)."""

from __future__ import annotations

import math
from typing import Any

TABLE_COLUMNS = (
    ("pooled AUC", lambda r: r["pooled"]["auc"]),
    ("mean site AUC", lambda r: r["across_sites"]["auc"]["mean"]),
    ("worst site AUC", lambda r: r["across_sites"]["auc"]["worst"]),
    ("accuracy", lambda r: r["pooled"]["accuracy"]),
    ("sensitivity", lambda r: r["pooled"]["sensitivity"]),
    ("specificity", lambda r: r["pooled"]["specificity"]),
    ("Brier", lambda r: r["pooled"]["brier"]),
    ("ECE", lambda r: r["pooled"]["ece"]),
)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def results_table(reports: dict[str, dict]) -> str:
    """One row per method (federated and the baselines run beside it)."""
    header = ["method"] + [name for name, _ in TABLE_COLUMNS]
    rows = [[method] + [get(report) for _, get in TABLE_COLUMNS] for method, report in reports.items()]
    return markdown_table(header, rows)


def site_table(reports: dict[str, dict], metric: str = "auc") -> str:
    """Per-site values of one metric, one column per method."""
    methods = list(reports)
    sites = list(next(iter(reports.values()))["sites"])
    rows = [[site] + [reports[m]["sites"][site][metric] for m in methods] for site in sites]
    return markdown_table(["site"] + [f"{m} {metric}" for m in methods], rows)


def markdown_report(run, summary: dict[str, Any], table: str) -> str:
    reports = summary["results"]
    return "\n\n".join(
        [
            f"# {run.app} run {run.run_id}",
            f"Data: {summary['data']['source']}. Rounds: {summary['rounds']}.",
            "## Results (held-out rows of every site)",
            table,
            "## Per site",
            site_table(reports),
            "## Resolved config",
            "```toml\n" + run.config.to_toml() + "```",
        ]
    ) + "\n"
