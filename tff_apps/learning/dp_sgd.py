"""Record-level DP: DP-SGD (Abadi et al. 2016) as the local training of every client.

Per local step at client k (n_k rows):
1. Poisson sampling, done in the client's round input (`poisson_client_dataset`): every
   record is in the step's batch independently with probability q_k = min(1, b / n_k),
   drawn with numpy from the round's (secret) seed. The batches are padded to one width with a 0/1
   mask, so the TFF computation has static shapes and NO data-dependent control flow:
   an empty batch is a step on noise alone, exactly the mechanism the accountant assumes
   (`dp_events.record_step_event`: PoissonSampled(q_k, Gaussian(z))).
2. Per-example gradients of the per-example data loss (`tape.jacobian`, vectorized by pfor),
   each clipped to L2 norm C (over all trainable tensors together); padding rows and
   non-finite gradients contribute 0.
3. Sum, add N(0, (z*C)^2) to every coordinate, divide by the EXPECTED batch size q_k*n_k
   (not the realized one, which is private), add the gradient of the model's weight
   regularization (data-independent), and step with the client optimizer
   (`tff.learning.optimizers`).

The client reports its model delta with weight 1 (uniform mean at the server: an example
count would leak the data size) and no training metrics (they would not be private).

The DP noise is drawn from TF's unseeded generator, like tensorflow_privacy's queries: it
is the one random choice NOT taken from the job seed, because anyone holding the job
config could otherwise regenerate and subtract it. The Poisson sampling follows the round's
seed, which under DP derives from a secret seed drawn from the OS (`round_loop.sampling_seed`),
so that amplification by sampling holds for anyone holding the job config.

Models whose layers mix examples (batch normalization) have no per-example gradients and
are not supported.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning import loop_builder, tensor_utils
from tensorflow_federated.python.learning.templates import client_works

from tff_apps.privacy import dp_config
from tff_apps.learning.client_works import stateless_client_work
from tff_apps.config import TrainSection
from tff_apps.learning.client_data import ClientTrainData

PerExampleLoss = Callable[[object], tf.Tensor]  # batch -> [B] data losses


# -- the round input: Poisson batches --------------------------------------------------------


def poisson_batches(n_rows: int, q: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each step's batch: every row independently with probability q."""
    if q >= 1.0:
        return [np.arange(n_rows) for _ in range(steps)]
    chosen = rng.random((steps, n_rows)) < q
    return [np.flatnonzero(row) for row in chosen]


@dataclass(frozen=True)
class PoissonRoundSteps:
    """A client's DP-SGD round input as arrays: the element `padded_dataset` slices into steps
    (the grouped engine stacks these without a tf.data pipeline)."""

    element: collections.OrderedDict


def padded_steps(x: np.ndarray, y: np.ndarray, batches: list[np.ndarray], expected_batch_size: float) -> PoissonRoundSteps:
    """One row per step: the batch padded to a common width, its 0/1 mask, and the expected
    batch size that divides the noised sum."""
    steps = len(batches)
    width = max(1, max((len(b) for b in batches), default=0))
    index = np.zeros((steps, width), np.int64)
    mask = np.zeros((steps, width), np.float32)
    for step, rows in enumerate(batches):
        index[step, : len(rows)] = rows
        mask[step, : len(rows)] = 1.0
    return PoissonRoundSteps(collections.OrderedDict(
        batch=collections.OrderedDict(x=x[index].astype(np.float32), y=y[index].astype(np.float32)),
        mask=mask,
        expected_batch_size=np.full(steps, expected_batch_size, np.float32),
    ))


def padded_dataset(
    x: np.ndarray, y: np.ndarray, batches: list[np.ndarray], expected_batch_size: float
) -> tf.data.Dataset:
    """`padded_steps` as a dataset of one element per step (the stock engine's round input)."""
    return tf.data.Dataset.from_tensor_slices(padded_steps(x, y, batches, expected_batch_size).element)


