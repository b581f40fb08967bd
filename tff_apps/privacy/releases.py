"""What a run releases outside ε, and the files only its operator may read.

The privacy statement (summary.json, model card) carries both lists, so a reader of a model
card knows what else about the clients' data left the federation: ε covers the model
updates (and, with `privacy.preprocessing` / `privacy.profiles` = "dp", the data
statistics); everything listed here was released without noise. Each app names the
releases it makes (`statement_entries`); the texts say where each one is and what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Files that hold more than the releases: who took part in which round, and the secret
# sampling seed (with DP). They stay with the operator of the coordinator.
OPERATOR_ONLY = (
    "checkpoints/: the training state, the sampling seed (secret with DP) and every round's clients",
    "operator/rounds.jsonl: the clients of every round (DP runs)",
    "the privacy ledger (privacy.ledger): every run's spend on each data source",
    "run.log and worker.log: the engine's and TFF worker's logs",
)

# key -> (where it is released, what it contains)
RELEASES: dict[str, tuple[str, str]] = {
    "normalization": (
        "export/ (serving graph, model card serving_check), summary.json",
        "the mean and standard deviation of every feature column over all sites' training rows, and each "
        "categorical column's vocabulary (the codes seen at any site)",
    ),
    "speed_normalization": (
        "export/ (serving graph), summary.json",
        "the mean and standard deviation of the training speeds over all districts",
    ),
    "site_counts": (
        "summary.json data, report",
        "each client's training and test row counts and, for a diagnosis, its prevalence (share of positive labels)",
    ),
    "profiles": (
        "summary.json profiles, report",
        "per client: rows, label share, and per column the min, max, mean, std and missing share "
        "(a min or max is one record's value)",
    ),
    "evaluation": (
        "metrics.jsonl, TensorBoard, summary.json results, model card metrics, report",
        "the model's metrics on every client's held-out rows, per client and pooled, every train.eval_every rounds",
    ),
    "training_metrics": (
        "metrics.jsonl, TensorBoard",
        "the clients' training loss and metrics, aggregated without noise (DP-SGD reports none)",
    ),
    "baselines": (
        "summary.json results, report",
        "the metrics of the centralized and local-only baselines, trained without DP (a simulation's reference)",
    ),
    "participation": (
        "metrics.jsonl, summary.json participation",
        "per round how many clients were sampled, dropped, late and reported, and the bytes they sent",
    ),
}

# Releases that `privacy.preprocessing = "dp"` / `privacy.profiles = "dp"` move inside ε.
DP_STATISTICS = {"normalization": "preprocessing", "profiles": "profiles"}


def statement_entries(keys: Iterable[str], section=None) -> list[dict[str, str]]:
    """The releases outside ε of a run that made the `keys` releases; with a [privacy]
    `section`, the statistics it released through DP are left out (they are inside ε)."""
    entries = []
    for key in keys:
        option = DP_STATISTICS.get(key)
        if option and section is not None and getattr(section, option, "") == "dp":
            continue
        where, contains = RELEASES[key]
        entries.append({"release": key, "where": where, "contains": contains})
    return entries


def add_to_statement(statement: Mapping[str, Any] | None, keys: Iterable[str], section=None) -> dict[str, Any]:
    """The statement with `released_outside_epsilon` and `operator_only` filled in."""
    result = dict(statement or {})
    result["released_outside_epsilon"] = statement_entries(keys, section)
    result["operator_only"] = list(OPERATOR_ONLY)
    return result


def release_keys(normalization: str | None, profiled: bool, baselines: bool) -> list[str]:
    """The releases of a horizontal run: its normalization (`normalization` or
    `speed_normalization`; None: none leaves the clients), site counts, profiles if computed,
    metrics and participation, and the baselines' metrics if any ran."""
    keys = [*([normalization] if normalization else []), "site_counts", *(["profiles"] if profiled else [])]
    keys += ["evaluation", "training_metrics", "participation"]
    return keys + (["baselines"] if baselines else [])


def statement_without_dp(section, keys: Iterable[str], secure=None) -> dict[str, Any]:
    """A run without DP: its secure-aggregation mode (what the server saw of the updates) and
    its releases, all outside ε."""
    from tff_apps.privacy.statement import privacy_statement

    return add_to_statement(privacy_statement(None, secure=secure, section=section), keys)
