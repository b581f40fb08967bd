"""Tests for tff_apps.runtime: the worker is gone on every exit path.

Exit paths run in child processes (tests/tff_apps/runtime/runtime_child.py). Importing
TF+TFF costs ~8 s of CPU per process, so there are only two children, both
started in the background when the first test of this module runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHILD_SCRIPT = Path(__file__).with_name("runtime_child.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
SCENARIOS = ("exit", "signals")
STARTUP_TIMEOUT_S = 90.0  # only reached on failure; normally ~10-20 s
EOF_TIMEOUT_S = 10.0  # the leak made this wait forever
GONE_TIMEOUT_S = 10.0


# -- helpers ------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """State letter from /proc/<pid>/stat, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def _gone_within(pid: int, timeout: float = GONE_TIMEOUT_S) -> bool:
    # A zombie has exited; it lingers only until its new parent (init) reaps it.
    deadline = time.monotonic() + timeout
    while _proc_state(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _is_worker(pid: int) -> bool:
    try:
        return b"worker_binary" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Child:
    """A runtime_child.py process whose stdout we can wait on, line by line."""

    def __init__(self, scenario: str, tmp: Path) -> None:
        self.log_path = tmp / f"{scenario}-worker.log"
        self.stderr_path = tmp / f"{scenario}.stderr"
        env = {
            **os.environ,
            # The worker inherits this; "exit" keeps its INFO lines to check log_path.
            "TF_CPP_MIN_LOG_LEVEL": "0" if scenario == "exit" else "2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        with open(self.stderr_path, "wb") as stderr:  # a file: a full pipe would block the child
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD_SCRIPT), scenario, str(self.log_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO_ROOT,
                env=env,
            )
        self.out = ""
        self.worker_pids: list[int] = []

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = STARTUP_TIMEOUT_S) -> list[str]:
        """Reads stdout until `pattern` matched `count` times; returns the matches."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while len(re.findall(pattern, self.out)) < count:
                remaining = deadline - time.monotonic()
                chunk = os.read(fd, 65536) if remaining > 0 and selector.select(remaining) else None
                if not chunk:
                    pytest.fail(f"no {pattern!r} x{count} from child; stdout={self.out!r}\n{self.stderr()}")
                self.out += chunk.decode()
                self.worker_pids = [int(p) for p in re.findall(r"WORKER_PID (\d+)", self.out)]
        return re.findall(pattern, self.out)

    def finish(self) -> int:
        """Waits for stdout EOF and exit; fails if that is not prompt."""
        try:
            rest, _ = self.proc.communicate(timeout=EOF_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"child stdout not closed {EOF_TIMEOUT_S} s after exit path; stdout={self.out!r}")
        self.out += rest.decode()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.poll() is None:  # only if a test failed or was deselected
            self.proc.terminate()  # lets Runtime stop its worker itself
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        for pid in self.worker_pids:  # only matters if a test failed
            if _is_worker(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Child]]:
    tmp = tmp_path_factory.mktemp("runtime")
    started = {name: Child(name, tmp) for name in SCENARIOS}
    yield started
    for child in started.values():
        child.cleanup()


def _assert_stopped_by_exit(child: Child, pid: int) -> None:
    assert f"AFTER_EXIT {pid} gone=True sigterm_restored=True" in child.out, child.out
    assert _gone_within(pid), f"worker {pid} still running"


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Turns a hang in the main thread into a test failure."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- in-process tests (run first, while the children import TF) --------------


def test_secure_sum_is_simulated_only_when_used(caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np
    import tensorflow_federated as tff

    from tff_apps.runtime.context import Runtime

    client_ints = tff.FederatedType(np.int32, tff.CLIENTS)

    @tff.federated_computation(client_ints)
    def plain_sum(x):
        return tff.federated_sum(x)

    @tff.federated_computation(client_ints)
    def secure_sum(x):
        return tff.federated_secure_sum_bitwidth(x, 8)

    stack = tff.framework.get_context_stack()
    before = stack.current
    with caplog.at_level(logging.WARNING, logger="tff_apps.runtime"), _deadline(60):
        with Runtime() as runtime:
            pid = runtime.worker_pid
            assert _is_worker(pid)
            assert stack.current is not before
            assert plain_sum([1, 2, 3]) == 6
            assert not runtime.simulated_secure_sum
            assert not caplog.records
            assert secure_sum([1, 2, 3]) == 6
            assert runtime.simulated_secure_sum
            assert secure_sum([4, 5]) == 9
    warnings = [r for r in caplog.records if "simulated" in r.getMessage().lower()]
    assert len(warnings) == 1, caplog.text
    assert runtime.worker_pid is None
    assert stack.current is before
    assert _gone_within(pid)


def test_dead_worker_gives_clear_error_instead_of_hanging() -> None:
    import numpy as np
    import tensorflow_federated as tff

    from tff_apps.runtime.context import Runtime

    add_one = tff.tensorflow.computation(lambda x: x + 1.0, np.float32)
    with _deadline(60), Runtime() as runtime:
        assert add_one(np.float32(1.0)) == 2.0
        os.kill(runtime.worker_pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"worker_binary .* exited with code -9"):
            add_one(np.float32(2.0))


# -- exit paths, in child processes ------------------------------------------


def test_normal_exit_exception_and_sigterm_stop_worker(children: dict[str, Child]) -> None:
    child = children["exit"]
    child.wait_for(r"WORKER_PID \d+ RESULT 42\.0", count=3)
    assert "CAUGHT ValueError" in child.out
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 128 + signal.SIGTERM, child.stderr()
    assert len(child.worker_pids) == 3
    for pid in child.worker_pids:  # normal exit, exception, SIGTERM
        _assert_stopped_by_exit(child, pid)
    # The worker writes to log_path, never to our stdout.
    assert "ExecutorService started" in child.log_path.read_text()
    assert "ExecutorService" not in child.out


def test_sigint_and_parent_sigkill_stop_worker(children: dict[str, Child]) -> None:
    child = children["signals"]
    child.wait_for(r"WORKER_PID \d+ RESULT 42\.0")
    child.proc.send_signal(signal.SIGINT)
    child.wait_for(r"CAUGHT KeyboardInterrupt", timeout=EOF_TIMEOUT_S)
    _assert_stopped_by_exit(child, child.worker_pids[0])

    child.wait_for(r"WORKER_PID \d+ RESULT 42\.0", count=2)
    pid = child.worker_pids[1]
    assert _is_worker(pid)
    child.proc.send_signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    # No Python code runs on SIGKILL: only PR_SET_PDEATHSIG can stop the worker.
    assert f"AFTER_EXIT {pid}" not in child.out
    assert _gone_within(pid), f"worker {pid} survived its parent's SIGKILL"
