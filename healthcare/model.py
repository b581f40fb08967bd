"""Keras builders for diagnosis: logistic regression and a small MLP, and their TFF wrapping."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf


@dataclass(frozen=True)
class ModelConfig:
    """The [model] section of a healthcare job."""

    kind: str = field(default="logistic", metadata={"choices": ("logistic", "mlp"), "doc": (
        "`logistic` regression, or `mlp`: one hidden ReLU layer of `hidden_units`."
    )})
    hidden_units: int = field(default=32, metadata={"min": 1, "max": 4096, "doc": "mlp: width of the hidden layer."})
    l2: float = field(default=0.0, metadata={"min": 0.0, "doc": "L2 penalty on the kernels (Keras `l2`: l2 · Σw²); 0 = none."})


def build_keras_model(cfg: ModelConfig, n_inputs: int, seed: int = 0) -> "tf.keras.Model":
    """Uncompiled model from preprocessed features to the probability of disease.

    Initializers carry op-level seeds: TFF traces `model_fn` into fresh graphs, where a
    global seed would not reach, and the same job must give the same model.
    """
    import tensorflow as tf  # deferred: the CLI validates input before paying for TF's import

    regularizer = tf.keras.regularizers.l2(cfg.l2) if cfg.l2 > 0 else None
    inputs = tf.keras.Input(shape=(n_inputs,), name="x")
    hidden = inputs
    if cfg.kind == "mlp":
        hidden = tf.keras.layers.Dense(
            cfg.hidden_units,
            activation="relu",
            kernel_regularizer=regularizer,
            kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
        )(hidden)
    output = tf.keras.layers.Dense(
        1,
        activation="sigmoid",
        kernel_regularizer=regularizer,
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1),
    )(hidden)
    return tf.keras.Model(inputs, output)


def input_spec(n_inputs: int) -> collections.OrderedDict:
    import tensorflow as tf

    return collections.OrderedDict(
        x=tf.TensorSpec([None, n_inputs], tf.float32), y=tf.TensorSpec([None, 1], tf.float32)
    )


def tff_model_fn(cfg: ModelConfig, n_inputs: int, seed: int = 0):
    """A no-argument constructor, as TFF requires: a fresh Keras model on every call."""

    import tensorflow as tf
    import tensorflow_federated as tff

    def model_fn() -> "tff.learning.models.VariableModel":
        return tff.learning.models.from_keras_model(
            build_keras_model(cfg, n_inputs, seed),
            loss=tf.keras.losses.BinaryCrossentropy(),
            input_spec=input_spec(n_inputs),
            metrics=[tf.keras.metrics.BinaryAccuracy(name="accuracy")],
        )

    return model_fn
