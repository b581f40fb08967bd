"""Tests for tff_apps.ledger: composition across runs, the lifetime budget, concurrent runs
racing for the last of a budget (real processes), and crashes (SIGKILLed processes)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared.errors import UserError
from tff_apps.privacy import dp_events
from tff_apps.privacy.ledger import BudgetExhausted, Ledger
from tff_apps.privacy.dp_config import ClientSampling, RecordSampling

ROOT = Path(__file__).resolve().parents[3]
DELTA = 1e-5
FP = "sha256:heart-4-sites-v1"
SAMPLED = ClientSampling(20, 5)  # fixed-size client sampling: RDP under replace-one
EVERY = ClientSampling(20, 0)  # every client: plain Gaussians, fast to account


def run_event(z: float, rounds: int, sampling: ClientSampling = EVERY):
    return dp_events.dp_event(z, sampling, rounds)


def independent_rdp(event) -> float:
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    return (
        rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(DELTA)
    )


def test_two_runs_compose_to_the_epsilon_of_the_composed_event(tmp_path):
    book = Ledger(tmp_path / "ledger.sqlite")
    first, second = run_event(1.5, 20, SAMPLED), run_event(2.0, 30, SAMPLED)
    for run_id, event in (("r1", first), ("r2", second)):
        reservation = book.reserve(FP, run_id, event, DELTA, "rdp", lifetime_epsilon=0.0)
        book.commit(reservation, event)
    expected = independent_rdp(dp_accounting.ComposedDpEvent([first, second]))
    assert book.spent(FP) == pytest.approx(expected, rel=1e-9)
    alone = independent_rdp(first) + independent_rdp(second)
    assert book.spent(FP) < 0.95 * alone  # tighter than adding the runs' ε
    assert [e.run_id for e in book.history(FP)] == ["r1", "r2"]
    assert book.history(FP)[0].spend == first
    assert book.spent("sha256:other-data") == 0.0


def test_a_run_past_the_lifetime_budget_is_refused_with_spent_and_remaining(tmp_path):
    book = Ledger(tmp_path / "ledger.sqlite")
    event = run_event(1.5, 20)
    two = independent_rdp(dp_accounting.ComposedDpEvent([event, event]))
    three = independent_rdp(dp_accounting.ComposedDpEvent([event, event, event]))
    budget = (two + three) / 2  # two scheduled runs fit, the third does not
    for run_id in ("mon", "tue"):
        book.commit(book.reserve(FP, run_id, event, DELTA, "rdp", budget), event)
    with pytest.raises(BudgetExhausted) as refused:
        book.reserve(FP, "wed", event, DELTA, "rdp", budget)
    message = str(refused.value)
    assert "\n" not in message and "privacy.lifetime_epsilon" in message
    assert f"spent ε = {two:.4g}" in message
    assert f"remaining {budget - two:.4g}" in message
    assert f"needs ε = {independent_rdp(event):.4g}" in message
    assert [e.run_id for e in book.history(FP)] == ["mon", "tue"]  # nothing booked
    assert isinstance(refused.value, UserError)


def test_commit_records_what_ran_and_release_spends_nothing(tmp_path):
    book = Ledger(tmp_path / "ledger.sqlite")
    planned, ran = run_event(1.5, 40), run_event(1.5, 12)  # stopped early
    reservation = book.reserve(FP, "r1", planned, DELTA, "rdp", 0.0)
    assert book.spent(FP) == pytest.approx(independent_rdp(planned))  # reserved counts
    assert book.spent(FP, include_reserved=False) == 0.0
    book.commit(reservation, ran)
    assert book.spent(FP) == pytest.approx(independent_rdp(ran))
    failed = book.reserve(FP, "r2", planned, DELTA, "rdp", 0.0)
    book.release(failed)
    assert book.spent(FP) == pytest.approx(independent_rdp(ran))
    assert [e.status for e in book.history(FP)] == ["committed", "released"]
    with pytest.raises(ValueError, match="not reserved"):
        book.release(reservation)
    with pytest.raises(UserError, match="job.run_id = 'r1'"):
        book.reserve(FP, "r1", planned, DELTA, "rdp", 0.0)
    book.release(book.reserve(FP, "r2", planned, DELTA, "rdp", 0.0))  # a released run id may retry


def test_record_level_runs_compose_per_client(tmp_path):
    book = Ledger(tmp_path / "ledger.sqlite")
    sampling = RecordSampling({"a": 200, "b": 40}, 16, {"a": 13, "b": 3})
    first, second = dp_events.dp_event(1.2, sampling, 10), dp_events.dp_event(1.4, sampling, 5)
    for run_id, spend in (("r1", first), ("r2", second)):
        book.commit(book.reserve(FP, run_id, spend, DELTA, "rdp", 0.0), spend)
    per_client = [
        rdp_privacy_accountant.RdpAccountant()
        .compose(dp_accounting.ComposedDpEvent([first[c], second[c]]))
        .get_epsilon(DELTA)
        for c in ("a", "b")
    ]
    assert book.spent(FP) == pytest.approx(max(per_client), rel=1e-9)


# -- concurrency and crashes: real processes ------------------------------------------------------

CHILD = r"""
import json, sys, time
from tff_apps.privacy import accounting, dp_config, dp_events, ledger
path, run_id, z, rounds, budget, hold, start_at, then = sys.argv[1:]
if float(hold) > 0:  # widen the window between reading the spends and booking this one
    compose = accounting.composed_epsilon
    def slow(*args, **kwargs):
        print(json.dumps({"holding": True}), flush=True)
        time.sleep(float(hold))
        return compose(*args, **kwargs)
    accounting.composed_epsilon = slow
