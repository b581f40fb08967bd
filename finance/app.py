"""Finance: credit risk across a lender and its data partners (vertical FL). What the engine calls.

prepare: load every party's table (each checks its own columns, `finance.parties`), align
them by private set intersection, split the aligned customers (the lender draws a stratified
split). train: each party encodes its own columns, the split model trains and is evaluated
through `tff_apps.learning.vertical` (TFF computations, secure sum of the partial scores: the
lender's metrics see only the summed test logits and its own labels), checkpointing every
`train.checkpoint_every` epochs (a killed run resumes from the last one), the baselines train
beside it, and each party's bottom model is exported as its own SavedModel. What the lender
writes (summary, report, its card) names only its own columns. score: each party's export
scores its own rows and the scores are summed by the same secure sum (`finance.scoring`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from finance.alignment import Alignment, align, aligned, split_aligned
from finance.data import LENDER, DataConfig, FinanceData, PartyTable, load
from finance.model import ModelConfig
from finance.parties import party_view
from shared.errors import UserError
from shared.files import write_json_atomic, write_text_atomic
from tff_apps.program import reporting
from tff_apps.config import JobConfig
from tff_apps.program.job import Run, data_fingerprint

METHOD_COLUMNS = (
    ("AUC", lambda r: r["auc"]),
    ("KS", lambda r: r["ks"]),
    ("Gini", lambda r: r["gini"]),
    ("accuracy", lambda r: r["accuracy"]),
    ("Brier", lambda r: r["brier"]),
)
CARD_FILE = "model_card.json"


def servable(party: str) -> str:
    """export/<servable>/<version>/, one per party."""
    return f"finance_{party}"


@dataclass
class Prepared:
    data: FinanceData
    alignment: Alignment
    parties: list[PartyTable]  # each party's own rows of the shared customers, common order, lender first
    train_rows: np.ndarray  # positions in the common order
    test_rows: np.ndarray

    @property
    def names(self) -> list[str]:
        return [party.name for party in self.parties]


class FinanceApp:
    name = "finance"
    description = "credit risk across a lender and its data partners (vertical FL, PSI-aligned, split model)"
    default_config = Path(__file__).with_name("default.toml")
    sections = {"data": DataConfig, "model": ModelConfig}
    horizontal = False  # vertical FL: [communication], [clients], [robustness], [personalization] do not apply
    supports_sites = True  # job.sites: each party's site (finance/sites.py)

    def write_site_folder(self, cfg: JobConfig, out: Path, site: str = "") -> dict[str, Any]:
        """`site prepare finance --site PARTY`: the party's own CSV into its site folder."""
        from finance.site_folder import write_party_folder

        return write_party_folder(cfg, Path(out), site)

    def site_demo_folders(self, cfg: JobConfig, base: Path) -> list[str]:
        """`demo --sites`: each party of the embedded data as its own CSV and site folder."""
        from finance.site_folder import write_demo_parties

        return write_demo_parties(load(cfg.data, cfg.job.seed), cfg, Path(base))

    @staticmethod
    def score_across_sites(sites_toml: str, run_id: str, inputs: Mapping[str, str], output: str) -> dict:
        """`tff-apps score RUN_ID --sites sites.toml`: each party's export scores at its site."""
        from finance.site_scoring import score_across_sites

        return score_across_sites(sites_toml, run_id, inputs, output)

    @staticmethod
    def check_sites(cfg: JobConfig) -> None:
        """What finance refuses across sites, before any site starts (`demo --sites`)."""
        check_privacy(cfg)

    @staticmethod
    def site_party(folder: Path):
        """The party at its own site, for its gateway (`tff_apps.sites.vertical_party`)."""
        from finance.site_folder import PartySite

        return PartySite(folder)

    def prepare(self, cfg: JobConfig) -> Prepared:
        check_privacy(cfg)
        if cfg.job.init_from:
            raise UserError(
                f"job.init_from = {cfg.job.init_from!r}: warm start is not supported for finance yet "
                "(a split model); set job.init_from = \"\""
            )
        if cfg.job.sites:  # each party at its own site: PSI and encoding run there
            from finance import sites

            return sites.prepare(cfg)
        data = load(cfg.data, cfg.job.seed)
        alignment = align(data)
        parties = aligned(data, alignment)
        train_rows, test_rows = split_aligned(parties[0].labels, cfg.evaluate.test_fraction, cfg.job.seed)
        if cfg.train.batch_size > len(train_rows):
            raise UserError(
                f"train.batch_size = {cfg.train.batch_size} is larger than the {len(train_rows)} aligned "
                f"training customers; lower it"
            )
        return Prepared(data, alignment, parties, train_rows, test_rows)

    def client_rows(self, cfg: JobConfig, prepared) -> dict[str, int]:
        return dict.fromkeys(prepared.names, getattr(prepared, "n_train", None) or len(prepared.train_rows))

    def fingerprint(self, prepared) -> str:
        if cfg_sites(prepared):  # the sites' manifests: counts, never a row
            return data_fingerprint([json.dumps(m, sort_keys=True) for m in prepared.manifests])
        return data_fingerprint([party.fingerprint() for party in prepared.data.parties])

    def public_config(self, cfg: JobConfig) -> dict[str, Any]:
        """The config the summary shows: the lender's view (`finance.parties.party_view`)."""
        return party_view(cfg, LENDER).to_dict()

    def train(self, cfg: JobConfig, prepared: Prepared, run: Run) -> dict[str, Any]:
        from finance import evaluate
        from finance.model import PartyEncoder
        from tff_apps.program import vertical_rounds

        if cfg_sites(prepared):
            return train_across_sites(cfg, prepared, run)
        train_rows, test_rows = prepared.train_rows, prepared.test_rows
        # Each party fits its encoder on its own training rows and encodes only its own columns.
        encoders = {p.name: PartyEncoder.fit(p.features.iloc[train_rows], p.categorical) for p in prepared.parties}
        train_x = [encoders[p.name].transform(p.features.iloc[train_rows]) for p in prepared.parties]
        test_x = [encoders[p.name].transform(p.features.iloc[test_rows]) for p in prepared.parties]
        labels = prepared.parties[0].labels
        y_train, y_test = labels[train_rows], labels[test_rows]

        def evaluate_epoch(z) -> dict[str, float]:
            # The lender's side: the securely summed test logits and its own test labels.
            report = evaluate.vertical_metrics(z, y_test)
            return {"auc": report["auc"], "ks": report["ks"]}

        result = vertical_rounds.train_vertical(
            train_x, y_train, vertical_settings(cfg), party_names=prepared.names, evaluate=evaluate_epoch,
            eval_parties=test_x, run_dir=run.dir, checkpoint_every=cfg.train.checkpoint_every,
        )
        # The last epoch is always evaluated: its z is the final model's.
        reports = {"vertical": evaluate.vertical_metrics(result.eval_logits, y_test)}
        reports.update(run_baselines(cfg, train_x, test_x, y_train, y_test))
        data = describe_data(prepared, len(train_rows), len(test_rows))
        summary = training_summary(data, result, reports, cfg, evaluate.HEADLINE)
        if cfg.export.enabled:
            export_parties(run, cfg, summary, encoders, dict(zip(prepared.names, result.party_weights)))
            summary["export"] = str(run.export_dir)
        write_reports(run, summary, reports)
        return summary

    def score(self, export_dir: Path, inputs: Mapping[str, str], output: str, id_column: str = "") -> dict:
        """`tff-apps score`: vertical inference from one CSV per party (aligned by PSI)."""
        from finance.scoring import score_vertical
        from tff_apps.program.predict import resolve_export

        export_dir = export_root(Path(export_dir))
        card = read_export_card(export_dir)
        parties = list(card["parties"])
        missing = [p for p in parties if p not in inputs]
        unknown = [p for p in inputs if p not in parties]
        if missing or unknown:
            raise UserError(
                "score: give one CSV per party as " + " ".join(f"--input {p}=FILE" for p in parties)
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown party {', '.join(unknown)}" if unknown else "")
            )
        exports = {p: resolve_export(export_dir / card["servables"][p]) for p in parties}
        return score_vertical(exports, {p: inputs[p] for p in parties}, id_column or card.get("id_column", "id"), output)


