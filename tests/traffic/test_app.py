"""The traffic job end to end through `tff-apps`, and scoring raw sensor history with its export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.cli import run_app, tff_apps_in_process
from tests.report_page import checked_report_page

SMALL_JOB = [
    "--set", "data.n_districts=3", "--set", "data.sensors_per_district=4", "--set", "data.days=7",
    "--set", "train.rounds=3", "--set", "train.local_steps=10", "--set", "train.eval_every=1",
]


@pytest.fixture(scope="module")
def traffic_run(tmp_path_factory) -> Path:
    return run_app(tmp_path_factory.mktemp("runs"), "traffic", "t", *SMALL_JOB)


def test_run_reports_every_method_at_15_30_60_minutes(traffic_run: Path):
    summary = json.loads((traffic_run / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["rounds"] == 3
    methods = {"federated", "persistence", "historical_average", "local_only", "centralized"}
    assert set(summary["results"]) == methods
    for report in summary["results"].values():
        assert len(report["districts"]) == 3
        for horizon in ("15min", "30min", "60min"):
            assert 0 < report["overall"][f"mae_{horizon}"] < report["overall"][f"rmse_{horizon}"] < 30
    rounds = [json.loads(line) for line in (traffic_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3] and "val_mae_60min" in rounds[-1]
    report = (traffic_run / "report.md").read_text()
    assert "Data statistics against METR-LA" in report and "acf_lag288" in report
    # report.html: the table first, every plot a real PNG (no ε plot without DP), config last.
    assert summary["report_html"] == str(traffic_run / "report.html")
    assert set(summary["results"]["federated"]) == {"overall", "districts"}  # no arrays in JSON
    page, sources = checked_report_page(traffic_run, "federated")
    assert sources == ["plots/metric_per_round.png", "plots/per_client.png", "plots/forecast_vs_actual.png"]
    assert "acf_lag288" in page and "local_steps = 10" in page[page.index("<pre>"):]


def test_export_serves_in_a_fresh_process_as_the_in_run_model_predicted(traffic_run: Path):
    from tests.tff_apps.program.test_serving import check_served_like_in_run

    check_served_like_in_run(traffic_run / "export" / "traffic" / "1", atol=1e-3)  # mph


def test_predict_forecasts_from_raw_history_with_timestamps(traffic_run: Path, tmp_path: Path):
    card = json.loads((traffic_run / "export" / "traffic" / "1" / "model_card.json").read_text())
    summary = json.loads((traffic_run / "summary.json").read_text())
    assert card["data_fingerprint"] == summary["data"]["fingerprint"] and card["rounds"] == 3
    assert card["output_columns"][0] == "forecast_5min" and card["output_columns"][-1] == "forecast_60min"
    rows = pd.DataFrame({f"speed_lag_{k}": [60.0 - k, 35.0, 0.0] for k in range(12)})
    rows["timestamp"] = ["2012-03-05 08:00:00", "2012-03-05 17:30:00", "2012-03-10 03:00:00"]
    rows["sensor_id"] = ["a", "b", "c"]
    rows.to_csv(tmp_path / "history.csv", index=False)
    result = tff_apps_in_process("predict", str(traffic_run / "export"), "--input", str(tmp_path / "history.csv"),
                      "--output", str(tmp_path / "forecast.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    forecast = pd.read_csv(tmp_path / "forecast.csv")
    values = forecast[card["output_columns"]].to_numpy()
    assert values.shape == (3, 12) and np.all((values > 5) & (values < 90))
    assert list(forecast["sensor_id"]) == ["a", "b", "c"]
    assert abs(values[0, 0] - 60) < abs(values[1, 0] - 60)  # a free-flowing sensor stays fast

    rows.loc[1, "timestamp"] = "yesterday-ish"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    bad = tff_apps_in_process("predict", str(traffic_run / "export"), "--input", str(tmp_path / "bad.csv"),
                   "--output", str(tmp_path / "bad_out.csv"))
    assert bad.returncode == 2 and "timestamp" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "bad_out.csv").exists()


def test_no_district_reading_is_released_in_the_export_or_the_report(traffic_run: Path):
    """Every sensor's readings, as rows of 12 consecutive steps (a window, what the serving
    check used to carry), are looked for in every released file."""
    from tests.release_scan import released_files, rows_found
    from traffic.data import DataConfig, load

    from traffic.app import describe_data

    data = load(DataConfig(n_districts=3, sensors_per_district=4, days=7), seed=0)  # SMALL_JOB's data
    summary = json.loads((traffic_run / "summary.json").read_text())
    assert describe_data(data)["fingerprint"] == summary["data"]["fingerprint"]  # the run's own readings
    rows = np.concatenate([
        np.lib.stride_tricks.sliding_window_view(d.speeds.T, 12, axis=1).reshape(-1, 12) for d in data.districts
    ])
    files = released_files(traffic_run)
    assert {p.name for p in files} >= {"model_card.json", "saved_model.pb", "weights.npz", "report.md"}
    leaks = {str(p.relative_to(traffic_run)): found[:3] for p in files if (found := rows_found(rows, p))}
    assert leaks == {}
