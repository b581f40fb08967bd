"""Per-client fine-tuning of the final global model, evaluated with TFF's personalization
evaluation (`tff.learning.algorithms.build_personalization_eval_computation`).

With `personalization.epochs > 0`, after federated training every client takes the final
global model, fine-tunes it for `epochs` passes over its own training split (plain SGD,
`personalization.learning_rate`, 0 = `train.client_learning_rate`; `train.batch_size`; rows
shuffled at the client with a seed from the job's), and evaluates the global ("before")
and the fine-tuned model ("after") on its own test split. Both evaluations are TF code that
runs inside the client's part of the TFF computation: only the metric values leave the
client, never its rows, predictions or fine-tuned weights.

The computation is called once per client, with that client alone: TFF collects the
clients' metrics by reservoir sampling, which shuffles them, so one client per call is the
simple way to keep each number attached to its client's name.

Metric builders (run at the client, in TF):
- `binary_metrics`: AUC (exact: the Mann-Whitney statistic with average ranks for ties,
  which is what scikit-learn's `roc_auc_score` computes, so "before" equals the report's
  per-site AUC of the global model) and accuracy at 0.5.
- `masked_mae_at(step)`: mean absolute error of one output column over the observed
  (non-NaN) targets, in the model's (normalized) units.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_apps.config import TrainSection

MetricsFn = Callable[[Any, tf.data.Dataset], Mapping[str, tf.Tensor]]
EVAL_BATCH = 4096  # rows per batch when a client evaluates (memory only; metrics are exact)


@dataclass
class ClientSplit:
    """One client's preprocessed training and test arrays (they stay at the client)."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def learning_rate(section, train: TrainSection) -> float:
    """The fine-tuning step size: personalization.learning_rate, 0 = the clients' own."""
    return section.learning_rate or train.client_learning_rate


