"""Record-level DP-SGD in the grouped engine (`grouped_dp_sgd`) computes what the stock
`dp_sgd` process does.

Both processes run 3 rounds from the same initial model on the same Poisson round inputs
(`dp_sgd.poisson_client_dataset`, one seed per client and round): clients of 3 to 30 rows at
batch size 2 take 2 to 15 steps, and some of their Poisson batches are empty. With noise 0 and
a clip that binds the global models agree to within 1e-5 (client SGD with server momentum,
and client Adam). The noise cannot be matched between two implementations: its standard
deviation is checked against its formula on steps whose batches are empty, where the update
is the noise alone.
"""

from __future__ import annotations

import collections
import dataclasses
import types

import numpy as np
import pytest
import tensorflow as tf

from healthcare.model import ModelConfig, tff_model_fn
from shared.errors import UserError
from tff_apps.config import TrainSection
from tff_apps.learning import client_data, dp_sgd, factory, grouped_data, grouped_dp_sgd
from tff_apps.privacy import dp_config, secure_settings
from tff_apps.privacy.dp_config import PrivacySection
from tests.tff_apps.learning.test_grouped import D, MLP, TOLERANCE, max_difference, synthetic_clients

ROUNDS = 3
CLIENTS = synthetic_clients((5, 9, 14, 3, 30))
TRAIN = TrainSection(batch_size=2, local_epochs=1, client_learning_rate=0.2, server_learning_rate=1.0)
BINDING_CLIP = 0.05


def record_plan(clip: float, noise: float):
    return types.SimpleNamespace(
        level="record", section=PrivacySection(level="record", clip_norm=clip), noise_multiplier=noise
    )


def round_inputs(train: TrainSection, round_number: int) -> list:
    seeds = [client_data.round_seed(0, round_number, i) for i in range(len(CLIENTS))]
    return [dp_sgd.poisson_client_dataset(c, train, seed) for c, seed in zip(CLIENTS, seeds)]


def run_engine(engine: str, train: TrainSection, plan, model: ModelConfig = MLP, **options):
    """(initial trainable weights, final trainable weights, last round's metrics); `options`:
    `factory.build_learning_process`'s secure and federation."""
    train = dataclasses.replace(train, engine=engine)
    process = factory.build_learning_process(train, tff_model_fn(model, D, 0), privacy=plan, **options)
    assert factory.engine_of(process) == ("grouped" if engine == "auto" else engine)
    state = process.initialize()
    initial = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    for round_number in range(1, ROUNDS + 1):
        output = process.next(state, round_inputs(train, round_number))
        state = output.state
    final = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    return initial, final, output.metrics


def empty_batches(train: TrainSection) -> int:
    """Steps of the test's rounds whose Poisson batch is empty (each is a step on noise alone)."""
    stacks = [grouped_dp_sgd.stack_poisson_datasets(round_inputs(train, r)) for r in range(1, ROUNDS + 1)]
    return sum(int(np.sum((g["mask"].sum(axis=2) == 0) & (g["active"] > 0))) for g in stacks)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dp_sgd_with_a_binding_clip_matches_stock(runtime, optimizer):
    """An L2-regularized MLP; client SGD and server momentum, or client Adam."""
    train = dataclasses.replace(TRAIN, server_momentum=0.9)
    if optimizer == "adam":
        train = dataclasses.replace(TRAIN, client_optimizer="adam", client_learning_rate=0.05)
    assert empty_batches(train) > 0
    assert sorted({dp_config.record_steps_per_round(train, len(c.x)) for c in CLIENTS}) == [2, 3, 5, 7, 15]
    plan = record_plan(BINDING_CLIP, 0.0)
    initial, stock, stock_metrics = run_engine("tff", train, plan)
    _, grouped, grouped_metrics = run_engine("grouped", train, plan)
    assert max_difference(stock, initial) > 1e-2  # training did something
    assert max_difference(stock, grouped) <= TOLERANCE
    # the stock process's metrics: no training metrics, the uniform mean's measurements
    assert grouped_metrics["client_work"] == stock_metrics["client_work"] == {"train": collections.OrderedDict()}
    assert grouped_metrics["aggregator"] == stock_metrics["aggregator"]
    assert grouped_metrics.keys() == stock_metrics.keys()
    if optimizer == "sgd":  # the clip binds: without it the model is another
        _, unclipped, _ = run_engine("grouped", train, record_plan(1e6, 0.0))
        assert max_difference(unclipped, grouped) > 1e-2


