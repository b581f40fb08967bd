"""The sensor graph: from the formats public traffic data ship in, cut at district borders.

Three sources, all giving one weighted, directed matrix W over the speeds file's sensors
(W[i, j] > 0: an edge from sensor i to sensor j; the diagonal is 0, models add self-loops):

``distances`` (DCRNN's ``distances_la_2012.csv``, ``distances_bay_2017.csv``)
    A CSV with columns ``from,to,cost``: the road distance from one sensor to another
    (DCRNN: metres along the road). DCRNN's recipe turns it into a thresholded Gaussian
    kernel: W = exp(-(cost / sd)^2) with sd the standard deviation of the listed costs
    between the speeds file's sensors, and weights below ``threshold`` (DCRNN: 0.1) set
    to 0. Pairs that are not listed have no edge; rows naming sensors that are not in the
    speeds file are ignored (DCRNN's file lists more sensors than METR-LA keeps).
``adjacency`` (T-GCN's ``los_adj.csv``, ``sz_adj.csv``)
    A dense square CSV of weights whose rows and columns are in the speeds file's sensor
    order, without a header (T-GCN's files); a header row, if present, must name the
    speeds file's sensors and then sets the order.
``coordinates`` (a metadata file with latitude and longitude only)
    Each sensor is joined to its ``k`` nearest sensors by great-circle distance, with the
    Gaussian kernel above (sd of those k-nearest distances), made symmetric.

Each district is one client and sees only its own sensors' readings: an edge between two
districts would need the other agency's data, so it is cut (`cut_at_districts` counts
the cut edges for the data description). Nothing here imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.tabular import MISSING_TOKENS, numeric_columns, read_csv, require_columns

__all__ = [
    "gaussian_kernel", "from_distances", "read_distances", "read_adjacency", "from_coordinates",
    "cut_at_districts", "edge_pairs", "write_distances",
]

EARTH_RADIUS_M = 6_371_000.0
DISTANCE_COLUMNS = ("from", "to", "cost")


def gaussian_kernel(cost: np.ndarray, threshold: float) -> np.ndarray:
    """DCRNN's kernel: exp(-(cost / sd)^2), sd over the finite costs; below `threshold` -> 0.

    `cost` is [n, n] with inf where there is no edge; the diagonal is ignored.
    """
    cost = np.array(cost, dtype=np.float64)
    np.fill_diagonal(cost, np.inf)
    finite = cost[np.isfinite(cost)]
    if finite.size == 0:
        return np.zeros_like(cost)
    sd = float(finite.std())
    if sd <= 0:  # every listed pair equally far: the kernel would divide by 0; all edges weigh the same
        sd = float(finite.mean()) or 1.0
    weights = np.exp(-np.square(cost / sd))
    weights[weights < threshold] = 0.0
    return weights


def read_distances(path: Path, sensor_ids: list[str]) -> np.ndarray:
    """[n, n] costs (inf = not listed) between the speeds file's sensors from a from,to,cost CSV."""
    df = read_csv(path)
    source = str(path)
    require_columns(df, list(DISTANCE_COLUMNS), source)
    ends = {}
    for column in ("from", "to"):
        text = df[column].astype(str).str.strip()
        # DCRNN writes sensor ids as integers; pandas may read them back as 773869.0
        text = text.str.replace(r"^(\d+)\.0$", r"\1", regex=True)
        empty = np.flatnonzero(text.isin(MISSING_TOKENS).to_numpy())
        if len(empty):
            raise UserError(f"{source}: column '{column}' is empty at row {empty[0] + 1}; every row needs two sensor ids")
        ends[column] = text.to_numpy()
    cost = numeric_columns(df, ["cost"], source)["cost"].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~(cost >= 0))
    if len(bad):
        raise UserError(
            f"{source}: column 'cost' row {bad[0] + 1} is {df['cost'].iloc[bad[0]]!r}; costs must be distances >= 0"
        )
    return from_distances(ends["from"], ends["to"], cost, sensor_ids, source)


def from_distances(start, end, cost, sensor_ids: list[str], source: str) -> np.ndarray:
    """[n, n] cost matrix (inf = no edge); rows naming unknown sensors are ignored."""
    index = {sensor: i for i, sensor in enumerate(sensor_ids)}
    rows = np.array([index.get(str(s), -1) for s in start])
    cols = np.array([index.get(str(s), -1) for s in end])
    known = (rows >= 0) & (cols >= 0)
    if not known.any():
        raise UserError(
            f"{source}: no row joins two sensors of the speeds file (e.g. '{sensor_ids[0]}'); check that the "
            "'from' and 'to' columns hold the speeds file's sensor ids"
        )
    matrix = np.full((len(sensor_ids), len(sensor_ids)), np.inf)
    # a pair listed twice keeps its shortest distance
    np.minimum.at(matrix, (rows[known], cols[known]), np.asarray(cost, dtype=np.float64)[known])
    return matrix


