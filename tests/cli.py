"""Running `tff-apps` as a user does: a fresh process in its own session."""

from __future__ import annotations

import subprocess
import sys


def tff_apps(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Own session, so that tests can check no process of the command outlives it."""
    return subprocess.run(
        [sys.executable, "-m", "tff_apps.cli", *args],
        capture_output=True, text=True, timeout=timeout, start_new_session=True,
    )
