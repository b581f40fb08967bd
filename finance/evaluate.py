"""Credit-scoring metrics (AUC, KS, Gini) on held-out aligned customers, and the two baselines.

- `vertical_metrics`: the split model, computed by the lender from the logits z it receives
  (the parties' partial scores summed by the engine's secure sum) and its own labels.
- `centralized_baseline`: CENTRALIZED BASELINE, the only code in the finance app that
  joins the parties' (encoded) columns: the same model family trained on the joined
  table, i.e. the "no loss" reference of a vertical model.
- `lender_alone_baseline`: the lender's bottom model trained on its own columns only,
  i.e. what the lender gets without the partner (the "gain" reference).

Baselines are trained with Keras on the same encoded rows, optimizer (SGD, or Adam with
Keras' defaults, as the engine), learning rate, batch size and epochs as the vertical run,
starting from the engine's initial weights (`tff_apps.learning.vertical.initial_weights`, party 0)
and taking the engine's seeded mini-batches (`tff_apps.learning.vertical.batch_indices`), so the
lender-alone baseline is exactly the lender's bottom model trained without the partner.
l2 as in `ModelConfig.l2` (l2/2 * ||kernels||^2). The privacy options of the vertical
run (label noise, partial-score noise) and the score clip do not apply to them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from finance.model import ModelConfig, build_bottom_model, sigmoid
from shared.metrics import ScoredReport, binary_report, gini, ks_statistic
from tff_apps.learning.vertical import batch_indices, initial_weights

HEADLINE = "auc"
OPTIMIZERS = ("sgd", "adam")

__all__ = [
    "HEADLINE",
    "binary_metrics",
    "vertical_metrics",
    "fit_keras",
    "centralized_baseline",
    "lender_alone_baseline",
]


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """auc, ks (max TPR - FPR), gini (2 AUC - 1), accuracy (at 0.5), brier, n, positives."""
    report = binary_report(y, p)
    metrics = {
        "auc": report["auc"],
        "ks": ks_statistic(y, p),
        "gini": gini(y, p),
        "accuracy": report["accuracy"],
        "brier": report["brier"],
        "n": report["n"],
        "positives": report["positives"],
    }
    return ScoredReport.of(metrics, y, p)  # the scores ride along for the ROC plot, not into JSON


def vertical_metrics(logits: np.ndarray, y: np.ndarray) -> dict:
    """Metrics of the split model from what the lender holds: z per held-out customer (the sum
    of the parties' clipped partial scores, as `tff_apps.program.vertical_rounds.secure_logits`
    and training's evaluation decode it) and its own labels. No party's weights or columns."""
    z = np.asarray(logits, np.float64).reshape(-1)
    if len(z) != len(y):
        raise ValueError(f"{len(z)} logits for {len(y)} labels")
    return binary_metrics(y, sigmoid(z))


def _optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate)
    raise ValueError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")


def fit_keras(
    x: np.ndarray, y: np.ndarray, kind: str, hidden_units: int, l2: float, epochs: int, batch_size: int,
    learning_rate: float, optimizer: str, seed: int,
) -> tf.keras.Model:
    """A bottom-model-shaped Keras model (logit out) trained like one vertical party.

    Starts from `tff_apps.learning.vertical.initial_weights(kind, d, hidden_units, seed, 0)` and
    takes one optimizer step per mini-batch of `tff_apps.learning.vertical.batch_indices` (epochs
    1..`epochs`); loss = mean binary cross-entropy + l2/2 * ||kernels||^2.
    """
    tf.keras.utils.set_random_seed(seed)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32).reshape(-1, 1)
    weights = initial_weights(kind, x.shape[1], hidden_units, seed, 0)
    model = build_bottom_model(kind, x.shape[1], hidden_units, weights=weights, seed=seed, l2=l2)
    opt = _optimizer(optimizer, learning_rate)
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    variables = model.trainable_variables

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True)) + tf.add_n([tf.constant(0.0), *model.losses])
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

    @tf.function
    def train(x_all, y_all, rows, bounds):
        """Every epoch's batches in one graph call (the same steps in order, no Python cost per
        step): batch b is the rows rows[bounds[b]:bounds[b + 1]] of x and y."""
        for b in tf.range(tf.shape(bounds)[0] - 1):
            batch = rows[bounds[b] : bounds[b + 1]]
            step(tf.gather(x_all, batch), tf.gather(y_all, batch))

    batches = [rows for epoch in range(1, epochs + 1) for rows in batch_indices(len(x), batch_size, epoch, seed)]
    if batches:
        bounds = np.cumsum([0] + [len(rows) for rows in batches])
        train(tf.constant(x), tf.constant(y), tf.constant(np.concatenate(batches)), tf.constant(bounds))
    return model


def _probabilities(model: tf.keras.Model, x: np.ndarray) -> np.ndarray:
    return sigmoid(model(np.asarray(x, np.float32), training=False).numpy().reshape(-1))


def centralized_baseline(
    train_parts: list[np.ndarray], y_train: np.ndarray, test_parts: list[np.ndarray], y_test: np.ndarray,
    model_cfg: ModelConfig, epochs: int, batch_size: int, learning_rate: float, optimizer: str, seed: int,
) -> dict:
    """CENTRALIZED BASELINE: joins every party's encoded columns (for comparison only).

    `train_parts` / `test_parts` are each party's rows of the aligned customers (lender
    first), encoded by that party's own encoder, in the common order; this function
    concatenates them column-wise, which no party could do in a real deployment. Model:
    logistic = one Dense(1) on the joined columns; mlp = Dense(P * hidden_units, relu) ->
    Dense(1), as many hidden units as the P bottom models together. Returns `binary_metrics`
    on the test customers.
    """
    x_train, x_test = np.concatenate(train_parts, axis=1), np.concatenate(test_parts, axis=1)
    model = fit_keras(
        x_train, y_train, model_cfg.kind, len(train_parts) * model_cfg.hidden_units, model_cfg.l2,
        epochs, batch_size, learning_rate, optimizer, seed,
    )
    return binary_metrics(y_test, _probabilities(model, x_test))


def lender_alone_baseline(
    x_lender_train: np.ndarray, y_train: np.ndarray, x_lender_test: np.ndarray, y_test: np.ndarray,
    model_cfg: ModelConfig, epochs: int, batch_size: int, learning_rate: float, optimizer: str, seed: int,
) -> dict:
    """The lender alone: its bottom model trained on its own encoded columns and labels."""
    model = fit_keras(
        x_lender_train, y_train, model_cfg.kind, model_cfg.hidden_units, model_cfg.l2,
        epochs, batch_size, learning_rate, optimizer, seed,
    )
    return binary_metrics(y_test, _probabilities(model, x_lender_test))
