"""The lifetime privacy ledger: ε spent on each data source, composed across runs.

Scheduled retraining spends privacy budget on the same data every time. Each spend is a
row of an SQLite table (stdlib `sqlite3`), keyed by the data fingerprint the job computes:
run id, the run's dp_accounting events (JSON, `dp_events.spend_to_json`), δ, accountant,
status, who reserved it (pid, host) and when.

* The cumulative ε of a source is the ε of the COMPOSITION of all its spends, computed by
  the accountant (`accounting.composed_epsilon`: RDP curves added, or PLDs composed), which is
  tighter than adding the runs' ε. Record-level spends compose per client, the source's ε
  being the max over clients.
* `reserve` runs in one `BEGIN IMMEDIATE` transaction: SQLite's write lock serializes
  reservations across threads and processes, so two runs racing for the last of a budget
  cannot both pass and no spend is lost or counted twice.
* Crashes: SQLite's rollback journal (synchronous=FULL) makes every transaction atomic and
  durable; a process killed inside `reserve` leaves nothing. A process killed AFTER
  reserving leaves a `reserved` row; it is counted as spent (conservative: the run may have
  trained and released something before dying). Only an operator who knows the run did
  not train may `release` it; `history` shows the row with its pid and host.
* δ: spends carry the δ of their run; the source's ε is reported at a given δ (by default
  the smallest δ among its spends, the most conservative). The accountant is PLD only when
  every spend of the source asked for PLD, otherwise RDP.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import UserError
from tff_apps.privacy import dp_events
from tff_apps.privacy import accounting
from tff_apps.privacy import dp_config

BUSY_TIMEOUT_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint   TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    event         TEXT NOT NULL,
    delta         REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant    TEXT NOT NULL CHECK (accountant IN ('rdp', 'pld')),
    status        TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    epsilon       REAL NOT NULL,
    pid           INTEGER NOT NULL,
    host          TEXT NOT NULL,
    reserved_at   TEXT NOT NULL,
    finished_at   TEXT
);
CREATE INDEX IF NOT EXISTS spends_by_source ON spends (fingerprint, status);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_spend_per_run
    ON spends (fingerprint, run_id) WHERE status != 'released';
"""


class BudgetExhausted(UserError):
    """A run would take a data source past its lifetime ε budget."""


@dataclass(frozen=True)
class Reservation:
    id: int
    fingerprint: str
    run_id: str
    epsilon: float  # this run's own ε at its δ
    cumulative_epsilon: float  # the source's ε with this run included
    delta: float
    accountant: str


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    run_id: str
    status: str
    epsilon: float  # the run's own ε at its δ
    delta: float
    accountant: str
    pid: int
    host: str
    reserved_at: str
    finished_at: str | None
    spend: dp_events.Spend


