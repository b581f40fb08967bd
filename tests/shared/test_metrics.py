"""Tests for shared.metrics against hand-computed values and scikit-learn / SciPy."""

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import (
    brier_score_loss,
    mean_absolute_error,
    mean_absolute_percentage_error,
    recall_score,
    roc_auc_score,
)

from shared.metrics import (
    accuracy,
    binary_report,
    brier_score,
    expected_calibration_error,
    gini,
    ks_statistic,
    mae,
    mape,
    rmse,
    roc_auc,
    sensitivity,
    specificity,
    summarize_sites,
)

# A small case worked out by hand: of the 4 positive/negative pairs, 3 are ordered
# correctly (0.35 < 0.4 is the one mistake), so AUC = 0.75.
Y_SMALL = np.array([0, 0, 1, 1])
P_SMALL = np.array([0.1, 0.4, 0.35, 0.8])


@pytest.fixture
def noisy_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(np.int64)
    p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, 300), 0, 1)
    return y, p


# --- ranking metrics --------------------------------------------------------------


def test_roc_auc_hand_computed_and_against_sklearn(noisy_scores):
    assert roc_auc(Y_SMALL, P_SMALL) == pytest.approx(0.75)
    y, p = noisy_scores
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert 0.8 < roc_auc(y, p) < 1.0  # the fixture really separates the classes


def test_ks_statistic_hand_computed_and_against_scipy(noisy_scores):
    # Thresholds 0.8 -> TPR .5, FPR 0; 0.35 -> TPR 1, FPR .5: max(TPR - FPR) = 0.5.
    assert ks_statistic(Y_SMALL, P_SMALL) == pytest.approx(0.5)
    y, p = noisy_scores
    expected = ks_2samp(p[y == 1], p[y == 0]).statistic
    assert ks_statistic(y, p) == pytest.approx(expected)


def test_gini_is_twice_auc_minus_one():
    assert gini(Y_SMALL, P_SMALL) == pytest.approx(0.5)
    assert gini([0, 1], [0.9, 0.1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("metric", [roc_auc, ks_statistic, gini])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_ranking_metrics_are_nan_with_a_single_class(metric, labels):
    assert math.isnan(metric(labels, [0.5] * len(labels)))


# --- threshold metrics ------------------------------------------------------------


def test_threshold_metrics_hand_computed():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.5, 0.2, 0.49, 0.7])  # p = 0.5 counts as positive
    assert accuracy(y, p) == pytest.approx(3 / 5)
    assert sensitivity(y, p) == pytest.approx(2 / 3)
    assert specificity(y, p) == pytest.approx(1 / 2)
    assert accuracy(y, p, threshold=0.8) == pytest.approx(3 / 5)
    assert sensitivity(y, p, threshold=0.8) == pytest.approx(1 / 3)
    assert specificity(y, p, threshold=0.8) == pytest.approx(1.0)


def test_sensitivity_and_specificity_match_sklearn_recall(noisy_scores):
    y, p = noisy_scores
    predicted = (p >= 0.5).astype(int)
    assert sensitivity(y, p) == pytest.approx(recall_score(y, predicted, pos_label=1))
    assert specificity(y, p) == pytest.approx(recall_score(y, predicted, pos_label=0))


def test_threshold_metrics_are_nan_when_undefined():
    assert math.isnan(sensitivity([0, 0], [0.2, 0.9]))
    assert math.isnan(specificity([1, 1], [0.2, 0.9]))
    assert math.isnan(accuracy([], []))
    assert specificity([0, 0], [0.2, 0.9]) == pytest.approx(0.5)  # the defined one still works


# --- calibration ------------------------------------------------------------------


def test_brier_score_hand_computed_and_against_sklearn(noisy_scores):
    # (0.1^2 + 0.4^2 + 0.65^2 + 0.2^2) / 4 = 0.6325 / 4
    assert brier_score(Y_SMALL, P_SMALL) == pytest.approx(0.158125)
    y, p = noisy_scores
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p))


def test_expected_calibration_error_hand_computed():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 1.0])
    # bin 0: |0.05 - 1|, bin 1: |0.15 - 0|, last bin (also holds p = 1.0): |1.95 - 1| / 2 x 2 rows.
    expected = (0.95 + 0.15 + 0.95) / 4
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    # One bin pools everything: |mean(p) - mean(y)| = |0.5375 - 0.5|.
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.0375)


def test_expected_calibration_error_is_zero_when_calibrated():
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0)
    assert expected_calibration_error(y, 1 - p) == pytest.approx(0.5)


def test_expected_calibration_error_rejects_zero_bins():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0, 1], [0.2, 0.8], n_bins=0)


