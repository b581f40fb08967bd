"""METR-LA calibration: statistics of a speed table, next to those of one real METR-LA week.

``METR_LA_TARGETS`` are the statistics of one real METR-LA week (``../shared/ANCHORS.md``,
"Traffic"); ``statistics`` computes the same ones for any ``TrafficData`` (the generator
is calibrated on them; a run's report shows them for its data) and ``compare_to_targets``
puts the two side by side. ``benchmarks/traffic_stats.py`` prints both.

Nothing here pools districts' raw readings: ``statistics`` computes per-district
aggregates (sums, counts, histograms, per-sensor and per-pair values) and combines
those.
"""

from __future__ import annotations

import math

import numpy as np

from traffic.data import TrafficData

__all__ = ["METR_LA_TARGETS", "statistics", "compare_to_targets"]

# ../shared/ANCHORS.md, "Traffic": statistics of one real METR-LA week (207 sensors).
# Speeds in mph, shares and MAPE in percent.
METR_LA_TARGETS: dict[str, float] = {
    "speed_h03": 62.5,
    "speed_h07": 55.5,
    "speed_h08": 53.8,
    "speed_h12": 59.5,
    "speed_h17": 51.2,
    "speed_h18": 51.4,
    "pct_below_40": 9.9,
    "pct_below_20": 2.5,
    "sensor_mean_p5": 48.2,
    "sensor_mean_p50": 60.1,
    "sensor_mean_p95": 66.6,
    "sensor_sd_p5": 3.0,
    "sensor_sd_p50": 10.2,
    "sensor_sd_p95": 18.4,
    "acf_lag1": 0.834,
    "acf_lag3": 0.749,
    "acf_lag12": 0.51,
    "acf_lag288": 0.381,
    "corr_neighbours": 0.42,
    "corr_non_neighbours": 0.19,
    "abs_change_p50": 1.46,
    "abs_change_p90": 6.49,
    "abs_change_p99": 16.4,
    "missing_pct": 8.0,
    "persistence_mae_15": 3.24,
    "persistence_mae_30": 3.88,
    "persistence_mae_60": 4.90,
    "persistence_rmse_15": 6.01,
    "persistence_rmse_30": 7.56,
    "persistence_rmse_60": 9.63,
    "persistence_mape_15": 7.7,
    "persistence_mape_30": 9.7,
    "persistence_mape_60": 12.9,
}

_HOURS = (3, 7, 8, 12, 17, 18)
_ACF_LAG_MINUTES = {"acf_lag1": 5, "acf_lag3": 15, "acf_lag12": 60, "acf_lag288": 1440}
_HORIZON_MINUTES = (15, 30, 60)
_CHANGE_BIN = 0.01  # mph, histogram resolution of |5-minute change|
_CHANGE_MAX = 200.0
_MIN_PAIRS = 12  # observed pairs needed for a sensor's (or pair's) autocorrelation / correlation


