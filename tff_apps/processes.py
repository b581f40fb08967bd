"""FedAvg-family learning processes, composed from four small parts with typed seams.

As `tff.learning.templates.compose_learning_process` does it: a distributor
(broadcast), a client work (local training: FedAvg or FedProx's proximal term), an
aggregator (weighted or unweighted mean; the privacy stacks plug in here), and a
finalizer (the server optimizer applied to the aggregated update).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import tensorflow_federated as tff

from shared.errors import UserError
from tff_apps import federation as federation_lib
from tff_apps import privacy as privacy_lib
from tff_apps.client_works import build_fedprox_client_work
from tff_apps.config import TrainSection

ModelFn = Callable[[], tff.learning.models.VariableModel]

WEIGHTED_ALGORITHMS = ("fedavg", "fedprox")


def is_weighted(train: TrainSection) -> bool:
    """FedAvg and FedProx weight each client by its number of examples (McMahan et al.)."""
    return train.algorithm in WEIGHTED_ALGORITHMS


def client_optimizer(train: TrainSection) -> tff.learning.optimizers.Optimizer:
    if train.client_optimizer == "adam":  # state restarts every round: each round is a fresh local run
        return tff.learning.optimizers.build_adam(learning_rate=train.client_learning_rate)
    return tff.learning.optimizers.build_sgdm(learning_rate=train.client_learning_rate)


def server_optimizer(train: TrainSection) -> tff.learning.optimizers.Optimizer:
    """Server optimizers of the adaptive federated optimization paper (Reddi et al. 2021)."""
    if train.server_optimizer == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=train.server_learning_rate)
    if train.server_optimizer == "yogi":
        return tff.learning.optimizers.build_yogi(learning_rate=train.server_learning_rate)
    momentum = train.server_momentum or None  # build_sgdm treats 0 momentum as "no momentum slot"
    return tff.learning.optimizers.build_sgdm(
        learning_rate=train.server_learning_rate, momentum=momentum
    )


def client_work(train: TrainSection, model_fn: ModelFn):
    weighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES
        if is_weighted(train)
        else tff.learning.ClientWeighting.UNIFORM
    )
    if train.algorithm == "fedprox":
        # Not TFF's proximal_client_work: its proximal term has the wrong sign (client_works.py).
        return build_fedprox_client_work(
            model_fn, client_optimizer(train), weighting, float(train.proximal_strength)
        )
    return tff.learning.templates.build_model_delta_client_work(
        model_fn, client_optimizer(train), weighting
    )


def secure_aggregation(cfg, clients) -> privacy_lib.SecureAggregation | None:
    """The job's `privacy.secure_aggregation` resolved for the program's clients (None for
    "none"); `private_run.start` already checked it (UserError) before the run folder."""
    return privacy_lib.secure_aggregation(cfg.privacy, cfg.train, {c.name: len(c.x) for c in clients})


def job_aggregator(train: TrainSection, federation=None, weighted: bool | None = None):
    """The job's aggregator when no DP or secure stack replaces it (weighted form, as the
    composer requires; unweighted FedAvg wraps the uniform mean the way TFF's own
    `build_unweighted_fed_avg` does): the algorithm's (un)weighted mean, its value sum compressed when
    [communication] asks (`compression.compressed_sum_factory`), inside TFF's adaptive
    zeroing and L2 clipping when `robustness.aggregation = "clip_zero"`. `weighted`: None =
    the algorithm's weighting; record-level DP passes False (DP-SGD's uniform mean)."""
    from tff_apps import compression

    weighted = is_weighted(train) if weighted is None else weighted
    value_sum = compression.compressed_sum_factory(getattr(federation, "communication", None))
    if weighted:
        factory = tff.aggregators.MeanFactory(value_sum_factory=value_sum)
    else:
        factory = tff.aggregators.UnweightedMeanFactory(value_sum_factory=value_sum)
    if federation is not None and federation.robustness.aggregation == "clip_zero":
        factory = clip_zero(factory)
    return factory if weighted else tff.aggregators.as_weighted_aggregator(factory)


def clip_zero(inner):
    """`tff.learning.robust_aggregator` around `inner` (the mean, maybe compressed; TFF's
    function takes no inner factory, so its two wrappers are applied here, the same way):
    zeroing of updates whose max-norm exceeds an adaptive bound (2 x the 0.98 quantile + 1),
    then L2 clipping at an adaptive bound (the 0.8 quantile of the updates' norms)."""
    from tensorflow_federated.python.learning import model_update_aggregator as tff_updates

    return tff_updates._default_zeroing(tff_updates._default_clipping(inner))


CLIP_ZERO_WRAPPERS = 2  # zeroing and clipping, each with its own adaptive bound


def clip_zero_bytes() -> dict[str, int]:
    """One client's bytes for `clip_zero`'s bookkeeping, per round: each wrapper broadcasts its
    bound (float32) and has every client send the record of TFF's quantile estimator (the
    no-noise query's `preprocess_record` of the client's norm) and its clipped/zeroed flag
    (int32, `robust.COUNT_TF_TYPE`)."""
    import tensorflow as tf
    import tensorflow_privacy as tfp
    from tensorflow_federated.python.aggregators import robust

    query = tfp.NoPrivacyQuantileEstimatorQuery(
        initial_estimate=1.0, target_quantile=0.5, learning_rate=0.2, geometric_update=True
    )
    record = query.preprocess_record(query.derive_sample_params(query.initial_global_state()), tf.constant(1.0))
    record_bytes = sum(np.asarray(t).nbytes for t in tf.nest.flatten(record))
    up = record_bytes + np.dtype(robust.COUNT_TF_TYPE).itemsize
    down = np.dtype(robust.NORM_TF_TYPE).itemsize
    return {"up": CLIP_ZERO_WRAPPERS * int(up), "down": CLIP_ZERO_WRAPPERS * int(down)}


def build_learning_process(
    train: TrainSection, model_fn: ModelFn, aggregator_factory=None, privacy=None, secure=None, federation=None,
    client_names=None,
) -> tff.learning.templates.LearningProcess:
    """The job's learning process; `aggregator_factory` defaults to `job_aggregator(train, federation)`.

    `privacy` (the job's `run.privacy`, a `private_run.RunPrivacy`, or a `privacy.PrivacyPlan`)
    switches in the DP mechanism the plan accounted for: at client level TFF's DP aggregator
    with the plan's noise multiplier (uniform client weighting); at record level DP-SGD
    client work (`dp_sgd`), whose round input is `dp_sgd.poisson_client_dataset`.

    `secure` (a `privacy.SecureAggregation`, see `secure_aggregation(cfg, clients)`; a job
    without DP has no `run.privacy`, so the apps pass it) switches in secure aggregation:
    "simulated" composes TFF's SecureSumFactory into the mean (distributed DP at client
    level, `ddp_aggregator`); "masked" returns a `secure_rounds.MaskedLearningProcess`.

    `federation` (a `federation.Federation`, None = all defaults): compression and robust
    aggregation of the job's [communication] and [robustness] sections. A median, trimmed
    mean or scaled bad updates need the updates in Python: a `split_rounds.RobustLearningProcess`,
    whose bad clients are the first of `client_names` (the federation's clients in order).

    `train.engine = "grouped"`: the same mathematics with a round's clients trained in one
    TFF call (`grouped.GroupedProcess`; `federation.check_engine` refuses what it does not run).
    """
    if getattr(train, "engine", "tff") == "grouped":
        from tff_apps import grouped

        return grouped.build_grouped_process(train, model_fn, aggregator_factory, privacy, secure, federation)
    if federation is not None and federation_lib.needs_split_rounds(federation):
        if privacy is not None or secure is not None:  # federation.check_robustness refuses it first
            raise ValueError("robust aggregation in Python runs without DP and secure aggregation")
        from tff_apps import split_rounds

        return split_rounds.build(train, model_fn, federation, client_names or (), aggregator_factory)
    plan = getattr(privacy, "plan", privacy)
    if secure is None:
        secure = getattr(privacy, "secure", None)
    if secure is not None:
        if aggregator_factory is not None:
            raise ValueError("secure aggregation builds its own aggregator; pass one or the other")
        return _build_secure_process(train, model_fn, privacy, plan, secure)
    if plan is not None and plan.level == "record":
        from tff_apps import dp_sgd

        if aggregator_factory is not None:
            raise ValueError("record-level DP builds its own (uniform mean) aggregator")
        return dp_sgd.build_learning_process(
            train, model_fn, plan.section.clip_norm, plan.noise_multiplier,
            aggregator_factory=job_aggregator(train, federation, weighted=False),
        )
    if plan is not None and plan.level == "client":
        from tff_apps import privacy as privacy_lib

        if aggregator_factory is not None:
            raise ValueError("client-level DP replaces the aggregator; pass one or the other")
        aggregator_factory = privacy_lib.client_dp_aggregator(
            plan.section, plan.sampling.participants, plan.noise_multiplier
        )

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    factory = aggregator_factory or job_aggregator(train, federation)
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work(train, model_fn),
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer(train), weights_type),
    )


