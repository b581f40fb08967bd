"""Tests for traffic.calibration: the METR-LA statistics, by their definitions, and the comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.metrics import mae, mape, rmse
from traffic.calibration import METR_LA_TARGETS, compare_to_targets, statistics
from traffic.data import District, TrafficData


def _hand_made() -> TrafficData:
    timestamps = pd.date_range("2024-01-01", periods=24, freq="5min")
    t = np.arange(24, dtype=np.float64)
    a = np.column_stack([60.0 + (t % 4), 30.0 + 2.0 * (t % 3)])
    a[5, 0] = np.nan
    b = np.column_stack([50.0 - 0.5 * t, 64.0 + np.sin(t)])
    b[10:13, 1] = np.nan
    return TrafficData(
        timestamps=timestamps,
        districts=[District("north", ["a1", "a2"], a), District("south", ["b1", "b2"], b)],
        interval_minutes=5,
        description="hand made",
        neighbours=[("a1", "a2")],
    )


def test_statistics_follow_their_definitions_on_a_hand_made_table():
    data = _hand_made()
    stats = statistics(data)
    assert list(stats) == list(METR_LA_TARGETS)
    everything = [d.speeds for d in data.districts]
    observed = np.concatenate([s[~np.isnan(s)] for s in everything])
    assert stats["missing_pct"] == pytest.approx(100 * 4 / 96)
    assert stats["pct_below_40"] == pytest.approx(100 * np.mean(observed < 40))
    assert stats["pct_below_20"] == 0.0
    # persistence at 15 minutes: y[t+3] predicted by y[t], pairs where both are observed
    truth, predicted = [], []
    for s in everything:
        both = ~np.isnan(s[3:]) & ~np.isnan(s[:-3])
        truth.append(s[3:][both])
        predicted.append(s[:-3][both])
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    assert stats["persistence_mae_15"] == pytest.approx(mae(truth, predicted))
    assert stats["persistence_rmse_15"] == pytest.approx(rmse(truth, predicted))
    assert stats["persistence_mape_15"] == pytest.approx(mape(truth, predicted))
    # 24 steps leave 12 pairs per sensor at 60 minutes
    assert np.isfinite(stats["persistence_mae_60"])
    # per-sensor means and sds
    means = [np.nanmean(s[:, j]) for s in everything for j in range(2)]
    sds = [np.nanstd(s[:, j], ddof=1) for s in everything for j in range(2)]
    assert stats["sensor_mean_p50"] == pytest.approx(np.percentile(means, 50))
    assert stats["sensor_sd_p95"] == pytest.approx(np.percentile(sds, 95))
    # |5-minute change| of b1 is 0.5 everywhere, of a1 1 or 3, ...: the median from 0.01 mph bins
    changes = np.concatenate([np.abs(np.diff(s, axis=0))[~np.isnan(np.diff(s, axis=0))] for s in everything])
    assert stats["abs_change_p50"] == pytest.approx(np.percentile(changes, 50), abs=0.02)
    # correlations: only pairs of one district; a1-a2 is the neighbour pair, b1-b2 the other
    x = everything[0]
    both = ~np.isnan(x).any(axis=1)
    assert stats["corr_neighbours"] == pytest.approx(np.corrcoef(x[both, 0], x[both, 1])[0, 1])
    y = everything[1]
    both = ~np.isnan(y).any(axis=1)
    assert stats["corr_non_neighbours"] == pytest.approx(np.corrcoef(y[both, 0], y[both, 1])[0, 1])
    # too short for a 1-day lag, and no reading at 03 h
    assert np.isnan(stats["acf_lag288"])
    assert np.isnan(stats["speed_h03"])


def test_statistics_of_15_minute_data_use_the_same_times():
    data = _hand_made()
    data.interval_minutes = 15
    stats = statistics(data)
    assert np.isnan(stats["abs_change_p50"])  # defined on 5-minute changes only
    assert np.isnan(stats["acf_lag1"]) and np.isfinite(stats["acf_lag3"])  # 15 minutes = 1 step
    # the 15-minute horizon is 1 step, the 60-minute one 4 steps
    for minutes, steps in ((15, 1), (60, 4)):
        errors = []
        for s in (d.speeds for d in data.districts):
            e = s[:-steps] - s[steps:]
            errors.append(np.abs(e[~np.isnan(e)]))
        assert stats[f"persistence_mae_{minutes}"] == pytest.approx(np.concatenate(errors).mean())


def test_compare_to_targets_gives_the_relative_difference():
    stats = {key: 2 * target for key, target in METR_LA_TARGETS.items()}
    rows = compare_to_targets(stats)
    assert all(rel == pytest.approx(1.0) for _, _, _, rel in rows)
    assert rows[0] == ("speed_h03", 125.0, 62.5, 1.0)
