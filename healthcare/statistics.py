"""What the hospitals release about their data before training: the normalization and the
data profiles, exact or through DP (`privacy.preprocessing`, `privacy.profiles`).

DP statistics are released once per run: the first attempt writes them to the run's
`dp_statistics.json` (the released values only: they are in the export and summary anyway),
and a resumed attempt reads them back instead of releasing them again with fresh noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared import profile
from shared.errors import UserError
from shared.files import write_text_atomic
from tff_apps.config import JobConfig

STATISTICS_FILE = "dp_statistics.json"


def statistics_spec(cfg: JobConfig, prepared):
    """The public column ranges for DP statistics: the source's, overridden by `preprocess.bounds`."""
    from tff_apps.privacy.dp_statistics import spec_from

    if cfg.privacy.preprocessing == "dp" and cfg.preprocess.normalization != "federated":
        raise UserError(
            'privacy.preprocessing = "dp" releases the federation\'s statistics: it needs '
            'preprocess.normalization = "federated"'
        )
    data = prepared.data
    unknown = sorted(set(cfg.preprocess.bounds) - set(data.feature_names))
    if unknown:
        raise UserError(f"preprocess.bounds names {', '.join(unknown)}, which are not feature columns of this data")
    bounds = {**data.public_bounds, **cfg.preprocess.bounds}
    return spec_from(data.feature_names, data.categorical_columns, bounds)


def released_statistics(cfg: JobConfig, prepared, run) -> tuple[Any, dict[str, Any]]:
    """(site name -> preprocessor, summary entries of the profiles): exact, or DP-released
    once per run and accounted in `run.privacy`."""
    privacy = run.privacy
    dp = privacy is not None and privacy.plan.statistics
    stored = _load(run.dir) if dp else None
    if dp and stored is None:
        stored = _release(cfg, prepared, privacy)
        write_text_atomic(run.dir / STATISTICS_FILE, json.dumps(stored, indent=2))
    if dp:
        privacy.statistics_done()
    preprocessor_of = _preprocessor_of(stored) if stored and "preprocessor" in stored else fit_exact(cfg, prepared)
    return preprocessor_of, _profiles_entry(cfg, prepared, stored)


def _release(cfg: JobConfig, prepared, privacy) -> dict[str, Any]:
    from tff_apps.learning import dp_preprocessing

    data, spec, z = prepared.data, privacy.statistics_spec, privacy.plan.statistics_noise_multiplier
    site_raw = [t.features.to_numpy() for t in prepared.trains]
    stored: dict[str, Any] = {}
    if cfg.privacy.preprocessing == "dp":
        preprocessor = dp_preprocessing.dp_preprocessor(
            site_raw, data.feature_names, spec, z, data.zero_means_missing
        )
        stored["preprocessor"] = json.loads(preprocessor.to_json())
    if cfg.privacy.profiles == "dp":
        stored["profiles"] = {
            t.name: dp_preprocessing.dp_profile(raw, t.labels, data.feature_names, spec, z)
            for t, raw in zip(prepared.trains, site_raw)
        }
    return stored


def _load(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATISTICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _preprocessor_of(stored: dict[str, Any]):
    from tff_apps.learning.preprocessing import Preprocessor

    shared = Preprocessor(**stored["preprocessor"])
    return lambda _site: shared


def _profiles_entry(cfg: JobConfig, prepared, stored) -> dict[str, Any]:
    """Profiles: exact without DP (`auto`), none with DP unless `dp` was asked for."""
    mode = cfg.privacy.profiles
    if mode == "dp":
        return profile.summary_entry(stored["profiles"])
    if mode == "none" or cfg.privacy.level != "none":
        return {}
    data = prepared.data
    exact = {t.name: profile.profile(t.features, t.labels, "binary", data.categorical_columns) for t in prepared.trains}
    return profile.summary_entry(exact)


def fit_exact(cfg: JobConfig, prepared):
    """Site name -> preprocessor: the federation's (secure-sum statistics), or each site's own."""
    from tff_apps.learning import preprocessing

    data = prepared.data
    names, categorical = data.feature_names, data.categorical_columns
    site_raw = [t.features.to_numpy() for t in prepared.trains]
    if cfg.preprocess.normalization == "federated":
        shared_preprocessor = preprocessing.fit_federated(site_raw, names, categorical, data.zero_means_missing)
        return lambda _site: shared_preprocessor
    # Per-site statistics; the vocabulary stays federated so every site has the same inputs.
    categories = preprocessing.federated_categories(site_raw, names, categorical)
    per_site = {
        t.name: preprocessing.fit_local(raw, names, categorical, categories, data.zero_means_missing)
        for t, raw in zip(prepared.trains, site_raw)
    }
    return lambda site: per_site[site]


def release_keys(cfg: JobConfig, profiled: dict[str, Any]) -> list[str]:
    """The releases of a healthcare run, for the privacy statement (`privacy.releases`)."""
    from tff_apps.privacy.releases import release_keys as keys_of

    return keys_of("normalization", bool(profiled), cfg.evaluate.centralized_baseline or cfg.evaluate.local_baseline)
