"""The graph forecasters (gcn_gru, dcrnn): weights independent of a district's size, padding
that changes nothing, edges that carry (and cut edges that do not carry) a neighbour's
history, and a graph job through TFF end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli import tff_apps_in_process
from traffic.model import ModelConfig, build_keras_model
from traffic.windows import N_FEATURES, Windows, graph_examples, sensor_rows

HISTORY = HORIZON = 12


def _district(n_sensors: int, n_windows: int = 3, seed: int = 0) -> Windows:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_windows * n_sensors, HISTORY, N_FEATURES)).astype(np.float32)
    y = rng.normal(size=(n_windows * n_sensors, HORIZON)).astype(np.float32)
    typical = rng.normal(size=(n_windows * n_sensors, HISTORY + HORIZON)).astype(np.float32)
    return Windows(x, y, np.tile(np.arange(n_sensors), n_windows), np.repeat(np.arange(n_windows), n_sensors), typical)


def _chain(n: int) -> np.ndarray:
    """Sensors 0 -> 1 -> ... -> n-1 (each edge from a sensor to the one downstream)."""
    return np.eye(n, k=1) * 0.5


def _model(kind: str, n_nodes: int):
    return build_keras_model(ModelConfig(kind=kind, hidden_units=8), HISTORY, N_FEATURES, HORIZON, seed=0, n_nodes=n_nodes)


def test_examples_pad_a_district_and_come_back_as_sensor_rows():
    windows = _district(3)
    x, y = graph_examples(windows, _chain(3), n_nodes=5)
    width = HISTORY * N_FEATURES + HISTORY + HORIZON  # the window, then the typical speeds
    assert x.shape == (3, 5, width + 5) and y.shape == (3, 5, HORIZON)
    assert np.array_equal(x[1, 2, : HISTORY * N_FEATURES], windows.x[1 * 3 + 2].ravel())  # window 1, sensor 2
    assert np.array_equal(x[1, 2, HISTORY * N_FEATURES : width], windows.typical[1 * 3 + 2])
    assert x[0, 0, width + 1] == 0.5 and not x[:, 3:].any()  # sensor 0's edge; padding empty
    assert np.isnan(y[:, 3:]).all()  # padded sensors: no target, no loss
    assert np.array_equal(sensor_rows(y, 3), windows.y)


@pytest.mark.parametrize("kind", ["gcn_gru", "dcrnn"])
def test_weights_do_not_depend_on_the_sensor_count_and_padding_changes_nothing(kind):
    small, large = _model(kind, 4), _model(kind, 9)
    assert [w.shape for w in small.weights] == [w.shape for w in large.weights]
    large.set_weights(small.get_weights())
    windows = _district(4)
    out_small = small(graph_examples(windows, _chain(4), 4)[0]).numpy()
    out_large = large(graph_examples(windows, _chain(4), 9)[0]).numpy()
    np.testing.assert_allclose(out_large[:, :4], out_small, atol=1e-5)


@pytest.mark.parametrize("kind", ["gcn_gru", "dcrnn"])
def test_a_neighbour_history_reaches_a_sensor_only_along_edges(kind):
    """Changing sensor 1's history moves sensor 0's forecast when 0 -> 1 is an edge, and not
    when the edge was cut (sensor 1 then lies in another district's data)."""
    model = _model(kind, 3)
    windows = _district(3, n_windows=1)
    changed = Windows(windows.x.copy(), windows.y, windows.sensor, windows.target_start, windows.typical)
    changed.x[1, :, 0] += 3.0  # sensor 1's speeds
    linked, cut = _chain(3), np.zeros((3, 3))
    for graph, moves in ((linked, True), (cut, False)):
        before = model(graph_examples(windows, graph, 3)[0]).numpy()[0, 0]
        after = model(graph_examples(changed, graph, 3)[0]).numpy()[0, 0]
        assert (np.abs(after - before).max() > 1e-3) == moves, (graph, np.abs(after - before).max())


@pytest.mark.parametrize("kind", ["gcn_gru", "dcrnn"])
def test_the_two_product_convolution_is_the_sum_over_supports(kind):
    """graph_model.convolve (one product with the concatenated supports) against the textbook
    sum over supports of M_k @ state @ W_k, with W_k the k-th block of the kernel."""
    from traffic.graph_model import DIFFUSION_STEPS, concatenated, convolve, supports

    rng = np.random.default_rng(3)
    graph = np.stack([_chain(5), rng.uniform(size=(5, 5)) * (rng.uniform(size=(5, 5)) < 0.4)]).astype(np.float32)
    mats = [m.numpy() for m in supports(kind, graph)]
    state = rng.normal(size=(2, 5, 4)).astype(np.float32)
    kernel = rng.normal(size=(4, len(mats) * 6)).astype(np.float32)
    expected = sum(m @ state @ kernel[:, 6 * k : 6 * (k + 1)] for k, m in enumerate(mats))
    got = convolve(concatenated([np.asarray(m) for m in mats]), state, kernel, len(mats)).numpy()
    assert len(mats) == (1 if kind == "gcn_gru" else 1 + 2 * DIFFUSION_STEPS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_graph_job_runs_grouped_with_every_baseline_and_personalization(tmp_path: Path):
    job = [
        "--set", "data.n_districts=2", "--set", "data.sensors_per_district=4", "--set", "data.days=7",
        "--set", "train.rounds=2", "--set", "train.local_steps=5", "--set", "train.batch_size=8",
        "--set", "model.kind=gcn_gru", "--set", "model.hidden_units=8", "--set", f"job.runs_dir={tmp_path}",
        "--set", "personalization.epochs=1", "--run-id", "g",
    ]
    result = tff_apps_in_process("run", "traffic", *job)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "traffic" / "g" / "summary.json").read_text())
    assert set(summary["results"]) == {"federated", "persistence", "historical_average", "local_only", "centralized"}
    assert summary["engine"] == "grouped"  # train.engine = "auto": the model's own stacked form
    for report in summary["results"].values():
        assert set(report["districts"]) == {"district_1", "district_2"}
        assert 0 < report["overall"]["mae_60min"] < report["overall"]["rmse_60min"] < 40
    # the serving signature takes one sensor's hour; a graph model is not exported (docs/traffic.md)
    assert "export" not in summary and not (tmp_path / "traffic" / "g" / "export" / "traffic").exists()
    # each sensor's scale stays in its district: the statement lists no speed normalization
    released = [entry["release"] for entry in summary["privacy"]["released_outside_epsilon"]]
    assert "speed_normalization" not in released and "site_counts" in released
    # personalization weighs each sensor's errors by its own std: the global model's
    # personalized MAE ("before") is the federated report's district MAE at 60 min, in mph
    districts = summary["results"]["federated"]["districts"]
    assert set(summary["personalization"]) == set(districts)
    for name, entry in summary["personalization"].items():
        assert entry["before"] == pytest.approx(districts[name]["mae_60min"], rel=1e-4), name
        assert entry["after"] != entry["before"] and 0.5 < entry["after"] < 40


