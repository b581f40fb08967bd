"""The grouped engine (`train.engine = "grouped"`) computes what the stock TFF process does.

Both processes run 3 rounds from the same initial model on the same client datasets
(seeded shuffles, clients of different sizes so that last batches are short and clients
take different numbers of steps); the global models must agree to within 1e-5, and the
training metrics too: weighted FedAvg with an L2-regularized MLP and server momentum;
client-level DP (uniform mean, client Adam) with a clip that binds (noise 0: noise cannot
be matched between two implementations; its standard deviation is checked separately); the
secure-sum "simulated" weighted mean with a bound that clips (FedProx clients).
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
from tff_apps.learning import dense_chain, grouped_data
from tff_apps.privacy import secure_settings
from tff_apps.learning import factory
from tff_apps.learning import client_data
from tff_apps.program import round_loop
from tff_apps.config import TrainSection
from tff_apps.privacy.dp_config import PrivacySection

D = 6
ROUNDS = 3
TOLERANCE = 1e-5
MLP = ModelConfig(kind="mlp", hidden_units=8, l2=0.01)
TRAIN = TrainSection(batch_size=4, local_epochs=2, client_learning_rate=0.2, server_learning_rate=1.0)


def synthetic_clients(sizes=(5, 9, 14, 3)) -> list[client_data.ClientTrainData]:
    rng = np.random.default_rng(7)
    clients = []
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, D)) + 0.4 * i
        logits = x @ np.linspace(-1.0, 1.0, D) + 0.2
        y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32).reshape(-1, 1)
        clients.append(client_data.ClientTrainData(f"c{i}", x.astype(np.float32), y))
    return clients


CLIENTS = synthetic_clients()


def run_rounds(process, train: TrainSection, rounds: int = ROUNDS):
    """(initial trainable weights, final trainable weights, last round's train metrics, all its metrics)."""
    state = process.initialize()
    initial = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    for round_number in range(1, rounds + 1):
        datasets = [client_data.client_dataset(c, train, client_data.round_seed(0, round_number, i)) for i, c in enumerate(CLIENTS)]
        output = process.next(state, datasets)
        state = output.state
    weights = process.get_model_weights(state)
    return initial, [np.asarray(w) for w in weights.trainable], round_loop.train_metrics(output.metrics), output.metrics


def run_engine(engine: str, train: TrainSection, model: ModelConfig = MLP, **kwargs):
    train = dataclasses.replace(train, engine=engine)
    return run_rounds(factory.build_learning_process(train, tff_model_fn(model, D, 0), **kwargs), train)


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def assert_same_model(train: TrainSection, model: ModelConfig = MLP, **kwargs):
    """Runs both engines; returns the grouped engine's final weights and the stock process's
    last round's metrics."""
    initial, stock_weights, stock_metrics, stock_all = run_engine("tff", train, model, **kwargs)
    _, fast_weights, fast_metrics, _ = run_engine("grouped", train, model, **kwargs)
    assert max_difference(stock_weights, initial) > 1e-2  # training did something
    assert max_difference(stock_weights, fast_weights) <= TOLERANCE
    assert stock_metrics.keys() == fast_metrics.keys()
    for key in stock_metrics:
        assert fast_metrics[key] == pytest.approx(stock_metrics[key], rel=1e-5, abs=1e-6), key
    return fast_weights, stock_all


def test_weighted_fedavg_in_groups_of_one_client_matches_stock(runtime, monkeypatch):
    """An L2-regularized MLP, client SGD, server momentum; clients of 3 to 14 rows. Large
    rounds travel in groups of at most GROUP_BYTES (grouped_data.round_groups): here every
    client is a group of its own, and the sums over groups still give stock's model (the
    other tests run their rounds as one group)."""
    monkeypatch.setattr(grouped_data, "GROUP_BYTES", 1)
    datasets = [client_data.client_dataset(c, TRAIN, i) for i, c in enumerate(CLIENTS)]
    assert [len(g["mask"]) for g in grouped_data.round_groups(datasets)] == [1] * len(CLIENTS)
    assert_same_model(dataclasses.replace(TRAIN, server_momentum=0.9))


def test_round_groups_keep_the_clients_order_within_the_size_and_one_slice_per_worker():
    rng = np.random.default_rng(1)
    rows = [12, 5, 30, 7, 7, 19, 2]
    datasets = [
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
            x=rng.normal(size=(n, 3)).astype(np.float32), y=rng.normal(size=(n, 1)).astype(np.float32)
        )).batch(4) for n in rows
    ]
    whole = grouped_data.stack_datasets(datasets)
    client_bytes = sum(a[0].nbytes for a in whole.values()) + 4  # the longest client's, padded, and its scale
    scale = np.arange(len(rows), dtype=np.float32)
    # (workers, limit in longest clients, groups): a worker's slice pads to its own longest
    # client, so 3 workers' slices [12 5] [30 7 7] [19 2] rows (4 a batch) take 1 + 3 + 2 groups
    for workers, max_clients, expected_groups in ((1, 2, 4), (1, 7, 1), (3, 1, 6), (2, 3, 3)):
        limit = client_bytes * max_clients
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(grouped_data, "GROUP_BYTES", limit)
            groups = grouped_data.round_groups(datasets, workers, scale)
        assert len(groups) == expected_groups and sum(len(g["mask"]) for g in groups) == len(rows)
        assert all(sum(a.nbytes for a in g.values()) <= limit for g in groups)
        np.testing.assert_array_equal(np.concatenate([g["scale"] for g in groups]), scale)
        # each group pads to its own longest client; the real rows come out in client order
        real = np.concatenate([g["x"][g["mask"] > 0] for g in groups])
        np.testing.assert_array_equal(real, whole["x"][whole["mask"] > 0])


