"""Federated preprocessing: category vocabularies, means and variances from per-site aggregates.

No code here sees another site's rows. Each site computes small aggregates on its own
rows (count, sum, sum of squares; category counts); a TFF computation adds them up
through `federated_secure_sum_bitwidth`, so the server learns only the totals.

Secure sum works on non-negative integers, so floats are sent in fixed point:
1. a first computation sums the per-feature row counts and takes `federated_max` of
   each feature's magnitude exponent e (|x| <= 2**e); the exponent, a power-of-two
   bound on the feature's range, is the only thing disclosed beyond the totals;
2. each site sends round(2**F * sum(x / 2**e + 1)) and round(2**F * sum((x / 2**e)**2)),
   with F = 60 - ceil(log2(total rows + 1)) fractional bits so that no total can pass
   2**62 (the bitwidth limit). Statistics are exact to about 2**-40 of the feature's
   magnitude for up to a million rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from shared.errors import UserError

SECURE_SUM_BITWIDTH = 62
MAX_CATEGORIES = 256
NO_VALUES_EXPONENT = -1074  # smaller than any float's exponent: "this site has no value here"


@dataclass
class Preprocessor:
    """Raw feature columns -> one-hot categoricals, mean-imputed, standardized float32."""

    feature_names: list[str]
    categories: dict[str, list[float]]
    mean: list[float]  # per expanded column
    std: list[float]
    zero_means_missing: list[str] = field(default_factory=list)  # raw columns where 0 = not measured

    @property
    def expanded_names(self) -> list[str]:
        return expanded_names(self.feature_names, self.categories)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return self.tf_transform(tf.constant(raw, tf.float32)).numpy()

    def tf_transform(self, raw: tf.Tensor) -> tf.Tensor:
        """The same arithmetic in training and in the exported serving graph."""
        raw = self._zeros_to_missing(raw)
        expanded = tf_expand(raw, self.feature_names, self.categories)
        mean = tf.constant(self.mean, tf.float32)
        imputed = tf.where(tf.math.is_nan(expanded), mean, expanded)
        return (imputed - mean) / tf.constant(self.std, tf.float32)

    def _zeros_to_missing(self, raw: tf.Tensor) -> tf.Tensor:
        """Serving receives raw rows, where e.g. UCI 'chol' = 0 still means 'not measured'."""
        if not self.zero_means_missing:
            return raw
        flags = tf.constant([[name in self.zero_means_missing for name in self.feature_names]])
        return tf.where(flags & tf.equal(raw, 0.0), tf.constant(float("nan"), raw.dtype), raw)

    def statistic_rows(self) -> np.ndarray:
        """Three raw rows made only of what this preprocessor releases anyway (it is built into
        the serving graph): each numeric column at mean - std, mean (missing, imputed, in the
        first numeric column) and mean + std; each categorical column cycling through its
        vocabulary. No client's row: a model card's serving check can carry them."""
        columns = []
        names = self.expanded_names
        for name in self.feature_names:
            if name in self.categories:
                vocabulary = self.categories[name]
                columns.append([vocabulary[i % len(vocabulary)] for i in range(3)])
            else:
                mean, std = self.mean[names.index(name)], self.std[names.index(name)]
                columns.append([mean - std, mean, mean + std])
        rows = np.array(columns, dtype=np.float64).T
        numeric = [i for i, name in enumerate(self.feature_names) if name not in self.categories]
        if numeric:
            rows[1, numeric[0]] = np.nan
        return rows

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Preprocessor":
        return cls(**json.loads(text))


def expanded_names(feature_names: list[str], categories: dict[str, list[float]]) -> list[str]:
    names = []
    for name in feature_names:
        if name in categories:
            names.extend(f"{name}={_category_label(v)}" for v in categories[name])
        else:
            names.append(name)
    return names


def _category_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def tf_expand(raw: tf.Tensor, feature_names: list[str], categories: dict[str, list[float]]) -> tf.Tensor:
    """One-hot encodes categorical columns (a missing or unseen code -> all zeros); numeric pass through."""
    columns = []
    for index, name in enumerate(feature_names):
        column = raw[:, index : index + 1]
        if name in categories:
            vocabulary = tf.constant([categories[name]], raw.dtype)
            columns.append(tf.cast(tf.equal(column, vocabulary), raw.dtype))
        else:
            columns.append(column)
    return tf.concat(columns, axis=1)


def expand(raw: np.ndarray, feature_names: list[str], categories: dict[str, list[float]]) -> np.ndarray:
    """float64 throughout, so the federated statistics are not rounded to float32 first."""
    return tf_expand(tf.constant(raw, tf.float64), feature_names, categories).numpy()


# ---------------------------------------------------------------- TFF computations


def _clients_int64(length: int) -> tff.FederatedType:
    return tff.FederatedType(tff.TensorType(np.int64, [length]), tff.CLIENTS)


def secure_sum_of(client_vectors: list[np.ndarray]) -> np.ndarray:
    """Sums one non-negative int64 vector per client with TFF's secure sum intrinsic."""
    length = len(client_vectors[0])

    @tff.federated_computation(_clients_int64(length))
    def secure_total(values):
        return tff.federated_secure_sum_bitwidth(values, SECURE_SUM_BITWIDTH)

    return np.asarray(secure_total([np.asarray(v, np.int64) for v in client_vectors]), np.int64)


