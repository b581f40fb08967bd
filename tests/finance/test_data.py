"""Tests for finance.data: the German credit split, CSV loading and its error messages."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from finance.alignment import align, aligned
from finance.data import (
    LENDER_COLUMNS,
    PARTNER_COLUMNS,
    DataConfig,
    german_credit_frame,
    load,
)
from shared.errors import UserError
from tests.finance.party_csvs import LENDER_CSV, PARTNER_CSV, csv_config
from shared.psi import normalize_id


@pytest.fixture(scope="module")
def german():
    data = load(DataConfig(), seed=0)
    return data, align(data)


def _cell(value):
    try:
        return float(value)
    except ValueError:
        return str(value)


def _rows(frame, columns):
    """The multiset of rows (numbers compared as floats, whatever their dtype)."""
    return Counter(tuple(_cell(v) for v in row) for row in frame[columns].to_numpy().tolist())


# --------------------------------------------------------------------------- german_credit


def test_german_split_has_the_anchor_columns_and_1000_customers_per_party(german):
    data, _ = german
    assert data.lender.columns == LENDER_COLUMNS and data.partner.columns == PARTNER_COLUMNS
    assert "duration_in_month" in LENDER_COLUMNS and "status_of_existing_checking_account" in PARTNER_COLUMNS
    assert len(LENDER_COLUMNS) == len(PARTNER_COLUMNS) == 10
    assert not set(LENDER_COLUMNS) & set(PARTNER_COLUMNS)
    assert len(data.lender) == len(data.partner) == 1000
    assert data.partner.labels is None
    assert int(data.lender.labels.sum()) == 300  # creditability "bad" -> 1
    assert set(data.lender.categorical) == {
        "purpose", "present_employment_since", "personal_status_and_sex", "job", "foreign_worker"
    }
    assert data.lender.features["credit_amount"].dtype == np.float64
    # Every customer of the source is at both parties (as the lender's and the partner's copy).
    source = german_credit_frame()
    source["label"] = (source["creditability"] == "bad").astype(int)
    lender = data.lender.features.assign(label=data.lender.labels)
    assert _rows(lender, LENDER_COLUMNS + ["label"]) == _rows(source, LENDER_COLUMNS + ["label"])
    assert _rows(data.partner.features, PARTNER_COLUMNS) == _rows(source, PARTNER_COLUMNS)


def test_german_overlap_is_80_percent_and_aligned_rows_are_the_same_customers(german):
    data, alignment = german
    assert alignment.match_count == 800
    assert alignment.match_rate("lender") == alignment.match_rate("partner") == 0.8
    assert alignment.describe()["bytes_exchanged"] == 32 + 64 * 2000
    lender, partner = aligned(data, alignment)
    # Spelled differently, equal after the documented normalization.
    assert lender.ids[0].startswith("c-") and partner.ids[0].startswith(" C-")
    assert all(normalize_id(a) == normalize_id(b) for a, b in zip(lender.ids, partner.ids))
    assert not set(lender.ids) & set(partner.ids)
    # The joined aligned rows are rows of the source table (same customer at both parties).
    source = german_credit_frame()
    source["label"] = (source["creditability"] == "bad").astype(int)
    joined = lender.features.join(partner.features).assign(label=lender.labels)
    columns = LENDER_COLUMNS + PARTNER_COLUMNS + ["label"]
    assert not _rows(joined, columns) - _rows(source, columns)


def test_german_overlap_is_configurable_and_seeded():
    data = load(DataConfig(overlap=0.5), seed=3)
    assert align(data).match_count == 500
    same = load(DataConfig(overlap=0.5), seed=3)
    other = load(DataConfig(overlap=0.5), seed=4)
    assert same.lender.fingerprint() == data.lender.fingerprint()
    assert same.partner.fingerprint() == data.partner.fingerprint()
    assert other.lender.fingerprint() != data.lender.fingerprint()
    # Row orders are shuffled independently per party.
    assert not np.array_equal(data.lender.ids, [i.strip().lower() for i in data.partner.ids])


# --------------------------------------------------------------------------- csv


def test_csv_loads_both_parties_infers_categoricals_and_aligns(tmp_path):
    data = load(csv_config(tmp_path), seed=0)
    assert data.lender.columns == ["age", "region"] and data.partner.columns == ["balance", "score"]
    assert data.lender.categorical == ["region"] and data.partner.categorical == []
    assert data.lender.labels.tolist() == [0, 1, 0, 1, 0]
    assert np.isnan(data.partner.features["balance"][2])
    alignment = align(data)
    assert alignment.match_count == 4  # A1, A2 (" a2 "), A3, A5
    lender, partner = aligned(data, alignment)
    assert lender.ids.tolist() == ["A1", "A2", "A3", "A5"]
    assert partner.ids.tolist() == ["A1", " a2 ", "A3", "A5"]
    assert partner.features["balance"].tolist()[:2] == [20.0, 100.5]


def test_csv_configured_columns_and_text_labels(tmp_path):
    lender = "id,age,region,status\nA1,30,north,good\nA2,45,south,bad\nA3,28,north,good\n"
    cfg = csv_config(tmp_path, lender, label_column="status", positive_label="bad", lender_columns="age",
               categorical_columns="score")
    data = load(cfg, seed=0)
    assert data.lender.columns == ["age"] and data.lender.labels.tolist() == [0, 1, 0]
    assert data.partner.categorical == ["score"] and data.partner.features["score"][0] == "7"


@pytest.mark.parametrize(
    "lender, partner, kw, expected",
    [
        # missing ID column: names the file and the column, lists the file's columns
        (LENDER_CSV, PARTNER_CSV.replace("id,", "customer,"), {},
         r"partner\.csv: the customer-ID column 'id' \(data\.id_column\) is missing; the file has columns customer, balance, score"),
        (LENDER_CSV, PARTNER_CSV, {"id_column": "cust"}, r"lender\.csv: the customer-ID column 'cust'"),
        # no label column at the lender
        (LENDER_CSV.replace("default", "dflt"), PARTNER_CSV, {},
         r"lender\.csv: the lender's label column 'default' \(data\.label_column\) is missing; the file has columns id, age, region, dflt"),
        (LENDER_CSV, PARTNER_CSV, {"label_column": ""}, r"data\.label_column is empty"),
        # label not binary
        (LENDER_CSV.replace("east,1", "east,2"), PARTNER_CSV, {},
         r"lender\.csv: label column 'default' is not binary: it has 3 distinct values"),
        (LENDER_CSV.replace(",1\n", ",0\n"), PARTNER_CSV, {}, r"lender\.csv: label column 'default' has only the value"),
        (LENDER_CSV.replace(",1\n", ",bad\n").replace(",0\n", ",good\n"), PARTNER_CSV, {},
         r"data\.positive_label is empty but label column 'default' in .*lender\.csv has values"),
        (LENDER_CSV, PARTNER_CSV, {"positive_label": "yes"}, r"lender\.csv: label column 'default' has no value equal to"),
        # columns
        (LENDER_CSV, PARTNER_CSV, {"partner_columns": "balance,income"},
         r"partner\.csv: column 'income' \(listed in data\.partner_columns\) is missing"),
        (LENDER_CSV, PARTNER_CSV, {"lender_columns": "age,default"}, r"data\.lender_columns includes the label column"),
        (LENDER_CSV, PARTNER_CSV, {"categorical_columns": "region,colour"}, r"data\.categorical_columns names 'colour', which is no party's"),
        (LENDER_CSV, PARTNER_CSV, {"categorical_columns": "region", "lender_columns": "age,age"},
         r"data\.lender_columns lists 'age' twice"),
        (LENDER_CSV, PARTNER_CSV.replace("100.5", "lots"), {"categorical_columns": "region"},
         r"partner\.csv: column 'balance' is not numeric \(row 1 has 'lots'\)"),
    ],
)
def test_csv_mistakes_are_one_line_user_errors_naming_the_input(tmp_path, lender, partner, kw, expected):
    with pytest.raises(UserError, match=expected) as info:
        load(csv_config(tmp_path, lender, partner, **kw), seed=0)
    assert "\n" not in str(info.value)



def test_csv_missing_file_and_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: file not found"):
        load(DataConfig(source="csv", lender_csv=str(tmp_path / "nope.csv"), partner_csv="x.csv", label_column="y"), 0)
    with pytest.raises(UserError, match=r"party 'partner': data\.parties\.partner\.csv is empty"):
        load(csv_config(tmp_path, partner_csv="", parties={"partner": {}}), 0)
    with pytest.raises(UserError, match=r"needs at least one partner: \[data\.parties\.partner\]"):
        load(csv_config(tmp_path, partner_csv=""), 0)
