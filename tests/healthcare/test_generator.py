"""Tests for healthcare.generator: the `heart` source's four generated hospitals."""

from __future__ import annotations

import numpy as np
import pytest

from healthcare.data import DataConfig, load
from healthcare.generator import HEART_FEATURES

# (site, y) -> n, age mean, thalach mean, male %, exang %  (../shared/ANCHORS.md)
HEART_TABLE = {
    ("cleveland", 0): (164, 52.6, 158, 56, 14),
    ("cleveland", 1): (139, 56.6, 139, 82, 55),
    ("hungarian", 0): (163, 46.8, 146, 65, 12),
    ("hungarian", 1): (98, 49.4, 129, 88, 65),
    ("switzerland", 0): (1, 56, 97, 100, 0),
    ("switzerland", 1): (45, 56.7, 114, 93, 64),
    ("va", 0): (29, 56.9, 121, 93, 41),
    ("va", 1): (101, 60.1, 122, 97, 72),
}


@pytest.fixture(scope="module")
def heart():
    return load(DataConfig(source="heart"), seed=7)


def _site(data, name):
    return next(c for c in data.clients if c.name == name)


def test_heart_sites_counts_and_prevalence(heart):
    assert [c.name for c in heart.clients] == ["cleveland", "hungarian", "switzerland", "va"]
    assert [len(c) for c in heart.clients] == [303, 261, 46, 130]
    for c in heart.clients:
        for y in (0, 1):
            assert int((c.labels == y).sum()) == HEART_TABLE[(c.name, y)][0]
    prevalence = {c.name: round(c.labels.mean(), 2) for c in heart.clients}
    assert prevalence == {"cleveland": 0.46, "hungarian": 0.38, "switzerland": 0.98, "va": 0.78}
    assert heart.feature_names == HEART_FEATURES
    assert heart.categorical_columns == ["cp", "restecg"]
    assert heart.source_description == "heart: 4 hospitals generated from UCI per-site statistics (seed 7)"
    assert heart.dropped_rows == {"cleveland": 0, "hungarian": 0, "switzerland": 0, "va": 0}


def test_heart_per_class_marginals_match_the_table(heart):
    for (site, y), (n, age, thalach, male, exang) in HEART_TABLE.items():
        rows = _site(heart, site).features[_site(heart, site).labels == y]
        tolerance = 2.0 if n >= 98 else 4.0
        assert abs(rows["age"].mean() - age) < tolerance, (site, y)
        assert abs(rows["thalach"].mean() - thalach) < tolerance, (site, y)
        assert abs(100 * rows["sex"].mean() - male) < 100 / n + 1, (site, y)
        assert abs(100 * rows["exang"].mean() - exang) < 100 / n + 1, (site, y)
    cleveland = _site(heart, "cleveland")
    sick = cleveland.features[cleveland.labels == 1]
    assert abs(sick["age"].std() - 7.9) < 0.5
    assert abs(sick["oldpeak"].mean() - 1.57) < 0.15
    assert abs(sick["oldpeak"].std() - 1.30) < 0.2
    assert abs(sick["chol"].mean() - 251) < 3


def test_heart_values_are_plausible(heart):
    for c in heart.clients:
        f = c.features
        assert f["age"].between(25, 85).all() and (f["age"] == f["age"].round()).all()
        assert f["trestbps"].between(80, 200).all() and (f["trestbps"] == f["trestbps"].round()).all()
        assert f["thalach"].between(60, 202).all()
        assert (f["oldpeak"] >= 0).all() and np.allclose(f["oldpeak"] * 10, (f["oldpeak"] * 10).round())
        assert set(f["cp"].unique()) <= {1, 2, 3, 4}
        assert set(f["restecg"].unique()) <= {0, 1, 2}
        for binary in ("sex", "fbs", "exang"):
            assert set(f[binary].unique()) <= {0, 1}
        assert f.drop(columns="chol").notna().all().all()
    # oldpeak is zero-inflated: many healthy Hungarians have exactly 0
    hungarian = _site(heart, "hungarian")
    assert (hungarian.features["oldpeak"][hungarian.labels == 0] == 0).mean() > 0.5


def test_heart_chol_missing_pattern(heart):
    assert _site(heart, "switzerland").features["chol"].isna().all()
    va = _site(heart, "va")
    missing = va.features["chol"].isna()
    assert int(missing[va.labels == 0].sum()) == 9
    assert int(missing[va.labels == 1].sum()) == 24
    for site in ("cleveland", "hungarian"):
        assert _site(heart, site).features["chol"].notna().all()


def test_heart_diseased_chest_pain_is_mostly_asymptomatic(heart):
    for c in heart.clients:
        cp = c.features["cp"][c.labels == 1]
        assert (cp == 4).mean() > 0.7, c.name
    healthy_cleveland = _site(heart, "cleveland").features["cp"][_site(heart, "cleveland").labels == 0]
    assert (healthy_cleveland == 4).mean() < 0.3


def test_heart_switzerland_single_negative_is_the_published_row(heart):
    swiss = _site(heart, "switzerland")
    row = swiss.features[swiss.labels == 0].iloc[0]
    assert row[["age", "sex", "cp", "trestbps", "fbs", "restecg", "thalach", "exang", "oldpeak"]].tolist() == [
        56, 1, 3, 120, 0, 0, 97, 0, 0.0
    ]


def test_heart_is_seeded_and_thalach_falls_with_age(heart):
    again = load(DataConfig(source="heart"), seed=7)
    other = load(DataConfig(source="heart"), seed=8)
    assert [c.fingerprint() for c in again.clients] == [c.fingerprint() for c in heart.clients]
    assert [c.fingerprint() for c in other.clients] != [c.fingerprint() for c in heart.clients]
    cleveland = _site(heart, "cleveland")
    healthy = cleveland.features[cleveland.labels == 0]
    assert healthy["age"].corr(healthy["thalach"]) < -0.2


def test_heart_sites_differ_in_covariates(heart):
    thalach = {c.name: c.features["thalach"].mean() for c in heart.clients}
    assert thalach["cleveland"] - thalach["switzerland"] > 30
