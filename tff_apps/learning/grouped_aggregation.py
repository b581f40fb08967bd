"""How a grouped round aggregates: the client end (each client's update prepared as the stock
aggregator prepares it at the client, then summed over the group) and the server end of the
stock aggregators the grouped engine reproduces (`grouped.py`'s docstring lists them);
[robustness] and [communication] are `grouped_robust`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy, primitives

from shared.errors import UserError
from tff_apps.config import TrainSection
from tff_apps.learning.dense_chain import ENGINE_KEY


@dataclass(frozen=True)
class Aggregation:
    """Which stock aggregator the round reproduces."""

    kind: str  # "mean" (weighted), "unweighted", "dp" (TFF's client-level DP query), "secure", "robust", "masked",
    # "ddp" (distributed DP)
    weighted: bool = True
    query: Any = field(default=None, compare=False)  # dp: the DP query TFF's DifferentiallyPrivateFactory runs
    value_bound: float = 0.0  # secure: each coordinate of w*u (or of u) clipped to +-bound
    max_weight: float = 0.0  # secure, weighted: the weight's upper bound
    robust: Any = None  # robust: the grouped_robust.RobustSpec ([robustness], [communication])


def aggregation_of(train: TrainSection, plan, secure, federation=None) -> Aggregation:
    from tff_apps.learning.grouped_robust import robust_spec
    from tff_apps.learning.optimizers import is_weighted

    level = plan.level if plan is not None else "none"
    robust = robust_spec(train, federation)
    if level == "record" and robust is not None:
        # DP-SGD's updates are noised at the clients: the stock process runs them through the
        # job's uniform mean, compressed or inside clip_zero; a median, trimmed mean or scaled
        # bad updates it refuses (federation.check_robustness, first)
        if robust.stacks or robust.scaled or secure is not None:
            raise UserError(f"{ENGINE_KEY} = 'grouped' runs record-level DP with the uniform mean, compressed or "
                            f"inside clip_zero, as the stock engine does; use {ENGINE_KEY} = 'tff'")
        return Aggregation("robust", weighted=False, robust=dataclasses.replace(robust, weighted=False))
    if level == "record" and secure is None:  # DP-SGD (`grouped_dp_sgd`): noised at the clients, the uniform mean
        return Aggregation("unweighted", weighted=False)
    if robust is not None:
        if level != "none" or secure is not None:  # federation.check refuses these first
            raise UserError(f"{ENGINE_KEY} = 'grouped' runs [robustness] and [communication] without DP or secure sums")
        return Aggregation("robust", weighted=robust.weighted, robust=robust)
    if secure is not None and level == "client":  # distributed DP (`grouped_ddp`): each client's update, stacked
        from tff_apps.learning.grouped_masked import StackedUpdates

        return Aggregation("ddp", weighted=False, query=StackedUpdates())
    if secure is not None and secure.mode == "masked":  # `grouped_masked`: each client's update, stacked
        from tff_apps.learning.grouped_masked import StackedUpdates

        return Aggregation("masked", weighted=secure.weighted, query=StackedUpdates())
    if level == "client":  # fixed or adaptive clipping: the very query of the stock aggregator
        from tff_apps.learning.dp_aggregators import client_dp_factory

        factory = client_dp_factory(plan.section, plan.sampling.participants, plan.noise_multiplier)
        return Aggregation("dp", weighted=False, query=factory._query)
    if secure is not None:
        bound = secure.value_bound if secure.weighted else secure.bound
        return Aggregation("secure", weighted=secure.weighted, value_bound=float(bound), max_weight=float(secure.max_weight))
    return Aggregation("mean" if is_weighted(train) else "unweighted", weighted=is_weighted(train))


def per_client_sums(aggregation: Aggregation, updates: list[tf.Tensor], weights: tf.Tensor, params=None):
    """updates [clients, ...] (zeroed if non-finite), weights [clients] -> (value sum, weight sum),
    each client's contribution prepared the way the stock aggregator prepares it at the client."""
    clients = tf.shape(weights)[0]
    if aggregation.kind == "dp":
        # the query's record of each client (clipped update; adaptive: and its clip indicator),
        # summed: TFF's DifferentiallyPrivateFactory sums the records with a plain SumFactory
        records = tf.vectorized_map(lambda update: aggregation.query.preprocess_record(params, list(update)), updates)
        return tf.nest.map_structure(lambda r: tf.reduce_sum(r, 0), records), tf.cast(clients, tf.float32)
    if aggregation.weighted:
        updates = [u * tf.reshape(weights, [-1] + [1] * (u.shape.rank - 1)) for u in updates]  # MeanFactory's _mul
    if aggregation.kind == "secure":
        upper = tf.constant(aggregation.value_bound, tf.float32)
        quantized = [
            tf.reduce_sum(primitives._client_tensor_shift_for_secure_sum(u, -upper, upper), 0) for u in updates
        ]
        if aggregation.weighted:
            top = tf.constant(aggregation.max_weight, tf.float32)
            weight = tf.reduce_sum(primitives._client_tensor_shift_for_secure_sum(weights, tf.constant(0.0), top))
        else:
            weight = tf.cast(clients, tf.int64)  # the count's SecureSumFactory(1, 0) is exact
        return quantized, weight
    if aggregation.weighted:
        return [tf.reduce_sum(u, 0) for u in updates], tf.reduce_sum(weights)
    return [tf.reduce_sum(u, 0) for u in updates], tf.cast(clients, tf.float32)


def finish_mean(aggregation: Aggregation, value_sum, weight_sum, clients):
    """The server's end of the stock aggregator (but DP's, `dp_computations`): dequantize, divide."""
    if aggregation.kind == "secure":
        upper = tf.constant(aggregation.value_bound, tf.float32)
        value_sum = [
            primitives._server_tensor_shift_for_secure_sum(clients, v, -upper, upper, tf.float32) for v in value_sum
        ]
        if aggregation.weighted:
            top = tf.constant(aggregation.max_weight, tf.float32)
            weight_sum = primitives._server_tensor_shift_for_secure_sum(
                clients, weight_sum, tf.constant(0.0), top, tf.float32
            )
    return [tf.math.divide(v, tf.cast(weight_sum, v.dtype)) for v in value_sum]


@dataclass
class DpComputations:
    derive_params: Any  # query state -> sample params (the clip)
    noised_mean: Any  # (summed records, query state) -> (mean update, new query state, DP event, query metrics)
    initial_state: Any  # () -> the aggregator's initial DPAggregatorState (call inside a TF computation)


def dp_computations(query, weights_type) -> DpComputations:
    """The server's part of TFF's DifferentiallyPrivateFactory with the same query: its state
    (`DPAggregatorState`, the round's DP event included) and its noised result."""
    specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)
    query_state_type = tff.tensorflow.computation(query.initial_global_state).type_signature.result
    derive_params = tff.tensorflow.computation(query.derive_sample_params, query_state_type)
    record_type = tff.tensorflow.computation(
        query.preprocess_record, derive_params.type_signature.result, weights_type.trainable
    ).type_signature.result

    @tff.tensorflow.computation(record_type, query_state_type)
    def noised_mean(records, query_state):
        mean, new_state, event = query.get_noised_result(records, query_state)
        return mean, new_state, event.to_named_tuple(), query.derive_metrics(new_state)

    def initial_state():
        state = query.initial_global_state()
        _, _, event = query.get_noised_result(query.initial_sample_state(specs), state)
        return differential_privacy.DPAggregatorState(state, (), event.to_named_tuple(), True)

    return DpComputations(derive_params, noised_mean, initial_state)