def poisson_round_steps(client: ClientTrainData, train: TrainSection, seed: int) -> PoissonRoundSteps:
    """A client's round input for DP-SGD (the record-level counterpart of
    `client_data.client_round_rows`): `dp_config.record_steps_per_round` Poisson batches."""
    n = len(client.x)
    q = min(1.0, train.batch_size / n)
    steps = dp_config.record_steps_per_round(train, n)
    batches = poisson_batches(n, q, steps, np.random.default_rng(seed))
    return padded_steps(client.x, client.y, batches, q * n)


def poisson_client_dataset(client: ClientTrainData, train: TrainSection, seed: int) -> tf.data.Dataset:
    """`poisson_round_steps` as the stock engine's dataset (the counterpart of `client_data.client_dataset`)."""
    return tf.data.Dataset.from_tensor_slices(poisson_round_steps(client, train, seed).element)


def element_spec(input_spec) -> collections.OrderedDict:
    """The element type of a DP-SGD round input for a model with `input_spec`."""
    return collections.OrderedDict(
        batch=input_spec,
        mask=tf.TensorSpec([None], tf.float32),
        expected_batch_size=tf.TensorSpec([], tf.float32),
    )


# -- per-example loss ------------------------------------------------------------------------


def keras_per_example_loss(model) -> tuple[PerExampleLoss, Callable[[], tf.Tensor]]:
    """(per-example data loss, weight regularization loss) of a model made by
    `tff.learning.models.from_keras_model` with one Keras loss.

    TFF's Keras wrapper does not expose its loss: this reads its `_loss_fns` and
    `_keras_model` (TFF 0.87) and re-creates the loss with reduction NONE. Pass
    `per_example_loss` to `build_dp_sgd_client_work` for other models.
    """
    keras_model = getattr(model, "_keras_model", None)
    loss_fns = getattr(model, "_loss_fns", None)
    if keras_model is None or not loss_fns or len(loss_fns) != 1:
        raise ValueError(
            "DP-SGD needs per-example losses: this model is not a single-loss "
            "tff.learning.models.from_keras_model model; pass per_example_loss"
        )
    loss = loss_fns[0]
    config = dict(loss.get_config(), reduction=tf.keras.losses.Reduction.NONE)
    unreduced = type(loss).from_config(config)

    def per_example(batch):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, Mapping) else batch
        losses = unreduced(y, model.predict_on_batch(x, training=True))
        rank = losses.shape.rank
        return losses if rank == 1 else tf.reduce_mean(losses, axis=list(range(1, rank)))

    def regularization():
        return tf.add_n([tf.zeros([], tf.float32)] + [tf.cast(r, tf.float32) for r in keras_model.losses])

    return per_example, regularization


# -- the client work ---------------------------------------------------------------------------


def build_dp_sgd_client_work(
    model_fn,
    optimizer: tff.learning.optimizers.Optimizer,
    clip_norm: float,
    noise_multiplier: float,
    per_example_loss: Callable[[object], PerExampleLoss] | None = None,
) -> client_works.ClientWorkProcess:
    """A ClientWorkProcess doing DP-SGD on `poisson_client_dataset` inputs.

    `per_example_loss(model)`, if given, returns the function batch -> [B] losses for a
    fresh model (no regularization term then); the default reads Keras models' own loss.
    """
    clip_norm = float(clip_norm)
    noise_multiplier = float(noise_multiplier)
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")
    with tf.Graph().as_default():  # a throwaway model, only to read types
        model = model_fn()
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec(model.input_spec)))
    weights_type = tff.learning.models.weights_type_from_model(model)

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update(initial_weights, dataset):
        model = model_fn()
        if per_example_loss is None:
            loss_fn, regularization = keras_per_example_loss(model)
        else:
            loss_fn, regularization = per_example_loss(model), None

        @tf.function
        def train(weights, data):
            return _dp_sgd_local_training(
                model, loss_fn, regularization, optimizer, clip_norm, noise_multiplier, weights, data
            )

        return train(initial_weights, dataset)

    def measure(results):
        # No training metrics: loss and counts computed on the records would not be private.
        return results, tff.federated_value(
            collections.OrderedDict(train=collections.OrderedDict()), tff.SERVER
        )

    return stateless_client_work(client_update, weights_type, data_type, measure)


