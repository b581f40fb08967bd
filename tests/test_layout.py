"""The design's dependency rules: apps -> tff_apps -> shared, and shared imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = {"healthcare", "finance", "traffic"}


def imported_top_packages(package: str) -> dict[str, set[str]]:
    """File -> top-level package names it imports (anywhere in the file, lazily or not)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("file, names", imported_top_packages("shared").items())
def test_shared_imports_no_engine_app_or_tff(file, names):
    assert not names & (APPS | {"tff_apps", "tensorflow_federated"}), file


@pytest.mark.parametrize("file, names", imported_top_packages("tff_apps").items())
def test_engine_never_imports_an_app_by_name(file, names):
    assert not names & APPS, file
