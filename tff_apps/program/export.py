"""Export for serving: a SavedModel that takes raw feature columns by name, plus a model card.

Layout, as TensorFlow Serving expects it: `<run>/export/<name>/<version>/` (`<name>` the
servable, e.g. `healthcare`; `<version>` an integer, `SERVABLE_VERSION` for a run's
export; TF Serving serves the highest). Horizontal apps also keep the trained weights
there (`weights.npz`) so a later job can warm-start from them (`job.init_from`).

The serving graph holds the federated preprocessing (one-hot vocabularies, imputation
means, standardization), so a client of the model sends raw values. Everything is
written to a temporary folder and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from shared.files import write_json_atomic
from tff_apps.learning.preprocessing import Preprocessor

MODEL_CARD = "model_card.json"
WEIGHTS_FILE = "weights.npz"  # the trained model's weights (ModelWeights order), for warm starts
SERVABLE_VERSION = 1  # a run exports version 1 of its servable(s)
SIGNATURE_NAME_PATTERN = re.compile(r"[^A-Za-z0-9_]")
PACKAGES = (
    "tff-apps",
    "tensorflow",
    "tensorflow-federated",
    "tensorflow-privacy",
    "dp-accounting",
    "numpy",
    "pandas",
    "scikit-learn",
)


def signature_names(columns: list[str]) -> dict[str, str]:
    """Raw column -> a valid, unique SavedModel input name (TF allows [A-Za-z0-9_.-/] only)."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for column in columns:
        base = SIGNATURE_NAME_PATTERN.sub("_", column) or "feature"
        if not base[0].isalnum():
            base = "f" + base
        candidate, suffix = base, 2
        while candidate in used:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        used.add(candidate)
        names[column] = candidate
    return names


class ServingModule(tf.Module):
    """Raw named columns in, named outputs out: `serve_fn(columns) -> {output: tensor}`.

    `serve_fn` holds the app's preprocessing and calls `model`; tracking `model` here
    puts its variables in the SavedModel.
    """

    def __init__(
        self, model: tf.keras.Model, columns: list[str], serve_fn: Callable,
        dtypes: dict[str, tf.DType] | None = None,
    ):
        super().__init__()
        self.model = model
        self.input_names = signature_names(columns)
        self._serve_fn = serve_fn
        dtypes = dtypes or {}
        spec = {
            name: tf.TensorSpec([None], dtypes.get(column, tf.float32), name=name)
            for column, name in self.input_names.items()
        }
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self._serve_fn({column: inputs[name] for column, name in self.input_names.items()})


def tabular_serving(model: tf.keras.Model, preprocessor: Preprocessor, output_name: str) -> ServingModule:
    """Raw feature columns -> the federated preprocessing -> model -> one value per row."""

    def serve(columns: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        raw = tf.stack([columns[c] for c in preprocessor.feature_names], axis=1)
        prediction = model(preprocessor.tf_transform(raw), training=False)
        return {output_name: tf.squeeze(prediction, axis=-1)}

    return ServingModule(model, preprocessor.feature_names, serve)


def servable_dir(export_root: Path, name: str, version: int = SERVABLE_VERSION) -> Path:
    """`export_root/<name>/<version>`: one version of one servable, as TF Serving reads it."""
    return Path(export_root) / name / str(version)


def save_weights(path: Path, weights) -> None:
    """A `tff.learning.models.ModelWeights` -> .npz (trainable_<i>, non_trainable_<i>)."""
    arrays = {f"trainable_{i}": np.asarray(w) for i, w in enumerate(weights.trainable)}
    arrays.update({f"non_trainable_{i}": np.asarray(w) for i, w in enumerate(weights.non_trainable)})
    np.savez(path, **arrays)


def load_weights(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(trainable, non_trainable) arrays as `save_weights` wrote them."""
    with np.load(path) as stored:
        def part(prefix: str) -> list[np.ndarray]:
            count = sum(1 for key in stored.files if key.startswith(prefix))
            return [stored[f"{prefix}{i}"] for i in range(count)]

        return part("trainable_"), part("non_trainable_")


def weights_digest(trainable, non_trainable) -> str:
    """sha256 over the weights' float32 bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for array in [*trainable, *non_trainable]:
        array = np.ascontiguousarray(np.asarray(array), dtype="<f4")
        digest.update(str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def export_model(
    export_dir: Path,
    model: tf.keras.Model,
    preprocessor: Preprocessor,
    card: dict[str, Any],
    output_name: str = "probability",
    weights=None,
) -> Path:
    """A tabular model with its preprocessing built in (see `export_module`)."""
    card = {**card, "preprocessor": json.loads(preprocessor.to_json())}
    return export_module(
        export_dir, tabular_serving(model, preprocessor, output_name), output_name, card, weights=weights
    )


def export_module(
    export_dir: Path, module: ServingModule, output_name: str, card: dict[str, Any], weights=None
) -> Path:
    """Writes `export_dir` (SavedModel + model_card.json, and `weights.npz` when `weights`, a
    ModelWeights, is given) atomically; returns it."""
    card = {
        **card,
        "inputs": module.input_names,
        "output": output_name,
        "packages": package_versions(),
    }
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", dir=export_dir.parent))
    try:
        tf.saved_model.save(module, str(staging), signatures={"serving_default": module.serve})
        write_json_atomic(staging / MODEL_CARD, card)
        if weights is not None:
            save_weights(staging / WEIGHTS_FILE, weights)
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir
