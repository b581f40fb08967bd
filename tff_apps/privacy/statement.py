"""The privacy statement of a run: the mechanism that ran, its ε, and the limits of the guarantee.

Limits of the guarantee (put in the privacy statement)
------------------------------------------------------
* Amplification by sampling assumes the adversary does not know who was sampled: the
  sampling follows a secret seed from the OS (not the job seed), and the seed and the
  per-round client lists stay in operator-only files (`releases.OPERATOR_ONLY`).
* ε covers the model updates. Training metrics that client works report (loss, accuracy,
  example counts) are aggregated without noise; `dp_sgd` reports none.
* Client-level DP implies uniform client weighting: the DP mean divides the noised sum by
  the fixed m, ignoring FedAvg's example weights (weights would leak data sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tff_apps.privacy.accounting import Composition, epsilon
from tff_apps.privacy.calibration import PrivacyPlan
from tff_apps.privacy.dp_config import PrivacySection
from tff_apps.privacy.dp_events import adaptive_noise_split
from tff_apps.privacy.secure_settings import SecureAggregation, secure_aggregation_statement


def privacy_statement(
    plan_: PrivacyPlan | None,
    rounds_run: int | None = None,
    participation: Mapping[str, int] | None = None,
    lifetime_spent: float | None = None,
    secure: SecureAggregation | None = None,
    section: PrivacySection | None = None,
    statistics_spec=None,
) -> dict[str, Any]:
    """What the model card says about privacy; ε computed here from the mechanism that ran.

    `secure` (the job's resolved secure aggregation) or `section` (for a job without DP,
    whose plan is None) adds the secure aggregation mode (`secure_aggregation`).
    """
    if plan_ is None:
        statement_none: dict[str, Any] = {"mechanism": "none", "level": "none", "epsilon": None, "delta": None}
        if section is not None or secure is not None:
            statement_none["secure_aggregation"] = secure_aggregation_statement(section, secure)
        return statement_none
    s = plan_.section
    rounds = plan_.rounds if rounds_run is None else int(rounds_run)
    spend = plan_.spend(rounds, participation)
    statement: dict[str, Any] = {
        "level": s.level,
        "epsilon": epsilon(spend, s.delta, s.accountant),
        "delta": s.delta,
        "accountant": {
            "rdp": "RDP (dp-accounting 0.4.3, default orders)",
            "pld": "PLD (dp-accounting 0.4.3)",
        }[s.accountant],
        "noise_multiplier": plan_.noise_multiplier,
        "noise_multiplier_calibrated": plan_.calibrated,
        "rounds": rounds,
        "sampling": plan_.sampling.describe(),
        "assumptions": [
            "the sampling is secret: it follows a seed drawn from the OS, which like the per-round client "
            "lists stays in the operator-only files",
            "training metrics (loss, accuracy, counts) are not covered by ε",
        ],
    }
    if plan_.statistics:
        statement.update(statistics_statement(plan_, rounds, participation, statistics_spec))
    statement["secure_aggregation"] = secure_aggregation_statement(s, secure)
    if s.level == "client" and s.secure_aggregation in ("simulated", "masked"):
        statement["mechanism"] = (
            "distributed DP-FedAvg: clipped client updates, rotated, rounded to integers and noised with "
            "discrete Gaussians by the clients; only their secure sum is seen (TFF DistributedDpSumFactory)"
        )
        statement["noise_added_by"] = "each client, before secure aggregation: the server sees only the noised sum"
        statement["noise_accounting"] = (
            "the sum of the clients' discrete Gaussian noises is accounted as one Gaussian of the same "
            "standard deviation (Gaussian approximation, Kairouz et al. 2021); the noise multiplier is "
            "that standard deviation over the L2 sensitivity after randomized rounding (C + gamma*sqrt(d))"
        )
    elif s.level == "client":
        statement["mechanism"] = (
            "DP-FedAvg: clipped client updates, Gaussian noise on their sum (TFF DifferentiallyPrivateFactory)"
        )
        # central DP: the trust it needs, in the statement (across sites the server is the coordinator)
        statement["noise_added_by"] = (
            "the server (the coordinator across sites), after aggregation: it sees the exact sum of the clipped "
            "updates before noising, and each update (privacy.secure_aggregation = 'none'); trust it, or use "
            "privacy.secure_aggregation = 'masked' (distributed DP: each client adds its noise share)"
        )
    if s.level == "client":
        statement["adjacency"] = "replace one client's data (number of clients public)"
        statement["client_weighting"] = "uniform (the DP mean divides by the fixed clients per round)"
        if s.clipping == "fixed":
            statement["clipping"] = f"fixed L2 clip {s.clip_norm:g} on each client's update"
        else:
            value, count = adaptive_noise_split(plan_.noise_multiplier, plan_.sampling.participants)
            statement["clipping"] = (
                f"adaptive L2 clip (Andrew et al. 2021) from {s.clip_norm:g} toward quantile "
                f"{s.target_quantile:g}; value noise {value:.4g}, clipped-count stddev {count:.4g}, "
                f"total noise multiplier {plan_.noise_multiplier:.4g}"
            )
    else:
        statement["mechanism"] = (
            "DP-SGD at each client: per-example clipping, Gaussian noise, Poisson batches"
        )
        statement["adjacency"] = "add or remove one record at one client (row counts public)"
        statement["clipping"] = f"fixed L2 clip {s.clip_norm:g} on each per-example gradient"
        statement["epsilon_by_client"] = Composition(s.accountant).add(spend).epsilon_by_client(s.delta)
    if s.target_epsilon > 0:
        statement["target_epsilon"] = s.target_epsilon
    if lifetime_spent is not None:
        statement["lifetime_epsilon_spent"] = lifetime_spent
        statement["lifetime_epsilon_budget"] = s.lifetime_epsilon or None
    return statement


def statistics_statement(plan_: PrivacyPlan, rounds: int, participation, spec) -> dict[str, Any]:
    """ε split into the DP data statistics and training (each alone; together they compose
    to the statement's ε), and what the statistics were."""
    s = plan_.section
    z = plan_.statistics_noise_multiplier
    released = {
        "preprocessing": "each feature column's count, sum and sum of squares, and each category's count, "
        "summed over the sites",
        "profiles": "each site's rows, positives, and per column count, sum and sum of squares",
    }
    details: dict[str, Any] = {
        "mechanism": "Gaussian mechanism on each site's statistics of values clipped to preprocess.bounds "
        "(dp_statistics), before training",
        "releases": {name: released[name] for name in plan_.statistics},
        "noise_multiplier": z,
    }
    if spec is not None:
        details["sensitivity"] = {
            name: spec.sensitivity(with_labels=name == "profiles") for name in plan_.statistics
        }
        details["bounds"] = {**{k: list(v) for k, v in spec.numeric.items()},
                             **{k: list(v) for k, v in spec.categorical.items()}}
    return {
        "epsilon_statistics": epsilon(plan_.statistics_spend(), s.delta, s.accountant),
        "epsilon_training": epsilon(plan_.training_spend(rounds, participation), s.delta, s.accountant),
        "statistics": details,
    }
