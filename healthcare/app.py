"""Healthcare: diagnosis across hospitals (horizontal FL). What the engine calls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healthcare import statistics
from healthcare.data import DataConfig, HealthcareData, load
from healthcare.model import ModelConfig
from shared.files import write_text_atomic
from shared.partition import stratified_split
from shared.tabular import ClientTable
from tff_apps.program import reporting
from tff_apps.config import JobConfig
from tff_apps.program.job import Run, data_fingerprint


@dataclass
class Prepared:
    data: HealthcareData
    trains: list[ClientTable]
    tests: list[ClientTable]


class HealthcareApp:
    name = "healthcare"
    description = "diagnosis across hospitals (horizontal FL, binary classification)"
    default_config = Path(__file__).with_name("default.toml")
    sections = {"data": DataConfig, "model": ModelConfig}
    horizontal = True
    supports_sites = True  # job.sites: healthcare/sites.py

    def prepare(self, cfg: JobConfig) -> Prepared:
        if cfg.job.sites:  # the data stays at the sites: only their manifests come here
            from healthcare import sites

            return sites.prepare(cfg)
        data = load(cfg.data, cfg.job.seed)
        trains, tests = [], []
        for index, client in enumerate(data.clients):
            train_idx, test_idx = stratified_split(
                client.labels, cfg.evaluate.test_fraction, cfg.job.seed + index
            )
            trains.append(client.subset(train_idx))
            tests.append(client.subset(test_idx))
        return Prepared(data, trains, tests)

    def site_tables(self, cfg: JobConfig, site: str = "") -> dict[str, Any]:
        """`tff-apps site prepare healthcare`: this hospital's rows, split as a simulation splits them."""
        from healthcare import sites

        return sites.site_tables(cfg, load(cfg.data, cfg.job.seed), site)

    def client_rows(self, cfg: JobConfig, prepared: Prepared) -> dict[str, int]:
        """Training rows per hospital, as the program holds them (for [privacy])."""
        if cfg.job.sites:
            return prepared.site_rows
        return {t.name: len(t) for t in prepared.trains}

    def statistics_spec(self, cfg: JobConfig, prepared: Prepared):
        """Public column ranges for DP statistics (`privacy.preprocessing`/`profiles` = "dp")."""
        return statistics.statistics_spec(cfg, prepared)

    def fingerprint(self, prepared: Prepared) -> str:
        if hasattr(prepared, "manifests"):
            from healthcare import sites

            return sites.fingerprint(prepared)
        return data_fingerprint([c.fingerprint() for c in prepared.data.clients])

    def train(self, cfg: JobConfig, prepared: Prepared, run: Run) -> dict[str, Any]:
        if cfg.job.sites:
            return self._train_across_sites(cfg, prepared, run)
        # TensorFlow and TFF load here, once config and data are known to be valid.
        from healthcare import evaluate
        from healthcare.model import build_keras_model, tff_model_fn
        from tff_apps.learning import federation
        from tff_apps.learning import factory
        from tff_apps.program import round_summary
        from tff_apps.program import round_loop
        from tff_apps.program.alongside import alongside
        from tff_apps.learning import client_data

        trains, tests, data = prepared.trains, prepared.tests, prepared.data
        settings = federation.of(cfg)  # [communication], [clients], [robustness], [personalization]
        # per-hospital aggregates (warnings logged) and the normalization: exact or DP
        preprocessor_of, profiled = statistics.released_statistics(cfg, prepared, run)
        if run.privacy is not None:
            run.privacy.releases = statistics.release_keys(cfg, profiled)
        clients = [
            client_data.ClientTrainData(
                t.name,
                preprocessor_of(t.name).transform(t.features.to_numpy()),
                t.labels.reshape(-1, 1),
            )
            for t in trains
        ]
        clients = federation.flip_bad_labels(settings, clients, flip_diagnosis)  # [robustness]
        n_inputs = clients[0].x.shape[1]
        process = factory.build_learning_process(
            cfg.train, tff_model_fn(cfg.model, n_inputs, cfg.job.seed), privacy=run.privacy,
            secure=factory.secure_aggregation(cfg, clients), federation=settings,
            client_names=[c.name for c in clients],
        )
        global_model = build_keras_model(cfg.model, n_inputs, cfg.job.seed)
        predict = evaluate.keras_predictor(global_model, preprocessor_of)

        def evaluate_round(weights) -> dict[str, float]:
            weights.assign_weights_to(global_model)
            return evaluate.headline_metrics(evaluate.evaluate_sites(tests, predict))

        def federated():
            trained = round_loop.run_rounds(
                process, clients, cfg.train, cfg.job.seed, run.dir, evaluate_round, evaluate.HEADLINE,
                privacy=run.privacy, init_from=run.init_from, federation=settings,
            )
            trained.weights.assign_weights_to(global_model)
            return trained, evaluate.evaluate_sites(tests, predict)

        # the Keras baselines share nothing with the rounds (TFF's worker runs those): train them beside
        (result, federated_report), baselines = alongside(lambda stop: run_baselines(cfg, prepared, stop), federated)
        reports = {"federated": federated_report, **baselines}
        summary = {
            "data": describe_data(data, trains, tests),
            "rounds": len(result.history),
            "training_seconds": round(result.seconds, 3),
            **round_summary.rounds_summary(result.history, settings, result.engine),
            "headline": evaluate.HEADLINE,
            "results": reports,
            "privacy": result.privacy if run.privacy is not None else statement_without_dp(
                cfg, {t.name: len(t) for t in trains}, statistics.release_keys(cfg, profiled)
            ),
            **federation.robustness_entry(settings, [c.name for c in clients]),
            **profiled,
        }
        if result.lineage is not None:
            summary["lineage"] = result.lineage
        if cfg.personalization.epochs > 0:
            summary["personalization"] = personalize_sites(cfg, prepared, preprocessor_of, result.weights, n_inputs)
        shared = preprocessor_of(trains[0].name) if cfg.preprocess.normalization == "federated" else None
        return self._export_and_report(cfg, run, summary, reports, global_model, shared, result.weights)

    def _export_and_report(self, cfg, run: Run, summary, reports, global_model, preprocessor, weights) -> dict:
        """The export (with the federation's preprocessing; none with per-site statistics) and the reports."""
        from healthcare import evaluate
        from tff_apps.program.export import export_model, servable_dir

        if cfg.export.enabled and preprocessor is not None:
            card = model_card(cfg, summary)
            card["serving_check"] = serving_check(global_model, preprocessor)
            model_dir = servable_dir(run.export_dir, self.name)
            export_model(model_dir, global_model, preprocessor, card, weights=weights)
            summary["export"] = str(model_dir)
        elif cfg.export.enabled:
            summary["export"] = "skipped: per-site normalization has no single serving preprocessing"
        table = reporting.results_table(
            {k: v for k, v in reports.items() if isinstance(v, dict)}, reporting.BINARY_COLUMNS
        )
        sections = reporting.client_sections(summary, "sites", "AUC")
        write_text_atomic(run.dir / "report.md", reporting.markdown_report(run, summary, table, extra=sections))
        summary["report"] = str(run.dir / "report.md")
        summary["report_html"] = str(reporting.html_report(
            run, summary, table, round_metric=evaluate.HEADLINE, final_metric=lambda r: r["pooled"]["auc"],
            metric_label="pooled test AUC", client_metric_label="test AUC",
            roc={method: (r.labels, r.probabilities) for method, r in reports.items() if hasattr(r, "labels")},
            extra=sections,
        ))
        summary["table"] = table
        return summary

    def _train_across_sites(self, cfg: JobConfig, prepared, run: Run) -> dict[str, Any]:
        from healthcare import evaluate, sites

        from tff_apps.privacy.releases import release_keys

        profiled = cfg.privacy.level == "none" and cfg.privacy.profiles == "auto"  # as sites.train decides
        keys = release_keys("normalization", profiled, cfg.evaluate.local_baseline)  # no centralized one here
        if run.privacy is not None:
            run.privacy.releases = keys  # the DP statement lists them too
        outcome = sites.train(cfg, prepared, run)
        result, reports = outcome["result"], outcome["reports"]
        privacy = result.privacy if run.privacy is not None else statement_without_dp(cfg, prepared.site_rows, keys)
        summary = {
            "data": {"source": f"{len(prepared.sites)} sites", "features": prepared.feature_names,
                     "categorical": prepared.categorical, "fingerprint": sites.fingerprint(prepared),
                     "sites": outcome["sites"]},
            "across_sites": list(outcome["sites"]),
            "rounds": len(result.history), "training_seconds": round(result.seconds, 3),
            **outcome["rounds_summary"], "headline": evaluate.HEADLINE,
            "results": reports, "baselines_not_run": outcome["baselines"], "privacy": privacy,
            **outcome["profiles"],
        }
        if result.lineage is not None:
            summary["lineage"] = result.lineage
        if outcome["personalization"] is not None:
            summary["personalization"] = outcome["personalization"]
        return self._export_and_report(
            cfg, run, summary, reports, outcome["model"], outcome["preprocessor"], result.weights
        )


