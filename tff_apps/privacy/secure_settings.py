"""Secure aggregation settings (`privacy.secure_aggregation`): bounds, rings and what the
server sees, resolved for a job's clients, and their lines in the privacy statement.

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
           (`context.Runtime`): nothing is cryptographically protected; the mode shows what
           a deployment with a real secure-sum backend would compute, quantization included.
           With `level = "client"` this is distributed DP instead (`dp_aggregators.ddp_aggregator`).
masked     A real protocol: pairwise-masked secure aggregation after Bonawitz et al.
           (CCS 2017), `shared/secagg.py`, run between the client phase and the server
           phase of each round (`tff_apps/learning/secure_rounds.py`); in a simulation every
           party is in this process, across sites each site's gateway masks its own update
           (`tff_apps/sites/masked_rounds.py`). With `level = "client"` this is distributed
           DP whose secure sum is the masked protocol (`tff_apps/learning/ddp_rounds.py`).

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
(`dp_aggregators.ddp_parameters`) to the plan's calibrated z, rounded UP to the next integer
noise scale (2e-5 relative for the healthcare model; the statement reports both), so the
client-level accounting (Gaussian(z/2) under replace-one, `accounting`) applies unchanged and is
conservative. Adaptive clipping with distributed DP is refused.

Masked distributed DP (`level = "client"` with `secure_aggregation = "masked"`): the same TFF
aggregator, split at its secure sums (`ddp_rounds`): each client (across sites: each site, on
its own worker) runs the client half, its discrete Gaussian share included, and the masked
protocol sums the integer vectors in the ring Z_{2^20} (`DDP_BITS`, the field TFF's factory
clips into; `SecAggConfig(modular=True)`), so the server learns only the noised sum mod 2^20,
exactly what TFF's server half decodes. Same mechanism, same accounting as "simulated". A
round needs every sampled client's noise share: a client missing before its masked input fails
the round (with one share fewer the noise would be below the accounted one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import UserError
from tff_apps.privacy.dp_config import SECURE_MODES, ClientSampling, PrivacySection, examples_per_round

WEIGHTED_ALGORITHMS = ("fedavg", "fedprox")  # as tff_apps.learning.optimizers.WEIGHTED_ALGORITHMS
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
    distributed_dp: bool = False  # client-level DP: DistributedDpSumFactory (masked: split, `ddp_rounds`)

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
        """The smallest masking ring in which the sum of n quantized vectors cannot wrap
        (distributed DP: TFF's field of DDP_BITS bits, in which the sum wraps by design)."""
        if self.distributed_dp:
            return DDP_BITS
        for bits, limit in RING_LIMITS.items():
            if n_clients * self.max_level() <= limit:
                return bits
        raise UserError(
            f"privacy.secure_scale_bits = {self.scale_bits}: {n_clients} clients * round(secure_bound * "
            f"2**secure_scale_bits) overflows the 64-bit masking ring; lower secure_scale_bits or secure_bound"
        )

    def secagg_config(self, n_clients: int):
        from shared.secagg_ring import SecAggConfig

        if self.distributed_dp:  # integer residues mod 2^DDP_BITS (`ddp_rounds`)
            return SecAggConfig(n_clients, self.threshold(n_clients), float(2 ** (DDP_BITS - 1)), 0, DDP_BITS, modular=True)
        return SecAggConfig(
            n_clients=n_clients,
            threshold=self.threshold(n_clients),
            bound=float(self.bound),
            scale_bits=int(self.scale_bits),
            ring_bits=self.ring_bits(n_clients),
        )

    def describe(self) -> dict[str, Any]:
        """The statement's `secure_aggregation` entry (see `secure_aggregation_statement`)."""
        if self.distributed_dp and self.mode == "masked":
            n = self.participants
            return {
                "mode": "masked",
                "protocol": "distributed DP: TFF DistributedDpSumFactory (distributed discrete Gaussian) split at "
                "its secure sums by TFF's MapReduceForm; the integer vectors summed by pairwise-masked secure "
                "aggregation (Bonawitz et al., CCS 2017; shared/secagg.py) in the ring Z_{2^%d}" % DDP_BITS,
                "noise_added_by": "each client, to its own clipped, rotated and rounded update, before masking "
                "(across sites: at each site, on its own worker)",
                "server_sees": "each client's masked vector (uniform in the ring) and only the sum mod 2^%d of the "
                "clients' noised integer vectors, and the client count" % DDP_BITS,
                "trust": "honest-but-curious server: it never sees an update or a noise share alone; a round "
                "needs every sampled client's noise share, so one missing before its masked input fails the round",
                "bits": DDP_BITS,
                "ring_bits": DDP_BITS,
                "threshold": f"{self.threshold(n)} of {n} clients (secure_threshold {self.threshold_fraction:g})",
            }
        if self.distributed_dp:
            return {
                "mode": "simulated",
                "protocol": "distributed DP: TFF DistributedDpSumFactory (distributed discrete Gaussian) "
                "over SecureSumFactory; TFF's open runtime runs the secure sum as a plain sum",
                "noise_added_by": "each client, to its own clipped, rotated and rounded update, in this process",
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
    if section.level == "client":  # distributed DP: the clients add the noise
        if section.clipping != "fixed":
            raise UserError(
                f"privacy.clipping = 'adaptive' is not supported with privacy.secure_aggregation = {mode!r} "
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
    if mode == "masked" and section.level == "client":
        return "masked (distributed DP: TFF DistributedDpSumFactory split at its secure sums, pairwise masking)"
    if mode == "masked":
        return "masked (Bonawitz et al. pairwise masking, shared/secagg.py)"
    if mode == "simulated" and section.level == "client":
        return "simulated (TFF DistributedDpSumFactory over SecureSumFactory: distributed DP)"
    if mode == "simulated":
        return "simulated (TFF SecureSumFactory)"
    # No secure aggregation of the updates; federated preprocessing may still have used
    # TFF's (simulated) secure sum intrinsics.
    return "simulated" if simulated_intrinsics_used else "not used"
