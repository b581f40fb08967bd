"""Healthcare across sites: three loopback sites (one `tff-apps worker` each, with its own
data folder from `site prepare`) give the model and the per-site metrics that a simulation
of the same partitions gives; what cannot train together is refused before round 1."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import portpicker
import pytest

from tests.cli import tff_apps_in_process
from tests.tff_apps.runtime.test_workers import Worker
from tff_apps.program.job import resolve_job
from tff_apps.sites.prepare import prepare_site
from tff_apps.sites.site_computations import HISTOGRAM_BINS

JOB = [
    "--set", "data.n_clients=3", "--set", "train.rounds=3", "--set", "train.eval_every=1",
    "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
]


def write_sites(path: Path, entries: list[tuple[str, str, Path]]) -> Path:
    path.write_text("".join(f'[[site]]\nname = "{n}"\naddress = "{a}"\ndata = "{d}"\n\n' for n, a, d in entries))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("sites")
    app, cfg = resolve_job("healthcare", None, ["data.n_clients=3"])
    names = [client.name for client in app.prepare(cfg).data.clients]
    folders = {name: base / name for name in names}
    for name, folder in folders.items():
        prepare_site(app, cfg, folder, name)
    heart_app, heart_cfg = resolve_job("healthcare", None, ["data.source=heart"])
    prepare_site(heart_app, heart_cfg, base / "other_columns", "cleveland")
    workers = [Worker(base, portpicker.pick_unused_port()) for _ in names]
    try:
        entries = [(name, w.address, folders[name]) for name, w in zip(names, workers)]
        sites = write_sites(base / "sites.toml", entries)
        runs = base / "runs"
        common = [*JOB, "--set", f'job.runs_dir="{runs}"']
        results = {
            "simulated": tff_apps_in_process("run", "healthcare", *common, "--run-id", "simulated"),
            "sites": tff_apps_in_process(
                "run", "healthcare", *common, "--sites", str(sites), "--run-id", "sites",
                "--set", "evaluate.centralized_baseline=true",  # n/a across sites, with the reason
            ),
        }
        # a round that samples 2 of the 3 sites: each sampled site on its own worker
        two = ["--set", "train.clients_per_round=2", "--set", "export.enabled=true"]
        results["simulated_two"] = tff_apps_in_process("run", "healthcare", *common, *two, "--run-id", "simulated_two")
        results["sites_two"] = tff_apps_in_process(
            "run", "healthcare", *common, *two, "--sites", str(sites), "--run-id", "sites_two"
        )
        mixed = write_sites(base / "mixed.toml", [*entries[:2], (names[2], workers[2].address, base / "other_columns")])
        results["mixed"] = tff_apps_in_process("run", "healthcare", *common, "--sites", str(mixed), "--run-id", "mixed")
        results["record_dp"] = tff_apps_in_process(
            "run", "healthcare", *common, "--sites", str(sites), "--run-id", "record_dp",
            "--set", "privacy.level=record", "--set", "privacy.noise_multiplier=1",
        )
    finally:
        codes = [w.stop() for w in workers]
    return SimpleNamespace(runs=runs / "healthcare", results=results, names=names, stop_codes=codes)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_sites_give_the_simulations_model_and_site_metrics(federation):
    for name in ("simulated", "sites"):
        assert federation.results[name].returncode == 0, federation.results[name].stderr[-3000:]
    simulated = np.load(federation.runs / "simulated" / "export" / "healthcare" / "1" / "weights.npz")
    across = np.load(federation.runs / "sites" / "export" / "healthcare" / "1" / "weights.npz")
    assert max(float(np.max(np.abs(simulated[k] - across[k]))) for k in simulated.files) <= 1e-5
    sim, sites = (summary(federation.runs / r)["results"]["federated"] for r in ("simulated", "sites"))
    for name in federation.names:
        for metric in ("auc", "accuracy"):
            assert sites["sites"][name][metric] == pytest.approx(sim["sites"][name][metric], abs=1e-12)
        assert sites["sites"][name]["brier"] == pytest.approx(sim["sites"][name]["brier"], abs=1.0 / HISTOGRAM_BINS)
    # pooled metrics from secure-summed histograms: exact to the bin width
    assert sites["pooled"]["auc"] == pytest.approx(sim["pooled"]["auc"], abs=2.0 / HISTOGRAM_BINS)
    assert federation.stop_codes == [0, 0, 0]


def test_sampled_sites_train_on_their_own_workers(federation):
    for name in ("simulated_two", "sites_two"):
        assert federation.results[name].returncode == 0, federation.results[name].stderr[-3000:]
    simulated, across = (
        np.load(federation.runs / run / "export" / "healthcare" / "1" / "weights.npz")
        for run in ("simulated_two", "sites_two")
    )
    assert max(float(np.max(np.abs(simulated[k] - across[k]))) for k in simulated.files) <= 1e-5
    rounds = [json.loads(line) for line in (federation.runs / "sites_two" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in rounds) and len({tuple(r["clients"]) for r in rounds}) > 1


def test_the_run_says_it_was_across_sites_and_names_the_missing_baselines(federation):
    run_dir = federation.runs / "sites"
    data = summary(run_dir)
    assert data["across_sites"] == federation.names
    assert data["baselines_not_run"]["centralized"].startswith("n/a across sites")
    card = json.loads((run_dir / "export" / "healthcare" / "1" / "model_card.json").read_text())
    assert card["data_source"] == "3 sites"


@pytest.mark.parametrize(("run", "message"), [
    ("mixed", "its schema (columns"),
    ("record_dp", "privacy.level = 'record' (DP-SGD's Poisson batches are not drawn at the sites yet)"),
])
def test_what_cannot_train_together_is_refused_before_a_run_folder(federation, run, message):
    result = federation.results[run]
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (federation.runs / run).exists()
