"""Finance across sites: a lender and two partners, each a `tff-apps site serve` on its own
folder (FATE-layout CSVs whose column names overlap), with root in its own mount namespace
where the folder is a private tmpfs. The coordinator is SIGKILLed after the first epoch's
checkpoint and re-run with the same run id; the parties' final weights, read at their sites,
must be the simulation's of the same files."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import portpicker
import pytest
import tensorflow as tf

from finance.sites import _check_parties
from shared.errors import UserError
from tests.cli import tff_apps_in_process, user_environment
from tests.finance.three_parties import write_party_csvs
from tff_apps.program.job import resolve_job
from tff_apps.sites.certs import make_test_pki
from tff_apps.sites.prepare import prepare_site
from tff_apps.sites.sites_config import SiteRef

NAMES = ["lender", "partner", "partner2"]
EPOCHS = 2
JOB = ["--set", f"train.rounds={EPOCHS}", "--set", "train.batch_size=32", "--set", "train.checkpoint_every=1",
       "--set", "train.eval_every=1", "--set", "evaluate.centralized_baseline=false",
       "--set", "evaluate.local_baseline=false"]
ISOLATED = os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("nsenter") is not None


class PartySite:
    """`tff-apps site serve` for one party (worker on loopback). Isolated: in its own mount
    namespace, where its data folder is a private tmpfs holding its files."""

    def __init__(self, base: Path, name: str, port: int):
        self.name, self.port, self.folder = name, port, base / name
        serve = [sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", str(self.folder), "--port", str(port),
                 "--certs", str(base / "pki"), "--name", name, "--audit", str(base / f"{name}-audit.jsonl"),
                 "--host", "127.0.0.1", "--isolation", "none"]
        argv = serve
        if ISOLATED:
            archive = base / f"{name}.tar"
            subprocess.run(["tar", "-cf", str(archive), "-C", str(self.folder), "."], check=True)
            shutil.rmtree(self.folder)
            self.folder.mkdir()  # in every other namespace: an empty folder
            script = (f'mount -t tmpfs none "{self.folder}" && tar -xf "{archive}" -C "{self.folder}" && '
                      f'rm "{archive}" && exec {shlex.join(serve)}')
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=user_environment())

    def ready(self) -> "PartySite":
        line = self.proc.stdout.readline()
        assert f"site {self.name} listening" in line, line
        return self

    def read(self, relative: str) -> bytes:
        """A file of the site's folder, as the site sees it."""
        if not ISOLATED:
            return (self.folder / relative).read_bytes()
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "cat", str(self.folder / relative)],
                              check=True, capture_output=True).stdout

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def state_weights(raw: bytes, width: int, own: int) -> np.ndarray:
    """A party's logistic weights (kernel rows of its own columns, bias) out of its state file."""
    flat = tf.io.parse_tensor(raw, tf.float32).numpy()
    return np.concatenate([flat[:own], flat[width : width + 1]])


def killed_after_first_checkpoint(job: list[str], run_dir: Path) -> int:
    """The coordinator as its own process, SIGKILLed once epoch 1's checkpoint is written."""
    proc = subprocess.Popen([sys.executable, "-m", "tff_apps.cli", *job], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=user_environment())
    checkpoint = run_dir / "checkpoints" / "coordinator" / "epoch_1.json"
    while proc.poll() is None and not checkpoint.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


