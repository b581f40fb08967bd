"""Traffic csv source: reading the speeds file (wide or long CSV, or pandas HDF) and the sensor metadata.

``traffic.data`` (which documents the csv source) puts the pieces read here together:
``read_wide`` / ``read_long`` / ``read_h5`` give timestamps, sensor ids and readings,
``on_regular_grid`` puts them on the regular time grid, ``read_metadata`` maps sensors
to districts (a column, or KMeans on coordinates) and ``nearest_neighbours`` builds the
graph from coordinates. A mistake in a file is a one-line ``UserError`` naming the file,
column and row. ``cfg`` is the job's ``traffic.data.DataConfig``; it is not imported
here because ``traffic.data`` imports this module.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.tabular import MISSING_TOKENS, numeric_columns, read_csv, require_columns

__all__ = [
    "read_wide", "read_long", "read_h5", "H5_SUFFIXES", "on_regular_grid", "read_metadata", "nearest_neighbours", "natural_key", "shorten",
]


def _zero_is_missing(cfg) -> bool:
    return cfg.missing_values == "zero_or_empty"


def read_wide(cfg, path: Path):
    """(timestamps per row or None, sensor ids, values [rows, sensors]) of a wide CSV."""
    df = read_csv(path)
    source = str(path)
    columns = list(df.columns)
    if cfg.timestamp_column.strip():
        time_column = cfg.timestamp_column.strip()
        require_columns(df, [time_column], source)
    elif _looks_numeric(df[columns[0]]):
        time_column = None  # every column is a sensor; readings every interval_minutes from start_time
    else:
        time_column = columns[0]
    sensors = [c for c in columns if c != time_column]
    if not sensors:
        raise UserError(f"{source}: has no sensor columns besides the timestamp column '{shorten(time_column)}'")
    sensor_ids = [str(c).strip() for c in sensors]
    values = numeric_columns(
        df, sensors, source, zero_means_missing=sensors if _zero_is_missing(cfg) else ()
    ).to_numpy(dtype=np.float64)
    stamps = None if time_column is None else _parse_timestamps(df[time_column], source, time_column)
    if stamps is not None:
        duplicated = stamps.duplicated(keep=False)
        if duplicated.any():
            rows = np.flatnonzero(np.asarray(stamps == stamps[np.flatnonzero(duplicated)[0]]))
            raise UserError(
                f"{source}: timestamp '{stamps[rows[0]]}' appears more than once (rows {rows[0] + 1} and "
                f"{rows[1] + 1}) in column '{shorten(time_column)}'; give one row per timestamp"
            )
    return stamps, sensor_ids, values


H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def read_h5(cfg, path: Path):
    """(timestamps, sensor ids, values) of a pandas HDF file as METR-LA / PEMS-BAY ship them: one
    DataFrame (key `data.h5_key`, or the file's only key) with a DatetimeIndex and one column per sensor."""
    source = str(path)
    if not path.is_file():
        raise UserError(f"{source}: file not found")
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = [k.lstrip("/") for k in store.keys()]
            key = cfg.h5_key.strip() or (keys[0] if len(keys) == 1 else "")
            if key not in keys:
                wanted = f"data.h5_key = {key!r} is not one of its keys" if key else "holds several frames"
                raise UserError(f"{source}: {wanted} ({', '.join(keys) or 'none'}); set data.h5_key to one of them")
            df = store[key]
    except UserError:
        raise
    except Exception as error:  # PyTables raises its own HDF5ExtError, OSError, ...
        raise UserError(f"{source}: cannot be read as a pandas HDF file ({' '.join(str(error).split())[:120]})") from None
    if not isinstance(df, pd.DataFrame) or not isinstance(df.index, pd.DatetimeIndex):
        raise UserError(
            f"{source}: key '{key}' is not a frame indexed by time; METR-LA / PEMS-BAY files hold one row per "
            "timestamp (a DatetimeIndex) and one column per sensor"
        )
    values = df.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isfinite(values) & ~np.isnan(values))
    if len(bad):
        raise UserError(f"{source}: sensor '{shorten(df.columns[bad[0][1]])}' has an infinite reading at row {bad[0][0] + 1}")
    if _zero_is_missing(cfg):
        values[values == 0.0] = np.nan
    stamps = df.index.tz_localize(None) if df.index.tz is not None else df.index
    if stamps.hasnans or stamps.duplicated().any():
        row = int(np.flatnonzero(stamps.isna() | stamps.duplicated())[0])
        raise UserError(f"{source}: row {row + 1} of the time index is empty or repeats a timestamp; give one row per timestamp")
    return pd.DatetimeIndex(stamps), [str(c).strip() for c in df.columns], values


