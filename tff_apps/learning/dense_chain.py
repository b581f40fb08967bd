"""What the grouped engine can stack per client: a chain of Keras Dense layers (after an
optional Flatten of the input, or after a GRU over the input sequence) with a per-example loss
or a masked mean loss, read from the model function (anything else is refused in one line);
or a Keras model that carries its own stacked form.

A model's own stacked form is a `stacked_forward(weights, x)` attribute of the Keras model: the
model's output with every client's weights stacked (Keras' trainable order, a leading client
axis) on x [clients, batch, ...] (e.g. traffic's graph forecasters, through `tf.vectorized_map`
of the model written as a function of its weights). The engine takes it as the model: its
equivalence with the Keras model is the model's to test (traffic's: tests/tff_apps/learning/
test_grouped.py against the stock engine, tests/traffic/test_local_fits.py against Keras fits).
It must have no regularization losses.

A GRU first layer (traffic's `gru`) runs Keras 2.14's GRU cell with every client's weights
stacked: the default configuration only (tanh, sigmoid recurrent activation, reset_after,
bias, last state out; no dropout, regularizer, constraint, masking or state), gates in
Keras' order (update z, reset r, candidate), h = z * h_prev + (1 - z) * candidate.

A masked mean loss is a Keras Loss with a `masked_parts(y_true, y_pred) -> (values, weights)`
method, elementwise, whose loss is sum(values * weights) / max(sum(weights), 1) over the
batch (e.g. traffic's MAE over the observed readings only): the grouped engine takes that
mean per client over the client's real examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import tensorflow as tf

# Keras 2.14 exports neither base class under tf.keras
from keras.src.losses import LossFunctionWrapper
from keras.src.metrics.base_metric import MeanMetricWrapper

from shared.errors import UserError

ENGINE_KEY = "train.engine"
SUPPORTED_ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax", "elu", "softplus", "swish")
ADDED_METRICS = ("loss", "num_examples", "num_batches")  # TFF's from_keras_model adds these


@dataclass
class DenseChain:
    """A Keras model made of Dense layers, as batched functions of per-client weights."""

    activations: list[Callable]
    use_bias: list[bool]
    l2: list[float]  # each kernel's L2 regularization factor (0 = none)
    loss: Any  # the Keras LossFunctionWrapper: per-example values via loss.fn
    metrics: list[tuple[str, Any]]  # (name, Keras MeanMetricWrapper) of the user's metrics
    metric_names: list[str]  # every metric TFF reports, in TFF's order
    flatten: bool = False  # a Flatten layer first: x [clients, batch, ...] flattened per example
    gru: bool = False  # a GRU first (module docstring): its kernel, recurrent kernel and bias lead the weights
    stacked_forward: Callable | None = None  # the model's own stacked form (module docstring): no layers read

    @property
    def shaped_input(self) -> bool:
        """Whether an example is more than a vector (flattened, a sequence, the model's own)."""
        return self.flatten or self.gru or self.stacked_forward is not None

    @property
    def first_dense(self) -> int:
        """The position of the first Dense layer's kernel in the weights."""
        return 3 if self.gru else 0

    def forward(self, weights: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """x [clients, batch, inputs] ([clients, batch, steps, features] with a GRU) ->
        predictions [clients, batch, outputs]."""
        if self.stacked_forward is not None:
            return self.stacked_forward(weights, x)
        if self.flatten:
            x = tf.reshape(x, tf.concat([tf.shape(x)[:2], [-1]], 0))
        if self.gru:
            x = gru_last_state(weights[:3], x)
        hidden, position = x, self.first_dense
        for activation, bias in zip(self.activations, self.use_bias):
            hidden = tf.matmul(hidden, weights[position])  # batched: one matmul per client
            position += 1
            if bias:
                hidden = hidden + tf.expand_dims(weights[position], 1)
                position += 1
            hidden = activation(hidden)
        return hidden

    def regularization(self, weights: list[tf.Tensor]) -> tf.Tensor:
        """Per client: the sum of l2 * sum(kernel^2) that Keras adds to the batch loss."""
        total, position = 0.0, self.first_dense
        for factor, bias in zip(self.l2, self.use_bias):
            if factor > 0:
                kernel = weights[position]
                total += factor * tf.reduce_sum(tf.square(kernel), axis=list(range(1, kernel.shape.rank)))
            position += 2 if bias else 1
        return total

    def client_losses(self, y: tf.Tensor, predictions: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Per client, the Keras batch loss (without regularization) over its real examples
        (mask [clients, batch], 1 = real): [clients]."""
        examples = tf.reduce_sum(mask, axis=1)
        if hasattr(self.loss, "masked_parts"):
            values, weights = self.loss.masked_parts(y, predictions)
            weights = weights * tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([tf.rank(weights) - 2], tf.int32)], 0))
            return masked_sum(values * weights, tf.ones_like(mask)) / tf.maximum(masked_sum(weights, tf.ones_like(mask)), 1.0)
        per_example = self.loss.fn(y, predictions, **self.loss._fn_kwargs)
        # Keras' sum over batch size: the mean over every element of the batch's losses
        return masked_sum(per_example, mask) / tf.maximum(examples * per_example_elements(per_example), 1.0)


def gru_last_state(weights: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """Keras' GRU (reset_after) over x [clients, batch, steps, features] with per-client
    kernel [clients, features, 3h], recurrent kernel [clients, h, 3h], bias [clients, 2, 3h]:
    the last hidden state [clients, batch, h]."""
    kernel, recurrent, bias = weights
    units = recurrent.shape[1]
    inputs = tf.matmul(tf.reshape(x, tf.concat([tf.shape(x)[:1], [-1], tf.shape(x)[3:]], 0)), kernel)
    inputs = tf.reshape(inputs, tf.concat([tf.shape(x)[:3], [3 * units]], 0)) + bias[:, tf.newaxis, tf.newaxis, 0]
    state = tf.zeros(tf.concat([tf.shape(x)[:2], [units]], 0), x.dtype)
    for step in range(x.shape[2]):  # the history's length is static
        x_z, x_r, x_h = tf.split(inputs[:, :, step], 3, axis=-1)
        inner = tf.matmul(state, recurrent) + bias[:, tf.newaxis, 1]
        r_z, r_r, r_h = tf.split(inner, 3, axis=-1)
        z, r = tf.sigmoid(x_z + r_z), tf.sigmoid(x_r + r_r)
        state = z * state + (1 - z) * tf.tanh(x_h + r * r_h)
    return state


def per_example_elements(values: tf.Tensor) -> tf.Tensor:
    """Elements per example of [clients, batch, ...] values (1 for [clients, batch])."""
    return tf.cast(tf.reduce_prod(tf.shape(values)[2:]), tf.float32)


def masked_sum(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Per client, the sum of the real examples' values ([clients, batch, ...] -> [clients])."""
    flat = tf.reshape(values, tf.concat([tf.shape(values)[:2], [-1]], 0))
    return tf.reduce_sum(flat * tf.expand_dims(mask, -1), axis=[1, 2])


def read_dense_chain(model_fn) -> DenseChain:
    """The model of `model_fn` as a DenseChain, or UserError naming what the grouped engine
    does not run (the stock engine does: `train.engine = "tff"`)."""
    with tf.Graph().as_default():  # a throwaway model, only to read its structure
        model = model_fn()
        keras_model = getattr(model, "_keras_model", None)  # TFF's from_keras_model wrapper
        if keras_model is None:
            refuse_model("the model is not a Keras model wrapped by tff.learning.models.from_keras_model")
        if keras_model.non_trainable_weights:
            refuse_model("the model has non-trainable weights")
        layers = [layer for layer in keras_model.layers if not isinstance(layer, tf.keras.layers.InputLayer)]
        previous = keras_model.inputs
        if len(previous) != 1:
            refuse_model("the model has several inputs")
        if getattr(keras_model, "stacked_forward", None) is not None:
            return _own_stacked_form(model, keras_model)
        previous, chain_weights = previous[0], []
        activations, use_bias, l2 = [], [], []
        flatten = bool(layers) and type(layers[0]) is tf.keras.layers.Flatten and layers[0].input is previous
        if flatten:  # the one layer besides Dense: a reshape of each example
            previous, layers = layers[0].output, layers[1:]
        gru = bool(layers) and type(layers[0]) is tf.keras.layers.GRU and layers[0].input is previous
        if gru:
            _check_gru(layers[0])
            chain_weights += layers[0].trainable_weights
            previous, layers = layers[0].output, layers[1:]
        for layer in layers:
            if type(layer) is not tf.keras.layers.Dense:
                refuse_model(f"layer {layer.name} is a {type(layer).__name__}, not a Dense layer")
            if layer.input is not previous:
                refuse_model(f"layer {layer.name} does not take the previous layer's output (not a chain)")
            name = getattr(layer.activation, "__name__", "")
            if name not in SUPPORTED_ACTIVATIONS:
                refuse_model(f"layer {layer.name} has activation {name or layer.activation!r}")
            if layer.bias_regularizer is not None or layer.activity_regularizer is not None:
                refuse_model(f"layer {layer.name} has a bias or activity regularizer")
            if layer.kernel_constraint is not None or layer.bias_constraint is not None:
                refuse_model(f"layer {layer.name} has a weight constraint")
            l2.append(_l2_factor(layer))
            activations.append(layer.activation)
            use_bias.append(bool(layer.use_bias))
            chain_weights += layer.trainable_weights
            previous = layer.output
        if previous is not keras_model.outputs[0] or len(keras_model.outputs) != 1:
            refuse_model("the model's output is not its last Dense layer")
        if [id(v) for v in chain_weights] != [id(v) for v in keras_model.trainable_variables]:
            refuse_model("the model's trainable weights are not the Dense layers' in order")
        return DenseChain(activations, use_bias, l2, _single_loss(model), *_metrics(model), flatten, gru)


def _own_stacked_form(model, keras_model) -> DenseChain:
    if keras_model.losses:
        refuse_model("the model carries its stacked form and has regularization losses")
    return DenseChain([], [], [], _single_loss(model), *_metrics(model), stacked_forward=keras_model.stacked_forward)


def _metrics(model) -> tuple[list[tuple[str, Any]], list[str]]:
    """(the user's metrics as (name, Keras MeanMetricWrapper), every metric TFF reports)."""
    metric_names, metrics = [], []
    for metric in model.get_metrics():
        metric_names.append(metric.name)
        if metric.name in ADDED_METRICS:
            continue
        if not isinstance(metric, MeanMetricWrapper):
            refuse_model(f"metric {metric.name} is a {type(metric).__name__}, not a per-example mean metric")
        metrics.append((metric.name, metric))
    return metrics, metric_names


GRU_DEFAULTS = dict(activation="tanh", recurrent_activation="sigmoid", use_bias=True, reset_after=True, dropout=0.0,
                    recurrent_dropout=0.0, return_sequences=False, return_state=False, go_backwards=False,
                    stateful=False, time_major=False, kernel_regularizer=None, recurrent_regularizer=None,
                    bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                    recurrent_constraint=None, bias_constraint=None)


def _check_gru(layer) -> None:
    """Refuses a GRU whose configuration `gru_last_state` does not compute."""
    config = layer.get_config()
    for key, expected in GRU_DEFAULTS.items():
        if config.get(key) != expected:
            refuse_model(f"layer {layer.name} is a GRU with {key} = {config.get(key)!r} (the grouped GRU runs "
                         f"{key} = {expected!r})")
    if layer.input.shape.rank != 3 or None in layer.input.shape[1:]:
        refuse_model(f"layer {layer.name} is a GRU over a sequence of unknown length")


def _l2_factor(layer) -> float:
    regularizer = layer.kernel_regularizer
    if regularizer is None:
        return 0.0
    if type(regularizer) is not tf.keras.regularizers.L2:
        refuse_model(f"layer {layer.name} has a {type(regularizer).__name__} regularizer (only L2 runs)")
    return float(regularizer.l2)


def _single_loss(model):
    losses = getattr(model, "_loss_fns", [])
    if len(losses) != 1:
        refuse_model("the model has several losses")
    loss = losses[0]
    if callable(getattr(loss, "masked_parts", None)):  # a masked mean loss (module docstring)
        return loss
    reduction = getattr(loss, "reduction", None)
    if not isinstance(loss, LossFunctionWrapper) or reduction not in ("auto", "sum_over_batch_size"):
        refuse_model(f"loss {type(loss).__name__} is not a per-example Keras loss averaged over the batch")
    return loss


def refuse_model(what: str):
    raise UserError(f"{ENGINE_KEY} = 'grouped' runs Keras chains of Dense layers and models carrying their stacked form only: {what}; use {ENGINE_KEY} = 'tff'")
