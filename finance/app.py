"""Finance: credit risk across a lender and a data partner (vertical FL). What the engine calls.

prepare: load both parties' tables, align them by private set intersection, split the
aligned customers (the lender draws a stratified split). train: each party encodes its
own columns, the split model trains and is evaluated through `tff_apps.learning.vertical`
(TFF computations, secure sum of the partial scores: the lender's metrics see only the
summed test logits and its own labels), the baselines train beside it, and each party's
bottom model is exported as its own SavedModel. score: each party's export scores its own
rows and the scores are summed by the same secure sum (`finance.model.score_vertical`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from finance.alignment import Alignment, align, aligned, split_aligned
from finance.data import LENDER, PARTNER, DataConfig, FinanceData, PartyTable, load
from finance.model import ModelConfig
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
PARTIES = (LENDER, PARTNER)
CARD_FILE = "model_card.json"
SERVABLES = {party: f"finance_{party}" for party in PARTIES}  # export/<servable>/<version>/, one per party


@dataclass
class Prepared:
    data: FinanceData
    alignment: Alignment
    lender: PartyTable  # the lender's own rows of the shared customers, common order
    partner: PartyTable  # the partner's own rows of the same customers, same order
    train_rows: np.ndarray  # positions in the common order
    test_rows: np.ndarray


class FinanceApp:
    name = "finance"
    description = "credit risk across a lender and a data partner (vertical FL, PSI-aligned, split model)"
    default_config = Path(__file__).with_name("default.toml")
    sections = {"data": DataConfig, "model": ModelConfig}
    horizontal = False  # vertical FL: [communication], [clients], [robustness], [personalization] do not apply

    def prepare(self, cfg: JobConfig) -> Prepared:
        check_privacy(cfg)
        if cfg.job.init_from:
            raise UserError(
                f"job.init_from = {cfg.job.init_from!r}: warm start is not supported for finance yet "
                "(a split model); set job.init_from = \"\""
            )
        data = load(cfg.data, cfg.job.seed)
        alignment = align(data)
        lender, partner = aligned(data, alignment)
        train_rows, test_rows = split_aligned(lender.labels, cfg.evaluate.test_fraction, cfg.job.seed)
        if cfg.train.batch_size > len(train_rows):
            raise UserError(
                f"train.batch_size = {cfg.train.batch_size} is larger than the {len(train_rows)} aligned "
                f"training customers; lower it"
            )
        return Prepared(data, alignment, lender, partner, train_rows, test_rows)

    def client_rows(self, cfg: JobConfig, prepared: Prepared) -> dict[str, int]:
        return {LENDER: len(prepared.train_rows), PARTNER: len(prepared.train_rows)}

    def fingerprint(self, prepared: Prepared) -> str:
        return data_fingerprint([prepared.data.lender.fingerprint(), prepared.data.partner.fingerprint()])

    def train(self, cfg: JobConfig, prepared: Prepared, run: Run) -> dict[str, Any]:
        from finance import evaluate
        from finance.model import PartyEncoder
        from tff_apps.program import vertical_rounds

        train_rows, test_rows = prepared.train_rows, prepared.test_rows
        # Each party fits its encoder on its own training rows and encodes only its own columns.
        encoders, train_x, test_x = {}, {}, {}
        for party in (prepared.lender, prepared.partner):
            encoder = PartyEncoder.fit(party.features.iloc[train_rows], party.categorical)
            encoders[party.name] = encoder
            train_x[party.name] = encoder.transform(party.features.iloc[train_rows])
            test_x[party.name] = encoder.transform(party.features.iloc[test_rows])
        y_train, y_test = prepared.lender.labels[train_rows], prepared.lender.labels[test_rows]
        settings = vertical_settings(cfg)

        def evaluate_epoch(z) -> dict[str, float]:
            # The lender's side: the securely summed test logits and its own test labels.
            report = evaluate.vertical_metrics(z, y_test)
            return {"auc": report["auc"], "ks": report["ks"]}

        result = vertical_rounds.train_vertical(
            [train_x[LENDER], train_x[PARTNER]], y_train, settings,
            party_names=list(PARTIES), evaluate=evaluate_epoch,
            eval_parties=[test_x[LENDER], test_x[PARTNER]], run_dir=run.dir,
        )
        # The last epoch is always evaluated: its z is the final model's.
        reports = {"vertical": evaluate.vertical_metrics(result.eval_logits, y_test)}
        reports.update(run_baselines(cfg, train_x, test_x, y_train, y_test))
        summary = {
            "data": describe_data(prepared, len(train_rows), len(test_rows)),
            "rounds": len(result.history),
            "epochs": len(result.history),
            "training_seconds": round(result.seconds, 3),
            "tff_calls": result.tff_calls,
            "bytes_per_epoch": result.bytes_per_epoch,
            "bytes_total": result.bytes_total,
            "evaluation": {"tff_calls": result.eval_calls, "bytes_total": result.eval_bytes_total},
            "headline": evaluate.HEADLINE,
            "results": reports,
            "privacy": privacy_statement(cfg, result),
        }
        if cfg.export.enabled:
            export_parties(run, cfg, summary, encoders, result.party_weights)
            summary["export"] = str(run.export_dir)
        table = reporting.results_table(reports, METHOD_COLUMNS)
        extra = {"Alignment and traffic": alignment_table(summary)}
        write_text_atomic(
            run.dir / "report.md", reporting.markdown_report(run, summary, table, group=None, extra=extra)
        )
        summary["report"] = str(run.dir / "report.md")
        summary["report_html"] = str(
            reporting.html_report(
                run, summary, table, round_metric="auc", final_metric=lambda r: r["auc"],
                metric_label="AUC", step_key="epoch", group=None, method="vertical",
                roc={method: (r.labels, r.probabilities) for method, r in reports.items()}, extra=extra,
            )
        )
        summary["table"] = table
        return summary

    def score(self, export_dir: Path, inputs: Mapping[str, str], output: str, id_column: str = "") -> dict:
        """`tff-apps score`: vertical inference from one CSV per party (aligned by PSI)."""
        from finance.model import score_vertical

        missing = [p for p in PARTIES if p not in inputs]
        unknown = [p for p in inputs if p not in PARTIES]
        if missing or unknown:
            raise UserError(
                "score: give one CSV per party as --input lender=FILE --input partner=FILE"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown party {', '.join(unknown)}" if unknown else "")
            )
        from tff_apps.program.predict import resolve_export

        export_dir = export_root(Path(export_dir))
        card = read_export_card(export_dir)
        return score_vertical(
            resolve_export(export_dir / SERVABLES[LENDER]), resolve_export(export_dir / SERVABLES[PARTNER]),
            inputs[LENDER], inputs[PARTNER],
            id_column or card.get("id_column", "id"), output,
        )


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
        reports["centralized"] = evaluate.centralized_baseline(
            train_x[LENDER], train_x[PARTNER], y_train, test_x[LENDER], test_x[PARTNER], y_test, **settings
        )
    if cfg.evaluate.local_baseline:
        reports["lender_alone"] = evaluate.lender_alone_baseline(
            train_x[LENDER], y_train, test_x[LENDER], y_test, **settings
        )
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


def describe_data(prepared: Prepared, n_train: int, n_test: int) -> dict[str, Any]:
    data = prepared.data
    return {
        "source": data.source_description,
        "fingerprint": data_fingerprint([data.lender.fingerprint(), data.partner.fingerprint()]),
        "parties": {
            party.name: {"customers": len(party), "columns": party.columns, "categorical": party.categorical}
            for party in (data.lender, data.partner)
        },
        "alignment": prepared.alignment.describe(),
        "train_customers": n_train,
        "test_customers": n_test,
        "default_rate": float(np.mean(prepared.lender.labels)),
    }


def alignment_table(summary: dict[str, Any]) -> str:
    psi = summary["data"]["alignment"]
    rows = [
        ["customers (lender / partner)", f"{psi['lender_customers']} / {psi['partner_customers']}"],
        ["shared customers (PSI)", psi["match_count"]],
        ["match rate (lender / partner)", f"{psi['match_rate_lender']:.3f} / {psi['match_rate_partner']:.3f}"],
        ["PSI time (s) / bytes", f"{psi['seconds']:.3f} / {psi['bytes_exchanged']:,}"],
        ["training bytes per epoch", f"{summary['bytes_per_epoch'].get('total', 0):,}"],
        ["TFF calls", summary["tff_calls"]],
    ]
    return reporting.markdown_table(["", "value"], rows)


def export_parties(run: Run, cfg: JobConfig, summary: dict, encoders, party_weights) -> None:
    """export/finance_lender/1 and export/finance_partner/1 (one SavedModel each, as TF
    Serving reads them) and export/model_card.json.

    Written into a temporary folder renamed into place: never one party without the other.
    """
    import shutil

    from finance.model import build_bottom_model, export_party
    from tff_apps.program.export import servable_dir

    staging = run.dir / ".export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    card = {
        "app": "finance",
        "run_id": run.run_id,
        "task": "probability of default = sigmoid(lender partial score + partner partial score)",
        "data_fingerprint": summary["data"]["fingerprint"],
        "id_column": cfg.data.id_column,
        "metrics": summary["results"]["vertical"],
        "privacy": summary["privacy"],
        "config": cfg.to_dict(),
    }
    for party, weights in zip(PARTIES, party_weights):
        encoder = encoders[party]
        model = build_bottom_model(cfg.model.kind, encoder.n_outputs, cfg.model.hidden_units, weights)
        export_party(servable_dir(staging, SERVABLES[party]), party, encoder, model, card, cfg.model.score_bound)
    write_json_atomic(staging / CARD_FILE, {**card, "parties": list(PARTIES), "servables": SERVABLES})
    # A re-run of a run id that failed after exporting (finance does not checkpoint, so it
    # trains again) replaces that attempt's export.
    shutil.rmtree(run.export_dir, ignore_errors=True)
    staging.rename(run.export_dir)


def export_root(path: Path) -> Path:
    """A finance run's export/ folder, also when given one party's servable or version folder."""
    for candidate in (path, path.parent, path.parent.parent):
        card = candidate / CARD_FILE
        if card.is_file() and '"parties"' in card.read_text(encoding="utf-8"):
            return candidate
    return path


def read_export_card(export_dir: Path) -> dict[str, Any]:
    from tff_apps.program.predict import read_model_card

    card = read_model_card(Path(export_dir))
    if card.get("app") != "finance" or "parties" not in card:
        raise UserError(f"{export_dir}: not the export folder of a finance run (it holds finance_lender/ and finance_partner/)")
    return card


APP = FinanceApp()