def statistics(data: TrafficData) -> dict[str, float]:
    """The METR-LA calibration statistics of `data`, keyed like METR_LA_TARGETS.

    Everything is computed per district and combined from per-district aggregates
    (sums and counts, histograms, per-sensor and per-pair values); no raw readings of
    two districts ever meet in one array. "Observed" means not NaN. Definitions:

    - ``speed_hHH``: mean of all observed readings whose timestamp is in hour HH
      (every day, weekdays and weekends), pooled over sensors (sum / count).
    - ``pct_below_40`` / ``pct_below_20``: percent of observed readings below 40 / 20 mph.
    - ``sensor_mean_pQ`` / ``sensor_sd_pQ``: Q-th percentile (linear interpolation)
      over all sensors of each sensor's mean / standard deviation (ddof 1) of its
      observed readings (sensors with at least 2 readings).
    - ``acf_lagK``: for each sensor, the autocorrelation at lag K steps of 5 minutes
      of its series minus its observed mean: mean of x[t] x[t+K] over pairs where
      both are observed, divided by the mean of x[t]^2 over observed t; then the
      median over sensors (with at least 12 observed pairs). For data at another
      interval the lag is the same time (5 min, 15 min, 1 h, 1 day) in steps; NaN
      when that is not a whole number of steps.
    - ``corr_neighbours`` / ``corr_non_neighbours``: Pearson correlation of two
      sensors' readings over the steps where both are observed (at least 12), averaged
      (mean) over the pairs listed in ``data.neighbours`` / over all other pairs of
      sensors of the same district. NaN when there is no such pair.
    - ``abs_change_pQ``: Q-th percentile of |y[t+1] - y[t]| over all sensors and
      steps where both readings are observed (5-minute data only; from per-district
      histograms with 0.01 mph bins).
    - ``missing_pct``: percent of all readings that are missing.
    - ``persistence_{mae,rmse,mape}_M``: the last-value forecast y[t+h] = y[t] at
      horizon M minutes (h = M / interval steps), over all sensors and t where both
      are observed (pooled, so sensors with more pairs weigh more): MAE, RMSE, and
      MAPE = mean of |error| / y[t+h] in percent.
    """
    interval = int(data.interval_minutes)
    hour_sums = {h: [0.0, 0] for h in _HOURS}
    n_total = n_observed = n_below_40 = n_below_20 = 0
    sensor_means: list[np.ndarray] = []
    sensor_sds: list[np.ndarray] = []
    acfs: dict[str, list[np.ndarray]] = {key: [] for key in _ACF_LAG_MINUTES}
    corr_sums = {"corr_neighbours": [0.0, 0], "corr_non_neighbours": [0.0, 0]}
    change_hist = np.zeros(int(round(_CHANGE_MAX / _CHANGE_BIN)), dtype=np.int64)
    persistence = {m: np.zeros(4) for m in _HORIZON_MINUTES}  # n, sum|e|, sum e^2, sum |e|/y
    neighbour_set = {frozenset(pair) for pair in data.neighbours}
    hour_of_step = np.asarray(data.timestamps.hour)

    for district in data.districts:
        y = np.asarray(district.speeds, dtype=np.float64)
        observed = ~np.isnan(y)
        n_total += y.size
        n_observed += int(observed.sum())
        n_below_40 += int((y[observed] < 40.0).sum())
        n_below_20 += int((y[observed] < 20.0).sum())
        filled = np.where(observed, y, 0.0)
        for h in _HOURS:
            rows = hour_of_step == h
            hour_sums[h][0] += float(filled[rows].sum())
            hour_sums[h][1] += int(observed[rows].sum())

        counts = observed.sum(axis=0)
        enough = counts >= 2
        with np.errstate(invalid="ignore", divide="ignore"):
            means = filled.sum(axis=0) / counts
            centred = np.where(observed, y - means, 0.0)
            sds = np.sqrt((centred**2).sum(axis=0) / (counts - 1))
        sensor_means.append(means[enough])
        sensor_sds.append(sds[enough])

        for key, minutes in _ACF_LAG_MINUTES.items():
            if minutes % interval:
                continue
            acfs[key].append(_masked_acf(centred, observed, minutes // interval))

        corr = _pairwise_correlation(filled, observed)
        ids = district.sensor_ids
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                if np.isnan(corr[a, b]):
                    continue
                key = "corr_neighbours" if frozenset((ids[a], ids[b])) in neighbour_set else "corr_non_neighbours"
                corr_sums[key][0] += float(corr[a, b])
                corr_sums[key][1] += 1

        if interval == 5 and len(y) > 1:
            both = observed[1:] & observed[:-1]
            change = np.abs(y[1:] - y[:-1])[both]
            index = np.minimum((change / _CHANGE_BIN).astype(np.int64), len(change_hist) - 1)
            change_hist += np.bincount(index, minlength=len(change_hist))

        for minutes in _HORIZON_MINUTES:
            if minutes % interval or minutes // interval >= len(y):
                continue
            h = minutes // interval
            both = observed[h:] & observed[:-h]
            truth = y[h:][both]
            error = y[:-h][both] - truth
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.abs(error) / np.abs(truth)
            persistence[minutes] += (truth.size, np.abs(error).sum(), (error**2).sum(), relative.sum())

    nan = float("nan")
    stats: dict[str, float] = {}
    for h in _HOURS:
        total, count = hour_sums[h]
        stats[f"speed_h{h:02d}"] = total / count if count else nan
    stats["pct_below_40"] = 100.0 * n_below_40 / n_observed if n_observed else nan
    stats["pct_below_20"] = 100.0 * n_below_20 / n_observed if n_observed else nan
    all_means = np.concatenate(sensor_means) if sensor_means else np.array([])
    all_sds = np.concatenate(sensor_sds) if sensor_sds else np.array([])
    for q in (5, 50, 95):
        stats[f"sensor_mean_p{q}"] = float(np.percentile(all_means, q)) if all_means.size else nan
    for q in (5, 50, 95):
        stats[f"sensor_sd_p{q}"] = float(np.percentile(all_sds, q)) if all_sds.size else nan
    for key in _ACF_LAG_MINUTES:
        values = np.concatenate(acfs[key]) if acfs[key] else np.array([])
        values = values[~np.isnan(values)]
        stats[key] = float(np.median(values)) if values.size else nan
    for key, (total, count) in corr_sums.items():
        stats[key] = total / count if count else nan
    for q in (50, 90, 99):
        stats[f"abs_change_p{q}"] = _histogram_quantile(change_hist, q / 100.0)
    stats["missing_pct"] = 100.0 * (n_total - n_observed) / n_total if n_total else nan
    for minutes in _HORIZON_MINUTES:
        n, abs_sum, sq_sum, rel_sum = persistence[minutes]
        stats[f"persistence_mae_{minutes}"] = abs_sum / n if n else nan
        stats[f"persistence_rmse_{minutes}"] = math.sqrt(sq_sum / n) if n else nan
        stats[f"persistence_mape_{minutes}"] = 100.0 * rel_sum / n if n else nan
    return {key: float(stats[key]) for key in METR_LA_TARGETS}


def _masked_acf(centred: np.ndarray, observed: np.ndarray, lag: int) -> np.ndarray:
    """Per-sensor autocorrelation at `lag` over observed pairs (NaN if too few pairs)."""
    n_steps = centred.shape[0]
    if lag >= n_steps:
        return np.full(centred.shape[1], np.nan)
    both = observed[lag:] & observed[:-lag]
    pairs = both.sum(axis=0)
    products = (centred[lag:] * centred[:-lag] * both).sum(axis=0)
    variance = (centred**2).sum(axis=0) / np.maximum(observed.sum(axis=0), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acf = (products / pairs) / variance
    acf[(pairs < _MIN_PAIRS) | ~(variance > 0)] = np.nan
    return acf


def _pairwise_correlation(filled: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Pearson correlation of every pair of columns over the rows where both are observed."""
    m = observed.astype(np.float64)
    n = m.T @ m
    sum_a = filled.T @ m  # [a, b]: sum of a's readings where both observed
    sum_aa = (filled**2).T @ m
    sum_ab = filled.T @ filled
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sum_ab / n - (sum_a / n) * (sum_a.T / n)
        var_a = sum_aa / n - (sum_a / n) ** 2
        corr = cov / np.sqrt(var_a * var_a.T)
    corr[(n < _MIN_PAIRS) | ~(var_a > 0) | ~(var_a.T > 0)] = np.nan
    return corr


def _histogram_quantile(hist: np.ndarray, q: float) -> float:
    """Quantile from a histogram with _CHANGE_BIN bins, interpolating within the bin."""
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    cumulative = np.cumsum(hist)
    target = q * total
    b = int(np.searchsorted(cumulative, target, side="left"))
    before = cumulative[b - 1] if b > 0 else 0
    inside = (target - before) / hist[b] if hist[b] else 0.0
    return float((b + inside) * _CHANGE_BIN)


def compare_to_targets(stats: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(key, generated, target, relative difference (generated - target) / target) per target."""
    rows = []
    for key, target in METR_LA_TARGETS.items():
        value = float(stats.get(key, float("nan")))
        rows.append((key, value, target, (value - target) / target))
    return rows