def cfg_sites(prepared) -> bool:
    """Whether `prepared` is a run across the parties' sites (`finance.sites.SitesPrepared`)."""
    return hasattr(prepared, "manifests")


def train_across_sites(cfg: JobConfig, prepared, run: Run) -> dict[str, Any]:
    """`finance.sites`: training and evaluation at the parties' sites; the summary and report
    are the lender's (no partner column named, counts only)."""
    from finance import evaluate, sites

    result, final = sites.train(cfg, prepared, run, vertical_settings(cfg))
    reports = {"vertical": final}
    data = {
        "source": f"{len(prepared.sites)} party sites", "parties": {
            name: {"customers": count} for name, count in prepared.alignment["customers"].items()},
        "alignment": prepared.alignment, "train_customers": prepared.n_train, "test_customers": prepared.n_test,
        "encoded_widths": dict(zip(prepared.names, prepared.widths)),  # as the simulation's padding shows them
    }
    summary = training_summary(data, result, reports, cfg, evaluate.HEADLINE)
    summary["privacy"]["secure_sum"] = sites.SECURE_SUM_AT_SITES  # a release outside ε: say what moved
    summary["baselines"] = sites.NOT_ACROSS_SITES
    if cfg.export.enabled:
        summary["exports_at_sites"] = sites.export_at_sites(cfg, prepared, run, summary)
    write_reports(run, summary, reports)
    return summary