def dp_plan(clip: float, noise: float, clipping: str = "fixed"):
    section = PrivacySection(level="client", clipping=clipping, clip_norm=clip)
    return types.SimpleNamespace(
        level="client", section=section, noise_multiplier=noise, sampling=types.SimpleNamespace(participants=len(CLIENTS))
    )


def test_client_level_dp_with_a_binding_clip_matches_stock(runtime):
    """Uniform weighting (the DP mean's), client Adam, server Yogi."""
    train = dataclasses.replace(TRAIN, client_optimizer="adam", client_learning_rate=0.05, server_optimizer="yogi",
                                server_learning_rate=0.05)
    clipped, _ = assert_same_model(train, privacy=dp_plan(clip=0.05, noise=0.0))
    _, unclipped, _, _ = run_engine("grouped", train, privacy=dp_plan(clip=1e6, noise=0.0))
    assert max_difference(unclipped, clipped) > 1e-2  # the clip binds


def test_adaptive_clipping_matches_stock_and_moves_the_clip(runtime):
    """TFF's quantile estimator (Andrew et al.), run by both engines from one DP query: the
    same clip every round, so the same model (noise 0: the clipped count's noise too); server Adam."""
    train = dataclasses.replace(TRAIN, client_optimizer="adam", client_learning_rate=0.05, server_optimizer="adam",
                                server_learning_rate=0.01)
    plan = dp_plan(clip=0.05, noise=0.0, clipping="adaptive")
    _, stock_metrics = assert_same_model(train, privacy=plan)
    _, _, _, grouped_metrics = run_engine("grouped", train, privacy=plan)
    stock_clip = stock_metrics["aggregator"]["dp_query_metrics"]["clip"]
    assert grouped_metrics["aggregator"]["dp_query_metrics"]["clip"] == pytest.approx(stock_clip, rel=1e-6)
    assert stock_clip > 0.05 * 1.05  # every update is above the first clip: the estimate rises