def read_long(cfg, path: Path):
    """(unique timestamps, sensor ids, values [timestamps, sensors]) pivoted from a long CSV."""
    df = read_csv(path)
    source = str(path)
    time_column = cfg.timestamp_column.strip() or "timestamp"
    sensor_column, value_column = cfg.sensor_column.strip(), cfg.value_column.strip()
    require_columns(df, [time_column, sensor_column, value_column], source)
    sensors = df[sensor_column].astype(str).str.strip()
    empty = np.flatnonzero(sensors.isin(MISSING_TOKENS).to_numpy())
    if len(empty):
        raise UserError(
            f"{source}: column '{shorten(sensor_column)}' is empty at row {empty[0] + 1}; every reading needs a sensor id"
        )
    readings = numeric_columns(
        df, [value_column], source, zero_means_missing=[value_column] if _zero_is_missing(cfg) else ()
    )[value_column].to_numpy(dtype=np.float64)
    stamps = _parse_timestamps(df[time_column], source, time_column)
    keys = pd.DataFrame({"t": stamps, "s": sensors.to_numpy()})
    duplicated = keys.duplicated(keep=False).to_numpy()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated)[0])
        same = np.flatnonzero(
            duplicated & (keys["t"] == keys["t"].iloc[first]).to_numpy() & (keys["s"] == keys["s"].iloc[first]).to_numpy()
        )
        raise UserError(
            f"{source}: sensor '{shorten(keys['s'].iloc[first])}' has more than one reading at "
            f"{keys['t'].iloc[first]} (rows {same[0] + 1} and {same[1] + 1}); give one row per timestamp and sensor"
        )
    sensor_ids = list(pd.unique(sensors))
    sensor_codes = pd.Index(sensor_ids).get_indexer(sensors)
    unique_stamps, time_codes = np.unique(stamps.to_numpy(), return_inverse=True)
    values = np.full((len(unique_stamps), len(sensor_ids)), np.nan)
    values[time_codes, sensor_codes] = readings
    return pd.DatetimeIndex(unique_stamps), sensor_ids, values


def _looks_numeric(values: pd.Series) -> bool:
    """True when every non-missing cell of the column parses as a number."""
    text = values.astype(str).str.strip()
    present = text[~text.isin(MISSING_TOKENS)]
    return bool(pd.to_numeric(present, errors="coerce").notna().all())


def _parse_timestamps(values: pd.Series, source: str, column: str) -> pd.DatetimeIndex:
    """Parse a timestamp column (each distinct text once); a bad or empty cell is a UserError naming its row."""
    import warnings

    text = values.astype(str).str.strip()
    empty = np.flatnonzero(text.isin(MISSING_TOKENS).to_numpy())
    if len(empty):
        raise UserError(
            f"{source}: column '{shorten(column)}' is empty at row {empty[0] + 1}; every row needs a timestamp"
        )
    unique, inverse = np.unique(text.to_numpy(dtype=str), return_inverse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parsed = pd.to_datetime(pd.Series(unique), errors="coerce")
            if parsed.isna().any():
                parsed = pd.to_datetime(pd.Series(unique), errors="coerce", format="mixed")
        except (ValueError, TypeError, OverflowError):
            raise UserError(
                f"{source}: column '{shorten(column)}' mixes time zones or formats; write local date-times "
                "like 2012-03-01 00:05:00"
            ) from None
    if not pd.api.types.is_datetime64_any_dtype(parsed):
        raise UserError(
            f"{source}: column '{shorten(column)}' mixes time zones or formats; write local date-times "
            "like 2012-03-01 00:05:00"
        )
    bad = parsed.isna().to_numpy()[inverse]
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{source}: column '{shorten(column)}' row {row + 1} has '{shorten(text.iloc[row])}', which is not a "
            "date-time; write timestamps like 2012-03-01 00:05:00"
        )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)  # keep the local wall-clock time
    return pd.DatetimeIndex(parsed.to_numpy()[inverse])


