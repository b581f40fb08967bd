"""Forecasting windows: 1 hour of history in, the next hour out, split by time.

Each window of a sensor holds `history` steps of features (normalized speed with
missing readings set to 0, an observed flag, time of day and day of week as sin/cos)
and `horizon` target speeds (normalized; NaN where the reading is missing, so the
loss and the metrics skip it). The timeline is split 70 / 10 / 20 into train,
validation and test, and no window crosses a split boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SECONDS_PER_DAY = 86_400.0
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
# 1970-01-01 was a Thursday: shift so that day-of-week 0 is Monday, as in pandas.
EPOCH_WEEKDAY_SHIFT = 3 * SECONDS_PER_DAY
N_FEATURES = 6
SPLITS = ("train", "validation", "test")


@dataclass
class Windows:
    x: np.ndarray  # [N, history, N_FEATURES] float32
    y: np.ndarray  # [N, horizon] normalized targets, NaN = missing
    sensor: np.ndarray  # [N] sensor index within the district
    target_start: np.ndarray  # [N] time index of the first target step
    # graph models: the sensor's typical speed at each history and target step ([N, history +
    # horizon], normalized; traffic/typical.py), None for the models of one sensor
    typical: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def every(self, stride: int) -> "Windows":
        typical = None if self.typical is None else self.typical[::stride]
        return Windows(self.x[::stride], self.y[::stride], self.sensor[::stride], self.target_start[::stride], typical)


def epoch_seconds(timestamps: pd.DatetimeIndex) -> np.ndarray:
    """Seconds since 1970 of the wall-clock time (naive timestamps are taken as they read)."""
    return (timestamps.tz_localize(None) if timestamps.tz is not None else timestamps).asi8 / 1e9


def time_features(seconds: np.ndarray) -> np.ndarray:
    """[..., 4]: time of day and day of week as sin/cos (the serving graph repeats this)."""
    day_angle = 2 * np.pi * (seconds % SECONDS_PER_DAY) / SECONDS_PER_DAY
    week_angle = 2 * np.pi * ((seconds + EPOCH_WEEKDAY_SHIFT) % SECONDS_PER_WEEK) / SECONDS_PER_WEEK
    return np.stack(
        [np.sin(day_angle), np.cos(day_angle), np.sin(week_angle), np.cos(week_angle)], axis=-1
    )


def history_window(
    lags: np.ndarray, latest_seconds: np.ndarray, mean: float, std: float, interval_minutes: float
) -> np.ndarray:
    """[N, history, N_FEATURES] model inputs from raw histories of one sensor (lags [N, history],
    oldest first, 0 or NaN = missing; `latest_seconds` [N] the time of the last reading), with the
    arithmetic of `make_windows` (and of the serving graph, `traffic.model.serving_module`)."""
    lags = np.asarray(lags, dtype=np.float64)
    history = lags.shape[1]
    observed = np.isfinite(lags) & (lags != 0.0)
    normalized = np.where(observed, (lags - mean) / std, 0.0)
    offsets = -(history - 1 - np.arange(history)) * interval_minutes * 60.0
    clock = time_features(np.asarray(latest_seconds, dtype=np.float64)[:, None] + offsets[None, :])
    x = np.concatenate([normalized[..., None], observed[..., None].astype(float), clock], axis=-1)
    return x.astype(np.float32)


def split_bounds(n_steps: int, fractions=(0.7, 0.1, 0.2)) -> dict[str, tuple[int, int]]:
    """Chronological [start, end) step ranges of train, validation and test."""
    edges = np.round(np.cumsum((0.0,) + tuple(fractions)) * n_steps).astype(int)
    return {name: (int(edges[i]), int(edges[i + 1])) for i, name in enumerate(SPLITS)}


def make_windows(
    normalized: np.ndarray, seconds: np.ndarray, bounds: tuple[int, int], history: int, horizon: int
) -> Windows:
    """All windows of every sensor whose history and targets lie inside `bounds`."""
    start, end = bounds
    first_target = np.arange(start + history, end - horizon + 1)
    if len(first_target) == 0:
        return _empty_windows(history, horizon)
    n_sensors = normalized.shape[1]
    history_steps = first_target[:, None] + np.arange(-history, 0)[None, :]  # [W, history]
    target_steps = first_target[:, None] + np.arange(horizon)[None, :]  # [W, horizon]
    speeds = normalized[history_steps]  # [W, history, S]
    observed = ~np.isnan(speeds)
    clock = np.broadcast_to(time_features(seconds[history_steps])[:, :, None, :], speeds.shape + (4,))
    x = np.concatenate(
        [np.where(observed, speeds, 0.0)[..., None], observed[..., None].astype(float), clock], axis=-1
    )  # [W, history, S, F]
    x = x.transpose(0, 2, 1, 3).reshape(-1, history, N_FEATURES)
    y = normalized[target_steps].transpose(0, 2, 1).reshape(-1, horizon)  # [W*S, horizon]
    sensor = np.tile(np.arange(n_sensors), len(first_target))
    return Windows(x.astype(np.float32), y.astype(np.float32), sensor, np.repeat(first_target, n_sensors))


def _empty_windows(history: int, horizon: int) -> Windows:
    return Windows(
        np.zeros((0, history, N_FEATURES), np.float32), np.zeros((0, horizon), np.float32),
        np.zeros(0, int), np.zeros(0, int),
    )


def graph_examples(windows: Windows, graph: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """A district's windows as graph examples, one per time window (traffic/graph_model.py):
    x [W, n_nodes, history * N_FEATURES + history + horizon + n_nodes] (each sensor's flattened
    window, its typical speeds (`Windows.typical`), then its graph row), y [W, n_nodes, horizon];
    sensors past the district's own are padding (zero inputs, no edges, NaN targets).
    `windows` rows are time-major (`make_windows`)."""
    n_sensors = graph.shape[0]
    n_windows = len(windows) // n_sensors
    history, horizon = windows.x.shape[1], windows.y.shape[1]
    width = history * N_FEATURES + history + horizon
    x = np.zeros((n_windows, n_nodes, width + n_nodes), np.float32)
    x[:, :n_sensors, : history * N_FEATURES] = windows.x.reshape(n_windows, n_sensors, -1)
    x[:, :n_sensors, history * N_FEATURES : width] = windows.typical.reshape(n_windows, n_sensors, -1)
    x[:, :n_sensors, width : width + n_sensors] = graph[None]
    y = np.full((n_windows, n_nodes, horizon), np.nan, np.float32)
    y[:, :n_sensors] = windows.y.reshape(n_windows, n_sensors, horizon)
    return x, y


def sensor_rows(outputs: np.ndarray, n_sensors: int) -> np.ndarray:
    """Graph outputs [W, n_nodes, horizon] back to `make_windows`' rows [W * n_sensors, horizon]."""
    return outputs[:, :n_sensors].reshape(-1, outputs.shape[-1])
