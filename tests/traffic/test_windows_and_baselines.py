"""Windows never cross a split boundary, features are what they claim, baselines are right,
and the serving graph computes the same features as training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from traffic import evaluate
from traffic.windows import epoch_seconds, history_window, make_windows, split_bounds, time_features

HISTORY, HORIZON = 12, 12


def toy_series(steps=600, sensors=3, seed=0):
    rng = np.random.default_rng(seed)
    speeds = 60 + rng.normal(0, 5, (steps, sensors))
    speeds[rng.random((steps, sensors)) < 0.1] = np.nan
    stamps = pd.date_range("2012-03-05 00:00", periods=steps, freq="5min")  # a Monday
    return speeds, stamps


def test_split_bounds_are_chronological_and_cover_everything():
    bounds = split_bounds(1000)
    assert bounds == {"train": (0, 700), "validation": (700, 800), "test": (800, 1000)}


def test_windows_stay_inside_their_split_and_hold_the_right_values():
    speeds, stamps = toy_series()
    normalized = (speeds - 60) / 5
    bounds = split_bounds(len(speeds))["validation"]
    windows = make_windows(normalized, epoch_seconds(stamps), bounds, HISTORY, HORIZON)
    start, end = bounds
    assert len(windows) == (end - start - HISTORY - HORIZON + 1) * speeds.shape[1]
    assert windows.target_start.min() - HISTORY == start and windows.target_start.max() + HORIZON == end
    k = 37
    t, s = windows.target_start[k], windows.sensor[k]
    history = normalized[t - HISTORY : t, s]
    observed = ~np.isnan(history)
    np.testing.assert_allclose(windows.x[k, :, 0], np.where(observed, history, 0.0), atol=1e-6)
    np.testing.assert_array_equal(windows.x[k, :, 1], observed.astype(np.float32))
    np.testing.assert_allclose(windows.y[k], normalized[t : t + HORIZON, s], atol=1e-6)  # NaN stays NaN


def test_a_raw_history_gives_the_window_training_builds():
    """`history_window` (the serving check's inputs) repeats `make_windows` for raw readings."""
    speeds, stamps = toy_series()
    normalized = (speeds - 60) / 5
    windows = make_windows(normalized, epoch_seconds(stamps), split_bounds(len(speeds))["test"], HISTORY, HORIZON)
    picks = [0, 41, 100]
    raw = np.stack([speeds[windows.target_start[k] - HISTORY : windows.target_start[k], windows.sensor[k]] for k in picks])
    raw[np.isnan(raw)] = 0.0  # how serving receives a missing reading
    latest = epoch_seconds(stamps)[windows.target_start[picks] - 1]
    np.testing.assert_allclose(history_window(raw, latest, 60.0, 5.0, 5), windows.x[picks], atol=1e-6)


def test_time_features_follow_the_clock_and_the_week():
    stamps = pd.DatetimeIndex(["2012-03-05 00:00", "2012-03-05 06:00", "2012-03-08 12:00"])  # Mon, Mon, Thu
    features = time_features(epoch_seconds(stamps))
    np.testing.assert_allclose(features[0], [0, 1, 0, 1], atol=1e-9)  # Monday midnight
    np.testing.assert_allclose(features[1, :2], [1, 0], atol=1e-9)  # a quarter of the day
    week = 2 * np.pi * (3.5 / 7)
    np.testing.assert_allclose(features[2, 2:], [np.sin(week), np.cos(week)], atol=1e-9)


def split_of(speeds, stamps, mean=60.0, std=5.0):
    normalized = (speeds - mean) / std
    bounds = split_bounds(len(speeds))
    seconds = epoch_seconds(stamps)
    train = make_windows(normalized, seconds, bounds["train"], HISTORY, HORIZON)
    test = make_windows(normalized, seconds, bounds["test"], HISTORY, HORIZON)
    return evaluate.DistrictSplit("d1", train, test, mean, std), bounds


def test_persistence_repeats_the_last_observed_speed():
    speeds, stamps = toy_series()
    split, _ = split_of(speeds, stamps)
    forecast = evaluate.persistence(split)
    for k in (0, 11, 200):
        t, s = split.test.target_start[k], split.test.sensor[k]
        history = speeds[t - HISTORY : t, s]
        expected = history[~np.isnan(history)][-1]
        np.testing.assert_allclose(forecast[k], np.full(HORIZON, expected), atol=1e-4)


def test_historical_average_is_the_mean_of_the_same_slot_of_the_week():
    steps = 3 * evaluate.STEPS_PER_WEEK
    stamps = pd.date_range("2012-03-05", periods=steps, freq="5min")
    slot = np.arange(steps) % evaluate.STEPS_PER_WEEK
    speeds = np.stack([50 + 10 * np.sin(slot / 300.0), 40 + slot % 7], axis=1) + np.repeat(
        [[0.0], [2.0], [4.0]], evaluate.STEPS_PER_WEEK, axis=0
    )  # each week 2 mph faster than the last
    split, bounds = split_of(speeds, stamps)
    predict = evaluate.historical_average_fn({"d1": speeds}, bounds["train"][1])
    forecast = predict(split)
    k = 5
    t, s = split.test.target_start[k], split.test.sensor[k]
    train_end = bounds["train"][1]
    for h in range(HORIZON):
        same_slot = [i for i in range(train_end) if i % evaluate.STEPS_PER_WEEK == (t + h) % evaluate.STEPS_PER_WEEK]
        np.testing.assert_allclose(forecast[k, h], speeds[same_slot, s].mean(), atol=1e-9)


def test_metrics_mask_missing_and_zero_readings_and_use_steps_3_6_12():
    actual = np.full((4, HORIZON), 60.0)
    forecast = actual.copy()
    forecast[:, 2] += 3.0  # 15 min
    forecast[:, 11] -= 6.0  # 60 min
    actual[0, 11], actual[1, 11] = np.nan, 0.0  # masked
    forecast[0, 11] = forecast[1, 11] = 999.0
    metrics = evaluate.forecast_metrics(actual, forecast)
    assert metrics["mae_15min"] == pytest.approx(3.0)
    assert metrics["mae_30min"] == pytest.approx(0.0)
    assert metrics["mae_60min"] == pytest.approx(6.0)
    assert metrics["mape_60min"] == pytest.approx(10.0)


def test_serving_graph_computes_the_training_features():
    import tensorflow as tf

    from traffic.model import ModelConfig, build_keras_model, serving_module

    speeds, stamps = toy_series()
    speeds[speeds < 58] = 0.0  # the serving input's "missing" may also be 0, as METR-LA writes it
    split, _ = split_of(np.where(speeds == 0.0, np.nan, speeds), stamps)
    model = build_keras_model(ModelConfig(), HISTORY, 6, HORIZON, seed=3)
    module = serving_module(model, split.mean, split.std, HISTORY, interval_minutes=5)
    rows = np.arange(0, len(split.test), 97)
    inputs = {}
    for lag in range(HISTORY):
        steps = split.test.target_start[rows] - 1 - lag
        inputs[f"speed_lag_{lag}"] = tf.constant(speeds[steps, split.test.sensor[rows]], tf.float32)
    inputs["timestamp"] = tf.constant(epoch_seconds(stamps)[split.test.target_start[rows] - 1], tf.float64)
    served = module.serve({module.input_names[c]: v for c, v in inputs.items()})["forecast"].numpy()
    expected = split.to_mph(model(split.test.x[rows], training=False).numpy())
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-4)