def test_a_graph_model_without_any_edge_is_refused_before_the_run(tmp_path: Path):
    result = tff_apps_in_process(
        "run", "traffic", "--set", "model.kind=dcrnn", "--set", "data.graph_threshold=1.0",
        "--set", f"job.runs_dir={tmp_path}",
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "model.kind = 'dcrnn' needs the sensor graph" in result.stderr and "data.graph_path" in result.stderr
    assert not (tmp_path / "traffic").exists()


def test_each_sensor_gets_its_own_scale_and_forecasts_come_back_in_mph():
    """A graph job scales every sensor by its own training readings (traffic/splits.py): a sensor at
    60 mph and one at 70 mph both become mean 0, std 1; a sensor without two training readings takes
    its district's; `to_mph` turns each test row back with its own sensor's scale."""
    from types import SimpleNamespace

    from traffic.evaluate import DistrictSplit
    from traffic.splits import sensor_normalization

    speeds = np.array([[59.0, 69.0, np.nan], [61.0, 71.0, 50.0], [60.0, 70.0, np.nan], [0.0, 0.0, 0.0]])
    data = SimpleNamespace(districts=[SimpleNamespace(name="d", speeds=speeds)])
    mean, std = sensor_normalization(data, train_end=3)["d"]
    train = speeds[:3]
    np.testing.assert_allclose(mean, [60.0, 70.0, np.nanmean(train)])
    np.testing.assert_allclose(std, [np.sqrt(2 / 3), np.sqrt(2 / 3), np.nanstd(train)])
    test = Windows(np.zeros((3, HISTORY, N_FEATURES)), np.zeros((3, HORIZON)), np.array([1, 0, 2]), np.zeros(3, int))
    split = DistrictSplit("d", test, test, mean, std)
    np.testing.assert_allclose(split.to_mph(np.ones((3, HORIZON)))[:, 0], mean[[1, 0, 2]] + std[[1, 0, 2]])
