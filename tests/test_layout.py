"""The design's dependency rules: apps -> tff_apps -> shared, and shared imports neither;
inside the engine, packages import downward only; no import cycle; no module over 500 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
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


# Inside the engine: cli -> program -> sites -> learning -> privacy, and runtime below them all;
# sites (site data, computations at the sites, gateway, certificates, policy) sit below program.
# Each package may import the engine packages listed for it (and shared/), nothing above.
ENGINE_LAYERS = {
    "tff_apps/runtime": {"tff_apps.runtime"},
    "tff_apps/privacy": {"tff_apps.privacy"},
    # registry: `site serve` finds the app of a vertical party's folder (its party steps) by entry point
    "tff_apps/sites": {
        "tff_apps.sites", "tff_apps.learning", "tff_apps.runtime", "tff_apps.privacy", "tff_apps.config",
        "tff_apps.registry",
    },
    "tff_apps/learning": {"tff_apps.learning", "tff_apps.privacy", "tff_apps.config"},
    "tff_apps/program": {
        "tff_apps.program", "tff_apps.learning", "tff_apps.privacy", "tff_apps.runtime",
        "tff_apps.sites", "tff_apps.config", "tff_apps.registry",
    },
}


def engine_imports(path: Path) -> set[str]:
    """The engine modules a file imports, anywhere in it (lazily or not), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tff_apps"):
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tff_apps"))
    return found


@pytest.mark.parametrize("package", sorted(ENGINE_LAYERS))
def test_engine_packages_import_only_downward(package):
    allowed = ENGINE_LAYERS[package]
    for path in sorted((ROOT / package).rglob("*.py")):
        upward = {
            name for name in engine_imports(path)
            if not any(name == a or name.startswith(a + ".") for a in allowed)
        }
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)} (allowed: {sorted(allowed)})"


def module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (a `from pkg import mod` counts
    as importing mod; a name imported from a module counts as importing the module)."""
    modules = {}
    for package in ("tff_apps", "shared", *sorted(APPS)):
        for path in (ROOT / package).rglob("*.py"):
            modules[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    edges.add(name)
        graph[module] = edges
    return graph


def test_no_import_cycle_anywhere():
    graph, done, path = module_graph(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_module_over_500_lines():
    for package in ("tff_apps", "shared", *sorted(APPS)):
        for path in (ROOT / package).rglob("*.py"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= 500, f"{path.relative_to(ROOT)}: {lines} lines"


def test_privacy_package_loads_no_tensorflow():
    """The CLI checks a privacy budget before paying for TensorFlow's import."""
    code = (
        "import pkgutil, importlib, sys, tff_apps.privacy as p\n"
        "for m in pkgutil.iter_modules(p.__path__): importlib.import_module('tff_apps.privacy.' + m.name)\n"
        "print(sorted(m for m in ('tensorflow', 'tensorflow_federated') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
