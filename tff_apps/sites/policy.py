"""A site's policy: which jobs its gateway lets reach the site's TFF worker.

The coordinator describes its job in a few fields (`Job`, sent with every call); the site
states its limits in the ``[policy]`` table of its site.toml (`SitePolicy`). A job outside
the limits is refused with one line naming the site, the rule and what the job asked for.
Does not import TensorFlow.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shared.errors import UserError
from tff_apps.privacy.dp_config import LEVELS


class Refused(UserError):
    """The site's policy refuses the job (or the caller); the message is one line."""


class BadJob(UserError):
    """The job descriptor is missing or malformed; the message is one line."""


@dataclass(frozen=True)
class Job:
    """What a coordinator tells each site about its job, on every call."""

    app: str
    run_id: str
    rounds: int
    privacy_level: str = "none"
    epsilon: float | None = None  # the planned total ε of the run; None without DP
    max_value_bytes: int = 0  # the largest result a site should send back; 0 = no limit
    # this site's planned DP spend (`dp_events.spend_to_json`), for the site's own ledger
    spend: dict | None = None
    delta: float | None = None
    accountant: str = "rdp"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def parse_job(raw: str | bytes | Mapping[str, Any] | Job) -> Job:
    """A checked Job from its JSON text or dict; anything malformed is a one-line BadJob."""
    if isinstance(raw, Job):
        return raw
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadJob(f"job descriptor: not JSON ({err})") from None
    if not isinstance(raw, Mapping):
        raise BadJob(f"job descriptor: expected a JSON object, got {type(raw).__name__}")
    names = [f.name for f in fields(Job)]
    unknown = sorted(set(raw) - set(names))
    missing = [name for name in ("app", "run_id", "rounds") if name not in raw]
    if unknown or missing:
        raise BadJob(f"job descriptor: unknown key {unknown[0]!r}" if unknown else f"job descriptor: no {missing[0]!r}")
    job = Job(**{name: raw[name] for name in names if name in raw})
    _check_job_fields(job)
    return job


def _check_job_fields(job: Job) -> None:
    for name in ("app", "run_id"):
        if not isinstance(getattr(job, name), str) or not getattr(job, name):
            raise BadJob(f"job descriptor: {name} must be a non-empty string")
    if not _is_int(job.rounds) or job.rounds < 1:
        raise BadJob(f"job descriptor: rounds = {job.rounds!r}, expected an integer >= 1")
    if job.privacy_level not in LEVELS:
        raise BadJob(f"job descriptor: privacy_level = {job.privacy_level!r}, expected one of {list(LEVELS)}")
    eps = job.epsilon
    if eps is not None and (not _is_number(eps) or not math.isfinite(eps) or eps <= 0):
        raise BadJob(f"job descriptor: epsilon = {eps!r}, expected a number > 0 or null")
    if not _is_int(job.max_value_bytes) or job.max_value_bytes < 0:
        raise BadJob(f"job descriptor: max_value_bytes = {job.max_value_bytes!r}, expected an integer >= 0")
    if job.spend is not None:
        _check_spend(job)


