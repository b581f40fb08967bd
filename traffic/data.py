"""Traffic data: loop-detector speeds, one table per road district (the clients).

Two sources (``[data] source``):

``generator`` (default, embedded; ``traffic/generator.py``)
    A seeded, vectorized generator of 5-minute loop-detector speeds (mph) on a road
    network of freeway corridors with recurrent bottlenecks, incidents, sensor noise
    and outages, calibrated to the statistics of one real METR-LA week
    (``traffic/calibration.py``); ``traffic/generator.py`` describes the model. The
    default (6 districts x 12 sensors x 28 days) takes about 0.2 s after imports.

``csv`` (the user's data, METR-LA / PEMS-BAY style; read by ``traffic/csv_readers.py``)
    ``layout = "wide"``: one row per timestamp, one column per sensor (a timestamp
    column named by ``timestamp_column``; when that is empty, the first column if it
    is not numeric, otherwise no timestamp column and readings every
    ``interval_minutes`` from ``start_time``). ``layout = "long"``: one row per
    reading with ``timestamp_column`` (empty means ``timestamp``), ``sensor_column``
    and ``value_column``; duplicate (timestamp, sensor) rows are an error.
    Timestamps are sorted and put on the regular ``interval_minutes`` grid from the
    first to the last timestamp; grid steps without a row become missing readings. A
    timestamp off that grid, a duplicate timestamp, or an unparseable one is an error
    naming the file, column and row.
    ``metadata_path`` (required) maps sensors to districts: a CSV with
    ``sensor_column`` and either ``district_column`` or ``latitude_column`` and
    ``longitude_column``; with coordinates only, districts are KMeans clusters
    (``n_clusters``, seeded by the job seed) named ``cluster_1``, ``cluster_2``, ...
    in the order of their first sensor. Sensor ids are compared as stripped strings.
    Sensors in the metadata but not in the speeds file are ignored; a sensor in the
    speeds file but not in the metadata is an error. With coordinates, the graph
    neighbours are consecutive sensors by coordinates within a district (each sensor
    with its nearest sensor and the nearest one on its other side); without
    coordinates there are none. Districts named in a column are sorted by name
    (district_2 before district_10); sensors keep the speeds file's order.

Missing readings (csv): a cell is missing when it is empty or one of
``shared.tabular.MISSING_TOKENS``; with ``missing_values = "zero_or_empty"``
(default, the METR-LA convention) a speed of 0 is missing too. Missing readings
are NaN in ``District.speeds``. A sensor with no reading at all cannot be
normalized or evaluated: it is dropped, and the dropped sensors are counted and
named in ``TrafficData.description`` (a district left with fewer than
``min_sensors_per_district`` sensors is then an error).

Every random choice comes from ``seed``. This module must not import TensorFlow: it
runs before the job's input is validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError
from traffic.csv_readers import (
    natural_key, nearest_neighbours, on_regular_grid, read_long, read_metadata, read_wide, shorten,
)
from traffic.generator import GeneratorParams, simulate

__all__ = ["DataConfig", "District", "TrafficData", "load"]


@dataclass(frozen=True)
class DataConfig:
    """The [data] section of a traffic job.

    Field metadata drives config validation ('choices', 'min', 'max', 'exclusive_min') and the
    configuration reference ('doc').
    """

    source: str = field(default="generator", metadata={"choices": ("generator", "csv"), "doc": (
        "`generator`: a seeded road-network simulator calibrated to METR-LA statistics; `csv`: your speeds file, "
        "METR-LA / PEMS-BAY style (docs/traffic.md)."
    )})
    # generator
    n_districts: int = field(default=6, metadata={"min": 2, "max": 50, "doc": "generator: road districts (the clients)."})
    sensors_per_district: int = field(default=12, metadata={"min": 2, "max": 500, "doc": "generator: sensors per district."})
    days: int = field(default=28, metadata={"min": 7, "max": 400, "doc": "generator: days of 5-minute readings."})
    # csv (METR-LA / PEMS-BAY style)
    path: str = field(default="", metadata={"doc": "csv: the speeds file."})
    layout: str = field(default="wide", metadata={"choices": ("wide", "long"), "doc": (
        "csv: `wide` (a timestamp column and one column per sensor, as METR-LA / PEMS-BAY exports) or `long` "
        "(timestamp, sensor, value rows)."
    )})
    timestamp_column: str = field(default="", metadata={"doc": (
        "csv: the timestamp column. Empty: wide, the first column if it is not numeric, else readings every "
        "`interval_minutes` from `start_time`; long, `timestamp`."
    )})
    start_time: str = field(default="2012-03-01 00:00:00", metadata={"doc": (
        "The first reading's time when there is no timestamp column (and the generator's start)."
    )})
    interval_minutes: int = field(default=5, metadata={"min": 1, "max": 60, "doc": (
        "Minutes between readings: the regular grid timestamps must fall on."
    )})
    sensor_column: str = field(default="sensor_id", metadata={"doc": (
        "csv: the sensor column of the long layout and of the metadata file."
    )})
    value_column: str = field(default="speed", metadata={"doc": "csv, long layout: the speed column."})
    metadata_path: str = field(default="", metadata={"doc": (
        "csv (required): sensor metadata mapping each sensor to `district_column`, or to "
        "`latitude_column`/`longitude_column` clustered into `n_clusters` districts."
    )})
    district_column: str = field(default="district", metadata={"doc": "csv metadata: the district column."})
    latitude_column: str = field(default="latitude", metadata={"doc": "csv metadata: the latitude column."})
    longitude_column: str = field(default="longitude", metadata={"doc": "csv metadata: the longitude column."})
    n_clusters: int = field(default=5, metadata={"min": 2, "max": 100, "doc": (
        "csv metadata without districts: districts made from the coordinates (KMeans, seeded)."
    )})
    missing_values: str = field(default="zero_or_empty", metadata={"choices": ("zero_or_empty", "empty"), "doc": (
        "`zero_or_empty`: a reading of 0 or an empty cell is missing (METR-LA writes missing readings as 0); "
        "`empty`: only empty cells."
    )})
    min_sensors_per_district: int = field(default=1, metadata={"min": 1, "doc": (
        "Fewest sensors with readings a district may keep."
    )})


@dataclass
class District:
    name: str
    sensor_ids: list[str]
    speeds: np.ndarray  # float64 [T, S], NaN = missing reading


@dataclass
class TrafficData:
    timestamps: pd.DatetimeIndex  # regular grid, length T
    districts: list[District]  # the clients, stable order
    interval_minutes: int
    description: str  # one line
    neighbours: list[tuple[str, str]]  # pairs of sensor ids that are graph neighbours


def load(cfg: DataConfig, seed: int) -> TrafficData:
    """Load the configured source and return one speed table per district."""
    if cfg.source == "generator":
        return _generate(cfg, seed).data
    if cfg.source == "csv":
        return _load_csv(cfg, seed)
    raise UserError(f"data.source = {cfg.source!r} is unknown; use one of generator, csv")


# =========================================================================== generator
# generator.py returns plain arrays per district; the source's TrafficData (and the
# ground truth kept for tests and benchmarks) is put together here, so that
# generator.py does not import this module, which imports it.


@dataclass
class _Simulation:
    """The generated data plus the ground truth behind it (for tests and benchmarks)."""

    data: TrafficData
    clean: list[np.ndarray]  # per district: true speed [T, S] before bias, noise and missing
    bottlenecks: list[list[tuple[str, float]]]  # per district: (sensor id at the queue front, capacity)
    incidents: list[list[dict]]  # per district: start, end (steps), capacity, corridor, position (miles), sensor just upstream
    corridors: list[list[list[str]]]  # per district: corridors, each a list of sensor ids upstream -> downstream


def _generate(cfg: DataConfig, seed: int, params: GeneratorParams = GeneratorParams()) -> _Simulation:
    if cfg.interval_minutes != 5:
        raise UserError(
            f"data.interval_minutes = {cfg.interval_minutes} applies to csv data only; the generator makes "
            "5-minute readings: remove data.interval_minutes or set it to 5"
        )
    start = _parse_start_time(cfg.start_time)
    timestamps, generated = simulate(start, cfg.days, cfg.n_districts, cfg.sensors_per_district, seed, params)
    districts = [
        District(name=f"district_{d + 1}", sensor_ids=out["ids"], speeds=out["speeds"])
        for d, out in enumerate(generated)
    ]
    neighbours = [pair for out in generated for pair in out["neighbours"]]
    missing = sum(int(np.isnan(x.speeds).sum()) for x in districts) / sum(x.speeds.size for x in districts)
    description = (
        f"generator: {cfg.n_districts} districts x {cfg.sensors_per_district} sensors, {cfg.days} days of "
        f"5-minute speeds from {timestamps[0]:%Y-%m-%d}, calibrated to METR-LA, {missing:.1%} missing (seed {seed})"
    )
    data = TrafficData(
        timestamps=timestamps,
        districts=districts,
        interval_minutes=5,
        description=description,
        neighbours=neighbours,
    )
    return _Simulation(
        data,
        [out["clean"] for out in generated],
        [out["bottlenecks"] for out in generated],
        [out["incidents"] for out in generated],
        [out["corridors"] for out in generated],
    )


def _parse_start_time(text: str) -> pd.Timestamp:
    try:
        value = pd.Timestamp(str(text).strip())
    except (ValueError, TypeError):
        value = pd.NaT
    if value is pd.NaT or pd.isna(value):
        raise UserError(
            f"data.start_time = {text!r} is not a date-time; write it like '2012-03-01 00:00:00'"
        )
    return value.tz_localize(None) if value.tzinfo is not None else value


# =========================================================================== csv


def _load_csv(cfg: DataConfig, seed: int) -> TrafficData:
    if not cfg.path.strip():
        raise UserError(
            "data.path is empty; give the speeds CSV (wide: a timestamp column and one column per sensor; "
            "long: timestamp, sensor and speed columns)"
        )
    if not cfg.metadata_path.strip():
        raise UserError(
            "data.metadata_path is empty; give a sensor metadata CSV with a sensor id column and either a "
            "district column or latitude and longitude columns"
        )
    path = Path(cfg.path.strip()).expanduser()
    meta_path = Path(cfg.metadata_path.strip()).expanduser()
    source = str(path)
    if cfg.layout == "wide":
        stamps, sensor_ids, values = read_wide(cfg, path)
    elif cfg.layout == "long":
        stamps, sensor_ids, values = read_long(cfg, path)
    else:
        raise UserError(f"data.layout = {cfg.layout!r} is unknown; use one of wide, long")
    if stamps is None:
        start = _parse_start_time(cfg.start_time)
        timestamps = pd.date_range(start, periods=len(values), freq=pd.Timedelta(minutes=cfg.interval_minutes))
    else:
        timestamps, values = on_regular_grid(stamps, values, cfg.interval_minutes, source)

    districts_of, coordinates, how = read_metadata(cfg, meta_path, sensor_ids, source, seed)

    has_reading = ~np.isnan(values).all(axis=0)
    dropped = [sensor for sensor, ok in zip(sensor_ids, has_reading) if not ok]
    members: dict[str, list[int]] = {}
    for column, sensor in enumerate(sensor_ids):
        if has_reading[column]:
            members.setdefault(districts_of[sensor], []).append(column)
    names = list(members)
    if how == "column":
        names.sort(key=natural_key)
    for name in names:
        if len(members[name]) < cfg.min_sensors_per_district:
            raise UserError(
                f"{meta_path}: district '{shorten(name)}' has {len(members[name])} sensor(s) with readings but "
                f"data.min_sensors_per_district = {cfg.min_sensors_per_district}; merge it into another district "
                "or lower data.min_sensors_per_district"
            )
    if len(names) < 2:
        only = f" ('{shorten(names[0])}')" if names else ""
        raise UserError(
            f"{meta_path}: the sensors with readings form {len(names)} district(s){only}; federated training "
            "needs at least 2 districts: assign sensors to more districts"
            + (" or raise data.n_clusters" if how == "clusters" else "")
        )
    districts = [
        District(
            name=name,
            sensor_ids=[sensor_ids[c] for c in members[name]],
            speeds=np.ascontiguousarray(values[:, members[name]], dtype=np.float64),
        )
        for name in names
    ]
    neighbours = nearest_neighbours([d.sensor_ids for d in districts], coordinates) if coordinates else []

    n_sensors = sum(len(d.sensor_ids) for d in districts)
    missing = sum(int(np.isnan(d.speeds).sum()) for d in districts) / max(1, n_sensors * len(timestamps))
    grouping = {"column": f"column '{cfg.district_column}'", "clusters": "KMeans on coordinates"}[how]
    description = (
        f"csv: {path.name} ({cfg.layout}), {n_sensors} sensors in {len(districts)} districts ({grouping}), "
        f"{len(timestamps)} steps of {cfg.interval_minutes} min from {timestamps[0]} to {timestamps[-1]}, "
        f"{missing:.1%} missing"
    )
    if dropped:
        shown = ", ".join(shorten(x) for x in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        description += f"; {len(dropped)} sensor(s) without any reading dropped ({shown})"
    return TrafficData(
        timestamps=timestamps,
        districts=districts,
        interval_minutes=cfg.interval_minutes,
        description=description,
        neighbours=neighbours,
    )