@pytest.fixture(scope="module")
def across_sites(tmp_path_factory):
    base = tmp_path_factory.mktemp("finance_sites")
    (base / "csv").mkdir()
    job_file = write_party_csvs(base / "csv")
    app, cfg = resolve_job("finance", str(job_file), [])
    for name in NAMES:
        prepare_site(app, cfg, base / name, name)
    make_test_pki(base / "pki", NAMES)
    sites = [PartySite(base, name, portpicker.pick_unused_port()) for name in NAMES]
    runs = base / "runs"
    common = ["run", "finance", "--config", str(job_file), *JOB, "--set", f'job.runs_dir="{runs}"']
    try:
        sites = [site.ready() for site in sites]
        (base / "sites.toml").write_text("".join(
            f'[[site]]\nname = "{s.name}"\naddress = "127.0.0.1:{s.port}"\ndata = "{s.folder}"\n'
            'ca = "pki/ca.pem"\ncert = "pki/coordinator.pem"\nkey = "pki/coordinator.key"\n\n' for s in sites
        ))
        at_sites = [*common, "--sites", str(base / "sites.toml"), "--run-id", "sites"]
        killed = killed_after_first_checkpoint(at_sites, runs / "finance" / "sites")
        resumed = tff_apps_in_process(*at_sites)
        summary = json.loads((runs / "finance" / "sites" / "summary.json").read_text())
        widths = summary["data"]["encoded_widths"]
        final = {s.name: s.read(f"runs/sites/state-e{EPOCHS}") for s in sites}
        cards = {s.name: json.loads(s.read(f"runs/sites/export/finance_{s.name}/1/model_card.json")) for s in sites}
        masks = {s.name: np.frombuffer(s.read(f"runs/sites/masks-train-e{EPOCHS}.i64"), "<i8") for s in sites}
        seen_by_coordinator = [sorted(p.name for p in s.folder.iterdir()) for s in sites]
        (base / "out").mkdir()  # the lender writes its scores here (outside its private folder, for the test)
        scored = tff_apps_in_process("score", "sites", "--sites", str(base / "sites.toml"), "--output",
                                     str(base / "out" / "scores.csv"),
                                     *[f"--input={name}={base / 'csv' / name}.csv" for name in NAMES])
    finally:
        codes = [site.stop() for site in sites]
    simulated = tff_apps_in_process(*common, "--run-id", "simulated")
    scored_simulated = tff_apps_in_process("score", str(runs / "finance" / "simulated" / "export"), "--output",
                                           str(base / "out" / "simulated.csv"),
                                           *[f"--input={name}={base / 'csv' / name}.csv" for name in NAMES])
    return SimpleNamespace(base=base, runs=runs, killed=killed, resumed=resumed, simulated=simulated, codes=codes,
                           summary=summary, widths=widths, final=final, cards=cards, seen=seen_by_coordinator, masks=masks,
                           scored=scored, scored_simulated=scored_simulated)


def test_killed_and_resumed_at_the_sites_the_parties_end_with_the_simulations_weights(across_sites):
    f = across_sites
    assert f.killed == -signal.SIGKILL
    assert f.resumed.returncode == 0, f.resumed.stderr[-3000:]
    assert f.simulated.returncode == 0, f.simulated.stderr[-3000:]
    assert f.summary["checkpoints"]["resumed_after_epoch"] >= 1
    width = max(f.widths.values())
    checkpoints = f.runs / "finance" / "simulated" / "checkpoints"
    for name in NAMES:
        with np.load(checkpoints / name / f"epoch_{EPOCHS}.npz") as saved:
            expected = np.concatenate([saved["w0"].ravel(), saved["w1"].ravel()])
        got = state_weights(f.final[name], width, f.widths[name])
        # the same mathematics: only float summation order may differ (fixed-point bound 2.3e-4)
        assert np.max(np.abs(got - expected)) < 1e-5, name
    simulated = json.loads((f.runs / "finance" / "simulated" / "summary.json").read_text())
    auc_sites, auc_simulated = f.summary["results"]["vertical"]["auc"], simulated["results"]["vertical"]["auc"]
    assert auc_sites == pytest.approx(auc_simulated, abs=0.002)  # histograms of 4096 bins at the lender
    assert f.codes == [0, 0, 0]


def test_each_partys_export_is_written_at_its_site_with_only_its_own_columns(across_sites):
    f = across_sites
    for name, card in f.cards.items():
        assert card["party"] == name and card["trained_across_sites"] == NAMES
        assert card["metrics"]["auc"] == f.summary["results"]["vertical"]["auc"]
        others = {"lender": "grade", "partner": "income", "partner2": "tenure"}
        for other, column in others.items():
            assert (column in json.dumps(card["encoder"])) == (other == name)
    assert set(f.summary["exports_at_sites"]) == set(NAMES)


