"""The configuration reference, docs/configuration.md, rendered from the config dataclasses.

Every job key is a field of a frozen dataclass: the engine's sections
(`tff_apps.config.ENGINE_SECTIONS`) and each app's own (`app.sections`, found through
`tff_apps.registry`, never by app name). A field's type annotation, default and metadata
("choices", "min", "max", "exclusive_min": the rules `config.check_value` enforces, and
"doc": what the key means) are the whole reference, so the page is regenerated rather than
edited: `tff-apps config --docs > docs/configuration.md`. A test fails when the committed
page differs from `render()`. A field without a "doc" is refused (`UndocumentedField`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import tomli_w

from tff_apps import config as config_lib
from tff_apps import registry

DOCS_FILE = "docs/configuration.md"
REGENERATE = f"tff-apps config --docs > {DOCS_FILE}"

INTRO = """\
A job is a TOML file of sections. The app's `default.toml` is read first, then your job
file (`tff-apps run --config FILE`), then each `--set section.key=value` (values are TOML:
`--set train.rounds=10`, `--set 'data.feature_columns=["age","chol"]'`; a bare word is a
string). Later layers win key by key. Unknown sections and keys, wrong types and
out-of-range values are refused before anything is written, with a one-line message naming
the key (exit code 2).

Each table gives a key's type, its default when neither `default.toml` nor the job sets it,
the values it allows, and what it means; each app's section ends with the values its
`default.toml` sets. The engine's sections apply to every app; `[data]` and `[model]`
belong to the app. How the keys work together: [privacy.md](privacy.md),
[secure-aggregation.md](secure-aggregation.md), [federations.md](federations.md),
[engine-speed.md](engine-speed.md), [operations.md](operations.md) and the app pages
([healthcare.md](healthcare.md), [finance.md](finance.md), [traffic.md](traffic.md))."""


class UndocumentedField(ValueError):
    """A config field without metadata "doc": the reference would have a blank meaning."""


def render() -> str:
    """The whole page, as committed in docs/configuration.md."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the config dataclasses by `{REGENERATE}`; do not edit by hand. -->",
        "",
        INTRO,
        "",
        "## Engine sections (every app)",
        "",
    ]
    for name, cls in config_lib.ENGINE_SECTIONS.items():
        lines += section_block(f"`[{name}]`", name, cls)
    for app_name in registry.app_names():
        app = registry.load_app(app_name)
        lines += [f"## {app_name}", "", f"{_sentence(app.description)}", ""]
        for name, cls in app.sections.items():
            lines += section_block(f"{app_name} `[{name}]`", name, cls)
        lines += default_toml_block(app_name, app.default_config)
    return "\n".join(lines).rstrip("\n") + "\n"


def section_block(title: str, section: str, cls: type) -> list[str]:
    """A `###` heading, the section's docstring and its table."""
    lines = [f"### {title}", ""]
    summary = (cls.__doc__ or "").strip().splitlines()
    if summary and not summary[0].startswith(cls.__name__ + "("):  # dataclass's generated signature
        lines += [summary[0].strip(), ""]
    lines += section_table(section, cls)
    return lines + [""]


def section_table(section: str, cls: type) -> list[str]:
    """One row per field: key, type, default, allowed values, meaning."""
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc", "")
        if not isinstance(doc, str) or not doc.strip():
            raise UndocumentedField(
                f"config field {section}.{f.name} ({cls.__module__}.{cls.__qualname__}) has no "
                "metadata 'doc': add metadata={..., \"doc\": \"what the key means\"} to the field, "
                f"then regenerate the reference: {REGENERATE}"
            )
        cells = [
            f"`{section}.{f.name}`",
            type_name(hints[f.name]),
            _code(toml_value(field_default(f))),
            allowed(f.metadata),
            _cell(doc),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def default_toml_block(app_name: str, path) -> list[str]:
    """The keys an app's default.toml sets, with their values."""
    values = config_lib.read_toml(path, "app default config")
    lines = [f"### {app_name} `default.toml`", "", f"What `{app_name}/default.toml` sets (the app's default job):", ""]
    lines += ["| key | value |", "|---|---|"]
    for section, table in values.items():
        for key, value in table.items():
            lines.append(f"| `{section}.{key}` | {_code(toml_value(value))} |")
    return lines + [""]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise UndocumentedField(f"config field {f.name} has no default; every job key needs one")


def type_name(hint: Any) -> str:
    """The TOML type a field takes, in words."""
    if typing.get_origin(hint) is dict:
        return f"table of {type_name(typing.get_args(hint)[1])}"
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"list of {type_name(item)}s"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(hint, getattr(hint, "__name__", str(hint)))


def toml_value(value: Any) -> str:
    """A value as it would be written in a job file."""
    if value == {}:
        return "{}"  # tomli_w writes an empty table as a [section], not inline
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


def allowed(rules: Mapping[str, Any]) -> str:
    """The validation rules as text: the choices, or the range."""
    if "choices" in rules:
        return ", ".join(_code(toml_value(c)) for c in rules["choices"])
    bounds = []
    if "exclusive_min" in rules:
        bounds.append(f"> {rules['exclusive_min']:g}")
    if "min" in rules:
        bounds.append(f"≥ {rules['min']:g}")
    if "max" in rules:
        bounds.append(f"≤ {rules['max']:g}")
    return ", ".join(bounds)  # e.g. "≥ 1, ≤ 1000"


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _cell(text: str) -> str:
    """Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")) if text else ""
