"""The run registry, the run lock, run-id idempotence and the exit codes, in process.

A stand-in app (real job machinery, real Runtime, real registry and lock; only the app is
a test double found through `tff_apps.job.load_app`) keeps these fast; the SIGKILL and
resume tests with the real healthcare app are in test_resume.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import UserError
from tff_apps import cli
from tff_apps.program import job
from tff_apps.program import runs

HEALTHCARE_DEFAULT = Path(__file__).resolve().parents[3] / "healthcare" / "default.toml"


class FakeApp:
    """Trains nothing: writes two metric lines and a summary part, or fails at train time."""

    name = "fakeapp"
    description = "a stand-in app for the job machinery"
    default_config = HEALTHCARE_DEFAULT

    def __init__(self, fail: bool = False):
        from healthcare.app import APP

        self.sections = APP.sections
        self.fail = fail
        self.trained = 0

    def prepare(self, cfg):
        return "prepared"

    def client_rows(self, cfg, prepared):
        return {"a": 100, "b": 40}

    def fingerprint(self, prepared):
        return "f" * 64

    def train(self, cfg, prepared, run):
        self.trained += 1
        if run.privacy is not None:
            for _ in range(2):
                run.privacy.record_round(["a", "b"])
        lines = [{"round": 1, "test_auc": 0.8}, {"round": 2, "test_auc": 0.9}]
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        if self.fail:
            raise RuntimeError("boom at train time")
        return {"rounds": 2, "headline": "test_auc", "report": str(run.dir / "report.md")}


@pytest.fixture
def fake(monkeypatch) -> FakeApp:
    app = FakeApp()
    real = job.load_app
    monkeypatch.setattr(job, "load_app", lambda name: app if name == app.name else real(name))
    return app


def tff(tmp_path: Path, *args: str) -> int:
    return cli.main(["run", "fakeapp", "--set", f'job.runs_dir="{tmp_path}"', *args])


def sleeping_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_failed_run_is_registered_then_resumed_then_not_retrained(tmp_path, fake, capsys):
    fake.fail = True
    assert tff(tmp_path, "--run-id", "r1") == cli.EXIT_INTERNAL  # an internal error: exit 1
    assert "RuntimeError: boom at train time" in capsys.readouterr().err
    run_dir = tmp_path / "fakeapp" / "r1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]
    (failed,) = runs.list_runs(tmp_path)
    assert (failed.status, failed.rounds, failed.attempts) == ("failed", 2, 1)
    assert "boom" in failed.error
    assert not runs.lock_path(run_dir).exists()  # released on the error path

    fake.fail = False  # the same run id again: a failed run resumes (here: trains again)
    assert tff(tmp_path, "--run-id", "r1") == cli.EXIT_OK
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["resumed"] is True
    (done,) = runs.list_runs(tmp_path)
    assert (done.status, done.rounds, done.attempts, done.started) == ("succeeded", 2, 2, failed.started)
    assert (done.headline, done.headline_value, done.epsilon, done.error) == ("test_auc", 0.9, None, None)
    assert fake.trained == 2

    capsys.readouterr()
    stamp = (run_dir / "summary.json").stat().st_mtime_ns
    assert tff(tmp_path, "--run-id", "r1") == cli.EXIT_OK  # succeeded: a no-op
    assert tff(tmp_path, "--run-id", "r1", "--resume") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "already finished; not retrained" in out and str(run_dir / "summary.json") in out
    assert fake.trained == 2 and (run_dir / "summary.json").stat().st_mtime_ns == stamp
    assert runs.list_runs(tmp_path)[0].attempts == 2


def test_resume_without_a_folder_and_a_changed_config_are_user_errors(tmp_path, fake, capsys):
    assert tff(tmp_path, "--run-id", "nope", "--resume") == cli.EXIT_USER
    assert "--resume: run folder" in capsys.readouterr().err
    assert tff(tmp_path, "--resume") == cli.EXIT_USER
    assert "--run-id" in capsys.readouterr().err
    assert not (tmp_path / "fakeapp").exists() and fake.trained == 0

    assert tff(tmp_path, "--run-id", "r1", "--set", "train.rounds=2") == cli.EXIT_OK
    stamp = (tmp_path / "fakeapp" / "r1" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert tff(tmp_path, "--run-id", "r1", "--set", "train.rounds=3", "--set", "model.l2=0.5") == cli.EXIT_USER
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "another config: model.l2 (run: 0.0, now: 0.5), train.rounds (run: 2, now: 3)" in err
    assert (tmp_path / "fakeapp" / "r1" / "summary.json").stat().st_mtime_ns == stamp
    assert fake.trained == 1
    # where the runs folder is and the description are not part of what a run computes
    assert tff(tmp_path, "--run-id", "r1", "--set", "train.rounds=2", "--set", 'job.description="x"') == 0


def test_a_live_lock_holder_refuses_the_run_with_one_line(tmp_path, fake, capsys, caplog):
    holder = sleeping_process()
    try:
        lock = tmp_path / "fakeapp" / "r1.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
        assert tff(tmp_path, "--run-id", "r1") == cli.EXIT_USER
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"run fakeapp/r1 is already running: pid {holder.pid}" in err
        assert not (tmp_path / "fakeapp" / "r1").exists() and fake.trained == 0
        assert json.loads(lock.read_text())["pid"] == holder.pid  # not touched
        assert [r.status for r in runs.list_runs(tmp_path)] == []  # the holder's run, not ours
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and taken over
    assert tff(tmp_path, "--run-id", "r1") == cli.EXIT_OK
    assert f"took over a stale lock {lock} (pid {holder.pid}" in caplog.text
    assert "took over the stale lock" in (tmp_path / "fakeapp" / "r1" / "run.log").read_text()
    assert not lock.exists()


def test_run_lock_liveness_takeover_and_release(tmp_path):
    run_dir = tmp_path / "app" / "r"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    host = socket.gethostname()
    lock = runs.lock_path(run_dir)
    lock.parent.mkdir(parents=True)

    lock.write_text(json.dumps({"pid": dead_pid, "host": host, "started": "t0"}))
    with runs.RunLock(run_dir, "app/r") as held:
        assert held.took_over["pid"] == dead_pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"app/r is already running: pid {os.getpid()}"):
            runs.RunLock(run_dir, "app/r").acquire()  # a second holder while we live
    assert not lock.exists()

    # our own pid but another process start time: the pid was reused, the lock is stale
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host, "process_start": 1, "started": "t0"}))
    with runs.RunLock(run_dir, "app/r") as held:
        assert held.took_over["process_start"] == 1
    # another host: cannot be checked from here, so it counts as held
    lock.write_text(json.dumps({"pid": dead_pid, "host": host + "-elsewhere", "started": "t0"}))
    with pytest.raises(UserError, match="elsewhere"):
        runs.RunLock(run_dir, "app/r").acquire()
    # release never removes a lock that is not ours
    mine = runs.RunLock(run_dir, "app/r")
    mine._mine = {"pid": os.getpid(), "host": host}
    mine.release()
    assert lock.exists()


def test_budget_refusal_is_registered_as_refused_with_exit_3(tmp_path, fake, capsys):
    settings = ["--set", "privacy.level=client", "--set", "privacy.noise_multiplier=1.0",
                "--set", "privacy.clipping=fixed", "--set", "train.rounds=3"]
    assert tff(tmp_path, "--run-id", "spent", *settings, "--set", "privacy.lifetime_epsilon=1000") == 0
    capsys.readouterr()
    assert tff(tmp_path, "--run-id", "broke", *settings, "--set", "privacy.lifetime_epsilon=0.01") == cli.EXIT_BUDGET
    assert "privacy.lifetime_epsilon = 0.01" in capsys.readouterr().err
    assert not (tmp_path / "fakeapp" / "broke").exists()
    assert cli.main(["runs", "--runs-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "id", "app", "status", "started", "ended", "rounds", "headline", "ε"]
    refused, spent = (line.split() for line in lines[1:])
    assert refused[:3] == ["broke", "fakeapp", "refused"] and refused[-3:] == ["-", "-", "-"]
    assert spent[:3] == ["spent", "fakeapp", "succeeded"] and spent[-3] == "2"
    assert spent[-2] == "test_auc=0.9000" and 0 < float(spent[-1]) < 100
    for column, values in (("app", ("fakeapp",)), ("status", ("refused", "succeeded"))):
        at = lines[0].index(column)  # aligned: every row's value starts under its header
        assert all(line[at:].startswith(values) for line in lines[1:])
    assert cli.main(["runs", "--runs-dir", str(tmp_path), "--app", "healthcare"]) == 0
    assert "no runs" in capsys.readouterr().out


def test_registry_shows_a_killed_run_as_stale(tmp_path):
    registry = runs.Registry(tmp_path)
    run_dir = tmp_path / "app" / "r"
    registry.started("app", "r", run_dir)  # a process that was then SIGKILLed: no lock holder
    (record,) = runs.list_runs(tmp_path)
    assert (record.status, record.shown_status) == ("running", "stale")
    with runs.RunLock(run_dir, "app/r"):
        assert runs.list_runs(tmp_path)[0].shown_status == "running"
    assert runs.list_runs(tmp_path / "nowhere") == []
