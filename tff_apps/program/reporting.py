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
        *filter(None, [participation_line(summary)]),
        *filter(None, [robustness_line(summary)]),
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


def participation_line(summary: dict[str, Any]) -> str | None:
    """One line on unreliable clients ([clients]); None when every sampled client reported."""
    seen = summary.get("participation") or {}
    if not any(seen.get(key) for key in ("dropped", "stragglers", "unused", "rounds_skipped")):
        return None
    return (
        f"Participation: {seen['mean_reported']:.2f} clients reported per round; {seen['dropped']} dropped out "
        f"({seen['dropout_rate']:.1%} of those sampled), {seen['stragglers']} cut at the deadline, "
        f"{seen['unused']} over-selected and unused; {seen['rounds_skipped']} of {seen['rounds']} rounds "
        "skipped (quorum missed)"
    )


def robustness_line(summary: dict[str, Any]) -> str | None:
    """One line on [robustness] (summary.json's "robustness" entry); None at its defaults."""
    robust = summary.get("robustness")
    if not robust:
        return None
    aggregation = robust["aggregation"]
    if "trim_fraction" in robust:
        aggregation += f" (trim_fraction {robust['trim_fraction']:g} per side)"
    if not robust["bad_clients"]:
        return f"Robust aggregation: {aggregation}; no bad clients"
    mode = robust["bad_client_mode"]
    if mode == "scaled_update":
        mode += f", updates x {robust['bad_update_scale']:g}"
    return f"Robust aggregation: {aggregation}; bad clients ({mode}): {', '.join(robust['bad_clients'])}"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The few lines above the result table: data, rounds, time, privacy."""
    lines = []
    if "data" in summary and "source" in summary["data"]:
        lines.append(f"Data: {summary['data']['source']}")
    if "rounds" in summary:
        seconds = summary.get("training_seconds")
        lines.append(f"Rounds: {summary['rounds']}" + (f" ({seconds:.1f} s of training)" if seconds else ""))
    lines += [line for line in (participation_line(summary), robustness_line(summary)) if line]
    sent = summary.get("communication")
    if sent:
        lines.append(f"Communication: {sent['bytes_up']:,} bytes up (clients to server), {sent['bytes_down']:,} down")
        if sent.get("compression"):
            lines.append(
                f"Compression: {sent['compression']}, {sent['bits']} bits: upload {sent['upload_ratio']}x smaller "
                f"than float32 ({sent['bytes_up_uncompressed']:,} bytes)"
            )
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


def client_sections(summary: dict[str, Any], group: str, personalization_label: str) -> dict[str, str]:
    """The report's "Client data profiles" and (when it ran) "Personalization" sections."""
    from shared import profile

    sections = {}
    if summary.get("profiles"):
        warnings = summary.get("profile_warnings", [])
        header, rows = profile.table_rows(summary["profiles"], warnings)
        text = markdown_table([group[:-1], *header[1:]], rows)
        listed = "\n".join(f"- {w}" for w in warnings) or "- no client differs sharply from the rest"
        sections["Client data profiles"] = text + "\n\nWarnings (each client against the others):\n\n" + listed
    if summary.get("personalization"):
        sections["Personalization"] = personalization_table(summary["personalization"], personalization_label, group)
    return sections


def personalization_table(per_client: dict[str, dict[str, float]], label: str, group: str) -> str:
    """client, metric of the global model on its test split, of its fine-tuned model, change
    (then any further metric's `<name>_before` / `<name>_after`); and the mean over the
    clients where every number is defined."""
    further = [key[: -len("_before")] for key in next(iter(per_client.values())) if key.endswith("_before")]
    rows = [
        [name, v["before"], v["after"], v["after"] - v["before"]]
        + [v[f"{m}_{when}"] for m in further for when in ("before", "after")]
        for name, v in per_client.items()
    ]
    defined = [row for row in rows if not any(value is None or math.isnan(value) for value in row[1:])]
    if defined:
        columns = range(1, len(rows[0]))
        rows.append([f"mean ({len(defined)} {group})"] + [sum(row[i] for row in defined) / len(defined) for i in columns])
    header = [group[:-1], f"{label} before (global)", f"{label} after (fine-tuned)", "change"]
    return markdown_table(header + [f"{m} {when}" for m in further for when in ("before", "after")], rows)
