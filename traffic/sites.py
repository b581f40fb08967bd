"""Traffic across sites (`job.sites`): each road district runs a site next to its data folder
(`tff-apps site prepare traffic --site DISTRICT`), and this coordinator trains through TFF
computations that run at the sites (`traffic/site_computations.py`). It never reads a reading:
it sees manifests (time range, interval, sensor count), the secure-summed normalization
statistics, model updates and per-district sums of forecast errors.

What differs from a simulation of the same districts: metrics come from sums computed at
each site (the same values); the centralized baseline cannot exist (it would pool the
districts' windows); the local-only baseline trains at each site with TFF's client work and
the federation's normalization (not Keras with the district's own); what the simulation's
report shows of raw readings (forecast plots of sensors, the statistics against METR-LA,
the data profiles) is left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UserError
from tff_apps.config import JobConfig

FORMAT = "tff-apps-site-v1"  # as `tff_apps.sites.site_data`; the files inside are traffic's own
LEFT_OUT = {"centralized": "n/a across sites: it would pool every district's windows"}


@dataclass
class SitesPrepared:
    sites: list  # tff_apps.sites.sites_config.SiteRef, in the file's order
    manifests: list[dict[str, Any]]

    @property
    def schema(self) -> dict[str, Any]:
        return self.manifests[0]["schema"]

    @property
    def sensors(self) -> dict[str, int]:
        return {site.name: int(m["sensors"]) for site, m in zip(self.sites, self.manifests)}


# ------------------------------------------------------------------ at the site


def write_site_folder(data, out: Path, site: str, windows_per_sensor) -> dict[str, Any]:
    """`tff-apps site prepare traffic`: one district of the loaded data (`traffic.data.load`,
    checked as for a simulation) into `out`: `series.tfrecord` (its speeds, their epoch
    seconds, its graph), `sensors.json` (its sensor ids) and `manifest.json`. Atomic."""
    from traffic.site_computations import SERIES, write_series
    from traffic.windows import epoch_seconds

    names = [d.name for d in data.districts]
    if site not in names:
        given = f"--site {site!r} is not in the data" if site else "give --site"
        raise UserError(f"site prepare: {given}; the data holds districts {', '.join(names)}")
    district = data.districts[names.index(site)]
    graph = district.graph if district.graph is not None else np.zeros((len(district.sensor_ids),) * 2)
    schema = {
        "app": "traffic", "kind": "speed series", "interval_minutes": int(data.interval_minutes),
        "start": str(data.timestamps[0]), "end": str(data.timestamps[-1]), "steps": len(data.timestamps),
    }
    manifest = {
        "format": FORMAT, "site": site, "schema": schema, "schema_fingerprint": _fingerprint(schema),
        "sensors": len(district.sensor_ids), "edges": int(np.count_nonzero(graph)),
        "rows": {split: windows_per_sensor(len(data.timestamps), split) * len(district.sensor_ids)
                 for split in ("train", "test")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_series(staging / SERIES, district.speeds, epoch_seconds(data.timestamps), graph)
        (staging / "sensors.json").write_text(json.dumps(district.sensor_ids), encoding="utf-8")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _fingerprint(schema: dict[str, Any]) -> str:
    """What districts must share to train together: the interval and the time range (the
    70/10/20 split is by time); the sensor count is each district's own."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ at the coordinator


def prepare(cfg: JobConfig) -> SitesPrepared:
    """Reads each district's manifest at its site and checks that the districts can train together."""
    from tff_apps.sites.connect import sites_and_manifests
    from traffic.model import GRAPH_KINDS

    check_supported(cfg)
    sites, manifests = sites_and_manifests(cfg)
    _check_aligned(sites, manifests)
    if cfg.model.kind in GRAPH_KINDS and not any(m["edges"] for m in manifests):
        raise UserError(
            f"model.kind = '{cfg.model.kind}' needs the sensor graph but no district's site has an edge; prepare "
            "the sites with data.graph_path or the metadata's coordinates, or use model.kind = 'mlp'"
        )
    return SitesPrepared(sites, manifests)


