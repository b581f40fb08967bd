"""`tff-apps worker` and `tff-apps run --workers`: two loopback workers give the model one
machine gives, workers stop cleanly on SIGTERM, and bad or unreachable workers are one-line
errors.

The job over two workers and the workers run as the user would run them (subprocesses in
their own sessions); the one-machine job and the refused one run meanwhile through the CLI's
entry point in this process, to keep the module short.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import portpicker
import pytest

from tests.cli import tff_apps, tff_apps_in_process, user_environment

SHORT = [
    "--set", "train.rounds=2", "--set", "evaluate.centralized_baseline=false",
    "--set", "evaluate.local_baseline=false", "--set", "export.enabled=false",
]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class Worker:
    """One `tff-apps worker --port N` in its own session, output to a file."""

    def __init__(self, logs: Path, port: int):
        self.port = port
        self.out = logs / f"worker-{port}.out"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tff_apps.cli", "worker", "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=user_environment(),
            )
        self.binary_pid = self._wait_ready()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(rf"worker listening on 127\.0\.0\.1:{self.port} \(pid (\d+)\)", self.out.read_text())
            if found:
                return int(found.group(1))
            assert self.proc.poll() is None, f"worker exited early: {self.out.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"worker on port {self.port} not ready: {self.out.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def job(runs: Path, run_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tff_apps.cli", "run", "healthcare", *SHORT,
         "--set", f'job.runs_dir="{runs}"', "--run-id", run_id, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=user_environment(),
    )


def in_process_job(runs: Path, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    return tff_apps_in_process("run", "healthcare", *SHORT, "--set", f'job.runs_dir="{runs}"', "--run-id", run_id, *extra)


def final_state(run_dir: Path) -> list[np.ndarray]:
    import tensorflow as tf

    saved = tf.saved_model.load(str(run_dir / "checkpoints" / "round_2"))()
    return [np.asarray(leaf) for leaf in tf.nest.flatten(saved)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("workers")
    runs = base / "runs"
    workers = [Worker(base, portpicker.pick_unused_port()) for _ in range(2)]
    try:
        nobody = portpicker.pick_unused_port()
        two = job(runs, "two", "--workers", ",".join(w.address for w in workers))  # as the user runs it
        # meanwhile, in this process (no second TensorFlow import): one machine, and a worker nobody runs
        in_process = {
            "one": in_process_job(runs, "one"),
            "refused": in_process_job(runs, "refused", "--workers", f"127.0.0.1:{nobody}"),
        }
        results = {"two": (*two.communicate(timeout=240), two.returncode)}
        results.update({name: (r.stdout, r.stderr, r.returncode) for name, r in in_process.items()})
        in_use = tff_apps("worker", "--port", str(workers[0].port), timeout=60)
        stop_codes = [w.stop() for w in workers]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    return SimpleNamespace(
        runs=runs, workers=workers, results=results, in_use=in_use, stop_codes=stop_codes, nobody=nobody
    )


def test_two_loopback_workers_give_the_single_machine_model(cluster) -> None:
    for name in ("one", "two"):
        out, err, code = cluster.results[name]
        assert code == 0, f"{name}: {err[-3000:]}"
    assert "clients spread over 2 workers" in cluster.results["two"][0]
    one = final_state(cluster.runs / "healthcare" / "one")
    two = final_state(cluster.runs / "healthcare" / "two")
    assert len(one) == len(two)
    numeric = [(a, b) for a, b in zip(one, two) if a.dtype.kind in "fiu"]
    assert any(a.size > 1 for a, _ in numeric)  # the model's weights are among them
    for a, b in zip(one, two):
        if a.dtype.kind in "fiu":
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        else:
            assert (a == b).all()


def test_workers_stop_on_sigterm_with_exit_0_and_leave_no_binary(cluster) -> None:
    assert cluster.stop_codes == [0, 0], [w.out.read_text() for w in cluster.workers]
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(alive(w.binary_pid) for w in cluster.workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w.binary_pid for w in cluster.workers if alive(w.binary_pid)]


def test_port_in_use_and_unreachable_worker_are_one_line_errors(cluster) -> None:
    in_use = cluster.in_use
    assert in_use.returncode == 2, in_use.stderr
    assert in_use.stderr.strip().splitlines() == [
        f"error: worker --port {cluster.workers[0].port}: the port is already in use"
    ]
    out, err, code = cluster.results["refused"]
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"127.0.0.1:{cluster.nobody}" in lines[0], err[-3000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["nohost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:99999", "a:1,a:1", "h:x"])
def test_bad_workers_value_exits_2_with_one_line(value: str, capsys: pytest.CaptureFixture) -> None:
    from tff_apps.cli import main

    assert main(["run", "healthcare", "--workers", value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --workers"), err
