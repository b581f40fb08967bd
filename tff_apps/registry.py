"""Maps app names to their entry objects through the `tff_apps.apps` entry points.

An app registers itself in pyproject.toml; the engine never imports an app by name.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from shared.errors import UserError

GROUP = "tff_apps.apps"


def app_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_app(name: str) -> Any:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(app_names()) or "none installed"
        raise UserError(f"app '{name}' is unknown; available apps: {known}")
    return matches[0].load()
