"""The numpy forward pass of a split (vertical) model's bottom models; no TF, no TFF.

A party's bottom-model weights are float32 arrays in Keras Dense order:
``logistic`` = [kernel (d, 1), bias (1,)]; ``mlp`` = [kernel1 (d, h), bias1 (h,),
kernel2 (h, 1), bias2 (1,)] with relu between. The engine (tff_apps/learning/vertical.py) trains
them; the finance app encodes, evaluates and exports them. `predict_proba` is the plain-sum
reference the tests hold the engine's secure sum against.
"""

from __future__ import annotations

import numpy as np

KINDS = ("logistic", "mlp")


def weight_shapes(kind: str, width: int, hidden_units: int) -> list[tuple[int, ...]]:
    if kind == "logistic":
        return [(width, 1), (1,)]
    if kind == "mlp":
        return [(width, hidden_units), (hidden_units,), (hidden_units, 1), (1,)]
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def partial_scores(weights: list[np.ndarray], x: np.ndarray, kind: str) -> np.ndarray:
    """One party's bottom-model output (one logit per row, before the clip), in float64."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D matrix, got shape {x.shape}")
    _check_weights(weights, kind, x.shape[1])
    w = [np.asarray(a, np.float64) for a in weights]
    if kind == "logistic":
        return x @ w[0][:, 0] + w[1][0]
    hidden = np.maximum(x @ w[0] + w[1], 0.0)
    return hidden @ w[2][:, 0] + w[3][0]


def predict_proba(
    party_weights: list[list[np.ndarray]], party_matrices: list[np.ndarray], kind: str,
    *, score_bound: float = 32.0,
) -> np.ndarray:
    """sigmoid(sum_p clip(partial score_p, +-score_bound)), in the clear: the trained model's
    prediction as a numpy reference (the apps sum through the engine's secure sum instead).
    32.0 is the engine's default bound (`VerticalSettings.score_bound`)."""
    if len(party_weights) != len(party_matrices) or not party_weights:
        raise ValueError(f"{len(party_weights)} weight sets for {len(party_matrices)} party matrices")
    rows = {len(x) for x in party_matrices}
    if len(rows) != 1:
        raise ValueError(f"party matrices have different row counts {sorted(rows)}; align them first")
    z = sum(
        np.clip(partial_scores(w, x, kind), -score_bound, score_bound)
        for w, x in zip(party_weights, party_matrices)
    )
    return sigmoid(z)


def _check_weights(weights, kind: str, width: int) -> None:
    hidden = np.shape(weights[0])[-1] if kind == "mlp" and len(weights) and np.ndim(weights[0]) == 2 else 1
    expected = weight_shapes(kind, width, hidden)
    got = [tuple(np.shape(w)) for w in weights]
    if got != expected:
        raise ValueError(f"{kind} weights for {width} columns must have shapes {expected}, got {got}")


def kind_of(weights) -> str:
    """The bottom model's kind from its weights: 2 arrays logistic, 4 mlp."""
    kinds = {2: "logistic", 4: "mlp"}
    if len(weights) not in kinds:
        raise ValueError(f"bottom-model weights are 2 (logistic) or 4 (mlp) arrays, got {len(weights)}")
    return kinds[len(weights)]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out