event = dp_events.dp_event(float(z), dp_config.ClientSampling(20, 0), int(rounds))
book = ledger.Ledger(path)
time.sleep(max(0.0, float(start_at) - time.time()))
try:
    reservation = book.reserve("FP", run_id, event, 1e-5, "rdp", float(budget))
    print(json.dumps({"ok": True, "id": reservation.id}), flush=True)
except ledger.BudgetExhausted as err:
    print(json.dumps({"ok": False, "message": str(err)}), flush=True)
if then == "hang":
    time.sleep(600)
"""


def start_child(path, run_id, budget, *, z=1.5, rounds=20, hold=0.0, start_at=0.0, then="exit"):
    args = [
        sys.executable,
        "-c",
        CHILD,
        str(path),
        run_id,
        str(z),
        str(rounds),
        str(budget),
        str(hold),
        str(start_at),
        then,
    ]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(child) -> dict:
    line = child.stdout.readline()
    assert line, child.stderr.read()
    return json.loads(line)


def kill(child) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_concurrent_runs_racing_for_the_last_budget_only_one_passes(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    one = independent_rdp(run_event(1.5, 20))
    two = independent_rdp(dp_accounting.ComposedDpEvent([run_event(1.5, 20)] * 2))
    budget = (one + two) / 2
    start_at = time.time() + 2.0  # all children past their imports, then they race
    children = [start_child(path, f"run{i}", budget, hold=0.2, start_at=start_at) for i in range(4)]
    results = []
    for child in children:
        lines = [json.loads(line) for line in child.communicate(timeout=60)[0].splitlines()]
        assert child.returncode == 0
        results.append([line for line in lines if "ok" in line][0])
    assert sum(r["ok"] for r in results) == 1
    assert all("remaining" in r["message"] for r in results if not r["ok"])
    book = Ledger(path)
    assert len(book.history("FP")) == 1
    assert book.spent("FP") == pytest.approx(one, rel=1e-9)  # neither lost nor counted twice


def test_a_reservation_left_by_a_killed_run_counts_as_spent(tmp_path):
    path = tmp_path / "ledger.sqlite"
    child = start_child(path, "crashed", 0.0, then="hang")
    try:
        assert read_line(child)["ok"]
    finally:
        kill(child)  # dies holding a reservation: never committed, never released
    book = Ledger(path)
    (entry,) = book.history("FP")
    assert (entry.status, entry.pid) == ("reserved", child.pid)
    one = independent_rdp(run_event(1.5, 20))
    assert book.spent("FP") == pytest.approx(one, rel=1e-9)
    with pytest.raises(BudgetExhausted, match="spent ε = "):
        book.reserve("FP", "next", run_event(1.5, 20), DELTA, "rdp", lifetime_epsilon=one * 1.2)


def test_a_run_killed_inside_the_transaction_leaves_nothing_and_no_lock(tmp_path):
    path = tmp_path / "ledger.sqlite"
    child = start_child(path, "dying", 0.0, hold=60.0)
    try:
        assert read_line(child)["holding"]  # inside BEGIN IMMEDIATE, holding the write lock
    finally:
        kill(child)
    book = Ledger(path)
    started = time.monotonic()
    reservation = book.reserve("FP", "next", run_event(1.5, 20), DELTA, "rdp", 0.0)
    assert time.monotonic() - started < 5.0  # the dead process's lock is gone
    assert [e.run_id for e in book.history("FP")] == ["next"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    book.commit(reservation, run_event(1.5, 20))


def test_threads_share_one_ledger(tmp_path):
    import threading

    book = Ledger(tmp_path / "ledger.sqlite")
    event = run_event(1.5, 20)
    one = independent_rdp(event)
    outcomes = []

    def run(i):
        try:
            book.reserve(FP, f"t{i}", event, DELTA, "rdp", lifetime_epsilon=one * 1.1)
            outcomes.append(True)
        except BudgetExhausted:
            outcomes.append(False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 5 + [True]
    assert len(book.history(FP)) == 1
