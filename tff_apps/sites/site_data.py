"""A site's data folder: its own rows, encoded once at the site (`tff-apps site prepare`), for
the TFF computations that the site's worker runs on them.

Layout (format `tff-apps-site-v1`):

- `train.tfrecord`, `test.tfrecord`: one `tf.train.Example` per row, `x` = the raw feature
  values as float64 little-endian bytes (NaN = missing, exactly as the app's loader left
  them), `y` = the label (int64). float64 keeps the values bit for bit, so statistics
  computed at the site equal those of a simulation on the same rows.
- `manifest.json`: app, site name, schema (feature columns, categorical columns, label
  kind) and its fingerprint, row counts, the train/test split (fraction, seed), dropped
  rows, creation time. The coordinator reads it through a computation at the site; it holds
  what the privacy statement lists as released anyway (row counts), never a value.

The split is done here, at the site, with the same seeded stratified split as a
simulation (`shared.partition.stratified_split`), so a site holds exactly the partition a
simulation of the same data would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UserError
from shared.files import write_text_atomic

FORMAT = "tff-apps-site-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Schema:
    """What every site of one federation must agree on."""

    app: str
    feature_names: tuple[str, ...]
    categorical: tuple[str, ...]
    zero_means_missing: tuple[str, ...]
    label: str  # "binary"

    def fingerprint(self) -> str:
        text = json.dumps(
            [self.app, list(self.feature_names), list(self.categorical), list(self.zero_means_missing), self.label]
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app, "feature_names": list(self.feature_names), "categorical": list(self.categorical),
            "zero_means_missing": list(self.zero_means_missing), "label": self.label,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schema":
        return cls(
            data["app"], tuple(data["feature_names"]), tuple(data["categorical"]),
            tuple(data["zero_means_missing"]), data["label"],
        )


def write_site_folder(
    out_dir: Path, site: str, schema: Schema, splits: dict[str, tuple[np.ndarray, np.ndarray]],
    split_settings: dict[str, Any], dropped_rows: int = 0,
) -> dict[str, Any]:
    """Writes the folder atomically (a temporary folder renamed into place); refuses to
    overwrite one. `splits`: "train"/"test" -> (raw features float64 [n, d], labels [n])."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"--out {out_dir}: already exists; give a new folder (a site folder is written once)")
    if not out_dir.parent.is_dir():
        raise UserError(f"--out {out_dir}: folder {out_dir.parent} does not exist")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name in SPLITS:
            features, labels = splits[name]
            _write_records(staging / f"{name}.tfrecord", features, labels)
        manifest = {
            "format": FORMAT, "site": site, "schema": schema.to_dict(), "schema_fingerprint": schema.fingerprint(),
            "rows": {name: int(len(splits[name][1])) for name in SPLITS}, "split": split_settings,
            "dropped_rows": int(dropped_rows), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2))
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_records(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    import tensorflow as tf

    features = np.ascontiguousarray(features, dtype="<f8")
    with tf.io.TFRecordWriter(str(path)) as writer:
        for row, label in zip(features, np.asarray(labels, np.int64)):
            example = tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row.tobytes()])),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            writer.write(example.SerializeToString())


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a local site folder (tests and `site serve`)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"--data {folder}: no {MANIFEST}; make the folder with `tff-apps site prepare`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise UserError(f"--data {folder}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest


def parse_table(path, n_features: int):
    """TF ops, at the site: a split's records as (features float64 [n, d], labels float32 [n, 1])."""
    import tensorflow as tf

    spec = {"x": tf.io.FixedLenFeature([], tf.string), "y": tf.io.FixedLenFeature([1], tf.int64)}
    records = tf.data.TFRecordDataset(path).map(lambda r: tf.io.parse_single_example(r, spec))
    table = records.batch(2**31 - 1).get_single_element()
    features = tf.reshape(tf.io.decode_raw(table["x"], tf.float64), [-1, n_features])
    return features, tf.cast(table["y"], tf.float32)
