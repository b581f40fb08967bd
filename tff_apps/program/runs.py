"""The run registry and the run lock: which runs exist, how they ended, and who runs one now.

Registry: `<runs_dir>/runs.sqlite` (stdlib `sqlite3`), one row per (app, run id): status
(running, succeeded, failed, interrupted, refused), when the run first started and last
ended, the rounds done, the headline metric and ε. Writes use the ledger's BEGIN IMMEDIATE
transactions, so concurrent runs sharing a runs folder serialize. `tff-apps runs` prints it.

Lock: `<runs_dir>/<app>/<run_id>.lock`, created with O_CREAT | O_EXCL before the run writes
anything, holding the owner's pid, host, process start time and start date. A second process
on the same run id is refused (UserError, exit 2) while the owner lives; a lock whose
process is gone (same host, no such pid, or the pid now belongs to a process started later)
is stale and taken over, with a log line. Takeovers are serialized by a second O_EXCL file,
so two processes finding the same stale lock cannot both win.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import UserError
from tff_apps.privacy.ledger import connect, write_transaction

REGISTRY_FILE = "runs.sqlite"
STATUSES = ("running", "succeeded", "failed", "interrupted", "refused")

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    app            TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted', 'refused')),
    run_dir        TEXT NOT NULL,
    started        TEXT NOT NULL,
    ended          TEXT,
    rounds         INTEGER,
    headline       TEXT,
    headline_value REAL,
    epsilon        REAL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    pid            INTEGER,
    host           TEXT,
    error          TEXT,
    PRIMARY KEY (app, run_id)
);
"""


@dataclass(frozen=True)
class RunRecord:
    app: str
    run_id: str
    status: str  # as recorded; `shown_status` tells a running row whose process is gone
    run_dir: str
    started: str
    ended: str | None
    rounds: int | None
    headline: str | None
    headline_value: float | None
    epsilon: float | None
    attempts: int
    pid: int | None
    host: str | None
    error: str | None

    @property
    def shown_status(self) -> str:
        """'running' only while a live process holds the run's lock; else 'stale' (killed)."""
        if self.status != "running":
            return self.status
        holder = read_lock(lock_path(Path(self.run_dir)))
        return "running" if holder is not None and holder_alive(holder) else "stale"


class Registry:
    """`Registry(runs_dir)`; each call opens its own connection (safe across processes)."""

    def __init__(self, runs_dir: str | Path):
        self.path = Path(runs_dir) / REGISTRY_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with write_transaction(self.path) as db:
            db.execute(_SCHEMA)

    def started(self, app: str, run_id: str, run_dir: Path) -> None:
        """A run (or a resumed attempt of it) begins: status running; `started` keeps the first."""
        now = _now()
        with write_transaction(self.path) as db:
            db.execute(
                "INSERT INTO runs (app, run_id, status, run_dir, started, attempts, pid, host)"
                " VALUES (?, ?, 'running', ?, ?, 1, ?, ?)"
                " ON CONFLICT (app, run_id) DO UPDATE SET status = 'running', run_dir = excluded.run_dir,"
                " ended = NULL, error = NULL, attempts = attempts + 1, pid = excluded.pid, host = excluded.host",
                (app, run_id, str(Path(run_dir).absolute()), now, os.getpid(), socket.gethostname()),
            )

    def ended(
        self,
        app: str,
        run_id: str,
        run_dir: Path,
        status: str,
        *,
        rounds: int | None = None,
        headline: str | None = None,
        headline_value: float | None = None,
        epsilon: float | None = None,
        error: str | None = None,
    ) -> None:
        """The run ended (succeeded, failed, interrupted) or was refused before training."""
        if status not in STATUSES or status == "running":
            raise ValueError(f"run registry: {status!r} is not an end status")
        now = _now()
        with write_transaction(self.path) as db:
            db.execute(
                "INSERT INTO runs (app, run_id, status, run_dir, started, ended, rounds, headline,"
                " headline_value, epsilon, attempts, pid, host, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)"
                " ON CONFLICT (app, run_id) DO UPDATE SET status = excluded.status, ended = excluded.ended,"
                " rounds = COALESCE(excluded.rounds, rounds), headline = COALESCE(excluded.headline, headline),"
                " headline_value = COALESCE(excluded.headline_value, headline_value),"
                " epsilon = COALESCE(excluded.epsilon, epsilon), error = excluded.error",
                (
                    app, run_id, status, str(Path(run_dir).absolute()), now, now, rounds, headline,
                    headline_value, epsilon,
                    os.getpid(), socket.gethostname(), error,
                ),
            )

    def list(self, app: str | None = None) -> list[RunRecord]:
        db = connect(self.path)
        try:
            db.row_factory = sqlite3.Row
            query = "SELECT * FROM runs" + (" WHERE app = ?" if app else "") + " ORDER BY started DESC, rowid DESC"
            rows = db.execute(query, (app,) if app else ()).fetchall()
        finally:
            db.close()
        return [RunRecord(**{k: row[k] for k in row.keys()}) for row in rows]


