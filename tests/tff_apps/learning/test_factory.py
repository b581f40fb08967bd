"""Tests for tff_apps.processes: one round of each algorithm against an independent computation.

The model is healthcare's logistic regression on 3 inputs. Client gradients are
computed here with tf.GradientTape on a Keras model holding the round's starting
weights (and cross-checked with the closed-form logistic-regression gradient); the
local SGD, the client weighting and the server optimizers are then replayed in numpy.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from healthcare.model import ModelConfig, build_keras_model, tff_model_fn
from tff_apps.learning import factory
from tff_apps.config import TrainSection
from tff_apps.learning.client_data import ClientTrainData, client_dataset

D = 3
SEED = 3
MODEL = ModelConfig(kind="logistic")
CLIENT_LR = 0.1
# Each client gets exactly one batch: batch_size >= rows, one local epoch.
ONE_BATCH = TrainSection(
    algorithm="fedavg",
    batch_size=32,
    local_epochs=1,
    client_learning_rate=CLIENT_LR,
    server_optimizer="sgd",
    server_learning_rate=1.0,
    server_momentum=0.0,
)


def make_client(name: str, n: int, shift: float, seed: int) -> ClientTrainData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)) * np.array([1.0, 2.0, 0.5]) + shift
    logits = x @ np.array([1.0, -1.0, 0.5]) + 0.3
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float64).reshape(-1, 1)
    return ClientTrainData(name, x.astype(np.float32), y.astype(np.float32))


# Different sizes (6 vs 14 rows) and different feature distributions.
SMALL = make_client("small", 6, shift=1.5, seed=1)
LARGE = make_client("large", 14, shift=-0.5, seed=2)
CLIENTS = [SMALL, LARGE]
SIZES = np.array([len(c.x) for c in CLIENTS], np.float64)


def one_batch_datasets(train: TrainSection = ONE_BATCH) -> list[tf.data.Dataset]:
    assert train.batch_size >= max(SIZES) and train.local_epochs == 1
    return [client_dataset(c, train, seed=i) for i, c in enumerate(CLIENTS)]


def ordered_datasets(batch_size: int, epochs: int) -> list[tf.data.Dataset]:
    """Unshuffled, so the batch order is known to the numpy replay."""
    return [
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=c.x, y=c.y)).repeat(epochs).batch(batch_size)
        for c in CLIENTS
    ]


def flat(model_weights) -> np.ndarray:
    """Trainable weights (kernel [D,1], bias [1]) as one float64 vector."""
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in model_weights.trainable])


def keras_gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the batch-mean binary cross-entropy at weights w, by GradientTape.

    A fresh Keras model each time: a model kept across TFF's tracing of model_fn
    (which builds Keras models in graphs) is left in an invalid state.
    """
    model = build_keras_model(MODEL, D, SEED)
    model.set_weights([w[:D].reshape(D, 1).astype(np.float32), w[D:].astype(np.float32)])
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.BinaryCrossentropy()(tf.constant(y, tf.float32), model(tf.constant(x, tf.float32)))
    grads = tape.gradient(loss, model.trainable_variables)
    return np.concatenate([np.ravel(g.numpy().astype(np.float64)) for g in grads])


def closed_form_gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    residual = 1 / (1 + np.exp(-(x @ w[:D] + w[D]))) - y.astype(np.float64).ravel()
    return np.concatenate([x.T @ residual / len(x), [residual.mean()]])


def local_sgd(w0, client: ClientTrainData, batch_size: int, epochs: int, mu: float = 0.0) -> np.ndarray:
    """Plain SGD over the client's batches in order, with FedProx's mu * (w - w0) if mu > 0."""
    w = w0.copy()
    for _ in range(epochs):
        for start in range(0, len(client.x), batch_size):
            xb, yb = client.x[start : start + batch_size], client.y[start : start + batch_size]
            w = w - CLIENT_LR * (keras_gradient(w, xb, yb) + mu * (w - w0))
    return w


def client_updates(w0) -> list[np.ndarray]:
    """Each client's model delta w0 - w_i after one SGD step on its single batch."""
    return [w0 - local_sgd(w0, c, batch_size=len(c.x), epochs=1) for c in CLIENTS]


def weighted_mean(vectors, weights) -> np.ndarray:
    weights = np.asarray(weights, np.float64)
    return np.tensordot(weights / weights.sum(), np.stack(vectors), axes=1)


def build(runtime, **changes):
    train = dataclasses.replace(ONE_BATCH, **changes)
    return factory.build_learning_process(train, tff_model_fn(MODEL, D, SEED))


def run_round(process, datasets, state=None):
    state = process.initialize() if state is None else state
    w_before = flat(process.get_model_weights(state))
    state = process.next(state, datasets).state
    return w_before, flat(process.get_model_weights(state)), state


@pytest.fixture(scope="module")
def fedavg(runtime):
    return build(runtime)


@pytest.fixture(scope="module")
def fedavg_round(fedavg):
    return run_round(fedavg, one_batch_datasets())


# -- the independent computation agrees with itself -----------------------------------------


def test_keras_gradient_equals_closed_form():
    w = np.array([0.3, -0.2, 0.5, 0.1])
    for c in CLIENTS:
        np.testing.assert_allclose(keras_gradient(w, c.x, c.y), closed_form_gradient(w, c.x, c.y), atol=1e-6)


def test_initial_weights_are_the_seeded_keras_model(fedavg_round):
    w0, _, _ = fedavg_round
    expected = np.concatenate([np.ravel(v) for v in build_keras_model(MODEL, D, SEED).get_weights()])
    np.testing.assert_allclose(w0, expected, rtol=0, atol=0)
    assert np.any(w0 != 0)


