"""Operations with the real healthcare job through the `tff-apps` command: SIGKILL in the
middle of a round and resume, DP resume (ε and the lifetime ledger), the same run id twice,
two processes on one run id, and the exit codes.

The jobs run side by side (2 cores) to keep the module short: an uninterrupted run and a
twin started at the same moment on the same run id, a run killed mid-round, a DP run killed
mid-round; then the two killed runs are resumed. (Exit code 3, a budget refusal, and 1, an
internal error, are in test_runs.py and tests/healthcare/test_privacy_jobs.py.)
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
import pytest
import tensorflow as tf

from tests.cli import tff_apps, tff_apps_in_process, user_environment
from tests.tff_apps.program.test_metrics_log import event_steps
from tff_apps.privacy import dp_events
from tff_apps.privacy import accounting
from tff_apps.privacy import dp_config
from tff_apps.privacy.ledger import Ledger
from tff_apps.program.runs import list_runs

SMALL = [
    "--set", "train.rounds=6", "--set", "train.checkpoint_every=2", "--set", "train.clients_per_round=3",
    "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
    "--set", "export.enabled=false",
]
Z = 1.0
DP = [
    "--set", "privacy.level=client", "--set", "privacy.clipping=fixed",
    "--set", f"privacy.noise_multiplier={Z}", "--set", "privacy.lifetime_epsilon=100",
]
KILL_AFTER_LINES = 3  # checkpoint at round 2 is on disk; the process is inside round 4 or so


def command(runs: Path, run_id: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tff_apps.cli", "run", "healthcare", *SMALL, *extra,
        "--set", f'job.runs_dir="{runs}"', "--run-id", run_id,
    ]


class Job:
    """One `tff-apps run` in its own session, output to files (nothing to block on)."""

    def __init__(self, logs: Path, name: str, args: list[str]):
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=err, start_new_session=True, env=user_environment()
            )

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    @property
    def stdout(self) -> str:
        return self.out.read_text()


def workers_in_session(session_id: int) -> list[int]:
    """Pids of live TFF worker processes in the session (the command's own, nobody else's)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z" and b"worker_binary" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def metric_lines(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_mid_round(jobs: dict[str, tuple[Job, Path]]) -> dict[str, dict]:
    """SIGKILLs each job as soon as its metrics.jsonl has KILL_AFTER_LINES lines."""
    killed: dict[str, dict] = {}
    deadline = time.monotonic() + 240
    while len(killed) < len(jobs):
        for name, (job, run_dir) in jobs.items():
            if name in killed:
                continue
            assert job.proc.poll() is None, f"{name} ended before it was killed: {job.stderr[-2000:]}"
            if metric_lines(run_dir) >= KILL_AFTER_LINES:
                workers = workers_in_session(job.proc.pid)
                os.kill(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
                killed[name] = {"lines": metric_lines(run_dir), "workers": workers}
        assert time.monotonic() < deadline, "the jobs did not reach the kill point"
        time.sleep(0.005)
    return killed


def checkpoint_leaves(run_dir: Path, round_number: int) -> list[np.ndarray]:
    """Every value of the program state saved after `round_number` (model, optimizer, ...)."""
    saved = tf.saved_model.load(str(run_dir / "checkpoints" / f"round_{round_number}"))()
    return [np.asarray(leaf) for leaf in tf.nest.flatten(saved)]


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _CurrentStderr:
    """A stream that writes to whatever sys.stderr is at the time of writing."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def resume_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`tff-apps run ...` (args as `command` gives them) in this process, its log warnings in
    its stderr as a process of its own prints them: there, absl's first log call finds no
    handler on the root logger and calls `logging.basicConfig()` (a stderr handler); here,
    pytest's handlers are on the root logger, so the test adds that stderr handler."""
    import logging

    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        return tff_apps_in_process(*args[3:])
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def ops(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("ops")
    runs, dp_runs = base / "runs", base / "dp"
    logs = base / "logs"
    logs.mkdir()
    full = Job(logs, "full", command(runs, "full"))
    twin = Job(logs, "twin", command(runs, "full"))  # the same run id at the same moment
    killed = Job(logs, "killed", command(runs, "killed"))
    dp_killed = Job(logs, "dp_killed", command(dp_runs, "dp", *DP))
    kills = kill_mid_round(
        {"killed": (killed, runs / "healthcare" / "killed"), "dp": (dp_killed, dp_runs / "healthcare" / "dp")}
    )
    worker_deadline = time.monotonic() + 10
    while any(alive(p) for k in kills.values() for p in k["workers"]) and time.monotonic() < worker_deadline:
        time.sleep(0.05)
    surviving = [p for k in kills.values() for p in k["workers"] if alive(p)]
    after_kill = {record.run_id: record.shown_status for record in list_runs(runs)}
    # the killed runs resume through the CLI's entry point in this process (the same command
    # without two more TensorFlow imports), while the uninterrupted run and its twin finish
    resumed = resume_in_process(command(runs, "killed"))
    dp_resumed = resume_in_process(command(dp_runs, "dp", *DP))
    codes = {name: job.wait() for name, job in {"full": full, "twin": twin}.items()}
    codes.update(resumed=resumed.returncode, dp_resumed=dp_resumed.returncode)
    return SimpleNamespace(
        runs=runs, dp_runs=dp_runs, jobs=dict(full=full, twin=twin, resumed=resumed, dp_resumed=dp_resumed),
        codes=codes, kills=kills, surviving=surviving,
        after_kill=after_kill,
    )


def test_sigkill_mid_round_then_resume_ends_with_the_uninterrupted_weights(ops):
    assert ops.codes["resumed"] == 0, ops.jobs["resumed"].stderr[-3000:]
    killed = ops.kills["killed"]
    assert KILL_AFTER_LINES <= killed["lines"] < 6  # killed before training ended
    assert len(killed["workers"]) == 1 and ops.surviving == []  # its TFF worker died with it
    full_dir, resumed_dir = ops.runs / "healthcare" / "full", ops.runs / "healthcare" / "killed"
    assert "took over a stale lock" in ops.jobs["resumed"].stderr
    full, resumed = checkpoint_leaves(full_dir, 6), checkpoint_leaves(resumed_dir, 6)
    assert len(full) == len(resumed) > 2
    floats = [(a, b) for a, b in zip(full, resumed) if a.dtype.kind == "f"]
    difference = max(float(np.max(np.abs(a - b))) for a, b in floats)
    print(f"max |weight difference| after SIGKILL and resume: {difference:.3g}")
    assert all(np.allclose(a, b, atol=1e-6, rtol=0) for a, b in floats)
    # metrics.jsonl: every round once, the same sampled clients and losses as uninterrupted
    full_rounds, resumed_rounds = rounds_of(full_dir), rounds_of(resumed_dir)
    assert [r["round"] for r in resumed_rounds] == [1, 2, 3, 4, 5, 6]
    assert [r["clients"] for r in resumed_rounds] == [r["clients"] for r in full_rounds]
    assert [r["train_loss"] for r in resumed_rounds] == pytest.approx([r["train_loss"] for r in full_rounds], abs=1e-6)
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["resumed"] is True and summary["rounds"] == 6
    assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["round_4", "round_6"]


def test_dp_run_killed_and_resumed_spends_the_uninterrupted_epsilon_once(ops):
    assert ops.codes["dp_resumed"] == 0, ops.jobs["dp_resumed"].stderr[-3000:]
    assert KILL_AFTER_LINES <= ops.kills["dp"]["lines"] < 6
    run_dir = ops.dp_runs / "healthcare" / "dp"
    summary = json.loads((run_dir / "summary.json").read_text())
    sampling = dp_config.ClientSampling(5, 3)
    uninterrupted = [  # ε after each round of the same job left alone
        accounting.epsilon(dp_events.dp_event(Z, sampling, r, "fixed"), 1e-5, "rdp") for r in range(1, 7)
    ]
    rounds = rounds_of(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert [r["epsilon"] for r in rounds] == pytest.approx(uninterrupted, rel=1e-9)
    # TensorBoard shows each round once: the killed attempt's rounds after the checkpoint are gone
    assert event_steps(run_dir / "tensorboard")["epsilon"] == [1, 2, 3, 4, 5, 6]
    # the clients stay in the operator-only file, drawn from the secret seed (not job.seed's)
    assert not any("clients" in r for r in rounds)
    operator = [json.loads(line) for line in (run_dir / "operator" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in operator] == [1, 2, 3, 4, 5, 6] and all(len(r["clients"]) == 3 for r in operator)
    assert [r["clients"] for r in operator] != [r["clients"] for r in rounds_of(ops.runs / "healthcare" / "full")]
    statement = summary["privacy"]
    assert statement["rounds"] == 6 and statement["epsilon"] == pytest.approx(uninterrupted[-1], rel=1e-9)
    assert statement["lifetime_epsilon_spent"] == pytest.approx(uninterrupted[-1], rel=1e-9)
    ledger = Ledger(ops.dp_runs / "privacy_ledger.sqlite")
    fingerprint = statement["data_fingerprint"]
    (entry,) = ledger.history(fingerprint)  # one row for the run: no round counted twice
    assert (entry.run_id, entry.status) == ("dp", "committed")
    assert entry.epsilon == pytest.approx(uninterrupted[-1], rel=1e-9)
    assert ledger.spent(fingerprint) == pytest.approx(uninterrupted[-1], rel=1e-9)


def test_two_processes_on_one_run_id_one_is_refused_and_a_finished_id_is_not_retrained(ops):
    codes = sorted([ops.codes["full"], ops.codes["twin"]])
    assert codes == [0, 2], ops.jobs["full"].stderr[-2000:] + ops.jobs["twin"].stderr[-2000:]
    loser = ops.jobs["full"] if ops.codes["full"] == 2 else ops.jobs["twin"]
    (line,) = loser.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: run healthcare/full is already running: pid ")
    run_dir = ops.runs / "healthcare" / "full"
    summary_file = run_dir / "summary.json"
    stamp = summary_file.stat().st_mtime_ns
    again = tff_apps_in_process("run", "healthcare", *SMALL, "--set", f'job.runs_dir="{ops.runs}"', "--run-id", "full")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished; not retrained" in again.stdout
    assert summary_file.stat().st_mtime_ns == stamp and len(rounds_of(run_dir)) == 6


def test_the_runs_listing_tells_stale_and_succeeded_runs(ops):
    # right after the kill, the killed run is listed as stale (no live process holds it)
    assert ops.after_kill["killed"] == "stale"
    listing = tff_apps("runs", "--runs-dir", str(ops.runs))
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["full"][2] == "succeeded" and rows["killed"][2] == "succeeded"
    assert rows["killed"][5] == "6" and rows["killed"][6].startswith("test_auc=")
    (dp,) = list_runs(ops.dp_runs, app="healthcare")
    assert (dp.status, dp.rounds, dp.attempts) == ("succeeded", 6, 2) and dp.epsilon > 0
