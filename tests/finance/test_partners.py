"""A lender with two partners: PSI aligns the customers all three hold, the logit is the sum of
three partial scores through the secure sum, each partner's columns (configured at that
partner) stay at that partner: nothing the lender writes names them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from finance.alignment import align, aligned
from finance.data import DataConfig, load
from shared.psi import normalize_id
from tests.cli import tff_apps_in_process
from tests.finance.party_csvs import fate_csvs

BUREAU = ["bureau_score", "bureau_band", "open_loans", "utilisation", "x0"]  # partner-only names, and one shared


def test_psi_aligns_the_customers_every_party_holds(tmp_path: Path):
    guest, host, host2 = fate_csvs(tmp_path, customers=120, shared=100, hosts=(None, None))
    frame = pd.read_csv(host2)
    common = set(pd.read_csv(guest)["id"]) & set(pd.read_csv(host)["id"])
    dropped = sorted(set(frame["id"]) & common)[:15]  # 15 customers the lender and partner share, not partner2
    frame[~frame["id"].isin(dropped)].to_csv(host2, index=False)
    cfg = DataConfig(
        source="csv", label_column="y", lender_csv=str(guest), partner_csv=str(host), parties={"partner2": {"csv": str(host2)}}
    )
    data = load(cfg, seed=0)
    assert data.names == ["lender", "partner", "partner2"]
    alignment = align(data)
    assert alignment.pairwise == {"partner": 100, "partner2": 85}
    assert alignment.match_count == 85 and alignment.match_rate("partner2") == pytest.approx(85 / 105)
    parties = aligned(data, alignment)
    keys = [[normalize_id(i) for i in party.ids] for party in parties]
    assert keys[0] == keys[1] == keys[2] == sorted(keys[0])  # the same customers, one common order
    assert not {normalize_id(i) for i in dropped} & set(keys[0])
    # two pairwise PSIs plus the lender's one bit per pairwise-shared customer to each partner
    assert alignment.bytes_exchanged == 2 * 32 + 64 * (120 + 120) + 64 * (120 + 105) + (100 + 7) // 8 + (85 + 7) // 8


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> SimpleNamespace:
    """guest (lender) and host (partner) as FATE ships them, and a bureau whose columns and
    categorical column are configured at the bureau."""
    folder = tmp_path_factory.mktemp("three")
    guest, host, bureau = fate_csvs(folder, hosts=(None, BUREAU))
    frame = pd.read_csv(bureau)
    frame["bureau_band"] = ["AB"[v > 0] for v in frame["bureau_band"]]  # text: categorical at the bureau
    frame.to_csv(bureau, index=False)
    job = folder / "job.toml"
    job.write_text(
        f'[data]\nsource = "csv"\nlabel_column = "y"\n[data.parties.lender]\ncsv = "{guest}"\n'
        f'[data.parties.partner]\ncsv = "{host}"\n'
        f'[data.parties.bureau]\ncsv = "{bureau}"\ncolumns = {json.dumps(BUREAU)}\ncategorical = ["bureau_band"]\n'
    )
    result = tff_apps_in_process(
        "run", "finance", "--config", str(job), "--set", "train.rounds=4", "--set", "train.batch_size=32",
        "--set", "train.eval_every=4", "--set", f'job.runs_dir="{folder}"', "--run-id", "three",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(run=folder / "finance" / "three", files={"lender": guest, "partner": host, "bureau": bureau})


def test_a_lender_and_two_partners_train_one_split_model(three):
    summary = json.loads((three.run / "summary.json").read_text())
    assert list(summary["data"]["parties"]) == ["lender", "partner", "bureau"]
    assert summary["data"]["parties"]["bureau"] == {"customers": 300, "n_columns": 5}
    assert summary["data"]["alignment"]["match_count"] == 240
    results = summary["results"]
    vertical, joined, alone = (results[m]["auc"] for m in ("vertical", "centralized", "lender_alone"))
    assert abs(vertical - joined) <= 0.01 and vertical >= alone + 0.05
    # three partial scores (int64) go up per customer and batch, the gradient down to all three parties
    per_epoch, train = summary["bytes_per_epoch"], summary["data"]["train_customers"]
    assert per_epoch["partial_scores_up"] == 3 * train * 8 and per_epoch["gradient_down"] == 3 * train * 4


def test_each_party_exports_its_own_columns_and_the_lender_names_no_partners(three):
    cards = {
        party: json.loads((three.run / "export" / f"finance_{party}" / "1" / "model_card.json").read_text())
        for party in ("lender", "partner", "bureau")
    }
    assert cards["bureau"]["encoder"]["columns"] == BUREAU
    assert cards["bureau"]["encoder"]["vocabulary"] == {"bureau_band": ["A", "B"]}
    assert cards["partner"]["encoder"]["columns"] == [f"x{i}" for i in range(10)]  # FATE's names, as the lender's
    assert cards["lender"]["encoder"]["columns"] == [f"x{i}" for i in range(13)]
    assert cards["partner"]["config"]["data"]["parties"]["bureau"] == {"csv": str(three.files["bureau"])}
    lenders_side = ["summary.json", "report.md", "report.html", "metrics.jsonl", "export/model_card.json",
                    "export/finance_lender/1/model_card.json"]
    for name in lenders_side:
        text = (three.run / name).read_text()
        assert not [c for c in BUREAU[:4] if c in text], name
    summary = json.loads((three.run / "summary.json").read_text())
    assert summary["config"]["data"]["parties"]["bureau"] == {"csv": str(three.files["bureau"])}


def test_score_runs_through_all_three_parties(three, tmp_path: Path):
    inputs = [arg for party, path in three.files.items() for arg in ("--input", f"{party}={path}")]
    output = tmp_path / "scores.csv"
    result = tff_apps_in_process("score", str(three.run / "export"), *inputs, "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    scores = pd.read_csv(output)
    assert len(scores) == 240 and scores["probability"].between(0, 1).all() and scores["probability"].std() > 0.05
    missing = tff_apps_in_process("score", str(three.run / "export"), *inputs[:4], "--output", str(tmp_path / "x.csv"))
    assert missing.returncode == 2 and "missing bureau" in missing.stderr
