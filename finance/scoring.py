"""Vertical inference from the parties' exports and CSVs (`tff-apps score`).

`load_party` opens one party's export (`finance.model.export_party`); `score_vertical` aligns
the parties' CSVs by PSI (`finance.alignment.align_ids`), lets each party's export score its
own rows of the shared customers, and adds the scores through the engine's secure sum, as in
training; the probability is sigmoid of the sum.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from finance.model import OUTPUT, PARTY_EXPORT_KIND, ModelConfig, category_values
from shared.errors import UserError
from shared.split_model import sigmoid
from shared.tabular import numeric_columns, read_csv, require_columns

__all__ = ["PartyScorer", "load_party", "score_vertical"]


class PartyScorer:
    """A loaded party export: `scorer(frame, source)` -> float64 partial scores, one per row."""

    def __init__(self, export_dir: Path, card: dict[str, Any]):
        import tensorflow as tf

        self.export_dir = export_dir
        self.card = card
        self.party: str = card.get("party", "")
        self.inputs: dict[str, str] = card["inputs"]  # raw column -> signature input name
        self.input_types: dict[str, str] = card.get("input_types", {})
        self._serving = tf.saved_model.load(str(export_dir)).signatures["serving_default"]

    @property
    def columns(self) -> list[str]:
        return list(self.inputs)

    def __call__(self, frame: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Validates the raw columns (UserError naming `source` and the column), then scores."""
        import tensorflow as tf

        require_columns(frame, self.columns, source)
        strings = [c for c in self.columns if self.input_types.get(c) == "string"]
        numbers = numeric_columns(frame, [c for c in self.columns if c not in strings], source)
        feed = {}
        for column, name in self.inputs.items():
            if column in strings:
                feed[name] = tf.constant(category_values(frame[column]).astype(str), tf.string)
            else:
                feed[name] = tf.constant(numbers[column].to_numpy(np.float32), tf.float32)
        return self._serving(**feed)[OUTPUT].numpy().astype(np.float64)


def load_party(export_dir: str | Path) -> PartyScorer:
    """Load a party export written by `export_party`; UserError if it is not one."""
    from tff_apps.program.predict import read_model_card

    export_dir = Path(export_dir)
    card = read_model_card(export_dir)
    if card.get("export_kind") != PARTY_EXPORT_KIND:
        raise UserError(
            f"{export_dir}: is not a party's bottom model of a vertical (finance) model "
            f"(model_card.json export_kind is {card.get('export_kind')!r}, expected '{PARTY_EXPORT_KIND}')"
        )
    return PartyScorer(export_dir, card)


def score_vertical(
    exports: Mapping[str, str | Path], csvs: Mapping[str, str | Path], id_column: str, output_csv: str | Path,
) -> dict[str, Any]:
    """Vertical inference: each party scores its own CSV rows, aligned by PSI, summed, sigmoid.

    `exports` and `csvs` map each party (the lender first, as in the model card) to its export
    and its CSV. The sum is training's: each party's partial scores are its CLIENTS value of
    `tff.federated_secure_sum_bitwidth` (clip to the exports' score_bound, 16 fractional bits;
    `tff_apps.program.vertical_rounds.secure_score_sum`), run in a TFF runtime this call starts
    and stops, and only the decoded sum reaches the code that writes probabilities (within
    2^-17 per party of the plain sum). Writes ``<id_column>,probability`` (the lender's
    spelling of each shared customer's ID, in the PSI's common order) to `output_csv`
    atomically. Returns match_count, match rates, rows_written, psi_seconds and seconds.
    """
    from finance.alignment import align_ids
    from finance.csv_columns import require_id_column
    from shared.files import write_text_atomic

    start = time.perf_counter()
    output_csv = Path(output_csv)
    if not output_csv.parent.is_dir():
        raise UserError(f"{output_csv}: folder {output_csv.parent} does not exist")
    frames = {party: read_csv(path) for party, path in csvs.items()}
    for party, frame in frames.items():
        require_id_column(frame, id_column, str(csvs[party]))
    scorers = _scorers(exports)
    bound = _sum_bound(scorers)
    for party, scorer in scorers.items():  # column checks before the PSI, so a wrong file fails fast
        require_columns(frames[party], scorer.columns, str(csvs[party]))
    alignment = align_ids([(party, frame[id_column].to_numpy(dtype=object), str(csvs[party])) for party, frame in frames.items()])
    # Each party scores only its own rows of the shared customers; only the secure sum comes back.
    rows = {party: frame.iloc[alignment.rows[party]].reset_index(drop=True) for party, frame in frames.items()}
    logit = _secure_sum([scorer(rows[party], str(csvs[party])) for party, scorer in scorers.items()], bound)
    lender = next(iter(rows))
    out = pd.DataFrame({id_column: rows[lender][id_column].to_numpy(), "probability": sigmoid(logit)})
    write_text_atomic(output_csv, out.to_csv(index=False))
    return {
        "match_count": alignment.match_count,
        "match_rate_lender": alignment.match_rate(lender),
        "match_rates": {party: alignment.match_rate(party) for party in frames},
        "rows_written": len(out),
        "psi_seconds": alignment.seconds,
        "seconds": time.perf_counter() - start,
    }


def _scorers(exports: Mapping[str, str | Path]) -> dict[str, PartyScorer]:
    """Each party's loaded export, checked to be that party's and of one run."""
    scorers = {party: load_party(path) for party, path in exports.items()}
    for party, scorer in scorers.items():
        if scorer.party != party:
            swap = " (swap the two)" if scorer.party in scorers and len(scorers) == 2 else ""
            raise UserError(
                f"{exports[party]} is the {scorer.party}'s model, given for the {party}; give each party its own "
                f"export{swap}"
            )
    runs = {scorer.card.get("run_id") for scorer in scorers.values()}
    if len(runs) > 1 and None not in runs:
        shown = ", ".join(f"{path} (run {scorers[p].card.get('run_id')})" for p, path in exports.items())
        raise UserError(f"{shown} come from different runs; use the parties' exports of one run")
    return scorers


def _sum_bound(scorers: Mapping[str, PartyScorer]) -> float:
    """The secure sum's public clip bound: the exports' score_bound, i.e. the trained model's.
    An export without a clip (0) is summed with the default bound, outside which a partial
    score barely moves a probability (sigmoid(32) = 1 - 1.3e-14)."""
    bounds = {float(scorer.card.get("score_bound", 0.0)) for scorer in scorers.values()}
    if len(bounds) > 1:
        shown = " and ".join(f"{s.export_dir} (score_bound {float(s.card.get('score_bound', 0.0))})" for s in scorers.values())
        raise UserError(f"{shown} were exported with different score bounds; use the parties' exports of one run")
    (bound,) = bounds
    return bound if bound > 0 else ModelConfig.score_bound


def _secure_sum(party_scores: list[np.ndarray], bound: float) -> np.ndarray:
    """The engine's secure sum in a TFF runtime of its own, stopped on return, error or signal
    (no TFF worker outlives `tff-apps score`)."""
    from tff_apps.program.vertical_rounds import secure_score_sum
    from tff_apps.runtime.context import Runtime

    with Runtime():
        return secure_score_sum(party_scores, bound).astype(np.float64)
