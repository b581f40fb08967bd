"""The healthcare job end to end through the `tff-apps` command, as a user runs it.

Each command runs in its own session (process group), so the tests can check that no
process of ours outlives the command: TFF's worker binary leaks unless we stop it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from shared.metrics import roc_auc
from tests.cli import run_app, tff_apps, tff_apps_in_process
from tests.report_page import checked_report_page

SMALL_JOB = [
    "--set", "train.rounds=3",
    "--set", "train.eval_every=1",
    "--set", "evaluate.baseline_epochs=3",
]
FEDERATED_ONLY = [
    "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
    "--set", "export.enabled=false",
]


def processes_in_session(session_id: int) -> list[str]:
    """Command lines of live (non-zombie) processes whose session is `session_id`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            found.append(cmdline)
    return found


def raw_rows(n: int = 40) -> pd.DataFrame:
    """Raw feature rows as a hospital would send them, named as the embedded source names them."""
    data = load_breast_cancer()
    columns = [name.replace(" ", "_") for name in data.feature_names]
    frame = pd.DataFrame(data.data[:n], columns=columns)
    frame.insert(0, "patient_id", [f"p{i}" for i in range(n)])
    frame["malignant"] = 1 - data.target[:n]
    return frame


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    # One epoch of per-hospital fine-tuning after training (a few seconds): its report sections
    # are checked below; it runs after the global model is final, so nothing else changes.
    return run_app(tmp_path_factory.mktemp("runs"), "healthcare", "r1", *SMALL_JOB, "--set", "personalization.epochs=1")


def test_run_writes_summary_metrics_tensorboard_and_export(finished_run: Path):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["rounds"] == 3
    assert summary["secure_sum"] == "simulated"
    results = summary["results"]
    assert set(results) == {"federated", "centralized", "local_only"}
    for report in results.values():
        assert 0.9 < report["pooled"]["auc"] <= 1.0
        assert len(report["sites"]) == 5
    rounds = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    # Logistic regression: a float32 weight per feature and a bias down; the update and the
    # client's weight up; five hospitals a round.
    n_weights = len(summary["data"]["features"]) + 1
    assert [(r["bytes_down"], r["bytes_up"]) for r in rounds] == [(5 * 4 * n_weights, 5 * 4 * (n_weights + 1))] * 3
    assert summary["communication"] == {
        "bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds)
    }
    assert rounds[-1]["test_auc"] == pytest.approx(results["federated"]["pooled"]["auc"], abs=1e-9)
    assert list((finished_run / "tensorboard").glob("events.out.tfevents.*"))
    card = json.loads((finished_run / "export" / "healthcare" / "1" / "model_card.json").read_text())
    assert card["app"] == "healthcare" and card["privacy"]["level"] == "none" and card["rounds"] == 3
    # no DP: every release is outside ε, and the card says which and where
    released = {entry["release"]: entry for entry in card["privacy"]["released_outside_epsilon"]}
    assert set(released) == {
        "normalization", "site_counts", "profiles", "evaluation", "training_metrics", "participation", "baselines"
    }
    assert "min, max" in released["profiles"]["contains"] and "summary.json" in released["profiles"]["where"]
    assert any(path.startswith("checkpoints/") for path in card["privacy"]["operator_only"])
    assert card["data_fingerprint"] == summary["data"]["fingerprint"]
    assert card["config"]["train"]["rounds"] == 3
    assert card["packages"]["tensorflow-federated"] == "0.87.0"
    assert (finished_run / "export" / "healthcare" / "1" / "saved_model.pb").is_file()  # as TF Serving reads it
    assert summary["export"] == str(finished_run / "export" / "healthcare" / "1")
    # report.html: the table first, every plot a real PNG (no ε plot without DP), config last.
    assert summary["report_html"] == str(finished_run / "report.html")
    assert set(results["federated"]) == {"pooled", "sites", "across_sites"}  # no arrays in JSON
    page, sources = checked_report_page(finished_run, "federated")
    assert sources == ["plots/metric_per_round.png", "plots/roc_curves.png", "plots/per_client.png"]
    assert "rounds = 3" in page[page.index("<pre>"):]


def test_report_shows_client_profiles_and_personalization(finished_run: Path):
    summary = json.loads((finished_run / "summary.json").read_text())
    profiles = summary["profiles"]
    assert {name: p["rows"] for name, p in profiles.items()} == {
        name: site["train_rows"] for name, site in summary["data"]["sites"].items()
    }
    # hospital_1 has no malignant training row: its label balance and tumour sizes stand out
    assert profiles["hospital_1"]["label"]["positive_share"] == 0.0
    warnings = summary["profile_warnings"]
    assert warnings[0].startswith("hospital_1: label balance 0.00 positive")
    assert all(w in (finished_run / "run.log").read_text() for w in warnings)
    sites = summary["results"]["federated"]["sites"]
    for name, entry in summary["personalization"].items():
        before, reported = entry["before"], sites[name]["auc"]
        assert (before is None and reported is None) or abs(before - reported) < 1e-9  # the same exact AUC
        assert entry["accuracy_before"] == pytest.approx(sites[name]["accuracy"], abs=1e-9)
    report = (finished_run / "report.md").read_text()
    assert "## Client data profiles" in report and "## Personalization" in report
    assert f"- {warnings[0]}" in report and "| mean (4 sites)" in report  # hospital_1's test AUC is undefined
    page = (finished_run / "report.html").read_text()
    assert "<h2>Client data profiles</h2>" in page and "<h2>Personalization</h2>" in page


def test_export_serves_in_a_fresh_process_as_the_in_run_model_predicted(finished_run: Path):
    from tests.tff_apps.program.test_serving import check_served_like_in_run

    check_served_like_in_run(finished_run / "export" / "healthcare" / "1", atol=1e-5)


