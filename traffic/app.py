"""Traffic: speed forecasting across road districts (horizontal FL on time series)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared import profile
from shared.errors import UserError
from shared.files import write_text_atomic
from tff_apps.privacy import releases
from tff_apps.program import reporting
from tff_apps.config import JobConfig
from tff_apps.program.job import Run, data_fingerprint
from traffic.data import DataConfig, TrafficData, load
from traffic.model import GRAPH_KINDS, ModelConfig
from traffic.baselines import keras_forecaster, run_baselines
from traffic.splits import HISTORY, HORIZON, district_splits, uses_sensor_scaling, with_kind_defaults
from traffic.windows import split_bounds

MAE_60_LABEL = "MAE at 60 min (mph)"
MIN_STEPS = 10 * (HISTORY + HORIZON)  # every split (the smallest is 10 %) must hold a window


@dataclass
class Prepared:
    data: TrafficData


class TrafficApp:
    name = "traffic"
    description = "speed forecasting across road districts (horizontal FL, time series)"
    default_config = Path(__file__).with_name("default.toml")
    sections = {"data": DataConfig, "model": ModelConfig}
    horizontal = True
    supports_sites = True  # job.sites: traffic/sites.py, each road district a site
    # `demo --sites`: 3 districts of 2 weeks and 10 rounds keep the demo short (each round opens the sites' data)
    site_demo_overrides = ("data.n_districts=3", "data.days=14", "train.rounds=10")

    def prepare(self, cfg: JobConfig) -> Prepared:
        check_job(cfg)
        if cfg.job.sites:  # the readings stay at the sites: only their manifests come here
            from traffic import sites

            return sites.prepare(cfg)
        data = load_checked(cfg)
        if cfg.model.kind in GRAPH_KINDS and not any(d.graph is not None and d.graph.any() for d in data.districts):
            raise UserError(
                f"model.kind = '{cfg.model.kind}' needs the sensor graph but the data has no edge; set "
                "data.graph_path (a from,to,cost distance list or an adjacency matrix), give the metadata "
                "latitude/longitude columns, or use model.kind = 'mlp'"
            )
        return Prepared(data)

    def write_site_folder(self, cfg: JobConfig, out: Path, site: str = "") -> dict[str, Any]:
        """`tff-apps site prepare traffic --site DISTRICT`: the district's readings and graph."""
        from traffic import sites

        return sites.write_site_folder(load_checked(cfg), Path(out), site, windows_per_sensor)

    def client_rows(self, cfg: JobConfig, prepared: Prepared) -> dict[str, int]:
        """Training examples per district, as `district_splits` makes them (for [privacy]): sensor
        windows, or for the graph models time windows (each holds the whole district)."""
        sensors = prepared.sensors if cfg.job.sites else {d.name: len(d.sensor_ids) for d in prepared.data.districts}
        per_sensor = windows_per_sensor(prepared.schema["steps"] if cfg.job.sites else len(prepared.data.timestamps))
        return {name: per_sensor * (1 if cfg.model.kind in GRAPH_KINDS else n) for name, n in sensors.items()}

    def fingerprint(self, prepared: Prepared) -> str:
        if hasattr(prepared, "manifests"):
            from traffic import sites

            return sites.fingerprint(prepared)
        return describe_data(prepared.data)["fingerprint"]

    def public_config(self, cfg: JobConfig) -> dict[str, Any]:
        """summary.json's config: the settings the job trained with (its model kind's defaults applied)."""
        return with_kind_defaults(cfg, self.default_config).to_dict()

    def train(self, cfg: JobConfig, prepared: Prepared, run: Run) -> dict[str, Any]:
        from tff_apps.learning import federation

        cfg = with_kind_defaults(cfg, self.default_config)  # graph models: batch 8, learning rate 0.005
        if cfg.job.sites:  # every step that touches a reading runs at the districts' sites
            from traffic import sites

            outcome = train_across_sites(cfg, prepared, run, self.client_rows(cfg, prepared))
            described, profiled = sites.describe(prepared), {}
        else:
            # exact profiles are a release outside ε: not computed under DP (traffic has no DP profiles)
            wanted = cfg.privacy.level == "none" and cfg.privacy.profiles == "auto"
            profiled = profile.summary_entry(district_profiles(prepared.data)) if wanted else {}  # warnings logged
            # a graph model scales each sensor by its own statistics inside its district: none is released
            normalization = None if uses_sensor_scaling(cfg) else "speed_normalization"
            keys = releases.release_keys(
                normalization, bool(profiled), cfg.evaluate.centralized_baseline or cfg.evaluate.local_baseline
            )
            if run.privacy is not None:
                run.privacy.releases = keys
            outcome = train_and_evaluate(cfg, prepared.data, run, releases.statement_without_dp(cfg.privacy, keys))
            described = describe_data(prepared.data)
        summary = {
            "data": described,
            "rounds": outcome.rounds,
            "training_seconds": round(outcome.seconds, 3),
            **outcome.round_totals,
            "headline": "mae_60min",
            "results": outcome.reports,
            "privacy": outcome.privacy,
            **federation.robustness_entry(federation.of(cfg), list(described["districts"])),
            **profiled,
            **(outcome.extra or {}),
        }
        if outcome.personalization:
            summary["personalization"] = outcome.personalization
        if outcome.lineage is not None:
            summary["lineage"] = outcome.lineage
        if cfg.export.enabled and outcome.exported:
            from tff_apps.program.export import servable_dir

            summary["export"] = str(servable_dir(run.export_dir, self.name))
        table = reporting.results_table(outcome.reports, reporting.FORECAST_COLUMNS)
        sections = {  # across sites: no table of statistics of the readings
            **({"Data statistics against METR-LA": outcome.statistics_table} if outcome.statistics_table else {}),
            **reporting.client_sections(summary, "districts", MAE_60_LABEL),
        }
        write_text_atomic(
            run.dir / "report.md",
            reporting.markdown_report(run, summary, table, group="districts", metric="mae_60min", extra=sections),
        )
        summary["report"] = str(run.dir / "report.md")
        summary["report_html"] = str(html_report(run, summary, table, getattr(prepared, "data", None), sections))
        summary["table"] = table
        return summary