def federated_max_of(client_vectors: list[np.ndarray]) -> np.ndarray:
    length = len(client_vectors[0])

    @tff.federated_computation(_clients_int64(length))
    def maximum(values):
        return tff.federated_max(values)

    return np.asarray(maximum([np.asarray(v, np.int64) for v in client_vectors]), np.int64)


# ---------------------------------------------------------------- vocabularies


def federated_categories(
    client_raw: list[np.ndarray], feature_names: list[str], categorical: list[str]
) -> dict[str, list[float]]:
    """Category vocabulary per categorical column: codes seen at any site (secure-summed counts)."""
    if not categorical:
        return {}
    indices = [feature_names.index(name) for name in categorical]
    for raw in client_raw:
        for name, index in zip(categorical, indices):
            _require_integer_codes(raw[:, index], name)
    # The code range is found with federated max of the codes and of their negation.
    highs = federated_max_of([_site_extreme(raw[:, indices], +1) for raw in client_raw])
    lows = -federated_max_of([_site_extreme(raw[:, indices], -1) for raw in client_raw])
    spans = [(int(lo), int(hi)) for lo, hi in zip(lows, highs)]
    check_code_spans(categorical, spans)
    counts = secure_sum_of([_site_category_counts(raw[:, indices], spans) for raw in client_raw])
    return vocabularies_from(categorical, spans, counts)


def check_code_spans(categorical: list[str], spans: list[tuple[int, int]]) -> None:
    for name, (lo, hi) in zip(categorical, spans):
        if hi - lo + 1 > MAX_CATEGORIES:
            raise UserError(
                f"data: categorical column '{name}' spans codes {lo}..{hi}; "
                f"at most {MAX_CATEGORIES} codes are supported, recode it or treat it as numeric"
            )


def vocabularies_from(categorical: list[str], spans: list[tuple[int, int]], counts: np.ndarray) -> dict[str, list[float]]:
    """Each column's vocabulary: the codes of its span with a count above 0 at some site."""
    vocabularies, offset = {}, 0
    for name, (lo, hi) in zip(categorical, spans):
        width = max(hi - lo + 1, 0)
        vocabularies[name] = [float(lo + k) for k in range(width) if counts[offset + k] > 0]
        offset += width
    return vocabularies


def _require_integer_codes(column: np.ndarray, name: str) -> None:
    present = column[~np.isnan(column)]
    if np.any(present != np.round(present)):
        raise UserError(
            f"data: categorical column '{name}' has non-integer values; give integer codes "
            "or remove it from categorical_columns"
        )


def _site_extreme(codes: np.ndarray, sign: int) -> np.ndarray:
    result = []
    for column in codes.T:
        present = column[~np.isnan(column)]
        result.append(int(np.max(sign * present)) if present.size else -(2**62))
    return np.asarray(result, np.int64)