def test_dp_noise_has_the_planned_standard_deviation(runtime):
    clip, noise = 0.05, 2.0
    train = dataclasses.replace(TRAIN, engine="grouped")
    model_fn = tff_model_fn(ModelConfig(kind="mlp", hidden_units=64), D, 0)
    noised, exact = (factory.build_learning_process(train, model_fn, privacy=dp_plan(clip, z)) for z in (noise, 0.0))
    datasets = [client_data.client_dataset(c, train, i) for i, c in enumerate(CLIENTS)]

    def flat(process):  # each from its own state: the DP query's state holds the noise's stddev
        state = process.initialize()
        return np.concatenate([np.asarray(w).ravel() for w in process.next(state, datasets).state.global_model_weights.trainable])

    first, again, without = flat(noised), flat(noised), flat(exact)
    difference = first - without
    # server SGD at rate 1: the weights move by noise / clients_per_round, N(0, (zC/m)^2) per coordinate
    expected = noise * clip / len(CLIENTS)
    assert difference.size > 500 and abs(np.std(difference) / expected - 1) < 0.15
    assert abs(np.mean(difference)) < 4 * expected / np.sqrt(difference.size)
    assert abs(np.std(again - first) / (np.sqrt(2) * expected) - 1) < 0.15  # fresh noise on every call


def test_secure_sum_simulated_with_clipping_bounds_matches_stock(runtime):
    """Weighted mean through SecureSumFactory's clipping and quantization; FedProx clients."""
    train = dataclasses.replace(TRAIN, algorithm="fedprox", proximal_strength=0.5)
    spec = secure_settings.secure_aggregation(
        PrivacySection(secure_aggregation="simulated", secure_bound=0.003), train, {c.name: len(c.x) for c in CLIENTS}
    )
    _, stock_metrics = assert_same_model(train, secure=spec)
    # the bound clips: SecureSumFactory counts the clients with a coordinate above / below it
    value_sum = stock_metrics["aggregator"]["mean_value"]
    assert value_sum["secure_upper_clipped_count"] == value_sum["secure_lower_clipped_count"] == len(CLIENTS)


@pytest.mark.parametrize("algorithm", ["fedprox", "fedavg_unweighted"])
def test_masked_secure_aggregation_matches_stock(runtime, algorithm):
    """Pairwise-masked secure sum (Bonawitz, in Python between the client and server phases):
    weighted (FedProx, weight = examples) and the unweighted mean (weight 1), with a bound that
    clips every client; the protocol ran over every client of the round."""
    train = dataclasses.replace(TRAIN, algorithm=algorithm, proximal_strength=0.5)
    spec = secure_settings.secure_aggregation(
        PrivacySection(secure_aggregation="masked", secure_bound=0.003, secure_scale_bits=20), train,
        {c.name: len(c.x) for c in CLIENTS},
    )
    initial, stock_weights, _, stock = run_engine("tff", train, secure=spec)
    _, fast_weights, _, fast = run_engine("grouped", train, secure=spec)
    assert max_difference(stock_weights, initial) > 1e-3
    assert max_difference(stock_weights, fast_weights) <= TOLERANCE
    # the bound (0.003 per coordinate of w*u / W) clips some coordinate of every client's update
    assert stock["aggregator"]["secure_clipped_count"] == fast["aggregator"]["secure_clipped_count"] == len(CLIENTS)
    assert fast["secure_aggregation"]["secagg_survivors"] == len(CLIENTS)
    assert factory.engine_of(factory.build_learning_process(
        dataclasses.replace(train, engine="auto"), tff_model_fn(MLP, D, 0), secure=spec)) == "grouped"


