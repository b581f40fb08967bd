"""Client data profiles: the aggregates of one table, and the warnings from comparing clients."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from shared import profile
from shared.report import section_html


def hand_made_table() -> tuple[pd.DataFrame, np.ndarray]:
    features = pd.DataFrame({
        "age": [30.0, np.nan, 50.0, 70.0],
        "chol": [np.nan, np.nan, np.nan, 200.0],
        "sex": [1.0, 0.0, 1.0, np.nan],  # categorical: coded numbers
    })
    return features, np.array([1, 0, 0, 0])


def test_profile_of_a_small_table():
    features, labels = hand_made_table()
    p = profile.profile(features, labels, "binary", categorical=["sex"])
    assert p["rows"] == 4
    assert p["missing_share"] == pytest.approx(5 / 12)
    assert p["label"] == {"kind": "binary", "positive_share": 0.25}
    assert p["columns"]["age"] == pytest.approx(
        {"missing_share": 0.25, "min": 30.0, "max": 70.0, "mean": 50.0, "std": np.std([30.0, 50.0, 70.0])}
    )
    assert p["columns"]["chol"] == {"missing_share": 0.75, "min": 200.0, "max": 200.0, "mean": 200.0, "std": 0.0}
    assert p["columns"]["sex"] == {"missing_share": 0.25, "categories": 2}  # no range for a category code
    assert p["column_missing"] == {"median": 0.25, "max": 0.75, "max_column": "chol"}


def test_profile_of_a_sensor_table_uses_the_speed_as_a_regression_target():
    speeds = np.array([[60.0, np.nan], [50.0, 40.0], [np.nan, np.nan]])
    p = profile.profile(pd.DataFrame(speeds, columns=["s1", "s2"]), speeds, "regression")
    assert p["label"] == pytest.approx(
        {"kind": "regression", "count": 3, "mean": 50.0, "std": np.std([60.0, 50.0, 40.0]), "min": 40.0, "max": 60.0}
    )
    assert p["columns"]["s2"]["missing_share"] == pytest.approx(2 / 3) and p["missing_share"] == pytest.approx(0.5)


def federation(seed: int = 0, n: int = 5) -> dict[str, dict]:
    """Five alike hospitals: ~40 % positive, age ~ N(55, 10), chol ~ N(220, 40), few gaps."""
    rng = np.random.default_rng(seed)
    profiles = {}
    for i in range(n):
        rows = 200
        features = pd.DataFrame({"age": rng.normal(55, 10, rows), "chol": rng.normal(220, 40, rows)})
        features.loc[rng.random(rows) < 0.05, "chol"] = np.nan
        profiles[f"h{i}"] = profile.profile(features, rng.random(rows) < 0.4)
    return profiles


def odd_hospital(rng, positive_share=0.4, age_shift=0.0, chol_missing=0.05, rows=200):
    features = pd.DataFrame({"age": rng.normal(55 + age_shift, 10, rows), "chol": rng.normal(220, 40, rows)})
    features.loc[rng.random(rows) < chol_missing, "chol"] = np.nan
    return profile.profile(features, rng.random(rows) < positive_share)


def test_alike_clients_raise_no_warning():
    assert profile.compare(federation()) == []


@pytest.mark.parametrize("odd, expected", [
    (dict(positive_share=0.95), "odd: label balance 0.9"),
    (dict(age_shift=25.0), "odd: column 'age' has mean 7"),
    (dict(chol_missing=0.9), "odd: column 'chol' is 9"),
    (dict(rows=20), "odd: only 20 rows, against a median of 200"),
])
def test_compare_flags_the_odd_client_and_only_it(odd, expected):
    profiles = federation()
    profiles["odd"] = odd_hospital(np.random.default_rng(7), **odd)
    warnings = profile.compare(profiles)
    assert len(warnings) == 1 and warnings[0].startswith(expected), warnings
    assert profile.table_rows(profiles, warnings)[1][-1][-1] == 1  # the table counts it


def test_compare_caps_column_warnings_per_client():
    rng = np.random.default_rng(3)
    wide = {}
    for name, shift in [("a", 0), ("b", 0), ("c", 0), ("far", 10)]:
        features = pd.DataFrame({f"x{k}": rng.normal(shift, 1, 100) for k in range(6)})
        wide[name] = profile.profile(features)
    warnings = profile.compare(wide)
    assert len(warnings) == profile.MAX_COLUMN_WARNINGS + 1
    assert warnings[-1] == "far: 3 more shifted columns like these"


def test_report_section_renders_table_and_warning_list():
    page = section_html("| client | rows |\n|---|---|\n| a | 3 |\n\nWarnings:\n\n- a: odd")
    assert "<td>a</td>" in page and "<li>a: odd</li>" in page and "<p>Warnings:</p>" in page
    assert math.isnan(profile.profile(pd.DataFrame({"x": []}), np.array([]))["label"]["positive_share"])


def test_districts_with_their_own_sensors_compare_on_speed_and_overall_gaps():
    rng = np.random.default_rng(5)

    def district(name, mean=60.0, missing=0.1):
        speeds = rng.normal(mean, 8, (300, 4))
        speeds[rng.random(speeds.shape) < missing] = np.nan
        return profile.profile(pd.DataFrame(speeds, columns=[f"{name}-s{k}" for k in range(4)]), speeds, "regression")

    districts = {f"d{i}": district(f"d{i}") for i in range(4)}
    assert profile.compare(districts) == []
    districts["slow"] = district("slow", mean=35.0)
    districts["gappy"] = district("gappy", missing=0.7)
    warnings = profile.compare(districts)
    assert [w.split(":")[0] for w in warnings] == ["slow", "gappy"], warnings
    assert warnings[0].startswith("slow: target mean 35") and "of all values missing" in warnings[1]
