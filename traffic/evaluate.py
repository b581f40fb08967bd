"""Forecast metrics at 15, 30 and 60 minutes, and the baselines run beside the federated model.

Metrics follow the METR-LA protocol: MAE, RMSE and MAPE of the speed at step 3, 6 and 12
(5-minute steps), with missing readings (NaN or 0) masked out; per district and over all
districts' test windows. The centralized baseline is the only code that pools districts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from shared.metrics import mae, mape, rmse
from tff_apps.program.alongside import stop_callbacks
from traffic.windows import Windows, graph_examples, sensor_rows

HORIZONS = {"15min": 3, "30min": 6, "60min": 12}  # minutes -> step (1-based)
HEADLINE = "test_mae_60min"
STEPS_PER_WEEK = 7 * 24 * 12


@dataclass
class DistrictSplit:
    """One district's windows and the statistics that turn them back into mph."""

    name: str
    train: Windows
    test: Windows
    mean: float | np.ndarray  # the district's scale, or each sensor's ([sensors], traffic/splits.py)
    std: float | np.ndarray
    graph: np.ndarray | None = None  # graph models: the district's [S, S] edge weights
    n_nodes: int = 0  # graph models: sensors every example is padded to (the largest district's)

    def to_mph(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized speeds in mph; with one scale a sensor, `normalized` holds rows of `test`."""
        if np.ndim(self.mean) == 0:
            return normalized * self.std + self.mean
        sensor = self.test.sensor[:, None]
        return normalized * self.std[sensor] + self.mean[sensor]

    def examples(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) the model trains on or is evaluated on: one per sensor window, or, for the
        graph models, one per time window holding the whole district."""
        windows = getattr(self, which)
        if not self.n_nodes:
            return windows.x, windows.y
        return graph_examples(windows, self.graph, self.n_nodes)

    def n_examples(self) -> int:
        return len(self.train) // self.graph.shape[0] if self.n_nodes else len(self.train)

    def rows(self, outputs: np.ndarray) -> np.ndarray:
        """The model's outputs on `examples("test")` as rows of `test` ([N, horizon])."""
        return sensor_rows(outputs, self.graph.shape[0]) if self.n_nodes else outputs


PredictFn = Callable[[DistrictSplit], np.ndarray]  # -> [N, horizon] forecasts in mph


def forecast_metrics(actual: np.ndarray, forecast: np.ndarray) -> dict[str, float]:
    """MAE / RMSE / MAPE at each horizon; actual NaN -> 0 so mask_zero drops it."""
    actual = np.nan_to_num(actual, nan=0.0)
    metrics = {}
    for label, step in HORIZONS.items():
        a, f = actual[:, step - 1], forecast[:, step - 1]
        metrics[f"mae_{label}"] = mae(a, f)
        metrics[f"rmse_{label}"] = rmse(a, f)
        metrics[f"mape_{label}"] = mape(a, f)
    return metrics


class DistrictReport(dict):
    """A report (the plain dict that summary.json holds) that also carries, as attributes
    that never reach JSON, each district's test windows, actual speeds and forecasts (mph)."""

    windows: dict[str, Windows]
    actual: dict[str, np.ndarray]
    forecasts: dict[str, np.ndarray]


def evaluate_districts(districts: list[DistrictSplit], predict: PredictFn) -> DistrictReport:
    actual = {d.name: d.to_mph(d.test.y) for d in districts}
    forecasts = {d.name: predict(d) for d in districts}
    per_district = {name: forecast_metrics(actual[name], forecasts[name]) for name in actual}
    overall = forecast_metrics(
        np.concatenate(list(actual.values())), np.concatenate(list(forecasts.values()))
    )
    report = DistrictReport({"overall": overall, "districts": per_district})
    report.windows = {d.name: d.test for d in districts}
    report.actual, report.forecasts = actual, forecasts
    return report


def forecast_series(
    report: DistrictReport, timestamps, sensors: list[tuple[str, int]],
    sensor_ids: dict[str, list[str]] | None = None, horizon: str = "60min", max_points: int = 2 * 24 * 12,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For the report's plot: per (district, sensor index), (time of the target, actual,
    forecast) at one horizon over the sensor's first `max_points` test windows (two days at
    5-minute steps). `timestamps` is the data's time index (a pandas DatetimeIndex)."""
    step = HORIZONS[horizon]
    series = {}
    for district, sensor in sensors:
        windows = report.windows[district]
        rows = np.flatnonzero(windows.sensor == sensor)
        rows = rows[np.argsort(windows.target_start[rows], kind="stable")][:max_points]
        if len(rows) == 0:
            continue
        times = timestamps[windows.target_start[rows] + step - 1]
        if getattr(times, "tz", None) is not None:
            times = times.tz_localize(None)  # wall-clock time, as the data reads
        name = sensor_ids[district][sensor] if sensor_ids else str(sensor)
        series[f"{district}, sensor {name}"] = (
            np.asarray(times, dtype="datetime64[ns]"),
            report.actual[district][rows, step - 1], report.forecasts[district][rows, step - 1],
        )
    return series