def check_supported(cfg: JobConfig) -> None:
    """What does not run across sites yet, refused before anything starts."""
    from tff_apps.sites.connect import refuse_what_sites_do_not_run

    refuse_what_sites_do_not_run(cfg, "traffic", "the districts' windows", {
        "preprocess.normalization = 'per_site' (no single serving normalization)":
            cfg.preprocess.normalization != "federated",
        "privacy.preprocessing = 'dp' (DP statistics are not released at the sites yet)":
            cfg.privacy.preprocessing == "dp",
    })


def _check_aligned(sites, manifests) -> None:
    """One line naming the first district whose readings cannot train with the first site's."""
    first, name = manifests[0].get("schema", {}), sites[0].name
    for site, manifest in zip(sites, manifests):
        schema = manifest.get("schema", {})
        if schema.get("app") != "traffic":
            raise UserError(f"site {site.name}: its data folder {site.data} holds {schema.get('app')!r} data, not traffic")
        if schema["interval_minutes"] != first["interval_minutes"]:
            raise UserError(
                f"site {site.name}: its readings are {schema['interval_minutes']} min apart, site {name}'s "
                f"{first['interval_minutes']} min; every district must prepare readings at the same interval"
            )
        if manifest["schema_fingerprint"] != manifests[0]["schema_fingerprint"]:
            raise UserError(
                f"site {site.name}: its readings run from {schema['start']} to {schema['end']} ({schema['steps']} steps), "
                f"site {name}'s from {first['start']} to {first['end']} ({first['steps']} steps); every district "
                "must prepare the same time range (the train/validation/test split is by time)"
            )


def fingerprint(prepared: SitesPrepared) -> str:
    """The federation's data, as the manifests describe it (the readings stay at the sites)."""
    described = [[s.name, m["schema_fingerprint"], m["sensors"], m["created"]] for s, m in zip(prepared.sites, prepared.manifests)]
    return hashlib.sha256(json.dumps(described).encode("utf-8")).hexdigest()


def describe(prepared: SitesPrepared) -> dict[str, Any]:
    """summary.json's "data" across sites: no missing shares (they would be read from the readings)."""
    from tff_apps.sites.site_training import describe_sites

    schema = prepared.schema
    return {
        "source": f"{len(prepared.sites)} sites", "steps": schema["steps"], "start": schema["start"],
        "end": schema["end"], "interval_minutes": schema["interval_minutes"], "fingerprint": fingerprint(prepared),
        "districts": {name: {"sensors": count} for name, count in prepared.sensors.items()},
        "sites": describe_sites(prepared.sites, prepared.manifests),
    }


def data_card(prepared: SitesPrepared) -> dict[str, Any]:
    """The export's model card: the data, and the sites the model was trained across."""
    return {
        "interval_minutes": prepared.schema["interval_minutes"], "data_source": f"{len(prepared.sites)} sites",
        "data_fingerprint": fingerprint(prepared),
        "trained_across_sites": {site.name: site.address for site in prepared.sites},
    }