def check_privacy(cfg: JobConfig) -> None:
    """Horizontal DP does not apply to a split model; label DP is a [model] option."""
    if cfg.privacy.level != "none":
        raise UserError(
            f"privacy.level = {cfg.privacy.level!r}: client- and record-level DP are for horizontal apps; "
            "for finance set model.label_noise_multiplier (label DP) and model.partial_noise_std"
        )
    mode = getattr(cfg.privacy, "secure_aggregation", "none")
    if mode not in ("none", "simulated"):
        raise UserError(
            f"privacy.secure_aggregation = {mode!r}: finance sums partial scores with TFF's secure sum "
            "(simulated by TFF's open runtime); use \"simulated\" or \"none\""
        )


def vertical_settings(cfg: JobConfig):
    from tff_apps.learning.vertical import VerticalSettings

    model = cfg.model
    return VerticalSettings(
        kind=model.kind, hidden_units=model.hidden_units, l2=model.l2,
        epochs=cfg.train.rounds, batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.client_learning_rate, optimizer=cfg.train.client_optimizer,
        label_noise_multiplier=model.label_noise_multiplier, partial_noise_std=model.partial_noise_std,
        score_bound=model.score_bound, seed=cfg.job.seed, delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant, eval_every=cfg.train.eval_every,
    )


def run_baselines(cfg: JobConfig, train_x, test_x, y_train, y_test) -> dict[str, dict]:
    from finance import evaluate

    settings = dict(
        model_cfg=cfg.model, epochs=cfg.evaluate.baseline_epochs or cfg.train.rounds,
        batch_size=cfg.train.batch_size, learning_rate=cfg.train.client_learning_rate,
        optimizer=cfg.train.client_optimizer, seed=cfg.job.seed,
    )
    reports = {}
    if cfg.evaluate.centralized_baseline:
        reports["centralized"] = evaluate.centralized_baseline(train_x, y_train, test_x, y_test, **settings)
    if cfg.evaluate.local_baseline:
        reports["lender_alone"] = evaluate.lender_alone_baseline(train_x[0], y_train, test_x[0], y_test, **settings)
    return reports


def privacy_statement(cfg: JobConfig, result) -> dict[str, Any]:
    return {
        "level": "label" if result.label_dp else "none",
        "label_dp": result.label_dp,
        "partial_noise": result.partial_noise,
        "secure_sum": (
            "partial scores (training and evaluation) summed by TFF's federated_secure_sum_bitwidth "
            "(simulated by TFF's open runtime)"
        ),
        "score_bound": cfg.model.score_bound,
        "epsilon": result.label_dp["epsilon"] if result.label_dp else None,
        "delta": cfg.privacy.delta if result.label_dp else None,
    }


def training_summary(data: dict[str, Any], result, reports: dict, cfg: JobConfig, headline: str) -> dict[str, Any]:
    return {
        "data": data,
        "rounds": len(result.history),
        "epochs": len(result.history),
        "training_seconds": round(result.seconds, 3),
        "tff_calls": result.tff_calls,
        "bytes_per_epoch": result.bytes_per_epoch,
        "bytes_total": result.bytes_total,
        "evaluation": {"tff_calls": result.eval_calls, "bytes_total": result.eval_bytes_total},
        "checkpoints": {"every_epochs": cfg.train.checkpoint_every, "resumed_after_epoch": result.resumed_after_epoch},
        "headline": headline,
        "results": reports,
        "privacy": privacy_statement(cfg, result),
    }


