"""The TFF computations that run at the sites, on the site's own data folder.

A CLIENTS-placed value here is the path of a site's data folder (`site_data`), as the site
advertises it; each `tff.tensorflow.computation` opens the folder's records on the worker
that runs it (the site's), so rows never leave the site. What comes back is an aggregate:
a manifest (row counts), secure-summed statistics, a model update, a score histogram.

Preprocessing mirrors `learning/preprocessing.py` step for step (the same fixed-point
secure sums, the same federated max of exponents and code ranges); the site-side vectors
are computed here with TF ops instead of numpy, and `tests/tff_apps/sites/
test_site_computations.py` checks that both give the same vectors.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_apps.learning import preprocessing
from tff_apps.learning.preprocessing import Moments, Preprocessor
from tff_apps.sites.site_data import MANIFEST, parse_table

HISTOGRAM_BINS = 4096  # score bins of the evaluation histograms: AUC etc. exact to 1/4096
NO_CODE = -(2**62)  # `preprocessing._site_extreme`'s "no value here"


def _clients(dtype, shape=None) -> tff.FederatedType:
    return tff.FederatedType(tff.TensorType(dtype, shape) if shape is not None else dtype, tff.CLIENTS)


def _file(folder, name: str):
    return tf.strings.join([folder, "/", name])


def read_manifests(folders: list[str]) -> list[dict[str, Any]]:
    """Each site's manifest, read at the site."""

    @tff.tensorflow.computation(np.str_)
    def read(folder):
        return tf.io.read_file(_file(folder, MANIFEST))

    @tff.federated_computation(_clients(np.str_))
    def read_all(paths):
        return tff.federated_map(read, paths)

    texts = read_all(folders)
    return [json.loads(t.decode("utf-8") if isinstance(t, bytes) else t) for t in texts]


# ------------------------------------------------------------------ per-site aggregates


def site_total(folders: list[str], read: Callable, vector_fn: Callable, length: int, combine: str) -> np.ndarray:
    """Each site computes `vector_fn(read(folder))` (int64 [length]) on what `read` opens of its
    folder; the sites' vectors are combined by secure sum or federated max."""

    @tff.tensorflow.computation(np.str_)
    def site_vector(folder):
        return tf.reshape(tf.cast(vector_fn(read(folder)), tf.int64), [length])  # secure sum needs a fixed shape

    @tff.federated_computation(_clients(np.str_))
    def total(paths):
        values = tff.federated_map(site_vector, paths)
        if combine == "sum":
            return tff.federated_secure_sum_bitwidth(values, preprocessing.SECURE_SUM_BITWIDTH)
        return tff.federated_max(values)

    return np.asarray(total(folders), np.int64).reshape(length)


def _site_total(folders: list[str], n_features: int, vector_fn: Callable, length: int, combine: str) -> np.ndarray:
    """`site_total` of a tabular site's raw training features."""

    def raw(folder):
        return parse_table(_file(folder, "train.tfrecord"), n_features)[0]

    return site_total(folders, raw, vector_fn, length, combine)


def site_moments(folders: list[str], read: Callable, width: int, total_rows: int) -> Moments:
    """`preprocessing.federated_moments` of each site's matrix `read(folder)` ([rows, width],
    NaN = missing), opened at the site: the same counts, exponents and fixed-point secure sums."""
    counts = site_total(folders, read, tf_counts, width, "sum").astype(np.float64)
    exponents = site_total(folders, read, tf_exponents, width, "max")
    fraction_bits = preprocessing.SECURE_SUM_BITWIDTH - 2 - math.ceil(math.log2(total_rows + 1))
    exponents = np.where(exponents == preprocessing.NO_VALUES_EXPONENT, 0, exponents)
    sums = site_total(folders, read, lambda x: tf_fixed_point_sums(x, exponents, fraction_bits), 2 * width, "sum")
    return preprocessing.decode_moments(sums, counts, exponents, fraction_bits)


def _present(x):
    return tf.logical_not(tf.math.is_nan(x))


