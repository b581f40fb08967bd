"""Diagnosis metrics per hospital and over the pooled test set, and the two baselines.

The centralized baseline is the only code in the suite that pools clients' raw rows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from healthcare.model import ModelConfig, build_keras_model
from shared.metrics import ScoredReport, binary_report, summarize_sites
from shared.tabular import ClientTable
from tff_apps.learning.preprocessing import Preprocessor, fit_local
from tff_apps.program.alongside import stop_callbacks

HEADLINE = "test_auc"
SUMMARY_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece")

PredictFn = Callable[[ClientTable], np.ndarray]


def evaluate_sites(tests: list[ClientTable], predict: PredictFn) -> ScoredReport:
    """Per-hospital reports, the pooled test set, and the mean and worst hospital."""
    predictions = {table.name: predict(table) for table in tests}
    sites = {t.name: binary_report(t.labels, predictions[t.name]) for t in tests}
    labels = np.concatenate([t.labels for t in tests])
    probabilities = np.concatenate([predictions[t.name] for t in tests])
    pooled = binary_report(labels, probabilities)
    across_sites = {
        metric: summarize_sites(sites, metric, higher_is_better=metric not in ("brier", "ece"))
        for metric in SUMMARY_METRICS
    }
    return ScoredReport.of(
        {"pooled": pooled, "sites": sites, "across_sites": across_sites}, labels, probabilities
    )


def headline_metrics(report: dict) -> dict[str, float]:
    """The numbers logged each evaluation round."""
    return {
        "test_auc": report["pooled"]["auc"],
        "test_accuracy": report["pooled"]["accuracy"],
        "test_brier": report["pooled"]["brier"],
        "mean_site_auc": report["across_sites"]["auc"]["mean"],
        "worst_site_auc": report["across_sites"]["auc"]["worst"],
    }


def keras_predictor(model: tf.keras.Model, preprocessor_of: Callable[[str], Preprocessor]) -> PredictFn:
    def predict(table: ClientTable) -> np.ndarray:
        x = preprocessor_of(table.name).transform(table.features.to_numpy())
        # A direct call, not model.predict: predict re-traces a tf.function per new model.
        return model(x, training=False).numpy().reshape(-1)

    return predict


class KerasFitter:
    """Fits the baselines (pooled, then each hospital alone) one after another on ONE compiled
    model, so that Keras traces its training function once rather than once per baseline (the
    tracing cost more than the training). Each fit starts from the weights a new model built
    with its seed has and from a zeroed optimizer: it computes what a fresh model would. A
    fit's model is valid until the next fit."""

    def __init__(self, stop=None) -> None:
        self._model: tf.keras.Model | None = None
        self._key: tuple = ()
        self._stop = stop  # a threading.Event: set, the fit ends (`alongside`)

    def fit(
        self, x: np.ndarray, y: np.ndarray, model_cfg: ModelConfig, epochs: int, batch_size: int,
        learning_rate: float, seed: int,
    ) -> tf.keras.Model:
        """Plain SGD on one table: the same model, step size and batch size as the clients use."""
        tf.keras.utils.set_random_seed(seed)
        fresh = build_keras_model(model_cfg, x.shape[1], seed)
        key = (model_cfg, x.shape[1], learning_rate)
        if self._model is None or key != self._key:
            # an epoch's steps in one graph call: the same ops in order, without Keras' Python cost per step
            fresh.compile(
                optimizer=tf.keras.optimizers.SGD(learning_rate), loss="binary_crossentropy", steps_per_execution=1000
            )
            self._model, self._key = fresh, key
        else:
            self._model.set_weights(fresh.get_weights())
            for variable in self._model.optimizer.variables:  # the step count (SGD without momentum)
                variable.assign(tf.zeros_like(variable))
        self._model.fit(
            x, y.astype(np.float32), batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
            callbacks=stop_callbacks(self._stop),
        )
        return self._model


def centralized_baseline(
    trains: list[ClientTable], tests: list[ClientTable], categorical: list[str],
    model_cfg: ModelConfig, epochs: int, batch_size: int, learning_rate: float, seed: int,
    fitter: KerasFitter | None = None,
) -> dict:
    """CENTRALIZED BASELINE: pools every hospital's training rows (for comparison only)."""
    pooled_x = np.vstack([t.features.to_numpy() for t in trains])
    pooled_y = np.concatenate([t.labels for t in trains])
    names = list(trains[0].features.columns)
    preprocessor = fit_local(pooled_x, names, categorical)
    model = (fitter or KerasFitter()).fit(
        preprocessor.transform(pooled_x), pooled_y, model_cfg, epochs, batch_size, learning_rate, seed
    )
    return evaluate_sites(tests, keras_predictor(model, lambda _: preprocessor))


def local_baseline(
    trains: list[ClientTable], tests: list[ClientTable], categorical: list[str],
    model_cfg: ModelConfig, epochs: int, batch_size: int, learning_rate: float, seed: int,
    fitter: KerasFitter | None = None,
) -> dict:
    """Each hospital alone: its own statistics and model, scored on its own test rows."""
    predictions: dict[str, np.ndarray] = {}
    names = list(trains[0].features.columns)
    fitter = fitter or KerasFitter()
    for index, (train, test) in enumerate(zip(trains, tests)):
        raw = train.features.to_numpy()
        preprocessor = fit_local(raw, names, categorical)
        model = fitter.fit(  # predicted at once: the next fit resets the model
            preprocessor.transform(raw), train.labels, model_cfg, epochs, batch_size,
            learning_rate, seed + index,
        )
        predictions[test.name] = keras_predictor(model, lambda _: preprocessor)(test)
    return evaluate_sites(tests, lambda table: predictions[table.name])
