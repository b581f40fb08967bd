"""A finance party's site folder (`tff-apps site prepare finance --site PARTY`) and what the
party does at its own site for a run across sites: its part of the PSI (its IDs), and, once
the customers are aligned, encoding its own columns for the TFF computations its worker runs.

Layout (format `tff-apps-site-v1`, app "finance"):

- `party.csv`: the party's CSV as its owner gave it (the loader's checks passed at prepare).
- `party.json`: the party's own column choices (`PartySpec`), the ID and label column: read
  only at the site, never by the coordinator (column names are the party's own).
- `manifest.json`: app, site (= party name), role (lender or partner), customer count. The
  coordinator reads it through a computation at the site; it names no column.

Per run, the site's gateway (`tff_apps.sites.vertical_party`) writes `runs/<run id>/` in the
folder: `train_x.f32`, `test_x.f32` (the party's encoded rows of the aligned training and
held-out customers, float32 little-endian, its own width), at the lender `train_y.f32` and
`test_y.f32`, `encoder.json` (for its export) and `noise_seed` (its DP noise stream's secret
seed); the TFF computations of `finance.site_training` write its weights there. Imports
neither TensorFlow nor TFF: the gateway runs this.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from finance.model import PartyEncoder
from finance.parties import PartySpec, load_party, party_spec
from finance.tables import PartyTable
from shared.errors import UserError
from shared.files import write_text_atomic

FORMAT = "tff-apps-site-v1"
RUNS = "runs"
EXPORT_TIMEOUT_S = 600


def write_party_folder(cfg, out: Path, site: str) -> dict[str, Any]:
    """`site prepare finance --site PARTY`: checks the party's own file with the simulation's
    loader and writes the folder (nothing on a refusal)."""
    spec = _site_spec(cfg, site)
    data = cfg.data
    table = load_party(spec, data.id_column.strip() or "id", data.label_column.strip(), data.positive_label)
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shutil.copyfile(spec.csv, staging / "party.csv")
        own = {"spec": dataclasses.asdict(spec), "id_column": data.id_column.strip() or "id",
               "label_column": data.label_column.strip(), "positive_label": data.positive_label}
        write_text_atomic(staging / "party.json", json.dumps(own, indent=2))
        manifest = {
            "format": FORMAT, "app": "finance", "site": spec.name, "role": "lender" if spec.is_lender else "partner",
            "rows": {"customers": len(table)}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_text_atomic(staging / "manifest.json", json.dumps(manifest, indent=2))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _site_spec(cfg, site: str) -> PartySpec:
    if cfg.data.source != "csv":
        raise UserError(f"site prepare finance: data.source = {cfg.data.source!r}; a party prepares its own CSV "
                        "(data.source = \"csv\" with [data.parties.NAME] csv = \"FILE\")")
    spec = party_spec(cfg.data, site)
    if spec.is_lender and not cfg.data.label_column.strip():
        raise UserError("data.label_column is empty; name the lender's column that says whether a customer defaulted")
    return dataclasses.replace(spec, csv=str(Path(spec.csv).resolve()) if spec.csv else "")


def write_demo_parties(data, cfg, base: Path) -> list[str]:
    """The parties of `data` (a `finance.data.FinanceData`) written as their own CSVs (id, the
    lender's label "default", their columns) and prepared as site folders; returns their names."""
    parties = {}
    for party in data.parties:
        frame = party.features.copy()
        if party.labels is not None:
            frame.insert(0, "default", party.labels)
        frame.insert(0, "id", party.ids)
        frame.to_csv(base / f"{party.name}.csv", index=False)
        parties[party.name] = {"csv": str(base / f"{party.name}.csv"), "categorical": list(party.categorical)}
    csv_cfg = cfg.replace("data", source="csv", parties=parties, label_column="default", id_column="id")
    for name in parties:
        write_party_folder(csv_cfg, base / name, name)
    return list(parties)


class PartySite:
    """The party at its own site: its table (loaded with the prepare-time checks) and run folders."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("app") != "finance":
            raise UserError(f"--data {folder}: a {manifest.get('app')!r} folder, not a finance party's")
        self.name, self.is_lender = manifest["site"], manifest["role"] == "lender"
        self._table: PartyTable | None = None

    @property
    def table(self) -> PartyTable:
        if self._table is None:
            own = json.loads((self.folder / "party.json").read_text(encoding="utf-8"))
            spec = PartySpec(**{**own["spec"], "columns": tuple(own["spec"]["columns"]),
                                "categorical": tuple(own["spec"]["categorical"]),
                                "shared_categorical": tuple(own["spec"]["shared_categorical"]),
                                "csv": str(self.folder / "party.csv")})
            self._table = load_party(spec, own["id_column"], own["label_column"], own["positive_label"])
        return self._table

    def run_dir(self, run_id: str) -> Path:
        folder = self.folder / RUNS / run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def split(self, rows: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """At the lender: the simulation's held-out split of the aligned customers (`rows`, its own)."""
        from finance.alignment import split_aligned

        return split_aligned(self.table.labels[rows], test_fraction, seed)

    def encode(self, run_id: str, rows: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, Any]:
        """Writes the run's encoded matrices (and labels at the lender): `rows` are the party's
        rows of the aligned customers in the common order, `train`/`test` positions in it.
        Returns what the coordinator needs: the encoded width and the row counts."""
        table, folder = self.table.subset(rows), self.run_dir(run_id)
        encoder = PartyEncoder.fit(table.features.iloc[train], table.categorical)
        for split, positions in (("train", train), ("test", test)):
            _write_f32(folder / f"{split}_x.f32", encoder.transform(table.features.iloc[positions]))
            if self.is_lender:
                _write_f32(folder / f"{split}_y.f32", table.labels[positions].astype(np.float32))
        write_text_atomic(folder / "encoder.json", json.dumps(encoder.to_dict()))
        seed = folder / "noise_seed"
        if not seed.exists():  # kept across attempts: a resumed run replays the same noise
            _write_bytes(seed, np.frombuffer(os.urandom(16), np.int64).tobytes())
        return {"width": encoder.n_outputs, "train": len(train), "test": len(test)}


    def export(self, run_id: str, request: dict[str, Any]) -> str:
        """Writes the party's SavedModel at its site from its final weights there."""
        return self._site_task("export", run_id, request)

    def open_scoring(self, session: str, model_run: str, input_csv: str) -> tuple[np.ndarray, float]:
        """`tff-apps score` across sites: the party's own CSV (a path at its site) scored by its
        export of `model_run`; returns the file's customer IDs (for the PSI) and the export's
        score bound."""
        from finance.csv_columns import require_id_column
        from shared.tabular import read_csv

        own = json.loads((self.folder / "party.json").read_text(encoding="utf-8"))
        frame = read_csv(input_csv)
        require_id_column(frame, own["id_column"], input_csv)
        opened = json.loads(self._site_task("score", session, {"model_run": model_run, "input": input_csv,
                                                                  "session": session}))
        self._scoring = frame[own["id_column"]].to_numpy(dtype=object), own["id_column"]
        return self._scoring[0], opened["score_bound"]

    def align_scoring(self, session: str, rows: np.ndarray) -> int:
        """Its partial scores of the aligned customers, for the secure sum at its worker."""
        folder = self.run_dir(session)
        scores = np.fromfile(folder / "score_partial.f64", "<f8")
        _write_bytes(folder / "score_aligned.f64", np.ascontiguousarray(scores[rows], "<f8").tobytes())
        self._scoring_rows = rows
        return len(rows)

    def write_scores(self, session: str, z: np.ndarray, output: str) -> int:
        """At the lender: its IDs of the scored customers and sigmoid(z), written at its site."""
        import pandas as pd

        from shared.split_model import sigmoid

        ids, id_column = self._scoring
        out = pd.DataFrame({id_column: ids[self._scoring_rows], "probability": sigmoid(np.asarray(z, np.float64))})
        if not Path(output).parent.is_dir():
            raise UserError(f"site {self.name}: --output {output}: folder {Path(output).parent} does not exist here")
        write_text_atomic(Path(output), out.to_csv(index=False))
        return len(out)

    def _site_task(self, task: str, run_id: str, request: dict[str, Any]) -> str:
        """`python -m finance.site_export TASK` in a child process (the gateway does not import
        TensorFlow); its last output line, or its one-line error as a UserError."""
        import subprocess
        import sys

        order = self.run_dir(run_id) / f"{task}-request.json"
        write_text_atomic(order, json.dumps({**request, "folder": str(self.folder), "run_id": run_id,
                                             "party": self.name}))
        done = subprocess.run([sys.executable, "-m", "finance.site_export", task, str(order)], capture_output=True,
                              text=True, timeout=EXPORT_TIMEOUT_S)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(last if last.startswith(f"site {self.name}") else f"site {self.name}: its {task} failed ({last})")
        return done.stdout.strip().splitlines()[-1]


def _write_f32(path: Path, matrix: np.ndarray) -> None:
    _write_bytes(path, np.ascontiguousarray(matrix, dtype="<f4").tobytes())


def _write_bytes(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
