"""Differential privacy: the [privacy] section, the mechanisms as run, and their ε.

Two levels (`privacy.level`):

client  DP-FedAvg (McMahan et al. 2018): each sampled client's model update is clipped to
        L2 norm C, the server adds N(0, (z*C)^2) to the sum and divides by the FIXED
        `clients_per_round` m (TFF's `DifferentiallyPrivateFactory`, see
        `client_dp_aggregator`). Clipping "fixed" uses C = `clip_norm`; "adaptive" (Andrew
        et al. 2021) starts at `clip_norm` and moves C toward the `target_quantile` of the
        update norms, spending part of the noise on a noisy count of unclipped clients.
record  DP-SGD (Abadi et al. 2016) at every client (`tff_apps/dp_sgd.py`): per local step
        each record is Poisson-sampled with q = batch_size / rows, per-example gradients are
        clipped to C, summed, N(0, (z*C)^2) is added and the sum divided by q*rows.

How ε is accounted (dp-accounting 0.4.3, read from its installed source)
------------------------------------------------------------------------
* The events are built from the mechanism as run: the noise multiplier actually passed to
  TFF / DP-SGD, the sampling the program really performs, the rounds and local steps. TFF
  0.87 does report a per-round event in the DP aggregator's state
  (`extract_dp_event_from_state`; `mechanism_event_from_state` below reads it), but that
  event knows nothing of client sampling or rounds, so the composed event is built here
  from the resolved config and the sampling, with the per-round mechanism event equal to
  the one TFF reports (tests/tff_apps/test_privacy.py checks they agree).
* Client level, sampling. `tff_apps.program.sample_clients` draws a FIXED-size subset of m
  of n clients without replacement. The event is
  `SelfComposed(SampledWithoutReplacement(n, m, Gaussian(z/2)), rounds)`. dp-accounting
  accounts fixed-size sampling only with the RDP accountant and only under the
  REPLACE_ONE neighbouring relation (Wang, Balle & Kasiviswanathan 2019, Thm 27): the
  guarantee is for replacing one client's entire data by any other, the number of
  clients being public. Under replacement the L2 sensitivity of a sum of C-clipped
  updates is 2C, not C, so the noise multiplier relative to the sensitivity is z/2
  (`_compute_rdp_sample_wor_gaussian` takes "std / l2-sensitivity"). Using Gaussian(z)
  there, as one might read `GaussianDpEvent`'s "std / C", would understate ε.
* Client level, every client every round (`clients_per_round` 0 or >= n): no
  amplification, `SelfComposed(Gaussian(z/2), rounds)`, same relation, so ε is monotone in
  m and both client-level cases mean the same thing.
* PLD: dp-accounting 0.4.3's `PLDAccountant` supports Gaussian, Laplace and Poisson
  sampling only; it has no sampling-without-replacement event. `accountant = "pld"` is
  therefore refused (UserError) for client level with sampling; with every client every
  round it is exact Gaussian PLD accounting. Poisson client sampling would be a different
  mechanism from the one the program runs and is not substituted.
* Adaptive clipping. TFF's `gaussian_adaptive(noise_multiplier=z, ...)` treats z as the
  TOTAL noise multiplier: it raises the value noise to z_v = (z^-2 - (2s)^-2)^-1/2 and adds
  N(0, s^2) to the count of unclipped clients (records +-0.5, sensitivity 0.5 ->
  GaussianDpEvent(2s)). The per-round event is Composed([Gaussian(z_v), Gaussian(2s)]),
  whose effective noise multiplier (z_v^-2 + (2s)^-2)^-1/2 is exactly z: the accounted z
  bounds value AND clip estimate together. TFF's default s = 0.05*m is infeasible for
  small cohorts (it needs z < 0.1*m); we pass s = max(0.05*m, z/1.2), which keeps
  z_v <= 1.25*z (`adaptive_noise_split`).
* Record level. Per client k: `SelfComposed(PoissonSampled(q_k, Gaussian(z)), steps_k *
  rounds_k)`, add/remove-one-record relation, q_k = min(1, batch_size / rows_k), rows_k
  treated as public (as in every DP-SGD implementation). Each client accounts its own
  records; the job's ε is the max over clients. Client sampling is not credited
  (conservative); rounds_k counts the rounds client k actually took part in.
* RDP (default orders) and PLD (`PLDAccountant`, default discretization) are
  dp-accounting's own accountants. Compositions mixing relations (the lifetime ledger may
  hold client- and record-level runs on the same data) are composed in RDP by adding each
  event's RDP curve, each computed under its own relation: a client-level bound also
  bounds any change of one record inside that client, so the sum bounds the record-level
  loss. For a single relation this is exactly the accountant's ComposedDpEvent.

Secure aggregation (`privacy.secure_aggregation`; `SecureAggregation` below)
--------------------------------------------------------------------------
What the server sees of the model updates, independent of the DP level:

none       TFF's plain (un)weighted mean: the aggregator receives each client's update.
simulated  The mean's value sum and weight (or count) sum go through TFF's
           `SecureSumFactory` (`federated_secure_sum_bitwidth`), so the server is only
           handed sums. TFF's open runtime REPLACES the intrinsic by a plain sum
           (`runtime.Runtime`): nothing is cryptographically protected; the mode shows what
           a deployment with a real secure-sum backend would compute, quantization included.
           With `level = "client"` this is distributed DP instead (`processes.ddp_aggregator`).
masked     A real protocol in this process: pairwise-masked secure aggregation after
           Bonawitz et al. (CCS 2017), `shared/secagg.py`, run between the client phase and
           the server phase of each round (`tff_apps/secure_rounds.py`).

Both secure modes clip identically, per coordinate: with weight w (examples processed this
round, weighted FedAvg/FedProx) the weighted update w*u is clipped to +-B*W, where
B = `secure_bound` and W = `max_weight`, the largest client's examples per round (a public
bound derived from the clients' row counts; W = 1 and w = 1 for unweighted means). The
weights themselves lie in [0, W]. Quantization (per coordinate of the mean's sums):
simulated: TFF maps [-B*W, B*W] to 32-bit integers, at most (B*W / (2^32 - 1)) per client
(plus float32 rounding); masked: w*u/W in fixed point with `secure_scale_bits` s fractional
bits, at most W * 2^-(s+1) per client (`shared.secagg.quantization_error_bound`).

Distributed DP (`level = "client"` with `secure_aggregation = "simulated"`): TFF's
`DistributedDpSumFactory` with the distributed discrete Gaussian mechanism (Kairouz, Liu &
Steinke 2021), fixed L2 clip C, randomized Hadamard rotation, scaling by gamma^-1 and
unconditional randomized rounding (beta = 0), then every client adds discrete Gaussian noise
and only the secure sum of the noised integer vectors reaches the server.
`tff.learning.ddp_secure_aggregator` is NOT used as is: it hard-codes the Skellam mechanism,
adaptive clipping (auto_l2_clip, whose noise split changes the discretization every round)
and un-noised adaptive zeroing, none of which the accountant here models; we build the same
stack (DistributedDpSumFactory inside UnweightedMeanFactory with a SecureSumFactory count)
with fixed clipping and discrete Gaussians. Accounting: rounding inflates the L2 norm bound
to Delta = C + gamma*sqrt(d) (+1e-5, TFF's margin; d the padded dimension), a deterministic
bound for beta = 0; each of the m clients adds discrete Gaussian noise of scale
ceil(sigma_local / gamma) in the integer domain (TFF's sampler takes integer scales). The
sum of m independent discrete Gaussians is APPROXIMATED by a continuous Gaussian of the same
total standard deviation sqrt(m) * ceil(sigma_local/gamma) * gamma (the approximation of
Kairouz et al. 2021, Sec. 4; a discrete Gaussian is at least as private as the continuous
one of the same scale, Canonne et al. 2020, but the sum of several is not exactly a
discrete Gaussian). The effective noise multiplier z_eff = total stddev / Delta is set
(`processes.ddp_parameters`) to the plan's calibrated z, rounded UP to the next integer
noise scale (2e-5 relative for the healthcare model; the statement reports both), so the
client-level accounting above (Gaussian(z/2) under replace-one) applies unchanged and is
conservative. Adaptive clipping with distributed DP is refused.

Limits of the guarantee (put in the privacy statement)
------------------------------------------------------
* Amplification by sampling assumes the adversary does not know who was sampled: the job
  seed and the per-round client list in metrics.jsonl must not be released with the model.
* ε covers the model updates. Training metrics that client works report (loss, accuracy,
  example counts) are aggregated without noise; `dp_sgd` reports none.
* Client-level DP implies uniform client weighting: the DP mean divides the noised sum by
  the fixed m, ignoring FedAvg's example weights (weights would leak data sizes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import dp_accounting
import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from shared.errors import UserError

LEVELS = ("none", "client", "record")
SECURE_MODES = ("none", "simulated", "masked")
ACCOUNTANTS = ("rdp", "pld")

# Calibration search range and precision (relative) for the noise multiplier.
MIN_NOISE_MULTIPLIER = 1e-3
MAX_NOISE_MULTIPLIER = 1e4
CALIBRATION_RTOL = 1e-3

# Adaptive clipping: the value noise may be at most this factor above the total z.
MAX_VALUE_NOISE_INFLATION = 1.25

RDP_ORDERS = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)

# A client level run yields one event; a record level run one event per client (by name).
Spend = Union[dpe.DpEvent, Mapping[str, dpe.DpEvent]]


@dataclass(frozen=True)
class PrivacySection:
    """The [privacy] section of a job."""

    level: str = field(default="none", metadata={"choices": LEVELS})
    clipping: str = field(default="adaptive", metadata={"choices": ("fixed", "adaptive")})  # client level
    # fixed clip (client: update L2 norm; record: per-example gradient L2 norm); adaptive: initial clip
    clip_norm: float = field(default=1.0, metadata={"exclusive_min": 0.0})
    target_quantile: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # adaptive clipping
    noise_multiplier: float = field(default=0.0, metadata={"min": 0.0})  # 0 = calibrate from target_epsilon
    target_epsilon: float = field(default=0.0, metadata={"min": 0.0})  # 0 = no target
    delta: float = field(default=1e-5, metadata={"exclusive_min": 0.0, "max": 0.1})
    accountant: str = field(default="rdp", metadata={"choices": ACCOUNTANTS})
    lifetime_epsilon: float = field(default=0.0, metadata={"min": 0.0})  # 0 = no lifetime budget
    ledger: str = ""  # lifetime ledger path; the job defaults it to <runs_dir>/privacy_ledger.sqlite
    # Secure aggregation of the model updates (module docstring, "Secure aggregation").
    secure_aggregation: str = field(default="none", metadata={"choices": SECURE_MODES})
    # per-coordinate clip of each client's weighted update w*u to +-secure_bound * max_weight
    secure_bound: float = field(default=1.0, metadata={"exclusive_min": 0.0})
    secure_scale_bits: int = field(default=20, metadata={"min": 1, "max": 62})  # masked: fixed-point bits
    # masked: shares needed to unmask, as a fraction of the round's clients (t = ceil(f * n))
    secure_threshold: float = field(default=0.67, metadata={"exclusive_min": 0.5, "max": 1.0})


# -- sampling as the program performs it --------------------------------------------------


@dataclass(frozen=True)
class ClientSampling:
    """Client level: each round `program.sample_clients` draws `clients_per_round` of
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