def test_dp_sgd_noise_has_the_planned_standard_deviation(runtime):
    """Steps on empty batches, no regularization, client SGD, server SGD at rate 1: a client's
    update is lr * (sum over its steps of N(0, (zC)^2)) / E per coordinate, and the model moves
    by the mean of the two clients' updates. The clients take 2 and 6 steps with expected
    batch sizes 2 and 5: a client's steps after its last one add no noise."""
    z, clip, lr = 3.0, 0.5, 0.2
    steps, expected = (2, 6), (2.0, 5.0)
    train = dataclasses.replace(TRAIN, client_learning_rate=lr, engine="grouped")
    model_fn = tff_model_fn(ModelConfig(kind="mlp", hidden_units=512), D, 0)
    client = CLIENTS[0]
    datasets = [
        dp_sgd.padded_dataset(client.x, client.y, [np.array([], np.int64)] * n, e) for n, e in zip(steps, expected)
    ]
    noised = factory.build_learning_process(train, model_fn, privacy=record_plan(clip, z))
    start, first = one_round(noised, datasets)
    _, again = one_round(noised, datasets)
    moved = first - start
    sigma = lr * z * clip * np.sqrt(sum(n / e**2 for n, e in zip(steps, expected))) / len(datasets)
    assert moved.size > 4000 and abs(np.std(moved) / sigma - 1) < 0.05
    assert abs(np.mean(moved)) < 4 * sigma / np.sqrt(moved.size)
    assert abs(np.std(again - first) / (np.sqrt(2) * sigma) - 1) < 0.05  # fresh noise on every call
    # stock without noise does not move the model on empty batches: the move is the noise
    stock = factory.build_learning_process(dataclasses.replace(train, engine="tff"), model_fn, privacy=record_plan(clip, 0))
    stock_start, stock_end = one_round(stock, datasets)
    np.testing.assert_array_equal(stock_start, start)
    np.testing.assert_array_equal(stock_end, start)


def one_round(process, datasets) -> tuple[np.ndarray, np.ndarray]:
    """The trainable weights, flattened, before and after one round from the initial state."""
    state = process.initialize()

    def flat(state):
        return np.concatenate([np.asarray(w).ravel() for w in process.get_model_weights(state).trainable])

    return flat(state), flat(process.next(state, datasets).state)


def secure_spec(mode: str, train: TrainSection):
    """The job's uniform secure sum of mode "simulated" or "masked" for record-level DP."""
    section = PrivacySection(level="record", noise_multiplier=1.0, secure_aggregation=mode, secure_bound=1.0)
    spec = secure_settings.secure_aggregation(section, train, {c.name: len(c.x) for c in CLIENTS})
    assert not spec.weighted  # DP-SGD's mean is uniform
    return spec


