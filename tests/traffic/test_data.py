"""Tests for traffic.data: the generator source's config checks and the csv source with its error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.errors import UserError
from traffic.data import DataConfig, TrafficData, load

ROOT = Path(__file__).resolve().parents[2]
SMALL = DataConfig(n_districts=3, sensors_per_district=5, days=7)


# --------------------------------------------------------------------------- generator source


def test_generator_rejects_another_interval_and_a_bad_start_time():
    with pytest.raises(UserError, match="data.interval_minutes = 15") as error:
        load(DataConfig(interval_minutes=15), seed=0)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="data.start_time"):
        load(DataConfig(start_time="yesterday-ish"), seed=0)


def test_data_module_does_not_import_tensorflow():
    code = "import sys, traffic.data; print(any(m.startswith(('tensorflow', 'keras')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- csv


def _write_generated(tmp_path: Path, seed: int = 1):
    """A small generated table as METR-LA-style wide CSV, long CSV and metadata; returns the data."""
    data = load(SMALL, seed=seed)
    ids = [s for d in data.districts for s in d.sensor_ids]
    wide = pd.DataFrame(np.concatenate([d.speeds for d in data.districts], axis=1), columns=ids)
    wide.insert(0, "", data.timestamps.strftime("%Y-%m-%d %H:%M:%S"))  # METR-LA's unnamed index column
    wide.to_csv(tmp_path / "speeds.csv", index=False)
    long = wide.rename(columns={"": "timestamp"}).melt(id_vars="timestamp", var_name="sensor_id", value_name="speed")
    long.sample(frac=1.0, random_state=0).to_csv(tmp_path / "long.csv", index=False)
    meta = pd.DataFrame({"sensor_id": ids, "district": [d.name for d in data.districts for _ in d.sensor_ids]})
    meta.to_csv(tmp_path / "meta.csv", index=False)
    return data


def _csv(tmp_path: Path, **overrides) -> DataConfig:
    values = dict(source="csv", path=str(tmp_path / "speeds.csv"), metadata_path=str(tmp_path / "meta.csv"))
    values.update(overrides)
    return DataConfig(**values)


def _assert_same(loaded: TrafficData, original: TrafficData) -> None:
    assert [d.name for d in loaded.districts] == [d.name for d in original.districts]
    assert loaded.timestamps.equals(original.timestamps)
    for got, want in zip(loaded.districts, original.districts):
        assert sorted(got.sensor_ids) == sorted(want.sensor_ids)
        order = [got.sensor_ids.index(s) for s in want.sensor_ids]
        assert np.allclose(got.speeds[:, order], want.speeds, rtol=1e-12, atol=0.0, equal_nan=True)


def test_wide_csv_round_trips_a_generated_table(tmp_path):
    original = _write_generated(tmp_path)
    loaded = load(_csv(tmp_path), seed=0)
    _assert_same(loaded, original)
    assert loaded.interval_minutes == 5
    assert loaded.neighbours == []  # no coordinates, no graph
    assert loaded.description.startswith("csv: speeds.csv (wide), 15 sensors in 3 districts")
    assert [d.sensor_ids for d in loaded.districts] == [d.sensor_ids for d in original.districts]


def test_long_csv_round_trips_a_generated_table(tmp_path):
    original = _write_generated(tmp_path)
    loaded = load(_csv(tmp_path, path=str(tmp_path / "long.csv"), layout="long"), seed=0)
    _assert_same(loaded, original)


def _tiny_wide(tmp_path: Path, rows: list[str], header: str = "timestamp,s1,s2,s3,s4", meta: str | None = None):
    (tmp_path / "speeds.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "meta.csv").write_text(meta or "sensor_id,district\ns1,west\ns2,west\ns3,east\ns4,east\n")


TINY = [
    "2012-03-01 00:00:00,60,0,55,61",
    "2012-03-01 00:05:00,59,,54,62",
    "2012-03-01 00:10:00,58,57,NA,63",
]


def test_zeros_and_empty_cells_are_missing_readings(tmp_path):
    _tiny_wide(tmp_path, TINY)
    data = load(_csv(tmp_path), seed=0)
    east, west = data.districts  # sorted by name
    assert (east.name, west.name) == ("east", "west")
    assert np.array_equal(west.speeds, [[60, np.nan], [59, np.nan], [58, 57]], equal_nan=True)
    assert np.array_equal(east.speeds, [[55, 61], [54, 62], [np.nan, 63]], equal_nan=True)
    kept = load(_csv(tmp_path, missing_values="empty"), seed=0).districts[1]
    assert np.array_equal(kept.speeds, [[60, 0], [59, np.nan], [58, 57]], equal_nan=True)


def test_rows_are_sorted_and_gaps_become_missing_steps(tmp_path):
    rows = ["2012-03-01 00:20:00,1,2,3,4", "2012-03-01 00:00:00,5,6,7,8", "2012-03-01 00:05:00,9,10,11,12"]
    _tiny_wide(tmp_path, rows)
    data = load(_csv(tmp_path), seed=0)
    assert list(data.timestamps) == list(pd.date_range("2012-03-01", periods=5, freq="5min"))
    west = data.districts[1].speeds
    assert np.array_equal(west[:, 0], [5, 9, np.nan, np.nan, 1], equal_nan=True)
    assert "5 steps of 5 min" in data.description


def test_wide_csv_without_timestamps_counts_from_start_time(tmp_path):
    _tiny_wide(tmp_path, ["60,61,62,63", "59,58,57,56"], header="s1,s2,s3,s4")
    data = load(_csv(tmp_path, start_time="2020-05-04 06:00", interval_minutes=15), seed=0)
    assert list(data.timestamps) == [pd.Timestamp("2020-05-04 06:00"), pd.Timestamp("2020-05-04 06:15")]
    assert data.interval_minutes == 15
    assert np.array_equal(data.districts[1].speeds[:, 0], [60, 59])


def test_sensor_without_any_reading_is_dropped_and_counted(tmp_path):
    _tiny_wide(tmp_path, ["2012-03-01 00:00:00,60,0,55,61", "2012-03-01 00:05:00,59,0,54,62", "2012-03-01 00:10:00,58,,53,63"])
    data = load(_csv(tmp_path), seed=0)
    assert data.districts[1].sensor_ids == ["s1"]
    assert "1 sensor(s) without any reading dropped (s2)" in data.description
    with pytest.raises(UserError, match="district 'west' has 1 sensor"):
        load(_csv(tmp_path, min_sensors_per_district=2), seed=0)


def test_metadata_with_coordinates_forms_seeded_clusters_and_a_graph(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"{717000 + i}" for i in range(12)]
    # two groups of sensors 30 km apart, each a short line of sensors
    lat = np.r_[34.0 + 0.01 * np.arange(6), 34.3 + 0.01 * np.arange(6)]
    lon = np.r_[np.full(6, -118.3), np.full(6, -118.0)] + rng.normal(0, 1e-4, 12)
    meta = pd.DataFrame({"index": range(12), "sensor_id": ids, "latitude": lat, "longitude": lon})
    meta.iloc[::-1].to_csv(tmp_path / "meta.csv", index=False)  # metadata order does not matter
    speeds = pd.DataFrame(rng.uniform(30, 70, (4, 12)), columns=ids)
    speeds.insert(0, "", pd.date_range("2012-03-01", periods=4, freq="5min").astype(str))
    speeds.to_csv(tmp_path / "speeds.csv", index=False)
    data = load(_csv(tmp_path, n_clusters=2), seed=5)
    assert [d.name for d in data.districts] == ["cluster_1", "cluster_2"]
    assert [d.sensor_ids for d in data.districts] == [ids[:6], ids[6:]]
    assert "KMeans on coordinates" in data.description
    # each sensor with its two nearest in its cluster: a chain of 6 sensors -> 5 consecutive pairs
    assert len(data.neighbours) == 10
    assert (ids[0], ids[1]) in data.neighbours and (ids[4], ids[5]) in data.neighbours
    assert not any({a, b} & set(ids[:6]) and {a, b} & set(ids[6:]) for a, b in data.neighbours)
    again = load(_csv(tmp_path, n_clusters=2), seed=5)
    assert [d.sensor_ids for d in again.districts] == [d.sensor_ids for d in data.districts]


def test_district_column_wins_over_coordinates_which_still_give_the_graph(tmp_path):
    _tiny_wide(
        tmp_path,
        TINY,
        meta="sensor_id,district,latitude,longitude\ns1,west,34.0,-118\ns2,west,34.01,-118\ns3,east,34.2,-118\ns4,east,34.21,-118\n",
    )
    data = load(_csv(tmp_path), seed=0)
    assert [d.name for d in data.districts] == ["east", "west"]
    assert sorted(data.neighbours) == [("s1", "s2"), ("s3", "s4")]


ERROR_CASES = {
    "no metadata": (dict(metadata_path=""), None, "data.metadata_path is empty"),
    "no path": (dict(path=""), None, "data.path is empty"),
    "missing file": (dict(path="/nonexistent/speeds.csv"), None, "/nonexistent/speeds.csv: file not found"),
    "bad timestamp": ({}, ("2012-03-01 00:00:00,1,2,3,4\nnot a time,1,2,3,4", None), "column 'timestamp' row 2 has 'not a time'"),
    "empty timestamp": ({}, ("2012-03-01 00:00:00,1,2,3,4\n,1,2,3,4", None), "column 'timestamp' is empty at row 2"),
    "off grid": ({}, ("2012-03-01 00:00:00,1,2,3,4\n2012-03-01 00:07:00,1,2,3,4", None), "2012-03-01 00:07:00 is not on the 5-minute grid"),
    "coarser data": (
        {},
        ("2012-03-01 00:00:00,1,2,3,4\n2012-03-01 00:15:00,1,2,3,4\n2012-03-01 00:30:00,1,2,3,4\n2012-03-01 01:00:00,1,2,3,4", None),
        "set data.interval_minutes = 15",
    ),
    "duplicate timestamp": (
        {},
        ("2012-03-01 00:00:00,1,2,3,4\n2012-03-01 00:05:00,1,2,3,4\n2012-03-01 00:05:00,1,2,3,4", None),
        "timestamp '2012-03-01 00:05:00' appears more than once (rows 2 and 3)",
    ),
    "non-numeric speed": ({}, ("2012-03-01 00:00:00,1,fast,3,4", None), "column 's2' is not numeric (row 1 has 'fast')"),
    "sensor not in metadata": ({}, (None, "sensor_id,district\ns1,west\ns2,west\ns3,east\n"), "sensor 's4' is not in the metadata file"),
    "no districts or coordinates": ({}, (None, "sensor_id,road\ns1,I5\ns2,I5\ns3,I5\ns4,I5\n"), "has neither a 'district' column nor 'latitude' and 'longitude'"),
    "one district": ({}, (None, "sensor_id,district\ns1,all\ns2,all\ns3,all\ns4,all\n"), "at least 2 districts"),
    "empty district": ({}, (None, "sensor_id,district\ns1,west\ns2,\ns3,east\ns4,east\n"), "column 'district' is empty at row 2 (sensor 's2')"),
    "duplicate metadata": ({}, (None, "sensor_id,district\ns1,west\ns2,west\ns3,east\ns4,east\ns1,east\n"), "sensor 's1' appears more than once (rows 1 and 5)"),
    "too few sensors": (dict(min_sensors_per_district=3), None, "district 'east' has 2 sensor(s)"),
    "too many clusters": (
        dict(n_clusters=5),
        (None, "sensor_id,latitude,longitude\ns1,34,-118\ns2,34.1,-118\ns3,34.2,-118\ns4,34.3,-118\n"),
        "data.n_clusters = 5",
    ),
    "long: missing column": (dict(layout="long"), None, "column 'sensor_id' is missing"),
    "bad start time": (dict(start_time="soon"), ("60,61,62,63", None), "data.start_time = 'soon'"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_csv_errors_are_one_line_and_name_the_input(tmp_path, case):
    overrides, files, expected = ERROR_CASES[case]
    rows, meta = files if files else (None, None)
    header = "timestamp,s1,s2,s3,s4"
    if case == "bad start time":
        header = "s1,s2,s3,s4"
    _tiny_wide(tmp_path, rows.split("\n") if rows else TINY, header=header, meta=meta)
    with pytest.raises(UserError) as error:
        load(_csv(tmp_path, **overrides), seed=0)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_long_csv_duplicate_reading_names_the_sensor_and_rows(tmp_path):
    (tmp_path / "speeds.csv").write_text(
        "time,sensor,mph\n2012-03-01 00:00,s1,60\n2012-03-01 00:00,s2,61\n2012-03-01 00:05,s1,59\n2012-03-01 00:00,s1,58\n"
    )
    (tmp_path / "meta.csv").write_text("sensor,district\ns1,a\ns2,b\n")
    cfg = _csv(tmp_path, layout="long", timestamp_column="time", sensor_column="sensor", value_column="mph")
    with pytest.raises(UserError) as error:
        load(cfg, seed=0)
    assert str(error.value).endswith(
        "sensor 's1' has more than one reading at 2012-03-01 00:00:00 (rows 1 and 4); give one row per timestamp and sensor"
    )
    # without the duplicate the same file loads, with the configured column names
    (tmp_path / "speeds.csv").write_text("time,sensor,mph\n2012-03-01 00:00,s1,60\n2012-03-01 00:00,s2,61\n2012-03-01 00:10,s1,0\n")
    data = load(cfg, seed=0)
    assert np.array_equal(data.districts[0].speeds[:, 0], [60, np.nan, np.nan], equal_nan=True)
    assert np.array_equal(data.districts[1].speeds[:, 0], [61, np.nan, np.nan], equal_nan=True)