# -- secure aggregation ---------------------------------------------------------------------

WEIGHTED_ALGORITHMS = ("fedavg", "fedprox")  # as tff_apps.processes.WEIGHTED_ALGORITHMS
RING_LIMITS = {32: 2**31 - 1, 64: 2**63 - 1}
DDP_BITS = 20  # TFF's default field size for ddp_secure_aggregator


@dataclass(frozen=True)
class SecureAggregation:
    """The resolved secure aggregation of one job (`secure_aggregation` builds it).

    Each client sends, per coordinate, clip(w * u, +-bound * max_weight) to the value sum
    and w (in [0, max_weight]) to the weight sum; for unweighted means w = max_weight = 1.
    """

    mode: str  # "simulated" or "masked"
    bound: float  # B
    scale_bits: int  # masked: fixed-point fractional bits s
    threshold_fraction: float  # masked: t = ceil(f * n)
    max_weight: float  # W
    weighted: bool
    participants: int  # m, clients per round
    distributed_dp: bool = False  # client-level DP + simulated: DistributedDpSumFactory

    @property
    def value_bound(self) -> float:
        """The clip of each coordinate of a weighted update: B * W."""
        return self.bound * self.max_weight

    def threshold(self, n_clients: int) -> int:
        """t for a round of n clients: ceil(f * n), always > n / 2."""
        return max(n_clients // 2 + 1, min(n_clients, math.ceil(self.threshold_fraction * n_clients - 1e-9)))

    def max_level(self) -> int:
        return int(round(self.bound * 2.0**self.scale_bits))

    def ring_bits(self, n_clients: int) -> int:
        """The smallest masking ring in which the sum of n quantized vectors cannot wrap."""
        for bits, limit in RING_LIMITS.items():
            if n_clients * self.max_level() <= limit:
                return bits
        raise UserError(
            f"privacy.secure_scale_bits = {self.scale_bits}: {n_clients} clients * round(secure_bound * "
            f"2**secure_scale_bits) overflows the 64-bit masking ring; lower secure_scale_bits or secure_bound"
        )

    def secagg_config(self, n_clients: int):
        from shared.secagg import SecAggConfig

        return SecAggConfig(
            n_clients=n_clients,
            threshold=self.threshold(n_clients),
            bound=float(self.bound),
            scale_bits=int(self.scale_bits),
            ring_bits=self.ring_bits(n_clients),
        )

    def describe(self) -> dict[str, Any]:
        """The statement's `secure_aggregation` entry (see `secure_aggregation_statement`)."""
        if self.distributed_dp:
            return {
                "mode": "simulated",
                "protocol": "distributed DP: TFF DistributedDpSumFactory (distributed discrete Gaussian) "
                "over SecureSumFactory; TFF's open runtime runs the secure sum as a plain sum",
                "server_sees": "only the sum of the clients' clipped, rotated, rounded and locally noised "
                "integer vectors, and the client count",
                "bits": DDP_BITS,
            }
        weighting = (
            f"weighted: w = examples per round, max_weight W = {self.max_weight:g}"
            if self.weighted
            else "unweighted: w = W = 1"
        )
        common = {
            "mode": self.mode,
            "bound": self.bound,
            "clipping": f"each coordinate of w * update clipped to +-{self.value_bound:g} "
            f"(secure_bound {self.bound:g} * W); {weighting}",
            "server_sees": "only the sum of the clipped weighted updates and the sum of the weights",
            "clients_per_round": self.participants,
        }
        if self.mode == "simulated":
            common["protocol"] = (
                "TFF SecureSumFactory (federated_secure_sum_bitwidth); TFF's open runtime runs it as a "
                "plain sum: nothing is cryptographically protected"
            )
            common["quantization"] = (
                f"32-bit uniform over +-{self.value_bound:g}: at most {self.value_bound / (2**32 - 1):.3g} "
                "per client and coordinate of the weighted sum (plus float32 rounding)"
            )
            return common
        n = self.participants
        common["protocol"] = (
            "pairwise-masked secure aggregation (Bonawitz et al., CCS 2017; shared/secagg.py: X25519, "
            "ChaCha20, Shamir over GF(2^128)); honest-but-curious server and clients"
        )
        common["scale_bits"] = self.scale_bits
        common["ring_bits"] = self.ring_bits(n)
        common["threshold"] = (
            f"{self.threshold(n)} of {n} clients (secure_threshold {self.threshold_fraction:g}); more than "
            f"{n - self.threshold(n)} dropouts fail the round and no model update is applied"
        )
        common["quantization"] = (
            f"fixed point 2^-{self.scale_bits}: at most {self.max_weight * 2.0 ** -(self.scale_bits + 1):.3g} "
            "per client and coordinate of the weighted sum"
        )
        return common


def examples_per_round(train, rows: int) -> int:
    """A client's FedAvg weight: the examples it processes in a round (`program.client_dataset`)."""
    if train.local_steps > 0:
        return int(train.local_steps) * int(train.batch_size)
    return int(train.local_epochs) * int(rows)


def secure_aggregation(section: PrivacySection, train, client_rows) -> SecureAggregation | None:
    """Checks `privacy.secure_aggregation` against the job and resolves it; None for "none".

    `client_rows`: the clients' training rows (a mapping by name, or a sequence). Raises
    UserError for combinations that cannot run, before anything is written.
    """
    mode = section.secure_aggregation
    if mode == "none":
        return None
    if mode not in SECURE_MODES:
        raise UserError(f"privacy.secure_aggregation = {mode!r} is not allowed; choose one of 'none', 'simulated', 'masked'")
    rows = [int(n) for n in (client_rows.values() if isinstance(client_rows, Mapping) else client_rows)]
    m = ClientSampling(len(rows), train.clients_per_round).participants if rows else 0
    if m < 2:
        raise UserError(
            f"privacy.secure_aggregation = {mode!r} needs at least 2 clients per round, the job has {m}; "
            "use more clients or privacy.secure_aggregation = 'none'"
        )
    if section.level == "client" and mode == "masked":
        raise UserError(
            "privacy.secure_aggregation = 'masked' cannot carry client-level DP (its noise is added after "
            "the sum); use privacy.secure_aggregation = 'simulated' (distributed DP: clients add the noise)"
        )
    if section.level == "client":
        if section.clipping != "fixed":
            raise UserError(
                "privacy.clipping = 'adaptive' is not supported with privacy.secure_aggregation = 'simulated' "
                "(distributed DP): use privacy.clipping = 'fixed'"
            )
        return SecureAggregation(
            mode, float(section.secure_bound), int(section.secure_scale_bits),
            float(section.secure_threshold), 1.0, False, m, distributed_dp=True,
        )
    weighted = section.level == "none" and train.algorithm in WEIGHTED_ALGORITHMS
    max_weight = float(max(examples_per_round(train, n) for n in rows)) if weighted else 1.0
    spec = SecureAggregation(
        mode, float(section.secure_bound), int(section.secure_scale_bits),
        float(section.secure_threshold), max_weight, weighted, m,
    )
    if mode == "masked":
        if spec.bound * 2.0**spec.scale_bits < 1:
            raise UserError(
                f"privacy.secure_scale_bits = {spec.scale_bits}: secure_bound * 2**secure_scale_bits rounds to 0, "
                "so every update would quantize to 0; raise secure_scale_bits"
            )
        spec.ring_bits(m)  # overflow -> UserError
    return spec


def secure_aggregation_statement(
    section: PrivacySection | None, spec: SecureAggregation | None = None
) -> dict[str, Any]:
    """The statement's `secure_aggregation` entry: the mode, what the server sees, the bounds."""
    if spec is not None:
        return spec.describe()
    mode = section.secure_aggregation if section is not None else "none"
    if mode == "none":
        return {
            "mode": "none",
            "server_sees": "each client's model update (TFF's plain aggregation; no secure sum)",
        }
    return {
        "mode": mode,
        "bound": section.secure_bound,
        "scale_bits": section.secure_scale_bits,
        "threshold_fraction": section.secure_threshold,
    }


def secure_sum_summary(section: PrivacySection, simulated_intrinsics_used: bool) -> str:
    """summary.json's `secure_sum`: the model updates' secure aggregation as run."""
    mode = section.secure_aggregation
    if mode == "masked":
        return "masked (Bonawitz et al. pairwise masking, shared/secagg.py)"
    if mode == "simulated" and section.level == "client":
        return "simulated (TFF DistributedDpSumFactory over SecureSumFactory: distributed DP)"
    if mode == "simulated":
        return "simulated (TFF SecureSumFactory)"
    # No secure aggregation of the updates; federated preprocessing may still have used
    # TFF's (simulated) secure sum intrinsics.
    return "simulated" if simulated_intrinsics_used else "not used"


# -- events ---------------------------------------------------------------------------------


def adaptive_noise_split(noise_multiplier: float, clients_per_round: float) -> tuple[float, float]:
    """(value noise multiplier z_v, clipped-count stddev s) for a TOTAL noise multiplier z.

    Same formula as TFF's `adaptive_clip_noise_params` (which `gaussian_adaptive` applies
    to the s we pass), with s = max(0.05*m, z/1.2): feasible for small cohorts (TFF's
    default 0.05*m needs z < 0.1*m) and z_v <= 1.25*z.
    """
    z = float(noise_multiplier)
    if z == 0:
        return 0.0, 0.0
    floor = z / (2.0 * math.sqrt(1.0 - MAX_VALUE_NOISE_INFLATION**-2))
    stddev = max(0.05 * float(clients_per_round), floor)
    value = (z**-2 - (2.0 * stddev) ** -2) ** -0.5
    return float(value), float(stddev)


def client_mechanism_event(clipping: str, noise_multiplier: float, clients_per_round: int) -> dpe.DpEvent:
    """One round's event exactly as TFF's DP query reports it (noise relative to the clip)."""
    z = float(noise_multiplier)
    if clipping == "fixed":
        return dpe.GaussianDpEvent(z)
    if clipping == "adaptive":
        value, count_stddev = adaptive_noise_split(z, clients_per_round)
        # The count query sums +-0.5 per client: TFP reports GaussianDpEvent(stddev / 0.5).
        return dpe.ComposedDpEvent([dpe.GaussianDpEvent(value), dpe.GaussianDpEvent(2.0 * count_stddev)])
    raise ValueError(f"unknown clipping {clipping!r}")


def client_round_event(mechanism_event: dpe.DpEvent, sampling: ClientSampling) -> dpe.DpEvent:
    """A round of client-level DP under replace-one-client: noise halved (sensitivity 2C),
    wrapped in the fixed-size sampling the program performs."""
    replace_one = _scale_gaussians(normalize_event(mechanism_event), 0.5)
    if not sampling.samples:
        return replace_one
    return dpe.SampledWithoutReplacementDpEvent(sampling.n_clients, sampling.participants, replace_one)


def record_step_event(noise_multiplier: float, q: float) -> dpe.DpEvent:
    """One DP-SGD step at a client: Poisson sampling q, Gaussian sum with multiplier z."""
    return dpe.PoissonSampledDpEvent(float(q), dpe.GaussianDpEvent(float(noise_multiplier)))


def round_spend(
    noise_multiplier: float,
    sampling: Sampling,
    clipping: str = "fixed",
    participants: Sequence[str] | None = None,
) -> Spend:
    """One round's spend. Record level: the clients that took part (`participants`, default all)."""
    if isinstance(sampling, ClientSampling):
        mechanism = client_mechanism_event(clipping, noise_multiplier, sampling.participants)
        return client_round_event(mechanism, sampling)
    names = list(sampling.client_rows) if participants is None else list(participants)
    return {
        name: dpe.SelfComposedDpEvent(
            record_step_event(noise_multiplier, sampling.q(name)), sampling.steps_per_round[name]
        )
        for name in names
    }


def dp_event(
    noise_multiplier: float,
    sampling: Sampling,
    rounds: int,
    clipping: str = "fixed",
    participation: Mapping[str, int] | None = None,
) -> Spend:
    """The mechanism as run, composed over `rounds`.

    Client level: one event. Record level: {client: event}, client k composed over
    `participation[k]` rounds (default: every round).
    """
    if isinstance(sampling, ClientSampling):
        return dpe.SelfComposedDpEvent(round_spend(noise_multiplier, sampling, clipping), int(rounds))
    counts = participation if participation is not None else {name: rounds for name in sampling.client_rows}
    per_step = {name: record_step_event(noise_multiplier, sampling.q(name)) for name in counts}
    return {
        name: dpe.SelfComposedDpEvent(per_step[name], sampling.steps_per_round[name] * int(counts[name]))
        for name in counts
    }


def mechanism_event_from_state(learning_state) -> dpe.DpEvent:
    """The per-round event TFF's DP aggregator reports in a learning process's state (after
    `next`), as plain-float dp_accounting objects. Wrap it with `client_round_event`."""
    from tensorflow_federated.python.aggregators import differential_privacy

    aggregator_state = getattr(learning_state, "aggregator", learning_state)
    return normalize_event(differential_privacy.extract_dp_event_from_state(aggregator_state))


def normalize_event(event: dpe.DpEvent) -> dpe.DpEvent:
    """Numbers as Python floats/ints.

    Events coming out of TFF carry numpy float32 values; dp-accounting's RDP code tests
    `isinstance(sigma, float)`, which float32 fails, and then silently uses only the first
    Gaussian of a composed event inside a sampling event.
    """
    if isinstance(event, dpe.GaussianDpEvent):
        return dpe.GaussianDpEvent(float(event.noise_multiplier))
    if isinstance(event, dpe.LaplaceDpEvent):
        return dpe.LaplaceDpEvent(float(event.noise_multiplier))
    if isinstance(event, dpe.ComposedDpEvent):
        return dpe.ComposedDpEvent([normalize_event(e) for e in event.events])
    if isinstance(event, dpe.SelfComposedDpEvent):
        return dpe.SelfComposedDpEvent(normalize_event(event.event), int(event.count))
    if isinstance(event, dpe.PoissonSampledDpEvent):
        return dpe.PoissonSampledDpEvent(float(event.sampling_probability), normalize_event(event.event))
    if isinstance(event, dpe.SampledWithoutReplacementDpEvent):
        return dpe.SampledWithoutReplacementDpEvent(
            int(event.source_dataset_size), int(event.sample_size), normalize_event(event.event)
        )
    return event


def _scale_gaussians(event: dpe.DpEvent, factor: float) -> dpe.DpEvent:
    if isinstance(event, dpe.GaussianDpEvent):
        return dpe.GaussianDpEvent(float(event.noise_multiplier) * factor)
    if isinstance(event, dpe.ComposedDpEvent):
        return dpe.ComposedDpEvent([_scale_gaussians(e, factor) for e in event.events])
    if isinstance(event, dpe.SelfComposedDpEvent):
        return dpe.SelfComposedDpEvent(_scale_gaussians(event.event, factor), event.count)
    raise ValueError(f"cannot restate {type(event).__name__} for replace-one accounting")


# -- accounting -------------------------------------------------------------------------------


class Composition:
    """Spends composed one after another; ε at any δ. Record-level spends compose per client
    (and with every client-level spend); the ε reported is the max over clients.

    RDP adds the accountant's RDP curves (`rdp_curve`). PLD composes privacy loss
    distributions built exactly as `PLDAccountant._maybe_compose` builds them (same
    constructors, same discretization), but caches each mechanism's PLD so that ε after
    every round does not rebuild them; tests check it equals `PLDAccountant`.
    """

    def __init__(self, accountant: str = "rdp"):
        if accountant not in ACCOUNTANTS:
            raise UserError(f"privacy.accountant = {accountant!r} is not allowed; choose one of 'rdp', 'pld'")
        self.accountant = accountant
        self._shared: list[tuple[dpe.DpEvent, int]] = []
        self._clients: dict[str, Any] = {}  # name -> RDP curve or PLD state
        self._shared_state = self._zero()

    def _zero(self):
        return np.zeros_like(RDP_ORDERS) if self.accountant == "rdp" else _PldState()

    def _plus(self, state, event: dpe.DpEvent, count: int):
        if self.accountant == "rdp":
            return state + count * rdp_curve(event)
        return state.compose(event, count)

    def add(self, spend: Spend, count: int = 1) -> "Composition":
        if count <= 0:
            return self
        if isinstance(spend, Mapping):
            for name, event in spend.items():
                if name not in self._clients:
                    self._clients[name] = self._shared_state
                self._clients[name] = self._plus(self._clients[name], normalize_event(event), count)
        else:
            event = normalize_event(spend)
            self._shared.append((event, count))
            self._shared_state = self._plus(self._shared_state, event, count)
            for name in self._clients:
                self._clients[name] = self._plus(self._clients[name], event, count)
        return self

    @property
    def empty(self) -> bool:
        return not self._shared and not self._clients

    def _epsilon_of(self, state, delta: float) -> float:
        if self.accountant == "rdp":
            return _rdp_epsilon(state, delta)
        return state.epsilon(delta)

    def epsilon(self, delta: float) -> float:
        if self.empty:
            return 0.0
        states = list(self._clients.values()) or [self._shared_state]
        return max(self._epsilon_of(state, delta) for state in states)

    def epsilon_by_client(self, delta: float) -> dict[str, float]:
        """Record level: each client's own ε (client-level spends included)."""
        return {name: self._epsilon_of(state, delta) for name, state in self._clients.items()}


class _PldState:
    """An immutable PLD composition, mirroring dp-accounting 0.4.3's PLDAccountant."""

    def __init__(self, pld=None, non_private: bool = False):
        self.pld = pld
        self.non_private = non_private

    def compose(self, event: dpe.DpEvent, count: int) -> "_PldState":
        if _contains(event, dpe.SampledWithoutReplacementDpEvent):
            raise UserError(
                "privacy.accountant = 'pld': dp-accounting 0.4.3's PLD accountant cannot account "
                "fixed-size client sampling (train.clients_per_round < number of clients); "
                "use privacy.accountant = 'rdp' or train.clients_per_round = 0"
            )
        state = self
        for part, part_count in _flatten(event, count):
            if part is None:
                state = _PldState(state.pld, True)
            else:
                piece = _pld_of(part, part_count)
                state = _PldState(piece if state.pld is None else state.pld.compose(piece), state.non_private)
        return state

    def epsilon(self, delta: float) -> float:
        if self.non_private:
            return math.inf
        if self.pld is None:
            return 0.0
        return float(self.pld.get_epsilon_for_delta(delta))


def _flatten(event: dpe.DpEvent, count: int):
    """(mechanism, count) pairs in the order PLDAccountant composes them; (None, count) for a
    non-private part (ε = inf)."""
    if isinstance(event, dpe.NoOpDpEvent):
        return
    if isinstance(event, dpe.SelfComposedDpEvent):
        yield from _flatten(event.event, count * event.count)
    elif isinstance(event, dpe.ComposedDpEvent):
        for e in event.events:
            yield from _flatten(e, count)
    elif isinstance(event, dpe.NonPrivateDpEvent):
        yield None, count
    elif isinstance(event, dpe.GaussianDpEvent):
        yield (None if event.noise_multiplier == 0 else event), count
    elif isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(event.event, dpe.GaussianDpEvent):
        if event.sampling_probability > 0:
            yield (None if event.event.noise_multiplier == 0 else event), count
    else:
        raise ValueError(f"the PLD accountant cannot account {event}")


_PLD_CACHE: dict[tuple, Any] = {}
PLD_DISCRETIZATION = 1e-4  # PLDAccountant's default value_discretization_interval


def _pld_of(event: dpe.DpEvent, count: int):
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if isinstance(event, dpe.GaussianDpEvent):
        # PLDAccountant: `count` Gaussians compose exactly into one with std z / sqrt(count).
        key = ("gaussian", event.noise_multiplier, count)
        if key not in _PLD_CACHE:
            if len(_PLD_CACHE) >= 256:
                _PLD_CACHE.clear()
            _PLD_CACHE[key] = pld_lib.from_gaussian_mechanism(
                standard_deviation=event.noise_multiplier / math.sqrt(count),
                value_discretization_interval=PLD_DISCRETIZATION,
            )
        return _PLD_CACHE[key]
    key = ("poisson_gaussian", event.event.noise_multiplier, event.sampling_probability)
    if key not in _PLD_CACHE:
        if len(_PLD_CACHE) >= 256:
            _PLD_CACHE.clear()
        _PLD_CACHE[key] = pld_lib.from_gaussian_mechanism(
            standard_deviation=event.event.noise_multiplier,
            value_discretization_interval=PLD_DISCRETIZATION,
            sampling_prob=event.sampling_probability,
        )
    return _PLD_CACHE[key].self_compose(count)


def epsilon(spend: Spend, delta: float, accountant: str = "rdp") -> float:
    """ε at δ of one spend (a record-level spend: the max over clients)."""
    return Composition(accountant).add(spend).epsilon(delta)


def composed_epsilon(spends: Sequence[Spend], delta: float, accountant: str = "rdp") -> float:
    """ε at δ of the composition of several spends (e.g. every run on one data source)."""
    composition = Composition(accountant)
    for spend in spends:
        composition.add(spend)
    return composition.epsilon(delta)


def rdp_curve(event: dpe.DpEvent) -> np.ndarray:
    """RDP of `event` at `RDP_ORDERS`; each sampling event under the neighbouring relation
    dp-accounting accounts it with (see the module docstring)."""
    event = normalize_event(event)
    if isinstance(event, dpe.ComposedDpEvent):
        return sum((rdp_curve(e) for e in event.events), np.zeros_like(RDP_ORDERS))
    if isinstance(event, dpe.SelfComposedDpEvent):
        return event.count * rdp_curve(event.event)
    if _has_zero_noise(event):
        return np.full_like(RDP_ORDERS, np.inf)
    key = repr(event)
    curve = _RDP_CACHE.get(key)
    if curve is None:
        curve = _rdp_of_leaf(event)
        curve.setflags(write=False)
        if len(_RDP_CACHE) >= 4096:
            _RDP_CACHE.clear()
        _RDP_CACHE[key] = curve
    return curve


_RDP_CACHE: dict[str, np.ndarray] = {}


def _rdp_of_leaf(event: dpe.DpEvent) -> np.ndarray:
    relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if isinstance(event, dpe.SampledWithoutReplacementDpEvent)
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), relation)
    if not acc.supports(event):
        raise ValueError(f"the RDP accountant cannot account {event}")
    acc.compose(event)
    return acc.rdp