def _check_spend(job: Job) -> None:
    from tff_apps.privacy import dp_events

    if not isinstance(job.spend, Mapping) or not _is_number(job.delta) or not 0 < job.delta < 1:
        raise BadJob("job descriptor: spend needs a JSON object and delta in (0, 1)")
    if job.accountant not in ("rdp", "pld"):
        raise BadJob(f"job descriptor: accountant = {job.accountant!r}, expected 'rdp' or 'pld'")
    try:
        dp_events.spend_from_json(job.spend)
    except (ValueError, TypeError, KeyError) as err:
        raise BadJob(f"job descriptor: spend is not a DP event this suite writes ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SitePolicy:
    """The ``[policy]`` table of a site.toml; every default allows everything."""

    site: str
    apps: tuple[str, ...] = ()  # empty = every app
    max_rounds: int = 0  # 0 = no limit
    require_privacy: str = "none"  # the minimum DP level: record > client > none
    max_epsilon: float = 0.0  # 0 = no limit; else the job must plan an ε at most this
    max_value_bytes: int = 0  # 0 = no limit; else the job's limit must be set and at most this
    callers: tuple[str, ...] = ()  # certificate common names allowed to call; empty = any the CA signed
    lifetime_epsilon: float = 0.0  # 0 = none; else the site's own ledger refuses a job past it

    def check(self, job: Mapping[str, Any] | Job) -> None:
        """Raises Refused (one line naming the rule) unless the policy admits the job."""
        job = parse_job(job)
        if self.apps and job.app not in self.apps:
            self._refuse("apps", list(self.apps), f"the job's app is {job.app!r}")
        if self.max_rounds and job.rounds > self.max_rounds:
            self._refuse("max_rounds", self.max_rounds, f"the job plans rounds = {job.rounds}")
        if LEVELS.index(job.privacy_level) < LEVELS.index(self.require_privacy):
            self._refuse("require_privacy", self.require_privacy, f"the job has privacy.level = {job.privacy_level!r}")
        if self.max_epsilon and job.epsilon is None:
            self._refuse("max_epsilon", self.max_epsilon, f"the job plans no epsilon (privacy.level = {job.privacy_level!r})")
        if self.max_epsilon and job.epsilon > self.max_epsilon:
            self._refuse("max_epsilon", self.max_epsilon, f"the job plans epsilon = {job.epsilon:g}")
        if self.max_value_bytes and not 0 < job.max_value_bytes <= self.max_value_bytes:
            asked = job.max_value_bytes or "0 (no limit)"
            self._refuse("max_value_bytes", self.max_value_bytes, f"the job asks for max_value_bytes = {asked}")

    def check_caller(self, common_name: str) -> None:
        """Raises Refused unless the caller's certificate name is allowed."""
        if self.callers and common_name not in self.callers:
            self._refuse("callers", list(self.callers), f"the caller's certificate is {common_name!r}")

    def _refuse(self, key: str, value: Any, found: str) -> None:
        raise Refused(f"site {self.site}: policy {key} = {value!r}, {found}")


_KINDS = {
    "apps": "a list of app names (empty = every app)",
    "max_rounds": "an integer >= 0 (0 = no limit)",
    "require_privacy": f"one of {list(LEVELS)}",
    "max_epsilon": "a number >= 0 (0 = no limit)",
    "max_value_bytes": "an integer >= 0 (0 = no limit)",
    "callers": "a list of certificate common names (empty = any the CA signed)",
    "lifetime_epsilon": "a number >= 0 (0 = no budget)",
}


def load_policy(path: Path | str | None, site: str) -> SitePolicy:
    """The ``[policy]`` table of ``path`` (no file: allow every job); mistakes are one line."""
    if path is None:
        return SitePolicy(site=site)
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"site serve --policy {path}: the file does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"site serve --policy {path}: not valid TOML ({err})") from None
    table = document.get("policy", {})
    if not isinstance(table, dict):
        raise UserError(f"site serve --policy {path}: [policy] must be a table")
    return policy_from_table(table, site, source=str(path))


def policy_from_table(table: Mapping[str, Any], site: str, source: str = "site.toml") -> SitePolicy:
    """A SitePolicy from a parsed ``[policy]`` table, every key checked."""
    for key, value in table.items():
        if key not in _KINDS:
            raise UserError(f"{source}: [policy] has no key {key!r} (keys: {', '.join(_KINDS)})")
        if not _valid(key, value):
            raise UserError(f"{source}: [policy] {key} = {value!r}, expected {_KINDS[key]}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return SitePolicy(site=site, **values)


def _valid(key: str, value: Any) -> bool:
    if key in ("apps", "callers"):
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if key == "require_privacy":
        return value in LEVELS
    if key in ("max_epsilon", "lifetime_epsilon"):
        return _is_number(value) and math.isfinite(value) and value >= 0
    return _is_int(value) and value >= 0
