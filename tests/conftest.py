"""Longest test files first, so that neither of the two xdist workers is left alone at the end.

`make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: every file goes whole
to one worker (its module fixtures run once), in the order collected here. The files below
each start real `tff-apps` processes (10-17 s of TensorFlow import apiece on these machines)
and take one to three minutes; handed out first, they overlap, and the many short files fill
the gaps. Longest first, as measured by `--durations`; every other file keeps its place.
"""

from __future__ import annotations

LONGEST_FIRST = (
    "tests/healthcare/test_app.py",
    "tests/tff_apps/program/test_audit.py",
    "tests/tff_apps/program/test_resume.py",
    "tests/tff_apps/runtime/test_workers.py",
    "tests/healthcare/test_privacy_jobs.py",
    "tests/finance/test_app.py",
    "tests/traffic/test_app.py",
    "tests/tff_apps/runtime/test_runtime.py",
    "tests/healthcare/test_own_files.py",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))