def test_warm_start_from_the_latest_run_records_its_lineage(finished_run: Path):
    from tff_apps.program.export import load_weights, weights_digest

    runs = finished_run.parent.parent
    result = tff_apps_in_process(
        "run", "healthcare", "--set", "train.rounds=1", "--set", "evaluate.centralized_baseline=false",
        "--set", "evaluate.local_baseline=false", "--set", "job.init_from=latest",
        "--set", f'job.runs_dir="{runs}"', "--run-id", "warm",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parent_dir = finished_run / "export" / "healthcare" / "1"
    parent = json.loads((parent_dir / "model_card.json").read_text())
    card = json.loads((runs / "healthcare" / "warm" / "export" / "healthcare" / "1" / "model_card.json").read_text())
    lineage = card["lineage"]
    assert lineage["init_from"] == "r1" and lineage["parent_export"] == str(parent_dir)
    assert lineage["parent_data_fingerprint"] == parent["data_fingerprint"]
    # Round 0 of the warm run holds exactly the parent's final weights.
    assert lineage["initial_weights_sha256"] == weights_digest(*load_weights(parent_dir / "weights.npz"))
    assert parent["lineage"] is None
    first_round = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert first_round(runs / "healthcare" / "warm") < first_round(finished_run)  # it starts trained


@pytest.fixture(scope="module")
def second_run(tmp_path_factory):
    """The same job again (federated training only: baselines and export do not touch the
    federated model), in its own session: what it left running once it ended, and its summary."""
    runs = tmp_path_factory.mktemp("second")
    process = subprocess.Popen(
        [sys.executable, "-m", "tff_apps.cli", "run", "healthcare", *SMALL_JOB, *FEDERATED_ONLY,
         "--set", f'job.runs_dir="{runs}"', "--run-id", "r2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True,
    )
    _, stderr = process.communicate(timeout=300)  # returns only once nothing holds our pipe open
    assert process.returncode == 0, stderr[-3000:]
    left = processes_in_session(process.pid)
    return SimpleNamespace(left_running=left, summary=json.loads((runs / "healthcare" / "r2" / "summary.json").read_text()))


def test_same_config_gives_the_same_model(finished_run: Path, second_run):
    first = json.loads((finished_run / "summary.json").read_text())["results"]
    assert second_run.summary["results"]["federated"]["pooled"] == first["federated"]["pooled"]


def test_no_process_outlives_a_normal_run(second_run):
    assert second_run.left_running == []


def test_predict_scores_raw_rows_in_a_fresh_process(finished_run: Path, tmp_path: Path):
    rows = raw_rows()
    rows.to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "scored.csv"
    result = tff_apps("predict", str(finished_run / "export"), "--input", str(tmp_path / "in.csv"), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_csv(out)
    assert list(scored["patient_id"]) == list(rows["patient_id"])
    probability = scored["probability"].to_numpy()
    assert np.all((probability >= 0) & (probability <= 1))
    assert roc_auc(rows["malignant"].to_numpy(), probability) > 0.95


@pytest.mark.parametrize(
    "breakage, named",
    [
        (lambda f: f.drop(columns=["mean_radius"]), "mean_radius"),
        (lambda f: f.assign(worst_area=["big"] + list(f["worst_area"][1:])), "worst_area"),
    ],
    ids=["missing-column", "non-numeric-column"],
)
def test_predict_rejects_bad_csv_with_one_line_and_no_output(finished_run, tmp_path, breakage, named):
    breakage(raw_rows()).to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "scored.csv"
    result = tff_apps_in_process("predict", str(finished_run / "export"), "--input", str(tmp_path / "in.csv"), "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "in.csv"]


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.rounds=0", "train.rounds"),
        ("train.algorithm=fedsgd", "train.algorithm"),
        ("train.bogus=1", "train.bogus"),
        ("data.source=csv", "data.label_column"),
        ("job.init_from=latest", "job.init_from"),  # no earlier run to start from
    ],
)
def test_user_errors_exit_2_with_one_line_and_leave_nothing(tmp_path, override, named):
    result = tff_apps_in_process("run", "healthcare", "--set", override, "--set", f'job.runs_dir="{tmp_path / "runs"}"')
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and named in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_app_is_a_user_error():
    result = tff_apps_in_process("run", "astrology")
    assert result.returncode == 2 and "healthcare" in result.stderr


def test_ctrl_c_stops_the_run_and_its_worker(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "tff_apps.cli", "run", "healthcare", "--set", "train.rounds=100000",
         "--set", f'job.runs_dir="{tmp_path}"', "--run-id", "interrupted"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    metrics = tmp_path / "healthcare" / "interrupted" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not metrics.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    workers = [c for c in processes_in_session(process.pid) if "worker_binary" in c]
    assert len(workers) == 1
    os.kill(process.pid, signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert processes_in_session(process.pid) == []
    summary = json.loads((metrics.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert not (metrics.parent / "export").exists()


def test_no_client_row_is_released_in_the_export_or_the_report(finished_run: Path):
    """Every training and test row of the job (the whole breast-cancer table, split over the
    hospitals) is looked for in every released file; the serving check uses rows made of
    the released federated statistics instead."""
    from tests.release_scan import released_files, rows_found

    rows = load_breast_cancer().data
    files = released_files(finished_run)
    assert {p.name for p in files} >= {"model_card.json", "saved_model.pb", "weights.npz", "report.md", "report.html"}
    leaks = {str(p.relative_to(finished_run)): found for p in files if (found := rows_found(rows, p))}
    assert leaks == {}