def tf_extremes(codes, sign: int):
    """`preprocessing._site_extreme`: per column max of sign * code, NO_CODE if none."""
    signed = tf.where(_present(codes), sign * codes, tf.constant(-np.inf, codes.dtype))
    best = tf.reduce_max(signed, axis=0)
    return tf.where(tf.math.is_inf(best), tf.constant(NO_CODE, tf.int64), tf.cast(best, tf.int64))


def tf_category_counts(codes, spans):
    """`preprocessing._site_category_counts`: per column, the count of each code lo..hi."""
    parts = []
    for j, (lo, hi) in enumerate(spans):
        column = codes[:, j]
        present = tf.cast(tf.boolean_mask(column, _present(column)), tf.int32) - lo  # bincount takes int32
        width = max(hi - lo + 1, 0)
        parts.append(tf.math.bincount(present, minlength=width, maxlength=width, dtype=tf.int64))
    return tf.concat(parts, axis=0)


def tf_counts(x):
    return tf.reduce_sum(tf.cast(_present(x), tf.int64), axis=0)


def tf_exponents(x):
    """`preprocessing._site_exponents`: frexp's exponent of each column's max |x|, exactly
    (from the float64 bits), NO_VALUES_EXPONENT where a column is all missing or 0."""
    magnitude = tf.reduce_max(tf.where(_present(x), tf.abs(x), tf.zeros_like(x)), axis=0)
    bits = tf.bitwise.right_shift(tf.bitcast(magnitude, tf.int64), 52)
    exponent = tf.bitwise.bitwise_and(bits, 0x7FF) - 1022
    return tf.where(magnitude > 0, exponent, tf.constant(preprocessing.NO_VALUES_EXPONENT, tf.int64))


def tf_fixed_point_sums(x, exponents: np.ndarray, fraction_bits: int):
    """`preprocessing._site_fixed_point_sums` with TF ops."""
    scaled = x / tf.constant(np.exp2(exponents.astype(np.float64)))
    shifted = tf.where(_present(scaled), scaled + 1.0, tf.zeros_like(scaled))
    squares = tf.where(_present(scaled), scaled**2, tf.zeros_like(scaled))
    scale = float(2**fraction_bits)
    sums = tf.concat([tf.reduce_sum(shifted, axis=0), tf.reduce_sum(squares, axis=0)], axis=0)
    return tf.cast(tf.round(sums * scale), tf.int64)


# ------------------------------------------------------------------ federated preprocessing


def federated_preprocessor(
    folders: list[str], feature_names: list[str], categorical: list[str], total_rows: int, zero_means_missing=(),
) -> Preprocessor:
    """`preprocessing.fit_federated` with each site's aggregates computed at the site."""
    d = len(feature_names)
    categories = _federated_categories(folders, feature_names, categorical)
    width = len(preprocessing.expanded_names(feature_names, categories))

    def expanded(folder):
        raw, _ = parse_table(_file(folder, "train.tfrecord"), d)
        return preprocessing.tf_expand(raw, feature_names, categories)

    moments = site_moments(folders, expanded, width, total_rows)
    return preprocessing.preprocessor_from(feature_names, categories, moments, zero_means_missing)


def _federated_categories(folders, feature_names, categorical) -> dict[str, list[float]]:
    if not categorical:
        return {}
    d, indices = len(feature_names), [feature_names.index(name) for name in categorical]

    def codes(raw):
        return tf.gather(raw, indices, axis=1)

    highs = _site_total(folders, d, lambda raw: tf_extremes(codes(raw), +1), len(indices), "max")
    lows = -_site_total(folders, d, lambda raw: tf_extremes(codes(raw), -1), len(indices), "max")
    spans = [(int(lo), int(hi)) for lo, hi in zip(lows, highs)]
    preprocessing.check_code_spans(categorical, spans)
    width = sum(max(hi - lo + 1, 0) for lo, hi in spans)
    counts = _site_total(folders, d, lambda raw: tf_category_counts(codes(raw), spans), width, "sum")
    return preprocessing.vocabularies_from(categorical, spans, counts)


# ------------------------------------------------------------------ data profiles


