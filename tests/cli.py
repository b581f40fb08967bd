"""Running `tff-apps` as a user does: a fresh process in its own session."""

from __future__ import annotations

import os
import subprocess
import sys


def user_environment() -> dict[str, str]:
    """This process's environment as a user's shell has it: importing TensorFlow in the
    test process sets TF_CPP_MIN_LOG_LEVEL=1, which a user's shell does not have."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def tff_apps(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Own session, so that tests can check no process of the command outlives it."""
    return subprocess.run(
        [sys.executable, "-m", "tff_apps.cli", *args],
        capture_output=True, text=True, timeout=timeout, start_new_session=True, env=user_environment(),
    )


def run_app(runs_dir, app: str, run_id: str, *args: str):
    """Runs `tff-apps run APP ARGS` into `runs_dir` (a test's folder); returns the run folder."""
    result = tff_apps("run", app, *args, "--set", f'job.runs_dir="{runs_dir}"', "--run-id", run_id)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs_dir / app / run_id


def tff_apps_in_process(*args: str) -> subprocess.CompletedProcess:
    """`tff-apps ARGS` through the CLI's own entry point in this process: the same exit
    code, stdout and stderr as the command, without paying TensorFlow's import (10-17 s on
    these machines) again. For refusals and for jobs whose outputs a test reads; what only a
    separate process shows (signals, leftover processes, the environment) uses `tff_apps`."""
    import contextlib
    import io

    from tff_apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["tff-apps", *args], code, out.getvalue(), err.getvalue())
