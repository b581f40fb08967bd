"""The local-only baseline's districts trained side by side equal their one-by-one Keras fits."""

import threading

import numpy as np
import pytest

from tff_apps.config import TrainSection
from traffic.evaluate import KerasBaselines
from traffic.local_fits import batch_order, fit_side_by_side, stackable_chain
from traffic.model import GRAPH_KINDS, ModelConfig, build_keras_model, masked_mae, tff_model_fn
from traffic.windows import N_FEATURES

HISTORY, HORIZON, BATCH = 12, 4, 8
NODES = 3  # the graph models' districts: 3 sensors


def _district(rows: int, seed: int, nodes: int = 0):
    """Windows of one sensor each, or (nodes > 0) of a district's sensors with their typical
    speeds and graph rows (traffic/graph_model.py)."""
    rng = np.random.default_rng(seed)
    if nodes:
        graph = rng.random((rows, nodes, nodes)) * (rng.random((rows, nodes, nodes)) < 0.5)
        x = np.concatenate([rng.normal(size=(rows, nodes, HISTORY * (N_FEATURES + 1) + HORIZON)), graph], axis=-1)
        y = x[:, :, HISTORY * N_FEATURES - N_FEATURES : HISTORY * N_FEATURES - N_FEATURES + 1] * 0.5
        y = y + rng.normal(scale=0.1, size=(rows, nodes, HORIZON))
    else:
        x = rng.normal(size=(rows, HISTORY, N_FEATURES))
        y = x[:, -1, :1] * 0.5 + rng.normal(scale=0.1, size=(rows, HORIZON))
    y[rng.random(y.shape) < 0.25] = np.nan  # missing readings do not count in the loss
    return x.astype(np.float32), y.astype(np.float32)


def _keras_fit(model_cfg, train, x, y, steps, seed, nodes):
    import tensorflow as tf

    optimizer = tf.keras.optimizers.Adam if train.client_optimizer == "adam" else tf.keras.optimizers.SGD
    fitter = KerasBaselines(  # as `baselines.baseline_fitter`: the graph models' steps in XLA
        lambda s: build_keras_model(model_cfg, HISTORY, N_FEATURES, HORIZON, s, nodes), optimizer(train.client_learning_rate),
        masked_mae, bool(nodes),
    )
    return fitter.fit(x, y, batch_order(len(x), steps, BATCH, seed), BATCH, seed).get_weights()


# gcn_gru's stacked form is checked against the stock engine (tests/tff_apps/learning/test_grouped.py)
@pytest.mark.parametrize("kind, optimizer", [("mlp", "adam"), ("gru", "sgd"), ("dcrnn", "adam")])
def test_side_by_side_fits_are_the_one_by_one_keras_fits(kind, optimizer):
    model_cfg = ModelConfig(kind=kind, hidden_units=8)
    nodes = NODES if kind in GRAPH_KINDS else 0
    train = TrainSection(client_optimizer=optimizer, client_learning_rate=0.01 if optimizer == "adam" else 0.1)
    build = lambda s: build_keras_model(model_cfg, HISTORY, N_FEATURES, HORIZON, s, nodes)  # noqa: E731
    # a district with fewer rows than a batch's worth of steps repeats them; the second takes fewer steps
    districts = [(*_district(40, 1, nodes), 12, 7), (*_district(25, 2, nodes), 5, 8)]
    chain = stackable_chain(tff_model_fn(model_cfg, HISTORY, N_FEATURES, HORIZON, n_nodes=nodes))
    trained = fit_side_by_side(train, chain, build, districts, BATCH)
    for (x, y, steps, seed), weights in zip(districts, trained):
        expected = _keras_fit(model_cfg, train, x, y, steps, seed, nodes)
        start = build(seed).get_weights()
        assert max(np.abs(a - b).max() for a, b in zip(start, expected)) > 1e-3  # the fit moved the weights
        assert max(np.abs(a - b).max() for a, b in zip(weights, expected)) < 1e-5


def test_a_set_stop_ends_the_fits():
    from tff_apps.program.alongside import Cancelled

    train = TrainSection(client_optimizer="adam", client_learning_rate=0.01)
    mlp = ModelConfig(kind="mlp", hidden_units=4)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        fit_side_by_side(
            train, stackable_chain(tff_model_fn(mlp, HISTORY, N_FEATURES, HORIZON)),
            lambda s: build_keras_model(mlp, HISTORY, N_FEATURES, HORIZON, s), [(*_district(20, 3), 4, 0)], BATCH, stop,
        )


def test_batch_order_takes_whole_shuffled_passes():
    order = batch_order(10, 7, 4, seed=3)  # 28 rows: two passes and 8 of a third
    assert len(order) == 28
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert len(set(order[20:])) == 8
    np.testing.assert_array_equal(order, batch_order(10, 7, 4, seed=3))


def test_the_first_evaluation_needs_no_model_built_by_the_baselines(tmp_path, monkeypatch):
    """Keras swaps its model classes' base classes, for every thread, to the mode of the latest
    model built; the job builds its eager global model after every graph-mode build (TFF's
    tracing, `stackable_chain`), so its evaluations work even while the baselines' thread has
    built nothing (here it waits for the rounds to end). Reading the chain after the global
    model failed round 1's evaluation: "Your Layer or Model is in an invalid state"."""
    from tff_apps.program import round_loop
    from tff_apps.program.job import resolve_job, run_job
    from traffic import app as traffic_app

    rounds_done = threading.Event()
    baselines, rounds = traffic_app.run_baselines, round_loop.run_rounds

    def after_the_rounds(*args, **kwargs):
        rounds_done.wait(300)
        return baselines(*args, **kwargs)

    def rounds_then_signal(*args, **kwargs):
        try:
            return rounds(*args, **kwargs)
        finally:
            rounds_done.set()

    monkeypatch.setattr(traffic_app, "run_baselines", after_the_rounds)
    monkeypatch.setattr(round_loop, "run_rounds", rounds_then_signal)
    job = ["data.n_districts=2", "data.sensors_per_district=2", "data.days=7", "train.rounds=2",
           "train.local_steps=5", "train.eval_every=1", "export.enabled=false", f'job.runs_dir="{tmp_path}"']
    app, cfg = resolve_job("traffic", None, job)
    _, summary = run_job(app, cfg.replace("job", run_id="first_evaluation"))
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["results"]["local_only"]["overall"]["mae_60min"] > 0
