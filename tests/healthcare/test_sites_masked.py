"""Masked secure aggregation at the sites: three `tff-apps site serve` processes (breast
cancer, one hospital each) mask their own updates; the coordinator relays and unmasks.

One job, run twice with the same run id (2 rounds, a checkpoint after each):
  1. round 2: sites 2 and 3 are SIGKILLed after sending their masked inputs, before the
     unmask request: 1 answer < t = 2, so the round fails in one line, no update applied;
  2. the two sites restart; the run id resumes at round 2, where site 3 is SIGKILLed after its
     masked input: the round completes from the survivors' shares.
Every byte the coordinator receives on the masking channels is recorded, and each round's
true encoded updates are recomputed afterwards (the same TFF computation, run locally on the
sites' folders) to compare with what the coordinator saw.
Then, at the same sites (site 3 restarted), distributed DP (`privacy.level = "client"` with
masking: each site adds its noise share before its gateway masks), 2 rounds, and a
simulation of that job (TFF's distributed DP aggregator run whole) to compare models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import portpicker
import pytest
from scipy import stats

from shared import secagg_wire as wire
from shared.secagg_ring import dequantize, quantization_error_bound, quantize
from tests.cli import tff_apps_in_process, user_environment
from tests.tff_apps.sites.coordinator import Recorder
from tff_apps.program.job import resolve_job
from tff_apps.sites import masked_rounds
from tff_apps.sites.certs import make_test_pki
from tff_apps.sites.prepare import prepare_site

JOB = ["--set", "data.n_clients=3", "--set", "train.rounds=2", "--set", "train.checkpoint_every=1",
       "--set", "train.eval_every=2", "--set", "evaluate.centralized_baseline=false",
       "--set", "evaluate.local_baseline=false", "--set", "privacy.profiles=none",
       "--set", "privacy.secure_aggregation=masked", "--set", "privacy.secure_threshold=0.6", "--run-id", "masked"]

DDP_CLIP, DDP_NOISE = 1.0, 0.01  # noise far above the rounding (1/scale ~ 1e-5), small enough to train
DDP_JOB = [*JOB[:JOB.index("--run-id")], "--set", "privacy.level=client", "--set", "privacy.clipping=fixed",
           "--set", f"privacy.noise_multiplier={DDP_NOISE}", "--set", f"privacy.clip_norm={DDP_CLIP}",
           "--set", "train.algorithm=fedavg_unweighted", "--set", "train.checkpoint_every=0"]


class Site:
    """`tff-apps site serve` for one hospital (worker on loopback: `--isolation none`)."""

    def __init__(self, base: Path, name: str, port: int):
        self.name, self.port, self.base = name, port, base
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", str(base / name), "--port", str(port),
             "--certs", str(base / "pki"), "--name", name, "--audit", str(base / f"{name}-audit.jsonl"),
             "--host", "127.0.0.1", "--isolation", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=user_environment(),
        )

    def ready(self) -> Site:
        line = self.proc.stdout.readline()
        assert f"site {self.name} listening" in line, line
        return self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the gateway and its worker, at once
        self.proc.wait()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


class Observer:
    """What the test attaches to the coordinator: recorders on the masking channels, each
    round's input state and total, and the sites to kill between masked input and unmask."""

    def __init__(self, monkeypatch, sites: list[Site]):
        self.recorders: dict[int, Recorder] = {}
        self.rounds: list[dict] = []
        self.kill_plan: list[list[int]] = []
        opened, next_, finish, unmask = (masked_rounds.site_channels, masked_rounds.MaskedSiteProcess.next,
                                         masked_rounds.MaskedSiteProcess._finish, masked_rounds.MaskedSiteProcess._unmask)

        def site_channels(*args):
            make = opened(*args)

            def channel(index):
                import grpc

                self.recorders[index] = self.recorders.get(index) or Recorder()
                return grpc.intercept_channel(make(index), self.recorders[index])

            return channel

        def record_next(process, state, references):
            self.rounds.append({"process": process, "state": state, "references": list(references),
                                "calls": {i: len(r.calls) for i, r in self.recorders.items()}})
            return next_(process, state, references)

        def record_finish(process, state, publics, total, server, traffic, started):
            self.rounds[-1]["total"] = total.copy()
            return finish(process, state, publics, total, server, traffic, started)

        def kill_then_unmask(process, *args):
            for index in self.kill_plan.pop(0) if self.kill_plan else []:
                sites[index].kill()
            return unmask(process, *args)

        monkeypatch.setattr(masked_rounds, "site_channels", site_channels)
        monkeypatch.setattr(masked_rounds.MaskedSiteProcess, "next", record_next)
        monkeypatch.setattr(masked_rounds.MaskedSiteProcess, "_finish", record_finish)
        monkeypatch.setattr(masked_rounds.MaskedSiteProcess, "_unmask", kill_then_unmask)

    def masked_vectors(self, cfg) -> dict[int, list[np.ndarray]]:
        """Site index -> the masked vectors it sent, parsed from the recorded responses."""
        found: dict[int, list[np.ndarray]] = {}
        for index, recorder in self.recorders.items():
            for method, _, response in recorder.calls:
                if method == "MaskedInput":
                    found.setdefault(index, []).append(wire.masked_from_json(wire.loads(response)["masked"], cfg).masked)
        return found


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("masked_sites")
    app, cfg = resolve_job("healthcare", None, ["data.n_clients=3"])
    names = [client.name for client in app.prepare(cfg).data.clients]
    for name in names:
        prepare_site(app, cfg, base / name, name)
    make_test_pki(base / "pki", names)
    sites = [site.ready() for site in [Site(base, name, portpicker.pick_unused_port()) for name in names]]
    (base / "sites.toml").write_text("".join(
        f'[[site]]\nname = "{s.name}"\naddress = "127.0.0.1:{s.port}"\ndata = "{base / s.name}"\n'
        'ca = "pki/ca.pem"\ncert = "pki/coordinator.pem"\nkey = "pki/coordinator.key"\n\n' for s in sites
    ))
    job = ["run", "healthcare", *JOB, "--set", f'job.runs_dir="{base / "runs"}"', "--sites", str(base / "sites.toml"),
           "--set", "export.enabled=false"]  # no test reads this run's export (the distributed DP runs' it does)
    with pytest.MonkeyPatch.context() as monkeypatch:
        observer = Observer(monkeypatch, sites)
        try:
            observer.kill_plan = [[], [1, 2]]  # round 2: two of three sites lost after their masked input
            failed = tff_apps_in_process(*job)
            metrics_after_failure = (base / "runs" / "healthcare" / "masked" / "metrics.jsonl").read_text()
            for index in (1, 2):  # started side by side; the observer kills from this same list
                sites[index] = Site(base, names[index], sites[index].port)
            for index in (1, 2):
                sites[index].ready()
            observer.kill_plan = [[2]]  # resumed round 2: one site lost after its masked input
            resumed = tff_apps_in_process(*job)
            monkeypatch.undo()
            sites[2] = Site(base, names[2], sites[2].port).ready()
            ddp_observer = Observer(monkeypatch, sites)  # distributed DP at the same three sites
            ddp = tff_apps_in_process("run", "healthcare", *DDP_JOB, "--set", f'job.runs_dir="{base / "runs"}"',
                                      "--sites", str(base / "sites.toml"), "--run-id", "ddp")
        finally:
            codes = [site.stop() if site.proc.poll() is None else None for site in sites]
    simulated_ddp = tff_apps_in_process("run", "healthcare", *DDP_JOB, "--set", f'job.runs_dir="{base / "runs"}"',
                                        "--set", "privacy.secure_aggregation=simulated", "--run-id", "ddp_simulated")
    true_updates = recompute_updates(observer.rounds)
    return SimpleNamespace(base=base, names=names, failed=failed, resumed=resumed, observer=observer,
                           metrics_after_failure=metrics_after_failure, true_updates=true_updates, codes=codes,
                           ddp=ddp, simulated_ddp=simulated_ddp, ddp_observer=ddp_observer,
                           ddp_exact=exact_means(ddp_observer.rounds))


