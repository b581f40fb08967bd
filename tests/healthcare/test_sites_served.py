"""Healthcare across sites served as hospitals serve them (`tff-apps site serve`: mutual-TLS
gateway, policy, audit log, the site's own budget), and sites lost mid-run. Apart from
test_sites.py so that the two heavy modules run on different test workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import portpicker
import pytest

from tests.cli import tff_apps_in_process, user_environment
from tests.tff_apps.runtime.test_workers import Worker
from tff_apps.program.job import resolve_job
from tff_apps.sites.prepare import prepare_site
from tests.healthcare.test_sites import summary, write_sites


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


ROUNDS = 8


def lose_a_site_mid_run(tmp_path: Path, quorum: int, *extra: str):
    """Two loopback sites, an 8-round job (checkpoints every 2 rounds); the second site is
    SIGKILLed after round 3. The job runs through the CLI's entry point in this process (no
    second TensorFlow import) while a thread watches its metrics and kills the site: what is
    killed is the site, not the job. Returns what a test needs: the job's arguments and result,
    the workers, their ports and the site names."""
    import threading
    import time

    app, cfg = resolve_job("healthcare", None, ["data.n_clients=2"])
    names = [client.name for client in app.prepare(cfg).data.clients]
    for name in names:
        prepare_site(app, cfg, tmp_path / name, name)
    ports = [portpicker.pick_unused_port() for _ in names]
    workers = [Worker(tmp_path, port) for port in ports]
    sites = write_sites(tmp_path / "sites.toml", [(n, w.address, tmp_path / n) for n, w in zip(names, workers)])
    job = ["run", "healthcare", "--set", "data.n_clients=2",
           "--set", f"train.rounds={ROUNDS}", "--set", "train.checkpoint_every=2", "--set", "train.local_epochs=4",
           "--set", f"clients.quorum={quorum}",
           "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
           "--set", f'job.runs_dir="{tmp_path / "runs"}"', "--sites", str(sites), "--run-id", "lost", *extra]
    metrics = tmp_path / "runs" / "healthcare" / "lost" / "metrics.jsonl"
    finished, killed_after = threading.Event(), []

    def kill_the_second_site_after_round_3():
        while not finished.is_set():
            if metrics.exists() and len(lines := metrics.read_text().splitlines()) >= 3:
                os.killpg(workers[1].proc.pid, signal.SIGKILL)  # the site and its worker, mid-run
                workers[1].proc.wait()
                killed_after.append(len(lines))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_second_site_after_round_3)
    killer.start()
    try:
        first = tff_apps_in_process(*job)
    finally:
        finished.set()
        killer.join()
    assert killed_after and killed_after[0] < ROUNDS, (killed_after, first.stderr[-3000:])  # killed mid-run
    return SimpleNamespace(job=job, code=first.returncode, stderr=first.stderr, workers=workers, ports=ports,
                           names=names, metrics=metrics, run_dir=tmp_path / "runs" / "healthcare" / "lost")


def test_a_site_lost_below_the_quorum_fails_the_run_in_one_line_and_the_run_id_resumes(tmp_path):
    lost = lose_a_site_mid_run(tmp_path, quorum=2)
    try:
        assert lost.code != 0
        errors = [line for line in lost.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors == lost.stderr.strip().splitlines()[-1:], lost.stderr[-3000:]
        assert errors[0].startswith(f"error: site {lost.names[1]} 127.0.0.1:{lost.ports[1]} stopped answering")
        lost.workers[1] = Worker(tmp_path, lost.ports[1])  # the site comes back
        again = tff_apps_in_process(*lost.job)  # the same command
        assert again.returncode == 0, again.stderr[-3000:]
        done = summary(lost.run_dir)
        assert done["status"] == "succeeded" and done["resumed"] is True and done["rounds"] == ROUNDS
        assert [json.loads(line)["round"] for line in lost.metrics.read_text().splitlines()] == list(range(1, ROUNDS + 1))
    finally:
        for worker in lost.workers:
            if worker.proc.poll() is None:
                worker.stop()


def test_a_site_lost_within_the_quorum_leaves_the_round_to_the_others(tmp_path):
    lost = lose_a_site_mid_run(tmp_path, 1, "--set", "personalization.epochs=1", "--set", "evaluate.local_baseline=true",
                               "--set", "evaluate.baseline_epochs=1")
    try:
        assert lost.code == 0, lost.stderr[-3000:]
        # logged in the run's log (in a process of its own, a user's terminal shows it too)
        assert f"site {lost.names[1]} (127.0.0.1:{lost.ports[1]}) stopped answering" in (lost.run_dir / "run.log").read_text()
        rounds = [json.loads(line) for line in lost.metrics.read_text().splitlines()]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        kept = [r for r in rounds if r["clients"] == lost.names]
        assert 3 <= len(kept) < ROUNDS and rounds[: len(kept)] == kept  # until the site was lost
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
