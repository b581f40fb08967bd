"""The printed result table, the run's plain-text report (report.md) and its page (report.html)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from shared import plots
from shared.report import atomic_folder, write_report_html

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
    run, summary: dict[str, Any], table: str, group: str | None = "sites", metric: str = "auc",
    extra: dict[str, str] | None = None,
) -> str:
    """`group` names the per-client reports ("sites", "districts"); None: no per-client table."""
    parts = [
        f"# {run.app} run {run.run_id}",
        f"Data: {summary['data']['source']}. Rounds: {summary['rounds']}.",
        f"## Results (held-out data of every {group[:-1]})" if group else "## Results (held-out data)",
        table,
    ]
    if group:
        parts += [f"## Per {group[:-1]}", client_table(summary["results"], group, metric)]
    for title, text in (extra or {}).items():
        parts += [f"## {title}", text]
    parts += ["## Resolved config", "```toml\n" + run.config.to_toml() + "```"]
    return "\n\n".join(parts) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (none if the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The few lines above the result table: data, rounds, time, privacy."""
    lines = []
    if "data" in summary and "source" in summary["data"]:
        lines.append(f"Data: {summary['data']['source']}")
    if "rounds" in summary:
        seconds = summary.get("training_seconds")
        lines.append(f"Rounds: {summary['rounds']}" + (f" ({seconds:.1f} s of training)" if seconds else ""))
    sent = summary.get("communication")
    if sent:
        lines.append(f"Communication: {sent['bytes_up']:,} bytes up (clients to server), {sent['bytes_down']:,} down")
    privacy = summary.get("privacy")
    if isinstance(privacy, dict) and privacy.get("level", "none") != "none":
        epsilon = privacy.get("epsilon")
        spent = f"ε = {epsilon:.3g}" if isinstance(epsilon, (int, float)) else "ε not computed"
        lines.append(
            f"Privacy: {privacy['level']}-level DP, {spent} at δ = {privacy.get('delta')}"
            + (f"; {privacy['mechanism']}" if privacy.get("mechanism") else "")
        )
    else:
        lines.append("Privacy: none (no differential privacy)")
    return lines


def html_report(
    run, summary: dict[str, Any], table: str, *,
    round_metric: str, final_metric: Callable[[dict], float], metric_label: str,
    round_metric_split: str = "test", step_key: str = "round",
    group: str | None = "sites", client_metric: str = "auc", client_metric_label: str | None = None,
    roc: dict[str, tuple] | None = None, method: str = "federated",
    forecasts: dict[str, tuple] | None = None, forecast_title: str = "Forecast against actual",
    forecast_ylabel: str = "value", extra: dict[str, str] | None = None,
) -> Path:
    """Writes `run.dir/report.html` and its `plots/` (both atomically); returns the page's path.

    Plots: `round_metric` from metrics.jsonl per round with every method's final value
    (`final_metric(report)`) as a line; ε per round (DP runs); ROC curves (`roc`: method ->
    (labels, probabilities)); the per-client `client_metric` of every method (`group` in each
    report); forecasts against actual (`forecasts`: name -> (x, actual, forecast)). A plot
    without data is left out. `extra`: further markdown tables (title -> table).
    """
    records = read_metrics(run.dir / "metrics.jsonl")
    results = summary.get("results", {})
    finals = {}
    for name, report in results.items():
        if name == method and round_metric_split == "test":
            continue  # the curve's last point is this value
        try:
            finals[name if name != method else f"{method} (final model)"] = final_metric(report)
        except (KeyError, TypeError):
            continue
    on = "" if round_metric_split == "test" else f"{method} on {round_metric_split} data per {step_key}; lines: test data"
    drawers: list[tuple[str, str, Callable[[Path], Path | None]]] = [
        (
            f"{metric_label} per {step_key}: {method} curve, final values of the other methods as lines"
            + (f" ({on})" if on else " (test data)"),
            "metric_per_round.png",
            lambda p: plots.metric_per_round(
                records, round_metric, finals, p, metric_label, xlabel=step_key, label=method,
                title=f"{metric_label} per {step_key}" + (f"\n{on}" if on else ""),
            ),
        ),
        (
            "ε spent after each round (differential privacy accountant)",
            "epsilon_per_round.png",
            lambda p: plots.epsilon_per_round(records, p, _target_epsilon(run)),
        ),
    ]
    if roc:
        drawers.append(("ROC curves on the pooled test data", "roc_curves.png",
                        lambda p: plots.roc_curves(roc, p, "ROC curves, pooled test data")))
    label = client_metric_label or client_metric
    if group and results:
        try:
            values = client_values(results, group, client_metric)
        except (KeyError, StopIteration):
            values = {}
        if values:
            client = group[:-1] if group.endswith("s") else group
            drawers.append((
                f"{label} per {client}, every method (test data); n/a: undefined at that {client}",
                "per_client.png",
                lambda p: plots.per_client_bars(values, label, p, f"{label} per {client}", client),
            ))
    if forecasts:
        drawers.append((forecast_title, "forecast_vs_actual.png",
                        lambda p: plots.forecast_vs_actual(forecasts, p, forecast_title, forecast_ylabel)))
    drawn = []
    with atomic_folder(run.dir / "plots") as folder:
        for caption, name, draw in drawers:
            if draw(folder / name) is not None:
                drawn.append((caption, run.dir / "plots" / name))
    tables = []
    if group and results:
        try:
            tables.append((f"Per {group[:-1]}", client_table(results, group, client_metric)))
        except (KeyError, StopIteration):
            pass
    tables += list((extra or {}).items())
    return write_report_html(
        run.dir / "report.html", f"{run.app} run {run.run_id}", summary_lines(summary), table,
        drawn, run.config.to_toml(), tables,
    )


def client_values(results: dict[str, dict], group: str, metric: str) -> dict[str, dict[str, float]]:
    """client -> method -> metric, from every method's per-client reports."""
    clients = list(next(iter(results.values()))[group])
    return {c: {m: r[group][c][metric] for m, r in results.items() if c in r.get(group, {})} for c in clients}


def _target_epsilon(run) -> float | None:
    section = getattr(run.config, "privacy", None)
    target = getattr(section, "target_epsilon", 0.0) if section is not None else 0.0
    return float(target) if target else None
