"""Longest test files first, so that neither of the two xdist workers is left alone at the end.

`make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: every file goes whole
to one worker (its module fixtures run once), in the order collected here. The files below
each start real `tff-apps` processes or several jobs and take half a minute to two minutes
of CPU; handed out first, they overlap, and the many short files fill the gaps. Longest first, as measured; every other file keeps its place.
"""

from __future__ import annotations

LONGEST_FIRST = (  # CPU seconds per file (children included), measured 2026-12-02; * = remeasured after the
    # jobs were cut (at load 4-6, scaled by the ~1.15 that load added to the files measured at both)
    "tests/healthcare/test_sites_served.py",  # 114 -> 68*
    "tests/healthcare/test_app.py",  # 62
    "tests/healthcare/test_sites.py",  # 80 -> 55*
    "tests/healthcare/test_privacy_jobs.py",  # 55
    "tests/tff_apps/learning/test_grouped.py",  # 54
    "tests/healthcare/test_sites_masked.py",  # 52 -> 51*
    "tests/tff_apps/program/test_resume.py",  # 64 -> 48*
    "tests/tff_apps/learning/test_grouped_robust.py",  # 47
    "tests/tff_apps/learning/test_secure_aggregation.py",  # 35
    "tests/tff_apps/program/test_audit.py",  # 48 -> 34*
    "tests/tff_apps/runtime/test_workers.py",  # 30
    "tests/traffic/test_sites.py",  # 28
    "tests/finance/test_resume.py",  # 27
    "tests/traffic/test_app.py",  # 27
    "tests/finance/test_app.py",  # 24
    "tests/traffic/test_graph_model.py",  # 24
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))