def read_adjacency(path: Path, sensor_ids: list[str]) -> np.ndarray:
    """[n, n] weights from a dense CSV in the speeds file's sensor order (diagonal set to 0)."""
    source = str(path)
    if not path.is_file():
        raise UserError(f"{source}: file not found; give the adjacency matrix CSV")
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{source}: cannot be read as a CSV matrix ({str(error).splitlines()[0]})") from None
    first = raw.iloc[0].str.strip() if len(raw) else pd.Series(dtype=str)
    header = None
    # a header row: text, or the sensor ids themselves (METR-LA's ids are numbers)
    if len(first) and (pd.to_numeric(first, errors="coerce").isna().any() or set(first) == set(sensor_ids)):
        header, raw = list(first), raw.iloc[1:]
    n = len(sensor_ids)
    if raw.shape != (n, n):
        raise UserError(
            f"{source}: has {raw.shape[0]} rows and {raw.shape[1]} columns of weights but the speeds file has "
            f"{n} sensors; give an {n} x {n} matrix in the speeds file's sensor order"
        )
    values = pd.DataFrame(raw.to_numpy(), columns=[f"column {j + 1}" for j in range(n)])
    weights = numeric_columns(values, list(values.columns), source).to_numpy(dtype=np.float64)
    bad = np.argwhere(~(weights >= 0))
    if len(bad):
        r, c = bad[0]
        raise UserError(f"{source}: row {r + 1}, column {c + 1} is not a weight >= 0; write 0 for no edge")
    if header is not None:
        order = _header_order(header, sensor_ids, source)
        weights = weights[np.ix_(order, order)]
    np.fill_diagonal(weights, 0.0)
    return weights


def _header_order(header: list[str], sensor_ids: list[str], source: str) -> np.ndarray:
    names = [str(h).strip() for h in header]
    missing = [s for s in sensor_ids if s not in names]
    if missing or len(set(names)) != len(names):
        raise UserError(
            f"{source}: its header row does not name each of the speeds file's sensors once (e.g. "
            f"'{(missing or names)[0]}'); remove the header or list the sensor ids"
        )
    position = {name: i for i, name in enumerate(names)}
    return np.array([position[s] for s in sensor_ids])


def from_coordinates(latitude: np.ndarray, longitude: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """Symmetric [n, n] weights: each sensor's k nearest by great-circle distance, Gaussian kernel."""
    n = len(latitude)
    distance = great_circle(latitude, longitude)
    np.fill_diagonal(distance, np.inf)
    k = min(k, n - 1)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
    cost = np.full((n, n), np.inf)
    rows = np.repeat(np.arange(n), k)
    cost[rows, nearest.ravel()] = distance[rows, nearest.ravel()]
    weights = gaussian_kernel(cost, threshold)
    return np.maximum(weights, weights.T)


def great_circle(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """[n, n] haversine distances in metres."""
    lat, lon = np.radians(np.asarray(latitude, float)), np.radians(np.asarray(longitude, float))
    dlat = lat[:, None] - lat[None, :]
    dlon = lon[:, None] - lon[None, :]
    h = np.sin(dlat / 2) ** 2 + np.cos(lat)[:, None] * np.cos(lat)[None, :] * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def cut_at_districts(weights: np.ndarray, district_of: list[str]) -> tuple[np.ndarray, int]:
    """(weights without edges between districts, number of sensor pairs whose edge was cut)."""
    labels = np.asarray(district_of)
    across = labels[:, None] != labels[None, :]
    linked = (weights > 0) | (weights.T > 0)
    cut = int(np.triu(linked & across, 1).sum())
    return np.where(across, 0.0, weights), cut


def edge_pairs(weights: np.ndarray, sensor_ids: list[str]) -> list[tuple[str, str]]:
    """Unordered sensor pairs joined by an edge in either direction."""
    linked = np.triu((weights > 0) | (weights.T > 0), 1)
    return [(sensor_ids[a], sensor_ids[b]) for a, b in zip(*np.nonzero(linked))]


def write_distances(path: Path, rows: list[tuple[str, str, float]]) -> None:
    """A from,to,cost CSV (DCRNN's format) from (from, to, cost) rows."""
    pd.DataFrame(rows, columns=list(DISTANCE_COLUMNS)).to_csv(path, index=False)
