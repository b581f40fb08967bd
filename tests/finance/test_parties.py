"""Column names are private to their party: FATE's hetero CSVs as shipped (the same names at
both parties), columns and categoricals configured per party and checked there. (Nothing the
lender writes names a partner's columns: test_partners.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from finance.alignment import align, aligned
from finance.data import DataConfig, load
from shared.errors import UserError
from tests.cli import tff_apps_in_process
from tests.finance.party_csvs import fate_csvs

QUICK = [  # a few epochs: these tests are about columns, not accuracy
    "--set", "train.rounds=4", "--set", "train.batch_size=32", "--set", "train.eval_every=4",
    "--set", "evaluate.local_baseline=false",
]


def test_fate_hetero_csvs_run_as_shipped_with_the_same_column_names(tmp_path: Path):
    guest, host = fate_csvs(tmp_path)
    data = load(DataConfig(source="csv", lender_csv=str(guest), partner_csv=str(host), label_column="y"), seed=0)
    assert data.lender.columns == [f"x{i}" for i in range(13)] and data.partner.columns == [f"x{i}" for i in range(10)]
    lender, partner = aligned(data, align(data))
    assert len(lender) == 240
    # x0 is two different columns: each party's own values for the same customers
    assert not np.allclose(lender.features["x0"], partner.features["x0"])
    result = tff_apps_in_process(
        "run", "finance", *QUICK, "--set", "data.source=csv", "--set", f'data.lender_csv="{guest}"',
        "--set", f'data.partner_csv="{host}"', "--set", "data.label_column=y",
        "--set", f'job.runs_dir="{tmp_path / "runs"}"', "--run-id", "fate", "--set", "export.enabled=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "finance" / "fate" / "summary.json").read_text())
    vertical, joined = summary["results"]["vertical"], summary["results"]["centralized"]
    assert vertical["auc"] > 0.8 and abs(vertical["auc"] - joined["auc"]) < 0.02
    assert summary["data"]["parties"]["partner"] == {"customers": 300, "n_columns": 10}


def job_file(tmp_path: Path, guest: Path, host: Path, partner_table: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f'[data]\nsource = "csv"\nlabel_column = "y"\n'
        f'[data.parties.lender]\ncsv = "{guest}"\ncolumns = ["x0", "x1", "x2", "x3", "x4"]\n'
        f'[data.parties.partner]\ncsv = "{host}"\n{partner_table}\n'
    )
    return path


@pytest.mark.parametrize(
    "partner_table, expected",
    [
        ('columns = ["x0", "x42"]',
         r"^party 'partner': .*host\.csv: column 'x42' \(listed in data\.parties\.partner\.columns\) is missing; "
         r"the file has columns id, x0, x1"),
        ('columns = ["x0", "x1"]\ncategorical = ["x5"]',
         r"^party 'partner': data\.parties\.partner\.categorical names 'x5', which is not one of the partner's "
         r"feature columns \(x0, x1\)$"),
        ('categorical = ["x3", "x3"]', r"^data\.parties\.partner\.categorical lists 'x3' twice"),
        ('colums = ["x0"]', r"^data\.parties\.partner: unknown key 'colums'; a party takes csv, columns, categorical$"),
        ('columns = "x0"', r"^data\.parties\.partner\.columns must be a list of column names"),
        ('columns = ["id"]', r"^party 'partner': data\.parties\.partner\.columns includes the ID column 'id'"),
    ],
)
def test_a_partys_column_mistake_is_one_line_naming_party_and_column_and_writes_nothing(
    tmp_path: Path, partner_table: str, expected: str
):
    (tmp_path / "data").mkdir()
    guest, host = fate_csvs(tmp_path / "data", customers=40, shared=30)
    job = job_file(tmp_path, guest, host, partner_table)
    runs = tmp_path / "runs"
    result = tff_apps_in_process("run", "finance", "--config", str(job), "--set", f'job.runs_dir="{runs}"')
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert re.search(expected, line.removeprefix("error: ")), line
    assert not runs.exists()


def test_more_party_config_mistakes(tmp_path: Path):
    guest, host = fate_csvs(tmp_path, customers=40, shared=30)
    base = dict(source="csv", label_column="y")
    with pytest.raises(UserError, match=r"^data\.parties\.Bureau 1: a party name is lowercase letters"):
        load(DataConfig(**base, lender_csv=str(guest), parties={"Bureau 1": {"csv": str(host)}}), 0)
    with pytest.raises(UserError, match=r"^data\.parties\.partner\.csv and the shorthand key for the partner are both set"):
        load(DataConfig(**base, lender_csv=str(guest), partner_csv=str(host), parties={"partner": {"csv": str(host)}}), 0)
    with pytest.raises(UserError, match=r"needs the lender's table: \[data\.parties\.lender\]"):
        load(DataConfig(**base, parties={"partner": {"csv": str(host)}}), 0)
    with pytest.raises(UserError, match=r"^data\.parties is for data\.source = 'csv'"):
        load(DataConfig(parties={"partner": {"csv": str(host)}}), 0)