def _has_zero_noise(event: dpe.DpEvent) -> bool:
    if isinstance(event, (dpe.GaussianDpEvent, dpe.LaplaceDpEvent)):
        return float(event.noise_multiplier) == 0.0
    if isinstance(event, dpe.NonPrivateDpEvent):
        return True
    inner = [getattr(event, "event", None), *getattr(event, "events", [])]
    return any(_has_zero_noise(e) for e in inner if e is not None)


def _rdp_epsilon(curve: np.ndarray, delta: float) -> float:
    if not np.all(np.isfinite(curve)):
        return math.inf
    return float(rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, curve, delta)[0])


def _contains(event: dpe.DpEvent, kind: type) -> bool:
    if isinstance(event, kind):
        return True
    inner = [getattr(event, "event", None), *getattr(event, "events", [])]
    return any(_contains(e, kind) for e in inner if e is not None)


def check_accountant(accountant: str, sampling: Sampling) -> None:
    """Refuses an accountant that cannot account this sampling (before any training)."""
    if accountant == "pld" and isinstance(sampling, ClientSampling) and sampling.samples:
        raise UserError(
            f"privacy.accountant = 'pld' cannot account fixed-size client sampling "
            f"(train.clients_per_round = {sampling.participants} of {sampling.n_clients} clients) "
            "in dp-accounting 0.4.3; use privacy.accountant = 'rdp' or train.clients_per_round = 0"
        )


