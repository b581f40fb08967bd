"""The [privacy] section of a job, and the sampling the program performs that the accountant
amplifies over (client sampling at the server, Poisson record sampling at each client).
"""

from __future__ import annotations
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union


LEVELS = ("none", "client", "record")


SECURE_MODES = ("none", "simulated", "masked")


ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class PrivacySection:
    """The [privacy] section of a job."""

    level: str = field(default="none", metadata={"choices": LEVELS, "doc": (
        "`none`; `client`: DP-FedAvg, each sampled client's update clipped and Gaussian noise added to their sum "
        "(TFF's DifferentiallyPrivateFactory; clients weighted uniformly); `record`: DP-SGD at every client "
        "(per-example clipping, Gaussian noise, Poisson batches; healthcare only, `fedavg` or `fedavg_unweighted`)."
    )})
    clipping: str = field(default="adaptive", metadata={"choices": ("fixed", "adaptive"), "doc": (
        "Client level: `fixed` clip at `clip_norm`, or `adaptive` (Andrew et al. 2021) starting at `clip_norm`."
    )})
    clip_norm: float = field(default=1.0, metadata={"exclusive_min": 0.0, "doc": (
        "L2 clip of a client's update (client level) or of a per-example gradient (record level); adaptive: the "
        "initial clip."
    )})
    target_quantile: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "doc": (
        "Adaptive clipping: the share of updates left unclipped."
    )})
    noise_multiplier: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "Noise stddev / clip; 0 = calibrated before training so that `train.rounds` rounds spend exactly "
        "`target_epsilon`."
    )})
    target_epsilon: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "ε at `delta` not to exceed: with a fixed `noise_multiplier`, training stops before the round that would "
        "pass it; 0 = no target."
    )})
    delta: float = field(default=1e-5, metadata={"exclusive_min": 0.0, "max": 0.1, "doc": "δ of the (ε, δ) guarantee."})
    accountant: str = field(default="rdp", metadata={"choices": ACCOUNTANTS, "doc": (
        "dp-accounting's RDP or PLD accountant; `pld` cannot account fixed-size client sampling "
        "(`train.clients_per_round` < clients) and is refused there."
    )})
    lifetime_epsilon: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "ε budget of the data source across runs (0 = none): the run's planned spend is composed with the earlier "
        "runs on the same data (by data fingerprint) and reserved before training; a run that would pass the "
        "budget is refused with exit code 3."
    )})
    ledger: str = field(default="", metadata={"doc": (
        "The lifetime ledger (SQLite; safe across concurrent runs); empty = `<runs_dir>/privacy_ledger.sqlite`."
    )})
    secure_aggregation: str = field(default="none", metadata={"choices": SECURE_MODES, "doc": (
        "How the server receives the model updates: `none`, `simulated` (TFF's secure sum, which TFF's open runtime "
        "runs as a plain sum) or `masked` (pairwise-masked secure aggregation); works with every `level`."
    )})
    secure_bound: float = field(default=1.0, metadata={"exclusive_min": 0.0, "doc": (
        "B: each coordinate of a client's weighted update w·u is clipped to ±B·W before quantization (W = the "
        "largest client's weight)."
    )})
    secure_scale_bits: int = field(default=20, metadata={"min": 1, "max": 62, "doc": (
        "`masked`: fixed-point fractional bits s (values are multiples of 2^-s); the masking ring is 32-bit when "
        "the round's sum fits, else 64-bit."
    )})
    secure_threshold: float = field(default=0.67, metadata={"exclusive_min": 0.5, "max": 1.0, "doc": (
        "`masked`: shares needed to unmask, as a fraction f of the round's n clients (t = ⌈f·n⌉, always > n/2); "
        "more than n − t dropouts fail the round."
    )})


    preprocessing: str = field(default="exact", metadata={"choices": ("exact", "dp"), "doc": (
        "The federated normalization statistics and category counts built into the model: `exact` (a release "
        "outside ε, listed in the privacy statement) or `dp` (Gaussian mechanism on each site's count, sum and "
        "sum of squares within `preprocess.bounds`, composed into the run's ε; `level = \"record\"` only)."
    )})
    profiles: str = field(default="auto", metadata={"choices": ("auto", "none", "dp"), "doc": (
        "Client data profiles: `auto` = exact without DP, not computed with DP; `none`; `dp` = each site's "
        "rows, label share, and per column count, mean and std (no min or max) with Gaussian noise, composed "
        "into ε (`level = \"record\"` only)."
    )})
    statistics_epsilon: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "ε (at `delta`) of the DP data statistics (`preprocessing` and `profiles` = `dp`) on their own; 0 = a "
        "quarter of `target_epsilon`. Training gets the rest of the target."
    )})


