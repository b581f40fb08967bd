"""The coordinator's list of sites (`job.sites`, a sites.toml):

    [[site]]
    name = "cleveland"
    address = "cleveland.example.org:7001"   # the site's gateway (or worker, on loopback tests)
    data = "/srv/site-data"                 # the data folder the site advertises (site prepare --out)
    ca = "certs/ca.pem"                     # optional: mutual TLS through the site's gateway
    cert = "certs/coordinator.pem"
    key = "certs/coordinator.key"

Relative paths are read from the file's folder. Sites are used in the file's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError
from tff_apps.config import read_toml

KEYS = {"name", "address", "data", "ca", "cert", "key"}


@dataclass(frozen=True)
class SiteRef:
    name: str
    address: str
    data: str  # the folder path on the site's machine
    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca)


def load_sites(path: str | Path) -> list[SiteRef]:
    """The sites of a sites.toml; every mistake is one line naming the file, site and key."""
    path = Path(path)
    entries = read_toml(path, "job.sites").get("site")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"job.sites {path}: no [[site]] tables; list each site with name, address and data")
    sites = [_site(path, index, entry) for index, entry in enumerate(entries)]
    for field in ("name", "address"):
        values = [getattr(site, field) for site in sites]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"job.sites {path}: {field} {repeated[0]!r} is listed twice")
    return sites


def _site(path: Path, index: int, entry) -> SiteRef:
    where = f"job.sites {path}: site {index + 1}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: not a table")
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; a site takes {', '.join(sorted(KEYS))}")
    missing = [key for key in ("name", "address", "data") if not isinstance(entry.get(key), str) or not entry[key]]
    if missing:
        raise UserError(f"{where}: give {', '.join(missing)} (text)")
    host, _, port = entry["address"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{where}: address {entry['address']!r} is not HOST:PORT")
    tls = {key: str((path.parent / entry[key]).resolve()) for key in ("ca", "cert", "key") if entry.get(key)}
    if tls and len(tls) != 3:
        raise UserError(f"{where}: mutual TLS needs ca, cert and key together")
    for key, file in tls.items():
        if not Path(file).is_file():
            raise UserError(f"{where}: {key} {file} does not exist")
    return SiteRef(entry["name"], entry["address"], entry["data"], **tls)