def load_checked(cfg: JobConfig) -> TrafficData:
    data = load(cfg.data, cfg.job.seed)
    if len(data.timestamps) < MIN_STEPS:
        raise UserError(
            f"data: {len(data.timestamps)} time steps are too few; at least {MIN_STEPS} "
            f"({MIN_STEPS * data.interval_minutes // 60} hours) are needed for the 70/10/20 split"
        )
    return data


def windows_per_sensor(n_steps: int, split: str = "train") -> int:
    """A sensor's windows in `split` (`make_windows`: history and targets inside the split)."""
    start, end = split_bounds(n_steps)[split]
    return max(0, end - HORIZON + 1 - (start + HISTORY))


def check_job(cfg: JobConfig) -> None:
    """What the traffic job refuses whatever its data (before any is read)."""
    if cfg.train.engine == "grouped" and cfg.model.kind not in ("mlp", "gru"):
        raise UserError(
            f"train.engine = 'grouped' runs chains of Dense layers (after a GRU or not); model.kind = "
            f"'{cfg.model.kind}' is not one, so use model.kind = 'mlp' or 'gru', or train.engine = 'tff' (or 'auto')"
        )
    if cfg.privacy.level == "record":
        raise UserError(
            "privacy.level = 'record' is not offered for traffic: a training example is a "
            "window and one reading lies in many windows, so per-example DP would not "
            "protect a reading; use privacy.level = 'client'"
        )


def html_report(run: Run, summary: dict[str, Any], table: str, data: TrafficData | None, sections: dict[str, str]) -> Path:
    """report.html: MAE per round, per-district MAE, and 60-min forecasts of 3 sensors (not
    across sites, `data` None: they would show a sensor's readings)."""
    from traffic.evaluate import forecast_series

    forecasts = None
    if data is not None:
        picks = [(d.name, 0) for d in data.districts[:3]] if len(data.districts) >= 3 else [
            (data.districts[0].name, i) for i in range(min(3, len(data.districts[0].sensor_ids)))
        ]
        sensor_ids = {d.name: list(d.sensor_ids) for d in data.districts}
        forecasts = forecast_series(summary["results"]["federated"], data.timestamps, picks, sensor_ids)
    return reporting.html_report(
        run, summary, table, round_metric="val_mae_60min", round_metric_split="validation",
        final_metric=lambda r: r["overall"]["mae_60min"], metric_label=MAE_60_LABEL,
        group="districts", client_metric="mae_60min", client_metric_label=MAE_60_LABEL,
        forecasts=forecasts,
        forecast_title="Federated 60-minute forecast against actual speed (first 2 test days)",
        forecast_ylabel="speed (mph)", extra=sections,
    )