def flip_diagnosis(labels: np.ndarray) -> np.ndarray:
    """[robustness] label_flip: a bad hospital trains on the opposite diagnosis (y -> 1 - y);
    only its training rows, its test rows keep the true labels."""
    return 1 - labels


def personalize_sites(cfg: JobConfig, prepared: Prepared, preprocessor_of, weights, n_inputs: int) -> dict:
    """[personalization]: each hospital fine-tunes the global model on its own (unflipped)
    training rows; AUC and accuracy of both models on its test rows, computed at the hospital."""
    from healthcare.model import tff_model_fn
    from tff_apps.learning import personalization

    def arrays(table: ClientTable):
        return preprocessor_of(table.name).transform(table.features.to_numpy()), table.labels.reshape(-1, 1)

    splits = [
        personalization.ClientSplit(train.name, *arrays(train), *arrays(test))
        for train, test in zip(prepared.trains, prepared.tests)
    ]
    results = personalization.personalize(
        tff_model_fn(cfg.model, n_inputs, cfg.job.seed), weights, splits, personalization.binary_metrics,
        cfg.personalization, cfg.train, cfg.job.seed,
    )
    return personalization.summary(results, "auc", also=("accuracy",))


def run_baselines(cfg: JobConfig, prepared: Prepared, stop=None) -> dict[str, dict]:
    """The centralized and local-only baselines; `stop` (a threading.Event) set ends them early."""
    from healthcare import evaluate

    epochs = cfg.evaluate.baseline_epochs or cfg.train.rounds * cfg.train.local_epochs
    settings = dict(
        categorical=prepared.data.categorical_columns,
        model_cfg=cfg.model,
        epochs=epochs,
        batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.client_learning_rate,
        seed=cfg.job.seed,
        fitter=evaluate.KerasFitter(stop),  # one model, traced once, for every baseline
    )
    reports = {}
    if cfg.evaluate.centralized_baseline:
        reports["centralized"] = evaluate.centralized_baseline(prepared.trains, prepared.tests, **settings)
    if cfg.evaluate.local_baseline:
        reports["local_only"] = evaluate.local_baseline(prepared.trains, prepared.tests, **settings)
    return reports


