"""Tests for tff_apps.dp_sgd: DP-SGD as a TFF client work, against independent computations.

Gradients for the replays come from tf.GradientTape on a fresh Keras model (as in
test_processes.py); TFF's own `build_model_delta_client_work` is the plain-SGD reference.
"""

from __future__ import annotations

import collections
import math

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from healthcare.model import ModelConfig, build_keras_model, tff_model_fn
from tff_apps.learning import dp_sgd
from tff_apps.privacy import accounting
from tff_apps.privacy import dp_events
from tff_apps.privacy import dp_config
from tff_apps.config import TrainSection
from tff_apps.learning.client_data import ClientTrainData

D = 3
SEED = 5
LR = 0.1


def make_client(name: str, n: int, seed: int, d: int = D) -> ClientTrainData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    logits = x @ rng.standard_normal(d) + 0.2
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32).reshape(-1, 1)
    return ClientTrainData(name, x, y)


def initial_weights(cfg: ModelConfig, d: int = D) -> tff.learning.models.ModelWeights:
    return tff.learning.models.ModelWeights(
        trainable=build_keras_model(cfg, d, SEED).get_weights(), non_trainable=[]
    )


def flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in weights])


def run_client_work(work, weights, datasets) -> list[np.ndarray]:
    """Each client's reported update (w0 - w_local), flattened."""
    output = work.next(work.initialize(), [weights] * len(datasets), datasets)
    return [flat(result.update) for result in output.result]


def sgd(lr: float = LR) -> tff.learning.optimizers.Optimizer:
    return tff.learning.optimizers.build_sgdm(learning_rate=lr)


def keras_sum_gradient(
    w: np.ndarray, x: np.ndarray, y: np.ndarray, cfg: ModelConfig, d: int = D
) -> np.ndarray:
    """Gradient of the SUM of per-example binary cross-entropies (no regularization)."""
    model = build_keras_model(cfg, d, SEED)
    model.set_weights([w[:d].reshape(d, 1).astype(np.float32), w[d:].astype(np.float32)])
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.BinaryCrossentropy(reduction="sum")(
            tf.constant(y, tf.float32), model(tf.constant(x, tf.float32))
        )
    return np.concatenate(
        [np.ravel(g.numpy().astype(np.float64)) for g in tape.gradient(loss, model.trainable_variables)]
    )


# -- the round input really is Poisson sampled ----------------------------------------------------


def test_poisson_batches_include_each_row_independently_with_probability_q():
    n, q, steps = 40, 0.2, 5000
    batches = dp_sgd.poisson_batches(n, q, steps, np.random.default_rng(0))
    included = np.zeros((steps, n), bool)
    for step, rows in enumerate(batches):
        included[step, rows] = True
    np.testing.assert_allclose(included.mean(axis=0), q, atol=4 * math.sqrt(q * (1 - q) / steps))
    sizes = included.sum(axis=1)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.var() - n * q * (1 - q)) < 0.1 * n * q * (1 - q)  # binomial, not fixed size
    assert (sizes == 0).any() or n * (1 - q) ** n < 1e-3  # empty batches happen and are kept
    pair = np.corrcoef(included[:, 0], included[:, 1])[0, 1]
    assert abs(pair) < 4 / math.sqrt(steps)
    again = dp_sgd.poisson_batches(n, q, steps, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded


def test_poisson_client_dataset_matches_what_is_accounted():
    train = TrainSection(batch_size=16, local_epochs=2)
    client = make_client("a", 100, 1)
    elements = list(dp_sgd.poisson_client_dataset(client, train, seed=3).as_numpy_iterator())
    sampling = dp_config.record_sampling(train, {"a": 100})
    assert len(elements) == sampling.steps_per_round["a"] == 2 * math.ceil(100 / 16)
    for e in elements:
        assert e["expected_batch_size"] == pytest.approx(sampling.q("a") * 100)
        rows = e["batch"]["x"][e["mask"] == 1]
        # every real row is one of the client's rows, each at most once
        matches = [np.flatnonzero((client.x == r).all(axis=1)) for r in rows]
        assert all(len(m) == 1 for m in matches) and len({int(m[0]) for m in matches}) == len(rows)


# -- DP-SGD without noise and clipping is SGD --------------------------------------------------


def test_no_noise_huge_clip_equals_tff_plain_sgd_on_the_same_batches(runtime):
    """q = 1 (batch >= rows): every step uses all rows and the expected batch is the real one.
    With an L2 penalty, to check the (unclipped, unnoised) regularization gradient too."""
    cfg = ModelConfig(kind="logistic", l2=0.05)
    steps = 3
    clients = [make_client("a", 9, 1), make_client("b", 13, 2)]
    weights = initial_weights(cfg)
    model_fn = tff_model_fn(cfg, D, SEED)
    dp = dp_sgd.build_dp_sgd_client_work(model_fn, sgd(), clip_norm=1e6, noise_multiplier=0.0)
    dp_inputs = [
        dp_sgd.padded_dataset(c.x, c.y, [np.arange(len(c.x))] * steps, float(len(c.x))) for c in clients
    ]
    plain = tff.learning.templates.build_model_delta_client_work(
        model_fn, sgd(), tff.learning.ClientWeighting.UNIFORM
    )
    plain_inputs = [
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=c.x, y=c.y))
        .batch(len(c.x))
        .repeat(steps)
        for c in clients
    ]
    got = run_client_work(dp, weights, dp_inputs)
    output = plain.next(plain.initialize(), [weights] * 2, plain_inputs)
    expected = [flat(r.update) for r in output.result]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)
        assert np.linalg.norm(e) > 1e-2


