"""[robustness]: coordinate-wise median and trimmed mean of the clients' updates, bad clients
(scaled updates, flipped labels), and the settings that are refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from scipy import stats

from healthcare.model import ModelConfig, tff_model_fn
from shared.errors import UserError
from tff_apps.learning import federation
from tff_apps.learning import factory
from tff_apps.program import round_loop
from tff_apps.learning import client_data
from tff_apps.config import TrainSection
from tff_apps.learning.federation import Federation, RobustnessSection
from tff_apps.program.job import resolve_job, run_job
from tff_apps.learning.client_data import ClientTrainData, client_dataset

D = 3
N = 5
# the stock engine's Python aggregation (split_rounds) is what these tests read into; the grouped
# engine's equivalence to it is tests/tff_apps/learning/test_grouped_robust.py's
TRAIN = TrainSection(algorithm="fedavg", batch_size=8, local_epochs=1, client_learning_rate=0.2, engine="tff")


def synthetic_clients() -> list[ClientTrainData]:
    clients = []
    for i in range(N):
        rng = np.random.default_rng(200 + i)
        n = 8 + 3 * i
        x = (rng.standard_normal((n, D)) + 0.2 * i).astype(np.float32)
        y = (x @ np.array([1.0, -1.0, 0.5]) > 0.1 * i).astype(np.float32).reshape(-1, 1)
        clients.append(ClientTrainData(f"c{i}", x, y))
    return clients


def robust(**section) -> Federation:
    return Federation(robustness=RobustnessSection(**section))


def flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in weights.trainable])


@pytest.fixture(scope="module")
def setup(runtime):
    """Two processes are built (building costs seconds); `variant` copies one with other
    Python-side settings: the same TFF computations, another aggregation or bad-update scale."""
    clients = synthetic_clients()
    names = [c.name for c in clients]
    model_fn = tff_model_fn(ModelConfig(kind="logistic"), D, 0)
    scaled = dict(bad_clients=1, bad_client_mode="scaled_update", bad_update_scale=1.0)
    built = {
        side: factory.build_learning_process(
            TRAIN, model_fn, federation=robust(aggregation=side, **scaled), client_names=names
        )
        for side in ("median", "mean")
    }

    def variant(aggregation: str, scale: float = 1.0, trim_fraction: float = 0.0):
        process = copy.copy(built["median" if aggregation in ("median", "trimmed_mean") else "mean"])
        process.aggregation, process.bad_update_scale, process.trim_fraction = aggregation, scale, trim_fraction
        return process

    data = [client_dataset(c, TRAIN, client_data.round_seed(0, 1, i)) for i, c in enumerate(clients)]
    return clients, names, data, variant


def one_step(process, data, names):
    """(model before, model after one round, the clients' updates as rows, their weights, the
    round's output)."""
    state = process.initialize()
    phase = process.run_client_phase(state, data)
    updates = np.stack([flat_update(u) for u in phase.updates])
    out = round_loop.next_round(process, state, data, names)
    before, after = flat(process.get_model_weights(state)), flat(process.get_model_weights(out.state))
    return before, after, updates, np.asarray(phase.weights, np.float64), out


def flat_update(update) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in update])


def test_median_and_trimmed_mean_are_numpys_coordinate_wise_statistics(setup):
    clients, names, data, variant = setup
    before, after, updates, _, out = one_step(variant("median"), data, names)
    assert updates.shape == (N, D + 1) and np.ptp(updates, axis=0).min() > 1e-4  # the clients differ
    # server SGD with learning rate 1: the model moves by minus the aggregated update (TFF's delta)
    np.testing.assert_allclose(before - after, np.median(updates, axis=0), atol=1e-6)
    assert out.metrics["client_work"]["train"]["num_examples"] == sum(len(c.x) for c in clients)

    before, after, updates, _, out = one_step(variant("trimmed_mean", trim_fraction=0.2), data, names)
    np.testing.assert_allclose(before - after, stats.trim_mean(updates, 0.2, axis=0), atol=1e-6)
    assert out.metrics["aggregator"]["trimmed_per_side"] == 1
    assert not np.allclose(stats.trim_mean(updates, 0.2, axis=0), updates.mean(axis=0), atol=1e-4)


