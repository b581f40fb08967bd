"""DP statistics at the sites: the vector one record can move by at most the sensitivity, the
noise that reaches the server, and the preprocessor and profiles made from noisy totals."""

from __future__ import annotations

import numpy as np
import pytest

from tff_apps.learning import dp_preprocessing, preprocessing
from tff_apps.privacy.dp_statistics import spec_from

NAMES = ["age", "cp", "chol"]
SPEC = spec_from(NAMES, ["cp"], {"age": [20, 90], "cp": [1, 4], "chol": [100, 600]})


def table(rng: np.random.Generator, n: int) -> np.ndarray:
    age = rng.normal(55, 9, n)
    cp = rng.integers(1, 5, n).astype(float)
    chol = rng.normal(240, 50, n)
    chol[rng.random(n) < 0.2] = np.nan  # missing
    return np.column_stack([age, cp, chol])


def test_site_vector_holds_counts_scaled_sums_and_code_counts():
    raw = np.array([[20.0, 1.0, 350.0], [90.0, 4.0, np.nan], [200.0, 4.0, 600.0]])  # 200 is clipped to 90
    vector = dp_preprocessing.site_vector(raw, NAMES, SPEC, labels=np.array([1, 0, 1]))
    # rows, positives | age: count, sum, squares (scaled to [-1, 1]) | chol: ... | cp codes 1..4
    expected = [3, 2, 3, -1 + 1 + 1, 3, 2, 0 + 1, 0 + 1, 1, 0, 0, 2]
    assert vector.tolist() == pytest.approx(expected)


def test_one_record_moves_a_site_vector_by_at_most_the_sensitivity():
    rng = np.random.default_rng(0)
    base = table(rng, 40)
    for _ in range(200):
        extra = np.array([[rng.uniform(-100, 300), rng.choice([np.nan, 1, 2, 3, 4, 9]), rng.uniform(-1e3, 1e3)]])
        label = rng.integers(0, 2, 1)
        before = dp_preprocessing.site_vector(base, NAMES, SPEC, labels=np.zeros(40))
        after = dp_preprocessing.site_vector(np.vstack([base, extra]), NAMES, SPEC, labels=np.append(np.zeros(40), label))
        assert np.linalg.norm(after - before) <= SPEC.sensitivity(with_labels=True) + 1e-12


def test_without_noise_the_preprocessor_equals_the_exact_federated_one(runtime):
    rng = np.random.default_rng(1)
    sites = [table(rng, n) for n in (80, 50, 30)]
    sites[0][0, 0] = 19.0  # outside the range: the DP statistics clip it
    dp = dp_preprocessing.dp_preprocessor(sites, NAMES, SPEC, noise_multiplier=0.0)
    exact = preprocessing.fit_federated([np.clip(s, [20, -np.inf, -np.inf], np.inf) for s in sites], NAMES, ["cp"])
    assert dp.categories == {"cp": [1.0, 2.0, 3.0, 4.0]} == exact.categories
    assert dp.mean == pytest.approx(exact.mean, abs=1e-5)
    assert dp.std == pytest.approx(exact.std, rel=1e-4)


def test_the_noise_in_the_sum_has_the_mechanisms_std(runtime):
    sites = [np.full((10, 3), [50.0, 2.0, 200.0]) for _ in range(4)]
    z = 2.0
    totals = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        vectors = [
            dp_preprocessing.noised(dp_preprocessing.site_vector(s, NAMES, SPEC), z * SPEC.sensitivity() / 2, rng)
            for s in sites
        ]
        totals.append(dp_preprocessing.secure_total(vectors))
    exact = sum(dp_preprocessing.site_vector(s, NAMES, SPEC) for s in sites)
    errors = np.asarray(totals) - exact
    # 60 draws x 12 coordinates of N(0, (z * sensitivity)^2): the sample std within 10 %
    assert np.std(errors) == pytest.approx(z * SPEC.sensitivity(), rel=0.1)


def test_noisy_statistics_stay_usable_and_the_profile_releases_no_extremes():
    rng = np.random.default_rng(2)
    raw = table(rng, 400)
    profile = dp_preprocessing.dp_profile(raw, rng.integers(0, 2, 400), NAMES, SPEC, noise_multiplier=1.0, rng=rng)
    assert profile["dp"] and abs(profile["rows"] - 400) < 40
    assert profile["columns"]["age"]["mean"] == pytest.approx(55, abs=3)
    assert profile["columns"]["chol"]["missing_share"] == pytest.approx(0.2, abs=0.1)
    assert not any({"min", "max"} & set(column) for column in profile["columns"].values())
    # a huge noise cannot give a zero or negative std: at least 1/20 of the range
    noisy = dp_preprocessing.dp_preprocessor([raw], NAMES, SPEC, noise_multiplier=1e3, rng=rng)
    assert min(noisy.std) > 0 and noisy.std[0] >= 70 / 20 - 1e-9