def on_regular_grid(stamps: pd.DatetimeIndex, values: np.ndarray, interval_minutes: int, source: str):
    """Sort rows by time and place them on the grid first..last every interval_minutes (gaps -> NaN)."""
    order = np.argsort(stamps.to_numpy(), kind="stable")
    stamps, values = stamps[order], values[order]
    step = pd.Timedelta(minutes=interval_minutes)
    start = stamps[0]
    offsets = stamps - start
    off_grid = np.asarray(offsets % step != pd.Timedelta(0))
    if off_grid.any():
        bad = int(np.flatnonzero(off_grid)[0])
        raise UserError(
            f"{source}: timestamp {stamps[bad]} is not on the {interval_minutes}-minute grid that starts at "
            f"{start}; fix the timestamp or set data.interval_minutes to the data's interval"
        )
    # Data on a coarser grid (every 15 minutes read with interval 5) would be two thirds gaps.
    gaps = np.diff(stamps.to_numpy()).astype("timedelta64[s]").astype(np.int64)
    common = int(np.gcd.reduce(gaps)) // 60 if len(gaps) >= 3 else interval_minutes
    if common >= 2 * interval_minutes:
        raise UserError(
            f"{source}: readings are {common} minutes apart (or a multiple of it) but data.interval_minutes = "
            f"{interval_minutes}; set data.interval_minutes = {common}"
        )
    index = np.asarray(offsets // step, dtype=np.int64)
    n_steps = int(index[-1]) + 1
    if n_steps > 20 * len(stamps) and n_steps > 10_000:
        raise UserError(
            f"{source}: timestamps run from {start} to {stamps[-1]} ({n_steps} steps of {interval_minutes} minutes) "
            f"but only {len(stamps)} have readings; check for a mistyped timestamp"
        )
    grid = pd.date_range(start, periods=n_steps, freq=step)
    out = np.full((n_steps, values.shape[1]), np.nan)
    out[index] = values
    return grid, out


def read_metadata(cfg, meta_path: Path, sensor_ids: list[str], speeds_source: str, seed: int):
    """({sensor: district}, {sensor: (latitude, longitude)} or {}, "column" | "clusters") for the speeds
    file's sensors."""
    df = read_csv(meta_path)
    source = str(meta_path)
    sensor_column = cfg.sensor_column.strip()
    require_columns(df, [sensor_column], source)
    ids = df[sensor_column].astype(str).str.strip()
    empty = np.flatnonzero(ids.isin(MISSING_TOKENS).to_numpy())
    if len(empty):
        raise UserError(f"{source}: column '{shorten(sensor_column)}' is empty at row {empty[0] + 1}; give every row a sensor id")
    duplicated = ids.duplicated(keep=False).to_numpy()
    if duplicated.any():
        rows = np.flatnonzero(ids.to_numpy() == ids.iloc[np.flatnonzero(duplicated)[0]])
        raise UserError(
            f"{source}: sensor '{shorten(ids.iloc[rows[0]])}' appears more than once (rows {rows[0] + 1} and "
            f"{rows[1] + 1}); give one row per sensor"
        )
    row_of = {sensor: row for row, sensor in enumerate(ids)}
    unknown = [sensor for sensor in sensor_ids if sensor not in row_of]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(
            f"{speeds_source}: sensor '{shorten(unknown[0])}'{more} is not in the metadata file {source}; "
            f"add it to {source} (column '{shorten(sensor_column)}') or remove it from the speeds file"
        )
    rows = np.array([row_of[sensor] for sensor in sensor_ids], dtype=np.int64)
    lat_column, lon_column = cfg.latitude_column.strip(), cfg.longitude_column.strip()
    has_coordinates = lat_column in df.columns and lon_column in df.columns
    coordinates: dict[str, tuple[float, float]] = {}
    if has_coordinates:
        coords = numeric_columns(df, [lat_column, lon_column], source).to_numpy(dtype=np.float64)[rows]
        missing = np.flatnonzero(np.isnan(coords).any(axis=1))
        if len(missing) and cfg.district_column.strip() not in df.columns:
            raise UserError(
                f"{source}: sensor '{shorten(sensor_ids[missing[0]])}' (row {rows[missing[0]] + 1}) has no "
                f"{lat_column}/{lon_column}; give every sensor coordinates or a '{cfg.district_column}' column"
            )
        if not len(missing):
            coordinates = {sensor: (float(lat), float(lon)) for sensor, (lat, lon) in zip(sensor_ids, coords)}

    district_column = cfg.district_column.strip()
    if district_column in df.columns:
        names = df[district_column].astype(str).str.strip().to_numpy()[rows]
        empty = np.flatnonzero(np.isin(names, MISSING_TOKENS))
        if len(empty):
            raise UserError(
                f"{source}: column '{shorten(district_column)}' is empty at row {rows[empty[0]] + 1} (sensor "
                f"'{shorten(sensor_ids[empty[0]])}'); give every sensor a district"
            )
        return dict(zip(sensor_ids, names)), coordinates, "column"
    if not has_coordinates:
        raise UserError(
            f"{source}: has neither a '{shorten(district_column)}' column nor '{shorten(lat_column)}' and "
            f"'{shorten(lon_column)}' columns; add districts or coordinates (or set data.district_column, "
            "data.latitude_column, data.longitude_column)"
        )
    if cfg.n_clusters > len(sensor_ids):
        raise UserError(
            f"data.n_clusters = {cfg.n_clusters} but {speeds_source} has only {len(sensor_ids)} sensors; "
            f"lower data.n_clusters to at most {len(sensor_ids)}"
        )
    from sklearn.cluster import KMeans

    points = _plane(coordinates, sensor_ids)
    labels = KMeans(n_clusters=cfg.n_clusters, n_init=10, random_state=seed % 2**32).fit_predict(points)
    order: dict[int, str] = {}
    for label in labels:  # clusters named in the order of their first sensor
        order.setdefault(int(label), f"cluster_{len(order) + 1}")
    return {sensor: order[int(label)] for sensor, label in zip(sensor_ids, labels)}, coordinates, "clusters"


def nearest_neighbours(districts: list[list[str]], coordinates: dict[str, tuple[float, float]]):
    """Consecutive sensors by coordinates, within each district (given as its sensor ids).

    Each sensor is paired with its nearest sensor, and with the nearest one on the other
    side of it (the direction to it at more than 90 degrees from the direction to the
    first): on a line of sensors, the one before and the one after.
    """
    pairs: list[tuple[str, str]] = []
    seen: set[frozenset] = set()
    everyone = [s for ids in districts for s in ids]
    plane = dict(zip(everyone, _plane(coordinates, everyone)))
    for ids in districts:
        if len(ids) < 2:
            continue
        points = np.array([plane[s] for s in ids])
        distance = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1))
        np.fill_diagonal(distance, np.inf)
        for a in range(len(ids)):
            first = int(np.argmin(distance[a]))
            chosen = [first]
            other_side = (points - points[a]) @ (points[first] - points[a]) < 0
            if other_side.any():
                chosen.append(int(np.flatnonzero(other_side)[np.argmin(distance[a][other_side])]))
            for b in chosen:
                key = frozenset((ids[a], ids[b]))
                if key not in seen:
                    seen.add(key)
                    pairs.append((ids[min(a, b)], ids[max(a, b)]))
    return pairs


def _plane(coordinates: dict[str, tuple[float, float]], sensor_ids: list[str]) -> np.ndarray:
    """[n, 2] points on a local plane: degrees of longitude shrink with the cosine of the latitude."""
    latlon = np.array([coordinates[sensor] for sensor in sensor_ids])
    scale = math.cos(math.radians(float(np.mean(latlon[:, 0]))))
    return np.stack([latlon[:, 1] * scale, latlon[:, 0]], axis=1)


def natural_key(name: str):
    """Sort 'district_2' before 'district_10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def shorten(value: object) -> str:
    """A value as it may appear inside a one-line error message."""
    flat = " ".join(str(value).split())
    return flat if len(flat) <= 40 else flat[:37] + "..."
