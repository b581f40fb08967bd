"""Keras forecasters: a GRU sequence model and a fast feed-forward model, and their TFF wrapping;
the graph forecasters (``gcn_gru``, ``dcrnn``) are in ``traffic/graph_model.py``.

Input: [batch, history, features] (normalized speed, observed flag, time of day and
day of week as sin/cos); output: the normalized speed at each of the next `horizon`
steps. The loss is masked: missing target readings (NaN) do not count, as in the
METR-LA protocol.
"""

from __future__ import annotations

import collections

import numpy as np
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf


GRAPH_KINDS = ("gcn_gru", "dcrnn")  # traffic/graph_model.py: one example is a whole district


@dataclass(frozen=True)
class ModelConfig:
    """The [model] section of a traffic job."""

    kind: str = field(default="mlp", metadata={"choices": ("mlp", "gru", *GRAPH_KINDS), "doc": (
        "`mlp` (fast feed-forward) or `gru` (a sequence model over the hour of history), one sensor at a time; "
        "`gcn_gru` (T-GCN) or `dcrnn` (diffusion-convolution GRU): a district's sensors as one graph."
    )})
    hidden_units: int = field(default=64, metadata={"min": 1, "max": 4096, "doc": "Width of the hidden layers."})


def masked_mae(y_true, y_pred):
    """Mean absolute error over the observed targets only (NaN = missing reading)."""
    import tensorflow as tf  # deferred: the CLI validates input before paying for TF's import

    errors, weights = masked_errors(y_true, y_pred)
    return tf.reduce_sum(errors * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def masked_errors(y_true, y_pred):
    """(absolute errors, 1 where the target was observed) per element."""
    import tensorflow as tf

    observed = tf.logical_not(tf.math.is_nan(y_true))
    return tf.abs(tf.where(observed, y_true, 0.0) - y_pred), tf.cast(observed, y_pred.dtype)


def masked_mae_loss():
    """`masked_mae` as the `tf.keras.losses.Loss` object TFF's `from_keras_model` requires;
    `masked_parts` lets the grouped engine take the mean per client (learning/dense_chain.py)."""
    import tensorflow as tf

    class MaskedMAE(tf.keras.losses.Loss):
        def call(self, y_true, y_pred):
            return masked_mae(y_true, y_pred)  # a scalar: keras' batch reduction leaves it as is

        def masked_parts(self, y_true, y_pred):
            return masked_errors(y_true, y_pred)

    return MaskedMAE(name="masked_mae")


def build_keras_model(
    cfg: ModelConfig, history: int, n_features: int, horizon: int, seed: int = 0, n_nodes: int = 0
) -> "tf.keras.Model":
    """Uncompiled; initializers carry op-level seeds (TFF traces model_fn into fresh graphs).
    Graph kinds take districts padded to `n_nodes` sensors (traffic/graph_model.py)."""
    import tensorflow as tf

    if cfg.kind in GRAPH_KINDS:
        from traffic import graph_model

        return graph_model.build(cfg.kind, cfg.hidden_units, history, n_features, n_nodes, horizon, seed)

    glorot = lambda k: tf.keras.initializers.GlorotUniform(seed=seed + k)  # noqa: E731
    inputs = tf.keras.Input(shape=(history, n_features), name="x")
    if cfg.kind == "gru":
        hidden = tf.keras.layers.GRU(
            cfg.hidden_units,
            kernel_initializer=glorot(0),
            recurrent_initializer=tf.keras.initializers.Orthogonal(seed=seed + 1),
        )(inputs)
    else:
        hidden = tf.keras.layers.Flatten()(inputs)
        hidden = tf.keras.layers.Dense(cfg.hidden_units, activation="relu", kernel_initializer=glorot(0))(hidden)
    hidden = tf.keras.layers.Dense(cfg.hidden_units, activation="relu", kernel_initializer=glorot(2))(hidden)
    outputs = tf.keras.layers.Dense(horizon, kernel_initializer=glorot(3))(hidden)
    return tf.keras.Model(inputs, outputs)


def input_spec(history: int, n_features: int, horizon: int, n_nodes: int = 0) -> collections.OrderedDict:
    """One sensor's window (n_nodes = 0), or a district's padded to n_nodes sensors with its graph rows."""
    import tensorflow as tf

    if n_nodes:
        return collections.OrderedDict(
            x=tf.TensorSpec([None, n_nodes, history * n_features + history + horizon + n_nodes], tf.float32),
            y=tf.TensorSpec([None, n_nodes, horizon], tf.float32),
        )
    return collections.OrderedDict(
        x=tf.TensorSpec([None, history, n_features], tf.float32),
        y=tf.TensorSpec([None, horizon], tf.float32),
    )


def tff_model_fn(cfg: ModelConfig, history: int, n_features: int, horizon: int, seed: int = 0, n_nodes: int = 0):
    """A no-argument constructor, as TFF requires: a fresh Keras model on every call."""
    import tensorflow_federated as tff

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_keras_model(cfg, history, n_features, horizon, seed, n_nodes),
            loss=masked_mae_loss(),
            input_spec=input_spec(history, n_features, horizon, n_nodes),
        )

    return model_fn


def serving_module(model, mean: float, std: float, history: int, interval_minutes: int):
    """Raw recent history of one sensor (speed_lag_{k}: k steps before the latest; 0 or
    empty = missing) and the latest reading's `timestamp` -> the forecast in input units.

    Repeats `traffic.windows` feature arithmetic in TF; a test checks the two agree.
    """
    import tensorflow as tf

    from tff_apps.program.export import ServingModule
    from traffic.windows import EPOCH_WEEKDAY_SHIFT, SECONDS_PER_DAY, SECONDS_PER_WEEK

    columns = [f"speed_lag_{k}" for k in range(history - 1, -1, -1)] + ["timestamp"]
    offsets = tf.constant([-(history - 1 - i) * interval_minutes * 60.0 for i in range(history)], tf.float64)

    def serve(inputs):
        speeds = tf.stack([inputs[c] for c in columns[:-1]], axis=1)  # oldest first
        observed = tf.logical_not(tf.math.is_nan(speeds) | tf.equal(speeds, 0.0))
        normalized = tf.where(observed, (speeds - mean) / std, 0.0)
        seconds = inputs["timestamp"][:, None] + offsets[None, :]
        day = 2 * np.pi * tf.math.floormod(seconds, SECONDS_PER_DAY) / SECONDS_PER_DAY
        week = 2 * np.pi * tf.math.floormod(seconds + EPOCH_WEEKDAY_SHIFT, SECONDS_PER_WEEK) / SECONDS_PER_WEEK
        clock = tf.cast(tf.stack([tf.sin(day), tf.cos(day), tf.sin(week), tf.cos(week)], axis=-1), tf.float32)
        x = tf.concat([normalized[..., None], tf.cast(observed, tf.float32)[..., None], clock], axis=-1)
        return {"forecast": model(x, training=False) * std + mean}

    return ServingModule(model, columns, serve, dtypes={"timestamp": tf.float64})
