"""Traffic's TFF computations at the sites: each road district's site opens its own series
from its data folder (`series.tfrecord`: speeds [time, sensors] as float64 with NaN = missing,
the readings' epoch seconds, the district's graph) and computes, in TF ops, what a simulation
computes from the same readings with numpy: the forecasting windows (`traffic.windows.
make_windows`, checked equal in tests/traffic/test_sites.py), a round's input, and the metric
sums of the model and of the baselines (`traffic.evaluate`). Only aggregates leave the site.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_apps.sites import site_computations
from traffic.evaluate import HORIZONS, STEPS_PER_WEEK
from traffic.typical import DAY_TYPES, SMOOTHING_MINUTES
from traffic.windows import EPOCH_WEEKDAY_SHIFT, N_FEATURES, SECONDS_PER_DAY, SECONDS_PER_WEEK

SERIES = "series.tfrecord"
SUMS = 4  # per horizon: observed readings, sum |error|, sum error², sum |error| / |actual|
METRIC_LENGTH = SUMS * len(HORIZONS)


@dataclass(frozen=True)
class Windowing:
    """What turns a district's readings into the model's examples; the same at every site."""

    mean: float  # the federated normalization of the training speeds
    std: float
    bounds: dict  # split -> (start, end) steps, `traffic.windows.split_bounds`
    history: int
    horizon: int
    n_nodes: int = 0  # graph models: sensors every example is padded to (the largest district's)
    interval_minutes: int = 5  # of the readings (graph models: the typical speeds' slots of the day)


class SiteWindows(NamedTuple):
    """A site's windows of one split and what evaluation needs beside them (TF tensors)."""

    x: tf.Tensor  # [W * S, history, N_FEATURES]
    y: tf.Tensor  # [W * S, horizon]
    speeds: tf.Tensor  # the raw readings [T, S]
    graph: tf.Tensor  # [S, S]
    typical: tf.Tensor | None  # graph models: [W * S, history + horizon] (`traffic.typical`)


# ------------------------------------------------------------------ the site's folder


def write_series(path: Path, speeds: np.ndarray, seconds: np.ndarray, graph: np.ndarray) -> None:
    """One record: the raw readings bit for bit (float64 little-endian), as the loader left them."""

    def raw(values) -> tf.train.Feature:
        data = np.ascontiguousarray(values, dtype="<f8").tobytes()
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))

    example = tf.train.Example(features=tf.train.Features(feature={
        "speeds": raw(speeds), "seconds": raw(seconds), "graph": raw(graph),
        "sensors": tf.train.Feature(int64_list=tf.train.Int64List(value=[speeds.shape[1]])),
    }))
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(example.SerializeToString())


def read_series(folder):
    """TF ops, at the site: (speeds float64 [T, S], epoch seconds float64 [T], graph float64 [S, S])."""
    spec = {
        "speeds": tf.io.FixedLenFeature([], tf.string), "seconds": tf.io.FixedLenFeature([], tf.string),
        "graph": tf.io.FixedLenFeature([], tf.string), "sensors": tf.io.FixedLenFeature([], tf.int64),
    }
    record = tf.data.TFRecordDataset(tf.strings.join([folder, "/", SERIES])).get_single_element()
    parsed = tf.io.parse_single_example(record, spec)
    sensors = parsed["sensors"]
    speeds = tf.reshape(tf.io.decode_raw(parsed["speeds"], tf.float64), tf.stack([-1, sensors]))
    graph = tf.reshape(tf.io.decode_raw(parsed["graph"], tf.float64), tf.stack([sensors, sensors]))
    return speeds, tf.io.decode_raw(parsed["seconds"], tf.float64), graph


def training_readings(train_end: int):
    """A site's training speeds as one column (what `federated_moments` is given in a simulation)."""
    return lambda folder: tf.reshape(read_series(folder)[0][:train_end], [-1, 1])


# ------------------------------------------------------------------ windows, in TF


def tf_time_features(seconds):
    """`traffic.windows.time_features`: time of day and day of week as sin/cos, float64."""
    day = 2 * np.pi * tf.math.floormod(seconds, SECONDS_PER_DAY) / SECONDS_PER_DAY
    week = 2 * np.pi * tf.math.floormod(seconds + EPOCH_WEEKDAY_SHIFT, SECONDS_PER_WEEK) / SECONDS_PER_WEEK
    return tf.stack([tf.sin(day), tf.cos(day), tf.sin(week), tf.cos(week)], axis=-1)


