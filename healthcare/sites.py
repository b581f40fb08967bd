"""Healthcare across sites (`job.sites`): each hospital runs a site next to its data folder
(`tff-apps site prepare healthcare`), and this coordinator trains through TFF computations
that run at the sites. It never reads a row: it sees manifests (row counts, schema), the
secure-summed preprocessing statistics, model updates and test-score histograms.

What differs from a simulation of the same partitions: evaluation metrics come from score
histograms (exact to 1/4096 of the score); the centralized baseline cannot exist (it would
pool the rows); the local-only baseline is trained at each site with TFF's client work and
the federation's normalization, not with Keras and the site's own statistics.
Data profiles are computed at each site (aggregates of its training rows) as in a simulation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.tabular import ClientTable
from tff_apps.config import JobConfig

NOT_ACROSS_SITES = "n/a across sites"


@dataclass
class SitesPrepared:
    sites: list  # tff_apps.sites.sites_config.SiteRef, in the file's order
    manifests: list[dict[str, Any]]
    feature_names: list[str]
    categorical: list[str]
    zero_means_missing: list[str]

    @property
    def site_rows(self) -> dict[str, int]:
        return {site.name: int(m["rows"]["train"]) for site, m in zip(self.sites, self.manifests)}


def prepare(cfg: JobConfig) -> SitesPrepared:
    """Reads each site's manifest at the site and checks that the sites can train together."""
    from tff_apps.sites.connect import sites_and_manifests

    check_supported(cfg)
    # before the privacy plan (it needs the manifests' row counts): the job states its target ε
    sites, manifests = sites_and_manifests(cfg)
    schema = _common_schema(sites, manifests)
    return SitesPrepared(
        sites, manifests, list(schema["feature_names"]), list(schema["categorical"]), list(schema["zero_means_missing"])
    )


def check_supported(cfg: JobConfig) -> None:
    """What does not run across sites yet, refused before anything starts."""
    from tff_apps.sites.connect import refuse_what_sites_do_not_run

    refuse_what_sites_do_not_run(cfg, "healthcare", "the clients' rows", {
        "preprocess.normalization = 'per_site' (no single serving preprocessing)":
            cfg.preprocess.normalization != "federated",
        "privacy.preprocessing / privacy.profiles = 'dp' (DP statistics are not released at the sites yet)":
            "dp" in (cfg.privacy.preprocessing, cfg.privacy.profiles),
    })


def _common_schema(sites, manifests) -> dict[str, Any]:
    first = manifests[0]
    for site, manifest in zip(sites, manifests):
        if manifest.get("schema", {}).get("app") != "healthcare":
            raise UserError(f"site {site.name}: its data folder {site.data} holds {manifest['schema'].get('app')!r} data")
        if manifest["schema_fingerprint"] != first["schema_fingerprint"]:
            raise UserError(
                f"site {site.name}: its schema (columns {manifest['schema']['feature_names']}) differs from site "
                f"{sites[0].name}'s; every site must prepare the same columns"
            )
    return first["schema"]


def site_tables(cfg: JobConfig, data, site: str) -> dict[str, Any]:
    """One hospital of the loaded data (the only one, or `site`) with its train/test split:
    `stratified_split` seeded with job.seed + its index, as the simulation does."""
    from shared.partition import stratified_split
    from tff_apps.sites.site_data import Schema

    names = [client.name for client in data.clients]
    if not site and len(names) > 1:
        raise UserError(f"site prepare: the data holds {len(names)} hospitals ({', '.join(names)}); name yours with --site")
    if site and site not in names:
        raise UserError(f"site prepare: --site {site!r} is not in the data; it holds {', '.join(names)}")
    index = names.index(site) if site else 0
    client = data.clients[index]
    train_idx, test_idx = stratified_split(client.labels, cfg.evaluate.test_fraction, cfg.job.seed + index)
    splits = {
        name: (client.features.to_numpy(dtype=np.float64)[rows], client.labels[rows])
        for name, rows in (("train", train_idx), ("test", test_idx))
    }
    schema = Schema("healthcare", tuple(data.feature_names), tuple(data.categorical_columns),
                    tuple(data.zero_means_missing), "binary")
    return {
        "site": client.name, "schema": schema, "splits": splits,
        "split": {"test_fraction": cfg.evaluate.test_fraction, "seed": cfg.job.seed + index},
        "dropped_rows": data.dropped_rows.get(client.name, 0),
    }


def fingerprint(prepared: SitesPrepared) -> str:
    """The federation's data, as the manifests describe it (the rows themselves stay at the sites)."""
    described = [[site.name, m["schema_fingerprint"], m["rows"], m["created"]] for site, m in zip(prepared.sites, prepared.manifests)]
    return hashlib.sha256(json.dumps(described).encode("utf-8")).hexdigest()


