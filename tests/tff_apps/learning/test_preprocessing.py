"""Tests for tff_apps.preprocessing: federated vocabularies and moments against pooled numpy.

Three synthetic sites of different sizes (40, 17, 73 rows) with NaNs, two integer
categorical columns (one with negative codes, missing entirely at one site), a column
entirely missing at one site, a constant column, and features of magnitude 1e-3 and
1e5. The reference statistics are computed here in float64 numpy on the pooled rows,
with an independent one-hot expansion.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from shared.errors import UserError
from tff_apps.learning import preprocessing as pp
from tff_apps.runtime.context import Runtime

NAMES = ["age", "tiny", "huge", "cp", "const", "sparse", "grade"]
CATEGORICAL = ["cp", "grade"]
SIZES = (40, 17, 73)
CP_CODES = [(1, 2, 3), (1, 2), (1, 2, 4)]  # 3 only at site 0, 4 only at site 2
GRADE_CODES = [(-2, 0), None, (5,)]  # negative codes; missing entirely at site 1
VOCAB = {"cp": [1.0, 2.0, 3.0, 4.0], "grade": [-2.0, 0.0, 5.0]}
EXPANDED = ["age", "tiny", "huge", "cp=1", "cp=2", "cp=3", "cp=4", "const", "sparse", "grade=-2", "grade=0", "grade=5"]
CONST = 2.5


def make_sites(float32_exact: bool, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate(SIZES):
        age = rng.normal(50 + 5 * i, 9, n)
        tiny = 1e-3 * (1 + 0.3 * rng.standard_normal(n)) + 2e-4 * i
        huge = 1e5 * (1 + 0.2 * rng.standard_normal(n)) - 1e4 * i
        cp = rng.choice(CP_CODES[i], n).astype(float)
        const = np.full(n, CONST)
        sparse = np.full(n, np.nan) if i == 1 else rng.normal(-3, 1.5, n)
        grade = np.full(n, np.nan) if GRADE_CODES[i] is None else rng.choice(GRADE_CODES[i], n).astype(float)
        x = np.column_stack([age, tiny, huge, cp, const, sparse, grade])
        for j in (0, 1, 2, 3, 6):
            x[rng.random(n) < 0.15, j] = np.nan
        if float32_exact:  # values a float32 holds exactly: the engine's float32 cast is then lossless
            x = x.astype(np.float32).astype(np.float64)
        sites.append(x)
    return sites


def numpy_expand(raw: np.ndarray, vocab: dict[str, list[float]]) -> np.ndarray:
    columns = []
    for j, name in enumerate(NAMES):
        if name in vocab:
            columns.extend((raw[:, j] == v).astype(np.float64) for v in vocab[name])  # NaN -> 0
        else:
            columns.append(raw[:, j])
    return np.column_stack(columns)


def numpy_stats(raw: np.ndarray, vocab) -> tuple[np.ndarray, np.ndarray]:
    expanded = numpy_expand(raw, vocab)
    return np.nanmean(expanded, axis=0), np.nanstd(expanded, axis=0)


@pytest.fixture(scope="module")
def sites() -> list[np.ndarray]:
    return make_sites(float32_exact=True)


@pytest.fixture(scope="module")
def fitted(runtime, sites) -> pp.Preprocessor:
    return pp.fit_federated(sites, NAMES, CATEGORICAL)


# -- sanity of the synthetic data (so the tests below test what they claim) ------------


def test_synthetic_sites_have_the_intended_shape(sites):
    assert [len(s) for s in sites] == list(SIZES)
    assert np.all(np.isnan(sites[1][:, NAMES.index("sparse")]))
    assert all(np.isnan(s[:, [0, 1, 2, 3]]).any() for s in sites)
    pooled = np.concatenate(sites)
    assert np.nanmax(np.abs(pooled[:, 1])) < 1e-2 and np.nanmin(np.abs(pooled[:, 2])) > 1e4


# -- fit_federated --------------------------------------------------------------------


def test_vocabulary_is_union_of_codes_seen_at_any_site(fitted):
    assert fitted.categories == VOCAB
    assert fitted.expanded_names == EXPANDED


def test_federated_moments_equal_pooled_numpy(fitted, sites):
    mean, std = numpy_stats(np.concatenate(sites), VOCAB)
    const = EXPANDED.index("const")
    assert mean[const] == CONST and std[const] == 0.0
    std[const] = 1.0  # documented: a constant column keeps std 1
    np.testing.assert_allclose(fitted.mean, mean, rtol=1e-9, atol=0)
    np.testing.assert_allclose(fitted.std, std, rtol=1e-9, atol=0)


def test_federated_equals_centralized_fit_local(fitted, sites):
    pooled = pp.fit_local(np.concatenate(sites), NAMES, CATEGORICAL)
    assert pooled.categories == fitted.categories
    np.testing.assert_allclose(fitted.mean, pooled.mean, rtol=1e-9, atol=0)
    np.testing.assert_allclose(fitted.std, pooled.std, rtol=1e-9, atol=0)


def test_federated_moments_equal_pooled_numpy_for_general_float64_data(runtime):
    sites = make_sites(float32_exact=False)
    fitted = pp.fit_federated(sites, NAMES, CATEGORICAL)
    mean, std = numpy_stats(np.concatenate(sites), VOCAB)
    std[EXPANDED.index("const")] = 1.0
    np.testing.assert_allclose(fitted.mean, mean, rtol=1e-9, atol=0)
    np.testing.assert_allclose(fitted.std, std, rtol=1e-9, atol=0)


def test_runtime_reports_simulated_secure_sum_after_fit(sites):
    with Runtime() as fresh:  # its own worker, so the flag starts False whatever ran before
        assert fresh.simulated_secure_sum is False
        pp.fit_federated(sites, NAMES, CATEGORICAL)
        assert fresh.simulated_secure_sum is True


# -- transform ----------------------------------------------------------------------------


def test_transform_hand_computed():
    prep = pp.Preprocessor(
        feature_names=["a", "cp"],
        categories={"cp": [1.0, 2.0]},
        mean=[10.0, 0.5, 0.25],
        std=[2.0, 0.5, 0.5],
    )
    raw = np.array([[12.0, 1.0], [np.nan, 2.0], [10.0, 7.0], [8.0, np.nan]])
    expected = np.array(
        [
            [1.0, 1.0, -0.5],
            [0.0, -1.0, 1.5],  # NaN -> mean -> 0
            [0.0, -1.0, -0.5],  # unseen code 7 -> one-hot all zeros
            [-1.0, -1.0, -0.5],  # missing code -> all zeros as well
        ]
    )
    np.testing.assert_allclose(prep.transform(raw), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        pp.expand(raw, ["a", "cp"], {"cp": [1.0, 2.0]})[2:, 1:], np.zeros((2, 2))
    )
    assert prep.transform(raw).dtype == np.float32


def test_fitted_transform_imputes_mean_and_zeroes_unseen_codes(fitted):
    row_nan = np.full((1, len(NAMES)), np.nan)
    row_nan[0, NAMES.index("const")] = CONST
    row_unseen = row_nan.copy()
    row_unseen[0, NAMES.index("cp")] = 9.0  # never seen at any site
    row_unseen[0, NAMES.index("grade")] = -7.0
    out = fitted.transform(np.vstack([row_nan, row_unseen]))
    numeric = [EXPANDED.index(n) for n in ("age", "tiny", "huge", "const", "sparse")]
    np.testing.assert_array_equal(out[:, numeric], 0.0)
    one_hot = [i for i, n in enumerate(EXPANDED) if "=" in n]
    expected = -np.asarray(fitted.mean)[one_hot] / np.asarray(fitted.std)[one_hot]  # (0 - mean) / std
    np.testing.assert_allclose(out[0, one_hot], expected, rtol=1e-6)
    np.testing.assert_array_equal(out[1], out[0])  # unseen code == missing code == all-zero one-hot


def test_fitted_transform_standardizes_training_rows(fitted, sites):
    pooled = np.concatenate(sites)
    out = fitted.transform(pooled).astype(np.float64)
    expanded = numpy_expand(pooled, VOCAB)
    mean, std = numpy_stats(pooled, VOCAB)
    std[EXPANDED.index("const")] = 1.0
    expected = (np.where(np.isnan(expanded), mean, expanded) - mean) / std
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_json_round_trip_gives_identical_transform(fitted, sites):
    text = fitted.to_json()
    json.loads(text)  # plain JSON
    again = pp.Preprocessor.from_json(text)
    assert again == fitted
    raw = np.concatenate(sites)
    np.testing.assert_array_equal(again.transform(raw), fitted.transform(raw))


# -- federated_categories -------------------------------------------------------------------


def test_non_integer_codes_are_a_user_error(runtime, sites):
    bad = [s.copy() for s in sites]
    bad[2][5, NAMES.index("cp")] = 1.5
    with pytest.raises(UserError, match="'cp'.*non-integer"):
        pp.federated_categories(bad, NAMES, CATEGORICAL)


def test_too_many_codes_are_a_user_error(runtime):
    site_a = np.arange(0, 128, dtype=np.float64)[:, None]
    site_b = np.arange(128, 257, dtype=np.float64)[:, None]  # 257 codes in all
    with pytest.raises(UserError, match="'k'.*256"):
        pp.federated_categories([site_a, site_b], ["k"], ["k"])


def test_256_codes_are_accepted(runtime):
    site_a = np.arange(0, 128, dtype=np.float64)[:, None]
    site_b = np.arange(128, 256, dtype=np.float64)[:, None]
    assert pp.federated_categories([site_a, site_b], ["k"], ["k"]) == {"k": [float(v) for v in range(256)]}


def test_no_categorical_columns_no_vocabulary(runtime, sites):
    assert pp.federated_categories(sites, NAMES, []) == {}


# -- fit_local ---------------------------------------------------------------------------------


def test_fit_local_equals_numpy_stats_of_one_table(sites):
    site = sites[1]  # no 'sparse' values, no 'grade' values, no cp=3 or cp=4
    prep = pp.fit_local(site, NAMES, CATEGORICAL)
    assert prep.categories == {"cp": [1.0, 2.0], "grade": []}
    assert prep.expanded_names == ["age", "tiny", "huge", "cp=1", "cp=2", "const", "sparse"]
    vocab = {"cp": [1.0, 2.0], "grade": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of the all-NaN column
        mean, std = numpy_stats(site, vocab)
    names = prep.expanded_names
    sparse, const = names.index("sparse"), names.index("const")
    assert np.isnan(mean[sparse])  # nothing to compute from: the engine imputes 0 and keeps std 1
    mean[sparse], std[sparse], std[const] = 0.0, 1.0, 1.0
    np.testing.assert_allclose(prep.mean, mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(prep.std, std, rtol=1e-12, atol=0)


def test_fit_local_with_fixed_categories_keeps_the_federated_layout(fitted, sites):
    prep = pp.fit_local(sites[0], NAMES, CATEGORICAL, categories=fitted.categories)
    assert prep.expanded_names == EXPANDED
    mean, std = numpy_stats(sites[0], VOCAB)
    absent = [EXPANDED.index("cp=4"), EXPANDED.index("grade=5")]  # never at site 0: constant 0 columns
    assert np.all(mean[absent] == 0.0) and np.all(std[absent] == 0.0)
    assert np.flatnonzero(std == 0.0).tolist() == sorted(absent + [EXPANDED.index("const")])
    std[std == 0.0] = 1.0
    np.testing.assert_allclose(prep.mean, mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(prep.std, std, rtol=1e-12, atol=0)
