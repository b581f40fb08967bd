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
from traffic import graph
from traffic.csv_readers import (
    H5_SUFFIXES, natural_key, nearest_neighbours, on_regular_grid, read_h5, read_long, read_metadata, read_wide,
    shorten,
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
    h5_key: str = field(default="", metadata={"doc": (
        "csv source with a `.h5` speeds file (METR-LA `df`, PEMS-BAY `speed`): the frame's key; empty = the only one."
    )})
    # the sensor graph (traffic/graph.py), used by the graph models
    graph_path: str = field(default="", metadata={"doc": (
        "csv: the sensor graph file, `graph_format` says which; empty = from the metadata's coordinates, if any."
    )})
    graph_format: str = field(default="distances", metadata={"choices": ("distances", "adjacency"), "doc": (
        "`distances`: `from,to,cost` rows (DCRNN's distances_la_2012.csv), a thresholded Gaussian kernel; "
        "`adjacency`: a dense square CSV in the speeds file's sensor order (T-GCN's los_adj.csv)."
    )})
    graph_threshold: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "doc": (
        "Gaussian-kernel weights below this are no edge (DCRNN: 0.1); for `distances` and coordinates."
    )})
    graph_neighbours: int = field(default=8, metadata={"min": 1, "max": 100, "doc": (
        "Graph from coordinates only: each sensor's nearest sensors by great-circle distance."
    )})


@dataclass
class District:
    name: str
    sensor_ids: list[str]
    speeds: np.ndarray  # float64 [T, S], NaN = missing reading
    graph: np.ndarray | None = None  # [S, S] edge weights within the district (traffic/graph.py); None = no graph


@dataclass
class TrafficData:
    timestamps: pd.DatetimeIndex  # regular grid, length T
    districts: list[District]  # the clients, stable order
    interval_minutes: int
    description: str  # one line
    neighbours: list[tuple[str, str]]  # pairs of sensor ids that are graph neighbours
    cut_edges: int = 0  # sensor pairs whose graph edge joined two districts and was cut


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
    distances: list[tuple[str, str, float]]  # the road graph: (from, to, metres along the road), DCRNN's format


def _generate(cfg: DataConfig, seed: int, params: GeneratorParams = GeneratorParams()) -> _Simulation:
    if cfg.interval_minutes != 5:
        raise UserError(
            f"data.interval_minutes = {cfg.interval_minutes} applies to csv data only; the generator makes "
            "5-minute readings: remove data.interval_minutes or set it to 5"
        )
    start = _parse_start_time(cfg.start_time)
    timestamps, generated = simulate(start, cfg.days, cfg.n_districts, cfg.sensors_per_district, seed, params)
    districts = [
        District(name=f"district_{d + 1}", sensor_ids=out["ids"], speeds=out["speeds"]) for d, out in enumerate(generated)
    ]
    # the graph as from the distance list the generator writes (one kernel over the whole list, as for csv data)
    distances = [row for out in generated for row in out["distances"]]
    ids = [s for d in districts for s in d.sensor_ids]
    weights = graph.gaussian_kernel(graph.from_distances(*zip(*distances), ids, "generator"), cfg.graph_threshold)
    start = 0
    for district in districts:
        size = len(district.sensor_ids)
        district.graph = weights[start : start + size, start : start + size]
        start += size
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
        distances,
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
    if path.suffix.lower() in H5_SUFFIXES:
        stamps, sensor_ids, values = read_h5(cfg, path)
    elif cfg.layout == "wide":
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
    weights, graph_how = _sensor_graph(cfg, sensor_ids, coordinates)
    cut = 0
    if weights is not None:
        kept = [c for name in names for c in members[name]]
        within, cut = graph.cut_at_districts(weights[np.ix_(kept, kept)], [districts_of[sensor_ids[c]] for c in kept])
        start = 0
        for district in districts:
            size = len(district.sensor_ids)
            district.graph = within[start : start + size, start : start + size]
            start += size
        if cfg.graph_path.strip():  # the file's edges are the neighbours the report's statistics use
            neighbours = [pair for d in districts for pair in graph.edge_pairs(d.graph, d.sensor_ids)]

    n_sensors = sum(len(d.sensor_ids) for d in districts)
    missing = sum(int(np.isnan(d.speeds).sum()) for d in districts) / max(1, n_sensors * len(timestamps))
    grouping = {"column": f"column '{cfg.district_column}'", "clusters": "KMeans on coordinates"}[how]
    description = (
        f"csv: {path.name} ({'h5' if path.suffix.lower() in H5_SUFFIXES else cfg.layout}), {n_sensors} sensors in {len(districts)} districts ({grouping}), "
        f"{len(timestamps)} steps of {cfg.interval_minutes} min from {timestamps[0]} to {timestamps[-1]}, "
        f"{missing:.1%} missing"
    )
    if weights is not None:
        edges = sum(len(graph.edge_pairs(d.graph, d.sensor_ids)) for d in districts)
        description += f"; graph from {graph_how}: {edges} edges within districts, {cut} cut between districts"
    if dropped:
        shown = ", ".join(shorten(x) for x in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        description += f"; {len(dropped)} sensor(s) without any reading dropped ({shown})"
    return TrafficData(
        timestamps=timestamps,
        districts=districts,
        interval_minutes=cfg.interval_minutes,
        description=description,
        neighbours=neighbours,
        cut_edges=cut,
    )


def _sensor_graph(cfg: DataConfig, sensor_ids: list[str], coordinates: dict) -> tuple[np.ndarray | None, str]:
    """([n, n] weights over the speeds file's sensors, how it was made), or (None, "") without a graph."""
    if cfg.graph_path.strip():
        path = Path(cfg.graph_path.strip()).expanduser()
        if cfg.graph_format == "adjacency":
            return graph.read_adjacency(path, sensor_ids), f"{path.name} (adjacency)"
        return graph.gaussian_kernel(graph.read_distances(path, sensor_ids), cfg.graph_threshold), f"{path.name} (distances)"
    if coordinates:
        latlon = np.array([coordinates[s] for s in sensor_ids])
        weights = graph.from_coordinates(latlon[:, 0], latlon[:, 1], cfg.graph_neighbours, cfg.graph_threshold)
        return weights, f"coordinates ({cfg.graph_neighbours} nearest)"
    return None, ""


def write_generated(cfg: DataConfig, seed: int, folder: Path) -> dict[str, Path]:
    """The generator's data in the formats public data sets ship in, to try the csv source on:
    ``speeds.h5`` (METR-LA's layout: key ``df``, a DatetimeIndex, one column per sensor, 0 =
    missing), ``distances.csv`` (DCRNN's ``from,to,cost`` list, metres along the road) and
    ``sensors.csv`` (``sensor_id,district``). Loading them with ``source = "csv"`` gives the
    generator's readings and graph."""
    simulation = _generate(cfg, seed)
    generated = simulation.data
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [s for d in generated.districts for s in d.sensor_ids]
    speeds = np.concatenate([d.speeds for d in generated.districts], axis=1)
    frame = pd.DataFrame(np.nan_to_num(speeds, nan=0.0), index=generated.timestamps, columns=ids)
    paths = {"speeds": folder / "speeds.h5", "distances": folder / "distances.csv", "sensors": folder / "sensors.csv"}
    frame.to_hdf(paths["speeds"], key="df", mode="w")
    graph.write_distances(paths["distances"], simulation.distances)
    districts = [d.name for d in generated.districts for _ in d.sensor_ids]
    pd.DataFrame({"sensor_id": ids, "district": districts}).to_csv(paths["sensors"], index=False)
    return paths