# --- input checks and the report ---------------------------------------------------


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [0.5], "y_true has 2 values but p has 1"),
        ([0, 2], [0.5, 0.5], "only 0 and 1"),
        ([0, 1], [0.5, 1.2], r"\[0, 1\]"),
        ([0, 1], [0.5, np.nan], r"\[0, 1\]"),
    ],
)
def test_binary_metrics_reject_malformed_inputs(y, p, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(y, p)


def test_binary_report_collects_all_metrics():
    report = binary_report(Y_SMALL.tolist(), P_SMALL.tolist())
    assert set(report) == {
        "auc", "accuracy", "sensitivity", "specificity", "brier", "ece", "n", "positives"
    }
    assert report["auc"] == pytest.approx(0.75)
    assert report["accuracy"] == pytest.approx(0.75)  # 0.35 is the one miss
    assert report["sensitivity"] == pytest.approx(0.5)
    assert report["specificity"] == pytest.approx(1.0)
    assert report["brier"] == pytest.approx(0.158125)
    assert report["ece"] == pytest.approx(expected_calibration_error(Y_SMALL, P_SMALL))
    assert report["n"] == 4 and isinstance(report["n"], int)
    assert report["positives"] == 2 and isinstance(report["positives"], int)


def test_binary_report_for_a_site_with_one_class_does_not_raise():
    report = binary_report([0, 0, 0], [0.1, 0.6, 0.2])
    assert math.isnan(report["auc"]) and math.isnan(report["sensitivity"])
    assert report["specificity"] == pytest.approx(2 / 3)
    assert report["positives"] == 0


# --- summarize_sites --------------------------------------------------------------


SITES = {
    "cleveland": {"auc": 0.90, "brier": 0.12},
    "hungarian": {"auc": 0.80, "brier": 0.15},
    "switzerland": {"auc": float("nan"), "brier": 0.30},
    "va": {"auc": 0.70, "brier": 0.20},
}


def test_summarize_sites_skips_undefined_sites():
    summary = summarize_sites(SITES, "auc")
    assert summary["mean"] == pytest.approx(0.80)
    assert summary["worst"] == pytest.approx(0.70)
    assert summary["worst_site"] == "va"
    assert summary["spread"] == pytest.approx(0.20)


def test_summarize_sites_lower_is_better():
    summary = summarize_sites(SITES, "brier", higher_is_better=False)
    assert summary["worst_site"] == "switzerland"
    assert summary["worst"] == pytest.approx(0.30)
    assert summary["mean"] == pytest.approx(0.1925)
    assert summary["spread"] == pytest.approx(0.18)


def test_summarize_sites_with_no_defined_value():
    summary = summarize_sites({"a": {"auc": float("nan")}}, "auc")
    assert summary["worst_site"] is None
    assert all(math.isnan(summary[key]) for key in ("mean", "worst", "spread"))


def test_summarize_sites_rejects_an_unknown_metric():
    with pytest.raises(ValueError, match="'cleveland' has no metric 'auroc'"):
        summarize_sites(SITES, "auroc")


# --- regression -------------------------------------------------------------------


def test_regression_metrics_mask_zero_readings():
    y_true = np.array([[60.0, 0.0], [50.0, 40.0]])  # 0 = sensor reported nothing
    y_pred = np.array([[57.0, 30.0], [55.0, 40.0]])
    # Kept errors: -3, 5, 0 on true values 60, 50, 40.
    assert mae(y_true, y_pred) == pytest.approx(8 / 3)
    assert rmse(y_true, y_pred) == pytest.approx(math.sqrt(34 / 3))
    assert mape(y_true, y_pred) == pytest.approx((3 / 60 + 5 / 50) / 3 * 100)


def test_regression_metrics_without_mask_count_every_entry():
    y_true = np.array([60.0, 0.0, 50.0, 40.0])
    y_pred = np.array([57.0, 30.0, 55.0, 40.0])
    assert mae(y_true, y_pred, mask_zero=False) == pytest.approx(38 / 4)
    assert rmse(y_true, y_pred, mask_zero=False) == pytest.approx(math.sqrt(934 / 4))
    assert math.isinf(mape(y_true, y_pred, mask_zero=False))


def test_regression_metrics_match_sklearn_when_nothing_is_masked():
    rng = np.random.default_rng(1)
    y_true = rng.uniform(20, 70, 50)
    y_pred = y_true + rng.normal(0, 3, 50)
    assert mae(y_true, y_pred) == pytest.approx(mean_absolute_error(y_true, y_pred))
    expected_mape = mean_absolute_percentage_error(y_true, y_pred) * 100
    assert mape(y_true, y_pred) == pytest.approx(expected_mape)


@pytest.mark.parametrize("metric", [mae, rmse, mape])
def test_regression_metrics_are_nan_when_everything_is_masked(metric):
    assert math.isnan(metric(np.zeros(3), np.ones(3)))


def test_regression_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        mae(np.ones((2, 3)), np.ones((3, 2)))
