"""Real federations: the config of what makes a federation untidy, for horizontal apps.

Four sections, each off by default (a job without them runs exactly as before):

[communication]    update compression (TFF's quantizing aggregators, optionally rotated)
[clients]          unreliable clients: dropout, stragglers against a deadline,
                   over-selection, and the quorum a round needs
[robustness]       robust aggregation, and an evaluation mode that makes clients bad
[personalization]  per-client fine-tuning of the global model, evaluated per client

`check(cfg, client_rows)` refuses combinations that cannot run (one line, before any run
folder exists); the engine parts live in `processes` (aggregators), `program` (rounds)
and `personalization`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from shared.errors import UserError

COMPRESSIONS = ("none", "quantize", "hadamard", "dft")
AGGREGATIONS = ("mean", "clip_zero", "median", "trimmed_mean")
BAD_CLIENT_MODES = ("label_flip", "scaled_update")


@dataclass(frozen=True)
class CommunicationSection:
    """Compression of the clients' updates on the way up (the broadcast stays float32)."""

    # none; quantize = TFF's uniform stochastic quantization of the concatenated update;
    # hadamard / dft = the same after TFF's randomized Hadamard / Fourier rotation
    compression: str = field(default="none", metadata={"choices": COMPRESSIONS})
    bits: int = field(default=8, metadata={"min": 1, "max": 16})  # per quantized value


@dataclass(frozen=True)
class ClientsSection:
    """Simulated unreliable clients (seeded by job.seed, round and client)."""

    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})  # P(a sampled client fails)
    # Stragglers: a client's simulated time is examples x seconds_per_example x a lognormal
    # slowdown exp(N(0, speed_spread^2)); those over the deadline are cut. 0 = no deadline.
    deadline_seconds: float = field(default=0.0, metadata={"min": 0.0})
    seconds_per_example: float = field(default=0.001, metadata={"exclusive_min": 0.0})
    speed_spread: float = field(default=0.5, metadata={"min": 0.0, "max": 5.0})
    # Sample ceil(m * (1 + over_selection)) clients and keep the first m to report.
    over_selection: float = field(default=0.0, metadata={"min": 0.0, "max": 10.0})
    quorum: int = field(default=1, metadata={"min": 1})  # fewer reports: the round is skipped


@dataclass(frozen=True)
class RobustnessSection:
    """Robust aggregation, and the bad-client evaluation mode that shows what it buys."""

    # mean = the algorithm's (un)weighted mean; clip_zero = TFF's robust aggregator (adaptive
    # norm clipping and zeroing); median / trimmed_mean = coordinate-wise, unweighted
    aggregation: str = field(default="mean", metadata={"choices": AGGREGATIONS})
    trim_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 0.49})  # per side
    bad_clients: int = field(default=0, metadata={"min": 0})  # the first N clients turn bad
    bad_client_mode: str = field(default="label_flip", metadata={"choices": BAD_CLIENT_MODES})
    bad_update_scale: float = -4.0  # scaled_update: a bad client sends scale x its update


@dataclass(frozen=True)
class PersonalizationSection:
    """Per-client fine-tuning of the final global model on the client's own training split."""

    epochs: int = field(default=0, metadata={"min": 0, "max": 1000})  # 0 = off
    learning_rate: float = field(default=0.0, metadata={"min": 0.0})  # 0 = train.client_learning_rate


SECTIONS: dict[str, type] = {
    "communication": CommunicationSection,
    "clients": ClientsSection,
    "robustness": RobustnessSection,
    "personalization": PersonalizationSection,
}


@dataclass(frozen=True)
class Federation:
    """The four sections of one job, as the engine's builders take them."""

    communication: CommunicationSection = CommunicationSection()
    clients: ClientsSection = ClientsSection()
    robustness: RobustnessSection = RobustnessSection()
    personalization: PersonalizationSection = PersonalizationSection()

    @property
    def is_default(self) -> bool:
        return self == Federation()


def of(cfg) -> Federation:
    """The job's federation settings (a `config.JobConfig`)."""
    return Federation(**{name: getattr(cfg, name) for name in SECTIONS})


def changed_keys(federation: Federation) -> list[str]:
    """`section.key` of every setting that differs from its default."""
    changed = []
    for name, cls in SECTIONS.items():
        given, default = getattr(federation, name), cls()
        changed += [f"{name}.{key}" for key in vars(default) if getattr(given, key) != getattr(default, key)]
    return changed


def check(cfg, client_rows: Mapping[str, int] | None) -> None:
    """Refuses (UserError, one line) settings that cannot run with this job.

    `client_rows`: the app's training rows per client (`App.client_rows`), None for an app
    that is not horizontal (finance): there every setting must stay at its default.
    """
    federation = of(cfg)
    if client_rows is None:
        if not federation.is_default:
            key = changed_keys(federation)[0]
            raise UserError(
                f"config: {key} applies to horizontal apps (healthcare, traffic); remove it from this job"
            )
        return
    for part in (check_communication, check_clients, check_robustness, check_personalization):
        part(cfg, federation, dict(client_rows))


def check_communication(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    return None


def check_clients(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    return None


def check_robustness(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    return None


def check_personalization(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    return None


def describe(federation: Federation) -> dict[str, Any]:
    """The non-default settings, for summary.json and the model card."""
    return {key: getattr(getattr(federation, key.split(".")[0]), key.split(".")[1]) for key in changed_keys(federation)}
