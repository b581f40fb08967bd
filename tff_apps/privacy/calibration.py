"""Calibration and the job's privacy plan: the noise multiplier for a target ε, the rounds a
budget allows, and the `PrivacyPlan` a run follows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from dp_accounting import dp_event as dpe
from scipy import optimize

from shared.errors import UserError
from tff_apps.privacy import dp_statistics
from tff_apps.privacy.accounting import check_accountant, epsilon, epsilon_after_round, epsilon_for_rounds
from tff_apps.privacy.dp_config import ClientSampling, PrivacySection, RecordSampling, Sampling
from tff_apps.privacy.dp_events import Spend, dp_event

# Calibration search range and precision (relative) for the noise multiplier.
MIN_NOISE_MULTIPLIER = 1e-3
MAX_NOISE_MULTIPLIER = 1e4
CALIBRATION_RTOL = 1e-3


def rounds_within_budget(
    target_epsilon: float,
    noise_multiplier: float,
    delta: float,
    max_rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
    prefix: Spend | None = None,
) -> int:
    """The most rounds (<= max_rounds) whose ε stays <= target: training stops before the
    round that would exceed it. ε grows with rounds, so this is a bisection."""

    def fits(r: int) -> bool:
        return (
            epsilon_for_rounds(noise_multiplier, delta, r, sampling, accountant, clipping, prefix) <= target_epsilon
        )

    if fits(max_rounds):
        return int(max_rounds)
    low, high = 0, int(max_rounds)  # fits(low) (0 rounds spend nothing), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
    prefix: Spend | None = None,
) -> float:
    """The smallest z (to 0.1 % relative) whose ε after `rounds` rounds is <= target.

    ε falls as z grows: bracket by factors of 4 from z = 1, then Brent's method on log z
    (to 0.01 %), stepping up until ε fits. A target that needs z > 1e4 is refused.
    """
    check_accountant(accountant, sampling)
    if target_epsilon <= 0:
        raise UserError(f"privacy.target_epsilon = {target_epsilon!r} must be > 0 to calibrate the noise")

    def eps(z: float) -> float:
        return epsilon_for_rounds(z, delta, rounds, sampling, accountant, clipping, prefix)

    if eps(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise UserError(
            f"privacy.target_epsilon = {target_epsilon:g} is unreachable at privacy.delta = {delta:g} "
            f"over {rounds} rounds (even noise_multiplier = {MAX_NOISE_MULTIPLIER:g} gives "
            f"ε = {eps(MAX_NOISE_MULTIPLIER):.3g}); raise the target, train.rounds or fewer steps"
        )
    high = 1.0
    while eps(high) > target_epsilon:  # terminates: eps(1e4) fits
        high = min(high * 4.0, MAX_NOISE_MULTIPLIER)
    low = high / 4.0
    while low > MIN_NOISE_MULTIPLIER and eps(low) <= target_epsilon:
        high, low = low, low / 4.0
    if low <= MIN_NOISE_MULTIPLIER:
        return float(high)
    # eps(low) > target >= eps(high): Brent's method on log z, then the first z that fits.
    root = optimize.brentq(
        lambda t: eps(math.exp(t)) - target_epsilon, math.log(low), math.log(high), xtol=CALIBRATION_RTOL / 10
    )
    z = min(math.exp(root), high)
    while eps(z) > target_epsilon:
        z = min(z * (1.0 + CALIBRATION_RTOL / 10), high)
    return float(z)


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved mechanism of one job: noise, sampling and the rounds that fit the target."""

    section: PrivacySection
    sampling: Sampling
    noise_multiplier: float  # TFF's (total) noise_multiplier / DP-SGD's z
    rounds: int  # rounds to run (train.rounds, or fewer if the target ε stops training earlier)
    calibrated: bool
    statistics: tuple[str, ...] = ()  # the DP data statistics released before training
    statistics_noise_multiplier: float = 0.0

    @property
    def level(self) -> str:
        return self.section.level

    def statistics_spend(self) -> Spend | None:
        """Every client's records are in the DP statistics, sampled in training or not."""
        if not self.statistics:
            return None
        event = dp_statistics.statistics_event(self.statistics_noise_multiplier, len(self.statistics))
        return {name: event for name in self.sampling.client_rows}

    def training_spend(self, rounds: int | None = None, participation: Mapping[str, int] | None = None) -> Spend:
        return dp_event(
            self.noise_multiplier,
            self.sampling,
            self.rounds if rounds is None else rounds,
            self.section.clipping,
            participation,
        )

    def spend(self, rounds: int | None = None, participation: Mapping[str, int] | None = None) -> Spend:
        """The statistics (if any) and training, composed."""
        training = self.training_spend(rounds, participation)
        statistics = self.statistics_spend()
        if statistics is None:
            return training
        return {
            name: dpe.ComposedDpEvent([event, training[name]]) if name in training else event
            for name, event in statistics.items()
        }

    def epsilon(self, rounds: int | None = None, participation: Mapping[str, int] | None = None) -> float:
        return epsilon(self.spend(rounds, participation), self.section.delta, self.section.accountant)

    def epsilon_after_round(self) -> list[float]:
        return epsilon_after_round(
            self.noise_multiplier,
            self.section.delta,
            self.rounds,
            self.sampling,
            self.section.accountant,
            self.section.clipping,
            self.statistics_spend(),
        )