@dataclass(frozen=True)
class ClientSampling:
    """Client level: each round `round_loop.sample_clients` draws `clients_per_round` of
    `n_clients` uniformly without replacement (0 or >= n: every client every round)."""

    n_clients: int
    clients_per_round: int = 0

    def __post_init__(self):
        if self.n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {self.n_clients}")

    @property
    def participants(self) -> int:
        """m: the fixed number of clients in every round (the DP mean's denominator)."""
        m = self.clients_per_round
        return self.n_clients if m <= 0 or m >= self.n_clients else m

    @property
    def samples(self) -> bool:
        return self.participants < self.n_clients

    def describe(self) -> str:
        if not self.samples:
            return f"no client sampling: all {self.n_clients} clients every round"
        return (
            f"fixed-size client sampling: {self.participants} of {self.n_clients} clients per round, "
            "uniformly without replacement"
        )


@dataclass(frozen=True)
class RecordSampling:
    """Record level: at client k, every local step includes each record independently with
    probability q_k = min(1, batch_size / rows_k) (`dp_sgd.poisson_client_dataset`);
    `steps_per_round[k]` steps per round."""

    client_rows: Mapping[str, int]
    batch_size: int
    steps_per_round: Mapping[str, int]

    def __post_init__(self):
        if not self.client_rows:
            raise ValueError("record sampling needs at least one client")
        if set(self.client_rows) != set(self.steps_per_round):
            raise ValueError("client_rows and steps_per_round must name the same clients")
        if self.batch_size < 1 or min(self.client_rows.values()) < 1:
            raise ValueError("batch_size and every client's rows must be >= 1")

    def q(self, client: str) -> float:
        return min(1.0, self.batch_size / self.client_rows[client])

    def expected_batch_size(self, client: str) -> float:
        return self.q(client) * self.client_rows[client]

    def describe(self) -> str:
        qs = [self.q(c) for c in self.client_rows]
        steps = list(self.steps_per_round.values())
        return (
            f"Poisson record sampling at each client: every record independently with "
            f"q = batch_size / rows ({min(qs):.4g}..{max(qs):.4g}) per local step, "
            f"{min(steps)}..{max(steps)} steps per round; client sampling not credited"
        )


Sampling = Union[ClientSampling, RecordSampling]


def client_sampling(train, n_clients: int) -> ClientSampling:
    """The client sampling a job with this [train] section performs on `n_clients`."""
    return ClientSampling(n_clients, train.clients_per_round)


def record_steps_per_round(train, rows: int) -> int:
    """Local DP-SGD steps per round: `local_steps`, or `local_epochs` expected passes
    (ceil(rows / batch_size) Poisson steps each)."""
    if train.local_steps > 0:
        return int(train.local_steps)
    return int(train.local_epochs) * max(1, math.ceil(rows / train.batch_size))


def record_sampling(train, client_rows: Mapping[str, int]) -> RecordSampling:
    rows = {name: int(n) for name, n in client_rows.items()}
    return RecordSampling(
        rows, int(train.batch_size), {name: record_steps_per_round(train, n) for name, n in rows.items()}
    )


def examples_per_round(train, rows: int) -> int:
    """A client's FedAvg weight: the examples it processes in a round (`client_data.client_dataset`)."""
    if train.local_steps > 0:
        return int(train.local_steps) * int(train.batch_size)
    return int(train.local_epochs) * int(rows)