# -- calibration and budget -----------------------------------------------------------------


def epsilon_after_round(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
) -> list[float]:
    """ε after each of rounds 1..`rounds` (every client taking part each round)."""
    check_accountant(accountant, sampling)
    composition = Composition(accountant)
    spend = round_spend(noise_multiplier, sampling, clipping)
    result = []
    for _ in range(int(rounds)):
        result.append(composition.add(spend).epsilon(delta))
    return result


def epsilon_for_rounds(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
) -> float:
    check_accountant(accountant, sampling)
    return (
        Composition(accountant)
        .add(round_spend(noise_multiplier, sampling, clipping), int(rounds))
        .epsilon(delta)
    )


def rounds_within_budget(
    target_epsilon: float,
    noise_multiplier: float,
    delta: float,
    max_rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
) -> int:
    """The most rounds (<= max_rounds) whose ε stays <= target: training stops before the
    round that would exceed it. ε grows with rounds, so this is a bisection."""

    def fits(r: int) -> bool:
        return (
            epsilon_for_rounds(noise_multiplier, delta, r, sampling, accountant, clipping) <= target_epsilon
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
) -> float:
    """The smallest z (to 0.1 % relative) whose ε after `rounds` rounds is <= target.

    ε falls as z grows: bracket by factors of 4 from z = 1, then Brent's method on log z
    (to 0.01 %), stepping up until ε fits. A target that needs z > 1e4 is refused.
    """
    check_accountant(accountant, sampling)
    if target_epsilon <= 0:
        raise UserError(f"privacy.target_epsilon = {target_epsilon!r} must be > 0 to calibrate the noise")

    def eps(z: float) -> float:
        return epsilon_for_rounds(z, delta, rounds, sampling, accountant, clipping)

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


