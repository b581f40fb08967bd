"""TFF aggregators that add DP noise: client-level DP (TFF's DifferentiallyPrivateFactory,
fixed or adaptive clipping) and distributed DP under the secure sum (distributed discrete
Gaussian), built so that the mechanism that runs is the one the accountant models.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow_federated as tff

from shared.errors import UserError
from tff_apps.privacy import secure_settings
from tff_apps.privacy.dp_config import PrivacySection
from tff_apps.privacy.dp_events import adaptive_noise_split


def client_dp_aggregator(
    section: PrivacySection, clients_per_round: int, noise_multiplier: float | None = None
):
    """The client-level DP aggregator for `factory.build_learning_process`.

    TFF's DP factories are UNWEIGHTED (noised sum / fixed `clients_per_round`); they are
    wrapped with `tff.aggregators.as_weighted_aggregator`, which ignores the client weights,
    as `aggregators.job_aggregator` does for unweighted FedAvg. Client-level DP therefore
    implies uniform client weighting. `clients_per_round` must be the m the program samples
    (`ClientSampling.participants`); `noise_multiplier` defaults to the section's.
    """
    return tff.aggregators.as_weighted_aggregator(client_dp_factory(section, clients_per_round, noise_multiplier))


def client_dp_factory(
    section: PrivacySection, clients_per_round: int, noise_multiplier: float | None = None
) -> tff.aggregators.DifferentiallyPrivateFactory:
    """TFF's unweighted DP factory of `client_dp_aggregator`; its DP query (`._query`) is
    also what the grouped engine runs (`grouped.py`), so both engines share one mechanism."""
    z = float(section.noise_multiplier if noise_multiplier is None else noise_multiplier)
    m = float(clients_per_round)
    dp = tff.aggregators.DifferentiallyPrivateFactory
    if section.clipping == "fixed":
        return dp.gaussian_fixed(noise_multiplier=z, clients_per_round=m, clip=float(section.clip_norm))
    _, count_stddev = adaptive_noise_split(z, m)
    return dp.gaussian_adaptive(
        noise_multiplier=z,
        clients_per_round=m,
        initial_l2_norm_clip=float(section.clip_norm),
        target_unclipped_quantile=float(section.target_quantile),
        clipped_count_stddev=count_stddev,
    )


DDP_MODCLIP_PROB = 1e-4  # TFF's default probability of a modular wrap of the secure sum
DDP_ROTATION = "hd"


def ddp_parameters(
    noise_multiplier: float, l2_clip: float, clients_per_round: int, dim: int, bits: int = secure_settings.DDP_BITS
) -> dict[str, Any]:
    """The noise multiplier to hand TFF's DistributedDpSumFactory (distributed discrete
    Gaussian, fixed clip, beta = 0) so that the mechanism that runs has the EFFECTIVE noise
    multiplier `noise_multiplier` (or at most one integer noise step above it).

    Reproduces TFF 0.87's construction (`distributed_dp._build_aggregation_factory` and
    TFP's DistributedDiscreteGaussianSumQuery) with its own helpers: scale 1/gamma from
    `_heuristic_scale_factor(local stddev, C, bits, m, padded dim, k)`, sensitivity after
    rounding Delta*scale = (inflated_l2_norm_bound(C, gamma, 0, d) + 1e-5) * scale, and each
    client's noise of integer scale ceil(local stddev * scale). The sum of the m clients'
    noise has standard deviation sqrt(m) * ceil(...) (Gaussian approximation of the sum of
    discrete Gaussians, see `privacy`), so z_eff = sqrt(m) * ceil(...) / (Delta*scale).
    TFF's z (the noise relative to C BEFORE rounding) is solved so that z_eff >= z with the
    smallest integer noise scale; the scale depends on TFF's z, hence the fixed point.
    """
    from tensorflow_federated.python.aggregators import discretization, distributed_dp

    z, clip, m = float(noise_multiplier), float(l2_clip), int(clients_per_round)
    padded = 2 ** math.ceil(math.log2(max(1, int(dim))))
    k = distributed_dp._clip_prob_to_num_stddevs(DDP_MODCLIP_PROB)

    def mechanism(z_tff: float) -> dict[str, Any]:
        local = z_tff * clip / math.sqrt(m)
        scale = float(distributed_dp._heuristic_scale_factor(local, clip, bits, m, padded, k).numpy())
        scale = min(scale, distributed_dp.MAX_SCALE_FACTOR)
        inflated = float(
            discretization.inflated_l2_norm_bound(l2_norm_bound=clip, gamma=1.0 / scale, beta=0.0, dim=padded).numpy()
        )
        scaled_l2 = float(np.float32((inflated + 1e-5) * scale))  # the query's float32 state
        scaled_local = float(np.float32(local * scale))
        noise_scale = math.ceil(scaled_local)  # TFP's sampler rounds the scale up to an integer
        return {
            "noise_multiplier_passed_to_tff": z_tff,
            "effective_noise_multiplier": math.sqrt(m) * noise_scale / scaled_l2,
            "scale_factor": scale,
            "l2_clip": clip,
            "l2_sensitivity_after_rounding": scaled_l2 / scale,
            "scaled_inflated_l2": scaled_l2,
            "local_noise_scale_integer": noise_scale,
            "padded_dim": padded,
            "clients_per_round": m,
            "bits": bits,
        }

    if z <= 0:
        raise UserError("privacy.noise_multiplier: distributed DP (privacy.level = 'client' with secure aggregation) needs noise > 0")
    z_tff = z
    for _ in range(100):
        details = mechanism(z_tff)
        wanted = math.ceil(z * details["scaled_inflated_l2"] / math.sqrt(m) - 1e-9)  # smallest integer scale
        if details["local_noise_scale_integer"] == wanted and details["effective_noise_multiplier"] >= z:
            details["planned_noise_multiplier"] = z
            return details
        # aim at the middle of the integer cell: ceil() then gives `wanted`
        z_tff = (wanted - 0.5) / details["scale_factor"] * math.sqrt(m) / clip
    raise RuntimeError(f"distributed DP: no TFF noise multiplier found for effective z = {z}")


def ddp_aggregator(l2_clip: float, clients_per_round: int, noise_multiplier: float, dim: int):
    """(weighted-form factory, details): distributed DP with the effective noise multiplier
    `noise_multiplier` (see `ddp_parameters`). Built like `tff.learning.ddp_secure_aggregator`
    (DistributedDpSumFactory inside an UnweightedMeanFactory whose count is a SecureSumFactory)
    but with the distributed DISCRETE GAUSSIAN mechanism, a fixed L2 clip, beta = 0 and no
    adaptive zeroing, so that the accounted mechanism is the one that runs (`privacy`)."""
    factory, details = ddp_factory(l2_clip, clients_per_round, noise_multiplier, dim)
    return tff.aggregators.as_weighted_aggregator(factory), details


def ddp_factory(l2_clip: float, clients_per_round: int, noise_multiplier: float, dim: int):
    """(unweighted factory, details) of `ddp_aggregator`: the UnweightedMeanFactory whose
    value sum is the DistributedDpSumFactory. Masked distributed DP (`ddp_rounds`) splits the
    process it creates at its secure sums; the simulation runs it whole."""
    from tensorflow_federated.python.aggregators import distributed_dp

    _allow_deep_protos()
    details = ddp_parameters(noise_multiplier, l2_clip, clients_per_round, dim)
    value_sum = distributed_dp.DistributedDpSumFactory(
        noise_multiplier=details["noise_multiplier_passed_to_tff"],
        expected_clients_per_round=int(clients_per_round),
        bits=details["bits"],
        l2_clip=float(l2_clip),
        modclip_prob=DDP_MODCLIP_PROB,
        beta=0.0,
        mechanism="distributed_dgauss",
        rotation_type=DDP_ROTATION,
        auto_l2_clip=False,
    )
    factory = tff.aggregators.UnweightedMeanFactory(
        value_sum_factory=value_sum,
        count_sum_factory=tff.aggregators.SecureSumFactory(1, 0),
    )
    return factory, details


def _allow_deep_protos() -> None:
    """The distributed DP stack nests deeper than protobuf's default limit of 100 levels, so
    TFF's computation proto cannot be built ("DecodeError: Error parsing message" in
    `building_blocks.Block._proto`). Lifts the limit for this process (upb or C++ protobuf:
    `SetAllowOversizeProtos` raises the depth limit; the C++ worker parses it fine)."""
    try:
        from google._upb import _message
    except ImportError:  # pragma: no cover - the C++ implementation
        from google.protobuf.pyext import _message
    _message.SetAllowOversizeProtos(True)


def model_dimension(weights_type) -> int:
    """Number of trainable parameters."""
    total = 0

    def count(t):
        nonlocal total
        if isinstance(t, tff.TensorType):
            total += int(np.prod(t.shape, dtype=np.int64))
        else:
            for member in t:
                count(member)

    count(weights_type.trainable)
    return total