@pytest.mark.parametrize("kind", ["mlp", "gru", "gcn_gru"])
def test_traffic_forecaster_with_its_masked_loss_matches_stock(runtime, kind):
    """Traffic's MLP (a Flatten, then Dense layers), GRU (a Keras GRU over the history, then
    Dense layers) and a graph forecaster (its own stacked form, `graph_model.stacked_forward`;
    dcrnn's is checked against its Keras fits in tests/traffic/test_local_fits.py), and their
    MAE over the observed targets only: a quarter of the targets are missing (NaN), so the
    per-client masked mean matters."""
    from traffic.model import GRAPH_KINDS
    from traffic.model import ModelConfig as TrafficModel
    from traffic.model import tff_model_fn as traffic_model_fn

    rng = np.random.default_rng(3)
    nodes = 3 if kind in GRAPH_KINDS else 0
    clients = []
    for i, n in enumerate((7, 12, 5)):
        if nodes:  # a district: 3 sensors' windows (4 steps x 3 features), typical speeds (4 + 2), graph rows
            graph = rng.random((n, nodes, nodes)) * (rng.random((n, nodes, nodes)) < 0.5)
            x = np.concatenate([rng.standard_normal((n, nodes, 4 * 3 + 4 + 2)), graph], axis=-1).astype(np.float32)
            y = (x[:, :, 9:10] + 0.1 * i + 0.1 * rng.standard_normal((n, nodes, 2))).astype(np.float32)
        else:
            x = rng.standard_normal((n, 4, 3)).astype(np.float32)
            y = (x[:, -1, :1] + 0.1 * i + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)
        y[rng.random(y.shape) < 0.25] = np.nan
        clients.append(client_data.ClientTrainData(f"d{i}", x, y))
    train = dataclasses.replace(TRAIN, client_optimizer="adam", client_learning_rate=0.01)
    model_fn = traffic_model_fn(TrafficModel(kind=kind, hidden_units=8), 4, 3, 2, 0, n_nodes=nodes)
    finals = {}
    for engine in ("tff", "grouped"):
        process = factory.build_learning_process(dataclasses.replace(train, engine=engine), model_fn)
        assert factory.engine_of(process) == engine
        state = process.initialize()
        initial = [np.asarray(w) for w in process.get_model_weights(state).trainable]
        for r in range(1, ROUNDS + 1):
            state = process.next(state, [client_data.client_dataset(c, train, r * 10 + i) for i, c in enumerate(clients)]).state
        finals[engine] = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    assert max_difference(finals["tff"], initial) > 1e-2
    assert max_difference(finals["tff"], finals["grouped"]) <= TOLERANCE


def test_auto_engine_falls_back_to_stock_where_grouped_does_not_run(runtime):
    auto = dataclasses.replace(TRAIN, engine="auto")
    assert factory.engine_of(factory.build_learning_process(auto, tff_model_fn(MLP, D, 0))) == "grouped"
    assert factory.engine_of(factory.build_learning_process(auto, reshape_model_fn)) == "tff"
    with pytest.raises(UserError, match="not a Dense layer"):
        factory.build_learning_process(dataclasses.replace(TRAIN, engine="grouped"), reshape_model_fn)


def reshape_model_fn():
    """A model the grouped engine does not stack: a Reshape is no Dense layer."""
    import tensorflow_federated as tff

    inputs = tf.keras.Input(shape=(D,))
    hidden = tf.keras.layers.Reshape((D, 1))(inputs)
    outputs = tf.keras.layers.Dense(1)(tf.keras.layers.Flatten()(hidden))
    return tff.learning.models.from_keras_model(
        tf.keras.Model(inputs, outputs), loss=tf.keras.losses.MeanSquaredError(), input_spec=grouped_input_spec(),
    )


def test_grouped_engine_refuses_what_it_does_not_run():
    import tensorflow_federated as tff

    with pytest.raises(UserError, match="layer .* is a Reshape, not a Dense layer; use train.engine = 'tff'"):
        dense_chain.read_dense_chain(reshape_model_fn)

    def regularized_own_form():  # its stacked form could not add the regularization Keras adds
        inputs = tf.keras.Input(shape=(D,))
        keras_model = tf.keras.Model(inputs, tf.keras.layers.Dense(1, kernel_regularizer="l2")(inputs))
        keras_model.stacked_forward = lambda weights, x: tf.matmul(x, weights[0]) + weights[1][:, None]
        return tff.learning.models.from_keras_model(
            keras_model, loss=tf.keras.losses.MeanSquaredError(), input_spec=grouped_input_spec()
        )

    with pytest.raises(UserError, match="carries its stacked form and has regularization losses"):
        dense_chain.read_dense_chain(regularized_own_form)