# -- the job's plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved mechanism of one job: noise, sampling and the rounds that fit the target."""

    section: PrivacySection
    sampling: Sampling
    noise_multiplier: float  # TFF's (total) noise_multiplier / DP-SGD's z
    rounds: int  # rounds to run (train.rounds, or fewer if the target ε stops training earlier)
    calibrated: bool

    @property
    def level(self) -> str:
        return self.section.level

    def spend(self, rounds: int | None = None, participation: Mapping[str, int] | None = None) -> Spend:
        return dp_event(
            self.noise_multiplier,
            self.sampling,
            self.rounds if rounds is None else rounds,
            self.section.clipping,
            participation,
        )

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
    rounds = int(train.rounds)
    if section.noise_multiplier > 0:
        z = float(section.noise_multiplier)
        if section.target_epsilon > 0:
            rounds = rounds_within_budget(
                section.target_epsilon,
                z,
                section.delta,
                rounds,
                sampling,
                section.accountant,
                section.clipping,
            )
            if rounds == 0:
                first = epsilon_for_rounds(
                    z, section.delta, 1, sampling, section.accountant, section.clipping
                )
                raise UserError(
                    f"privacy.target_epsilon = {section.target_epsilon:g}: a single round with "
                    f"privacy.noise_multiplier = {z:g} already spends ε = {first:.3g}; raise "
                    "the target or the noise multiplier (or set it to 0 to calibrate)"
                )
        return PrivacyPlan(section, sampling, z, rounds, calibrated=False)
    z = calibrate_noise_multiplier(
        section.target_epsilon, section.delta, rounds, sampling, section.accountant, section.clipping
    )
    return PrivacyPlan(section, sampling, z, rounds, calibrated=True)


