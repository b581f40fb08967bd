"""The DP data statistics as the sites compute them: the normalization (`privacy.preprocessing
= "dp"`) and the client profiles (`privacy.profiles = "dp"`).

`tff_apps/privacy/dp_statistics.py` says what is released and why it is private. Here each
site builds its statistics vector from its own rows (values clipped to the public ranges and
scaled to [-1, 1]), adds its Gaussian noise with OS randomness (DP noise is never derived
from the job seed), and for the normalization the noisy vectors are added through TFF's
secure sum (`preprocessing.secure_sum_of`), so the server sees only the noisy total.

From the noisy totals: a numeric column's mean = sum / count and variance = sum of squares /
count - mean², clamped to what values inside the range allow, with a standard deviation of
at least 1/20 of the range (noise can drive a variance to 0, and dividing by a tiny std would
blow a column up); a categorical column's vocabulary is its public code range, each code's
one-hot mean its share of the rows. Everything after the noise is post-processing.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from tff_apps.learning.preprocessing import Preprocessor, secure_sum_of
from tff_apps.privacy.dp_statistics import StatisticsSpec

STD_FLOOR_SHARE = 1 / 20  # of a column's range: the smallest standard deviation released
FIXED_POINT_BITS = 20  # 2^-20 steps in the secure sum, far below the noise
FIXED_POINT_OFFSET = 2.0**30  # keeps noisy values non-negative for the secure sum


def noise_generator() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def _scaled(column: np.ndarray, low: float, high: float) -> np.ndarray:
    centre, half = (low + high) / 2, (high - low) / 2
    return (np.clip(column, low, high) - centre) / half


def site_vector(raw: np.ndarray, names: list[str], spec: StatisticsSpec, labels=None) -> np.ndarray:
    """[rows] (+ [positives] with `labels`) + per numeric column [count, sum, sum of squares]
    of its scaled values + per categorical column its code counts; NaN = missing."""
    parts = [[float(len(raw))]]
    if labels is not None:
        parts.append([float(np.sum(np.asarray(labels) == 1))])
    for name, (low, high) in spec.numeric.items():
        column = raw[:, names.index(name)]
        present = _scaled(column[~np.isnan(column)], low, high)
        parts.append([float(len(present)), float(present.sum()), float((present**2).sum())])
    for name, (low, high) in spec.categorical.items():
        column = raw[:, names.index(name)]
        codes = column[~np.isnan(column)]
        parts.append([float(np.sum(codes == code)) for code in range(low, high + 1)])
    return np.concatenate([np.asarray(p, np.float64) for p in parts])


def noised(vector: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return vector + rng.normal(0.0, std, size=vector.shape)


def secure_total(vectors: list[np.ndarray]) -> np.ndarray:
    """The sum of the sites' (noisy, possibly negative) vectors through TFF's secure sum."""
    scale = 2.0**FIXED_POINT_BITS
    encoded = []
    for vector in vectors:
        if np.any(np.abs(vector) >= FIXED_POINT_OFFSET):
            raise ValueError("a site statistic is beyond the secure sum's fixed-point range")
        encoded.append(np.round((vector + FIXED_POINT_OFFSET) * scale).astype(np.int64))
    total = secure_sum_of(encoded).astype(np.float64)
    return total / scale - len(vectors) * FIXED_POINT_OFFSET


def dp_preprocessor(
    site_raw: list[np.ndarray], names: list[str], spec: StatisticsSpec, noise_multiplier: float,
    zero_means_missing=(), rng: np.random.Generator | None = None,
) -> Preprocessor:
    """The federation's preprocessor from noisy statistics: each of the K sites adds noise of
    variance (z * sensitivity)^2 / K, so the secure sum carries N(0, (z * sensitivity)^2)."""
    rng = rng or noise_generator()
    std = noise_multiplier * spec.sensitivity() / np.sqrt(len(site_raw))
    total = secure_total([noised(site_vector(raw, names, spec), std, rng) for raw in site_raw])
    return _preprocessor_from_totals(total, names, spec, zero_means_missing)


def _moments(count: float, total: float, squares: float, rows: float) -> tuple[float, float]:
    """Mean and std in scaled units (range [-1, 1]) from noisy count, sum and sum of squares."""
    count = float(np.clip(count, 1.0, max(rows, 1.0)))
    mean = float(np.clip(total / count, -1.0, 1.0))
    second = float(np.clip(squares / count, mean**2, 1.0))
    return mean, max(np.sqrt(second - mean**2), 2 * STD_FLOOR_SHARE)


def _preprocessor_from_totals(total: np.ndarray, names: list[str], spec: StatisticsSpec, zero_means_missing):
    rows = max(float(total[0]), 1.0)
    numeric, categorical = {}, {}
    offset = 1
    for name, (low, high) in spec.numeric.items():
        mean, std = _moments(*total[offset: offset + 3], rows)
        centre, half = (low + high) / 2, (high - low) / 2
        numeric[name] = (centre + half * mean, half * std)
        offset += 3
    for name, (low, high) in spec.categorical.items():
        width = high - low + 1
        shares = np.clip(total[offset: offset + width] / rows, 0.0, 1.0)
        stds = np.maximum(np.sqrt(shares * (1 - shares)), STD_FLOOR_SHARE)
        categorical[name] = (shares, stds)
        offset += width
    mean, std = [], []
    for name in names:
        if name in categorical:
            mean += categorical[name][0].tolist()
            std += categorical[name][1].tolist()
        else:
            mean.append(numeric[name][0])
            std.append(numeric[name][1])
    categories = {name: [float(c) for c in range(low, high + 1)] for name, (low, high) in spec.categorical.items()}
    return Preprocessor(list(names), categories, mean, std, list(zero_means_missing))


def dp_profile(
    raw: np.ndarray, labels: np.ndarray, names: list[str], spec: StatisticsSpec, noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """One site's profile released with noise N(0, (z * sensitivity)^2) per statistic: rows,
    label share, and per column missing share, mean and std (numeric) or codes seen
    (categorical). No min or max: one record's value."""
    rng = rng or noise_generator()
    vector = noised(site_vector(raw, names, spec, labels), noise_multiplier * spec.sensitivity(True), rng)
    rows = max(float(vector[0]), 1.0)
    columns: dict[str, dict[str, Any]] = {}
    offset, present = 2, 0.0
    for name, (low, high) in spec.numeric.items():
        count = float(np.clip(vector[offset], 0.0, rows))
        mean, std = _moments(*vector[offset: offset + 3], rows)
        half = (high - low) / 2
        columns[name] = {"missing_share": 1 - count / rows, "mean": (low + high) / 2 + half * mean, "std": half * std}
        present += count
        offset += 3
    for name, (low, high) in spec.categorical.items():
        counts = np.clip(vector[offset: offset + high - low + 1], 0.0, rows)
        columns[name] = {"missing_share": float(1 - min(counts.sum(), rows) / rows), "categories": int(np.sum(counts >= 0.5))}
        present += float(min(counts.sum(), rows))
        offset += high - low + 1
    ordered = {name: columns[name] for name in names}
    return {
        "rows": int(round(rows)),
        "missing_share": float(1 - present / (rows * len(names))) if names else 0.0,
        "columns": ordered,
        "label": {"kind": "binary", "positive_share": float(np.clip(vector[1] / rows, 0.0, 1.0))},
        "dp": True,
    }