# -- secure aggregation -------------------------------------------------------------------------
#
# "simulated" uses SecureSumFactory with FIXED bounds (value sum +-B*W, weight sum [0, W]),
# not `tff.learning.secure_aggregator`: that one moves its bound every round (a quantile
# estimate of the clients' max values, times 2) and adds adaptive zeroing and L2 clipping.
# Fixed bounds make "simulated" and "masked" clip identically (the masked protocol's ring and
# fixed point must be fixed before the round), so the two modes give the same model up to
# quantization; the bound is a documented config value instead of a hidden estimate.


def secure_mean_factory(secure: privacy_lib.SecureAggregation):
    """The (un)weighted mean whose value and weight (or count) sums go through TFF's
    SecureSumFactory, so the server is handed only sums (weighted form, as the composer
    requires)."""
    if secure.weighted:
        # MeanFactory passes value * weight to the value sum: clip w*u to +-B*W.
        return tff.aggregators.MeanFactory(
            value_sum_factory=tff.aggregators.SecureSumFactory(
                float(secure.value_bound), float(-secure.value_bound)
            ),
            weight_sum_factory=tff.aggregators.SecureSumFactory(float(secure.max_weight), 0.0),
        )
    return tff.aggregators.as_weighted_aggregator(
        tff.aggregators.UnweightedMeanFactory(
            value_sum_factory=tff.aggregators.SecureSumFactory(float(secure.bound), float(-secure.bound)),
            count_sum_factory=tff.aggregators.SecureSumFactory(1, 0),
        )
    )


