"""The job's aggregator when no DP stack replaces it: the (un)weighted mean, compressed when
[communication] asks, inside TFF's robust clip_zero wrappers; and the mean through TFF's
SecureSumFactory for `privacy.secure_aggregation = "simulated"`.

"simulated" uses SecureSumFactory with FIXED bounds (value sum +-B*W, weight sum [0, W]),
not `tff.learning.secure_aggregator`: that one moves its bound every round (a quantile
estimate of the clients' max values, times 2) and adds adaptive zeroing and L2 clipping.
Fixed bounds make "simulated" and "masked" clip identically (the masked protocol's ring and
fixed point must be fixed before the round), so the two modes give the same model up to
quantization; the bound is a documented config value instead of a hidden estimate.

The grouped engine reproduces these in its group computation (`grouped_aggregation` for the
means and secure sums, `grouped_robust` for clip_zero and compression).
"""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

from tff_apps.config import TrainSection
from tff_apps.learning.optimizers import is_weighted
from tff_apps.privacy import secure_settings


def job_aggregator(train: TrainSection, federation=None, weighted: bool | None = None):
    """The job's aggregator when no DP or secure stack replaces it (weighted form, as the
    composer requires; unweighted FedAvg wraps the uniform mean the way TFF's own
    `build_unweighted_fed_avg` does): the algorithm's (un)weighted mean, its value sum compressed when
    [communication] asks (`compression.compressed_sum_factory`), inside TFF's adaptive
    zeroing and L2 clipping when `robustness.aggregation = "clip_zero"`. `weighted`: None =
    the algorithm's weighting; record-level DP passes False (DP-SGD's uniform mean)."""
    from tff_apps.learning import compression

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


def secure_mean_factory(secure: secure_settings.SecureAggregation):
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
