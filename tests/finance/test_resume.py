"""Finance checkpoints and resumes: a job SIGKILLed mid-epoch and run again with the same run
id ends with an uninterrupted run's weights; with label DP the resumed run replays the noise
the killed attempt drew, and ε counts every epoch once."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cli import tff_apps_in_process
from tests.tff_apps.program.test_resume import Job, alive, metric_lines, workers_in_session

SMALL = [
    "--set", "train.rounds=6", "--set", "train.checkpoint_every=2", "--set", "train.batch_size=32",
    "--set", "train.eval_every=3", "--set", "evaluate.centralized_baseline=false",
    "--set", "evaluate.local_baseline=false", "--set", "export.enabled=false",
]
KILL_AFTER_EPOCHS = 3  # the checkpoint of epoch 2 is on disk; the job is inside epoch 4


@pytest.fixture(scope="module")
def runtime():
    from tff_apps.runtime.context import Runtime

    with Runtime() as rt:
        yield rt


def kill_after(job: Job, run_dir: Path, epochs: int, found: dict) -> None:
    """SIGKILLs `job` as soon as its metrics.jsonl has `epochs` lines (runs in a thread)."""
    deadline = time.monotonic() + 240
    while metric_lines(run_dir) < epochs and job.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    found["workers"] = workers_in_session(job.proc.pid)
    os.kill(job.proc.pid, signal.SIGKILL)
    job.proc.wait()
    found["lines"] = metric_lines(run_dir)


def party_weights(run_dir: Path, epoch: int) -> dict[str, list[np.ndarray]]:
    arrays = {}
    for party in ("lender", "partner"):
        with np.load(run_dir / "checkpoints" / party / f"epoch_{epoch}.npz") as saved:
            arrays[party] = [saved[k] for k in sorted(saved.files) if k != "noise_rng"]
    return arrays


def uninterrupted_run(runs: Path, run_id: str) -> Path:
    """The same job trained in this process (inside the module's runtime), left alone."""
    from tff_apps.program.job import Run, resolve_job

    overrides = [value for value in SMALL if value != "--set"]
    app, cfg = resolve_job("finance", None, [*overrides, f'job.runs_dir="{runs}"', f"job.run_id={run_id}"])
    run_dir = runs / "finance" / run_id
    run_dir.mkdir(parents=True)
    summary = app.train(cfg, app.prepare(cfg), Run(app.name, run_id, run_dir, cfg))
    kept = {k: summary[k] for k in ("bytes_total", "tff_calls")}
    (run_dir / "summary.json").write_text(json.dumps({**kept, "auc": summary["results"]["vertical"]["auc"]}))
    return run_dir


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(runtime, tmp_path: Path):
    runs = tmp_path / "runs"
    where = ["--set", f'job.runs_dir="{runs}"']
    killed_dir = runs / "finance" / "killed"
    killed = Job(tmp_path, "killed", [sys.executable, "-m", "tff_apps.cli", "run", "finance", *SMALL, *where, "--run-id", "killed"])
    kill: dict = {}
    killer = threading.Thread(target=kill_after, args=(killed, killed_dir, KILL_AFTER_EPOCHS, kill))
    killer.start()
    full_dir = uninterrupted_run(runs, "full")  # meanwhile
    killer.join()
    assert KILL_AFTER_EPOCHS <= kill["lines"] < 6, killed.stderr[-2000:]  # killed before training ended
    time.sleep(0.5)
    assert len(kill["workers"]) == 1 and not alive(kill["workers"][0])  # its TFF worker died with it
    resumed = tff_apps_in_process("run", "finance", *SMALL, *where, "--run-id", "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["resumed"] is True
    assert summary["checkpoints"] == {"every_epochs": 2, "resumed_after_epoch": 2 * (kill["lines"] // 2)}
    full_weights, resumed_weights = party_weights(full_dir, 6), party_weights(killed_dir, 6)
    difference = max(
        float(np.max(np.abs(a - b))) for p in full_weights for a, b in zip(full_weights[p], resumed_weights[p])
    )
    print(f"max |weight difference| after SIGKILL mid-epoch and resume: {difference:.3g}")
    assert difference == 0.0
    epochs = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in epochs] == [e["loss"] for e in reference]
    full_summary = json.loads((full_dir / "summary.json").read_text())
    assert summary["bytes_total"] == full_summary["bytes_total"]
    assert summary["results"]["vertical"]["auc"] == full_summary["auc"]
    assert summary["tff_calls"] == full_summary["tff_calls"]  # each epoch's calls counted once (the checkpoint's count)
    assert sorted(p.name for p in (killed_dir / "checkpoints" / "lender").iterdir()) == ["epoch_4.npz", "epoch_6.npz"]


class Interrupted(Exception):
    pass


def test_label_dp_resume_replays_the_noise_and_counts_each_epoch_once(runtime, tmp_path, monkeypatch):
    """In one process: the 'OS' generators made predictable so that an interrupted and resumed
    run can be held against an uninterrupted one with the same draws; the resumed process
    starts with other generators, which the checkpoint replaces."""
    from tff_apps.learning.vertical import VerticalSettings
    from tff_apps.program import vertical_rounds

    rng = np.random.default_rng(0)
    x = [rng.normal(size=(96, 3)).astype(np.float32), rng.normal(size=(96, 2)).astype(np.float32)]
    y = (x[0][:, 0] + x[1][:, 0] + rng.normal(size=96) > 0).astype(np.float32)
    settings = VerticalSettings(
        epochs=4, batch_size=32, learning_rate=0.1, optimizer="adam", kind="mlp", hidden_units=3,
        label_noise_multiplier=1.0, partial_noise_std=0.1,
    )
    draws = itertools.count(100)
    monkeypatch.setattr(vertical_rounds, "unseeded_generator", lambda: np.random.default_rng(next(draws)))

    def train(run_dir):
        return vertical_rounds.train_vertical(x, y, settings, run_dir=run_dir, checkpoint_every=2, progress=False)

    full = train(tmp_path / "full")
    draws = itertools.count(100)  # the first attempt draws as the uninterrupted run did
    chunks, original = itertools.count(1), vertical_rounds._Training._chunk

    def interrupted(self, *args):
        if next(chunks) == 4:  # epoch 4's batches (one chunk), after the lender drew their label noise
            raise Interrupted
        return original(self, *args)

    monkeypatch.setattr(vertical_rounds._Training, "_chunk", interrupted)
    with pytest.raises(Interrupted):
        train(tmp_path / "cut")
    first_attempt = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    monkeypatch.setattr(vertical_rounds._Training, "_chunk", original)
    draws = itertools.count(900)  # a new process: other OS draws, until the checkpoint's replace them
    resumed = train(tmp_path / "cut")

    assert resumed.resumed_after_epoch == 2 and [e["epoch"] for e in first_attempt] == [1, 2, 3]
    for a, b in zip(full.party_weights, resumed.party_weights):
        for wa, wb in zip(a, b):
            np.testing.assert_array_equal(wa, wb)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    # epoch 3 ran twice and released the same noisy gradients both times: the same losses
    assert records[2]["loss"] == first_attempt[2]["loss"] == full.history[2]["loss"]
    expected = [vertical_rounds.label_dp_epsilon(1.0, e, settings.delta) for e in (1, 2, 3, 4)]
    assert [r["label_epsilon"] for r in records] == pytest.approx(expected, rel=1e-12)
    assert resumed.label_dp["epsilon"] == pytest.approx(expected[-1], rel=1e-12) and resumed.label_dp["epochs"] == 4
    assert resumed.coordinator.step == full.coordinator.step == 12
