"""Privacy audit: membership inference against a finished run's exported model.

`tff-apps audit RUN_DIR` asks how well an attacker who can query the served model can tell
the run's training records (members) from its held-out records (non-members):

1. loss threshold (Yeom et al., CSF 2018): score = -loss of the model on the record
   (binary cross-entropy of the served probability against the label);
2. a learned attack: a scikit-learn classifier on per-record features (probability, loss,
   label, confidence, entropy), trained and scored with stratified K-fold cross-validation
   on a balanced member / non-member set (members subsampled, seeded).

Each reports the attacker's AUC and its TPR at FPR = 1 % and 0.1 % (the largest TPR on the
ROC curve with FPR <= target, never interpolated upwards). With n non-members the smallest
non-zero FPR is 1/n, so a target below it is read at FPR = 0; the audit says so.

The records are recovered from the run folder alone: its `config.toml` (the resolved job,
seed included) goes through the app's own `prepare`, and the data fingerprint must equal
the one the run recorded. No TFF runtime or worker is needed; TensorFlow only loads the
SavedModel.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UserError
from shared.files import write_json_atomic, write_text_atomic

AUDIT_FILE = "audit.json"
SUPPORTED_APPS = ("healthcare",)  # binary classification with a `probability` output
FPR_TARGETS = (0.01, 0.001)
FOLDS = 5
PROBABILITY_FLOOR = 1e-12  # losses are computed from probabilities clipped to [floor, 1 - floor]
REPORT_HEADING = "## Privacy audit (membership inference)"


# --------------------------------------------------------------------------- ROC helpers


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC of `scores` separating labels 1 (members) from 0; ties count one half."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("roc_auc needs both members and non-members")
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    """The largest TPR reached by any threshold whose FPR is <= `target_fpr` (conservative:
    no interpolation between ROC points; FPR = 0 counts, so the result is never undefined)."""
    from sklearn.metrics import roc_curve

    # drop_intermediate=False: a point dropped as collinear may be the best one under the target.
    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores), drop_intermediate=False)
    allowed = fpr <= target_fpr + 1e-12
    return float(tpr[allowed].max())


def attack_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC, TPR at each FPR target, best advantage max(TPR - FPR), and the counts."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    members, non_members = int(labels.sum()), int(len(labels) - labels.sum())
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auc": roc_auc(labels, scores),
        # sd of the AUC of a useless attacker on these counts (Mann-Whitney null, no ties):
        # "near 0.5" means within about two of these.
        "auc_chance_sd": math.sqrt((members + non_members + 1) / (12.0 * members * non_members)),
        **{tpr_key(t): tpr_at_fpr(labels, scores, t) for t in FPR_TARGETS},
        "advantage": float(np.max(tpr - fpr)),
        "members": members,
        "non_members": non_members,
    }


def tpr_key(target: float) -> str:
    return f"tpr_at_fpr_{target * 100:g}pct"


def resolution_notes(non_members: int, what: str) -> list[str]:
    """One note per FPR target that `non_members` cannot resolve (it needs >= 1 / target)."""
    notes = []
    for target in FPR_TARGETS:
        if non_members * target < 1:
            notes.append(
                f"{what}: TPR at FPR = {target * 100:g} % is not resolvable with {non_members} "
                f"non-members (needs >= {math.ceil(1 / target)}; the smallest non-zero FPR is "
                f"1/{non_members} = {100 / non_members:.2g} %), so it is reported at FPR = 0"
            )
    return notes


# --------------------------------------------------------------------------- per-record features


def binary_cross_entropy(probability: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probability, dtype=np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    y = np.asarray(labels, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def record_features(probability: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Columns: probability, loss, label, confidence max(p, 1-p), entropy of the prediction."""
    p = np.clip(np.asarray(probability, dtype=np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    y = np.asarray(labels, dtype=np.float64)
    entropy = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    return np.column_stack([p, binary_cross_entropy(p, y), y, np.maximum(p, 1 - p), entropy])


LEARNED_FEATURES = ["probability", "loss", "label", "confidence", "entropy"]


# --------------------------------------------------------------------------- attacks


def loss_threshold_attack(member_loss: np.ndarray, non_member_loss: np.ndarray) -> dict[str, Any]:
    labels = np.r_[np.ones(len(member_loss)), np.zeros(len(non_member_loss))].astype(int)
    scores = -np.r_[member_loss, non_member_loss]
    return {"method": "loss threshold (Yeom et al. 2018): score = -loss", **attack_metrics(labels, scores)}


def learned_attack(
    member_x: np.ndarray, non_member_x: np.ndarray, seed: int, folds: int = FOLDS
) -> dict[str, Any]:
    """Balanced sets (the larger side subsampled, seeded), out-of-fold attack scores."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng([int(seed), 0xA0D1])
    n = min(len(member_x), len(non_member_x))
    if n < 2:
        raise UserError(f"audit: {n} records on the smaller side; the learned attack needs >= 2 of each")
    members = member_x[np.sort(rng.choice(len(member_x), n, replace=False))]
    non_members = non_member_x[np.sort(rng.choice(len(non_member_x), n, replace=False))]
    x = np.vstack([members, non_members])
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    folds = min(folds, n)
    scores = np.zeros(len(labels))
    for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        model = GradientBoostingClassifier(
            n_estimators=100, max_depth=2, learning_rate=0.05, subsample=0.8, random_state=seed
        )
        model.fit(x[train_idx], labels[train_idx])
        scores[test_idx] = model.predict_proba(x[test_idx])[:, 1]
    return {
        "method": (
            f"gradient boosting on {', '.join(LEARNED_FEATURES)}; {folds}-fold stratified "
            "cross-validation, out-of-fold scores, members subsampled to balance"
        ),
        "folds": folds,
        **attack_metrics(labels, scores),
    }


# --------------------------------------------------------------------------- the run folder


@dataclass
class RunRecords:
    app: str
    run_id: str
    seed: int
    fingerprint: str
    members: list[Any]  # ClientTable per site: training rows
    non_members: list[Any]  # ClientTable per site: held-out rows


def load_run_records(run_dir: Path) -> RunRecords:
    """The run's members and non-members, rebuilt from its config.toml alone and checked
    against the data fingerprint the run recorded."""
    from tff_apps import config as config_lib
    from tff_apps.registry import load_app

    config_path = run_dir / "config.toml"
    if not run_dir.is_dir() or not config_path.is_file():
        raise UserError(
            f"{run_dir}: not a finished run (no config.toml); give a run folder, e.g. runs/healthcare/<run_id>"
        )
    card_path = _model_dir(run_dir) / "model_card.json"
    if not card_path.is_file():
        raise UserError(
            f"{run_dir}: the run has no exported model ({card_path} is missing); audit a finished run "
            "with export.enabled = true"
        )
    summary = _read_json(run_dir / "summary.json", run_dir)
    if summary.get("status") != "succeeded":
        raise UserError(
            f"{run_dir}: the run did not finish (summary.json status {summary.get('status')!r}); audit a succeeded run"
        )
    raw = config_lib.read_toml(config_path, "run config")
    app_name = raw.get("job", {}).get("app", "") if isinstance(raw.get("job"), dict) else ""
    if app_name not in SUPPORTED_APPS:
        raise UserError(
            f"{run_dir}: app {app_name!r} cannot be audited yet; the audit supports {', '.join(SUPPORTED_APPS)} "
            "(binary classification)"
        )
    app = load_app(app_name)
    cfg = config_lib.resolve(app.default_config, app.sections, config_path)
    prepared = app.prepare(cfg)
    fingerprint = app.fingerprint(prepared)
    card = _read_json(card_path, run_dir)
    recorded = {
        "summary.json": summary.get("data", {}).get("fingerprint"),
        "export/model_card.json": card.get("data_fingerprint"),
    }
    for where, value in recorded.items():
        if value != fingerprint:
            raise UserError(
                f"{run_dir}: the data behind this run has changed ({where} records data fingerprint "
                f"{str(value)[:12]}..., the data now gives {fingerprint[:12]}...); the audit needs the run's own records"
            )
    sites = summary.get("data", {}).get("sites", {})
    for train, test in zip(prepared.trains, prepared.tests):
        expected = sites.get(train.name, {})
        if (expected.get("train_rows"), expected.get("test_rows")) != (len(train), len(test)):
            raise UserError(
                f"{run_dir}: the data behind this run has changed (site {train.name}: the run recorded "
                f"{expected.get('train_rows')}/{expected.get('test_rows')} train/test rows, now "
                f"{len(train)}/{len(test)})"
            )
    return RunRecords(app_name, cfg.job.run_id, cfg.job.seed, fingerprint, prepared.trains, prepared.tests)


def _model_dir(run_dir: Path) -> Path:
    """The run's served model: `export/<app>/<highest version>/`."""
    from tff_apps.program.predict import resolve_export

    return resolve_export(run_dir / "export")


def _read_json(path: Path, run_dir: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{run_dir}: not a finished run ({path.name} is missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{run_dir}: {path.name} is not valid JSON; the run folder is damaged") from None


class ExportedScorer:
    """The run's SavedModel, loaded once, fed raw named columns as `tff-apps predict` does."""

    def __init__(self, model_dir: Path):
        from tff_apps.program.predict import read_model_card

        self.card = read_model_card(model_dir)
        import tensorflow as tf

        self._tf = tf
        self.serving = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
        self.specs = self.serving.structured_input_signature[1]

    def __call__(self, frame, source: str) -> np.ndarray:
        from shared.tabular import numeric_columns

        inputs: dict[str, str] = self.card["inputs"]
        values = numeric_columns(frame, list(inputs), source)
        feed = {
            name: self._tf.constant(values[column].to_numpy(), self.specs[name].dtype)
            for column, name in inputs.items()
        }
        return self.serving(**feed)[self.card["output"]].numpy().astype(np.float64).reshape(-1)


# --------------------------------------------------------------------------- the audit


def audit_run(run_dir: str | Path) -> dict[str, Any]:
    """Runs both attacks; writes audit.json, the model card's `audit`, and the report section."""
    run_dir = Path(run_dir)
    records = load_run_records(run_dir)
    model_dir = _model_dir(run_dir)
    scorer = ExportedScorer(model_dir)

    def score(tables, kind: str) -> tuple[np.ndarray, np.ndarray]:
        # One site at a time: no site's raw rows are pooled with another's, only the scores.
        probabilities, labels = [], []
        for table in tables:
            probabilities.append(scorer(table.features, f"{run_dir} ({table.name} {kind} rows)"))
            labels.append(table.labels)
        return np.concatenate(probabilities), np.concatenate(labels)

    member_p, member_y = score(records.members, "training")
    non_member_p, non_member_y = score(records.non_members, "held-out")
    loss = loss_threshold_attack(
        binary_cross_entropy(member_p, member_y), binary_cross_entropy(non_member_p, non_member_y)
    )
    learned = learned_attack(
        record_features(member_p, member_y), record_features(non_member_p, non_member_y), records.seed
    )
    notes = resolution_notes(loss["non_members"], "loss threshold")
    notes += resolution_notes(learned["non_members"], "learned")
    card = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))
    result = {
        "run": str(run_dir),
        "app": records.app,
        "run_id": records.run_id,
        "data_fingerprint": records.fingerprint,
        "members": "the run's training records (every site)",
        "non_members": "the run's held-out records (every site)",
        "member_count": int(len(member_y)),
        "non_member_count": int(len(non_member_y)),
        "seed": records.seed,
        "privacy": _privacy_line(card.get("privacy")),
        "attacks": {"loss_threshold": loss, "learned": learned},
        "notes": notes,
    }
    write_json_atomic(run_dir / AUDIT_FILE, result)
    card["audit"] = {k: v for k, v in result.items() if k != "run"}
    write_json_atomic(model_dir / "model_card.json", card)
    report = run_dir / "report.md"
    if report.is_file():
        write_text_atomic(report, with_report_section(report.read_text(encoding="utf-8"), result))
    return result


def _privacy_line(privacy: Any) -> str:
    if not isinstance(privacy, dict) or privacy.get("level", "none") == "none":
        return "none"
    epsilon = privacy.get("epsilon")
    eps = f", epsilon {epsilon:.3g} at delta {privacy.get('delta')}" if isinstance(epsilon, (int, float)) else ""
    return f"{privacy.get('level')}-level DP{eps}"


ATTACK_NAMES = {"loss_threshold": "loss threshold", "learned": "learned (gradient boosting)"}


def table(result: dict[str, Any]) -> str:
    header = ["attack", "AUC", "chance sd", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "advantage", "members", "non-members"]
    rows = [
        [
            ATTACK_NAMES[name], f"{a['auc']:.4f}", f"{a['auc_chance_sd']:.4f}",
            f"{a[tpr_key(0.01)]:.4f}", f"{a[tpr_key(0.001)]:.4f}", f"{a['advantage']:.4f}",
            str(a["members"]), str(a["non_members"]),
        ]
        for name, a in result["attacks"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def with_report_section(report: str, result: dict[str, Any]) -> str:
    """The report with its audit section added, or replaced if an earlier audit wrote one."""
    section = "\n".join([
        REPORT_HEADING,
        "",
        f"Members: {result['member_count']} training records; non-members: {result['non_member_count']} "
        f"held-out records (every site). Privacy of the run: {result['privacy']}. An attacker AUC near 0.5 "
        "(within about two chance sd) means the model does not reveal who was in the training data.",
        "",
        table(result),
        "",
        *[f"- {note}" for note in result["notes"]],
    ]).rstrip() + "\n"
    pattern = re.compile(rf"^{re.escape(REPORT_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(report):
        return pattern.sub(lambda _m: section + "\n", report, count=1).rstrip() + "\n"
    return report.rstrip() + "\n\n" + section