def _dp_sgd_local_training(
    model, loss_fn, regularization, optimizer, clip_norm, noise_multiplier, initial_weights, dataset
):
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda variable, value: variable.assign(value), weights, initial_weights)
    trainable = tuple(tf.nest.flatten(weights.trainable))

    def train_on_batch(optimizer_state, element):
        mask = element["mask"]
        with tf.GradientTape() as tape:
            losses = loss_fn(element["batch"])
        jacobians = tape.jacobian(losses, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        clipped_sum = _clipped_sum(jacobians, mask, clip_norm)
        if noise_multiplier > 0:
            clipped_sum = [
                g + tf.random.normal(tf.shape(g), stddev=noise_multiplier * clip_norm, dtype=g.dtype)
                for g in clipped_sum
            ]
        gradients = [g / element["expected_batch_size"] for g in clipped_sum]
        if regularization is not None:
            with tf.GradientTape() as reg_tape:
                penalty = regularization()
            reg_gradients = reg_tape.gradient(
                penalty, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            gradients = [g + r for g, r in zip(gradients, reg_gradients)]
        optimizer_state, updated = optimizer.next(optimizer_state, trainable, tuple(gradients))
        for variable, value in zip(trainable, updated):
            variable.assign(value)
        return optimizer_state

    def initial_state():
        return optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable))

    reduce = loop_builder.build_training_loop(loop_builder.LoopImplementation.DATASET_REDUCE)
    reduce(train_on_batch, dataset, initial_state)
    update = tf.nest.map_structure(tf.subtract, initial_weights.trainable, weights.trainable)
    update, has_non_finite = tensor_utils.zero_all_if_any_non_finite(update)
    weight = tf.where(has_non_finite > 0, 0.0, 1.0)
    return client_works.ClientResult(update=update, update_weight=weight)


def _clipped_sum(jacobians, mask, clip_norm):
    """sum_i mask_i * g_i * min(1, C / ||g_i||), g_i the per-example gradient (all tensors)."""
    flat = [tf.reshape(j, [tf.shape(j)[0], -1]) for j in jacobians]
    squared = tf.add_n([tf.reduce_sum(tf.square(f), axis=1) for f in flat])
    finite = tf.math.is_finite(squared)
    norms = tf.sqrt(tf.where(finite, squared, 0.0))
    scale = tf.minimum(1.0, clip_norm / tf.maximum(norms, 1e-12))
    scale = tf.where(finite, scale, 0.0) * mask
    return [
        tf.tensordot(
            scale, tf.where(tf.reshape(finite, [-1] + [1] * (j.shape.rank - 1)), j, tf.zeros_like(j)), axes=1
        )
        for j in jacobians
    ]


# -- the learning process ----------------------------------------------------------------------


def build_learning_process(
    train: TrainSection,
    model_fn,
    clip_norm: float,
    noise_multiplier: float,
    per_example_loss=None,
    aggregator_factory=None,
) -> tff.learning.templates.LearningProcess:
    """FedAvg with DP-SGD local training, composed from the same four parts as
    `factory.build_learning_process`; the server takes the uniform mean of the updates
    (`aggregator_factory`, weighted form: default the plain uniform mean; the job's
    compression or clip_zero act on updates already noised at the client, post-processing)."""
    from tff_apps.learning import optimizers

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    factory = aggregator_factory or tff.aggregators.as_weighted_aggregator(tff.aggregators.UnweightedMeanFactory())
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        build_dp_sgd_client_work(
            model_fn, optimizers.client_optimizer(train), clip_norm, noise_multiplier, per_example_loss
        ),
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(
            optimizers.server_optimizer(train), weights_type
        ),
    )
