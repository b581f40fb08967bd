"""The finance job end to end through `tff-apps`, as a user runs it: train, export, score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finance.data import DataConfig, load
from tests.cli import run_app, tff_apps_in_process
from tests.report_page import checked_report_page

SEED_JOB = ["--set", "job.seed=0"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The default job (the issue's figures are measured on it), in its own folder."""
    return run_app(tmp_path_factory.mktemp("runs"), "finance", "f1", *SEED_JOB)


def test_vertical_matches_centralized_and_beats_the_lender_alone(default_run: Path):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    results = summary["results"]
    assert set(results) == {"vertical", "centralized", "lender_alone"}
    vertical, central, alone = (results[m] for m in ("vertical", "centralized", "lender_alone"))
    assert abs(vertical["auc"] - central["auc"]) <= 0.01
    assert vertical["auc"] >= alone["auc"] + 0.05
    for report in results.values():
        assert 0.0 < report["ks"] < 1.0
        assert report["gini"] == pytest.approx(2 * report["auc"] - 1, abs=1e-9)
    psi = summary["data"]["alignment"]
    assert psi["match_count"] == 800 and psi["match_rate"] == pytest.approx({"lender": 0.8, "partner": 0.8})
    assert summary["data"]["train_customers"] + summary["data"]["test_customers"] == 800
    assert summary["bytes_per_epoch"]["total"] > 0
    epochs = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, summary["epochs"] + 1))
    assert epochs[-1]["auc"] == pytest.approx(vertical["auc"], abs=1e-6)
    page, sources = checked_report_page(default_run, "vertical")
    assert sources == ["plots/metric_per_round.png", "plots/roc_curves.png"]
    assert "customers every party holds (PSI)" in page


def test_each_party_exports_its_own_model(default_run: Path):
    export = default_run / "export"
    card = json.loads((export / "model_card.json").read_text())
    assert card["app"] == "finance" and card["parties"] == ["lender", "partner"]
    for party in ("lender", "partner"):  # one TF Serving servable per party: export/finance_<party>/1
        party_card = json.loads((export / f"finance_{party}" / "1" / "model_card.json").read_text())
        assert party_card["party"] == party
        assert (export / f"finance_{party}" / "1" / "saved_model.pb").is_file()
    lender_inputs = json.loads((export / "finance_lender" / "1" / "model_card.json").read_text())["inputs"]
    partner_inputs = json.loads((export / "finance_partner" / "1" / "model_card.json").read_text())["inputs"]
    assert not set(lender_inputs) & set(partner_inputs)  # a party's model reads only its columns


def party_csvs(folder: Path, n: int = 1000) -> tuple[Path, Path]:
    """The first `n` customers of each party (in its own shuffled order), as it hands them in."""
    data = load(DataConfig(), seed=0)
    paths = []
    for party in (data.lender, data.partner):
        frame = party.features.iloc[:n].copy()
        frame.insert(0, "id", party.ids[:n])
        path = folder / f"{party.name}.csv"
        frame.to_csv(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


def test_score_command_does_vertical_inference(default_run: Path, tmp_path: Path):
    lender_csv, partner_csv = party_csvs(tmp_path)
    output = tmp_path / "scores.csv"
    result = tff_apps_in_process(
        "score", str(default_run / "export"), "--input", f"lender={lender_csv}",
        "--input", f"partner={partner_csv}", "--output", str(output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = pd.read_csv(output)
    lender_ids = pd.read_csv(lender_csv)["id"].str.strip().str.casefold()
    partner_ids = pd.read_csv(partner_csv)["id"].str.strip().str.casefold()
    assert set(scores["id"].str.strip().str.casefold()) == set(lender_ids) & set(partner_ids)
    assert len(scores) == 800 and scores["probability"].between(0, 1).all()
    assert scores["probability"].std() > 0.01  # real scores, not a constant
    # A party's servable version folder names the same export (tff_apps.predict.resolve_export).
    again = tff_apps_in_process(
        "score", str(default_run / "export" / "finance_lender" / "1"), "--input", f"lender={lender_csv}",
        "--input", f"partner={partner_csv}", "--output", str(tmp_path / "again.csv"),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again.csv"), scores)


def test_score_refuses_a_missing_party(default_run: Path, tmp_path: Path):
    lender_csv, _ = party_csvs(tmp_path, n=20)
    output = tmp_path / "scores.csv"
    result = tff_apps_in_process("score", str(default_run / "export"), "--input", f"lender={lender_csv}", "--output", str(output))
    assert result.returncode == 2
    assert "partner" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not output.exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("privacy.level=\"client\"", "model.label_noise_multiplier"),
        ("data.source=\"csv\"", "lender_csv"),
        ("job.init_from=latest", "not supported for finance"),
    ],
)
def test_user_mistakes_exit_2_and_leave_nothing(tmp_path: Path, override: str, expected: str):
    result = tff_apps_in_process("run", "finance", "--set", override, "--set", f'job.runs_dir="{tmp_path}"')
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_label_noise_reports_an_accounted_epsilon(tmp_path: Path):
    from tff_apps.program.vertical_rounds import label_dp_epsilon

    result = tff_apps_in_process(
        "run", "finance", "--set", "model.label_noise_multiplier=2.0", "--set", "train.rounds=4",
        "--set", "evaluate.centralized_baseline=false", "--set", "export.enabled=false",
        "--set", f'job.runs_dir="{tmp_path}"', "--run-id", "noisy",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "finance" / "noisy" / "summary.json").read_text())
    label_dp = summary["privacy"]["label_dp"]
    assert label_dp["epochs"] == 4 and label_dp["noise_multiplier"] == 2.0
    assert label_dp["epsilon"] == pytest.approx(label_dp_epsilon(2.0, 4, 1e-5, "rdp"), rel=1e-9)
    assert np.isfinite(summary["results"]["vertical"]["auc"])
