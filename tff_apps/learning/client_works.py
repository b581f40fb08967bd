"""Client works: `client_work` picks TFF's model-delta work (FedAvg) or FedProx's.

FedProx (Li et al., MLSys 2020) is built here, with the proximal gradient's sign right.

TFF 0.87's `proximal_client_work` adds `mu * (w0 - w)` to each gradient, the negative
of the gradient of (mu/2)||w - w0||^2, so its "FedProx" pushes clients AWAY from the
server model (tests/tff_apps/learning/test_factory.py replays it). This is the same client
work as TFF's, built from the same parts, with `mu * (w - w0)`.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning import loop_builder, tensor_utils
from tensorflow_federated.python.learning.templates import client_works

from tff_apps.config import TrainSection
from tff_apps.learning.optimizers import ModelFn, client_optimizer, is_weighted


def build_fedprox_client_work(
    model_fn, optimizer, weighting: tff.learning.ClientWeighting, proximal_strength: float
) -> client_works.ClientWorkProcess:
    """Local SGD on loss + (mu/2)||w - w0||^2; reports the update w0 - w and its weight."""
    with tf.Graph().as_default():  # a throwaway model, only to read types and metric finalizers
        model = model_fn()
        aggregate_metrics = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))
    weights_type = tff.learning.models.weights_type_from_model(model)

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update(initial_weights, dataset):
        model = model_fn()

        # tf.function orders the variable reads after the training loop (automatic control
        # dependencies), which a plain graph would not.
        @tf.function
        def train(weights, data):
            return _proximal_local_training(model, optimizer, weighting, proximal_strength, weights, data)

        return train(initial_weights, dataset)

    def measure(outputs):
        results, model_outputs = outputs
        return results, tff.federated_zip(collections.OrderedDict(train=aggregate_metrics(model_outputs)))

    return stateless_client_work(client_update, weights_type, data_type, measure)


def stateless_client_work(client_update, weights_type, data_type, measure) -> client_works.ClientWorkProcess:
    """The ClientWorkProcess around a per-client TF computation `client_update(weights, data)`:
    no state; `measure(federated outputs) -> (client results, server measurements)`."""

    @tff.federated_computation
    def initialize():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        initialize.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(state, weights, client_data):
        results, measurements = measure(tff.federated_map(client_update, (weights, client_data)))
        return tff.templates.MeasuredProcessOutput(state, results, measurements)

    return client_works.ClientWorkProcess(initialize, next_fn)


def _proximal_local_training(model, optimizer, weighting, proximal_strength, initial_weights, dataset):
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda variable, value: variable.assign(value), weights, initial_weights)
    trainable = tuple(tf.nest.flatten(weights.trainable))
    anchor = tuple(tf.nest.flatten(initial_weights.trainable))

    def train_on_batch(state, batch):
        num_examples, optimizer_state = state
        with tf.GradientTape() as tape:
            output = model.forward_pass(batch, training=True)
        gradients = tape.gradient(output.loss, trainable)
        gradients = tuple(
            g + proximal_strength * (w - w0) for g, w, w0 in zip(gradients, trainable, anchor)
        )
        optimizer_state, updated = optimizer.next(optimizer_state, trainable, gradients)
        for variable, value in zip(trainable, updated):
            variable.assign(value)
        return num_examples + tf.cast(output.num_examples, tf.int64), optimizer_state

    def initial_state():
        specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
        return tf.zeros([], tf.int64), optimizer.initialize(specs)

    reduce = loop_builder.build_training_loop(loop_builder.LoopImplementation.DATASET_REDUCE)
    num_examples, _ = reduce(train_on_batch, dataset, initial_state)
    update = tf.nest.map_structure(tf.subtract, initial_weights.trainable, weights.trainable)
    update, has_non_finite = tensor_utils.zero_all_if_any_non_finite(update)
    if weighting == tff.learning.ClientWeighting.NUM_EXAMPLES:
        weight = tf.cast(num_examples, tf.float32)
    else:
        weight = tf.constant(1.0, tf.float32)
    weight = tf.where(has_non_finite > 0, 0.0, weight)  # a diverged client is left out
    return (
        client_works.ClientResult(update=update, update_weight=weight),
        model.report_local_unfinalized_metrics(),
    )


def client_work(train: TrainSection, model_fn: ModelFn):
    weighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES
        if is_weighted(train)
        else tff.learning.ClientWeighting.UNIFORM
    )
    if train.algorithm == "fedprox":
        # Not TFF's proximal_client_work: its proximal term has the wrong sign (client_works.py).
        return build_fedprox_client_work(
            model_fn, client_optimizer(train), weighting, float(train.proximal_strength)
        )
    return tff.learning.templates.build_model_delta_client_work(
        model_fn, client_optimizer(train), weighting
    )
