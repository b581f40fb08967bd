"""The report's plots: each function draws one PNG (matplotlib, Agg) and returns its path.

Domain-free: the caller passes plain numbers (metric records, label/probability arrays,
per-client values, series). A function whose data would give an empty figure draws
nothing and returns None, so a report never shows an empty plot. Output is deterministic:
fixed size (800 px wide at 100 dpi), bundled font, no timestamp or software tag in the PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.dates
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

WIDTH_INCHES, DPI = 8.0, 100  # 800 px wide: readable in a report without zooming
STYLE = {
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same glyphs everywhere
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "tff-apps",
    "path.simplify": False,
}
# The same method keeps the same colour in every plot of every app.
KNOWN_METHODS = (
    "federated", "centralized", "local_only", "persistence", "historical_average",
    "vertical", "lender_alone",
)
LINESTYLES = ("-", "--", "-.", ":")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def color_of(method: str, others: Sequence[str] = ()) -> str:
    base = method.split(" (")[0]
    if base in KNOWN_METHODS:
        return PALETTE[KNOWN_METHODS.index(base) % len(PALETTE)]
    unknown = [m for m in others if m.split(" (")[0] not in KNOWN_METHODS]
    index = len(KNOWN_METHODS) + (unknown.index(method) if method in unknown else 0)
    return PALETTE[index % len(PALETTE)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def _figure(height_inches: float, rows: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(WIDTH_INCHES, height_inches), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return figure, axes


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" (version) tag; Agg writes no creation time: same data, same bytes.
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def metric_per_round(
    records: Iterable[Mapping[str, Any]], metric: str, baselines: Mapping[str, float],
    path: Path | str, ylabel: str, title: str | None = None, xlabel: str = "round",
    label: str = "federated",
) -> Path | None:
    """The metric on each round that has it (a line with markers) and each baseline's
    final value as a dashed horizontal line. None when no round has the metric."""
    points = [(r["round"], r[metric]) for r in records if _finite(r.get(metric)) and "round" in r]
    if not points:
        return None
    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(4.5)
        rounds, values = zip(*points)
        axes.plot(rounds, values, marker="o", markersize=4, color=color_of(label), label=f"{label} (per {xlabel})")
        for name, value in baselines.items():
            if _finite(value):
                axes.axhline(
                    float(value), linestyle="--", linewidth=1.5, color=color_of(name, list(baselines)),
                    label=f"{name}: {float(value):.4g}",
                )
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title or f"{ylabel} per {xlabel}")
        # Below the axes: baseline lines run across the whole width, a legend inside hides some.
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, fontsize=9)
        return _save(figure, path)


def epsilon_per_round(
    records: Iterable[Mapping[str, Any]], path: Path | str, target: float | None = None
) -> Path | None:
    """ε spent so far after each round; None when the run had no DP (no `epsilon` field)."""
    points = [(r["round"], r["epsilon"]) for r in records if _finite(r.get("epsilon")) and "round" in r]
    if not points:
        return None
    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(4.0)
        rounds, values = zip(*points)
        axes.plot(rounds, values, marker="o", markersize=3, color="#d62728", label="ε spent so far")
        if target is not None and _finite(target):
            axes.axhline(float(target), linestyle="--", color="#7f7f7f", label=f"target ε = {float(target):g}")
        axes.set_xlabel("round")
        axes.set_ylabel("ε")
        axes.set_ylim(bottom=0)
        axes.set_title(f"Privacy spent per round (final ε = {values[-1]:.3g})")
        axes.legend(loc="best", fontsize=9)
        return _save(figure, path)


def roc_curves(curves: Mapping[str, tuple[Any, Any]], path: Path | str, title: str = "ROC curves") -> Path | None:
    """One ROC curve per method from its (0/1 labels, probabilities); the legend gives the AUC.

    A method whose labels hold one class only has no curve; None when no method has one."""
    drawable = {}
    for name, (labels, scores) in curves.items():
        y = np.asarray(labels).ravel()
        p = np.asarray(scores, dtype=np.float64).ravel()
        if y.size and y.size == p.size and np.any(y == 1) and np.any(y == 0) and np.all(np.isfinite(p)):
            drawable[name] = (y, p)
    if not drawable:
        return None
    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(6.0)
        axes.plot([0, 1], [0, 1], linestyle=":", color="#7f7f7f", label="chance (AUC 0.5)")
        for index, (name, (y, p)) in enumerate(drawable.items()):
            fpr, tpr, _ = roc_curve(y, p)
            # Curves of good models overlap: thinner and dashed in turn, so each stays visible.
            axes.plot(fpr, tpr, linewidth=max(3.0 - 0.6 * index, 1.0), linestyle=LINESTYLES[index % 4],
                      color=color_of(name, list(curves)),
                      label=f"{name} (AUC {roc_auc_score(y, p):.4f}, n = {y.size})")
        axes.set_xlim(-0.01, 1.01)
        axes.set_ylim(-0.01, 1.01)
        axes.set_xlabel("false positive rate (1 - specificity)")
        axes.set_ylabel("true positive rate (sensitivity)")
        axes.set_title(title)
        axes.legend(loc="lower right", fontsize=9)
        return _save(figure, path)


def per_client_bars(
    values: Mapping[str, Mapping[str, float]], metric: str, path: Path | str,
    title: str | None = None, client_label: str = "client",
) -> Path | None:
    """Grouped bars: one group per client, one bar per method. An undefined value (NaN,
    None) shows as "n/a" instead of a bar. None when no value is defined."""
    clients = list(values)
    methods = list(dict.fromkeys(m for client in clients for m in values[client]))
    if not any(_finite(values[c].get(m)) for c in clients for m in methods):
        return None
    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(4.5)
        width = 0.8 / len(methods)
        positions = np.arange(len(clients))
        finite = [float(values[c][m]) for c in clients for m in methods if _finite(values[c].get(m))]
        label_values = len(clients) * len(methods) <= 30
        for j, method in enumerate(methods):
            x = positions - 0.4 + width * (j + 0.5)
            heights = [values[c].get(method) for c in clients]
            shown = [float(h) if _finite(h) else 0.0 for h in heights]
            bars = axes.bar(x, shown, width, color=color_of(method, methods), label=method)
            for bar, h in zip(bars, heights):
                if not _finite(h):
                    axes.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom",
                                  fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
                elif label_values:
                    axes.annotate(f"{float(h):.3f}" if abs(float(h)) < 100 else f"{float(h):.0f}", (bar.get_x() + bar.get_width() / 2, float(h)),
                                  ha="center", va="bottom", fontsize=7, rotation=90,
                                  xytext=(0, 2), textcoords="offset points")
        top = max(finite + [0.0])
        axes.set_ylim(min(finite + [0.0]), top * 1.18 if top > 0 else 1.0)
        axes.set_xticks(positions, clients, rotation=20 if len(clients) > 6 else 0)
        axes.set_xlabel(client_label)
        axes.set_ylabel(metric)
        axes.set_title(title or f"{metric} per {client_label}")
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=min(len(methods), 5), fontsize=9)
        return _save(figure, path)


def forecast_vs_actual(
    series: Mapping[str, tuple[Any, Any, Any]], path: Path | str, title: str = "Forecast against actual",
    ylabel: str = "value", label: str = "forecast",
) -> Path | None:
    """One panel per series name: `(x, actual, predicted)`, x being steps or datetimes.

    Missing actual values (NaN) show as gaps. None when no series has a finite value."""
    panels = {
        name: (np.asarray(x), np.asarray(a, dtype=np.float64), np.asarray(p, dtype=np.float64))
        for name, (x, a, p) in series.items()
        if np.isfinite(np.asarray(a, dtype=np.float64)).any() or np.isfinite(np.asarray(p, dtype=np.float64)).any()
    }
    if not panels:
        return None
    with matplotlib.rc_context(STYLE):
        figure, axes_list = _figure(1.0 + 2.4 * len(panels), rows=len(panels))
        for axes, (name, (x, actual, predicted)) in zip(axes_list, panels.items()):
            axes.plot(x, actual, color="#333333", linewidth=1.2, label="actual")
            axes.plot(x, predicted, color=color_of("federated"), linewidth=1.2, label=label)
            axes.set_title(name, fontsize=10)
            axes.set_ylabel(ylabel)
            if np.issubdtype(x.dtype, np.datetime64):
                axes.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%a %H:%M"))
        figure.suptitle(title)
        # One legend for every panel, below them, where it hides no data.
        figure.legend(*axes_list[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
        return _save(figure, path)
