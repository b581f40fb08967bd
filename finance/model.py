"""The split model of vertical credit scoring: per-party encoders, bottom models and export.

Each party turns ITS OWN raw columns into numbers with a `PartyEncoder` fitted on its
own aligned training rows, and runs a bottom model on them that returns a partial
score (a logit contribution). The model's logit for a customer is the sum of the two
parties' partial scores; the probability of default is sigmoid(sum).

Bottom-model weight format (shared with the engine, tff_apps/learning/vertical.py): a list of
float32 numpy arrays in Keras Dense order,

- ``logistic``: ``[kernel (d, 1), bias (1,)]``  -> ``x @ kernel + bias``
- ``mlp``: ``[kernel1 (d, h), bias1 (h,), kernel2 (h, 1), bias2 (1,)]``
  -> ``relu(x @ kernel1 + bias1) @ kernel2 + bias2``

`partial_score` computes it in numpy, `build_bottom_model` as a Keras model. Initial
weights and the mini-batch order come from the engine (`tff_apps.learning.vertical.initial_weights`,
`batch_indices`), so the baselines train exactly like a vertical party.

Export: `export_party` writes one party's bottom model as its own SavedModel that takes
the party's RAW columns by name (float32 numerics, NaN = missing; string categoricals),
applies the party's encoder and returns ``partial_score`` (float32, one per row).
`finance.scoring` loads the exports and does vertical inference from the parties' CSVs.

TensorFlow is imported inside the functions that need it, so validating a job (which
builds `ModelConfig`) does not pay for TensorFlow's import.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from shared.split_model import KINDS, kind_of, partial_scores, sigmoid, weight_shapes
from shared.tabular import MISSING_TOKENS

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "ModelConfig",
    "PartyEncoder",
    "KINDS",
    "PARTY_EXPORT_KIND",
    "OUTPUT",
    "weight_shapes",
    "partial_score",
    "sigmoid",
    "build_bottom_model",
    "export_party",
]

PARTY_EXPORT_KIND = "finance_party_bottom_model"  # model_card.json "export_kind" of a party export
OUTPUT = "partial_score"


@dataclass(frozen=True)
class ModelConfig:
    """The [model] section of a finance job."""

    kind: str = field(default="logistic", metadata={"choices": KINDS, "doc": (
        "Bottom models: `logistic` (linear: vertical logistic regression) or `mlp` (one hidden layer per party)."
    )})
    hidden_units: int = field(default=16, metadata={"min": 1, "max": 4096, "doc": "mlp: hidden units per party."})
    l2: float = field(default=0.0, metadata={"min": 0.0, "doc": "l2/2 · ‖kernels‖² per party (biases not penalised)."})
    label_noise_multiplier: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "Label DP: Gaussian noise σ (in units of one label's effect) on the gradient the lender releases; ε "
        "accounted with `privacy.accountant` at `privacy.delta`. 0 = off."
    )})
    partial_noise_std: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "Gaussian noise the partner adds to its partial scores before the secure sum; 0 = off."
    )})
    # max: across sites the masked sum's ring holds parties * 2 * bound * 2^16 in at most 56 bits
    # (the gateways' limit); a logistic score saturates long before 1e6
    score_bound: float = field(default=32.0, metadata={"exclusive_min": 0.0, "max": 1e6, "doc": (
        "Partial scores are clipped to ±bound (part of the model) and summed in fixed point with 16 fractional bits."
    )})


# --------------------------------------------------------------------------- encoder


def category_values(values: Sequence | pd.Series) -> np.ndarray:
    """Categorical cells as stripped text (None/NaN -> ""), an object array."""
    series = pd.Series(values).reset_index(drop=True)
    text = series.where(~series.isna(), "").astype(str).str.strip()
    return text.to_numpy(dtype=object)


@dataclass
class PartyEncoder:
    """One party's raw columns -> float32 model inputs, fitted on that party's rows only.

    Categoricals: one-hot over the vocabulary seen in the training rows (sorted text);
    an unseen or missing value encodes as all zeros. Missing tokens
    (`shared.tabular.MISSING_TOKENS`, e.g. "", "NA") never enter the vocabulary.
    Numerics: standardized with the training rows' mean and (population) std; a
    missing value (NaN) becomes the mean, i.e. 0 after scaling; a constant column has
    std 1. Encoded columns follow the raw column order (`feature_names`).
    """

    columns: list[str]  # raw columns, in order
    categorical: list[str]  # subset of columns
    vocabulary: dict[str, list[str]]  # categorical column -> categories (one output each)
    mean: dict[str, float]  # numeric column -> training mean
    std: dict[str, float]  # numeric column -> training std (> 0)

    @classmethod
    def fit(cls, features: pd.DataFrame, categorical: Sequence[str]) -> "PartyEncoder":
        """Fit on ONE party's training rows (`features` = that party's raw columns)."""
        columns = [str(c) for c in features.columns]
        unknown = [c for c in categorical if c not in columns]
        if unknown:
            raise ValueError(f"categorical columns {unknown} are not among the columns {columns}")
        if len(features) == 0:
            raise ValueError("cannot fit an encoder on zero rows")
        vocabulary, mean, std = {}, {}, {}
        for column in columns:
            if column in categorical:
                values = category_values(features[column])
                vocabulary[column] = sorted({v for v in values if v not in MISSING_TOKENS})
            else:
                x = pd.to_numeric(features[column], errors="raise").to_numpy(dtype=np.float64)
                present = x[~np.isnan(x)]
                mu = float(present.mean()) if present.size else 0.0
                sd = float(present.std()) if present.size else 1.0
                mean[column] = mu
                std[column] = sd if math.isfinite(sd) and sd > 1e-12 else 1.0
        return cls(columns, [c for c in columns if c in categorical], vocabulary, mean, std)

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.columns if c not in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded columns: "col" for a numeric, "col=value" per category."""
        names = []
        for column in self.columns:
            if column in self.categorical:
                names.extend(f"{column}={value}" for value in self.vocabulary[column])
            else:
                names.append(column)
        return names

    @property
    def n_outputs(self) -> int:
        return len(self.feature_names)

    def input_types(self) -> dict[str, str]:
        """Raw column -> "string" (categorical) or "float" (numeric): the serving input dtypes."""
        return {c: ("string" if c in self.categorical else "float") for c in self.columns}

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        """float32 [rows, n_outputs]; numerics must already be numbers (NaN = missing)."""
        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise ValueError(f"columns {missing} are missing; the encoder needs {self.columns}")
        parts = []
        for column in self.columns:
            if column in self.categorical:
                values = category_values(features[column])
                vocab = np.asarray(self.vocabulary[column], dtype=object)
                parts.append((values[:, None] == vocab[None, :]).astype(np.float32).reshape(len(values), len(vocab)))
            else:
                x = pd.to_numeric(features[column], errors="raise").to_numpy(dtype=np.float64).astype(np.float32)
                mu, sd = np.float32(self.mean[column]), np.float32(self.std[column])
                x = np.where(np.isnan(x), mu, x)
                parts.append(((x - mu) / sd)[:, None])
        if not parts:
            return np.zeros((len(features), 0), np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def tf_transform(self, columns: Mapping[str, "tf.Tensor"]) -> "tf.Tensor":
        """The same arithmetic in TensorFlow (the serving graph): raw column tensors [batch] in.

        Numerics come as float32 (NaN = missing), categoricals as strings.
        """
        import tensorflow as tf

        parts = []
        for column in self.columns:
            if column in self.categorical:
                text = tf.strings.strip(tf.convert_to_tensor(columns[column], tf.string))
                vocab = tf.constant(self.vocabulary[column], dtype=tf.string, shape=[len(self.vocabulary[column])])
                parts.append(tf.cast(tf.equal(text[:, None], vocab[None, :]), tf.float32))
            else:
                x = tf.cast(columns[column], tf.float32)
                mu = tf.constant(self.mean[column], tf.float32)
                sd = tf.constant(self.std[column], tf.float32)
                x = tf.where(tf.math.is_nan(x), mu, x)
                parts.append(((x - mu) / sd)[:, None])
        return tf.concat(parts, axis=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "PartyEncoder":
        return cls(
            columns=list(payload["columns"]),
            categorical=list(payload["categorical"]),
            vocabulary={k: list(v) for k, v in payload["vocabulary"].items()},
            mean={k: float(v) for k, v in payload["mean"].items()},
            std={k: float(v) for k, v in payload["std"].items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "PartyEncoder":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- bottom models


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r} is unknown; use one of {', '.join(KINDS)}")


def partial_score(weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """A party's logit contribution per row from its weights and encoded rows (the model's
    kind follows from the weights)."""
    return partial_scores(list(weights), np.asarray(x, np.float32), kind_of(weights))


def build_bottom_model(
    kind: str, n_inputs: int, hidden_units: int, weights: Sequence[np.ndarray] | None = None,
    seed: int = 0, l2: float = 0.0,
) -> "tf.keras.Model":
    """Keras bottom model: encoded rows [batch, n_inputs] -> one logit per row [batch, 1].

    ``logistic`` = Dense(1); ``mlp`` = Dense(hidden_units, relu) -> Dense(1). No sigmoid:
    the output is a partial score. `weights` (the agreed list format) are set if given;
    otherwise kernels start Glorot-uniform with op-level seeds derived from `seed`.
    `l2` adds l2/2 * sum(kernel**2) per Dense layer to the Keras loss, the penalty the
    vertical engine (tff_apps/learning/vertical.py) puts on each party's kernels.
    """
    import tensorflow as tf

    _check_kind(kind)
    regularizer = tf.keras.regularizers.l2(l2 / 2) if l2 > 0 else None
    inputs = tf.keras.Input(shape=(n_inputs,), name="x")
    hidden = inputs
    if kind == "mlp":
        hidden = tf.keras.layers.Dense(
            hidden_units, activation="relu", kernel_regularizer=regularizer,
            kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed), name="hidden",
        )(hidden)
    output = tf.keras.layers.Dense(
        1, kernel_regularizer=regularizer,
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1), name="partial_score",
    )(hidden)
    model = tf.keras.Model(inputs, output)
    if weights is not None:
        expected = weight_shapes(kind, n_inputs, hidden_units)
        got = [tuple(np.shape(w)) for w in weights]
        if got != expected:
            raise ValueError(f"{kind} bottom-model weights must have shapes {expected}, got {got}")
        model.set_weights([np.asarray(w, np.float32) for w in weights])
    return model


# --------------------------------------------------------------------------- export and scoring


def export_party(
    export_dir: str | Path, party_name: str, encoder: PartyEncoder, model: "tf.keras.Model",
    card: Mapping[str, Any], score_bound: float = 0.0,
) -> Path:
    """Write one party's bottom model as its own SavedModel (+ model_card.json), atomically.

    `serving_default` takes the party's RAW columns by name (float32 for numerics,
    NaN = missing; string for categoricals; shape [batch]), applies `encoder` and
    returns ``partial_score`` (float32 [batch]). With `score_bound` > 0 the partial
    score is clipped to +-score_bound; the engine's model clips (tff_apps/learning/vertical.py),
    so pass `ModelConfig.score_bound` to serve exactly the trained model. `model` is a
    Keras bottom model, e.g. `build_bottom_model(kind, encoder.n_outputs, h, weights)`. The card gets
    ``export_kind``, ``party``, ``encoder``, ``input_types`` and ``score_bound`` on top
    of `card` (put e.g. ``run_id`` there: `score_vertical` refuses exports of two runs).
    """
    import tensorflow as tf

    from tff_apps.program.export import ServingModule, export_module

    bound = float(score_bound)

    def serve(columns: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        score = tf.squeeze(model(encoder.tf_transform(columns), training=False), axis=-1)
        if bound > 0:
            score = tf.clip_by_value(score, -bound, bound)
        return {OUTPUT: score}

    module = ServingModule(model, encoder.columns, serve, dtypes={c: tf.string for c in encoder.categorical})
    full_card = {
        **dict(card),
        "export_kind": PARTY_EXPORT_KIND,
        "party": party_name,
        "encoder": encoder.to_dict(),
        "input_types": encoder.input_types(),
        "score_bound": bound,
        "combine": "probability = sigmoid(sum of the parties' partial_score for the same customer)",
    }
    return export_module(Path(export_dir), module, OUTPUT, full_card)
