"""Tests for healthcare.data: the breast_cancer and csv sources and the csv error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from healthcare.data import DataConfig, load
from shared.errors import UserError

# --------------------------------------------------------------------------- breast_cancer


def test_breast_cancer_covers_every_row_once_with_malignant_as_positive():
    data = load(DataConfig(), seed=0)
    assert [c.name for c in data.clients] == [f"hospital_{i}" for i in range(1, 6)]
    assert sum(len(c) for c in data.clients) == 569
    assert sum(int(c.labels.sum()) for c in data.clients) == 212  # malignant
    assert len(data.feature_names) == 30
    assert data.feature_names[0] == "mean_radius"
    assert all(" " not in n for n in data.feature_names)
    assert data.categorical_columns == []
    assert data.dropped_rows == {f"hospital_{i}": 0 for i in range(1, 6)}
    for c in data.clients:
        assert list(c.features.columns) == data.feature_names
        assert len(c) >= 10
        assert c.labels.dtype == np.int64
        assert all(c.features.dtypes == np.float64)
    # Every row appears exactly once: compare the multiset of rows with the source table.
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    together = np.vstack([c.features.to_numpy() for c in data.clients])
    assert np.array_equal(np.unique(together, axis=0), np.unique(bunch.data, axis=0))
    assert len(np.unique(together, axis=0)) == 569
    # malignant rows (sklearn target 0) are labelled 1: the row with the largest
    # 'mean area' (2501, malignant in the source) must carry label 1.
    for c in data.clients:
        big = c.features["mean_area"].to_numpy() == bunch.data[:, 3].max()
        assert np.all(c.labels[big] == 1)


def test_breast_cancer_is_seeded():
    def prints(seed):
        return [c.fingerprint() for c in load(DataConfig(), seed=seed).clients]

    assert prints(3) == prints(3)
    assert prints(3) != prints(4)


def test_breast_cancer_small_alpha_skews_labels_large_alpha_does_not():
    def spread(alpha, sigma):
        data = load(DataConfig(n_clients=5, alpha=alpha, quantity_sigma=sigma), seed=1)
        prevalence = [c.labels.mean() for c in data.clients]
        return max(prevalence) - min(prevalence)

    assert spread(0.1, 0.5) > 0.5
    assert spread(1000.0, 0.0) < 0.15


def test_breast_cancer_quantity_skew_makes_unequal_sizes():
    equal = [len(c) for c in load(DataConfig(alpha=1000.0, quantity_sigma=0.0), seed=1).clients]
    skewed = [len(c) for c in load(DataConfig(alpha=1000.0, quantity_sigma=1.0), seed=1).clients]
    assert max(equal) - min(equal) <= 10
    assert max(skewed) / min(skewed) > 2


def test_breast_cancer_infeasible_split_names_the_config_keys():
    with pytest.raises(UserError, match=r"data\.n_clients = 57 is too many"):
        load(DataConfig(n_clients=57), seed=0)
    # quantity skew so strong that one hospital's share is below 10 rows
    with pytest.raises(UserError, match=r"data\.alpha = 1000 with data\.n_clients = 5"):
        load(DataConfig(alpha=1000.0, quantity_sigma=1.0), seed=2)


# --------------------------------------------------------------------------- csv


def _write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def _hospital_rows(n: int, offset: int = 0, extra: str = "") -> str:
    lines = []
    for i in range(n):
        lines.append(f"{40 + i + offset},{200 + i},{i % 4 + 1},{i % 2}{extra}")
    return "\n".join(lines)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "sites"
    d.mkdir()
    _write(d / "b_north.csv", "age,chol,cp,dx\n" + _hospital_rows(12))
    # a_south: one missing label (NA), one empty label, one chol 0 and one '?' chol
    rows = _hospital_rows(10, offset=100).splitlines()
    rows += ["61,0,4,1", "62,?,4,0", "63,210,2,NA", "64,220,1,"]
    _write(d / "a_south.csv", "age,chol,cp,dx\n" + "\n".join(rows))
    (d / "notes.txt").write_text("not a csv")
    return d


def csv_cfg(path, **kw) -> DataConfig:
    base = dict(source="csv", path=str(path), label_column="dx")
    base.update(kw)
    return DataConfig(**base)


def test_csv_folder_round_trip(folder):
    data = load(csv_cfg(folder, zero_means_missing=["chol"], categorical_columns=["cp"]), seed=0)
    assert [c.name for c in data.clients] == ["a_south", "b_north"]
    assert data.feature_names == ["age", "chol", "cp"]
    assert data.categorical_columns == ["cp"]
    assert data.dropped_rows == {"a_south": 2, "b_north": 0}
    south, north = data.clients
    assert len(south) == 12 and len(north) == 12
    assert south.features["age"].tolist()[:2] == [140.0, 141.0]
    assert np.isnan(south.features["chol"].iloc[-1]) and np.isnan(south.features["chol"].iloc[-2])
    assert south.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0]
    assert north.labels.dtype == np.int64 and north.labels.sum() == 6
    assert all(north.features.dtypes == np.float64)
    assert "csv: 2 hospitals" in data.source_description


def test_csv_zero_is_a_value_unless_listed(folder):
    data = load(csv_cfg(folder), seed=0)
    assert data.clients[0].features["chol"].iloc[-2] == 0.0


def test_csv_feature_columns_select_and_order(folder):
    data = load(csv_cfg(folder, feature_columns=["cp", "age"]), seed=0)
    assert data.feature_names == ["cp", "age"]
    assert list(data.clients[1].features.columns) == ["cp", "age"]


def test_csv_single_file_round_trip(tmp_path):
    lines = ["site,age,chol,dx"]
    for i in range(11):
        lines.append(f"st_paul,{50 + i},{180 + i},{'yes' if i % 3 == 0 else 'no'}")
    for i in range(10):
        lines.append(f"general,{30 + i},,{'yes' if i < 2 else 'no'}")
    lines.append("general,99,300,")
    f = _write(tmp_path / "all.csv", "\n".join(lines))
    data = load(csv_cfg(f, site_column="site", positive_label="yes"), seed=0)
    assert [c.name for c in data.clients] == ["general", "st_paul"]
    assert data.feature_names == ["age", "chol"]
    general, st_paul = data.clients
    assert len(general) == 10 and len(st_paul) == 11
    assert data.dropped_rows == {"general": 1, "st_paul": 0}
    assert general.features["chol"].isna().all()  # entirely missing at one site: allowed
    assert general.labels.tolist() == [1, 1] + [0] * 8
    assert st_paul.labels.tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert st_paul.features["age"].tolist() == [float(50 + i) for i in range(11)]


def test_csv_site_without_positive_cases_is_allowed(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    _write(d / "x.csv", "age,dx\n" + "\n".join(f"{i},0" for i in range(10)))
    _write(d / "y.csv", "age,dx\n" + "\n".join(f"{i},{i % 2}" for i in range(10)))
    data = load(csv_cfg(d), seed=0)
    assert [int(c.labels.sum()) for c in data.clients] == [0, 5]


def test_csv_missing_label_column_config(folder):
    with pytest.raises(UserError, match=r"^data\.label_column is empty; name the label column of your CSV files$"):
        load(DataConfig(source="csv", path=str(folder)), seed=0)


@pytest.mark.parametrize("path", ["", "does/not/exist"])
def test_csv_bad_path(path):
    with pytest.raises(UserError, match=r"data\.path"):
        load(csv_cfg(path), seed=0)


def test_csv_file_missing_a_feature_column(folder):
    _write(folder / "c_east.csv", "age,cp,dx\n" + "\n".join(f"{i},1,{i % 2}" for i in range(12)))
    with pytest.raises(UserError, match=r"c_east\.csv.*'chol'"):
        load(csv_cfg(folder), seed=0)


def test_csv_file_with_an_extra_column(folder):
    _write(folder / "c_east.csv", "age,chol,cp,bmi,dx\n" + "\n".join(f"{i},1,1,20,{i % 2}" for i in range(12)))
    with pytest.raises(UserError, match=r"c_east\.csv.*'bmi'"):
        load(csv_cfg(folder), seed=0)
    # listing the shared columns makes the extra one harmless
    data = load(csv_cfg(folder, feature_columns=["age", "chol", "cp"]), seed=0)
    assert len(data.clients) == 3


def test_csv_file_missing_the_label_column(folder):
    _write(folder / "c_east.csv", "age,chol,cp\n" + "\n".join(f"{i},1,1" for i in range(12)))
    with pytest.raises(UserError, match=r"c_east\.csv.*'dx'"):
        load(csv_cfg(folder), seed=0)


def test_csv_non_numeric_feature(folder):
    _write(folder / "c_east.csv", "age,chol,cp,dx\n" + _hospital_rows(11) + "\n44,high,1,0")
    with pytest.raises(UserError, match=r"c_east\.csv.*'chol'.*row 12"):
        load(csv_cfg(folder), seed=0)


def test_csv_site_too_small(folder):
    with pytest.raises(UserError, match=r"a_south\.csv.*12 rows.*data\.min_rows_per_site = 13"):
        load(csv_cfg(folder, min_rows_per_site=13), seed=0)


def test_csv_folder_with_one_csv(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    _write(d / "only.csv", "age,chol,cp,dx\n" + _hospital_rows(12))
    with pytest.raises(UserError, match=r"data\.path = .*holds 1 CSV file"):
        load(csv_cfg(d), seed=0)


def test_csv_single_file_needs_site_column_and_two_sites(tmp_path):
    f = _write(tmp_path / "all.csv", "site,age,dx\n" + "\n".join(f"one,{i},{i % 2}" for i in range(12)))
    with pytest.raises(UserError, match=r"data\.site_column is empty"):
        load(csv_cfg(f), seed=0)
    with pytest.raises(UserError, match=r"all\.csv.*'site'.*1 hospital"):
        load(csv_cfg(f, site_column="site"), seed=0)
    with pytest.raises(UserError, match=r"all\.csv.*'hospital'"):
        load(csv_cfg(f, site_column="hospital"), seed=0)


def test_csv_single_file_row_without_site(tmp_path):
    rows = [f"{'a' if i % 2 else 'b'},{i},{i % 2}" for i in range(24)] + [",5,1"]
    f = _write(tmp_path / "all.csv", "site,age,dx\n" + "\n".join(rows))
    with pytest.raises(UserError, match=r"all\.csv.*1 rows.*'site'.*row 25"):
        load(csv_cfg(f, site_column="site"), seed=0)


def test_csv_positive_label_never_seen(folder):
    with pytest.raises(UserError, match=r"positive_label = 'yes'.*'dx'"):
        load(csv_cfg(folder, positive_label="yes"), seed=0)


def test_csv_negative_label_makes_every_other_value_disease(tmp_path):
    # UCI heart disease: num 0 = healthy, 1-4 = disease grades.
    for site, nums in {"a": [0, 1, 2, 3, 4, 0] * 2, "b": [0, 0, 4, 2, 0, 1] * 2}.items():
        body = "\n".join(f"{50 + i},{n}" for i, n in enumerate(nums))
        _write(tmp_path / f"{site}.csv", "age,num\n" + body)
    data = load(DataConfig(source="csv", path=str(tmp_path), label_column="num", negative_label="0"), seed=0)
    assert [list(c.labels) for c in data.clients] == [[0, 1, 1, 1, 1, 0] * 2, [0, 0, 1, 1, 0, 1] * 2]
    with pytest.raises(UserError, match=r"negative_label = '7'"):
        load(DataConfig(source="csv", path=str(tmp_path), label_column="num", negative_label="7"), seed=0)


def test_csv_column_lists_must_name_features(folder):
    with pytest.raises(UserError, match=r"data\.categorical_columns names 'thal'"):
        load(csv_cfg(folder, categorical_columns=["thal"]), seed=0)
    with pytest.raises(UserError, match=r"data\.zero_means_missing names 'dx'"):
        load(csv_cfg(folder, zero_means_missing=["dx"]), seed=0)
    with pytest.raises(UserError, match=r"data\.feature_columns includes the label column 'dx'"):
        load(csv_cfg(folder, feature_columns=["age", "dx"]), seed=0)


def test_csv_column_missing_at_every_site(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for name in ("x", "y"):
        _write(d / f"{name}.csv", "age,ldl,dx\n" + "\n".join(f"{i},NA,{i % 2}" for i in range(10)))
    with pytest.raises(UserError, match=r"'ldl' has no value at any site"):
        load(csv_cfg(d), seed=0)