def first_targets(bounds: tuple[int, int], history: int, horizon: int):
    """The time step of each window's first target (`make_windows`: history and targets inside `bounds`)."""
    start, end = bounds
    return tf.range(start + history, max(end - horizon + 1, start + history))


def tf_windows(normalized, seconds, bounds: tuple[int, int], history: int, horizon: int):
    """`traffic.windows.make_windows` in TF ops: (x float32 [W * S, history, N_FEATURES],
    y float32 [W * S, horizon]), rows time-major (window w, sensor s at w * S + s)."""
    first_target = first_targets(bounds, history, horizon)
    history_steps = first_target[:, None] + tf.range(-history, 0)[None, :]  # [W, history]
    target_steps = first_target[:, None] + tf.range(horizon)[None, :]  # [W, horizon]
    speeds = tf.gather(normalized, history_steps)  # [W, history, S]
    observed = tf.logical_not(tf.math.is_nan(speeds))
    clock = tf_time_features(tf.gather(seconds, history_steps))[:, :, None, :]  # [W, history, 1, 4]
    clock = tf.broadcast_to(clock, tf.concat([tf.shape(speeds), [4]], axis=0))
    x = tf.concat(
        [tf.where(observed, speeds, tf.zeros_like(speeds))[..., None], tf.cast(observed, tf.float64)[..., None], clock],
        axis=-1,
    )  # [W, history, S, F]
    x = tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [-1, history, N_FEATURES])
    y = tf.reshape(tf.transpose(tf.gather(normalized, target_steps), [0, 2, 1]), [-1, horizon])
    return tf.cast(x, tf.float32), tf.cast(y, tf.float32)


def tf_typical(normalized, seconds, windowing: Windowing, bounds: tuple[int, int]):
    """`traffic.typical` in TF ops: each sensor's typical speed at every history and target step
    of the windows in `bounds`, float32 [W * S, history + horizon], rows as `tf_windows`'."""
    key, slots_per_day = _day_slot_keys(seconds, windowing.interval_minutes)
    train_end = windowing.bounds["train"][1]
    table = _typical_table(normalized[:train_end], key[:train_end], slots_per_day, windowing.interval_minutes)
    first_target = first_targets(bounds, windowing.history, windowing.horizon)
    steps = first_target[:, None] + tf.range(-windowing.history, windowing.horizon)[None, :]
    values = tf.gather(table, tf.gather(key, steps))  # [W, history + horizon, S]
    return tf.cast(tf.reshape(tf.transpose(values, [0, 2, 1]), [-1, windowing.history + windowing.horizon]), tf.float32)


def _day_slot_keys(seconds, interval_minutes: int):
    """(day type * slots a day + slot of the day [T] int32, slots a day): `typical.day_slots`."""
    interval = interval_minutes * 60.0
    slots_per_day = int(round(SECONDS_PER_DAY / interval))
    weekend = tf.math.floormod(tf.math.floordiv(seconds + EPOCH_WEEKDAY_SHIFT, SECONDS_PER_DAY), 7.0) >= 5.0
    slot = tf.math.floormod(tf.floor(tf.math.floormod(seconds, SECONDS_PER_DAY) / interval), slots_per_day)
    return tf.cast(tf.cast(weekend, tf.float64) * slots_per_day + slot, tf.int32), slots_per_day


