"""Per-client data profiles: aggregates a client computes from its own raw rows, and the
warnings that come from comparing each client with the rest.

`profile` runs where the client's rows are (before imputation or normalization) and
returns only aggregates: row count, missing share per column, label balance, and per
numeric column min / max / mean / std (a categorical column: missing share and number of
categories only). `compare` sees nothing but these profiles. It compares each client with
the OTHER clients, robustly (median and median absolute deviation of the others), so one
odd client cannot hide itself by pulling the reference towards it.

Works for hospital tables (label = a binary diagnosis) and for sensor tables (one column
per sensor, the "label" is the speed itself: `label_kind="regression"`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

# --- thresholds of `compare` (a warning needs the difference to pass every test listed) ---
# 1.4826 x MAD estimates a standard deviation for normal data; with 3-5 other clients the
# MAD can be 0, so each test also has an absolute floor that alone says "sharply different".
MAD_TO_SD = 1.4826
ROBUST_Z = 2.0  # |value - median of others| > 2 robust SDs of the others (~95 % for normal data)
# Binary label balance: a positive share this far (absolute) from the others' median changes
# what a model learns at the client (e.g. 0.46 -> 0.98 prevalence).
LABEL_SHARE_GAP = 0.25
# Missing share: a column this much more often missing than at the others (absolute) means
# most of its values will be imputed there, e.g. a lab test the hospital does not run.
MISSING_SHARE_GAP = 0.3
# Mean shift: in units of the others' typical within-client SD (median of their SDs). One
# whole SD moves the client's typical row beyond the others' typical row: different units,
# a different device, or a different population.
MEAN_SHIFT_SDS = 1.0
# Rows: fewer than this share of the others' median row count: its model update and its
# test metrics rest on little data (46 of heart's 303/261/130 rows would be 0.18).
FEW_ROWS_SHARE = 0.25
MIN_OTHERS = 2  # a comparison needs at least two other clients holding the statistic
# At most this many column warnings of one kind per client (the largest first); a client
# whose whole distribution moved would otherwise flood the log with one line per column.
MAX_COLUMN_WARNINGS = 3


def profile(
    features: pd.DataFrame,
    labels: Sequence[float] | np.ndarray | None = None,
    label_kind: str = "binary",
    categorical: Sequence[str] = (),
) -> dict[str, Any]:
    """Aggregates of one client's raw table (NaN = missing); JSON-ready.

    `labels`: binary 0/1 per row (`label_kind="binary"`: the positive share) or numbers
    (`"regression"`: mean, std, min, max of the observed ones); None = no label.
    """
    if label_kind not in ("binary", "regression"):
        raise ValueError(f"label_kind must be 'binary' or 'regression', got {label_kind!r}")
    columns: dict[str, dict[str, Any]] = {}
    for name in features.columns:
        column = features[name]
        columns[str(name)] = (
            _categorical_column(column.to_numpy()) if name in categorical
            else _numeric_column(pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64))
        )
    cells = features.size
    missing_cells = int(features.isna().to_numpy().sum())
    result: dict[str, Any] = {
        "rows": int(len(features)),
        "missing_share": missing_cells / cells if cells else 0.0,
        "columns": columns,
    }
    shares = {name: c["missing_share"] for name, c in columns.items()}
    if shares:
        worst = max(shares, key=shares.__getitem__)
        result["column_missing"] = {
            "median": float(np.median(list(shares.values()))), "max": shares[worst], "max_column": worst,
        }
    if labels is not None:
        result["label"] = _label_balance(np.asarray(labels, dtype=np.float64).ravel(), label_kind)
    return result


def _numeric_column(values: np.ndarray) -> dict[str, Any]:
    observed = values[~np.isnan(values)]
    stats: dict[str, Any] = {"missing_share": _share(len(values) - len(observed), len(values))}
    if len(observed):
        stats.update(
            min=float(observed.min()), max=float(observed.max()),
            mean=float(observed.mean()), std=float(observed.std()),
        )
    return stats


def _categorical_column(values: np.ndarray) -> dict[str, Any]:
    missing = pd.isna(values)
    return {
        "missing_share": _share(int(missing.sum()), len(values)),
        "categories": int(pd.Series(values[~missing]).nunique()),
    }


def _label_balance(labels: np.ndarray, kind: str) -> dict[str, Any]:
    observed = labels[~np.isnan(labels)]
    if kind == "binary":
        return {"kind": "binary", "positive_share": float(observed.mean()) if len(observed) else math.nan}
    if not len(observed):
        return {"kind": "regression", "count": 0}
    return {
        "kind": "regression", "count": int(len(observed)), "mean": float(observed.mean()),
        "std": float(observed.std()), "min": float(observed.min()), "max": float(observed.max()),
    }


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


# ------------------------------------------------------------------------------- compare


def compare(profiles: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings, one plain sentence each, for clients that differ sharply from the rest."""
    warnings: list[str] = []
    for name in profiles:
        others = {other: p for other, p in profiles.items() if other != name}
        if len(others) < MIN_OTHERS:
            continue
        own = profiles[name]
        warnings += _few_rows(name, own, others)
        warnings += _label_far_off(name, own, others)
        # Overall missing share: for clients whose columns the others do not hold (a
        # district's sensors); a column already named says the same thing more precisely.
        warnings += _columns_missing(name, own, others) or _overall_missing(name, own, others)
        warnings += _columns_shifted(name, own, others)
    return warnings


