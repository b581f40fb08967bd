"""The grouped engine runs [robustness] and [communication] as the stock engine does.

Both engines run 3 rounds from the same model on the same clients (test_grouped.py's: 4
clients of 3 to 14 rows, so the median averages the two middle values and last batches are
short; 5 for the trimmed mean, so that it is not the median); the final weights must agree
to within 1e-5 and the training metrics too:
- the coordinate-wise median and trimmed mean (stock: numpy in `split_rounds`);
- clip_zero (TFF's adaptive zeroing and clipping around the mean), with a bad client whose
  update is scaled 1000x so that the zeroing binds, and a learning rate at which the L2 clip
  binds (checked on the stock run's measurements);
- scaled bad updates under the weighted mean;
- compression (quantize, Hadamard, DFT: TFF's encoder and rotations, deterministic rounding
  and the fixed rotation seed, so bit-level agreement up to float summation order).
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from healthcare.model import tff_model_fn
from shared.errors import UserError
from tff_apps.learning import client_data, factory, grouped, grouped_data
from tff_apps.learning.federation import CommunicationSection, Federation, RobustnessSection
from tff_apps.program import round_loop
from tests.tff_apps.learning.test_grouped import CLIENTS, D, MLP, TRAIN, max_difference, synthetic_clients

ROUNDS = 3
TOLERANCE = 1e-5
NAMES = [c.name for c in CLIENTS]
FIVE = synthetic_clients((5, 9, 14, 3, 7))  # a trimmed mean of 5 that is not their median


def run(engine: str, train, federation: Federation, clients=CLIENTS):
    """(initial weights, final weights, last round's train metrics, last round's metrics)."""
    train = dataclasses.replace(train, engine=engine)
    names = [c.name for c in clients]
    process = factory.build_learning_process(
        train, tff_model_fn(MLP, D, 0), federation=federation, client_names=names
    )
    assert factory.engine_of(process) == engine
    state = process.initialize()
    initial = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    for r in range(1, ROUNDS + 1):
        datasets = [client_data.client_dataset(c, train, client_data.round_seed(0, r, i)) for i, c in enumerate(clients)]
        output = round_loop.next_round(process, state, datasets, names)
        state = output.state
    final = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    return initial, final, round_loop.train_metrics(output.metrics), output.metrics


def assert_same_model(federation: Federation, train=TRAIN, clients=CLIENTS):
    """Runs both engines; returns (stock's last metrics, grouped's last metrics, grouped's final weights)."""
    initial, stock, stock_train, stock_metrics = run("tff", train, federation, clients)
    _, fast, fast_train, fast_metrics = run("grouped", train, federation, clients)
    assert max_difference(stock, initial) > 1e-2  # training did something
    assert max_difference(stock, fast) <= TOLERANCE
    assert stock_train.keys() == fast_train.keys()
    for key in stock_train:
        assert fast_train[key] == pytest.approx(stock_train[key], rel=1e-5, abs=1e-6), key
    return stock_metrics, fast_metrics, fast


def robust(**section) -> Federation:
    return Federation(robustness=RobustnessSection(**section))


@pytest.mark.parametrize("aggregation, trim, clients, per_side", [("median", 0.0, CLIENTS, 0), ("trimmed_mean", 0.2, FIVE, 1)])
def test_order_statistics_match_the_stock_python_aggregation(runtime, aggregation, trim, clients, per_side):
    """4 clients: the median is the mean of the two middle values; 5: the trimmed mean drops one per side."""
    stock, fast, _ = assert_same_model(robust(aggregation=aggregation, trim_fraction=trim), clients=clients)
    assert fast["aggregator"]["clients"] == stock["aggregator"]["clients"] == len(clients)
    assert fast["aggregator"]["trimmed_per_side"] == stock["aggregator"]["trimmed_per_side"] == per_side
    assert fast["robustness"] == stock["robustness"]


def test_clip_zero_with_a_scaled_bad_client_matches_stock(runtime):
    """c0's update is scaled 1000x: zeroed by the adaptive zeroing; the others are clipped."""
    train = dataclasses.replace(TRAIN, client_learning_rate=1.0)
    federation = robust(aggregation="clip_zero", bad_clients=1, bad_client_mode="scaled_update", bad_update_scale=1000.0)
    stock, fast, _ = assert_same_model(federation, train)
    for engine in (stock, fast):
        measured = engine["aggregator"]
        assert measured["zeroed_count"] == 1 and measured["zeroing"]["clipped_count"] >= 1
    assert fast["aggregator"]["zeroing_norm"] == pytest.approx(stock["aggregator"]["zeroing_norm"], rel=1e-6)
    clip = fast["aggregator"]["zeroing"]["clipping_norm"]
    assert clip == pytest.approx(stock["aggregator"]["zeroing"]["clipping_norm"], rel=1e-6) and clip != 1.0
    assert fast["robustness"] == stock["robustness"] == {"bad_clients_in_round": 1}


def test_scaled_bad_updates_under_the_weighted_mean_match_stock(runtime):
    federation = robust(bad_clients=2, bad_client_mode="scaled_update", bad_update_scale=-4.0)
    assert_same_model(federation, dataclasses.replace(TRAIN, server_momentum=0.9))


@pytest.mark.parametrize("overrides", [
    ["robustness.bad_clients=1"],  # label_flip: data, flipped before any process (federation.flip_bad_labels)
    ["robustness.bad_clients=1", "robustness.bad_client_mode=scaled_update", "robustness.aggregation=median"],
    ["robustness.aggregation=trimmed_mean", "robustness.trim_fraction=0.2"],
    ["robustness.aggregation=clip_zero", "communication.compression=dft"],
])
def test_the_config_check_lets_the_grouped_engine_run_robustness_and_compression(overrides):
    from tff_apps.config import resolve
    from healthcare.app import HealthcareApp
    from tff_apps.learning import federation

    app = HealthcareApp()
    cfg = resolve(app.default_config, app.sections, None, ["train.engine=grouped", *overrides])
    federation.check(cfg, {f"c{i}": 40 for i in range(5)})


@pytest.mark.parametrize(
    "mode, algorithm, aggregation",
    [("quantize", "fedavg", "mean"), ("hadamard", "fedprox", "clip_zero"), ("dft", "fedavg_unweighted", "mean")],
)
def test_compression_matches_stock(runtime, mode, algorithm, aggregation):
    """3 bits: a coarse grid, so a wrong level, scale or rotation would show (Hadamard inside clip_zero)."""
    federation = Federation(
        communication=CommunicationSection(compression=mode, bits=3), robustness=RobustnessSection(aggregation=aggregation)
    )
    train = dataclasses.replace(TRAIN, algorithm=algorithm, proximal_strength=0.5)
    _, _, packed = assert_same_model(federation, train)
    if mode == "quantize":  # once: the quantization does change the model
        _, plain, _, _ = run("grouped", train, Federation())
        assert max_difference(plain, packed) > 1e-4


def test_median_over_two_groups_equals_one_group(runtime):
    """With --workers each worker's group writes its clients at their places in the round."""
    train = dataclasses.replace(TRAIN, engine="grouped")
    process = factory.build_learning_process(train, tff_model_fn(MLP, D, 0), federation=robust(aggregation="median"))
    state = process.initialize()
    datasets = [client_data.client_dataset(c, train, i) for i, c in enumerate(CLIENTS)]
    whole = process.next_group(state, grouped_data.stack_datasets(datasets))
    halves = process.next_groups(state, [grouped_data.stack_datasets(datasets[:1]), grouped_data.stack_datasets(datasets[1:])])
    assert halves.metrics["aggregator"]["clients"] == len(CLIENTS)
    # the same median; a group of 1 and one of 3 train with other matmul shapes (float rounding)
    weights = [process.get_model_weights(output.state).trainable for output in (whole, halves)]
    assert max_difference(*weights) <= 1e-7


def test_scaled_bad_updates_need_the_client_names(runtime):
    federation = robust(bad_clients=1, bad_client_mode="scaled_update")
    with pytest.raises(ValueError, match="client names"):
        grouped.build_grouped_process(dataclasses.replace(TRAIN, engine="grouped"), tff_model_fn(MLP, D, 0), federation=federation)
    with pytest.raises(UserError, match="without DP or secure sums"):
        grouped.build_grouped_process(
            TRAIN, tff_model_fn(MLP, D, 0), secure=types.SimpleNamespace(mode="simulated"), federation=robust(aggregation="median"), client_names=NAMES
        )