@dataclass
class Outcome:
    reports: dict[str, dict]
    rounds: int
    seconds: float
    exported: bool
    statistics_table: str
    privacy: Any = "none"
    lineage: dict[str, Any] | None = None
    round_totals: dict[str, Any] | None = None  # summary's communication and participation (`round_summary.rounds_summary`)
    personalization: dict[str, Any] | None = None  # [personalization]: district -> before/after MAE
    extra: dict[str, Any] | None = None  # across sites: summary.json's across_sites and baselines_not_run


def train_and_evaluate(cfg: JobConfig, data: TrafficData, run: Run, plain_statement=None) -> Outcome:
    """Federated training, then the four baselines, on the same test windows. The privacy
    statement is the DP run's, or `plain_statement` (a run without DP)."""
    # TF and TFF load here, once config and data are known to be valid.
    from tff_apps.learning import federation
    from tff_apps.learning import factory
    from tff_apps.program import round_summary
    from tff_apps.program import round_loop
    from tff_apps.program.alongside import alongside
    from tff_apps.learning import client_data
    from traffic import evaluate
    from traffic.local_fits import stackable_chain
    from traffic.model import build_keras_model, tff_model_fn
    from traffic.windows import N_FEATURES

    bounds = split_bounds(len(data.timestamps))
    splits = district_splits(cfg, data, bounds)
    clients = [client_data.ClientTrainData(s.name, *s.examples("train")) for s in splits]
    settings = federation.of(cfg)  # [communication], [clients], [robustness], [personalization]
    clients = federation.flip_bad_labels(settings, clients, mirror_speeds)  # [robustness]
    n_nodes = splits[0].n_nodes
    model_fn = tff_model_fn(cfg.model, HISTORY, N_FEATURES, HORIZON, cfg.job.seed, n_nodes)
    process = factory.build_learning_process(
        cfg.train, model_fn, privacy=run.privacy, secure=factory.secure_aggregation(cfg, clients),
        federation=settings, client_names=[c.name for c in clients],
    )
    # Keras swaps its model classes' base classes (globally) to the mode each model is built in:
    # a model built in a tf.Graph (TFF's tracing, `stackable_chain`) leaves them in graph mode until
    # the next eager build, and an eager model called meanwhile, here or in the baselines' thread,
    # fails ("Your Layer or Model is in an invalid state"). So every graph-mode build comes first.
    chain = stackable_chain(model_fn) if cfg.evaluate.local_baseline else None
    global_model = build_keras_model(cfg.model, HISTORY, N_FEATURES, HORIZON, cfg.job.seed, n_nodes)
    stats = {s.name: (s.mean, s.std) for s in splits}  # the test splits' normalization and training windows
    validation = district_splits(cfg, data, bounds, evaluate_on="validation", stats=stats, reuse=splits)

    def evaluate_round(weights) -> dict[str, float]:
        weights.assign_weights_to(global_model)
        report = evaluate.evaluate_districts(validation, keras_forecaster(global_model))
        return {f"val_{k}": v for k, v in report["overall"].items() if k.startswith(("mae", "rmse"))}

    def federated():
        trained = round_loop.run_rounds(
            process, clients, cfg.train, cfg.job.seed, run.dir, evaluate_round, "val_mae_60min",
            privacy=run.privacy, init_from=run.init_from, federation=settings,
        )
        trained.weights.assign_weights_to(global_model)
        return trained, evaluate.evaluate_districts(splits, keras_forecaster(global_model))

    # the baselines share nothing with the rounds (TFF's worker runs those): trained beside them
    (result, federated_report), baselines = alongside(
        lambda stop: run_baselines(cfg, data, splits, bounds, stop, chain), federated
    )
    privacy = result.privacy if run.privacy is not None else plain_statement
    reports = {"federated": federated_report, **baselines}
    personalized = personalize_districts(cfg, splits, model_fn, result.weights) if cfg.personalization.epochs else None
    exported = False
    # the serving signature takes one sensor's hour; a graph model needs its district's (not offered yet)
    if cfg.export.enabled and cfg.preprocess.normalization == "federated" and not uses_sensor_scaling(cfg):
        export_forecaster(
            run, cfg, global_model, splits[0], data_card(data), len(result.history), reports["federated"], privacy,
            weights=result.weights, lineage=result.lineage,
        )
        exported = True
    return Outcome(
        reports, len(result.history), result.seconds, exported, statistics_table(data), privacy,
        result.lineage, round_summary.rounds_summary(result.history, settings, result.engine), personalization=personalized,
    )


