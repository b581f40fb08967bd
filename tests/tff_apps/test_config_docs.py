"""Tests for tff_apps.config_docs: the committed configuration reference is the generated one.

No TensorFlow needed: the page is rendered from the config dataclasses and each app's
default.toml, found through the app registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.errors import UserError
from tff_apps import config as config_lib
from tff_apps import config_docs, registry
from tff_apps.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_page_is_the_generated_one():
    committed = (ROOT / config_docs.DOCS_FILE).read_text(encoding="utf-8")
    generated = config_docs.render()
    assert committed == generated, (
        f"{config_docs.DOCS_FILE} differs from what the config dataclasses give; regenerate it "
        f"from the repository root with: {config_docs.REGENERATE}"
    )


def test_every_key_of_every_section_is_in_the_page():
    page = config_docs.render()
    sections = list(config_lib.ENGINE_SECTIONS.items())
    for name in registry.app_names():
        sections += list(registry.load_app(name).sections.items())
    for section, cls in sections:
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in page, f"{section}.{f.name}"
            assert f.metadata["doc"].strip(), f"{section}.{f.name}"


def test_a_row_gives_type_default_range_and_meaning():
    page = config_docs.render()
    assert (
        "| `train.rounds` | integer | `20` | ≥ 1, ≤ 100000 | "
        "Federated rounds (finance: epochs over the aligned training customers). |"
    ) in page
    assert '| `privacy.level` | string | `"none"` | `"none"`, `"client"`, `"record"` |' in page
    assert "| `privacy.secure_threshold` | number | `0.67` | > 0.5, ≤ 1 |" in page
    # each app's default.toml values: healthcare trains 30 rounds, not the dataclass's 20
    healthcare = page[page.index("### healthcare `default.toml`"):]
    assert "| `train.rounds` | `30` |" in healthcare.split("\n## ")[0]


def test_a_field_without_doc_is_refused():
    @dataclass(frozen=True)
    class Section:
        documented: int = field(default=1, metadata={"min": 0, "doc": "A documented key."})
        bare: str = field(default="x", metadata={"choices": ("x", "y")})

    with pytest.raises(config_docs.UndocumentedField, match=r"toy\.bare .*has no metadata 'doc'.*tff-apps config --docs"):
        config_docs.section_table("toy", Section)


def test_doc_metadata_does_not_change_validation():
    rules = {"min": 1, "max": 3, "doc": "A key with a range."}
    assert config_lib.check_value("toy.k", 2, int, rules) == 2
    with pytest.raises(UserError, match=r"toy\.k = 4 is too large"):
        config_lib.check_value("toy.k", 4, int, rules)


def test_cli_prints_the_page(capsys):
    assert main(["config", "--docs"]) == 0
    assert capsys.readouterr().out == config_docs.render()