def test_one_huge_scaled_update_moves_fedavg_far_and_the_median_barely(setup):
    clients, names, data, variant = setup
    before, clean_after, updates, weights, out = one_step(variant("mean"), data, names)
    # the job's TFF aggregator (weighted mean) on the per-client values: FedAvg's step
    assert np.array_equal(weights, [len(c.x) for c in clients])  # one local epoch: examples seen
    np.testing.assert_allclose(before - clean_after, weights @ updates / weights.sum(), atol=1e-6)
    assert round_loop.train_metrics(out.metrics)["train_loss"] > 0
    step = np.linalg.norm(clean_after - before)

    _, after, _, _, out = one_step(variant("mean", scale=-1000.0), data, names)
    assert out.metrics["robustness"]["bad_clients_in_round"] == 1
    scaled = updates.copy()
    scaled[0] *= -1000.0  # the TFF aggregator saw c0's scaled update
    np.testing.assert_allclose(before - after, weights @ scaled / weights.sum(), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(after - clean_after) > 20 * step  # c0 has 8 of 70 examples: ~114 x its update

    _, median_after, _, _, out = one_step(variant("median", scale=-1000.0), data, names)
    assert out.metrics["robustness"]["bad_clients_in_round"] == 1
    # the median's step stays inside the range of the four good clients' updates, per coordinate
    good = updates[1:]
    median_step = before - median_after
    assert np.all((median_step >= good.min(axis=0) - 1e-6) & (median_step <= good.max(axis=0) + 1e-6))
    assert np.linalg.norm(median_after - clean_after) < step


def test_label_flip_flips_exactly_the_bad_clients_training_labels():
    from healthcare.app import flip_diagnosis
    from traffic.app import mirror_speeds

    clients = synthetic_clients()
    flipped = federation.flip_bad_labels(robust(bad_clients=2), clients, flip_diagnosis)
    assert federation.bad_client_names(robust(bad_clients=2), [c.name for c in clients]) == ["c0", "c1"]
    for i, (before, after) in enumerate(zip(clients, flipped)):
        np.testing.assert_array_equal(after.x, before.x)
        np.testing.assert_array_equal(after.y, 1 - before.y if i < 2 else before.y)
    assert federation.flip_bad_labels(robust(bad_clients=2, bad_client_mode="scaled_update"), clients, flip_diagnosis) is clients
    z = np.array([[0.5, np.nan, -1.25]], np.float32)
    np.testing.assert_array_equal(mirror_speeds(z), [[-0.5, np.nan, 1.25]])


REFUSALS = [
    (["robustness.aggregation=median", "privacy.level=client"], "robustness.aggregation"),
    (["robustness.aggregation=trimmed_mean", "privacy.secure_aggregation=masked"], "privacy.secure_aggregation"),
    (["robustness.aggregation=median", "communication.compression=quantize"], "communication.compression"),
    (["robustness.aggregation=trimmed_mean", "robustness.trim_fraction=0.1"], "robustness.trim_fraction"),
    (["robustness.aggregation=trimmed_mean", "robustness.trim_fraction=0.3", "train.clients_per_round=3"], "floor(0.3 x 3) = 0"),
    (["robustness.bad_clients=5"], "robustness.bad_clients = 5: this job has 5 clients"),
    (["robustness.bad_clients=1", "robustness.bad_client_mode=scaled_update", "privacy.secure_aggregation=simulated"], "scaled_update"),
]


@pytest.mark.parametrize("overrides, named", REFUSALS)
def test_settings_that_cannot_run_are_refused_in_one_line(overrides, named):
    _, cfg = resolve_job("healthcare", None, overrides)
    rows = {f"hospital_{i}": 50 for i in range(5)}
    with pytest.raises(UserError) as refused:
        federation.check(cfg, rows)
    message = str(refused.value)
    assert named in message and len(message.splitlines()) == 1


def test_allowed_settings_pass_the_check():
    for overrides in (
        ["robustness.aggregation=trimmed_mean", "robustness.trim_fraction=0.2"],
        ["robustness.bad_clients=4", "robustness.bad_client_mode=label_flip", "privacy.level=client"],
        ["robustness.aggregation=median", "robustness.bad_clients=1", "robustness.bad_client_mode=scaled_update"],
    ):
        _, cfg = resolve_job("healthcare", None, overrides)
        federation.check(cfg, {f"hospital_{i}": 50 for i in range(5)})


FAST = [
    "evaluate.centralized_baseline=false",
    "evaluate.local_baseline=false",
    "export.enabled=false",
    "train.checkpoint_every=0",
    "train.rounds=2",
]


def test_a_healthcare_job_with_a_label_flipped_hospital_under_the_median(tmp_path, monkeypatch, runtime):
    """The app flips the first hospital's training labels only, runs the median, and names both."""
    seen = {}
    original = round_loop.run_rounds

    def capture(process, clients, *args, **kwargs):
        seen["process"], seen["clients"] = process, clients
        return original(process, clients, *args, **kwargs)

    monkeypatch.setattr(round_loop, "run_rounds", capture)
    overrides = [*FAST, f'job.runs_dir="{tmp_path}"', "robustness.aggregation=median", "robustness.bad_clients=1"]
    app, cfg = resolve_job("healthcare", None, overrides)
    prepared = app.prepare(cfg)
    _, summary = run_job(app, cfg.replace("job", run_id="flip"))
    assert summary["status"] == "succeeded"
    first = prepared.trains[0]
    assert summary["robustness"] == {
        "aggregation": "median", "bad_clients": [first.name], "bad_client_mode": "label_flip",
    }
    assert factory.engine_of(seen["process"]) == "grouped"  # train.engine = "auto" runs the median grouped
    labels = [c.y.ravel() for c in seen["clients"]]
    np.testing.assert_array_equal(labels[0], 1 - first.labels)
    for client, train in zip(seen["clients"][1:], prepared.trains[1:]):
        np.testing.assert_array_equal(client.y.ravel(), train.labels)
    run_dir = tmp_path / "healthcare" / "flip"
    line = f"Robust aggregation: median; bad clients (label_flip): {first.name}"
    assert line in (run_dir / "report.md").read_text()
    assert line in (run_dir / "report.html").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["robustness"]["bad_clients"] == [first.name]