# -- TFF aggregator ---------------------------------------------------------------------------


def client_dp_aggregator(
    section: PrivacySection, clients_per_round: int, noise_multiplier: float | None = None
):
    """The client-level DP aggregator for `processes.build_learning_process`.

    TFF's DP factories are UNWEIGHTED (noised sum / fixed `clients_per_round`); they are
    wrapped with `tff.aggregators.as_weighted_aggregator`, which ignores the client weights,
    as `processes.job_aggregator` does for unweighted FedAvg. Client-level DP therefore
    implies uniform client weighting. `clients_per_round` must be the m the program samples
    (`ClientSampling.participants`); `noise_multiplier` defaults to the section's.
    """
    import tensorflow_federated as tff

    z = float(section.noise_multiplier if noise_multiplier is None else noise_multiplier)
    m = float(clients_per_round)
    dp = tff.aggregators.DifferentiallyPrivateFactory
    if section.clipping == "fixed":
        factory = dp.gaussian_fixed(noise_multiplier=z, clients_per_round=m, clip=float(section.clip_norm))
    else:
        _, count_stddev = adaptive_noise_split(z, m)
        factory = dp.gaussian_adaptive(
            noise_multiplier=z,
            clients_per_round=m,
            initial_l2_norm_clip=float(section.clip_norm),
            target_unclipped_quantile=float(section.target_quantile),
            clipped_count_stddev=count_stddev,
        )
    return tff.aggregators.as_weighted_aggregator(factory)