def test_the_coordinator_never_holds_a_row_an_id_or_a_partners_column(across_sites):
    f = across_sites
    if ISOLATED:
        assert f.seen == [[], [], []]  # the sites' folders, as the coordinator's namespace sees them
    text = "".join(p.read_text(errors="replace") for p in (f.runs / "finance" / "sites").rglob("*") if p.is_file())
    for secret in ("C00042", "c00042", "income", "tenure"):
        assert secret not in text
    assert not (f.runs / "finance" / "sites" / "export").exists()
    assert "masked at each party's worker with pairwise masks" in f.summary["privacy"]["secure_sum"]


def test_each_partys_partial_scores_enter_the_sum_under_masks_that_cancel(across_sites):
    """The masks the sites wrote for the last epoch: each uniform in the ring, together zero in
    it (the weights matching the simulation's shows the sum decoded exactly)."""
    from tff_apps.learning.vertical import SecureScoreSum
    from tff_apps.learning.vertical_sites import ring_bits

    f = across_sites
    bits = ring_bits(SecureScoreSum(len(NAMES), 32.0))
    masks = [f.masks[name] for name in NAMES]
    assert {len(m) for m in masks} == {f.summary["data"]["train_customers"]}  # one per training row
    assert np.all(np.sum(masks, axis=0) % 2**bits == 0)
    for mask in masks:
        assert 0 <= mask.min() and mask.max() < 2**bits
        # half the ring's upper half (5.7 sigma either side); an unmasked fixed-point score is below 2^(bits-2)
        assert 0.3 < np.mean(mask >= 2 ** (bits - 1)) < 0.7


def site(name: str, tls: bool = True) -> SiteRef:
    return SiteRef(name, f"127.0.0.1:{len(name) + 7000}", f"/srv/{name}", *(("ca", "cert", "key") if tls else ()))


def manifest(name: str, role: str = "partner") -> dict:
    return {"app": "finance", "site": name, "role": role, "rows": {"customers": 10}}


@pytest.mark.parametrize(("sites", "manifests", "message"), [
    ([site("partner"), site("lender")], [manifest("partner"), manifest("lender", "lender")],
     "finance needs the lender's site first"),
    ([site("lender"), site("partner", tls=False)], [manifest("lender", "lender"), manifest("partner")],
     "site partner has no ca, cert and key"),
    ([site("lender"), site("bank")], [manifest("lender", "lender"), manifest("partner")],
     "site bank: its folder holds party 'partner'"),
    ([site("lender"), site("partner")], [manifest("lender", "lender"), {"app": "healthcare", "site": "partner"}],
     "is not a finance party's"),
])
def test_sites_that_cannot_train_together_are_refused_in_one_line(sites, manifests, message):
    with pytest.raises(UserError, match=message) as refused:
        _check_parties(sites, manifests)
    assert "\n" not in str(refused.value)


def test_score_at_the_sites_gives_the_simulated_exports_probabilities(across_sites):
    f = across_sites
    assert f.scored.returncode == 0, f.scored.stderr[-3000:]
    assert f.scored_simulated.returncode == 0, f.scored_simulated.stderr[-3000:]
    assert "-> site lender: " in f.scored.stdout
    at_sites = pd.read_csv(f.base / "out" / "scores.csv")
    simulated = pd.read_csv(f.base / "out" / "simulated.csv")
    assert list(at_sites["id"]) == list(simulated["id"]) and len(at_sites) == 320 - 20 - 10  # every party's customers
    # the weights agree to 1e-5 and each sum is within 2^-17 per party of the plain sum
    assert np.max(np.abs(at_sites["probability"] - simulated["probability"])) < 1e-4


def test_score_at_the_sites_needs_one_csv_per_party_in_one_line():
    from finance.site_scoring import _check_inputs

    with pytest.raises(UserError, match="give one CSV per party, a path at its site") as refused:
        _check_inputs(["lender", "partner"], {"lender": "a.csv", "bank": "b.csv"})
    assert "missing partner" in str(refused.value) and "unknown party bank" in str(refused.value)
    assert "\n" not in str(refused.value)