def train_across_sites(cfg: JobConfig, prepared, run: Run, rows: dict[str, int]) -> Outcome:
    """Training, evaluation and baselines at the districts' sites (traffic/sites.py)."""
    from traffic import sites
    from traffic.evaluate import DistrictSplit

    done = sites.train(cfg, prepared, run, rows, HISTORY, HORIZON)
    result, exported = done["result"], cfg.export.enabled and not done["graph"]  # as simulated: no graph export
    if exported:  # the serving graph needs only the federated normalization
        federation = DistrictSplit("federation", None, None, done["mean"], done["std"])
        export_forecaster(
            run, cfg, done["model"], federation, sites.data_card(prepared), len(result.history),
            done["reports"]["federated"], done["privacy"], weights=result.weights, lineage=result.lineage,
        )
    return Outcome(
        done["reports"], len(result.history), result.seconds, exported, "", done["privacy"], result.lineage,
        done["rounds_summary"], done["personalization"], extra=done["summary"],
    )


def district_profiles(data: TrafficData) -> dict[str, dict[str, Any]]:
    """Each district profiles its raw training readings (one column per sensor, NaN =
    missing; the forecast target is the speed itself); only these aggregates leave it."""
    end = split_bounds(len(data.timestamps))["train"][1]
    return {
        d.name: profile.profile(pd.DataFrame(d.speeds[:end], columns=d.sensor_ids), d.speeds[:end], "regression")
        for d in data.districts
    }


def personalize_districts(cfg: JobConfig, splits, model_fn, weights) -> dict[str, dict[str, float]]:
    """[personalization]: each district fine-tunes the global model on its own (unmirrored)
    training windows; the MAE at 60 min of both models on its test windows. The district
    computes it on normalized speeds; times its std (the normalization's) it is in mph."""
    from tff_apps.learning import personalization
    from traffic.evaluate import HORIZONS

    clients = [personalization.ClientSplit(s.name, *s.examples("train"), *s.examples("test")) for s in splits]
    by_sensor = uses_sensor_scaling(cfg)  # a graph model: each sensor its own std, its errors weighed by it
    results = personalization.personalize(
        model_fn, weights, clients, personalization.masked_mae_at(HORIZONS["60min"] - 1, splits[0].n_nodes if by_sensor else 0),
        cfg.personalization, cfg.train, cfg.job.seed,
    )
    std = {s.name: s.std for s in splits}

    def mph(metrics: dict, name: str) -> float:
        if by_sensor:
            return float(np.sum(metrics["error_by_node"] * std[name]) / np.sum(metrics["observed_by_node"]))
        return metrics["mae"] * std[name]

    return {name: {when: mph(r[when], name) for when in ("before", "after")} for name, r in results.items()}


def mirror_speeds(normalized_targets: np.ndarray) -> np.ndarray:
    """[robustness] label_flip for a forecast: the bad district's training targets mirrored
    about the normalization mean (z -> -z). Like 1 - y for a diagnosis, the target then says
    the opposite of what the history implies (a jam ahead becomes free flow and back), while
    its scale and spread stay plausible, so no range check would catch it. Missing readings
    (NaN) stay missing; the district's test windows keep the true speeds."""
    return -normalized_targets