def train(cfg: JobConfig, prepared: SitesPrepared, run, rows: dict[str, int], history: int, horizon: int) -> dict:
    """The traffic job with every step that touches a reading at the districts' sites."""
    from tff_apps.learning import factory, federation
    from tff_apps.privacy import releases
    from tff_apps.program import round_loop, round_summary
    from tff_apps.sites import site_training
    from tff_apps.sites.masked_rounds import masking_entry
    from traffic.model import build_keras_model, tff_model_fn
    from traffic.windows import N_FEATURES

    keys = releases.release_keys("speed_normalization", False, cfg.evaluate.local_baseline)  # no profiles, no pooling
    if run.privacy is not None:
        run.privacy.releases = keys  # the DP statement lists them too
    windowing = federated_windowing(cfg, prepared, history, horizon)
    clients = [site_training.SiteClient(site.name, rows[site.name], site.data) for site in prepared.sites]
    settings = federation.of(cfg)
    model_fn = tff_model_fn(cfg.model, history, N_FEATURES, horizon, cfg.job.seed, windowing.n_nodes)
    process = factory.build_learning_process(
        cfg.train, model_fn, privacy=run.privacy, secure=factory.secure_aggregation(cfg, clients),
        federation=settings, client_names=[c.name for c in clients],
    )
    site_process = _site_process(cfg, process, windowing, clients, prepared, run)
    evaluation = DistrictEvaluation(site_process, model_fn, windowing, clients)

    def evaluate_round(weights) -> dict[str, float]:  # the simulation's: validation windows, MAE and RMSE
        overall = evaluation.report(weights, "validation", skip=site_process.lost)["overall"]
        return {f"val_{k}": v for k, v in overall.items() if k.startswith(("mae", "rmse"))}

    result = round_loop.run_rounds(
        site_process, clients, cfg.train, cfg.job.seed, run.dir, evaluate_round, "val_mae_60min",
        privacy=run.privacy, init_from=run.init_from, federation=settings, round_input=site_training.round_reference,
    )
    model = build_keras_model(cfg.model, history, N_FEATURES, horizon, cfg.job.seed, windowing.n_nodes)
    result.weights.assign_weights_to(model)
    reports = final_reports(cfg, prepared, clients, evaluation, windowing, result.weights, site_process.lost)
    personalized = None
    if cfg.personalization.epochs > 0:
        personalized = personalize(cfg, model_fn, windowing, clients, result.weights, site_process.lost)
    return {
        "privacy": result.privacy if run.privacy is not None else releases.statement_without_dp(cfg.privacy, keys),
        "result": result, "model": model, "mean": windowing.mean, "std": windowing.std, "reports": reports,
        "graph": bool(windowing.n_nodes), "rounds_summary": {**round_summary.rounds_summary(result.history, settings, result.engine), **masking_entry(site_process)},
        "personalization": personalized,
        "summary": {"across_sites": [site.name for site in prepared.sites],
                    "baselines_not_run": LEFT_OUT if cfg.evaluate.centralized_baseline else {}},
    }


def final_reports(cfg: JobConfig, prepared, clients, evaluation, windowing, weights, lost) -> dict[str, dict]:
    """The federated model, persistence, the historical average and (if asked) each district
    alone, on the test windows of the districts still answering."""
    reports = {"federated": evaluation.report(weights, "test", skip=lost), **evaluation.baselines(skip=lost)}
    if cfg.evaluate.local_baseline:
        reports["local_only"] = local_only(cfg, prepared, clients, evaluation, windowing, lost)
    return reports


def federated_windowing(cfg: JobConfig, prepared: SitesPrepared, history: int, horizon: int):
    """The normalization from the sites' secure sums of their training speeds (count, sum and
    sum of squares, fixed point, as `preprocessing.federated_moments`), and the split."""
    from tff_apps.sites import site_computations
    from traffic import site_computations as at_sites
    from traffic.model import GRAPH_KINDS
    from traffic.windows import split_bounds

    bounds = split_bounds(prepared.schema["steps"])
    train_end = bounds["train"][1]
    readings = sum(train_end * count for count in prepared.sensors.values())
    folders = [site.data for site in prepared.sites]
    moments = site_computations.site_moments(folders, at_sites.training_readings(train_end), 1, readings)
    n_nodes = max(prepared.sensors.values()) if cfg.model.kind in GRAPH_KINDS else 0
    return at_sites.Windowing(
        float(moments.mean[0]), float(np.sqrt(moments.var[0])), bounds, history, horizon, n_nodes,
        int(prepared.schema["interval_minutes"]),
    )


def _site_process(cfg: JobConfig, process, windowing, clients, prepared: SitesPrepared, run):
    from tff_apps.sites.masked_rounds import site_process
    from traffic.site_computations import round_dataset_fn

    return site_process(cfg, process, round_dataset_fn(windowing, cfg.train.batch_size), clients, prepared.sites, run)


