"""Tests for traffic.generator: the calibrated generator and the ground truth behind its readings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from traffic.calibration import METR_LA_TARGETS, compare_to_targets, statistics
from traffic.data import DataConfig, _generate, load
from traffic.generator import GeneratorParams

SMALL = DataConfig(n_districts=3, sensors_per_district=5, days=7)


@pytest.fixture(scope="module")
def default_sim():
    """The default job's data (6 districts x 12 sensors x 28 days), seed 0, with its ground truth."""
    return _generate(DataConfig(), seed=0)


@pytest.fixture(scope="module")
def default_stats(default_sim):
    return statistics(default_sim.data)


def test_generator_is_seeded():
    a, b, c = load(SMALL, seed=7), load(SMALL, seed=7), load(SMALL, seed=8)
    for x, y in zip(a.districts, b.districts):
        assert x.sensor_ids == y.sensor_ids
        assert np.array_equal(x.speeds, y.speeds, equal_nan=True)
    assert a.neighbours == b.neighbours
    assert not np.array_equal(a.districts[0].speeds, c.districts[0].speeds, equal_nan=True)


def test_default_generator_shape_missing_blocks_and_neighbours(default_sim):
    data = default_sim.data
    assert data.interval_minutes == 5
    assert len(data.timestamps) == 28 * 288
    assert data.timestamps[0] == pd.Timestamp("2012-03-01 00:00:00")
    assert (np.diff(data.timestamps.asi8) == 5 * 60 * 10**9).all()
    assert [d.name for d in data.districts] == [f"district_{i}" for i in range(1, 7)]
    all_ids = [s for d in data.districts for s in d.sensor_ids]
    assert len(all_ids) == len(set(all_ids)) == 72
    speeds = [d.speeds for d in data.districts]
    assert all(s.shape == (8064, 12) and s.dtype == np.float64 for s in speeds)
    missing = np.concatenate([np.isnan(s) for s in speeds], axis=1)
    assert 0.05 < missing.mean() < 0.11
    assert missing.mean(axis=0).max() <= 0.5  # every sensor keeps most of its readings
    # blocks, not scattered points: a missing reading mostly has a missing neighbour in time
    runs_start = missing[1:] & ~missing[:-1]
    assert missing.sum() / max(1, runs_start.sum()) > 5  # mean block length in steps
    observed = np.concatenate([s[~np.isnan(s)] for s in speeds])
    assert observed.min() >= 3.0 and observed.max() <= 85.0
    # neighbours are adjacent sensors of one corridor, within one district
    district_of = {s: d.name for d in data.districts for s in d.sensor_ids}
    assert len(data.neighbours) == 72 - sum(len(c) for c in default_sim.corridors)
    assert all(district_of[a] == district_of[b] for a, b in data.neighbours)
    assert "6 districts x 12 sensors" in data.description and "\n" not in data.description


def test_default_generation_is_fast():
    import time

    started = time.perf_counter()
    load(DataConfig(), seed=3)
    assert time.perf_counter() - started < 5.0


def test_every_statistic_within_25_percent_of_metr_la(default_stats):
    rows = compare_to_targets(default_stats)
    assert [r[0] for r in rows] == list(METR_LA_TARGETS)
    off = [(key, round(value, 3), target) for key, value, target, rel in rows if not abs(rel) <= 0.25]
    assert not off, off
    # the hour-of-day profile is held much tighter
    speeds = [(key, round(value, 2), target) for key, value, target, rel in rows if key.startswith("speed_h") and abs(rel) > 0.05]
    assert not speeds, speeds


def test_weekdays_have_the_morning_dip_and_weekends_do_not(default_sim):
    data = default_sim.data
    hours = np.asarray(data.timestamps.hour)
    weekend = np.asarray(data.timestamps.dayofweek >= 5)

    def mean_speed(rows):
        return np.nanmean(np.concatenate([d.speeds[rows] for d in data.districts], axis=1))

    night = mean_speed((hours >= 1) & (hours < 5))
    weekday_am = mean_speed(~weekend & (hours >= 7) & (hours < 9))
    weekend_am = mean_speed(weekend & (hours >= 7) & (hours < 9))
    assert weekday_am < 0.9 * night
    assert weekend_am > night - 1.5
    weekday_pm = mean_speed(~weekend & (hours >= 17) & (hours < 19))
    weekend_pm = mean_speed(weekend & (hours >= 17) & (hours < 19))
    assert weekday_pm < weekend_pm - 5