@pytest.mark.parametrize("secure, compression, aggregation", [
    ("simulated", "none", "mean"),
    ("masked", "none", "mean"),
    ("none", "hadamard", "mean"),
    ("none", "none", "clip_zero"),
])
def test_dp_sgd_with_the_stock_aggregations_matches_stock(runtime, monkeypatch, secure, compression, aggregation):
    """DP-SGD's updates through the other aggregations the stock record-level process runs: the
    uniform secure sums, the compressed mean (3 bits: a coarse grid) and clip_zero, whose
    adaptive L2 clip binds at this learning rate (checked on both engines' measurements). The
    simulated secure sum's rounds travel with every client a group of its own
    (grouped_data.GROUP_BYTES): each group pads to its own steps and width, and the sum over
    the groups still gives stock's model."""
    from tff_apps.learning.federation import CommunicationSection, Federation, RobustnessSection

    if secure == "simulated":
        monkeypatch.setattr(grouped_data, "GROUP_BYTES", 1)
        assert len(grouped_dp_sgd.poisson_round_groups(round_inputs(TRAIN, 1))) == len(CLIENTS)

    clip_zero = aggregation == "clip_zero"  # larger steps: updates longer than the L2 clip's first bound, 1
    train = dataclasses.replace(TRAIN, client_learning_rate=1.0 if clip_zero else 0.2)
    federation = Federation(
        communication=CommunicationSection(compression=compression, bits=3), robustness=RobustnessSection(aggregation=aggregation)
    )
    options = {"federation": federation}
    if secure != "none":
        options["secure"] = secure_spec(secure, train)
    plan = record_plan(1.0 if clip_zero else BINDING_CLIP, 0.0)
    initial, stock, stock_metrics = run_engine("tff", train, plan, **options)
    _, grouped, grouped_metrics = run_engine("auto", train, plan, **options)  # "auto" picks the grouped engine
    assert max_difference(stock, initial) > 1e-2
    assert max_difference(stock, grouped) <= TOLERANCE
    assert grouped_metrics["client_work"] == stock_metrics["client_work"] == {"train": collections.OrderedDict()}
    if clip_zero:
        for metrics in (stock_metrics, grouped_metrics):
            assert metrics["aggregator"]["zeroing"]["clipped_count"] >= 1
        clip = grouped_metrics["aggregator"]["zeroing"]["clipping_norm"]
        assert clip == pytest.approx(stock_metrics["aggregator"]["zeroing"]["clipping_norm"], rel=1e-6) and clip != 1.0
    if secure == "masked":
        assert grouped_metrics["secure_aggregation"]["secagg_survivors"] == len(CLIENTS)


def test_dp_sgd_refuses_a_masked_mean_loss():
    """Traffic's MAE over the observed targets is no per-example Keras loss (record-level DP is
    healthcare's only: the stock DP-SGD does not run it either)."""
    from traffic.model import ModelConfig as TrafficModel
    from traffic.model import tff_model_fn as traffic_model_fn

    model_fn = traffic_model_fn(TrafficModel(kind="mlp", hidden_units=4), 4, 3, 2, 0)
    train = dataclasses.replace(TRAIN, engine="grouped")
    with pytest.raises(UserError, match="per-example Keras loss only, not a masked mean loss; use train.engine = 'tff'"):
        factory.build_learning_process(train, model_fn, privacy=record_plan(1.0, 1.0))


def test_poisson_inputs_are_stacked_step_by_step_with_the_inactive_steps_marked():
    datasets = round_inputs(TRAIN, 1)
    stacked = grouped_dp_sgd.stack_poisson_datasets(datasets)
    # the same inputs read by iterating (the fallback for datasets that are not tensor slices)
    iterated = grouped_dp_sgd.stack_poisson_datasets([ds.map(lambda e: e) for ds in datasets])
    # and the arrays a job hands the grouped engine (`dp_sgd.poisson_round_steps`, no tf.data)
    seeds = [client_data.round_seed(0, 1, i) for i in range(len(CLIENTS))]
    arrays = grouped_dp_sgd.stack_poisson_datasets(
        [dp_sgd.poisson_round_steps(c, TRAIN, seed) for c, seed in zip(CLIENTS, seeds)]
    )
    assert stacked.keys() == iterated.keys() == arrays.keys() == set(grouped_dp_sgd.POISSON_FIELDS)
    for key in stacked:
        np.testing.assert_array_equal(stacked[key], iterated[key])
        np.testing.assert_array_equal(stacked[key], arrays[key])
    steps = [dp_config.record_steps_per_round(TRAIN, len(c.x)) for c in CLIENTS]
    assert stacked["mask"].shape[:2] == (len(CLIENTS), max(steps))
    np.testing.assert_array_equal(stacked["active"].sum(axis=1), steps)
    for c, dataset in enumerate(datasets):
        for s, element in enumerate(dataset.as_numpy_iterator()):
            width = len(element["mask"])
            np.testing.assert_array_equal(stacked["x"][c, s, :width], element["batch"]["x"])
            np.testing.assert_array_equal(stacked["y"][c, s, :width], element["batch"]["y"])
            np.testing.assert_array_equal(stacked["mask"][c, s, :width], element["mask"])
            assert not stacked["mask"][c, s, width:].any()
            assert stacked["expected_batch_size"][c, s] == element["expected_batch_size"] == pytest.approx(
                min(1.0, TRAIN.batch_size / len(CLIENTS[c].x)) * len(CLIENTS[c].x)
            )
        assert not stacked["active"][c, steps[c]:].any() and not stacked["mask"][c, steps[c]:].any()