DDP_MODCLIP_PROB = 1e-4  # TFF's default probability of a modular wrap of the secure sum
DDP_ROTATION = "hd"


def ddp_parameters(
    noise_multiplier: float, l2_clip: float, clients_per_round: int, dim: int, bits: int = privacy_lib.DDP_BITS
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
        raise UserError("privacy.secure_aggregation = 'simulated' with privacy.level = 'client' needs noise > 0")
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
    return tff.aggregators.as_weighted_aggregator(factory), details


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


def _build_secure_process(train: TrainSection, model_fn: ModelFn, privacy, plan, secure):
    level = plan.level if plan is not None else "none"

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    if level == "record":
        from tff_apps import dp_sgd

        # DP-SGD noise is added at each client (local DP on records): it composes with any
        # secure sum; the mean is uniform (weight 1 per client, as in dp_sgd).
        work = dp_sgd.build_dp_sgd_client_work(
            model_fn, client_optimizer(train), plan.section.clip_norm, plan.noise_multiplier
        )
    else:
        work = client_work(train, model_fn)
    distributor = tff.learning.templates.build_broadcast_process(weights_type)
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer(train), weights_type)
    if secure.mode == "masked":
        if level == "client":  # privacy.secure_aggregation refuses it before the run; keep the guard
            raise UserError(
                "privacy.secure_aggregation = 'masked' cannot carry client-level DP; use 'simulated'"
            )
        from tff_apps.secure_rounds import MaskedLearningProcess

        return MaskedLearningProcess(initial_model_weights, distributor, work, finalizer, secure)
    if level == "client":
        if plan.section.clipping != "fixed":
            raise UserError(
                "privacy.clipping = 'adaptive' is not supported with privacy.secure_aggregation = "
                "'simulated' (distributed DP): use privacy.clipping = 'fixed'"
            )
        factory, details = ddp_aggregator(
            plan.section.clip_norm, plan.sampling.participants, plan.noise_multiplier, model_dimension(weights_type)
        )
        if hasattr(privacy, "mechanism_details"):
            privacy.mechanism_details.update(details)
    else:
        factory = secure_mean_factory(secure)
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights, distributor, work, aggregator, finalizer
    )