def site_profiles(folders: list[str], feature_names: list[str], categorical: list[str]) -> list[dict[str, Any]]:
    """Each site's data profile (`shared.profile.profile` of its training rows), computed at
    the site: per column the missing count, min, max, sum and sum of squares (or the number of
    distinct codes), the rows and the positives. Only these aggregates leave the site."""
    d = len(feature_names)

    @tff.tensorflow.computation(np.str_)
    def profile_vector(folder):
        raw, labels = parse_table(_file(folder, "train.tfrecord"), d)
        present = _present(raw)
        filled = tf.where(present, raw, tf.zeros_like(raw))
        columns = [
            tf.cast(tf.reduce_sum(tf.cast(tf.logical_not(present), tf.int64), axis=0), tf.float64),
            tf.reduce_min(tf.where(present, raw, tf.constant(np.inf, tf.float64)), axis=0),
            tf.reduce_max(tf.where(present, raw, tf.constant(-np.inf, tf.float64)), axis=0),
            tf.reduce_sum(filled, axis=0), tf.reduce_sum(filled**2, axis=0),
            tf.stack([_distinct(raw[:, j]) for j in range(d)]),
        ]
        head = tf.stack([tf.cast(tf.shape(raw)[0], tf.float64), tf.reduce_sum(tf.cast(labels, tf.float64))])
        return tf.reshape(tf.concat([head, tf.reshape(tf.stack(columns, axis=1), [-1])], axis=0), [2 + 6 * d])

    @tff.federated_computation(_clients(np.str_))
    def profiles(paths):
        return tff.federated_map(profile_vector, paths)

    return [_profile_from(np.asarray(v, np.float64), feature_names, categorical) for v in profiles(folders)]


def _distinct(column):
    present = tf.boolean_mask(column, _present(column))
    return tf.cast(tf.size(tf.unique(present).y), tf.float64)


def _profile_from(vector: np.ndarray, feature_names: list[str], categorical: list[str]) -> dict[str, Any]:
    """The same dictionary `shared.profile.profile` makes, from a site's profile vector."""
    rows, positives = int(vector[0]), float(vector[1])
    stats = vector[2:].reshape(len(feature_names), 6)
    columns: dict[str, dict[str, Any]] = {}
    for name, (missing, low, high, total, squares, distinct) in zip(feature_names, stats):
        observed = rows - missing
        column: dict[str, Any] = {"missing_share": missing / rows if rows else 0.0}
        if name in categorical:
            column["categories"] = int(distinct)
        elif observed:
            mean = total / observed
            column.update(min=float(low), max=float(high), mean=float(mean),
                          std=float(math.sqrt(max(squares / observed - mean**2, 0.0))))
        columns[name] = column
    shares = {name: c["missing_share"] for name, c in columns.items()}
    worst = max(shares, key=shares.__getitem__)
    return {
        "rows": rows,
        "missing_share": float(stats[:, 0].sum() / (rows * len(feature_names))) if rows else 0.0,
        "columns": columns,
        "column_missing": {"median": float(np.median(list(shares.values()))), "max": shares[worst], "max_column": worst},
        "label": {"kind": "binary", "positive_share": positives / rows if rows else math.nan},
    }


# ------------------------------------------------------------------ rounds and evaluation


def round_input_type() -> tff.StructType:
    return tff.StructType([("folder", np.str_), ("order", tff.TensorType(np.int32, [None]))])


def round_dataset_fn(preprocessor: Preprocessor, n_features: int, batch_size: int):
    """At the site: the round input `client_data.client_dataset` would give, from the site's
    training records and the row order the coordinator drew (it depends on the row count only)."""

    @tff.tensorflow.computation(round_input_type())
    def open_round(reference):
        raw, labels = parse_table(_file(reference.folder, "train.tfrecord"), n_features)
        x = preprocessor.tf_transform(tf.cast(raw, tf.float32))
        data = collections.OrderedDict(x=tf.gather(x, reference.order), y=tf.gather(labels, reference.order))
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)

    return open_round


def split_datasets_fn(preprocessor: Preprocessor, n_features: int):
    """At the site: its training and test rows as `personalization`'s client input."""

    @tff.tensorflow.computation(np.str_)
    def open_splits(folder):
        def dataset(name: str):
            raw, labels = parse_table(_file(folder, name), n_features)
            x = preprocessor.tf_transform(tf.cast(raw, tf.float32))
            return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=labels))

        return collections.OrderedDict(train_data=dataset("train.tfrecord"), test_data=dataset("test.tfrecord"))

    return open_splits


