"""Batch scoring with an exported model: raw CSV rows in, one prediction per row out.

Runs in a fresh process with TensorFlow only (no TFF runtime, no worker process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.tabular import numeric_columns, read_csv, require_columns
from shared.files import write_text_atomic
from tff_apps.program.export import MODEL_CARD


def resolve_export(path: str | Path) -> Path:
    """A run's `export/` folder, a servable's `export/<name>/` folder or one of its version
    folders -> the version folder to load (the highest integer version, as TF Serving picks).

    An `export/` folder with several servables (finance: one per party) is returned as it
    is; so is a path that is not an export (`read_model_card` then says so).
    """
    path = Path(path)
    if not path.is_dir() or (path / "saved_model.pb").is_file():
        return path
    versions = [p for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()]
    if versions:
        return max(versions, key=lambda p: int(p.name))
    servables = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and resolve_export(p) != p]
    return resolve_export(servables[0]) if len(servables) == 1 else path


def read_model_card(model_dir: Path) -> dict:
    model_dir = resolve_export(model_dir)
    card_path = model_dir / MODEL_CARD
    if not model_dir.is_dir() or not card_path.is_file():
        raise UserError(
            f"{model_dir}: not an exported model (no {MODEL_CARD}); give the export folder of a run"
        )
    return json.loads(card_path.read_text(encoding="utf-8"))


def score_frame(model_dir: Path, frame: pd.DataFrame, source: str) -> np.ndarray:
    """Validates the raw columns the model needs, then runs its serving signature."""
    model_dir = resolve_export(model_dir)
    card = read_model_card(model_dir)
    inputs: dict[str, str] = card["inputs"]
    datetimes = [c for c, kind in card.get("input_types", {}).items() if kind == "datetime"]
    strings = [c for c, kind in card.get("input_types", {}).items() if kind == "string"]
    values = numeric_columns(frame, [c for c in inputs if c not in datetimes and c not in strings], source)
    for column in datetimes:
        values[column] = epoch_seconds(frame, column, source)
    for column in strings:  # categorical text, compared with the model's vocabulary in the graph
        require_columns(frame, [column], source)
        values[column] = frame[column].astype(str).str.strip().to_numpy(dtype=object)
    import tensorflow as tf  # imported only once the input is valid: errors come fast

    serving = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    specs = serving.structured_input_signature[1]
    feed = {
        name: tf.constant(values[column].to_numpy(), specs[name].dtype) for column, name in inputs.items()
    }
    return serving(**feed)[card["output"]].numpy()


def epoch_seconds(frame: pd.DataFrame, column: str, source: str) -> pd.Series:
    """Wall-clock timestamps (ISO text) -> seconds since 1970, as the model was trained on."""
    require_columns(frame, [column], source)
    parsed = pd.to_datetime(frame[column], errors="coerce")
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0]) + 1
        raise UserError(
            f"{source}: column '{column}' row {row} is not a date and time; give e.g. 2012-03-01 08:05:00"
        )
    if parsed.dt.tz is not None:
        parsed = parsed.dt.tz_localize(None)
    return pd.Series(parsed.to_numpy().astype("datetime64[ns]").astype(np.int64) / 1e9, index=frame.index)


def predict_csv(model_dir: str | Path, input_csv: str | Path, output_csv: str | Path) -> int:
    """Scores every row of `input_csv`; writes its columns plus the prediction. Returns rows."""
    model_dir, output_csv = resolve_export(model_dir), Path(output_csv)
    card = read_model_card(model_dir)
    frame = read_csv(input_csv)
    if not output_csv.parent.is_dir():
        raise UserError(f"--output {output_csv}: folder {output_csv.parent} does not exist")
    predictions = score_frame(model_dir, frame, str(input_csv))
    scored = frame.copy()
    if predictions.ndim == 2:  # one column per output step, e.g. forecast_5min ... forecast_60min
        for index, name in enumerate(card["output_columns"]):
            scored[name] = predictions[:, index]
    else:
        scored[card["output"]] = predictions
    write_text_atomic(output_csv, scored.to_csv(index=False))
    return len(scored)
