"""Tests for shared.partition: client splits and the stratified train/test split."""

import numpy as np
import pandas as pd
import pytest

from shared import partition
from shared.errors import UserError
from shared.partition import (
    dirichlet_label_partition,
    iid_partition,
    natural_partition,
    quantity_skew_partition,
    quantity_weights,
    stratified_split,
)


def assert_exact_cover(parts: list[np.ndarray], n_rows: int) -> None:
    """Every row appears in exactly one part, and each part is sorted int64."""
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "parts must be sorted without repeats"
    joined = np.concatenate(parts)
    assert len(joined) == n_rows
    np.testing.assert_array_equal(np.sort(joined), np.arange(n_rows))


def same_parts(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    return len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))


def binary_labels_with_positive_share(n_rows: int, positive_share: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n_rows) < positive_share).astype(np.int64)


# --- iid_partition ----------------------------------------------------------------


def test_iid_partition_covers_rows_with_sizes_differing_by_at_most_one():
    parts = iid_partition(103, 10, seed=0)
    assert_exact_cover(parts, 103)
    assert sorted(len(part) for part in parts) == [10] * 7 + [11] * 3


def test_iid_partition_is_reproducible_and_seed_dependent():
    assert same_parts(iid_partition(50, 4, seed=1), iid_partition(50, 4, seed=1))
    assert not same_parts(iid_partition(50, 4, seed=1), iid_partition(50, 4, seed=2))


def test_iid_partition_shuffles_rows():
    first_client = iid_partition(100, 2, seed=0)[0]
    assert not np.array_equal(first_client, np.arange(50))


def test_iid_partition_needs_a_row_per_client():
    with pytest.raises(UserError, match="n_clients=6"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ValueError):
        iid_partition(5, 0, seed=0)


# --- quantity_weights -------------------------------------------------------------


def test_quantity_weights_equal_when_sigma_is_zero():
    np.testing.assert_array_equal(quantity_weights(4, 0.0, seed=3), [0.25] * 4)


def test_quantity_weights_are_lognormal_shares():
    weights = quantity_weights(5, 1.0, seed=7)
    draws = np.random.default_rng(7).lognormal(0.0, 1.0, 5)
    np.testing.assert_allclose(weights, draws / draws.sum())
    assert weights.sum() == pytest.approx(1.0)


def test_quantity_weights_spread_grows_with_sigma():
    spreads = [np.std(quantity_weights(20, sigma, seed=0)) for sigma in (0.1, 0.5, 2.0)]
    assert spreads[0] < spreads[1] < spreads[2]


def test_quantity_weights_rejects_negative_sigma():
    with pytest.raises(ValueError, match="sigma"):
        quantity_weights(3, -0.5, seed=0)


# --- quantity_skew_partition ------------------------------------------------------


def test_quantity_skew_sizes_follow_weights_above_the_minimum():
    n_rows, n_clients, min_size = 1000, 5, 10
    parts = quantity_skew_partition(n_rows, n_clients, sigma=1.0, seed=4, min_size=min_size)
    assert_exact_cover(parts, n_rows)
    sizes = np.array([len(part) for part in parts])
    expected = min_size + (n_rows - n_clients * min_size) * quantity_weights(n_clients, 1.0, 4)
    assert np.all(np.abs(sizes - expected) < 1.0)  # rounding only
    assert sizes.min() >= min_size


def test_quantity_skew_with_zero_sigma_is_balanced():
    sizes = [len(part) for part in quantity_skew_partition(40, 4, sigma=0.0, seed=0)]
    assert sizes == [10, 10, 10, 10]


def test_quantity_skew_keeps_the_minimum_under_strong_skew():
    parts = quantity_skew_partition(200, 8, sigma=3.0, seed=1, min_size=10)
    assert min(len(part) for part in parts) == 10  # the smallest clients sit at the floor
    assert_exact_cover(parts, 200)


def test_quantity_skew_reports_too_few_rows():
    with pytest.raises(UserError) as error:
        quantity_skew_partition(99, 10, sigma=1.0, seed=0, min_size=10)
    assert "n_clients=10" in str(error.value) and "min_size=10" in str(error.value)


# --- dirichlet_label_partition ----------------------------------------------------