def test_no_noise_poisson_steps_divide_by_the_expected_batch(runtime):
    """q < 1: each step is w -= lr * (sum of the batch's gradients) / (q n); replayed here."""
    cfg = ModelConfig(kind="logistic")
    client = make_client("a", 30, 4)
    train = TrainSection(batch_size=6, local_steps=4, client_learning_rate=LR)
    dataset = dp_sgd.poisson_client_dataset(client, train, seed=11)
    work = dp_sgd.build_dp_sgd_client_work(
        tff_model_fn(cfg, D, SEED), sgd(), clip_norm=1e6, noise_multiplier=0.0
    )
    (got,) = run_client_work(work, initial_weights(cfg), [dataset])
    w0 = flat(initial_weights(cfg).trainable)
    w = w0.copy()
    sizes = []
    for e in dataset.as_numpy_iterator():
        real = e["mask"] == 1
        sizes.append(int(real.sum()))
        if real.any():
            w = w - LR * keras_sum_gradient(w, e["batch"]["x"][real], e["batch"]["y"][real], cfg) / (
                6 / 30 * 30
            )
    assert len(set(sizes)) > 1  # batch sizes really vary
    np.testing.assert_allclose(got, w0 - w, rtol=0, atol=1e-6)


# -- clipping and noise ----------------------------------------------------------------------------


def test_one_outlier_moves_the_update_by_at_most_lr_clip_over_expected_batch(runtime):
    cfg = ModelConfig(kind="logistic")
    client = make_client("a", 8, 6)
    outlier_x = np.full((1, D), 40.0, np.float32)
    outlier_y = np.zeros((1, 1), np.float32)  # confidently wrong at the start: a huge gradient
    x = np.concatenate([client.x, outlier_x])
    y = np.concatenate([client.y, outlier_y])
    expected_batch = 8.0
    without = [np.arange(8)]
    with_outlier = [np.arange(9)]
    weights = initial_weights(cfg)
    for clip, bounded in ((0.5, True), (1e6, False)):
        work = dp_sgd.build_dp_sgd_client_work(
            tff_model_fn(cfg, D, SEED), sgd(), clip_norm=clip, noise_multiplier=0.0
        )
        a, b = run_client_work(
            work,
            weights,
            [
                dp_sgd.padded_dataset(x, y, without, expected_batch),
                dp_sgd.padded_dataset(x, y, with_outlier, expected_batch),
            ],
        )
        influence = np.linalg.norm(a - b)
        bound = LR * clip / expected_batch
        if bounded:
            assert 0.5 * bound < influence <= bound * (1 + 1e-5), (influence, bound)
            # and every update is itself bounded: at most lr * (rows * clip) / expected batch
            assert np.linalg.norm(b) <= LR * 9 * clip / expected_batch * (1 + 1e-5)
        else:
            assert influence > 20 * LR * 0.5 / expected_batch  # unclipped, the outlier dominates


