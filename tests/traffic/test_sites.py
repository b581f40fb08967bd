"""Traffic across sites: three loopback sites (one `tff-apps worker` each, holding the data
folder `site prepare traffic --site DISTRICT` made of one road district) give the model and the
per-district metrics that a simulation of the same districts gives; the windows a site builds
with TF ops are `make_windows`' own; districts that cannot train together are refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import portpicker
import pytest

from shared.errors import UserError
from tests.cli import tff_apps_in_process
from tests.healthcare.test_sites import write_sites
from tests.tff_apps.runtime.test_workers import Worker
from tff_apps.program.job import resolve_job
from tff_apps.sites.prepare import prepare_site

DATA = ["data.n_districts=3", "data.sensors_per_district=3", "data.days=7"]
JOB = [
    *(arg for item in DATA for arg in ("--set", item)),
    "--set", "train.rounds=2", "--set", "train.local_steps=4", "--set", "train.eval_every=1",
    "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("traffic_sites")
    app, cfg = resolve_job("traffic", None, DATA)
    names = [district.name for district in app.prepare(cfg).data.districts]
    for name in names:
        prepare_site(app, cfg, base / name, name)
    longer_app, longer_cfg = resolve_job("traffic", None, [*DATA[:2], "data.days=8"])
    prepare_site(longer_app, longer_cfg, base / "longer", names[2])
    workers = [Worker(base, portpicker.pick_unused_port()) for _ in names]
    try:
        entries = [(name, w.address, base / name) for name, w in zip(names, workers)]
        sites = write_sites(base / "sites.toml", entries)
        common = [*JOB, "--set", f'job.runs_dir="{base / "runs"}"']
        results = {
            "simulated": tff_apps_in_process("run", "traffic", *common, "--run-id", "simulated"),
            "sites": tff_apps_in_process(
                "run", "traffic", *common, "--sites", str(sites), "--run-id", "sites",
                "--set", "evaluate.centralized_baseline=true",  # n/a across sites, with the reason
                "--set", "evaluate.local_baseline=true",
            ),
        }
        longer = write_sites(base / "longer.toml", [*entries[:2], (names[2], workers[2].address, base / "longer")])
        results["longer"] = tff_apps_in_process("run", "traffic", *common, "--sites", str(longer), "--run-id", "longer")
        results["masked"] = tff_apps_in_process(
            "run", "traffic", *common, "--sites", str(sites), "--run-id", "masked",
            "--set", "privacy.secure_aggregation=masked",
        )
    finally:
        codes = [w.stop() for w in workers]
    return SimpleNamespace(runs=base / "runs" / "traffic", results=results, names=names, stop_codes=codes, base=base)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_sites_give_the_simulations_model_and_district_metrics(federation):
    for name in ("simulated", "sites"):
        assert federation.results[name].returncode == 0, federation.results[name].stderr[-3000:]
    simulated, across = (
        np.load(federation.runs / run / "export" / "traffic" / "1" / "weights.npz") for run in ("simulated", "sites")
    )
    assert max(float(np.max(np.abs(simulated[k] - across[k]))) for k in simulated.files) <= 1e-5
    sim, sites = (summary(federation.runs / run) for run in ("simulated", "sites"))
    for method in ("federated", "persistence", "historical_average"):
        for name in federation.names:
            assert sites["results"][method]["districts"][name] == pytest.approx(
                sim["results"][method]["districts"][name], rel=1e-5
            )
        assert sites["results"][method]["overall"] == pytest.approx(sim["results"][method]["overall"], rel=1e-5)
    assert 0 < sites["results"]["federated"]["overall"]["mae_60min"] < 30
    val = [
        [json.loads(line)["val_mae_60min"] for line in (federation.runs / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("simulated", "sites")
    ]
    assert val[1] == pytest.approx(val[0], rel=1e-5)  # each round's validation, at the sites
    assert federation.stop_codes == [0, 0, 0]


def test_the_run_says_it_was_across_sites_and_leaves_out_what_shows_readings(federation):
    run_dir = federation.runs / "sites"
    data = summary(run_dir)
    assert data["across_sites"] == federation.names and data["data"]["source"] == "3 sites"
    assert data["data"]["districts"] == {name: {"sensors": 3} for name in federation.names}
    assert data["baselines_not_run"]["centralized"].startswith("n/a across sites")
    local = data["results"]["local_only"]  # each district's own model, trained and scored at its site
    assert set(local["districts"]) == set(federation.names) and 0 < local["overall"]["mae_60min"] < 30
    assert local["overall"] != data["results"]["federated"]["overall"]
    card = json.loads((run_dir / "export" / "traffic" / "1" / "model_card.json").read_text())
    assert card["data_source"] == "3 sites" and list(card["trained_across_sites"]) == federation.names
    report = (run_dir / "report.md").read_text()
    assert "Data statistics against METR-LA" not in report and "profiles" not in data
    assert not (run_dir / "plots" / "forecast_vs_actual.png").exists()


def test_districts_that_cannot_train_together_are_refused_before_a_run_folder(federation):
    refusals = {  # the third district prepared 8 days where the others have 7; masking without the sites' gateways
        "longer": "site district_3: its readings run from 2012-03-01 00:00:00 to 2012-03-08 23:55:00 (2304 steps)",
        "masked": "job.sites: privacy.secure_aggregation = 'masked' runs in each site's gateway; sites district_1, "
                  "district_2, district_3 have no ca, cert and key",
    }
    for run, start in refusals.items():
        result = federation.results[run]
        lines = result.stderr.strip().splitlines()
        assert (result.returncode, len(lines)) == (2, 1), result.stderr[-3000:]
        assert start in lines[0] and not (federation.runs / run).exists()


def test_site_prepare_fingerprints_the_time_grid_not_the_sensor_count(tmp_path):
    app, cfg = resolve_job("traffic", None, DATA)
    with pytest.raises(UserError, match="--site 'district_9' is not in the data; the data holds districts district_1, "):
        prepare_site(app, cfg, tmp_path / "site", "district_9")
    assert list(tmp_path.iterdir()) == []  # nothing written
    wider_app, wider_cfg = resolve_job("traffic", None, [*DATA, "data.sensors_per_district=5"])
    three = prepare_site(app, cfg, tmp_path / "three", "district_1")
    five = prepare_site(wider_app, wider_cfg, tmp_path / "five", "district_1")
    assert (three["sensors"], five["sensors"]) == (3, 5)
    assert three["schema_fingerprint"] == five["schema_fingerprint"]  # they train together
    assert three["rows"]["train"] * 5 == five["rows"]["train"] * 3
    assert sorted(path.name for path in (tmp_path / "five").iterdir()) == ["manifest.json", "sensors.json", "series.tfrecord"]


def test_the_sites_windows_are_make_windows_own():
    import tensorflow as tf

    from traffic import typical
    from traffic.site_computations import Windowing, tf_graph_examples, tf_typical, tf_windows
    from traffic.windows import epoch_seconds, graph_examples, make_windows, split_bounds

    app, cfg = resolve_job("traffic", None, DATA)
    data = app.prepare(cfg).data
    district = data.districts[1]
    normalized = (district.speeds - 55.0) / 12.0
    seconds = epoch_seconds(data.timestamps)
    all_bounds = split_bounds(len(seconds))
    windowing = Windowing(55.0, 12.0, all_bounds, 12, 12, 5, data.interval_minutes)
    table = typical.typical_table(normalized, seconds, all_bounds["train"][1], data.interval_minutes)
    for bounds in all_bounds.values():
        expected = make_windows(normalized, seconds, bounds, 12, 12)
        x, y = tf_windows(tf.constant(normalized), tf.constant(seconds), bounds, 12, 12)
        np.testing.assert_array_equal(x.numpy(), expected.x)
        np.testing.assert_array_equal(y.numpy(), expected.y)
        steps = expected.target_start[:, None] + np.arange(-12, 12)[None, :]
        expected.typical = typical.typical_at(table, seconds, steps, expected.sensor, data.interval_minutes)
        at_site = tf_typical(tf.constant(normalized), tf.constant(seconds), windowing, bounds).numpy()
        np.testing.assert_allclose(at_site, expected.typical, atol=1e-6)
    assert np.abs(expected.typical).max() > 0.1  # a real table, not zeros
    graph_x, graph_y = graph_examples(expected, district.graph, 5)
    x, y = tf_graph_examples(x, y, tf.constant(at_site), tf.constant(district.graph), 5)
    np.testing.assert_allclose(x.numpy(), graph_x, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), graph_y)
    assert np.isnan(expected.y).any() and (expected.x[:, :, 1] == 0).any()  # missing readings were windowed
