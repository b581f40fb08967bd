"""The printed result table and the run's plain-text report (report.md)."""

from __future__ import annotations

import math
from typing import Any

BINARY_COLUMNS = (
    ("pooled AUC", lambda r: r["pooled"]["auc"]),
    ("mean site AUC", lambda r: r["across_sites"]["auc"]["mean"]),
    ("worst site AUC", lambda r: r["across_sites"]["auc"]["worst"]),
    ("accuracy", lambda r: r["pooled"]["accuracy"]),
    ("sensitivity", lambda r: r["pooled"]["sensitivity"]),
    ("specificity", lambda r: r["pooled"]["specificity"]),
    ("Brier", lambda r: r["pooled"]["brier"]),
    ("ECE", lambda r: r["pooled"]["ece"]),
)

FORECAST_COLUMNS = tuple(
    (f"{metric.upper()} {label}", lambda r, key=f"{metric}_{label}": r["overall"][key])
    for label in ("15min", "30min", "60min")
    for metric in ("mae", "rmse", "mape")
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


def results_table(reports: dict[str, dict], columns=BINARY_COLUMNS) -> str:
    """One row per method (federated and the baselines run beside it)."""
    header = ["method"] + [name for name, _ in columns]
    rows = [[method] + [get(report) for _, get in columns] for method, report in reports.items()]
    return markdown_table(header, rows)


def client_table(reports: dict[str, dict], group: str = "sites", metric: str = "auc") -> str:
    """Per-client (site, district) values of one metric, one column per method."""
    methods = list(reports)
    clients = list(next(iter(reports.values()))[group])
    rows = [[client] + [reports[m][group][client][metric] for m in methods] for client in clients]
    return markdown_table([group[:-1]] + [f"{m} {metric}" for m in methods], rows)


def markdown_report(
    run, summary: dict[str, Any], table: str, group: str = "sites", metric: str = "auc",
    extra: dict[str, str] | None = None,
) -> str:
    parts = [
        f"# {run.app} run {run.run_id}",
        f"Data: {summary['data']['source']}. Rounds: {summary['rounds']}.",
        f"## Results (held-out data of every {group[:-1]})",
        table,
        f"## Per {group[:-1]}",
        client_table(summary["results"], group, metric),
    ]
    for title, text in (extra or {}).items():
        parts += [f"## {title}", text]
    parts += ["## Resolved config", "```toml\n" + run.config.to_toml() + "```"]
    return "\n\n".join(parts) + "\n"