def train(cfg: JobConfig, prepared: SitesPrepared, run) -> dict[str, Any]:
    """The healthcare job with every data-touching step at the sites."""
    from healthcare import evaluate
    from healthcare.model import build_keras_model, tff_model_fn
    from tff_apps.learning import factory, federation
    from tff_apps.program import round_loop, round_summary
    from tff_apps.sites import masked_rounds, site_computations, site_training

    folders = [site.data for site in prepared.sites]
    names, rows = prepared.feature_names, prepared.site_rows
    preprocessor = site_computations.federated_preprocessor(
        folders, names, prepared.categorical, sum(rows.values()), prepared.zero_means_missing
    )
    profiled = {}
    if cfg.privacy.level == "none" and cfg.privacy.profiles == "auto":  # exact profiles: outside ε
        from shared import profile

        profiled = profile.summary_entry(dict(zip(
            rows, site_computations.site_profiles(folders, names, prepared.categorical)
        )))
    n_inputs = len(preprocessor.expanded_names)
    clients = [site_training.SiteClient(site.name, rows[site.name], site.data) for site in prepared.sites]
    settings = federation.of(cfg)
    model_fn = tff_model_fn(cfg.model, n_inputs, cfg.job.seed)
    process = factory.build_learning_process(
        cfg.train, model_fn, privacy=run.privacy, secure=factory.secure_aggregation(cfg, clients),
        federation=settings, client_names=[c.name for c in clients],
    )
    if cfg.privacy.level == "record":  # DP-SGD: each site draws its Poisson batches itself
        open_round = site_computations.poisson_round_fn(preprocessor, len(names))
        round_input = site_training.poisson_reference
    else:
        open_round = site_computations.round_dataset_fn(preprocessor, len(names), cfg.train.batch_size)
        round_input = site_training.round_reference
    site_process = masked_rounds.site_process(cfg, process, open_round, clients, prepared.sites, run)
    evaluation = site_training.SiteEvaluation(site_process, model_fn, preprocessor, len(names), folders)

    def evaluate_weights(weights) -> dict:  # the sites still answering
        return site_report(clients, evaluation.scores(weights, skip=site_process.lost))

    result = round_loop.run_rounds(
        site_process, clients, cfg.train, cfg.job.seed, run.dir,
        lambda weights: evaluate.headline_metrics(evaluate_weights(weights)), evaluate.HEADLINE,
        privacy=run.privacy, init_from=run.init_from, federation=settings, round_input=round_input,
    )
    global_model = build_keras_model(cfg.model, n_inputs, cfg.job.seed)
    result.weights.assign_weights_to(global_model)
    reports = {"federated": evaluate_weights(result.weights)}
    personalized = None
    if cfg.personalization.epochs > 0:  # fine-tuned and evaluated at each site
        from tff_apps.learning import personalization

        personalize = site_training.personalize_at_sites(
            model_fn, personalization.binary_metrics, cfg.personalization, cfg.train, cfg.job.seed,
            preprocessor, len(names), clients,
        )
        personalized = personalization.summary(
            personalize(result.weights, skip=site_process.lost), "auc", also=("accuracy",)
        )
    if cfg.evaluate.local_baseline:
        reports["local_only"] = local_only(cfg, prepared, preprocessor, clients, evaluation, n_inputs, site_process.lost)
    return {
        "result": result, "model": global_model, "preprocessor": preprocessor,
        "reports": reports,
        "baselines": baselines_not_across_sites(cfg),
        "sites": site_training.describe_sites(prepared.sites, prepared.manifests),
        # the summary's `masking` (where the updates were masked) travels with the rounds' summary
        "rounds_summary": {**round_summary.rounds_summary(result.history, settings, result.engine), **masked_rounds.masking_entry(site_process)},
        "profiles": profiled,
        "personalization": personalized,
    }


def local_only(cfg: JobConfig, prepared: SitesPrepared, preprocessor, clients, evaluation, n_inputs: int, lost=()) -> dict:
    """Each hospital alone, trained and scored at its site: SGD for the simulation's baseline
    epochs from the initial weights the simulation's local model would have (seed + index).
    Unlike the simulation's, it uses the federation's normalization (a site's own statistics
    would have to leave it to build the model)."""
    import dataclasses

    import tensorflow_federated as tff

    from healthcare.model import build_keras_model, tff_model_fn
    from tff_apps.learning import factory
    from tff_apps.sites import site_computations, site_training

    epochs = cfg.evaluate.baseline_epochs or cfg.train.rounds * cfg.train.local_epochs
    train = dataclasses.replace(
        cfg.train, algorithm="fedavg", local_epochs=epochs, local_steps=0, clients_per_round=0,
        server_optimizer="sgd", server_learning_rate=1.0, server_momentum=0.0, engine="tff",
    )
    process = factory.build_learning_process(train, tff_model_fn(cfg.model, n_inputs, cfg.job.seed))
    open_round = site_computations.round_dataset_fn(preprocessor, len(prepared.feature_names), train.batch_size)
    site_process = site_training.SiteProcess(process, open_round, clients)
    initial = []
    for index in range(len(clients)):
        model = build_keras_model(cfg.model, n_inputs, cfg.job.seed + index)
        initial.append(tff.learning.models.ModelWeights(
            trainable=[v.numpy() for v in model.trainable_weights],
            non_trainable=[v.numpy() for v in model.non_trainable_weights],
        ))
    return site_report(clients, site_training.local_only_scores(
        site_process, initial, evaluation, clients, train, cfg.job.seed, lost
    ))


def site_report(clients, scores: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    """The healthcare metrics (per site, pooled, across sites) from each site's (labels, scores)."""
    from healthcare import evaluate

    tables = [
        ClientTable(name=clients[i].name, features=pd.DataFrame(index=range(len(labels))), labels=labels)
        for i, (labels, _) in scores.items()
    ]
    by_site = {clients[i].name: site_scores for i, (_, site_scores) in scores.items()}
    return evaluate.evaluate_sites(tables, lambda table: by_site[table.name])


def baselines_not_across_sites(cfg: JobConfig) -> dict[str, str]:
    """The baselines a simulation would add, and why they are missing here."""
    missing = {}
    if cfg.evaluate.centralized_baseline:
        missing["centralized"] = f"{NOT_ACROSS_SITES}: it would pool every site's rows"
    return missing