def _site_category_counts(codes: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    parts = []
    for column, (lo, hi) in zip(codes.T, spans):
        present = column[~np.isnan(column)].astype(np.int64)
        parts.append(np.bincount(present - lo, minlength=max(hi - lo + 1, 0)))
    return np.concatenate(parts).astype(np.int64)


# ---------------------------------------------------------------- moments


@dataclass
class Moments:
    count: np.ndarray  # non-missing values per column
    mean: np.ndarray
    var: np.ndarray  # population variance


def federated_moments(client_matrices: list[np.ndarray]) -> Moments:
    """Per-column count, mean and variance over all sites, NaN ignored, via secure sum."""
    first = secure_sum_of([_site_counts(x) for x in client_matrices])
    exponents = federated_max_of([_site_exponents(x) for x in client_matrices])
    total_rows = int(sum(len(x) for x in client_matrices))
    counts = first.astype(np.float64)
    fraction_bits = SECURE_SUM_BITWIDTH - 2 - math.ceil(math.log2(total_rows + 1))
    exponents = np.where(exponents == NO_VALUES_EXPONENT, 0, exponents)
    sums = secure_sum_of(
        [_site_fixed_point_sums(x, exponents, fraction_bits) for x in client_matrices]
    )
    return decode_moments(sums, counts, exponents, fraction_bits)


def _site_counts(x: np.ndarray) -> np.ndarray:
    return np.sum(~np.isnan(x), axis=0).astype(np.int64)


def _site_exponents(x: np.ndarray) -> np.ndarray:
    """Per column e with max |x| < 2**e (frexp's exponent); NO_VALUES_EXPONENT if all missing or 0."""
    magnitude = np.where(np.isnan(x), 0.0, np.abs(x)).max(axis=0, initial=0.0)
    return np.asarray(
        [math.frexp(m)[1] if m > 0 else NO_VALUES_EXPONENT for m in magnitude], np.int64
    )


def _site_fixed_point_sums(x: np.ndarray, exponents: np.ndarray, fraction_bits: int) -> np.ndarray:
    scaled = x / np.exp2(exponents)  # within [-1, 1]
    shifted_sum = np.nansum(scaled + 1.0, axis=0)  # + 1 keeps the secure-sum input non-negative
    square_sum = np.nansum(scaled**2, axis=0)
    scale = float(2**fraction_bits)
    return np.concatenate(
        [np.round(shifted_sum * scale), np.round(square_sum * scale)]
    ).astype(np.int64)


def decode_moments(sums, counts, exponents, fraction_bits) -> Moments:
    d = len(counts)
    scale = float(2**fraction_bits)
    safe_counts = np.maximum(counts, 1.0)
    scaled_sum = sums[:d] / scale - counts
    scaled_square = sums[d:] / scale
    scaled_mean = scaled_sum / safe_counts
    scaled_var = np.maximum(scaled_square / safe_counts - scaled_mean**2, 0.0)
    factor = np.exp2(exponents.astype(np.float64))
    return Moments(counts, scaled_mean * factor, scaled_var * factor**2)


def local_moments(x: np.ndarray) -> Moments:
    """One site's own statistics (per-site normalization, for comparison only)."""
    count = np.sum(~np.isnan(x), axis=0).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean = np.where(count > 0, np.nanmean(np.where(count > 0, x, 0.0), axis=0), 0.0)
        var = np.where(count > 0, np.nanvar(np.where(count > 0, x, 0.0), axis=0), 0.0)
    return Moments(count, np.nan_to_num(mean), np.nan_to_num(var))


def preprocessor_from(feature_names, categories, moments: Moments, zero_means_missing=()) -> Preprocessor:
    """Columns with no value anywhere are imputed with 0; constant columns keep std 1."""
    std = np.sqrt(moments.var)
    std = np.where(std > 1e-12, std, 1.0)
    mean = np.where(moments.count > 0, moments.mean, 0.0)
    return Preprocessor(
        list(feature_names), categories, mean.tolist(), std.tolist(), list(zero_means_missing)
    )


def fit_federated(
    client_raw: list[np.ndarray], feature_names: list[str], categorical: list[str],
    zero_means_missing=(),
) -> Preprocessor:
    """The federation's preprocessor: vocabularies and moments through secure sum."""
    categories = federated_categories(client_raw, feature_names, categorical)
    expanded = [expand(raw, feature_names, categories) for raw in client_raw]
    return preprocessor_from(feature_names, categories, federated_moments(expanded), zero_means_missing)


def local_categories(raw: np.ndarray, feature_names: list[str], categorical: list[str]) -> dict[str, list[float]]:
    """One table's own vocabularies (local-only and centralized baselines)."""
    categories = {}
    for name in categorical:
        column = raw[:, feature_names.index(name)]
        _require_integer_codes(column, name)
        categories[name] = sorted(float(v) for v in np.unique(column[~np.isnan(column)]))
    return categories


def fit_local(
    raw: np.ndarray, feature_names: list[str], categorical: list[str], categories=None,
    zero_means_missing=(),
) -> Preprocessor:
    """A preprocessor from one table alone; `categories` fixed when the layout must match others."""
    if categories is None:
        categories = local_categories(raw, feature_names, categorical)
    expanded_raw = expand(raw, feature_names, categories)
    return preprocessor_from(feature_names, categories, local_moments(expanded_raw), zero_means_missing)
