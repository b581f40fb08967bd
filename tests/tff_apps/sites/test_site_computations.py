"""Computations at the sites, on data folders, give what the simulation computes from the
same rows: the preprocessing statistics, the round inputs, the score histograms."""

from __future__ import annotations

import numpy as np
import pytest

from tff_apps.learning import preprocessing
from tff_apps.sites import site_computations, site_data

NAMES = ["age", "cp", "chol", "flag"]
CATEGORICAL = ["cp"]
SCHEMA = site_data.Schema("healthcare", tuple(NAMES), tuple(CATEGORICAL), (), "binary")


def site_table(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    age = np.round(rng.normal(55 + shift, 9, n))
    cp = rng.integers(1, 5, n).astype(float)
    chol = rng.normal(240, 50, n) * 1.0001
    chol[rng.random(n) < 0.2] = np.nan
    flag = np.zeros(n)  # constant column
    return np.column_stack([age, cp, chol, flag]), (rng.random(n) < 0.4).astype(np.int64)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("sites")
    tables, folders = [], []
    for k, n in enumerate((40, 25, 31)):
        train, test = site_table(rng, n, 3 * k), site_table(rng, 12, 3 * k)
        folder = root / f"site_{k}"
        site_data.write_site_folder(folder, f"site_{k}", SCHEMA, {"train": train, "test": test}, {"test_fraction": 0.25})
        tables.append((train, test))
        folders.append(str(folder))
    return tables, folders


def test_manifests_are_read_at_the_sites(runtime, sites):
    tables, folders = sites
    manifests = site_computations.read_manifests(folders)
    assert [m["rows"] for m in manifests] == [{"train": len(t[0][1]), "test": 12} for t in tables]
    assert {m["schema_fingerprint"] for m in manifests} == {SCHEMA.fingerprint()}


def test_site_vectors_equal_the_simulations(runtime, sites):
    (train, _), _ = sites[0][0], None
    x = train[0]
    categories = preprocessing.local_categories(x, NAMES, CATEGORICAL)
    expanded = preprocessing.expand(x, NAMES, categories)
    assert site_computations.tf_counts(expanded).numpy().tolist() == preprocessing._site_counts(expanded).tolist()
    assert site_computations.tf_exponents(expanded).numpy().tolist() == preprocessing._site_exponents(expanded).tolist()
    exponents = np.where(preprocessing._site_exponents(expanded) < -1000, 0, preprocessing._site_exponents(expanded))
    tf_sums = site_computations.tf_fixed_point_sums(expanded, exponents, 50).numpy()
    assert np.max(np.abs(tf_sums - preprocessing._site_fixed_point_sums(expanded, exponents, 50))) <= 1
    codes = x[:, [1]]
    assert site_computations.tf_extremes(codes, -1).numpy().tolist() == preprocessing._site_extreme(codes, -1).tolist()
    spans = [(1, 4)]
    assert (site_computations.tf_category_counts(codes, spans).numpy().tolist()
            == preprocessing._site_category_counts(codes, spans).tolist())


def test_the_preprocessor_from_the_sites_equals_the_simulations(runtime, sites):
    tables, folders = sites
    raws = [train[0] for train, _ in tables]
    at_sites = site_computations.federated_preprocessor(folders, NAMES, CATEGORICAL, sum(len(r) for r in raws))
    simulated = preprocessing.fit_federated(raws, NAMES, CATEGORICAL)
    assert at_sites.categories == simulated.categories
    assert at_sites.mean == pytest.approx(simulated.mean, rel=1e-12, abs=1e-12)
    assert at_sites.std == pytest.approx(simulated.std, rel=1e-12)


def test_histograms_give_metrics_to_the_bin_width():
    histogram = np.zeros(2 * site_computations.HISTOGRAM_BINS, np.int64)
    histogram[10] = 3  # three negatives in bin 10
    histogram[site_computations.HISTOGRAM_BINS + 4000] = 2  # two positives in bin 4000
    labels, scores = site_computations.scores_from_histogram(histogram)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert scores[:3] == pytest.approx([10.5 / 4096] * 3) and scores[3:] == pytest.approx([4000.5 / 4096] * 2)


def test_profiles_computed_at_the_sites_equal_the_simulations(runtime, sites):
    import pandas as pd

    from shared.profile import profile

    tables, folders = sites
    at_sites = site_computations.site_profiles(folders, NAMES, CATEGORICAL)
    for (train, _), remote in zip(tables, at_sites):
        local = profile(pd.DataFrame(train[0], columns=NAMES), train[1], "binary", CATEGORICAL)
        assert remote["rows"] == local["rows"] and remote["label"] == pytest.approx(local["label"])
        assert remote["missing_share"] == pytest.approx(local["missing_share"])
        assert remote["column_missing"] == pytest.approx(local["column_missing"])
        for name in NAMES:
            assert remote["columns"][name] == pytest.approx(local["columns"][name], rel=1e-9)