def headline_metrics(report: dict) -> dict[str, float]:
    return {f"test_{key}": value for key, value in report["overall"].items() if key.startswith(("mae", "rmse"))}


def persistence(district: DistrictSplit) -> np.ndarray:
    """Every future step = the last observed speed of the hour before (sensor mean if none)."""
    speeds, observed = district.test.x[:, :, 0], district.test.x[:, :, 1] > 0.5
    last_index = np.where(observed, np.arange(speeds.shape[1])[None, :], -1).max(axis=1)
    rows = np.arange(len(speeds))
    last = np.where(last_index >= 0, speeds[rows, np.maximum(last_index, 0)], 0.0)
    horizon = district.test.y.shape[1]
    return district.to_mph(np.repeat(last[:, None], horizon, axis=1))


def historical_average_fn(district_speeds: dict[str, np.ndarray], train_end: int) -> PredictFn:
    """Mean speed of each sensor at each 5-minute slot of the week, from the train split."""
    tables = {}
    for name, speeds in district_speeds.items():
        slots = np.arange(train_end) % STEPS_PER_WEEK
        train = speeds[:train_end]
        sums = np.zeros((STEPS_PER_WEEK, speeds.shape[1]))
        counts = np.zeros_like(sums)
        np.add.at(sums, slots, np.nan_to_num(train))
        np.add.at(counts, slots, ~np.isnan(train))
        sensor_mean = np.nansum(train, axis=0) / np.maximum((~np.isnan(train)).sum(axis=0), 1)
        tables[name] = np.where(counts > 0, sums / np.maximum(counts, 1), sensor_mean[None, :])

    def predict(district: DistrictSplit) -> np.ndarray:
        horizon = district.test.y.shape[1]
        steps = (district.test.target_start[:, None] + np.arange(horizon)[None, :]) % STEPS_PER_WEEK
        return tables[district.name][steps, district.test.sensor[:, None]]

    return predict


class KerasBaselines:
    """Fits the Keras baselines (each district alone, then the pooled one) one after another on
    ONE compiled model, so that Keras traces its training function once rather than once per
    baseline (the tracing cost more than the training). Each fit starts from the weights a new
    model built with its seed has, and from a zeroed optimizer (Adam's moments, the step count):
    it computes what a fresh model would. A fit's model is valid until the next fit.

    `build(seed)` returns an uncompiled model; `optimizer`, `loss`, `jit_compile` as `compile`'s."""

    STEPS_PER_CALL = 500  # steps in one call of the training function: no Keras Python cost per step

    def __init__(self, build: Callable, optimizer, loss, jit_compile: bool = False, stop=None):
        self.build, self._optimizer, self._loss, self._jit_compile = build, optimizer, loss, jit_compile
        self._model = None
        self._stop = stop  # a threading.Event: set, the fit ends (`alongside`)

    def fit(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int, seed: int):
        """One pass over the rows `order` of (x, y) (it may repeat rows), in batches, from a fresh start."""
        import tensorflow as tf

        tf.keras.utils.set_random_seed(seed)
        fresh = self.build(seed)
        if self._model is None:
            self._model = fresh
            self._model.compile(
                self._optimizer, self._loss, jit_compile=self._jit_compile, steps_per_execution=self.STEPS_PER_CALL
            )
        else:
            self._model.set_weights(fresh.get_weights())
            for variable in self._model.optimizer.variables:
                variable.assign(tf.zeros_like(variable))
        # each batch gathered when it is needed: the ordered copy of the rows would be many times x
        x, y = tf.constant(x), tf.constant(y)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        batches = batches.map(lambda rows: (tf.gather(x, rows), tf.gather(y, rows))).prefetch(tf.data.AUTOTUNE)
        self._model.fit(batches, epochs=1, verbose=0, callbacks=stop_callbacks(self._stop))
        return self._model
