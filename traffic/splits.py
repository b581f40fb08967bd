"""Each district's speeds scaled and cut into windows: the `DistrictSplit`s the job trains and
evaluates on; and the training settings a model kind takes by default (`with_kind_defaults`).

Two scalings (`uses_sensor_scaling` says which a job takes):

- one mean and std a district (`preprocess.normalization`: the federation's, through secure
  sum, or the district's own): every sensor's speeds on the same scale;
- each sensor its own mean and std of its training readings, computed in its district
  (nothing leaves it). A model whose weights are shared by every sensor, as the graph models'
  are, cannot tell a sensor that runs at 58 mph from one that runs at 67 and so forecasts the
  hour ahead as if every sensor had the district's (or the federation's) typical speed; with
  each sensor's own scale, "back to its usual speed" is the same number (0) for all of them.
  Measured on the default data: dcrnn federated MAE at 60 min 4.495 -> 4.274 (docs/traffic.md).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from traffic.model import GRAPH_KINDS

HISTORY = HORIZON = 12  # one hour in, one hour out, at 5-minute steps

# The graph models' [train] defaults (docs/traffic.md, "Graph models: training defaults"). A graph
# example is a whole district, so 8 of them hold about as many sensor windows as the MLP's batch of
# 64; the client learning rate is the best of 0.002, 0.005 and 0.01 on the validation split.
GRAPH_TRAIN_DEFAULTS = {"batch_size": 8, "client_learning_rate": 0.005}


def with_kind_defaults(cfg, default_file: Path):
    """The job with its model kind's [train] defaults: a key the job leaves at the default file's
    value (the MLP's: the engine cannot tell a key set to that value from one left unset) takes the
    kind's default; any other value is the user's and stays. `mlp` and `gru` take the file's."""
    if cfg.model.kind not in GRAPH_KINDS:
        return cfg
    file_train = tomllib.loads(Path(default_file).read_text(encoding="utf-8")).get("train", {})
    changes = {
        key: value for key, value in GRAPH_TRAIN_DEFAULTS.items()
        if key in file_train and getattr(cfg.train, key) == file_train[key]
    }
    return cfg.replace("train", **changes) if changes else cfg


def uses_sensor_scaling(cfg) -> bool:
    """The graph models scale each sensor by its own statistics (in simulation: across sites, the
    sites' windows take the federation's scale, traffic/sites.py); `mlp` and `gru` by the district's."""
    return cfg.model.kind in GRAPH_KINDS


def normalization(cfg, data, train_end: int) -> dict[str, tuple[float, float]]:
    """District -> (mean, std) of its training speeds: federated (secure sum) or its own."""
    from tff_apps.learning import preprocessing

    columns = [d.speeds[:train_end].reshape(-1, 1) for d in data.districts]
    if cfg.preprocess.normalization == "federated":
        moments = preprocessing.federated_moments(columns)
        stats = (float(moments.mean[0]), float(np.sqrt(moments.var[0])))
        return {d.name: stats for d in data.districts}
    own = [preprocessing.local_moments(c) for c in columns]
    return {d.name: (float(m.mean[0]), float(np.sqrt(m.var[0]))) for d, m in zip(data.districts, own)}


def sensor_normalization(data, train_end: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """District -> (mean, std) [sensors] of each sensor's training speeds, computed by the district.
    A sensor with fewer than two training readings, or readings that never vary, takes its
    district's mean and std (its own would be undefined or divide by zero)."""
    stats = {}
    for district in data.districts:
        train = district.speeds[:train_end]
        observed = ~np.isnan(train)
        count = observed.sum(axis=0)
        filled = np.where(observed, train, 0.0)
        mean = filled.sum(axis=0) / np.maximum(count, 1)
        variance = np.where(observed, (train - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count, 1)
        usable = (count >= 2) & (variance > 0)
        district_mean, district_std = float(np.nanmean(train)), float(np.nanstd(train))
        stats[district.name] = (
            np.where(usable, mean, district_mean), np.where(usable, np.sqrt(variance), district_std)
        )
    return stats


def district_splits(cfg, data, bounds, evaluate_on: str = "test", stats=None, reuse=None):
    """Per district: training windows (`reuse`'s if given) and evaluation windows, scaled with
    `stats` (district -> (mean, std), scalars or one a sensor), by default the job's scaling."""
    from traffic import typical
    from traffic.evaluate import DistrictSplit
    from traffic.windows import epoch_seconds, make_windows

    train_end = bounds["train"][1]
    if not stats:
        stats = sensor_normalization(data, train_end) if uses_sensor_scaling(cfg) else normalization(cfg, data, train_end)
    seconds = epoch_seconds(data.timestamps)
    # graph models: every district padded to the largest one's sensors (TFF needs one input shape)
    n_nodes = max(len(d.sensor_ids) for d in data.districts) if cfg.model.kind in GRAPH_KINDS else 0
    splits = []
    for i, district in enumerate(data.districts):
        mean, std = stats[district.name]
        normalized = (district.speeds - mean) / std  # a sensor's own scale broadcasts over time
        train = reuse[i].train if reuse else make_windows(normalized, seconds, bounds["train"], HISTORY, HORIZON)
        held_out = make_windows(normalized, seconds, bounds[evaluate_on], HISTORY, HORIZON)
        if n_nodes:  # each sensor's typical speed, from the district's own training readings
            table = typical.typical_table(normalized, seconds, train_end, data.interval_minutes)
            for windows in (train, held_out) if not reuse else (held_out,):
                steps = windows.target_start[:, None] + np.arange(-HISTORY, HORIZON)[None, :]
                windows.typical = typical.typical_at(table, seconds, steps, windows.sensor, data.interval_minutes)
        graph = district.graph if district.graph is not None else np.zeros((len(district.sensor_ids),) * 2)
        splits.append(DistrictSplit(district.name, train, held_out, mean, std, graph, n_nodes))
    return splits