def _typical_table(train, key, slots_per_day: int, interval_minutes: int):
    """`typical.typical_table` from the training readings and their keys: [DAY_TYPES * slots, S]."""
    present = tf.logical_not(tf.math.is_nan(train))
    shape = [DAY_TYPES, slots_per_day, -1]
    segments = DAY_TYPES * slots_per_day
    sums = tf.reshape(tf.math.unsorted_segment_sum(tf.where(present, train, tf.zeros_like(train)), key, segments), shape)
    counts = tf.reshape(tf.math.unsorted_segment_sum(tf.cast(present, tf.float64), key, segments), shape)
    reach = int(SMOOTHING_MINUTES // interval_minutes)
    sums = tf.add_n([tf.roll(sums, k, axis=1) for k in range(-reach, reach + 1)])  # the day wraps around
    counts = tf.add_n([tf.roll(counts, k, axis=1) for k in range(-reach, reach + 1)])
    mean = tf.math.divide_no_nan(sums, counts)
    table = tf.where(counts > 0, mean, tf.where(counts[::-1] > 0, mean[::-1], tf.zeros_like(mean)))  # [::-1]: the other day type
    return tf.reshape(table, [segments, -1])


def tf_graph_examples(x, y, typical, graph, n_nodes: int):
    """`traffic.windows.graph_examples` in TF ops: one example per time window, each sensor's
    flattened window, its typical speeds, then its graph row, padded to n_nodes sensors (zero
    inputs, NaN targets)."""
    n_sensors = tf.shape(graph)[0]
    history, horizon = x.shape[1], y.shape[1]
    flat = tf.reshape(x, tf.stack([-1, n_sensors, history * N_FEATURES]))
    typical = tf.reshape(typical, tf.stack([-1, n_sensors, history + horizon]))
    edges = tf.broadcast_to(tf.cast(graph, tf.float32)[None], tf.stack([tf.shape(flat)[0], n_sensors, n_sensors]))
    padding = n_nodes - n_sensors
    nodes = tf.concat([flat, typical, tf.pad(edges, [[0, 0], [0, 0], [0, padding]])], axis=2)
    width = history * N_FEATURES + history + horizon + n_nodes
    graph_x = tf.ensure_shape(tf.pad(nodes, [[0, 0], [0, padding], [0, 0]]), [None, n_nodes, width])
    targets = tf.reshape(y, tf.stack([-1, n_sensors, horizon]))
    graph_y = tf.pad(targets, [[0, 0], [0, padding], [0, 0]], constant_values=np.nan)
    return graph_x, tf.ensure_shape(graph_y, [None, n_nodes, horizon])


def site_windows(folder, windowing: Windowing, split: str) -> SiteWindows:
    """At the site: its sensor windows of `split` and what evaluation needs beside them."""
    speeds, seconds, graph = read_series(folder)
    normalized = (speeds - windowing.mean) / windowing.std
    bounds = windowing.bounds[split]
    x, y = tf_windows(normalized, seconds, bounds, windowing.history, windowing.horizon)
    typical = tf_typical(normalized, seconds, windowing, bounds) if windowing.n_nodes else None
    return SiteWindows(x, y, speeds, graph, typical)


def model_examples(windows: SiteWindows, windowing: Windowing):
    """(x, y) the model trains on: the sensor windows, or for the graph models the district's."""
    if not windowing.n_nodes:
        return windows.x, windows.y
    return tf_graph_examples(windows.x, windows.y, windows.typical, windows.graph, windowing.n_nodes)


def round_dataset_fn(windowing: Windowing, batch_size: int):
    """At the site: the round input `client_data.client_dataset` would give, from the site's
    training windows and the row order the coordinator drew (it depends on the row count only)."""

    @tff.tensorflow.computation(site_computations.round_input_type())
    def open_round(reference):
        x, y = model_examples(site_windows(reference.folder, windowing, "train"), windowing)
        data = collections.OrderedDict(x=tf.gather(x, reference.order), y=tf.gather(y, reference.order))
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)

    return open_round


def split_datasets_fn(windowing: Windowing):
    """At the site: its training and test examples as `personalization`'s client input."""

    @tff.tensorflow.computation(np.str_)
    def open_splits(folder):
        def dataset(split: str):
            x, y = model_examples(site_windows(folder, windowing, split), windowing)
            return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))

        return collections.OrderedDict(train_data=dataset("train"), test_data=dataset("test"))

    return open_splits


# ------------------------------------------------------------------ evaluation sums


def tf_metric_sums(actual, forecast):
    """`traffic.evaluate.forecast_metrics` as sums: per horizon (15, 30, 60 min) the observed
    readings (actual neither NaN nor 0), sum |e|, sum e² and sum |e| / |actual|, float64."""
    actual = tf.cast(actual, tf.float64)
    actual = tf.where(tf.math.is_nan(actual), tf.zeros_like(actual), actual)
    forecast = tf.cast(forecast, tf.float64)
    sums = []
    for step in HORIZONS.values():
        truth, predicted = actual[:, step - 1], forecast[:, step - 1]
        kept = tf.not_equal(truth, 0.0)
        errors = tf.where(kept, predicted - truth, tf.zeros_like(truth))
        ratio = tf.where(kept, tf.abs(errors) / tf.where(kept, tf.abs(truth), tf.ones_like(truth)), tf.zeros_like(truth))
        sums += [tf.reduce_sum(tf.cast(kept, tf.float64)), tf.reduce_sum(tf.abs(errors)),
                 tf.reduce_sum(errors**2), tf.reduce_sum(ratio)]
    return tf.stack(sums)


