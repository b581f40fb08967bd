"""Evaluation metrics: binary classification, per-site summaries, masked regression.

Binary metrics take `y_true` (0/1) and `p`, the predicted probability of class 1.
A metric that is undefined for the given data (AUC with one class, sensitivity with no
positives, ...) returns NaN instead of raising, because small federated sites often
lack one class and a report must still be produced for them.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score, roc_curve

NAN = float("nan")


class ScoredReport(dict):
    """A metrics report (the plain dict that summary.json holds) that also carries the test
    labels and probabilities behind it, for the ROC plot, as attributes: they never reach JSON."""

    labels: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def of(cls, metrics: dict, labels: ArrayLike, probabilities: ArrayLike) -> "ScoredReport":
        report = cls(metrics)
        report.labels, report.probabilities = np.asarray(labels), np.asarray(probabilities)
        return report


def _binary_inputs(y_true: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (int labels, float probabilities) after cheap sanity checks."""
    y = np.asarray(y_true).ravel()
    probs = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != probs.shape:
        raise ValueError(f"y_true has {y.size} values but p has {probs.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.all((probs >= 0) & (probs <= 1)):  # also rejects NaN
        raise ValueError("p must be probabilities in [0, 1]")
    return y.astype(np.int64), probs


def _has_both_classes(y: np.ndarray) -> bool:
    return bool(np.any(y == 1) and np.any(y == 0))


def roc_auc(y_true: ArrayLike, p: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn); NaN when only one class is present."""
    y, probs = _binary_inputs(y_true, p)
    if not _has_both_classes(y):
        return NAN
    return float(roc_auc_score(y, probs))


def accuracy(y_true: ArrayLike, p: ArrayLike, threshold: float = 0.5) -> float:
    """Share of rows where (p >= threshold) equals the label; NaN for no rows."""
    y, probs = _binary_inputs(y_true, p)
    if y.size == 0:
        return NAN
    return float(np.mean((probs >= threshold).astype(np.int64) == y))


def sensitivity(y_true: ArrayLike, p: ArrayLike, threshold: float = 0.5) -> float:
    """True positive rate at `threshold`; NaN when there are no positives."""
    y, probs = _binary_inputs(y_true, p)
    positives = y == 1
    if not positives.any():
        return NAN
    return float(np.mean(probs[positives] >= threshold))


def specificity(y_true: ArrayLike, p: ArrayLike, threshold: float = 0.5) -> float:
    """True negative rate at `threshold`; NaN when there are no negatives."""
    y, probs = _binary_inputs(y_true, p)
    negatives = y == 0
    if not negatives.any():
        return NAN
    return float(np.mean(probs[negatives] < threshold))


def brier_score(y_true: ArrayLike, p: ArrayLike) -> float:
    """Mean squared difference between probability and label; NaN for no rows."""
    y, probs = _binary_inputs(y_true, p)
    if y.size == 0:
        return NAN
    return float(np.mean((probs - y) ** 2))


def expected_calibration_error(y_true: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """Row-weighted mean of |mean(p) - mean(y)| over equal-width probability bins.

    Bins are [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]; p = 1 falls in the last bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, probs = _binary_inputs(y_true, p)
    if y.size == 0:
        return NAN
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    prob_sums = np.bincount(bins, weights=probs, minlength=n_bins)
    label_sums = np.bincount(bins, weights=y, minlength=n_bins)
    # |sum(p) - sum(y)| / n per bin equals (bin rows / n) * |mean(p) - mean(y)|.
    return float(np.abs(prob_sums - label_sums).sum() / y.size)


def ks_statistic(y_true: ArrayLike, p: ArrayLike) -> float:
    """Kolmogorov-Smirnov statistic: max(TPR - FPR) over thresholds; NaN with one class."""
    y, probs = _binary_inputs(y_true, p)
    if not _has_both_classes(y):
        return NAN
    false_positive_rate, true_positive_rate, _ = roc_curve(y, probs)
    return float(np.max(true_positive_rate - false_positive_rate))


def gini(y_true: ArrayLike, p: ArrayLike) -> float:
    """Gini coefficient as used in credit scoring: 2 * AUC - 1."""
    return 2.0 * roc_auc(y_true, p) - 1.0


def binary_report(y_true: ArrayLike, p: ArrayLike) -> dict[str, float]:
    """The standard set of binary metrics; "n" and "positives" are ints."""
    y, probs = _binary_inputs(y_true, p)
    return {
        "auc": roc_auc(y, probs),
        "accuracy": accuracy(y, probs),
        "sensitivity": sensitivity(y, probs),
        "specificity": specificity(y, probs),
        "brier": brier_score(y, probs),
        "ece": expected_calibration_error(y, probs),
        "n": int(y.size),
        "positives": int(y.sum()),
    }


def summarize_sites(
    per_site: dict[str, dict[str, float]], metric: str, higher_is_better: bool = True
) -> dict:
    """Mean, worst value (and its site) and spread (max - min) of one metric across sites.

    Sites where the metric is NaN (undefined there) are left out; with no defined
    site, every number is NaN and worst_site is None. Ties for worst go to the site
    listed first.
    """
    defined: dict[str, float] = {}
    for site, metrics in per_site.items():
        if metric not in metrics:
            raise ValueError(f"site {site!r} has no metric {metric!r}; it has {sorted(metrics)}")
        value = float(metrics[metric])
        if not math.isnan(value):
            defined[site] = value
    if not defined:
        return {"mean": NAN, "worst": NAN, "worst_site": None, "spread": NAN}
    pick_worst = min if higher_is_better else max
    worst_site = pick_worst(defined, key=defined.__getitem__)
    values = np.fromiter(defined.values(), dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "worst": defined[worst_site],
        "worst_site": worst_site,
        "spread": float(values.max() - values.min()),
    }


def _regression_errors(
    y_true: ArrayLike, y_pred: ArrayLike, mask_zero: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(kept true values, their errors y_pred - y_true), dropping zeros when mask_zero."""
    truth = np.asarray(y_true, dtype=np.float64)
    predicted = np.asarray(y_pred, dtype=np.float64)
    if truth.shape != predicted.shape:
        raise ValueError(f"y_true has shape {truth.shape} but y_pred has {predicted.shape}")
    # A zero reading means the sensor reported nothing (METR-LA / PEMS-BAY convention).
    keep = truth != 0 if mask_zero else np.ones(truth.shape, dtype=bool)
    return truth[keep], predicted[keep] - truth[keep]


def mae(y_true: ArrayLike, y_pred: ArrayLike, mask_zero: bool = True) -> float:
    """Mean absolute error; NaN when no entries are left after masking."""
    _, errors = _regression_errors(y_true, y_pred, mask_zero)
    return float(np.mean(np.abs(errors))) if errors.size else NAN


def rmse(y_true: ArrayLike, y_pred: ArrayLike, mask_zero: bool = True) -> float:
    """Root mean squared error; NaN when no entries are left after masking."""
    _, errors = _regression_errors(y_true, y_pred, mask_zero)
    return float(np.sqrt(np.mean(errors**2))) if errors.size else NAN


def mape(y_true: ArrayLike, y_pred: ArrayLike, mask_zero: bool = True) -> float:
    """Mean absolute percentage error, in percent; NaN when nothing is left after masking.

    Without masking, a zero true value makes the result inf (or NaN if predicted exactly).
    """
    truth, errors = _regression_errors(y_true, y_pred, mask_zero)
    if not errors.size:
        return NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(np.abs(errors) / np.abs(truth)) * 100.0)