def poisson_input_type() -> tff.StructType:
    return tff.StructType([("folder", np.str_), ("q", np.float32), ("steps", np.int32)])


def poisson_round_fn(preprocessor: Preprocessor, n_features: int):
    """At the site, record-level DP: `steps` DP-SGD batches, each row in each batch with
    probability q, drawn with TF's unseeded random op (the site's OS entropy, never sent or
    stored): the input `dp_sgd.poisson_client_dataset` gives in a simulation, one element
    per step, each batch as wide as the rows it drew (all of them real: mask 1)."""

    @tff.tensorflow.computation(poisson_input_type())
    def open_poisson(reference):
        raw, labels = parse_table(_file(reference.folder, "train.tfrecord"), n_features)
        x = preprocessor.tf_transform(tf.cast(raw, tf.float32))
        rows = tf.shape(x)[0]
        drawn = tf.random.uniform([reference.steps, rows]) < reference.q
        expected = reference.q * tf.cast(rows, tf.float32)

        def step(index):
            picked = tf.reshape(tf.where(drawn[index]), [-1])
            batch = collections.OrderedDict(x=tf.gather(x, picked), y=tf.gather(labels, picked))
            return collections.OrderedDict(
                batch=batch, mask=tf.ones(tf.shape(picked), tf.float32), expected_batch_size=expected
            )

        return tf.data.Dataset.range(tf.cast(reference.steps, tf.int64)).map(step)

    return open_poisson


def score_histograms(model_fn, preprocessor: Preprocessor, n_features: int, weights_type):
    """A computation: (model weights at the server, site folders) -> each site's histogram of
    test scores, [negatives per bin, positives per bin] over HISTOGRAM_BINS bins of [0, 1]."""

    @tff.tensorflow.computation(weights_type, np.str_)
    def site_histogram(weights, folder):
        raw, labels = parse_table(_file(folder, "test.tfrecord"), n_features)
        outputs = predict_with(model_fn, weights, lambda: preprocessor.tf_transform(tf.cast(raw, tf.float32)))
        scores = tf.reshape(outputs, [-1])
        bins = tf.clip_by_value(tf.cast(tf.floor(scores * HISTOGRAM_BINS), tf.int32), 0, HISTOGRAM_BINS - 1)
        label = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return tf.math.bincount(bins + label * HISTOGRAM_BINS, minlength=2 * HISTOGRAM_BINS,
                                maxlength=2 * HISTOGRAM_BINS, dtype=tf.int64)

    @tff.federated_computation(tff.FederatedType(weights_type, tff.SERVER), _clients(np.str_))
    def histograms(weights, folders):
        return tff.federated_map(site_histogram, (tff.federated_broadcast(weights), folders))

    return histograms


def predict_with(model_fn, weights, inputs: Callable):
    """Inside a site's computation: a fresh `model_fn()` model given `weights`, applied to
    `inputs()` (made after the assignments: a TFF TensorFlow computation is a plain graph)."""
    model = model_fn()
    model_weights = tff.learning.models.ModelWeights.from_model(model)
    assigned = tf.nest.map_structure(lambda variable, value: variable.assign(value), model_weights, weights)
    with tf.control_dependencies(tf.nest.flatten(assigned)):
        return model.predict_on_batch(inputs(), training=False)


def scores_from_histogram(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) with one entry per test row: each row's score is its bin's centre,
    so metrics computed from them are exact to the bin width."""
    histogram = np.asarray(histogram, np.int64).reshape(2, HISTOGRAM_BINS)
    centres = (np.arange(HISTOGRAM_BINS) + 0.5) / HISTOGRAM_BINS
    labels = np.concatenate([np.zeros(histogram[0].sum(), np.int64), np.ones(histogram[1].sum(), np.int64)])
    scores = np.concatenate([np.repeat(centres, histogram[0]), np.repeat(centres, histogram[1])])
    return labels, scores