def list_runs(runs_dir: str | Path, app: str | None = None) -> list[RunRecord]:
    """Every run registered in `runs_dir`, newest first (none if the folder has no registry)."""
    if not (Path(runs_dir) / REGISTRY_FILE).is_file():
        return []
    return Registry(runs_dir).list(app)


def table(records: list[RunRecord]) -> str:
    """An aligned text table: run id, app, status, started, ended, rounds, headline, ε."""
    header = ("run id", "app", "status", "started", "ended", "rounds", "headline", "ε")
    rows = [
        (
            r.run_id,
            r.app,
            r.shown_status,
            r.started,
            r.ended or "-",
            "-" if r.rounds is None else str(r.rounds),
            _headline(r),
            "-" if r.epsilon is None else f"{r.epsilon:.4g}",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def _headline(record: RunRecord) -> str:
    if record.headline is None:
        return "-"
    value = "-" if record.headline_value is None else f"{record.headline_value:.4f}"
    return f"{record.headline}={value}"


# -- the lock ---------------------------------------------------------------------------------


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".lock")


class RunLock:
    """`with RunLock(run_dir, label):` holds `<run_dir>.lock` or raises UserError naming the
    run and the process holding it. `took_over` is the stale holder replaced, if any."""

    def __init__(self, run_dir: Path, label: str):
        self.run_dir = Path(run_dir)
        self.label = label
        self.path = lock_path(self.run_dir)
        self.took_over: dict[str, Any] | None = None
        self._mine: dict[str, Any] | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "started": _now(),
        }
        if self._create(mine):
            self._mine = mine
            return
        holder = self._settled_holder()
        if holder is not None and holder_alive(holder):
            raise self._refusal(holder)
        # Stale (or unreadable and old): replace it, one process at a time.
        with _TakeoverMutex(self.path.with_name(self.path.name + ".takeover"), self.label):
            current = self._settled_holder()
            if current is not None and holder_alive(current):
                raise self._refusal(current)
            self.path.unlink(missing_ok=True)
            if not self._create(mine):
                raise self._refusal(read_lock(self.path) or {})
        self._mine = mine
        self.took_over = holder or {}
        log.warning(
            "run %s: took over a stale lock %s (pid %s on %s, since %s: that process is gone)",
            self.label, self.path, self.took_over.get("pid", "?"), self.took_over.get("host", "?"),
            self.took_over.get("started", "?"),
        )

    def release(self) -> None:
        """Removes the lock if it is still ours (idempotent)."""
        mine, self._mine = self._mine, None
        if mine is None:
            return
        current = read_lock(self.path)
        if current is not None and current.get("pid") == mine["pid"] and current.get("host") == mine["host"]:
            self.path.unlink(missing_ok=True)

    def _create(self, content: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(content) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _settled_holder(self) -> dict[str, Any] | None:
        """The holder written in the lock; None if the lock is missing, or unreadable for
        longer than its owner needs to write it (an owner killed between create and write)."""
        for _ in range(50):
            holder = read_lock(self.path)
            if holder is not None:
                return holder
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age > 5.0:
                return None
            time.sleep(0.1)
        return None

    def _refusal(self, holder: dict[str, Any]) -> UserError:
        return UserError(
            f"run {self.label} is already running: pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"holds {self.path} since {holder.get('started', '?')}; wait for it, or remove the lock "
            "if that process is gone"
        )


class _TakeoverMutex:
    """O_EXCL file held while a stale lock is replaced; itself stale after 30 s."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label

    def __enter__(self) -> None:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > 30.0:
                        self.path.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise UserError(f"run {self.label}: {self.path} is held; another process is taking over its lock")
                time.sleep(0.05)

    def __exit__(self, *exc_info) -> None:
        self.path.unlink(missing_ok=True)


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and isinstance(content.get("pid"), int) else None


def holder_alive(holder: dict[str, Any]) -> bool:
    """False only when the holder surely is gone: same host, and no such pid, or the pid was
    reused by a process started later. A holder on another host counts as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded = holder.get("process_start")
    if recorded is not None:
        current = _process_start(pid)
        if current is not None and current != recorded:
            return False  # the pid now names another process
    if _is_zombie(pid):
        return False
    return True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