# -- FedAvg ------------------------------------------------------------------------------------


def test_fedavg_round_is_example_weighted_mean_of_client_sgd_steps(fedavg_round):
    w0, w1, _ = fedavg_round
    client_models = [w0 - u for u in client_updates(w0)]
    expected = weighted_mean(client_models, SIZES)  # server SGD, lr 1: w0 - mean(w0 - w_i)
    np.testing.assert_allclose(w1, expected, rtol=0, atol=1e-5)
    # the check can tell weighted from uniform: the two means are far apart here
    assert np.max(np.abs(expected - weighted_mean(client_models, [1, 1]))) > 1e-3
    assert np.max(np.abs(w1 - w0)) > 1e-2


def test_fedavg_unweighted_round_is_uniform_mean(runtime, fedavg_round):
    process = build(runtime, algorithm="fedavg_unweighted")
    w0, w1, _ = run_round(process, one_batch_datasets())
    client_models = [w0 - u for u in client_updates(w0)]
    np.testing.assert_allclose(w1, weighted_mean(client_models, [1, 1]), rtol=0, atol=1e-5)
    assert np.max(np.abs(w1 - fedavg_round[1])) > 1e-3  # differs from the example-weighted round


# -- FedProx -----------------------------------------------------------------------------------

MU = 1.0
PROX_BATCH, PROX_EPOCHS = 2, 2  # 6 and 14 rows -> 6 and 14 local steps


def test_fedavg_several_local_steps_replays_sgd(fedavg):
    w0, w_avg, _ = run_round(fedavg, ordered_datasets(PROX_BATCH, PROX_EPOCHS))
    expected = weighted_mean([local_sgd(w0, c, PROX_BATCH, PROX_EPOCHS) for c in CLIENTS], SIZES)
    np.testing.assert_allclose(w_avg, expected, rtol=0, atol=1e-5)
    one_step = weighted_mean([local_sgd(w0, c, len(c.x), 1) for c in CLIENTS], SIZES)
    assert np.max(np.abs(w_avg - one_step)) > 1e-2  # the batches really were separate steps


def test_fedprox_replays_proximal_sgd_and_moves_less_than_fedavg(runtime, fedavg):
    fedprox = build(runtime, algorithm="fedprox", proximal_strength=MU, batch_size=PROX_BATCH, local_epochs=PROX_EPOCHS)
    w0, w_prox, _ = run_round(fedprox, ordered_datasets(PROX_BATCH, PROX_EPOCHS))
    _, w_avg, _ = run_round(fedavg, ordered_datasets(PROX_BATCH, PROX_EPOCHS))
    prox_step, avg_step = np.linalg.norm(w_prox - w0), np.linalg.norm(w_avg - w0)
    assert 0 < prox_step < 0.9 * avg_step, (prox_step, avg_step)
    expected = weighted_mean([local_sgd(w0, c, PROX_BATCH, PROX_EPOCHS, mu=MU) for c in CLIENTS], SIZES)
    np.testing.assert_allclose(w_prox, expected, rtol=0, atol=1e-5)


# -- server optimizers -------------------------------------------------------------------------

SERVER_LR = 0.01


def test_server_adam_first_round(runtime):
    process = build(runtime, server_optimizer="adam", server_learning_rate=SERVER_LR)
    w0, w1, _ = run_round(process, one_batch_datasets())
    u = weighted_mean(client_updates(w0), SIZES)
    beta1, beta2, eps = 0.9, 0.999, 1e-7  # build_adam defaults
    m, v = (1 - beta1) * u, (1 - beta2) * u**2
    lr_t = SERVER_LR * np.sqrt(1 - beta2) / (1 - beta1)
    expected = w0 - lr_t * m / (np.sqrt(v) + eps)  # ~ w0 - lr * sign(u) on the first step
    np.testing.assert_allclose(w1, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.abs(w1 - w0), SERVER_LR, rtol=1e-3)


def test_server_yogi_first_round(runtime):
    process = build(runtime, server_optimizer="yogi", server_learning_rate=SERVER_LR)
    w0, w1, _ = run_round(process, one_batch_datasets())
    u = weighted_mean(client_updates(w0), SIZES)
    beta1, beta2, eps, v0 = 0.9, 0.999, 1e-3, 1e-6  # build_yogi defaults
    m = (1 - beta1) * u
    v = v0 + (1 - beta2) * np.sign(u**2 - v0) * u**2
    lr_t = SERVER_LR * np.sqrt(1 - beta2) / (1 - beta1)
    expected = w0 - lr_t * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(w1, expected, rtol=0, atol=1e-5)
    assert np.all(np.abs(w1 - w0) > 5e-4)


def test_server_momentum_accumulates_over_rounds(runtime):
    momentum = 0.9
    process = build(runtime, server_momentum=momentum)
    w0, w1, state = run_round(process, one_batch_datasets())
    u0 = weighted_mean(client_updates(w0), SIZES)
    np.testing.assert_allclose(w1, w0 - u0, rtol=0, atol=1e-5)  # first step: the accumulator was 0
    _, w2, _ = run_round(process, one_batch_datasets(), state)
    u1 = weighted_mean(client_updates(w1), SIZES)
    np.testing.assert_allclose(w2, w1 - (momentum * u0 + u1), rtol=0, atol=1e-5)
    assert np.max(np.abs(w2 - (w1 - u1))) > 1e-3  # plain SGD would land elsewhere