def metrics_from_sums(sums: np.ndarray) -> dict[str, float]:
    """The metrics `forecast_metrics` gives, from (summed) `tf_metric_sums` vectors."""
    metrics = {}
    for label, (count, absolute, squared, ratio) in zip(HORIZONS, np.asarray(sums, np.float64).reshape(-1, SUMS)):
        enough = count > 0
        metrics[f"mae_{label}"] = float(absolute / count) if enough else float("nan")
        metrics[f"rmse_{label}"] = float(np.sqrt(squared / count)) if enough else float("nan")
        metrics[f"mape_{label}"] = float(ratio / count * 100.0) if enough else float("nan")
    return metrics


def _to_mph(normalized, windowing: Windowing):
    """`DistrictSplit.to_mph` on float32 values, as numpy computes it for them."""
    return normalized * np.float32(windowing.std) + np.float32(windowing.mean)


def model_sums_fn(model_fn, weights_type, windowing: Windowing, split: str):
    """(model weights at the server, site folders) -> each site's metric sums of the model's
    forecasts on its `split` windows, computed at the site."""

    @tff.tensorflow.computation(weights_type, np.str_)
    def site_sums(weights, folder):
        windows = site_windows(folder, windowing, split)
        examples, _ = model_examples(windows, windowing)
        outputs = site_computations.predict_with(model_fn, weights, lambda: examples)
        if windowing.n_nodes:  # back to the sensor windows' rows (`traffic.windows.sensor_rows`)
            outputs = tf.reshape(outputs[:, : tf.shape(windows.graph)[0]], [-1, windowing.horizon])
        return tf_metric_sums(_to_mph(windows.y, windowing), _to_mph(outputs, windowing))

    @tff.federated_computation(tff.FederatedType(weights_type, tff.SERVER), tff.FederatedType(np.str_, tff.CLIENTS))
    def sums(weights, folders):
        return tff.federated_map(site_sums, (tff.federated_broadcast(weights), folders))

    return sums


def tf_persistence(x, horizon: int):
    """`traffic.evaluate.persistence` (normalized): the last observed speed of the hour, or 0."""
    speeds, observed = x[:, :, 0], x[:, :, 1] > 0.5
    steps = tf.range(tf.shape(speeds)[1])[None, :]
    last_index = tf.reduce_max(tf.where(observed, steps, -tf.ones_like(steps)), axis=1)
    picked = tf.gather(speeds, tf.maximum(last_index, 0), batch_dims=1)
    last = tf.where(last_index >= 0, picked, tf.zeros_like(picked))
    return tf.tile(last[:, None], [1, horizon])


def tf_historical_average(speeds, windowing: Windowing, split: str):
    """`traffic.evaluate.historical_average_fn` (mph): each sensor's mean speed at each 5-minute
    slot of the week over the training steps, its mean where a slot has none."""
    train_end = windowing.bounds["train"][1]
    train = speeds[:train_end]
    present = tf.logical_not(tf.math.is_nan(train))
    filled = tf.where(present, train, tf.zeros_like(train))
    slots = tf.range(train_end) % STEPS_PER_WEEK
    sums = tf.math.unsorted_segment_sum(filled, slots, STEPS_PER_WEEK)
    counts = tf.math.unsorted_segment_sum(tf.cast(present, tf.float64), slots, STEPS_PER_WEEK)
    sensor_mean = tf.reduce_sum(filled, axis=0) / tf.maximum(tf.reduce_sum(tf.cast(present, tf.float64), axis=0), 1.0)
    table = tf.where(counts > 0, sums / tf.maximum(counts, 1.0), sensor_mean[None, :])  # [week slots, S]
    first_target = first_targets(windowing.bounds[split], windowing.history, windowing.horizon)
    steps = (first_target[:, None] + tf.range(windowing.horizon)[None, :]) % STEPS_PER_WEEK  # [W, horizon]
    forecast = tf.transpose(tf.gather(table, steps), [0, 2, 1])  # [W, S, horizon]
    return tf.reshape(forecast, [-1, windowing.horizon])


def baseline_sums_fn(windowing: Windowing):
    """Site folders -> each site's metric sums of the persistence and historical-average
    forecasts on its test windows ([2 * METRIC_LENGTH]), computed at the site."""

    @tff.tensorflow.computation(np.str_)
    def site_sums(folder):
        windows = site_windows(folder, windowing, "test")
        actual = _to_mph(windows.y, windowing)
        persistence = _to_mph(tf_persistence(windows.x, windowing.horizon), windowing)
        average = tf_historical_average(windows.speeds, windowing, "test")
        return tf.concat([tf_metric_sums(actual, persistence), tf_metric_sums(actual, average)], axis=0)

    @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
    def sums(folders):
        return tff.federated_map(site_sums, folders)

    return sums