def personalize(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    weights: tff.learning.models.ModelWeights,
    clients: Sequence[ClientSplit],
    metrics_fn: MetricsFn,
    section,
    train: TrainSection,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """client -> {"before": metrics of the global model, "after": of the fine-tuned one}."""
    started = time.monotonic()
    computation = evaluation_computation(
        model_fn, metrics_fn, section, train, seed, shuffle_buffer=max(len(c.train_x) for c in clients)
    )
    results = {client.name: before_after(computation(weights, [_client_input(client)])) for client in clients}
    # Keras picks a layer's v1 or v2 class when the layer is made and swaps the classes'
    # bases globally: TFF made the model's layers in graph mode, which leaves the caller's
    # eager Keras models unusable ("invalid state"). One eager model swaps them back.
    model_fn()
    logging.getLogger(__name__).info(
        "personalization: %d clients fine-tuned (%d epochs) and evaluated in %.1f s (building TFF's computation included)",
        len(clients), section.epochs, time.monotonic() - started,
    )
    return results


def evaluation_computation(model_fn, metrics_fn: MetricsFn, section, train: TrainSection, seed: int, shuffle_buffer: int):
    """TFF's personalization evaluation: (global weights, one client's {train_data, test_data})
    -> the global model's metrics and the fine-tuned one's, computed at the client."""
    finetune = _finetune_builder(
        section.epochs, learning_rate(section, train), train.batch_size, shuffle_buffer, seed, metrics_fn
    )
    return tff.learning.algorithms.build_personalization_eval_computation(
        model_fn,
        collections.OrderedDict(finetuned=finetune),
        baseline_evaluate_fn=tf.function(metrics_fn),
        max_num_clients=1,
    )


def before_after(output) -> dict[str, dict[str, float]]:
    return {"before": _numbers(output["baseline_metrics"]), "after": _numbers(output["finetuned"])}


def _client_input(client: ClientSplit) -> collections.OrderedDict:
    def dataset(x, y):
        return tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(x=np.asarray(x, np.float32), y=np.asarray(y, np.float32))
        )

    return collections.OrderedDict(
        train_data=dataset(client.train_x, client.train_y), test_data=dataset(client.test_x, client.test_y)
    )


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metric name -> float, or numpy array for a vector metric (each value is a one-client
    list from TFF's sampling)."""
    numbers = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        value = value.reshape(value.shape[1:]) if value.ndim else value
        numbers[name] = float(value) if value.ndim == 0 else value
    return numbers


def _finetune_builder(epochs: int, step_size: float, batch_size: int, shuffle_buffer: int, seed: int,
                      metrics_fn: MetricsFn):
    """TFF wants a no-argument builder of the strategy's tf.function (its variables, if any,
    must be made in TFF's graph)."""

    def build():
        @tf.function
        def finetune(model, train_data, test_data):
            batches = (
                train_data.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
                .repeat(epochs)
                .batch(batch_size)
            )
            for batch in batches:
                with tf.GradientTape() as tape:
                    loss = model.forward_pass(batch, training=True).loss
                gradients = tape.gradient(loss, model.trainable_variables)
                for variable, gradient in zip(model.trainable_variables, gradients):
                    variable.assign_sub(step_size * gradient)
            return metrics_fn(model, test_data)

        return finetune

    return build


def _predictions_and_targets(model, data: tf.data.Dataset):
    """All of a client's predictions and targets (inside the client's computation)."""
    target_shape = data.element_spec["y"].shape

    def append(state, batch):
        predictions = tf.cast(model.predict_on_batch(batch["x"], training=False), tf.float32)
        return tf.concat([state[0], predictions], 0), tf.concat([state[1], batch["y"]], 0)

    empty = tf.zeros([0, *target_shape], tf.float32)
    return data.batch(EVAL_BATCH).reduce((empty, empty), append)


def binary_metrics(model, data: tf.data.Dataset) -> collections.OrderedDict:
    """AUC (exact, NaN with one class) and accuracy at 0.5 of a probability model."""
    predictions, targets = _predictions_and_targets(model, data)
    p, y = tf.reshape(predictions, [-1]), tf.reshape(targets, [-1])
    return collections.OrderedDict(
        auc=exact_auc(y, p),
        accuracy=tf.reduce_mean(tf.cast(tf.equal(tf.cast(p >= 0.5, tf.float32), y), tf.float64)),
        n=tf.cast(tf.size(y), tf.float64),
    )


def exact_auc(labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """Mann-Whitney AUC: (sum of the positives' average ranks - n1 (n1 + 1) / 2) / (n1 n0)."""
    ordered = tf.sort(scores)
    below = tf.searchsorted(ordered, scores, side="left")
    up_to = tf.searchsorted(ordered, scores, side="right")
    ranks = (tf.cast(below + up_to, tf.float64) + 1.0) / 2.0  # 1-based, ties share their mean rank
    positive = labels > 0.5
    n_positive = tf.reduce_sum(tf.cast(positive, tf.float64))
    n_negative = tf.cast(tf.size(labels), tf.float64) - n_positive
    rank_sum = tf.reduce_sum(tf.where(positive, ranks, 0.0))
    pairs = n_positive * n_negative
    return tf.where(
        pairs > 0, (rank_sum - n_positive * (n_positive + 1.0) / 2.0) / tf.maximum(pairs, 1.0),
        tf.constant(math.nan, tf.float64),
    )


def masked_mae_at(column: int, nodes: int = 0) -> MetricsFn:
    """MAE of output `column` over the observed (non-NaN) targets, in the model's units.
    `nodes` > 0 (outputs [batch, nodes, ...], a graph model's): also each node's error sum and
    observed count (`error_by_node`, `observed_by_node`), so that the caller can weigh each
    node by its own scale."""
    axes = [0] if nodes else None  # sum over the batch only (per node) or over everything

    def metrics(model, data: tf.data.Dataset) -> collections.OrderedDict:
        def add(state, batch):
            predicted = tf.cast(model.predict_on_batch(batch["x"], training=False)[..., column], tf.float64)
            actual = tf.cast(batch["y"][..., column], tf.float64)
            observed = tf.logical_not(tf.math.is_nan(actual))
            errors = tf.where(observed, tf.abs(predicted - tf.where(observed, actual, 0.0)), 0.0)
            counts = tf.cast(observed, tf.float64)
            return state[0] + tf.reduce_sum(errors, axis=axes), state[1] + tf.reduce_sum(counts, axis=axes)

        zero = tf.zeros([nodes] if nodes else [], tf.float64)
        errors, counts = data.batch(EVAL_BATCH).reduce((zero, zero), add)
        result = collections.OrderedDict(mae=tf.reduce_sum(errors) / tf.reduce_sum(counts), observed=tf.reduce_sum(counts))
        if nodes:
            result.update(error_by_node=errors, observed_by_node=counts)
        return result

    return metrics


def summary(results: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str,
            also: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """summary.json's `personalization`: client -> {before, after} of `metric`, and of each
    metric in `also` as `<name>_before` / `<name>_after`."""
    entry = {}
    for name, r in results.items():
        entry[name] = {"before": r["before"][metric], "after": r["after"][metric]}
        for other in also:
            entry[name].update({f"{other}_before": r["before"][other], f"{other}_after": r["after"][other]})
    return entry