def export_forecaster(
    run: Run, cfg: JobConfig, model, split, source: dict[str, Any], rounds: int, report: dict, privacy="none",
    weights=None, lineage=None,
) -> None:
    """`source`: the card's entries about the data (`data_card`, or `sites.data_card` across sites)."""
    from tff_apps.program.export import export_module, servable_dir
    from traffic.model import serving_module

    interval_minutes = source["interval_minutes"]
    module = serving_module(model, split.mean, split.std, HISTORY, interval_minutes)
    card = {
        "app": "traffic",
        "task": f"speed forecast for the next {HORIZON} steps of {interval_minutes} min, in the input's units",
        **{key: value for key, value in source.items() if key != "interval_minutes"},
        "rounds": rounds,
        "config": cfg.to_dict(),
        "metrics": report["overall"],
        "privacy": privacy,
        "input_types": {"timestamp": "datetime"},
        "output_columns": [f"forecast_{(k + 1) * interval_minutes}min" for k in range(HORIZON)],
        "lineage": lineage,
        "serving_check": serving_check(model, split, interval_minutes),
    }
    export_module(servable_dir(run.export_dir, "traffic"), module, "forecast", card, weights=weights)


# A weekday morning peak, a weekday evening and a weekend night (the latest reading's time).
SERVING_CHECK_TIMES = ("2012-03-05 08:00:00", "2012-03-05 17:30:00", "2012-03-10 03:00:00")


def serving_check(model, split, interval_minutes: int) -> dict[str, Any]:
    """Three made-up hours of one sensor, built only from the normalization the serving graph
    releases anyway (`split.mean`, `split.std`): steady at the mean, falling by one std over
    the hour, rising by one std with a missing reading (0) in the middle; by serving input
    name (speed_lag_k = k steps before the latest reading, `timestamp` = its epoch seconds),
    with the in-run model's forecasts for them in the input's units. No client's readings."""
    from traffic.windows import epoch_seconds, history_window

    ramp = np.linspace(0.0, 1.0, HISTORY)  # oldest first
    lags = split.mean + split.std * np.stack([np.zeros(HISTORY), -ramp, ramp - 0.5])
    lags[2, HISTORY // 2] = 0.0
    seconds = epoch_seconds(pd.DatetimeIndex(SERVING_CHECK_TIMES))
    x = history_window(lags, seconds, split.mean, split.std, interval_minutes)
    inputs = {f"speed_lag_{HISTORY - 1 - i}": lags[:, i].astype(float).tolist() for i in range(HISTORY)}
    inputs["timestamp"] = [float(t) for t in seconds]
    outputs = split.to_mph(model(x, training=False).numpy())
    return {"inputs": inputs, "outputs": outputs.astype(float).tolist()}


def statistics_table(data: TrafficData) -> str:
    from traffic.calibration import compare_to_targets, statistics

    rows = [[key, generated, target, difference] for key, generated, target, difference in compare_to_targets(statistics(data))]
    return reporting.markdown_table(["statistic", "this data", "METR-LA", "relative difference"], rows)


def data_card(data: TrafficData) -> dict[str, Any]:
    return {
        "interval_minutes": data.interval_minutes, "data_fingerprint": describe_data(data)["fingerprint"],
        "data_source": data.description,
    }


def district_fingerprint(district) -> str:
    """Each district hashes its own readings; the job's fingerprint combines these hashes."""
    digest = hashlib.sha256()
    digest.update(district.name.encode() + b"\0" + "\0".join(district.sensor_ids).encode())
    digest.update(np.ascontiguousarray(np.nan_to_num(district.speeds, nan=-1.0), dtype="<f8").tobytes())
    return digest.hexdigest()


def describe_data(data: TrafficData) -> dict[str, Any]:
    return {
        "source": data.description,
        "steps": len(data.timestamps),
        "start": str(data.timestamps[0]),
        "end": str(data.timestamps[-1]),
        "interval_minutes": data.interval_minutes,
        "fingerprint": data_fingerprint([district_fingerprint(d) for d in data.districts]),
        "districts": {
            d.name: {"sensors": len(d.sensor_ids), "missing_share": float(np.isnan(d.speeds).mean())}
            for d in data.districts
        },
    }


APP = TrafficApp()