def test_incidents_slow_the_sensor_upstream():
    cfg = DataConfig(n_districts=6, sensors_per_district=12, days=14)
    with_incidents = _generate(cfg, seed=1)
    without = _generate(cfg, seed=1, params=GeneratorParams(incidents=False))
    during, baseline = [], []
    for d, district in enumerate(with_incidents.data.districts):
        column = {s: i for i, s in enumerate(district.sensor_ids)}
        for incident in with_incidents.incidents[d]:
            start = with_incidents.data.timestamps[incident["start"]]
            if incident["capacity"] > 0.5 or start.dayofweek >= 5 or not 7 <= start.hour < 19:
                continue
            if incident["end"] - incident["start"] < 4:
                continue
            window = slice(incident["start"] + 2, incident["end"])
            during.append(with_incidents.clean[d][window, column[incident["sensor"]]].mean())
            baseline.append(without.clean[d][window, column[incident["sensor"]]].mean())
    assert len(during) >= 10
    # a lane (or two) blocked in daytime traffic: a queue at crawling speed
    assert np.mean(during) < 30.0
    assert np.mean(baseline) - np.mean(during) > 20.0
    # durations are log-normal with a median of about 35 minutes
    minutes = [5 * (i["end"] - i["start"]) for inc in with_incidents.incidents for i in inc]
    assert 25 <= np.median(minutes) <= 45


def test_queue_spreads_upstream_with_a_lag(default_sim):
    """Speed drops at a bottleneck's front sensor reach the sensor upstream one step later."""
    lags = np.arange(-4, 5)
    total = np.zeros(len(lags))
    pairs = 0
    for d, district in enumerate(default_sim.data.districts):
        column = {s: i for i, s in enumerate(district.sensor_ids)}
        for front, _ in default_sim.bottlenecks[d]:
            corridor = next(c for c in default_sim.corridors[d] if front in c)
            k = corridor.index(front)
            if k == 0:
                continue
            drops = []
            for sensor in (front, corridor[k - 1]):
                y = district.speeds[:, column[sensor]]
                drops.append(np.nan_to_num(np.maximum(0.0, y[:-1] - y[1:])))
            a, b = drops
            n = len(a)
            for i, lag in enumerate(lags):
                x, y = (a[: n - lag], b[lag:]) if lag >= 0 else (a[-lag:], b[: n + lag])
                total[i] += np.corrcoef(x, y)[0, 1]
            pairs += 1
    assert pairs >= 10
    profile = total / pairs
    assert lags[np.argmax(profile)] > 0
    assert profile[lags == 1][0] > profile[lags == 0][0] + 0.03


def test_moving_jams_travel_upstream_at_about_ten_mph():
    """Jams born in queues pass a sensor and then, after the distance over the jam's speed
    (9-12 mph: about 5-7 minutes a mile), the sensor upstream: the extra speed loss they cause
    at a sensor best matches its downstream neighbour's a step or more earlier."""
    cfg = DataConfig(n_districts=2, sensors_per_district=12, days=14)
    with_jams = _generate(cfg, seed=2)
    without = _generate(cfg, seed=2, params=GeneratorParams(jam_rate_per_hour=0.0))
    lags = np.arange(0, 5)
    scores, pairs = np.zeros(len(lags)), 0
    for d, district in enumerate(with_jams.data.districts):
        dip = without.clean[d] - with_jams.clean[d]  # what the jams took, mph [T, S]
        assert (dip >= -1e-9).all()  # jams only slow traffic
        column = {s: i for i, s in enumerate(district.sensor_ids)}
        for corridor in with_jams.corridors[d]:
            for up, down in zip(corridor, corridor[1:]):
                a, b = dip[:, column[down]], dip[:, column[up]]
                if a.std() == 0 or b.std() == 0:
                    continue
                scores += [np.corrcoef(a[: len(a) - k], b[k:])[0, 1] for k in lags]
                pairs += 1
    assert pairs >= 8
    profile = scores / pairs
    assert lags[np.argmax(profile)] >= 1 and profile[lags >= 1].max() > profile[0] + 0.1, profile
    assert ((without.clean[0] - with_jams.clean[0]) > 1.0).mean() > 0.002  # they happen (0.5 % of readings)