@pytest.mark.parametrize(("option", "message"), [
    ({"dropout": 0.1}, "is a GRU with dropout = 0.1"),
    ({"reset_after": False}, "is a GRU with reset_after = False"),
    ({"return_sequences": True}, "is a GRU with return_sequences = True"),
])
def test_a_gru_the_grouped_engine_does_not_compute_is_refused(option, message):
    import collections

    import tensorflow as tf
    import tensorflow_federated as tff

    def gru_model_fn():
        inputs = tf.keras.Input(shape=(4, 3))
        outputs = tf.keras.layers.Dense(1)(tf.keras.layers.GRU(2, **option)(inputs))
        spec = collections.OrderedDict(x=tf.TensorSpec([None, 4, 3], tf.float32), y=tf.TensorSpec([None, 1], tf.float32))
        return tff.learning.models.from_keras_model(tf.keras.Model(inputs, outputs), loss=tf.keras.losses.MeanSquaredError(),
                                                    input_spec=spec)

    with pytest.raises(UserError, match=f"{message} .*use train.engine = 'tff'"):
        dense_chain.read_dense_chain(gru_model_fn)


def grouped_input_spec():
    import collections

    import tensorflow as tf

    return collections.OrderedDict(x=tf.TensorSpec([None, D], tf.float32), y=tf.TensorSpec([None, 1], tf.float32))


def test_stacked_clients_hold_each_batch_in_order_with_a_mask_of_its_rows():
    rng = np.random.default_rng(0)

    def batched(rows: int, batch: int) -> tf.data.Dataset:
        data = collections.OrderedDict(
            x=rng.normal(size=(rows, 3)).astype(np.float32), y=rng.normal(size=(rows, 1)).astype(np.float32)
        )
        return tf.data.Dataset.from_tensor_slices(data).batch(batch)

    # the group's batch size (3) in one copy per client, a smaller one (2) batch by batch
    datasets = [batched(7, 3), batched(5, 2), batched(1, 3), batched(9, 3)]
    stacked = grouped_data.stack_datasets(datasets)
    assert stacked["x"].shape == (4, 3, 3, 3) and stacked["mask"].sum() == 7 + 5 + 1 + 9
    for c, dataset in enumerate(datasets):
        for s, batch in enumerate(dataset.as_numpy_iterator()):
            n = len(batch["x"])
            np.testing.assert_array_equal(stacked["x"][c, s, :n], batch["x"])
            np.testing.assert_array_equal(stacked["y"][c, s, :n], batch["y"])
            assert stacked["mask"][c, s, :n].all() and not stacked["mask"][c, s, n:].any()


@pytest.mark.parametrize("train", [TRAIN, dataclasses.replace(TRAIN, local_steps=4, batch_size=3)])
def test_a_clients_round_rows_stack_as_its_dataset_does(train):
    """The grouped engine's round input (`client_round_rows`, no tf.data) stacks to the very
    group its tf.data dataset (`client_dataset`, the stock engine's) gives."""
    seeds = [client_data.round_seed(0, 1, i) for i in range(len(CLIENTS))]
    rows = [client_data.client_round_rows(c, train, seed) for c, seed in zip(CLIENTS, seeds)]
    datasets = [client_data.client_dataset(c, train, seed) for c, seed in zip(CLIENTS, seeds)]
    from_rows, from_datasets = grouped_data.stack_datasets(rows), grouped_data.stack_datasets(datasets)
    assert from_rows.keys() == from_datasets.keys()
    for key in from_rows:
        np.testing.assert_array_equal(from_rows[key], from_datasets[key])
    assert from_rows["mask"].sum() == sum(len(r.x) for r in rows) > 0