def plan(section: PrivacySection, train, sampling: Sampling) -> PrivacyPlan | None:
    """Checks the section against the job and resolves the noise multiplier and rounds.

    None for `level = "none"`. Given noise and a target: the rounds that fit the target.
    Given only a target: the noise calibrated for `train.rounds`.
    """
    if section.level == "none":
        return None
    if section.level == "client" and not isinstance(sampling, ClientSampling):
        raise ValueError("privacy.level = 'client' needs a ClientSampling")
    if section.level == "record":
        if not isinstance(sampling, RecordSampling):
            raise ValueError("privacy.level = 'record' needs a RecordSampling")
        if train.algorithm == "fedprox":
            raise UserError(
                "privacy.level = 'record' runs DP-SGD as the local training; train.algorithm = "
                "'fedprox' cannot be combined with it: use 'fedavg' or 'fedavg_unweighted'"
            )
    if section.noise_multiplier == 0 and section.target_epsilon == 0:
        raise UserError(
            f"privacy.level = {section.level!r} needs privacy.noise_multiplier > 0 or "
            "privacy.target_epsilon > 0 (to calibrate the noise); both are 0"
        )
    check_accountant(section.accountant, sampling)
    dp_statistics.check_section(section)
    statistics = tuple(dp_statistics.releases(section))
    statistics_z = 0.0
    if statistics:
        statistics_z = dp_statistics.calibrate(
            dp_statistics.statistics_epsilon(section), section.delta, len(statistics), section.accountant
        )
    resolved = PrivacyPlan(section, sampling, 0.0, int(train.rounds), False, statistics, statistics_z)
    prefix = resolved.statistics_spend()
    rounds = int(train.rounds)
    if section.noise_multiplier > 0:
        z = float(section.noise_multiplier)
        if section.target_epsilon > 0:
            rounds = rounds_within_budget(
                section.target_epsilon, z, section.delta, rounds, sampling, section.accountant,
                section.clipping, prefix,
            )
            if rounds == 0:
                first = epsilon_for_rounds(
                    z, section.delta, 1, sampling, section.accountant, section.clipping, prefix
                )
                raise UserError(
                    f"privacy.target_epsilon = {section.target_epsilon:g}: a single round with "
                    f"privacy.noise_multiplier = {z:g} already spends ε = {first:.3g}; raise "
                    "the target or the noise multiplier (or set it to 0 to calibrate)"
                )
        return dataclasses.replace(resolved, noise_multiplier=z, rounds=rounds)
    z = calibrate_noise_multiplier(
        section.target_epsilon, section.delta, rounds, sampling, section.accountant, section.clipping, prefix
    )
    return dataclasses.replace(resolved, noise_multiplier=z, calibrated=True)
