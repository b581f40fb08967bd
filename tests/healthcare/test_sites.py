"""Healthcare across sites: three loopback sites (one `tff-apps worker` each, with its own
data folder from `site prepare`) give the model and the per-site metrics that a simulation
of the same partitions gives; what cannot train together is refused before round 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import portpicker
import pytest

from tests.cli import tff_apps_in_process, user_environment
from tests.tff_apps.runtime.test_workers import Worker
from tff_apps.program.job import resolve_job
from tff_apps.sites.prepare import prepare_site
from tff_apps.sites.site_computations import HISTOGRAM_BINS

# With root and unshare, the module's sites are IsolatedWorkers (below): every job across them
# then also shows that the coordinator never reads a site's folder.
ISOLATED = os.geteuid() == 0 and shutil.which("unshare") is not None
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
    if ISOLATED:  # each site's folder is seen by its own worker only (a private tmpfs in its mount namespace)
        workers = [IsolatedWorker(base, portpicker.pick_unused_port(), folders[name]) for name in names]
    else:
        workers = [Worker(base, portpicker.pick_unused_port()) for _ in names]
    try:
        entries = [(name, w.address, folders[name]) for name, w in zip(names, workers)]
        sites = write_sites(base / "sites.toml", entries)
        runs = base / "runs"
        common = [*JOB, "--set", f'job.runs_dir="{runs}"']
        # each round samples 2 of the 3 sites, each sampled site on its own worker (every site
        # still evaluates, fine-tunes and trains its local-only model)
        two = ["--set", "train.clients_per_round=2"]
        results = {
            # fine-tuning at the end leaves the global model, its metrics and the profiles as they are
            # (2 epochs: after rounds of 2 sampled sites, 1 epoch changed no site's accuracy)
            "simulated": tff_apps_in_process(
                "run", "healthcare", *common, *two, "--set", "personalization.epochs=2", "--run-id", "simulated",
            ),
            "sites": tff_apps_in_process(
                "run", "healthcare", *common, *two, "--sites", str(sites), "--run-id", "sites",
                "--set", "personalization.epochs=2",
                "--set", "evaluate.centralized_baseline=true",  # n/a across sites, with the reason
                "--set", "evaluate.local_baseline=true", "--set", "evaluate.baseline_epochs=3",
            ),
        }
        mixed = write_sites(base / "mixed.toml", [*entries[:2], (names[2], workers[2].address, base / "other_columns")])
        results["mixed"] = tff_apps_in_process("run", "healthcare", *common, "--sites", str(mixed), "--run-id", "mixed")
        record = ["--set", "privacy.level=record", "--set", "privacy.noise_multiplier=1",
                  "--set", "train.algorithm=fedavg_unweighted"]
        results["record_dp"] = tff_apps_in_process(
            "run", "healthcare", *common, *record, "--sites", str(sites), "--run-id", "record_dp",
        )
        results["simulated_record_dp"] = tff_apps_in_process(
            "run", "healthcare", *common, *record, "--run-id", "simulated_record_dp",
        )
        results["masked"] = tff_apps_in_process(
            "run", "healthcare", *common, "--sites", str(sites), "--run-id", "masked",
            "--set", "privacy.secure_aggregation=masked",
        )
    finally:
        codes = [w.stop() for w in workers]
    return SimpleNamespace(runs=runs / "healthcare", results=results, names=names, stop_codes=codes, folders=folders)


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


def test_record_level_dp_sgd_runs_at_the_sites_with_the_simulations_epsilon(federation):
    for name in ("record_dp", "simulated_record_dp"):
        assert federation.results[name].returncode == 0, federation.results[name].stderr[-3000:]
    across, simulated = (summary(federation.runs / r)["privacy"] for r in ("record_dp", "simulated_record_dp"))
    assert across["level"] == "record" and across["epsilon"] == pytest.approx(simulated["epsilon"], rel=1e-9)
    assert across["epsilon_by_client"] == pytest.approx(simulated["epsilon_by_client"], rel=1e-9)
    released = {entry["release"] for entry in across["released_outside_epsilon"]}
    assert released == {"normalization", "site_counts", "evaluation", "training_metrics", "participation"}
    # the batches were drawn at the sites: the model trained (3 rounds of noisy DP-SGD)
    pooled = summary(federation.runs / "record_dp")["results"]["federated"]["pooled"]["auc"]
    assert pooled > 0.8


def test_sampled_sites_train_on_their_own_workers(federation):
    # the model compared in the test above came from rounds of 2 sampled sites: here, that they were sampled
    for name in ("simulated", "sites"):
        assert federation.results[name].returncode == 0, federation.results[name].stderr[-3000:]
    rounds = [json.loads(line) for line in (federation.runs / "sites" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in rounds) and len({tuple(r["clients"]) for r in rounds}) > 1
    simulated = [json.loads(line) for line in (federation.runs / "simulated" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [r["clients"] for r in simulated]


def test_personalization_at_the_sites_gives_the_simulations(federation):
    assert federation.results["simulated"].returncode == 0
    simulated = summary(federation.runs / "simulated")["personalization"]
    across = summary(federation.runs / "sites")["personalization"]
    assert across.keys() == simulated.keys() == set(federation.names)
    for site, metrics in simulated.items():  # AUC and accuracy before and after fine-tuning, at each site
        assert across[site] == pytest.approx(metrics, rel=1e-6, abs=1e-9)
    assert any(m["accuracy_after"] != m["accuracy_before"] for m in across.values())


def test_the_run_says_it_was_across_sites_and_names_the_missing_baselines(federation):
    run_dir = federation.runs / "sites"
    data = summary(run_dir)
    assert data["across_sites"] == federation.names
    assert list(data["baselines_not_run"]) == ["centralized"]
    assert data["baselines_not_run"]["centralized"].startswith("n/a across sites")
    # the local-only baseline: each site's own model, trained and scored at the site
    local = data["results"]["local_only"]
    assert set(local["sites"]) == set(federation.names) and local["pooled"]["auc"] > 0.9
    assert local["pooled"]["auc"] != data["results"]["federated"]["pooled"]["auc"]
    card = json.loads((run_dir / "export" / "healthcare" / "1" / "model_card.json").read_text())
    assert card["data_source"] == "3 sites" and list(card["trained_across_sites"]) == federation.names
    # the data profiles, computed at the sites, are the simulation's
    simulated = summary(federation.runs / "simulated")
    assert data["profiles"].keys() == simulated["profiles"].keys()
    for name in federation.names:
        assert data["profiles"][name]["rows"] == simulated["profiles"][name]["rows"]
        for column, stats in simulated["profiles"][name]["columns"].items():
            assert data["profiles"][name]["columns"][column] == pytest.approx(stats, rel=1e-9)
    assert data["profile_warnings"] == simulated["profile_warnings"]


@pytest.mark.parametrize(("run", "message"), [
    ("mixed", "its schema (columns"),
    ("masked", "privacy.secure_aggregation = 'masked' runs in each site's gateway; sites "),  # plain workers here
])
def test_what_cannot_train_together_is_refused_before_a_run_folder(federation, run, message):
    result = federation.results[run]
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (federation.runs / run).exists()


class IsolatedWorker(Worker):
    """A `tff-apps worker` in its own mount namespace, where its data folder is a private
    tmpfs holding the site's files: no other process (the coordinator included) sees them."""

    def __init__(self, logs: Path, port: int, folder: Path):
        archive = logs / f"{folder.name}.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(folder), "."], check=True)
        shutil.rmtree(folder)
        folder.mkdir()  # in every other namespace: an empty folder
        self.port, self.out = port, logs / f"worker-{port}.out"
        script = (
            f'mount -t tmpfs none "{folder}" && tar -xf "{archive}" -C "{folder}" && rm "{archive}" && '
            f'exec "{sys.executable}" -m tff_apps.cli worker --port {port}'
        )
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=user_environment(),
            )
        self.binary_pid = self._wait_ready()


@pytest.mark.skipif(not ISOLATED, reason="needs root and unshare for mount namespaces")
def test_each_site_reads_data_that_the_coordinator_cannot_see(federation):
    # the coordinator's view, after every job of the module: empty folders where the sites keep their data
    assert all(folder.is_dir() and not any(folder.iterdir()) for folder in federation.folders.values())
    # yet the sites trained on it, evaluated it and profiled it (the simulation's numbers: tests above)
    assert federation.results["sites"].returncode == 0, federation.results["sites"].stderr[-3000:]
    data = summary(federation.runs / "sites")
    assert data["across_sites"] == federation.names and data["results"]["federated"]["pooled"]["auc"] > 0.9
    assert all(data["profiles"][name]["rows"] > 0 for name in federation.names)
