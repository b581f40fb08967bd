"""The sensor graph in the public formats (DCRNN distance list, T-GCN adjacency, coordinates),
cut at district borders, and METR-LA style .h5 speeds: on small files made in those formats."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.errors import UserError
from traffic import graph
from traffic.data import DataConfig, load, write_generated

SENSORS = ["773869", "767541", "767542", "717447"]


def _metr_la_h5(path: Path, n_steps: int = 300, key: str = "df") -> pd.DataFrame:
    """A METR-LA-like frame: DatetimeIndex every 5 minutes, one column per sensor, 0 = missing."""
    rng = np.random.default_rng(0)
    index = pd.date_range("2012-03-01", periods=n_steps, freq="5min")
    frame = pd.DataFrame(rng.uniform(20, 70, (n_steps, len(SENSORS))), index=index, columns=SENSORS)
    frame.iloc[5, 1] = 0.0
    frame.to_hdf(path, key=key, mode="a")
    return frame


def _metadata(path: Path, districts=("north", "north", "south", "south")) -> None:
    pd.DataFrame({"sensor_id": SENSORS, "district": list(districts)}).to_csv(path, index=False)


def _csv_config(tmp_path: Path, **changes) -> DataConfig:
    given = {"path": str(tmp_path / "metr-la.h5"), "metadata_path": str(tmp_path / "meta.csv"), **changes}
    return DataConfig(source="csv", **given)


def test_distance_list_becomes_dcrnn_thresholded_gaussian_kernel(tmp_path):
    path = tmp_path / "distances.csv"
    # DCRNN's layout; a row naming a sensor outside the speeds file is ignored, a pair listed twice keeps the shorter
    path.write_text("from,to,cost\n773869,767541,100\n767541,767542,200\n773869,767542,300\n999999,773869,5\n"
                    "773869,767541,400\n")
    cost = graph.read_distances(path, SENSORS[:3])
    assert cost[0, 1] == 100 and np.isinf(cost[1, 0])  # directed: only from -> to
    weights = graph.gaussian_kernel(cost, threshold=0.1)
    sd = np.std([100.0, 200.0, 300.0])  # the costs between the speeds file's sensors (the kept ones)
    assert weights[0, 1] == pytest.approx(math.exp(-(100 / sd) ** 2))  # 0.223
    assert weights[1, 2] == 0.0 and weights[0, 2] == 0.0  # exp(-(200/81.6)^2) = 0.0025 < 0.1
    assert weights[1, 0] == 0.0 and np.all(np.diag(weights) == 0)


def test_distance_list_mistakes_name_the_file_and_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("from,to,cost\n773869,767541,-4\n")
    with pytest.raises(UserError, match=r"d.csv: column 'cost' row 1 .* >= 0"):
        graph.read_distances(path, SENSORS)
    path.write_text("source,target,cost\n773869,767541,4\n")
    with pytest.raises(UserError, match="column 'from' is missing"):
        graph.read_distances(path, SENSORS)
    path.write_text("from,to,cost\n1,2,4\n")
    with pytest.raises(UserError, match="no row joins two sensors of the speeds file"):
        graph.read_distances(path, SENSORS)


def test_dense_adjacency_in_speeds_order_with_or_without_header(tmp_path):
    matrix = np.array([[1, 1, 0, 0], [1, 1, 0.5, 0], [0, 0.5, 1, 1], [0, 0, 1, 1]])
    plain = tmp_path / "los_adj.csv"
    pd.DataFrame(matrix).to_csv(plain, header=False, index=False)  # T-GCN: no header, no index
    weights = graph.read_adjacency(plain, SENSORS)
    assert weights[1, 2] == 0.5 and weights[0, 2] == 0 and np.all(np.diag(weights) == 0)
    # a header naming the sensors sets the order: here the file's order is reversed
    headed = tmp_path / "headed.csv"
    pd.DataFrame(matrix[::-1, ::-1], columns=SENSORS[::-1]).to_csv(headed, index=False)
    assert np.array_equal(graph.read_adjacency(headed, SENSORS), weights)
    with pytest.raises(UserError, match=r"has 4 rows and 4 columns .* 3 sensors"):
        graph.read_adjacency(plain, SENSORS[:3])
    pd.DataFrame(np.where(matrix == 0.5, -1, matrix)).to_csv(plain, header=False, index=False)
    with pytest.raises(UserError, match=r"row 2, column 3 is not a weight >= 0"):
        graph.read_adjacency(plain, SENSORS)


def test_coordinates_give_k_nearest_by_great_circle_distance():
    # four sensors northwards along one meridian, 1, 2 and 4 km apart
    km = 1000.0 / graph.EARTH_RADIUS_M * 180 / math.pi  # degrees of latitude per km
    latitude = 34.0 + np.array([0.0, 1.0, 3.0, 7.0]) * km
    distance = graph.great_circle(latitude, np.full(4, -118.3))
    assert distance[0, 1] == pytest.approx(1000.0, rel=1e-6) and distance[0, 3] == pytest.approx(7000.0, rel=1e-6)
    weights = graph.from_coordinates(latitude, np.full(4, -118.3), k=1, threshold=0.0)
    assert np.array_equal(weights > 0, weights.T > 0)  # made symmetric
    linked = {(a, b) for a, b in zip(*np.nonzero(np.triu(weights)))}
    assert linked == {(0, 1), (1, 2), (2, 3)}  # each sensor's nearest: 0-1, 1-0, 2-1, 3-2
    assert weights[0, 1] > weights[1, 2] > weights[2, 3]  # nearer, heavier


def test_h5_speeds_load_like_metr_la(tmp_path):
    frame = _metr_la_h5(tmp_path / "metr-la.h5")
    _metadata(tmp_path / "meta.csv")
    data = load(_csv_config(tmp_path), seed=0)
    assert [d.name for d in data.districts] == ["north", "south"]
    assert data.districts[0].sensor_ids == SENSORS[:2] and len(data.timestamps) == 300
    assert data.timestamps[0] == pd.Timestamp("2012-03-01") and data.interval_minutes == 5
    assert np.isnan(data.districts[0].speeds[5, 1])  # METR-LA writes a missing reading as 0
    assert data.districts[1].speeds[7, 0] == frame.iloc[7, 2]
    assert "metr-la.h5 (h5)" in data.description and data.districts[0].graph is None  # no graph given


def test_h5_key_and_index_mistakes(tmp_path):
    _metr_la_h5(tmp_path / "metr-la.h5", key="df")
    _metr_la_h5(tmp_path / "metr-la.h5", key="speed")
    _metadata(tmp_path / "meta.csv")
    with pytest.raises(UserError, match=r"metr-la.h5: holds several frames \(df, speed\); set data.h5_key"):
        load(_csv_config(tmp_path), seed=0)
    assert len(load(_csv_config(tmp_path, h5_key="speed"), seed=0).timestamps) == 300
    with pytest.raises(UserError, match="data.h5_key = 'volume' is not one of its keys"):
        load(_csv_config(tmp_path, h5_key="volume"), seed=0)
    pd.DataFrame({"a": [1.0, 2.0]}).to_hdf(tmp_path / "plain.h5", key="df")
    with pytest.raises(UserError, match="not a frame indexed by time"):
        load(_csv_config(tmp_path, path=str(tmp_path / "plain.h5")), seed=0)


def test_edges_between_districts_are_cut_and_counted(tmp_path):
    _metr_la_h5(tmp_path / "metr-la.h5")
    _metadata(tmp_path / "meta.csv")  # north: the first two sensors, south: the last two
    rows = [(a, b, 100.0) for a, b in zip(SENSORS, SENSORS[1:])] + [(SENSORS[3], SENSORS[0], 150.0)]
    graph.write_distances(tmp_path / "distances.csv", rows)
    data = load(_csv_config(tmp_path, graph_path=str(tmp_path / "distances.csv"), graph_threshold=0.0), seed=0)
    north, south = data.districts
    assert north.graph[0, 1] > 0 and south.graph[0, 1] > 0  # 773869->767541 and 767542->717447 kept
    # 767541->767542 and 717447->773869 join the two districts: cut
    assert data.cut_edges == 2 and "2 edges within districts, 2 cut between districts" in data.description
    assert sorted(data.neighbours) == sorted([(SENSORS[0], SENSORS[1]), (SENSORS[2], SENSORS[3])])
    # the same graph as a dense matrix: the same cut
    dense = np.zeros((4, 4))
    for a, b, _ in rows:
        dense[SENSORS.index(a), SENSORS.index(b)] = 1.0
    pd.DataFrame(dense).to_csv(tmp_path / "adj.csv", header=False, index=False)
    by_matrix = load(_csv_config(tmp_path, graph_path=str(tmp_path / "adj.csv"), graph_format="adjacency"), seed=0)
    assert by_matrix.cut_edges == 2 and by_matrix.districts[0].graph[0, 1] == 1.0


def test_generator_writes_its_graph_as_a_distance_list_that_loads_back(tmp_path):
    cfg = DataConfig(n_districts=2, sensors_per_district=5, days=7)
    paths = write_generated(cfg, seed=3, folder=tmp_path)
    distances = pd.read_csv(paths["distances"], dtype={"from": str, "to": str})
    assert list(distances.columns) == ["from", "to", "cost"] and (distances["cost"] > 0).all()
    generated = load(cfg, seed=3)
    from_files = load(DataConfig(source="csv", path=str(paths["speeds"]), metadata_path=str(paths["sensors"]),
                                 graph_path=str(paths["distances"])), seed=3)
    assert from_files.cut_edges == 0
    for a, b in zip(generated.districts, from_files.districts):
        assert a.sensor_ids == b.sensor_ids
        assert np.array_equal(a.speeds, b.speeds, equal_nan=True)
        assert np.array_equal(a.graph, b.graph) and a.graph.any()
    # a corridor's sensors are listed upstream -> downstream: every edge points downstream
    for district in generated.districts:
        rows, cols = np.nonzero(district.graph)
        assert np.all(rows < cols)