class DistrictEvaluation:
    """Each district's metric sums, computed at its site; reports in the simulation's shape."""

    def __init__(self, process, model_fn, windowing, clients):
        from traffic import site_computations as at_sites

        weights_type = process.weights_type  # `SiteProcess` or `masked_rounds.MaskedSiteProcess`
        self._model = {s: at_sites.model_sums_fn(model_fn, weights_type, windowing, s) for s in ("validation", "test")}
        self._baselines = at_sites.baseline_sums_fn(windowing)
        self._names = [c.name for c in clients]
        self._folders = [c.folder for c in clients]

    def _at_sites(self, computation, skip, *args) -> dict[int, np.ndarray]:
        from tff_apps.runtime.mergeable import placed_on

        live = [index for index in range(len(self._folders)) if index not in skip]
        with placed_on(live):
            values = computation(*args, [self._folders[index] for index in live])
        return {index: np.asarray(value, np.float64) for index, value in zip(live, values)}

    def report(self, weights, split: str = "test", skip=()) -> dict:
        return self.report_of(self._at_sites(self._model[split], skip, weights))

    def baselines(self, skip=()) -> dict[str, dict]:
        from traffic.site_computations import METRIC_LENGTH

        sums = self._at_sites(self._baselines, skip)
        return {
            "persistence": self.report_of({i: v[:METRIC_LENGTH] for i, v in sums.items()}),
            "historical_average": self.report_of({i: v[METRIC_LENGTH:] for i, v in sums.items()}),
        }

    def site_scores(self, weights, index: int) -> np.ndarray:
        """One district's test sums under `weights` (`site_training.local_only_scores`)."""
        return self._at_sites(self._model["test"], set(range(len(self._folders))) - {index}, weights)[index]

    def report_of(self, sums: dict[int, np.ndarray]) -> dict:
        """{"overall", "districts"} as `traffic.evaluate.evaluate_districts`: overall from the summed sums."""
        from traffic.site_computations import metrics_from_sums

        return {
            "overall": metrics_from_sums(np.sum(list(sums.values()), axis=0)),
            "districts": {self._names[i]: metrics_from_sums(v) for i, v in sums.items()},
        }


def local_only(cfg: JobConfig, prepared: SitesPrepared, clients, evaluation: DistrictEvaluation, windowing, lost=()) -> dict:
    """Each district alone, trained and scored at its site: as many local steps as the
    simulation's baseline makes (its whole run's), from the initial weights the simulation's
    local model has (seed + index). Unlike the simulation's, with the federation's normalization
    (the district's own statistics would have to leave it to turn its forecasts into mph here)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from tff_apps.learning import factory
    from tff_apps.sites import site_training
    from traffic.model import build_keras_model, tff_model_fn
    from traffic.site_computations import round_dataset_fn
    from traffic.windows import N_FEATURES

    whole_run = (
        {"local_steps": cfg.train.rounds * cfg.train.local_steps} if cfg.train.local_steps
        else {"local_epochs": cfg.train.rounds * cfg.train.local_epochs}
    )
    train = dataclasses.replace(
        cfg.train, algorithm="fedavg", clients_per_round=0, server_optimizer="sgd", server_learning_rate=1.0,
        server_momentum=0.0, engine="tff", **whole_run,
    )
    shape = (windowing.history, N_FEATURES, windowing.horizon)
    process = factory.build_learning_process(train, tff_model_fn(cfg.model, *shape, cfg.job.seed, windowing.n_nodes))
    initial = [
        tf.nest.map_structure(lambda v: v.numpy(), tff.learning.models.ModelWeights.from_model(
            build_keras_model(cfg.model, *shape, cfg.job.seed + index, windowing.n_nodes)
        ))
        for index in range(len(clients))
    ]
    site_process = site_training.SiteProcess(process, round_dataset_fn(windowing, train.batch_size), clients)  # each alone
    scores = site_training.local_only_scores(site_process, initial, evaluation, clients, train, cfg.job.seed, lost)
    return evaluation.report_of(scores)


def personalize(cfg: JobConfig, model_fn, windowing, clients, weights, lost=()) -> dict[str, dict[str, float]]:
    """[personalization] at the sites: each district fine-tunes the global model on its training
    windows; the MAE at 60 min of both models on its test windows (normalized, computed at the
    site; times the normalization's std, in mph), as `traffic.app.personalize_districts`."""
    from tff_apps.learning import personalization
    from tff_apps.sites import site_training
    from traffic.evaluate import HORIZONS
    from traffic.site_computations import split_datasets_fn

    at_sites = site_training.personalize_at_sites(
        model_fn, personalization.masked_mae_at(HORIZONS["60min"] - 1), cfg.personalization, cfg.train,
        cfg.job.seed, None, 0, clients, open_splits=split_datasets_fn(windowing),
    )
    results = at_sites(weights, skip=lost)
    return {name: {when: r[when]["mae"] * windowing.std for when in ("before", "after")} for name, r in results.items()}