def label_distance_from_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of |client positive share - global positive share|."""
    global_share = labels.mean()
    return float(np.mean([abs(labels[part].mean() - global_share) for part in parts]))


def test_dirichlet_partition_covers_rows_and_respects_min_size():
    labels = binary_labels_with_positive_share(600, 0.4, seed=0)
    parts = dirichlet_label_partition(labels, 10, alpha=0.5, seed=0, min_size=10)
    assert len(parts) == 10
    assert_exact_cover(parts, 600)
    assert min(len(part) for part in parts) >= 10


def test_dirichlet_partition_is_reproducible():
    labels = binary_labels_with_positive_share(300, 0.5, seed=1)
    first = dirichlet_label_partition(labels, 5, alpha=0.3, seed=9)
    assert same_parts(first, dirichlet_label_partition(labels, 5, alpha=0.3, seed=9))
    assert not same_parts(first, dirichlet_label_partition(labels, 5, alpha=0.3, seed=10))


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha():
    labels = binary_labels_with_positive_share(2000, 0.5, seed=2)
    skewed = dirichlet_label_partition(labels, 10, alpha=0.1, seed=0)
    near_iid = dirichlet_label_partition(labels, 10, alpha=1000.0, seed=0)
    assert label_distance_from_global(labels, skewed) > 0.2
    assert label_distance_from_global(labels, near_iid) < 0.05


def test_dirichlet_partition_handles_more_than_two_classes():
    labels = np.repeat([0, 1, 2, 3, 4], 60)
    parts = dirichlet_label_partition(labels, 6, alpha=0.5, seed=3, min_size=10)
    assert_exact_cover(parts, 300)
    assert min(len(part) for part in parts) >= 10


def test_dirichlet_size_weights_add_quantity_skew():
    labels = binary_labels_with_positive_share(1000, 0.5, seed=4)
    weights = np.array([7.0, 1.0, 1.0, 1.0])  # need not sum to 1
    parts = dirichlet_label_partition(labels, 4, alpha=1000.0, seed=0, size_weights=weights)
    shares = np.array([len(part) for part in parts]) / 1000
    np.testing.assert_allclose(shares, [0.7, 0.1, 0.1, 0.1], atol=0.02)


def test_dirichlet_strong_skew_on_breast_cancer_sized_data_succeeds():
    # The literature's beta = 0.1 with 10 parties: this seed needs a few thousand draws.
    labels = np.array([0] * 212 + [1] * 357)
    parts = dirichlet_label_partition(labels, 10, alpha=0.1, seed=0, min_size=10)
    assert_exact_cover(parts, 569)
    assert min(len(part) for part in parts) == 10


def test_dirichlet_reports_too_few_rows_without_trying():
    labels = np.zeros(49, dtype=np.int64)
    with pytest.raises(UserError) as error:
        dirichlet_label_partition(labels, 5, alpha=0.5, seed=0, min_size=10)
    message = str(error.value)
    assert "n_clients=5" in message and "min_size=10" in message and "49 rows" in message


def test_dirichlet_gives_up_after_bounded_attempts(monkeypatch):
    # A lower bound keeps the test fast; the real bound behaves the same way.
    monkeypatch.setattr(partition, "_MAX_DIRICHLET_ATTEMPTS", 200)
    # 100 rows, 10 clients, min_size 10: only an exactly equal split would do.
    labels = np.repeat([0, 1], 50)
    with pytest.raises(UserError, match="in 200 attempts; raise alpha"):
        dirichlet_label_partition(labels, 10, alpha=0.05, seed=0, min_size=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 0.0},
        {"alpha": -1.0},
        {"size_weights": np.array([1.0, 1.0])},
        {"size_weights": np.array([1.0, -1.0, 1.0])},
        {"size_weights": np.zeros(3)},
        {"n_clients": 0},
    ],
)
def test_dirichlet_rejects_bad_arguments(kwargs):
    arguments = {"labels": np.repeat([0, 1], 50), "n_clients": 3, "alpha": 0.5, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        dirichlet_label_partition(**arguments)


# --- natural_partition ------------------------------------------------------------


def test_natural_partition_groups_rows_in_order_of_first_appearance():
    sites = pd.Series(["va", "cleveland", "va", "hungarian", "cleveland"], index=[5, 6, 7, 8, 9])
    groups = natural_partition(sites)
    assert list(groups) == ["va", "cleveland", "hungarian"]
    assert groups["va"].tolist() == [0, 2]
    assert groups["cleveland"].tolist() == [1, 4]
    assert groups["hungarian"].tolist() == [3]
    assert all(indices.dtype == np.int64 for indices in groups.values())


def test_natural_partition_turns_keys_into_strings():
    groups = natural_partition([2, 1, 2])
    assert list(groups) == ["2", "1"]
    assert groups["2"].tolist() == [0, 2]


# --- stratified_split -------------------------------------------------------------


def test_stratified_split_takes_the_fraction_from_each_class():
    labels = np.array([0] * 8 + [1] * 4)
    train, test = stratified_split(labels, 0.25, seed=0)
    assert np.bincount(labels[test]).tolist() == [2, 1]  # round(0.25 * 8), round(0.25 * 4)
    assert np.bincount(labels[train]).tolist() == [6, 3]
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(12))


def test_stratified_split_keeps_small_classes_usable():
    # A class of one stays in train; a class of two always gives one row to test.
    labels = np.array([0] * 20 + [1] + [2, 2])
    train, test = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 0, 1]
    assert np.bincount(labels[train], minlength=3).tolist() == [18, 1, 1]


def test_stratified_split_keeps_a_train_row_at_large_fractions():
    labels = np.array([0, 0, 0, 1, 1, 1])
    train, test = stratified_split(labels, 0.9, seed=0)  # round(2.7) = 3 -> capped at 2
    assert np.bincount(labels[train]).tolist() == [1, 1]
    assert np.bincount(labels[test]).tolist() == [2, 2]


def test_stratified_split_is_reproducible_and_random():
    labels = np.array([0, 1] * 50)
    first = stratified_split(labels, 0.3, seed=5)
    again = stratified_split(labels, 0.3, seed=5)
    other = stratified_split(labels, 0.3, seed=6)
    assert np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_stratified_split_rejects_fractions_outside_the_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.array([0, 1, 0, 1]), fraction, seed=0)
