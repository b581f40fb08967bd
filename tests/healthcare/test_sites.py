"""Healthcare across sites: three loopback sites (one `tff-apps worker` each, with its own
data folder from `site prepare`) give the model and the per-site metrics that a simulation
of the same partitions gives; what cannot train together is refused before round 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
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
            "simulated_personal": tff_apps_in_process(
                "run", "healthcare", *common, "--set", "personalization.epochs=1", "--run-id", "simulated_personal",
            ),
            "sites": tff_apps_in_process(
                "run", "healthcare", *common, "--sites", str(sites), "--run-id", "sites",
                "--set", "personalization.epochs=1",
                "--set", "evaluate.centralized_baseline=true",  # n/a across sites, with the reason
                "--set", "evaluate.local_baseline=true", "--set", "evaluate.baseline_epochs=3",
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
    for name in ("simulated_two", "sites_two"):
        assert federation.results[name].returncode == 0, federation.results[name].stderr[-3000:]
    simulated, across = (
        np.load(federation.runs / run / "export" / "healthcare" / "1" / "weights.npz")
        for run in ("simulated_two", "sites_two")
    )
    assert max(float(np.max(np.abs(simulated[k] - across[k]))) for k in simulated.files) <= 1e-5
    rounds = [json.loads(line) for line in (federation.runs / "sites_two" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in rounds) and len({tuple(r["clients"]) for r in rounds}) > 1


def test_personalization_at_the_sites_gives_the_simulations(federation):
    assert federation.results["simulated_personal"].returncode == 0
    simulated = summary(federation.runs / "simulated_personal")["personalization"]
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


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for mount namespaces")
def test_each_site_reads_data_that_the_coordinator_cannot_see(tmp_path):
    app, cfg = resolve_job("healthcare", None, ["data.n_clients=2"])
    names = [client.name for client in app.prepare(cfg).data.clients]
    for name in names:
        prepare_site(app, cfg, tmp_path / name, name)
    workers = [IsolatedWorker(tmp_path, portpicker.pick_unused_port(), tmp_path / name) for name in names]
    try:
        # the coordinator's view: empty folders where the sites keep their data
        assert all(not any((tmp_path / name).iterdir()) for name in names)
        sites = write_sites(tmp_path / "sites.toml", [(n, w.address, tmp_path / n) for n, w in zip(names, workers)])
        result = tff_apps_in_process(
            "run", "healthcare", "--set", "data.n_clients=2", "--set", "train.rounds=2",
            "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
            "--set", f'job.runs_dir="{tmp_path / "runs"}"', "--sites", str(sites), "--run-id", "isolated",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert summary(tmp_path / "runs" / "healthcare" / "isolated")["results"]["federated"]["pooled"]["auc"] > 0.9
    finally:
        assert [w.stop() for w in workers] == [0, 0]


class ServedSite:
    """`tff-apps site serve` as a hospital runs it: its worker in a private network namespace
    behind the mutual-TLS gateway, with a policy and an audit log."""

    def __init__(self, base: Path, name: str, data: Path, policy: str):
        self.name, self.port = name, portpicker.pick_unused_port()
        self.audit = base / f"{name}-audit.jsonl"
        (base / f"{name}.toml").write_text(policy)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", str(data), "--port", str(self.port),
             "--certs", str(base / "pki"), "--name", name, "--policy", str(base / f"{name}.toml"),
             "--audit", str(self.audit), "--host", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=user_environment(),
        )
        line = self.proc.stdout.readline()
        assert f"site {name} listening on 127.0.0.1:{self.port}" in line, line

    def calls(self, run_id: str) -> list[dict]:
        return [r for r in map(json.loads, self.audit.read_text().splitlines()) if r["run_id"] == run_id]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def served_federation(tmp_path: Path, policies: list[str]) -> tuple[list[str], list[ServedSite], Path]:
    """Two breast-cancer hospitals, each prepared and served behind its gateway with the given
    policy; (names, sites, sites.toml with mutual TLS)."""
    from tff_apps.sites.certs import make_test_pki

    app, cfg = resolve_job("healthcare", None, ["data.n_clients=2"])
    names = [client.name for client in app.prepare(cfg).data.clients]
    for name in names:
        prepare_site(app, cfg, tmp_path / name, name)
    make_test_pki(tmp_path / "pki", names)
    served = [ServedSite(tmp_path, name, tmp_path / name, policy) for name, policy in zip(names, policies)]
    sites = tmp_path / "sites.toml"
    sites.write_text("".join(
        f'[[site]]\nname = "{s.name}"\naddress = "127.0.0.1:{s.port}"\ndata = "{tmp_path / s.name}"\n'
        'ca = "pki/ca.pem"\ncert = "pki/coordinator.pem"\nkey = "pki/coordinator.key"\n\n' for s in served
    ))
    return names, served, sites


def two_site_job(tmp_path: Path, sites: Path) -> list[str]:
    return ["run", "healthcare", "--set", "data.n_clients=2", "--set", "train.rounds=2",
            "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
            "--set", f'job.runs_dir="{tmp_path / "runs"}"', "--sites", str(sites)]


@pytest.mark.skipif(os.geteuid() != 0, reason="site serve keeps its worker in a network namespace (root)")
def test_sites_behind_tls_gateways_train_admit_by_policy_and_audit(tmp_path):
    strict = '[policy]\napps = ["healthcare"]\nrequire_privacy = "client"\n'
    names, served, sites = served_federation(tmp_path, ['[policy]\napps = ["healthcare"]\n', strict])
    try:
        job = two_site_job(tmp_path, sites)
        refused = tff_apps_in_process(*job, "--run-id", "no_dp")
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert f"site {names[1]}" in refused.stderr and "require_privacy" in refused.stderr, refused.stderr
        assert not (tmp_path / "runs" / "healthcare" / "no_dp").exists()
        admitted = tff_apps_in_process(*job, "--run-id", "dp", "--set", "privacy.level=client",
                                       "--set", "privacy.noise_multiplier=0.5", "--set", "privacy.clipping=fixed")
        assert admitted.returncode == 0, admitted.stderr[-3000:]
        calls = [site.calls("dp") for site in served]
        # both sites ran the same computations: the partial aggregates merge at the coordinator
        assert len(calls[0]) == len(calls[1]) > 10
        assert {c["caller"] for site in calls for c in site} == {"CN=coordinator,O=tff-apps test federation"}
        assert {c["method"] for c in calls[0]} >= {"CreateValue", "CreateCall", "Compute"}
        assert all(c["status"] == "ok" for c in calls[0])
    finally:
        assert [site.stop() for site in served] == [0, 0]


def lose_a_site_mid_run(tmp_path: Path, quorum: int, *extra: str):
    """Two loopback sites, a 16-round job (checkpoints every 2 rounds); the second site is
    SIGKILLed after round 3. Returns what a test needs: the job's command and result, the
    workers, their ports and the site names."""
    import time

    app, cfg = resolve_job("healthcare", None, ["data.n_clients=2"])
    names = [client.name for client in app.prepare(cfg).data.clients]
    for name in names:
        prepare_site(app, cfg, tmp_path / name, name)
    ports = [portpicker.pick_unused_port() for _ in names]
    workers = [Worker(tmp_path, port) for port in ports]
    sites = write_sites(tmp_path / "sites.toml", [(n, w.address, tmp_path / n) for n, w in zip(names, workers)])
    job = [sys.executable, "-m", "tff_apps.cli", "run", "healthcare", "--set", "data.n_clients=2",
           "--set", "train.rounds=16", "--set", "train.checkpoint_every=2", "--set", "train.local_epochs=4",
           "--set", f"clients.quorum={quorum}",
           "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
           "--set", f'job.runs_dir="{tmp_path / "runs"}"', "--sites", str(sites), "--run-id", "lost", *extra]
    metrics = tmp_path / "runs" / "healthcare" / "lost" / "metrics.jsonl"
    first = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=user_environment())
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    os.killpg(workers[1].proc.pid, signal.SIGKILL)  # the site and its worker, mid-run
    workers[1].proc.wait()
    _, stderr = first.communicate(timeout=180)
    return SimpleNamespace(job=job, code=first.returncode, stderr=stderr, workers=workers, ports=ports,
                           names=names, metrics=metrics, run_dir=tmp_path / "runs" / "healthcare" / "lost")


def test_a_site_lost_below_the_quorum_fails_the_run_in_one_line_and_the_run_id_resumes(tmp_path):
    lost = lose_a_site_mid_run(tmp_path, quorum=2)
    try:
        assert lost.code != 0
        errors = [line for line in lost.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors == lost.stderr.strip().splitlines()[-1:], lost.stderr[-3000:]
        assert errors[0].startswith(f"error: site {lost.names[1]} 127.0.0.1:{lost.ports[1]} stopped answering")
        lost.workers[1] = Worker(tmp_path, lost.ports[1])  # the site comes back
        again = subprocess.run(lost.job, capture_output=True, text=True, env=user_environment(), timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        done = summary(lost.run_dir)
        assert done["status"] == "succeeded" and done["resumed"] is True and done["rounds"] == 16
        assert [json.loads(line)["round"] for line in lost.metrics.read_text().splitlines()] == list(range(1, 17))
    finally:
        for worker in lost.workers:
            if worker.proc.poll() is None:
                worker.stop()


def test_a_site_lost_within_the_quorum_leaves_the_round_to_the_others(tmp_path):
    lost = lose_a_site_mid_run(tmp_path, 1, "--set", "personalization.epochs=1", "--set", "evaluate.local_baseline=true",
                               "--set", "evaluate.baseline_epochs=1")
    try:
        assert lost.code == 0, lost.stderr[-3000:]
        assert f"site {lost.names[1]} (127.0.0.1:{lost.ports[1]}) stopped answering" in lost.stderr  # logged
        rounds = [json.loads(line) for line in lost.metrics.read_text().splitlines()]
        assert [r["round"] for r in rounds] == list(range(1, 17))
        kept = [r for r in rounds if r["clients"] == lost.names]
        assert len(kept) >= 3 and rounds[: len(kept)] == kept  # until the site was lost
        assert all(r["clients"] == lost.names[:1] and r["lost_sites"] == [lost.names[1]] and r["dropped"] == 1
                   for r in rounds[len(kept):])
        done = summary(lost.run_dir)
        # evaluated, fine-tuned and trained alone only where it still answers
        assert list(done["results"]["federated"]["sites"]) == lost.names[:1]
        assert list(done["results"]["local_only"]["sites"]) == lost.names[:1]
        assert list(done["personalization"]) == lost.names[:1]
    finally:
        lost.workers[0].stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="site serve keeps its worker in a network namespace (root)")
def test_a_site_keeps_its_own_budget_and_refuses_a_job_past_it(tmp_path):
    from tff_apps.privacy.accounting import epsilon_for_rounds
    from tff_apps.privacy.dp_config import ClientSampling
    from tff_apps.privacy.ledger import Ledger
    one, two = (epsilon_for_rounds(1.0, 1e-5, rounds, ClientSampling(2), "rdp", "fixed") for rounds in (2, 4))
    budget = (one + two) / 2  # room for one job of 2 rounds, not for a second one
    names, served, sites = served_federation(
        tmp_path, [f"[policy]\nlifetime_epsilon = {budget}\n", "[policy]\nlifetime_epsilon = 100.0\n"]
    )
    try:
        job = [*two_site_job(tmp_path, sites), "--set", "privacy.level=client", "--set", "privacy.noise_multiplier=1.0",
               "--set", "privacy.clipping=fixed"]
        first = tff_apps_in_process(*job, "--run-id", "first")
        assert first.returncode == 0, first.stderr[-3000:]
        budgets = summary(tmp_path / "runs" / "healthcare" / "first")["site_budgets"]
        assert budgets[names[0]]["remaining_after_this_job"] == pytest.approx(budget - one, rel=0.01)
        second = tff_apps_in_process(*job, "--run-id", "second")
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and f"site {names[0]}: its privacy budget lifetime_epsilon" in line
        assert f"spent ε = {one:.4g}" in line and f"bring it to {two:.4g}" in line
        ledgers = [Ledger(tmp_path / f"{name}-privacy-ledger.sqlite").history(f"site:{name}") for name in names]
        # the refused job spent nothing anywhere: site A refused it, site B never ran a computation of it
        assert [[e.run_id for e in ledger] for ledger in ledgers] == [["first"], ["first"]]
        assert ledgers[0][0].epsilon == pytest.approx(one, rel=0.01)
    finally:
        assert [site.stop() for site in served] == [0, 0]