def describe_data(prepared: Prepared, n_train: int, n_test: int) -> dict[str, Any]:
    """The lender's view of the data: its own columns by name, a partner's only counted."""
    data = prepared.data
    parties = {
        party.name: {"customers": len(party), "n_columns": len(party.columns)} for party in data.parties
    }
    parties[LENDER].update(columns=data.lender.columns, categorical=data.lender.categorical)
    return {
        "source": data.source_description,
        "fingerprint": data_fingerprint([party.fingerprint() for party in data.parties]),
        "parties": parties,
        "alignment": prepared.alignment.describe(),
        "train_customers": n_train,
        "test_customers": n_test,
        "default_rate": float(np.mean(data.lender.labels)),
    }


def alignment_table(summary: dict[str, Any]) -> str:
    psi = summary["data"]["alignment"]
    names = list(psi["customers"])
    rows = [
        [f"customers ({' / '.join(names)})", " / ".join(str(psi["customers"][p]) for p in names)],
        ["customers every party holds (PSI)", psi["match_count"]],
        [f"match rate ({' / '.join(names)})", " / ".join(f"{psi['match_rate'][p]:.3f}" for p in names)],
        ["PSI time (s) / bytes", f"{psi['seconds']:.3f} / {psi['bytes_exchanged']:,}"],
        ["training bytes per epoch", f"{summary['bytes_per_epoch'].get('total', 0):,}"],
        ["TFF calls", summary["tff_calls"]],
    ]
    return reporting.markdown_table(["", "value"], rows)


def write_reports(run: Run, summary: dict[str, Any], reports: dict[str, Any]) -> None:
    """report.md and report.html, the lender's: the config shown is its view (`party_view`)."""
    lender_run = dataclasses.replace(run, config=party_view(run.config, LENDER))
    table = reporting.results_table(reports, METHOD_COLUMNS)
    extra = {"Alignment and traffic": alignment_table(summary)}
    write_text_atomic(
        run.dir / "report.md", reporting.markdown_report(lender_run, summary, table, group=None, extra=extra)
    )
    summary["report"] = str(run.dir / "report.md")
    summary["report_html"] = str(
        reporting.html_report(
            lender_run, summary, table, round_metric="auc", final_metric=lambda r: r["auc"],
            metric_label="AUC", step_key="epoch", group=None, method="vertical",
            roc={method: (r.labels, r.probabilities) for method, r in reports.items()}, extra=extra,
        )
    )
    summary["table"] = table


def export_parties(run: Run, cfg: JobConfig, summary: dict, encoders, party_weights: dict) -> None:
    """export/finance_<party>/1 for every party (one SavedModel each, as TF Serving reads
    them) and export/model_card.json (the lender's). Each card holds its party's view of the
    config: no party's export names another party's columns.

    Written into a temporary folder renamed into place: never one party without the others.
    """
    import shutil

    from finance.model import build_bottom_model, export_party
    from tff_apps.program.export import servable_dir

    staging = run.dir / ".export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    parties = list(party_weights)
    card = {
        "app": "finance",
        "run_id": run.run_id,
        "task": "probability of default = sigmoid(sum of every party's partial score)",
        "data_fingerprint": summary["data"]["fingerprint"],
        "id_column": cfg.data.id_column,
        "metrics": summary["results"]["vertical"],
        "privacy": summary["privacy"],
    }
    for party, weights in party_weights.items():
        encoder = encoders[party]
        model = build_bottom_model(cfg.model.kind, encoder.n_outputs, cfg.model.hidden_units, weights)
        party_card = {**card, "config": party_view(cfg, party).to_dict()}
        export_party(servable_dir(staging, servable(party)), party, encoder, model, party_card, cfg.model.score_bound)
    servables = {party: servable(party) for party in parties}
    lender_card = {**card, "config": party_view(cfg, LENDER).to_dict(), "parties": parties, "servables": servables}
    write_json_atomic(staging / CARD_FILE, lender_card)
    # A resumed run id that failed after exporting replaces that attempt's export.
    shutil.rmtree(run.export_dir, ignore_errors=True)
    staging.rename(run.export_dir)


def export_root(path: Path) -> Path:
    """A finance run's export/ folder, also when given one party's servable or version folder."""
    import json

    for candidate in (path, path.parent, path.parent.parent):
        try:
            card = json.loads((candidate / CARD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(card, dict) and isinstance(card.get("servables"), dict):
            return candidate
    return path


def read_export_card(export_dir: Path) -> dict[str, Any]:
    from tff_apps.program.predict import read_model_card

    card = read_model_card(Path(export_dir))
    if card.get("app") != "finance" or "parties" not in card:
        raise UserError(f"{export_dir}: not the export folder of a finance run (it holds finance_lender/ and a folder per partner)")
    return card


APP = FinanceApp()