def summary_entry(profiles: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json's `profiles` and `profile_warnings`; each warning also goes to the log
    (a job's run.log) as a WARNING."""
    warnings = compare(profiles)
    for warning in warnings:
        logging.getLogger(__name__).warning("client data profile: %s", warning)
    return {"profiles": dict(profiles), "profile_warnings": warnings}


def warnings_of(client: str, warnings: Sequence[str]) -> list[str]:
    """The warnings that name `client` (each starts with its name)."""
    return [w for w in warnings if w.startswith(f"{client}: ")]


def _reference(values: Sequence[float]) -> tuple[float, float]:
    """Median and robust SD (1.4826 x MAD) of the other clients' values."""
    array = np.asarray(values, dtype=np.float64)
    median = float(np.median(array))
    return median, MAD_TO_SD * float(np.median(np.abs(array - median)))


def _beyond(value: float, values: Sequence[float], floor: float, above_only: bool = False) -> tuple[bool, float]:
    """(is `value` beyond the others' spread AND the absolute floor, the others' median)."""
    median, spread = _reference(values)
    gap = value - median if above_only else abs(value - median)
    return gap > max(floor, ROBUST_Z * spread), median


def _few_rows(name, own, others) -> list[str]:
    median = float(np.median([p["rows"] for p in others.values()]))
    if own["rows"] < FEW_ROWS_SHARE * median:
        return [f"{name}: only {own['rows']} rows, against a median of {median:g} at the other clients"]
    return []


def _label_far_off(name, own, others) -> list[str]:
    label = own.get("label")
    if not label:
        return []
    peers = [p["label"] for p in others.values() if p.get("label", {}).get("kind") == label["kind"]]
    if len(peers) < MIN_OTHERS:
        return []
    if label["kind"] == "binary":
        values = [p["positive_share"] for p in peers if not math.isnan(p["positive_share"])]
        if len(values) < MIN_OTHERS or math.isnan(label["positive_share"]):
            return []
        far, median = _beyond(label["positive_share"], values, LABEL_SHARE_GAP)
        return [
            f"{name}: label balance {label['positive_share']:.2f} positive, against a median of "
            f"{median:.2f} at the other clients"
        ] if far else []
    peers = [p for p in peers if p.get("count")]
    if "mean" not in label or len(peers) < MIN_OTHERS:
        return []
    scale = float(np.median([p["std"] for p in peers]))
    far, median = _beyond(label["mean"], [p["mean"] for p in peers], MEAN_SHIFT_SDS * scale)
    return [
        f"{name}: target mean {label['mean']:.4g} (std {label['std']:.3g}), against a median of "
        f"{median:.4g} at the other clients ({(label['mean'] - median) / scale:+.1f} of their typical std)"
    ] if far and scale > 0 else []


def _overall_missing(name, own, others) -> list[str]:
    far, median = _beyond(own["missing_share"], [p["missing_share"] for p in others.values()],
                          MISSING_SHARE_GAP, above_only=True)
    return [
        f"{name}: {own['missing_share']:.0%} of all values missing, against a median of "
        f"{median:.0%} at the other clients"
    ] if far else []


def _shared_columns(name, own, others, key: str):
    """(column, own stats, the others' stats) for columns at least MIN_OTHERS others hold with `key`."""
    for column, stats in own["columns"].items():
        if key not in stats:
            continue
        peers = [p["columns"][column] for p in others.values() if key in p["columns"].get(column, {})]
        if len(peers) >= MIN_OTHERS:
            yield column, stats, peers


def _columns_missing(name, own, others) -> list[str]:
    found = []
    for column, stats, peers in _shared_columns(name, own, others, "missing_share"):
        far, median = _beyond(stats["missing_share"], [p["missing_share"] for p in peers],
                              MISSING_SHARE_GAP, above_only=True)
        if far:
            found.append((stats["missing_share"] - median, (
                f"{name}: column '{column}' is {stats['missing_share']:.0%} missing, against a median "
                f"of {median:.0%} at the other clients"
            )))
    return _largest(name, found, "missing-value")


def _columns_shifted(name, own, others) -> list[str]:
    found = []
    for column, stats, peers in _shared_columns(name, own, others, "mean"):
        scale = float(np.median([p["std"] for p in peers]))
        if scale <= 0:
            continue
        far, median = _beyond(stats["mean"], [p["mean"] for p in peers], MEAN_SHIFT_SDS * scale)
        if far:
            shift = (stats["mean"] - median) / scale
            found.append((abs(shift), (
                f"{name}: column '{column}' has mean {stats['mean']:.4g}, against a median of {median:.4g} "
                f"at the other clients ({shift:+.1f} of their typical std {scale:.3g})"
            )))
    return _largest(name, found, "shifted")


def _largest(name: str, found: list[tuple[float, str]], kind: str) -> list[str]:
    found.sort(key=lambda item: -item[0])
    kept = [text for _, text in found[:MAX_COLUMN_WARNINGS]]
    if len(found) > MAX_COLUMN_WARNINGS:
        kept.append(f"{name}: {len(found) - MAX_COLUMN_WARNINGS} more {kind} columns like these")
    return kept


# ------------------------------------------------------------------------------- report


def table_rows(profiles: Mapping[str, Mapping[str, Any]], warnings: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the report's compact table: one row per client."""
    header = ["client", "rows", "label balance", "max missing share (column)", "warnings"]
    rows = []
    for name, p in profiles.items():
        worst = p.get("column_missing")
        rows.append([
            name, p["rows"], label_text(p.get("label")),
            (f"{worst['max']:.2f} ({worst['max_column']})" if worst["max"] else "0.00") if worst else "n/a",
            len(warnings_of(name, warnings)),
        ])
    return header, rows


def label_text(label: Mapping[str, Any] | None) -> str:
    if not label:
        return "n/a"
    if label["kind"] == "binary":
        return f"{label['positive_share']:.2f} positive"
    return f"mean {label['mean']:.1f}, std {label['std']:.1f}" if label.get("count") else "no values"
