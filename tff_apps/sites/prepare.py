"""`tff-apps site prepare APP`: run at a site, encodes the site's own files into its data
folder (`site_data`) with the app's loaders, schema checks and missing-value policy, and
the same seeded train/test split as a simulation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import UserError
from tff_apps.sites import site_data


def prepare_site(app, cfg, out: str | Path, site: str = "") -> dict[str, Any]:
    """Writes `out` (nothing on a refusal) and returns its manifest."""
    site_tables = getattr(app, "site_tables", None)
    write_folder = getattr(app, "write_site_folder", None)  # an app whose data is not rows (traffic's series)
    if site_tables is None and write_folder is None:
        raise UserError(f"site prepare: app {app.name!r} does not run across sites yet")
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: already exists; give a new folder (a site folder is written once)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if write_folder is not None:
        return write_folder(cfg, out, site)
    tables = site_tables(cfg, site)
    return site_data.write_site_folder(
        out, tables["site"], tables["schema"], tables["splits"], tables["split"], tables.get("dropped_rows", 0)
    )
