"""The traffic job's baselines beside federated training: persistence, the historical average,
each district alone (local-only) and the CENTRALIZED BASELINE (every district's training
windows pooled), the Keras ones with federated training's model, optimizer, batch size and
number of SGD steps."""

from __future__ import annotations

import numpy as np

from tff_apps.config import JobConfig
from traffic.data import TrafficData
from traffic.model import GRAPH_KINDS
from traffic.splits import HISTORY, HORIZON, district_splits, normalization, sensor_normalization, uses_sensor_scaling


def keras_forecaster(model):
    def predict(split) -> np.ndarray:
        x = split.examples("test")[0]
        chunk = 8192 // max(1, split.n_nodes)  # graph examples hold a district each
        outputs = [model(x[i : i + chunk], training=False).numpy() for i in range(0, len(x), chunk)]
        return split.to_mph(split.rows(np.concatenate(outputs)))

    return predict


def run_baselines(cfg: JobConfig, data: TrafficData, splits, bounds, stop=None, chain=None) -> dict[str, dict]:
    """Persistence, the historical average and the Keras baselines; `stop` (a threading.Event)
    set ends the Keras fits early (`alongside`); `chain`: the model as it stacks
    (`local_fits.stackable_chain`), to fit the local-only models side by side."""
    from traffic import evaluate

    reports = {
        "persistence": evaluate.evaluate_districts(splits, evaluate.persistence),
        "historical_average": evaluate.evaluate_districts(
            splits,
            evaluate.historical_average_fn({d.name: d.speeds for d in data.districts}, bounds["train"][1]),
        ),
    }
    fitter = baseline_fitter(cfg, splits[0].n_nodes, stop)  # one model, traced once, for every Keras baseline
    if cfg.evaluate.local_baseline:
        own_stats = (  # each district's own scale: its sensors' (as in federated training), or its own
            sensor_normalization(data, bounds["train"][1]) if uses_sensor_scaling(cfg)
            else normalization(cfg.replace("preprocess", normalization="per_site"), data, bounds["train"][1])
        )
        local_splits = district_splits(cfg, data, bounds, stats=own_stats)
        forecasts = local_forecasts(cfg, local_splits, fitter, chain, stop)
        reports["local_only"] = evaluate.evaluate_districts(local_splits, lambda s: forecasts[s.name])
    if cfg.evaluate.centralized_baseline:
        model = fit_forecaster(cfg, splits, sum(steps_of(cfg, s) for s in splits), cfg.job.seed, fitter)
        reports["centralized"] = evaluate.evaluate_districts(splits, keras_forecaster(model))
    return reports


def steps_of(cfg: JobConfig, split) -> int:
    """The SGD steps a district makes over the whole federated run (baselines get the same)."""
    per_round = cfg.train.local_steps or cfg.train.local_epochs * -(-split.n_examples() // cfg.train.batch_size)
    return cfg.train.rounds * per_round


def baseline_fitter(cfg: JobConfig, n_nodes: int, stop=None):
    """The model, optimizer and loss of federated training (graph models: one XLA program a step)."""
    import tensorflow as tf

    from traffic.evaluate import KerasBaselines
    from traffic.model import build_keras_model, masked_mae
    from traffic.windows import N_FEATURES

    optimizer = tf.keras.optimizers.Adam if cfg.train.client_optimizer == "adam" else tf.keras.optimizers.SGD
    build = lambda seed: build_keras_model(cfg.model, HISTORY, N_FEATURES, HORIZON, seed, n_nodes)  # noqa: E731
    return KerasBaselines(
        build, optimizer(cfg.train.client_learning_rate), masked_mae, cfg.model.kind in GRAPH_KINDS, stop=stop
    )


def fit_forecaster(cfg: JobConfig, splits, steps: int, seed: int, fitter):
    """CENTRALIZED BASELINE when given several districts: pools their training windows.

    The same model, optimizer, batch size and number of steps as federated training
    (a district alone: its own steps; pooled: the sum over districts).
    """
    from traffic.local_fits import batch_order

    pairs = [s.examples("train") for s in splits]
    x = np.concatenate([p[0] for p in pairs])
    y = np.concatenate([p[1] for p in pairs])
    return fitter.fit(x, y, batch_order(len(x), steps, cfg.train.batch_size, seed), cfg.train.batch_size, seed)


def local_forecasts(cfg: JobConfig, splits, fitter, chain=None, stop=None) -> dict[str, np.ndarray]:
    """Each district's forecasts by its own model, trained on its own windows: side by side
    where the model stacks (`chain`, traffic/local_fits.py), else one Keras fit after another."""
    from traffic.local_fits import fit_side_by_side

    seeds = [cfg.job.seed + i for i in range(len(splits))]
    if chain is None:  # each forecast is made before the next fit resets the model
        return {
            s.name: keras_forecaster(fit_forecaster(cfg, [s], steps_of(cfg, s), seed, fitter))(s)
            for s, seed in zip(splits, seeds)
        }
    districts = [(*s.examples("train"), steps_of(cfg, s), seed) for s, seed in zip(splits, seeds)]
    trained = fit_side_by_side(cfg.train, chain, fitter.build, districts, cfg.train.batch_size, stop)
    model = fitter.build(cfg.job.seed)
    forecasts = {}
    for s, weights in zip(splits, trained):
        model.set_weights(weights)
        forecasts[s.name] = keras_forecaster(model)(s)
    return forecasts