# -- statement and serialization ------------------------------------------------------------


def privacy_statement(
    plan_: PrivacyPlan | None,
    rounds_run: int | None = None,
    participation: Mapping[str, int] | None = None,
    lifetime_spent: float | None = None,
    secure: SecureAggregation | None = None,
    section: PrivacySection | None = None,
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
            "the sampling is secret: the job seed and the per-round client list are not released",
            "training metrics (loss, accuracy, counts) are not covered by ε",
        ],
    }
    statement["secure_aggregation"] = secure_aggregation_statement(s, secure)
    if s.level == "client" and s.secure_aggregation == "simulated":
        statement["mechanism"] = (
            "distributed DP-FedAvg: clipped client updates, rotated, rounded to integers and noised with "
            "discrete Gaussians by the clients; only their secure sum is seen (TFF DistributedDpSumFactory)"
        )
        statement["noise_accounting"] = (
            "the sum of the clients' discrete Gaussian noises is accounted as one Gaussian of the same "
            "standard deviation (Gaussian approximation, Kairouz et al. 2021); the noise multiplier is "
            "that standard deviation over the L2 sensitivity after randomized rounding (C + gamma*sqrt(d))"
        )
    elif s.level == "client":
        statement["mechanism"] = (
            "DP-FedAvg: clipped client updates, Gaussian noise on their sum (TFF DifferentiallyPrivateFactory)"
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


_EVENT_TYPES = {
    cls.__name__: cls
    for cls in (
        dpe.NoOpDpEvent,
        dpe.NonPrivateDpEvent,
        dpe.GaussianDpEvent,
        dpe.LaplaceDpEvent,
        dpe.SelfComposedDpEvent,
        dpe.ComposedDpEvent,
        dpe.PoissonSampledDpEvent,
        dpe.SampledWithoutReplacementDpEvent,
    )
}


def event_to_json(event: dpe.DpEvent) -> dict[str, Any]:
    """A dp_accounting event as JSON-ready data ({"type": class name, fields...})."""
    event = normalize_event(event)
    name = type(event).__name__
    if name not in _EVENT_TYPES:
        raise ValueError(f"cannot serialize {name}")
    data: dict[str, Any] = {"type": name}
    for key in getattr(type(event), "__attrs_attrs__", ()):
        value = getattr(event, key.name)
        if isinstance(value, dpe.DpEvent):
            value = event_to_json(value)
        elif isinstance(value, list):
            value = [event_to_json(v) for v in value]
        data[key.name] = value
    return data


def event_from_json(data: Mapping[str, Any]) -> dpe.DpEvent:
    """Inverse of `event_to_json`; only the event types this suite produces are accepted."""
    cls = _EVENT_TYPES.get(data.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown dp event type {data.get('type')!r}")
    kwargs = {}
    for key, value in data.items():
        if key == "type":
            continue
        if isinstance(value, Mapping):
            value = event_from_json(value)
        elif isinstance(value, list):
            value = [event_from_json(v) for v in value]
        kwargs[key] = value
    return cls(**kwargs)


def spend_to_json(spend: Spend) -> dict[str, Any]:
    if isinstance(spend, Mapping):
        return {"per_client": {name: event_to_json(e) for name, e in spend.items()}}
    return {"event": event_to_json(spend)}


def spend_from_json(data: Mapping[str, Any]) -> Spend:
    if "per_client" in data:
        return {name: event_from_json(e) for name, e in data["per_client"].items()}
    return event_from_json(data["event"])