def describe_data(data: HealthcareData, trains, tests) -> dict[str, Any]:
    return {
        "source": data.source_description,
        "features": data.feature_names,
        "categorical": data.categorical_columns,
        "fingerprint": data_fingerprint([c.fingerprint() for c in data.clients]),
        "dropped_rows": data.dropped_rows,
        "sites": {
            train.name: {
                "train_rows": len(train),
                "test_rows": len(test),
                "prevalence": float(np.mean(np.concatenate([train.labels, test.labels]))),
            }
            for train, test in zip(trains, tests)
        },
    }


def serving_check(model, preprocessor) -> dict[str, Any]:
    """Rows made of the released federated statistics (`Preprocessor.statistic_rows`, no
    client's data) by serving input name, and the in-run model's outputs for them, so a
    fresh process can check that the SavedModel predicts what the trained model did."""
    from tff_apps.program.export import signature_names

    raw = preprocessor.statistic_rows()
    names = signature_names(preprocessor.feature_names)
    outputs = model(preprocessor.transform(raw), training=False).numpy().reshape(-1)
    return {
        "inputs": {
            names[c]: [None if np.isnan(v) else float(v) for v in raw[:, i]]
            for i, c in enumerate(preprocessor.feature_names)
        },
        "outputs": outputs.astype(float).tolist(),
    }


def model_card(cfg: JobConfig, summary: dict[str, Any]) -> dict[str, Any]:
    federated = summary["results"]["federated"]
    card = {
        "app": "healthcare",
        "task": "probability of disease (binary diagnosis)",
        "data_fingerprint": summary["data"]["fingerprint"],
        "data_source": summary["data"]["source"],
        "config": cfg.to_dict(),
        "rounds": summary["rounds"],
        "lineage": summary.get("lineage"),
        "metrics": {"pooled_test": federated["pooled"], "across_sites": federated["across_sites"]},
        "privacy": summary["privacy"],  # the mechanism that ran and every release outside ε
    }
    if "across_sites" in summary:  # trained at the sites: which, and where the coordinator reached them
        card["trained_across_sites"] = {
            name: summary["data"]["sites"][name]["address"] for name in summary["across_sites"]
        }
    return card


def statement_without_dp(cfg: JobConfig, client_rows: dict[str, int], keys: list[str]) -> dict[str, Any]:
    """A job without DP states its resolved secure aggregation mode and its releases."""
    from tff_apps.privacy import releases
    from tff_apps.privacy.secure_settings import secure_aggregation

    secure = None
    if cfg.privacy.secure_aggregation != "none":
        secure = secure_aggregation(cfg.privacy, cfg.train, client_rows)
    return releases.statement_without_dp(cfg.privacy, keys, secure)


APP = HealthcareApp()