def test_check_accepts_record_level_dp_with_the_grouped_engine_and_the_stock_aggregations():
    from healthcare.app import HealthcareApp
    from tff_apps.config import resolve
    from tff_apps.learning import federation

    app = HealthcareApp()
    rows = {f"c{i}": 40 for i in range(5)}
    record = ["train.engine=grouped", "privacy.level=record", "privacy.noise_multiplier=1.0"]
    for override in ([], ["privacy.secure_aggregation=masked"], ["communication.compression=quantize"],
                     ["robustness.aggregation=clip_zero"]):
        federation.check(resolve(app.default_config, app.sections, None, [*record, *override]), rows)  # accepted


def test_clipped_gradient_sums_are_the_clipped_sums_of_each_examples_own_gradient():
    """`grouped_dp_sgd._clipped_gradient_sums` against tf.GradientTape on the Keras model and
    loss of each example alone, clipped and summed by hand (two clients with their own weights,
    a batch of 4: a clip that binds for some examples, one padding row)."""
    from healthcare.model import build_keras_model
    from tff_apps.learning.dense_chain import read_dense_chain

    chain = read_dense_chain(tff_model_fn(MLP, D, 0))
    keras_model = build_keras_model(MLP, D, 0)
    rng = np.random.default_rng(2)
    weights = [tf.constant(rng.normal(size=(2, *w.shape)), tf.float32) for w in keras_model.get_weights()]
    x = tf.constant(rng.normal(size=(2, 4, D)), tf.float32)
    y = tf.constant((rng.random((2, 4, 1)) < 0.5), tf.float32)
    mask = tf.constant([[1, 1, 1, 1], [1, 1, 1, 0]], tf.float32)
    clip = 0.8
    got = grouped_dp_sgd._clipped_gradient_sums(chain, weights, x, y, mask, clip)
    per_example_loss = tf.keras.losses.BinaryCrossentropy(reduction="none")
    clipped = 0
    for c in range(2):
        keras_model.set_weights([w[c].numpy() for w in weights])
        want = [np.zeros(w.shape[1:]) for w in weights]
        for i in range(4):
            with tf.GradientTape() as tape:
                loss = per_example_loss(y[c, i:i + 1], keras_model(x[c, i:i + 1], training=True))
            gradient = [g.numpy() for g in tape.gradient(loss, keras_model.trainable_variables)]
            norm = np.sqrt(sum(np.sum(g**2) for g in gradient))
            clipped += int(norm > clip and mask[c, i] > 0)
            for total, g in zip(want, gradient):
                total += float(mask[c, i]) * min(1.0, clip / norm) * g
        for total, g in zip(want, got):
            np.testing.assert_allclose(g[c], total, rtol=1e-5, atol=1e-6)
    assert 0 < clipped < 7  # the clip binds for some examples, not all
