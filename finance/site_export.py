"""A party's export, written at its own site from the weights its worker kept there.

`python -m finance.site_export export REQUEST.json`, started by the party's gateway
(`tff_apps.sites.vertical_party`, method Export) so that the gateway itself never imports
TensorFlow; `... score REQUEST.json` scores the party's own CSV with that export for
`tff-apps score` across sites. The request names the party's site folder, the run, the state tag of the final
weights, the model (kind, hidden units, common width, score bound) and the card the
coordinator adds (run id, task, metrics, privacy statement, the party's view of the config).
The SavedModel goes to `<folder>/runs/<run>/export/finance_<party>/1`, as in a simulation's
export folder: the same serving signature (`finance.model.export_party`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from finance.model import PartyEncoder, build_bottom_model, export_party
from shared.errors import UserError
from shared.split_model import weight_shapes


def party_weights(flat: np.ndarray, kind: str, width: int, own_width: int, hidden_units: int) -> list[np.ndarray]:
    """The party's weights out of its flat state (weights then optimizer state, padded to the
    common `width`), cut back to its own `own_width` encoded columns."""
    weights, start = [], 0
    for shape in weight_shapes(kind, width, hidden_units):
        size = math.prod(shape)
        weights.append(flat[start : start + size].reshape(shape))
        start += size
    weights[0] = weights[0][:own_width]
    return weights


def export_at_site(request: dict[str, Any]) -> Path:
    import tensorflow as tf

    from tff_apps.program.export import servable_dir

    run = Path(request["folder"]) / "runs" / request["run_id"]
    encoder = PartyEncoder.from_dict(json.loads((run / "encoder.json").read_text(encoding="utf-8")))
    flat = tf.io.parse_tensor(tf.io.read_file(str(run / f"state-{request['tag']}")), tf.float32).numpy()
    weights = party_weights(flat, request["kind"], request["width"], encoder.n_outputs, request["hidden_units"])
    model = build_bottom_model(request["kind"], encoder.n_outputs, request["hidden_units"], weights)
    root = run / "export"
    staging = run / ".export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    export_party(servable_dir(staging, f"finance_{request['party']}"), request["party"], encoder, model,
                 request["card"], request["score_bound"])
    shutil.rmtree(root, ignore_errors=True)  # a re-run's export replaces the earlier attempt's
    staging.rename(root)
    return root


def partial_scores_at_site(request: dict[str, Any]) -> str:
    """`tff-apps score` across sites: the party's export scores every row of its own CSV (at the
    site); the scores go to `<folder>/runs/<session>/score_partial.f64`, in file order. Prints
    the row count and the export's score bound (public: the trained model's clip)."""
    from finance.scoring import load_party
    from shared.tabular import read_csv

    export = Path(request["folder"]) / "runs" / request["model_run"] / "export" / f"finance_{request['party']}" / "1"
    if not export.is_dir():
        raise SystemExit(f"site {request['party']}: run {request['model_run']} has no export here ({export})")
    scorer = load_party(export)
    scores = scorer(read_csv(request["input"]), request["input"])
    out = Path(request["folder"]) / "runs" / request["session"] / "score_partial.f64"
    scores.astype("<f8").tofile(out)
    return json.dumps({"rows": len(scores), "score_bound": float(scorer.card.get("score_bound", 0.0))})


if __name__ == "__main__":
    task = {"export": export_at_site, "score": partial_scores_at_site}[sys.argv[1]]
    try:
        print(task(json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))))
    except UserError as err:  # one line for the gateway to pass on
        raise SystemExit(str(err)) from None
