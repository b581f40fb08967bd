"""Tests for finance.alignment: PSI alignment, its one-line errors naming the files, the held-out split."""

from __future__ import annotations


import numpy as np
import pytest

from finance.alignment import align, aligned, split_aligned
from finance.data import DataConfig, load
from shared.errors import UserError
from tests.finance.party_csvs import LENDER_CSV, PARTNER_CSV, csv_config


@pytest.fixture(scope="module")
def german():
    data = load(DataConfig(), seed=0)
    return data, align(data)


def test_split_aligned_is_stratified_seeded_and_disjoint(german):
    data, alignment = german
    labels = aligned(data, alignment)[0].labels
    train, test = split_aligned(labels, 0.3, seed=0)
    assert len(train) + len(test) == 800 and not set(train) & set(test)
    assert abs(labels[test].mean() - labels.mean()) < 0.01
    assert np.array_equal(split_aligned(labels, 0.3, seed=0)[1], test)
    with pytest.raises(UserError, match="at least 2 of each"):
        split_aligned(np.array([0, 0, 0, 1]), 0.3, seed=0)


# --------------------------------------------------------------------------- csv


def test_csv_duplicate_ids_name_the_file_and_party(tmp_path):
    data = load(csv_config(tmp_path, partner=PARTNER_CSV.replace("Z9", "a1")), seed=0)
    with pytest.raises(UserError, match=r"partner\.csv: PSI: the partner's customer ID 'a1' appears at rows 1, 3"):
        align(data)
    data = load(csv_config(tmp_path, lender=LENDER_CSV.replace("A4", "A3 ")), seed=0)
    with pytest.raises(UserError, match=r"lender\.csv: PSI: the lender's customer ID 'a3' appears"):
        align(data)


def test_csv_empty_intersection_names_both_files(tmp_path):
    partner = "id,balance,score\nB1,1,2\nB2,3,4\n"
    data = load(csv_config(tmp_path, partner=partner), seed=0)
    with pytest.raises(UserError, match=r"lender\.csv and .*partner\.csv: PSI: the lender and the partner share no customer ID"):
        align(data)