class Ledger:
    """`Ledger(path)`; every method opens its own connection, so one object may be shared by
    threads and a path by processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _write_transaction(self):
        return write_transaction(self.path)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    # -- spending ----------------------------------------------------------------------------

    def reserve(
        self,
        fingerprint: str,
        run_id: str,
        event: dp_events.Spend,
        delta: float,
        accountant: str,
        lifetime_epsilon: float,
        resume: bool = False,
    ) -> Reservation:
        """Books this run's spend before it trains, or raises BudgetExhausted.

        The source's ε with this run = ε of the composition of every spend not released
        (committed, and reserved by running or dead runs) plus this one, at `delta`.
        `lifetime_epsilon` 0 means no budget (the spend is still recorded).

        `resume`: the run id continues an interrupted run (the caller holds the run's lock).
        Its live row, reserved by a killed process or committed by a failed one with the
        rounds that ran, is reopened for the whole planned spend (budget checked again
        against the other runs): the run keeps ONE row, so rounds already spent are not
        counted twice; `commit` then records every round the run did in all its attempts.
        """
        if accountant not in dp_config.ACCOUNTANTS:
            raise UserError(f"privacy.accountant = {accountant!r} is not allowed; choose one of 'rdp', 'pld'")
        own = accounting.epsilon(event, delta, accountant)
        payload = json.dumps(dp_events.spend_to_json(event), sort_keys=True)
        with self._write_transaction() as db:
            rows = self._live_rows(db, fingerprint)
            own_rows = [row for row in rows if row["run_id"] == run_id]
            if own_rows and resume:
                rows = [row for row in rows if row["run_id"] != run_id]
            elif own_rows:
                raise UserError(
                    f"job.run_id = {run_id!r} already has a privacy spend on this data in {self.path}; "
                    "use a new run id"
                )
            previous = [dp_events.spend_from_json(json.loads(row["event"])) for row in rows]
            chosen = composition_accountant([row["accountant"] for row in rows] + [accountant])
            spent = accounting.composed_epsilon(previous, delta, chosen)
            cumulative = accounting.composed_epsilon([*previous, event], delta, chosen)
            if lifetime_epsilon > 0 and cumulative > lifetime_epsilon:
                remaining = max(0.0, lifetime_epsilon - spent)
                raise BudgetExhausted(
                    f"privacy.lifetime_epsilon = {lifetime_epsilon:g}: data source {fingerprint[:16]} has "
                    f"spent ε = {spent:.4g} in {len(rows)} run(s), remaining {remaining:.4g}; this run "
                    f"needs ε = {own:.4g} (cumulative would be {cumulative:.4g}) at δ = {delta:g}; "
                    "lower privacy.target_epsilon or train.rounds, or raise privacy.lifetime_epsilon"
                )
            if own_rows and resume:
                row_id = int(own_rows[0]["id"])
                db.execute(
                    "UPDATE spends SET event = ?, delta = ?, accountant = ?, status = 'reserved',"
                    " epsilon = ?, pid = ?, host = ?, finished_at = NULL WHERE id = ?",
                    (payload, float(delta), accountant, own, os.getpid(), socket.gethostname(), row_id),
                )
                return Reservation(row_id, fingerprint, run_id, own, cumulative, float(delta), accountant)
            cursor = db.execute(
                "INSERT INTO spends (fingerprint, run_id, event, delta, accountant, status, epsilon,"
                " pid, host, reserved_at) VALUES (?, ?, ?, ?, ?, 'reserved', ?, ?, ?, ?)",
                (
                    fingerprint,
                    run_id,
                    payload,
                    float(delta),
                    accountant,
                    own,
                    os.getpid(),
                    socket.gethostname(),
                    _now(),
                ),
            )
        return Reservation(
            int(cursor.lastrowid), fingerprint, run_id, own, cumulative, float(delta), accountant
        )

    def commit(self, reservation: Reservation, actual_event: dp_events.Spend) -> float:
        """Records the event that actually ran (e.g. fewer rounds); returns its ε.

        The spend happened whatever its size, so it is recorded as is.
        """
        own = accounting.epsilon(actual_event, reservation.delta, reservation.accountant)
        payload = json.dumps(dp_events.spend_to_json(actual_event), sort_keys=True)
        self._finish(reservation, "committed", payload, own)
        return own

    def release(self, reservation: Reservation | int) -> None:
        """A run that failed before training spent nothing: its reservation is dropped
        (kept in `history` as 'released')."""
        self._finish(reservation, "released", None, None)

    def _finish(
        self, reservation: Reservation | int, status: str, payload: str | None, own: float | None
    ) -> None:
        row_id = reservation.id if isinstance(reservation, Reservation) else int(reservation)
        with self._write_transaction() as db:
            found = db.execute("SELECT status FROM spends WHERE id = ?", (row_id,)).fetchone()
            if found is None or found[0] != "reserved":
                state = "missing" if found is None else found[0]
                raise ValueError(f"privacy ledger {self.path}: reservation {row_id} is {state}, not reserved")
            if payload is None:
                db.execute(
                    "UPDATE spends SET status = ?, finished_at = ? WHERE id = ?", (status, _now(), row_id)
                )
            else:
                db.execute(
                    "UPDATE spends SET status = ?, event = ?, epsilon = ?, finished_at = ? WHERE id = ?",
                    (status, payload, own, _now(), row_id),
                )

    # -- reading -----------------------------------------------------------------------------

    def spent(self, fingerprint: str, delta: float | None = None, include_reserved: bool = True) -> float:
        """ε of the composition of the source's spends (committed, and by default reserved
        ones too: running or dead runs), at `delta` (default: the smallest δ recorded)."""
        db = self._connect()
        try:
            rows = self._live_rows(db, fingerprint)
        finally:
            db.close()
        if not include_reserved:
            rows = [row for row in rows if row["status"] == "committed"]
        if not rows:
            return 0.0
        at = min(row["delta"] for row in rows) if delta is None else delta
        spends = [dp_events.spend_from_json(json.loads(row["event"])) for row in rows]
        return accounting.composed_epsilon(
            spends, at, composition_accountant([row["accountant"] for row in rows])
        )

    def history(self, fingerprint: str) -> list[LedgerEntry]:
        db = self._connect()
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM spends WHERE fingerprint = ? ORDER BY id", (fingerprint,)
            ).fetchall()
        finally:
            db.close()
        return [
            LedgerEntry(
                row["id"],
                row["run_id"],
                row["status"],
                row["epsilon"],
                row["delta"],
                row["accountant"],
                row["pid"],
                row["host"],
                row["reserved_at"],
                row["finished_at"],
                dp_events.spend_from_json(json.loads(row["event"])),
            )
            for row in rows
        ]

    @staticmethod
    def _live_rows(db: sqlite3.Connection, fingerprint: str) -> Sequence[Any]:
        db.row_factory = sqlite3.Row
        return db.execute(
            "SELECT * FROM spends WHERE fingerprint = ? AND status != 'released' ORDER BY id", (fingerprint,)
        ).fetchall()


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode with durable commits (also used by `tff_apps.runs`)."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    db.execute("PRAGMA synchronous = FULL")
    return db


@contextlib.contextmanager
def write_transaction(path: str | Path):
    """One BEGIN IMMEDIATE transaction: SQLite's write lock serializes concurrent processes,
    and anything that fails inside rolls back whole."""
    db = connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def composition_accountant(accountants: Sequence[str]) -> str:
    return "pld" if accountants and all(a == "pld" for a in accountants) else "rdp"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
