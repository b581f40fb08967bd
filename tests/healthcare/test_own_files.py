"""The healthcare job on a hospital's own files: a folder of UCI-style hospital CSVs ('?' and
chol = 0 for missing, a graded label), trained, then scored from raw rows through `predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tests.cli import tff_apps_in_process


def write_uci_style_hospitals(folder: Path) -> None:
    """Hospital CSVs laid out like the UCI heart files: '?' and chol = 0 for missing, num 0-4."""
    from healthcare.data import DataConfig, load

    rng = np.random.default_rng(1)
    for client in load(DataConfig(source="heart"), seed=1).clients:
        frame = client.features.copy()
        frame["chol"] = frame["chol"].fillna(0)
        frame["num"] = [int(rng.integers(1, 5)) if y else 0 for y in client.labels]
        frame = frame.astype(object)
        frame.loc[rng.random(len(frame)) < 0.05, "thalach"] = "?"
        frame.loc[3, "num"] = ""  # a row without a label is dropped and counted
        frame.to_csv(folder / f"{client.name}.csv", index=False)


def test_hospital_csv_folder_end_to_end(tmp_path: Path):
    hospitals = tmp_path / "hospitals"
    hospitals.mkdir()
    write_uci_style_hospitals(hospitals)
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\napp = "healthcare"\nruns_dir = "{tmp_path / "runs"}"\n'
        f'[data]\nsource = "csv"\npath = "{hospitals}"\nlabel_column = "num"\nnegative_label = "0"\n'
        'categorical_columns = ["cp", "restecg"]\nzero_means_missing = ["chol"]\n'
        "[train]\nrounds = 5\n[evaluate]\nlocal_baseline = false\nbaseline_epochs = 5\n"
    )
    result = tff_apps_in_process("run", "--config", str(job), "--run-id", "csv")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "healthcare" / "csv"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["dropped_rows"] == {"cleveland": 1, "hungarian": 1, "switzerland": 1, "va": 1}
    assert summary["data"]["categorical"] == ["cp", "restecg"]
    assert summary["results"]["federated"]["pooled"]["auc"] > 0.75

    # Serving gets raw rows: chol = 0 must mean "not measured", as it did in training.
    rows = pd.read_csv(hospitals / "va.csv", dtype=str).head(12).drop(columns=["num"])
    rows["thalach"] = rows["thalach"].replace("?", "120")
    as_zero, as_empty = rows.assign(chol="0"), rows.assign(chol="")
    as_zero.to_csv(tmp_path / "zero.csv", index=False)
    as_empty.to_csv(tmp_path / "empty.csv", index=False)
    for name in ("zero", "empty"):
        scored = tff_apps_in_process("predict", str(run / "export"), "--input", str(tmp_path / f"{name}.csv"),
                          "--output", str(tmp_path / f"{name}_scored.csv"))
        assert scored.returncode == 0, scored.stderr[-3000:]
    zero = pd.read_csv(tmp_path / "zero_scored.csv")["probability"]
    empty = pd.read_csv(tmp_path / "empty_scored.csv")["probability"]
    np.testing.assert_allclose(zero, empty, atol=1e-7)
    assert zero.std() > 0.01  # the rows differ, so do their scores
