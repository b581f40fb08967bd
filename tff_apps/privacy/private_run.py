"""A job's differential privacy as it runs: the plan, the ε spent round by round, the ledger.

The job (`tff_apps.job.run_job`) builds one `RunPrivacy` from the `[privacy]` section
BEFORE the run folder exists: the sampling comes from the app's `client_rows` (how many
training examples each client will hold), `calibration.plan` resolves the noise multiplier and
the rounds that fit `target_epsilon`, and with `lifetime_epsilon > 0` the planned spend is
reserved in the lifetime ledger (a refusal leaves no run folder). The learning process
(`factory.build_learning_process(..., privacy=)`) and the program
(`round_loop.run_rounds(..., privacy=)`) then take it, so any horizontal app gets:

* client level: TFF's DP aggregator with the plan's noise multiplier;
* record level: DP-SGD client work on Poisson batches;
* the plan's rounds (training stops before a round that would pass the target ε);
* ε after each round in metrics.jsonl, from the sampling actually done;
* the privacy statement (summary.json, model card) from the mechanism as run;
* at the end the spend that actually ran is committed to the ledger (released if no round
  ran).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserError
from tff_apps.privacy import calibration
from tff_apps.privacy import dp_config
from tff_apps.privacy import secure_settings
from tff_apps.privacy.statement import privacy_statement
from tff_apps.privacy import accounting
from tff_apps.privacy import dp_events
from tff_apps.privacy import dp_statistics
from tff_apps.privacy import releases as releases_lib
from tff_apps.privacy import ledger as ledger_lib
from tff_apps.privacy.ledger import Ledger, Reservation

LEDGER_FILE = "privacy_ledger.sqlite"

log = logging.getLogger(__name__)


@dataclass
class RunPrivacy:
    plan: calibration.PrivacyPlan
    fingerprint: str
    ledger: Ledger | None = None
    reservation: Reservation | None = None
    rounds_run: int = 0
    participation: dict[str, int] = field(default_factory=dict)
    epsilon_so_far: float = 0.0
    finished: bool = False
    round_participants: list[list[str]] = field(default_factory=list)  # per round, in order
    secure: secure_settings.SecureAggregation | None = None  # the job's secure aggregation, if any
    # what the learning process resolved for the mechanism (distributed DP: noise passed to
    # TFF, scale, sensitivity after rounding); `factory.build_learning_process` fills it
    mechanism_details: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None  # `client_noise_warning`
    statistics_spec: Any = None  # dp_statistics.StatisticsSpec when the plan has DP statistics
    statistics_released: bool = False  # the DP statistics left the sites (this attempt or an earlier one)
    releases: list[str] | None = None  # the app's releases outside ε (`releases.RELEASES` keys)
    _composition: accounting.Composition | None = None

    @property
    def section(self) -> dp_config.PrivacySection:
        return self.plan.section

    @property
    def level(self) -> str:
        return self.plan.level

    @property
    def rounds(self) -> int:
        """The rounds to run: `train.rounds`, or fewer when the target ε stops training."""
        return self.plan.rounds

    # -- the program's side ------------------------------------------------------------------

    def check_clients(self, rows: Mapping[str, int]) -> None:
        """The clients handed to the program must be the ones the plan accounted for."""
        sampling = self.plan.sampling
        if isinstance(sampling, dp_config.ClientSampling):
            if len(rows) != sampling.n_clients:
                raise RuntimeError(
                    f"privacy plan made for {sampling.n_clients} clients, the program got {len(rows)}"
                )
        elif dict(rows) != dict(sampling.client_rows):
            raise RuntimeError(
                f"privacy plan made for client rows {dict(sampling.client_rows)}, the program got {dict(rows)}"
            )

    def record_round(self, participants: Sequence[str]) -> float:
        """Accounts one round that ran with these clients; returns ε so far."""
        composition = self._composition_so_far()
        spend = dp_events.round_spend(
            self.plan.noise_multiplier, self.plan.sampling, self.section.clipping, participants
        )
        composition.add(spend)
        self.rounds_run += 1
        for name in participants:
            self.participation[name] = self.participation.get(name, 0) + 1
        self.epsilon_so_far = composition.epsilon(self.section.delta)
        self.round_participants.append(list(participants))
        return self.epsilon_so_far

    def _composition_so_far(self) -> accounting.Composition:
        """The running composition, which starts with the DP statistics (if any)."""
        if self._composition is None:
            self._composition = accounting.Composition(self.section.accountant)
            statistics = self.plan.statistics_spend()
            if statistics is not None:
                self._composition.add(statistics)
        return self._composition

    def statistics_done(self) -> float:
        """The DP statistics were released (or loaded from the run's earlier attempt):
        their ε counts from now on, even if no round runs. Returns ε so far."""
        self.statistics_released = True
        self.epsilon_so_far = self._composition_so_far().epsilon(self.section.delta)
        return self.epsilon_so_far

    def restore(self, round_participants: Sequence[Sequence[str]]) -> None:
        """A resumed run (from a checkpoint): accounts the rounds that ran before, in order,
        so ε continues exactly as if the run had not stopped. Only on a fresh RunPrivacy."""
        if self.rounds_run:
            raise RuntimeError("RunPrivacy.restore: rounds were already recorded")
        for participants in round_participants:
            self.record_round(list(participants))

    # -- what ran ----------------------------------------------------------------------------

    def _participation(self) -> dict[str, int] | None:
        return dict(self.participation) if self.level == "record" else None

    def spend(self) -> dp_events.Spend:
        """The mechanism that actually ran: its rounds and, at record level, who took part."""
        return self.plan.spend(self.rounds_run, self._participation())

    def lifetime_spent(self) -> float | None:
        """ε of the data source over every live ledger spend, this run's actual one included."""
        if self.ledger is None:
            return None
        own_id = self.reservation.id if self.reservation else None
        others = [
            entry
            for entry in self.ledger.history(self.fingerprint)
            if entry.status != "released" and entry.id != own_id
        ]
        accountant = ledger_lib.composition_accountant(
            [entry.accountant for entry in others] + [self.section.accountant]
        )
        spends = [entry.spend for entry in others] + [self.spend()]
        return accounting.composed_epsilon(spends, self.section.delta, accountant)

    def statement(self) -> dict[str, Any]:
        statement = privacy_statement(
            self.plan, self.rounds_run, self._participation(), self.lifetime_spent(), secure=self.secure,
            statistics_spec=self.statistics_spec,
        )
        if self.mechanism_details:
            statement["secure_aggregation"].update(self.mechanism_details)
        statement["rounds_planned"] = self.plan.rounds
        if self.ledger is not None:
            statement["ledger"] = str(self.ledger.path)
        statement["data_fingerprint"] = self.fingerprint
        if self.releases is not None:
            statement = releases_lib.add_to_statement(statement, self.releases, self.section)
        return statement

    def finish(self) -> None:
        """Commits the spend that ran (even if the run failed later), or releases the
        reservation of a run that never trained."""
        if self.finished:
            return
        self.finished = True
        if self.ledger is None or self.reservation is None:
            return
        if self.rounds_run == 0 and not self.statistics_released:
            self.ledger.release(self.reservation)
        else:
            self.ledger.commit(self.reservation, self.spend())


def statistics_spec(app, cfg, prepared) -> dp_statistics.StatisticsSpec:
    """The public column ranges of the app's data (UserError before the run folder if any
    column has none)."""
    spec_of = getattr(app, "statistics_spec", None)
    if spec_of is None:
        names = ", ".join(dp_statistics.releases(cfg.privacy))
        raise UserError(f"privacy: app {app.name!r} has no DP statistics; set privacy.{names} back to its default")
    return spec_of(cfg, prepared)


# Above this per-coordinate noise std on the mean update (relative to the clip: z / m for m
# clients a round), client-level DP drowns the updates: the job gets a warning line.
NOISE_WARNING_RATIO = 0.1


def client_noise_warning(plan: calibration.PrivacyPlan) -> str | None:
    """One line when client-level noise swamps the mean update (e.g. a few hospitals at a
    small ε), None otherwise: the sum of m clipped updates gets N(0, (zC)^2) per coordinate,
    so the mean gets std zC/m against updates of norm at most C."""
    if plan.level != "client":
        return None
    m = plan.sampling.participants
    ratio = plan.noise_multiplier / m
    if ratio < NOISE_WARNING_RATIO:
        return None
    return (
        f"privacy: client-level DP over {m} clients a round adds noise of std {ratio:.3g} x privacy.clip_norm "
        f"to every coordinate of the mean update (z = {plan.noise_multiplier:.3g}), while a clipped update has "
        "norm at most 1 x clip_norm: expect the model to learn mostly noise. Record-level DP "
        '(privacy.level = "record") suits a few clients with many rows each.'
    )


def start(app, cfg, prepared, run_id: str, resume: bool = False) -> RunPrivacy | None:
    """Plans the job's DP and reserves its lifetime budget; None when `privacy.level` is none
    (a job with only `privacy.secure_aggregation` gets it checked here, and None).

    Raises UserError (or ledger.BudgetExhausted) before anything is written. `resume`: the
    run id continues an interrupted run, whose ledger row is reopened, not added to.
    """
    section: dp_config.PrivacySection = cfg.privacy
    dp_statistics.check_section(section)
    if section.level == "none" and section.secure_aggregation == "none":
        return None
    client_rows = getattr(app, "client_rows", None)
    fingerprint_of = getattr(app, "fingerprint", None)
    if client_rows is None or fingerprint_of is None:
        key = "level" if section.level != "none" else "secure_aggregation"
        raise UserError(f"privacy.{key} = {getattr(section, key)!r}: app {app.name!r} does not support [privacy]")
    rows = {str(name): int(n) for name, n in client_rows(cfg, prepared).items()}
    # Secure aggregation is checked for every job, with or without DP (UserError before any output).
    secure = secure_settings.secure_aggregation(section, cfg.train, rows)
    if section.level == "none":
        return None
    if section.level == "client":
        sampling: dp_config.Sampling = dp_config.client_sampling(cfg.train, len(rows))
    else:
        sampling = dp_config.record_sampling(cfg.train, rows)
    # the statistics' public ranges are checked before the noise is calibrated (seconds of accounting)
    spec = statistics_spec(app, cfg, prepared) if dp_statistics.releases(section) else None
    plan = calibration.plan(section, cfg.train, sampling)
    if plan.rounds < cfg.train.rounds:
        log.info(
            "privacy: %d of train.rounds = %d fit privacy.target_epsilon = %g",
            plan.rounds, cfg.train.rounds, section.target_epsilon,
        )
    result = RunPrivacy(plan, fingerprint_of(prepared), secure=secure, warning=client_noise_warning(plan))
    if plan.statistics:
        result.statistics_spec = spec
    if result.warning:
        log.warning(result.warning)  # before training, on stderr; the run's log gets it too
    if section.lifetime_epsilon > 0:
        path = Path(section.ledger) if section.ledger else Path(cfg.job.runs_dir) / LEDGER_FILE
        result.ledger = Ledger(path)
        result.reservation = result.ledger.reserve(
            result.fingerprint, run_id, plan.spend(), section.delta, section.accountant,
            section.lifetime_epsilon, resume=resume,
        )
    return result