def recompute_updates(rounds: list[dict]) -> list[list[np.ndarray]]:
    """Each round's encoded update of each site, from the same computation run in the clear
    on this machine (the test can read the sites' folders; the coordinator did not)."""
    from tff_apps.runtime.context import Runtime

    updates = []
    with Runtime():
        for entry in rounds:
            site_round = entry["process"]._site_round
            updates.append([np.asarray(site_round(entry["state"], [ref])[0][0]) for ref in entry["references"]])
    return updates


def exact_means(rounds: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Distributed DP, per round: (the mean the coordinator decoded from the unmasked sum, the
    mean of the sites' L2-clipped updates without noise or rounding, from the same client phase
    run in the clear here: the coordinator could not)."""
    import tensorflow_federated as tff

    from tff_apps.runtime.context import Runtime

    means = []
    with Runtime():
        for entry in rounds:
            process = entry["process"]._process
            open_round = entry["process"]._open_round
            phase_type = process._client_phase.type_signature.parameter[0]

            @tff.federated_computation(phase_type, tff.FederatedType(open_round.type_signature.parameter, tff.CLIENTS))
            def updates(state, refs):
                return process._client_phase(state, tff.federated_map(open_round, refs))[2]

            flat = [np.concatenate([np.ravel(t) for t in u]).astype(np.float64) for u in updates(entry["state"], entry["references"])]
            clip = DDP_CLIP / np.maximum(DDP_CLIP, [np.linalg.norm(u) for u in flat])
            _, decoded, _ = process.split.decode(entry["state"].aggregator, entry["total"])
            means.append((np.concatenate([np.ravel(t) for t in decoded]), np.mean([u * c for u, c in zip(flat, clip)], axis=0)))
    return means


# A uniform sample fails this p-value once in 10^6 tests: a failure means a bias, not chance
# (a threshold of 1e-3, over the dozen tests here, failed one CI run in a few hundred).
UNIFORM_P = 1e-6


def uniformity(nibbles: np.ndarray) -> float:
    """Chi-square p-value that `nibbles` (values 0..15) are uniform."""
    return stats.chisquare(np.bincount(nibbles, minlength=16)).pvalue


def summary(fixture, run_id: str = "masked") -> dict:
    return json.loads((fixture.base / "runs" / "healthcare" / run_id / "summary.json").read_text())


def test_each_site_sends_a_uniform_vector_and_only_the_sum_is_the_true_sum(masked_run):
    process = masked_run.observer.rounds[0]["process"]
    cfg = process._secure.secagg_config(3)
    vectors = masked_run.observer.masked_vectors(cfg)
    assert sorted(vectors) == [0, 1, 2] and all(len(v) == 3 for v in vectors.values())  # 3 rounds started
    for index, sent in vectors.items():
        nibbles = np.concatenate([np.frombuffer(v.tobytes(), np.uint8) for v in sent])
        nibbles = np.concatenate([nibbles >> 4, nibbles & 15])
        assert uniformity(nibbles) > UNIFORM_P, index
    completed = [r for r in masked_run.observer.rounds if "total" in r]
    assert len(completed) == 2  # round 1, and round 2 resumed
    for entry in completed:
        truth = masked_run.true_updates[masked_run.observer.rounds.index(entry)]
        quantized = [quantize(x, cfg) for x in truth]
        # the plain updates are far from uniform: the statistic above can tell
        plain = np.concatenate([np.frombuffer(q.tobytes(), np.uint8) for q in quantized])
        assert uniformity(np.concatenate([plain >> 4, plain & 15])) < UNIFORM_P
        bound = quantization_error_bound(cfg, 3)
        assert np.max(np.abs(entry["total"] - np.sum(truth, axis=0))) <= bound + 1e-9
        # in fixed point: the sum of the quantized updates, up to a level per site where the
        # float64 work here and at the site rounded differently
        exact = np.sum([dequantize(q, cfg, 1) for q in quantized], axis=0)
        assert np.max(np.abs(entry["total"] - exact)) * cfg.scale <= 3 + 1e-6
    # no single update is in what the coordinator received, in float or in fixed point
    received = b"".join(
        response if isinstance(response, bytes) else response.SerializeToString()
        for recorder in masked_run.observer.recorders.values() for _, _, response in recorder.calls
    )
    for truth in masked_run.true_updates:
        for x in truth:
            for form in (x.tobytes(), x.astype(np.float32).tobytes(), quantize(x, cfg).tobytes(),
                         wire.b64(quantize(x, cfg).tobytes()).encode()):
                assert form[:32] not in received


def test_a_site_killed_after_its_masked_input_is_recovered_from_the_others_shares(masked_run):
    assert masked_run.resumed.returncode == 0, masked_run.resumed.stderr[-3000:]
    done = summary(masked_run)
    assert done["status"] == "succeeded" and done["resumed"] is True
    assert done["masking"]["where"].startswith("at the sites") and done["masking"]["sites_lost"] == [masked_run.names[2]]
    last = json.loads((masked_run.base / "runs" / "healthcare" / "masked" / "metrics.jsonl").read_text().splitlines()[-1])
    # its update is in the sum (3 survivors of the masking round), and evaluation leaves it out
    assert last["round"] == 2 and last["secagg_survivors"] == 3 and last["secagg_dropped"] == 0
    assert last["clients"] == masked_run.names
    assert list(done["results"]["federated"]["sites"]) == masked_run.names[:2]
    # the sum, so the model, is the one without the failure (within the quantization bound:
    # checked against the true updates in the test above); the site's gateway logged its part
    audit = [json.loads(line) for line in (masked_run.base / f"{masked_run.names[0]}-audit.jsonl").read_text().splitlines()]
    masking = [r for r in audit if r["method"].startswith("SiteMasking.") and r["run_id"] != "ddp"]  # ddp: the last job
    steps = [r["method"] for r in masking]
    assert steps.count("SiteMasking.MaskedInput") == 3 and steps.count("SiteMasking.Unmask") == 3
    assert all(r["status"] == "ok" and r["run_id"] == "masked" for r in masking)


def test_more_dropouts_than_the_threshold_allows_fail_the_round_in_one_line(masked_run):
    failed = masked_run.failed
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and "secure aggregation at the sites failed" in errors[0], failed.stderr[-3000:]
    assert "1 of 3 clients responded, the threshold is 2" in errors[0] and "no model update was applied" in errors[0]
    # no round 2 was written: the run resumed from the checkpoint of round 1
    assert [json.loads(line)["round"] for line in masked_run.metrics_after_failure.splitlines()] == [1]


def test_distributed_dp_at_the_sites_adds_each_sites_noise_and_accounts_it(masked_run):
    import dp_accounting

    assert masked_run.ddp.returncode == 0, masked_run.ddp.stderr[-3000:]
    done = summary(masked_run, "ddp")
    statement = done["privacy"]
    mechanism = statement["secure_aggregation"]
    assert mechanism["mode"] == "masked" and mechanism["ring_bits"] == 20
    assert mechanism["noise_added_by"].startswith("each site, on its own TFF worker")
    assert done["masking"]["noise"] == mechanism["noise_added_by"]
    # ε: an independent dp_accounting computation on the mechanism that ran (its effective z)
    z = mechanism["effective_noise_multiplier"]
    assert z >= DDP_NOISE and z == pytest.approx(DDP_NOISE, rel=1e-3)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), 2)  # replace-one: sensitivity 2C
    independent = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(statement["delta"])
    assert statement["rounds"] == 2 and statement["epsilon"] == pytest.approx(independent, rel=0.01)
    # each round: what the coordinator decoded is the exact mean of the clipped updates plus
    # Gaussian-like noise of the accounted size (the sites' discrete Gaussian shares)
    sigma = np.sqrt(3) * mechanism["local_noise_scale_integer"] / mechanism["scale_factor"] / 3
    rounds = masked_run.ddp_observer.rounds
    assert len(rounds) == 2 and all("total" in r for r in rounds)
    for decoded, exact in masked_run.ddp_exact:
        noise = decoded - exact
        assert np.max(np.abs(noise)) <= 6 * sigma and 0.5 * sigma <= np.std(noise) <= 1.6 * sigma, (noise, sigma)
    # the sites' masked vectors: words of the 20-bit ring, uniform in it
    cfg = rounds[0]["process"]._secure.secagg_config(3)
    for index, sent in masked_run.ddp_observer.masked_vectors(cfg).items():
        words = np.concatenate(sent)
        assert cfg.ring_bits == 20 and np.all(words < 2**20), index
        for nibble in (words >> 16, words & 15):
            assert uniformity(nibble) > UNIFORM_P, index
    # the model: a simulation of the same job (TFF's DistributedDpSumFactory run whole) within the noise
    assert masked_run.simulated_ddp.returncode == 0, masked_run.simulated_ddp.stderr[-3000:]
    weights = [np.load(masked_run.base / "runs" / "healthcare" / run / "export" / "healthcare" / "1" / "weights.npz")
               for run in ("ddp", "ddp_simulated")]
    difference = max(float(np.max(np.abs(weights[0][k] - weights[1][k]))) for k in weights[0].files)
    # two independent draws per round, 2 rounds: std at most 2 sigma (local SGD on a convex loss
    # shrinks round 1's deviation); 12 sigma = 6 std. Measured here: 5.6 sigma.
    assert difference <= 12 * sigma, (difference, sigma)