def test_noise_std_is_lr_z_clip_over_expected_batch(runtime):
    """One step at 60 clients on the same data: the spread of the updates is the noise."""
    d = 20
    cfg = ModelConfig(kind="logistic")
    z, clip, expected_batch = 1.5, 0.4, 5.0
    client = make_client("a", 5, 8, d)
    weights = initial_weights(cfg, d)
    model_fn = tff_model_fn(cfg, d, SEED)
    noisy = dp_sgd.build_dp_sgd_client_work(model_fn, sgd(), clip_norm=clip, noise_multiplier=z)
    clean = dp_sgd.build_dp_sgd_client_work(model_fn, sgd(), clip_norm=clip, noise_multiplier=0.0)
    one_step = dp_sgd.padded_dataset(client.x, client.y, [np.arange(5)], expected_batch)
    updates = np.stack(run_client_work(noisy, weights, [one_step] * 60))
    (deterministic,) = run_client_work(clean, weights, [one_step])
    noise = updates - deterministic
    sigma = LR * z * clip / expected_batch
    assert noise.std() == pytest.approx(sigma, rel=0.08)
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.6  # independent draws per client
    # an empty batch is still a step: noise only
    empty = dp_sgd.padded_dataset(client.x, client.y, [np.array([], np.int64)], expected_batch)
    alone = np.stack(run_client_work(noisy, weights, [empty] * 20))
    assert alone.std() == pytest.approx(sigma, rel=0.15)


# -- the learning process and its accounting --------------------------------------------------------


def test_learning_process_round_is_uniform_mean_of_dp_sgd_updates(runtime):
    cfg = ModelConfig(kind="logistic")
    train = TrainSection(algorithm="fedavg", batch_size=4, local_steps=3, client_learning_rate=LR)
    clients = [make_client("a", 12, 1), make_client("b", 30, 2)]
    datasets = [dp_sgd.poisson_client_dataset(c, train, seed=i) for i, c in enumerate(clients)]
    model_fn = tff_model_fn(cfg, D, SEED)
    process = dp_sgd.build_learning_process(train, model_fn, clip_norm=0.3, noise_multiplier=0.0)
    state = process.initialize()
    w0 = flat(process.get_model_weights(state).trainable)
    output = process.next(state, datasets)
    w1 = flat(process.get_model_weights(output.state).trainable)
    work = dp_sgd.build_dp_sgd_client_work(model_fn, sgd(), clip_norm=0.3, noise_multiplier=0.0)
    updates = run_client_work(work, process.get_model_weights(state), datasets)
    np.testing.assert_allclose(w1, w0 - np.mean(updates, axis=0), rtol=0, atol=1e-6)  # weight 1 each
    assert output.metrics["client_work"]["train"] == collections.OrderedDict()  # no unprivate metrics


def test_accounted_event_is_poisson_gaussian_per_step_per_client():
    train = TrainSection(batch_size=16, local_epochs=1, rounds=12)
    rows = {"big": 200, "small": 40}
    sampling = dp_config.record_sampling(train, rows)
    z, delta = 1.2, 1e-5
    spend = dp_events.dp_event(z, sampling, train.rounds)
    expected = {}
    for name, n in rows.items():
        steps = math.ceil(n / 16) * 12
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(16 / n, dp_accounting.GaussianDpEvent(z)), steps
        )
        assert spend[name] == event
        accountant = dp_accounting.rdp.RdpAccountant()
        expected[name] = accountant.compose(event).get_epsilon(delta)
    assert accounting.epsilon(spend, delta) == pytest.approx(max(expected.values()), rel=1e-9)
    assert expected["small"] != pytest.approx(expected["big"], rel=1e-2)  # clients differ
