"""The grouped engine (`train.engine = "grouped"`): a round's clients trained in ONE TFF call.

TFF's stock simulation places every client in its own slot of the runtime: each client's
dataset is serialized, its local training is a separate TF call in the worker, and its
update travels back on its own; about 18 ms of runtime overhead per client per round on
these machines (ANCHORS.md, "Engine speed"), several times the local SGD work itself.

Here the round's clients travel in a few groups: dense tensors [clients, steps, batch, ...]
with a mask of the real examples (`grouped_data`: each client's batches, in the order its
dataset yields them; groups of at most 8 MB, at least one per worker). One TF computation
per group runs every client's local training from the broadcast weights at once: the model's weights are stacked per client ([clients, ...]), a
tf.while_loop walks the steps, the Dense layers become batched matmuls, and the gradient of
the sum of the clients' losses is each client's own gradient. It returns the round's sums
(per-client weighting, DP clipping or secure-sum quantization applied to each client's
update BEFORE summing, exactly as the stock aggregators do at the clients); the server part
finishes the aggregate and applies TFF's own server-optimizer finalizer.

Same mathematics as `factory.build_learning_process` with the stock engine (the
equivalence test, tests/tff_apps/learning/test_grouped.py, compares 3 rounds to within 1e-5):
- client work: TFF's `build_model_delta_client_work` (or our FedProx, `client_works`):
  the same batches in the same order, the same client optimizer (its state restarts every
  round), update = w0 - w, a client with a non-finite update is zeroed and weighted 0,
  weight = number of examples (NUM_EXAMPLES) or 1 (UNIFORM);
- aggregation: MeanFactory (sum of w*u / sum of w), UnweightedMeanFactory (sum u / clients),
  client-level DP `DifferentiallyPrivateFactory.gaussian_fixed` (each update clipped to L2
  norm C, summed, N(0, (zC)^2) noise added, divided by the fixed clients_per_round), and
  the secure-sum "simulated" mean (`aggregators.secure_mean_factory`: TFF's SecureSumFactory
  clipping and 32-bit quantization, reusing TFF's own quantization functions) (these in
  `grouped_aggregation`); [robustness] (median and trimmed mean from the clients' updates
  stacked instead of summed, clip_zero, scaled bad updates) and [communication] (TFF's
  quantizing encoder and rotations per client), in `grouped_robust` (equivalence:
  tests/tff_apps/learning/test_grouped_robust.py);
- server: TFF's apply-optimizer finalizer (it rejects a non-finite aggregate).

Masked secure aggregation (no DP) runs the stock masked round's secure sum in Python between
a grouped client phase and the server phase (`grouped_masked`).

Record-level DP-SGD (per-example clipping and noise at every client) is `grouped_dp_sgd`'s local
training, on the Poisson round inputs of `dp_sgd`; its updates then take the same aggregations
as the stock record-level process: the uniform mean, compressed or inside clip_zero, or the
uniform secure sums.

Distributed DP (client-level DP with a secure sum) runs TFF's own DistributedDpSumFactory split
at its secure sums after a grouped client phase (`grouped_ddp`).

It runs every horizontal configuration the stock engine runs. What it does not run is a model:
`build_grouped_process` refuses (UserError) models other than a chain of Keras Dense layers (or
a GRU) with a per-example loss and models carrying their own stacked form (`read_dense_chain`),
and, for DP-SGD, the models whose per-example loss it would compute differently
(`grouped_dp_sgd`).
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy

from tff_apps.config import TrainSection
from tff_apps.learning.dense_chain import ENGINE_KEY, DenseChain, masked_sum, per_example_elements, read_dense_chain
from tff_apps.learning.grouped_data import round_groups
from tff_apps.learning.grouped_aggregation import aggregation_of, dp_computations, finish_mean, per_client_sums
from tff_apps.learning.grouped_ddp import build_ddp_process
from tff_apps.learning.grouped_masked import masked_next
from tff_apps.learning.grouped_process import (
    GroupedProcess, apply_update, server_start, stacked_group_type, stacked_optimizer_state, where_client,
)
from tff_apps.learning.grouped_robust import RobustAggregation, concatenating_sum


def build_grouped_process(
    train: TrainSection, model_fn, aggregator_factory=None, privacy=None, secure=None, federation=None,
    client_names=None,
) -> GroupedProcess:
    """`factory.build_learning_process` for `train.engine = "grouped"` (same arguments;
    `client_names`: the federation's clients in order, for scaled bad updates)."""
    from tff_apps.learning import optimizers
    from tff_apps.learning.federation import bad_client_names

    if aggregator_factory is not None:
        raise ValueError(f"{ENGINE_KEY} = 'grouped' builds its own aggregation; pass no aggregator_factory")
    plan = getattr(privacy, "plan", privacy)
    if secure is None:
        secure = getattr(privacy, "secure", None)
    aggregation = aggregation_of(train, plan, secure, federation)
    spec = aggregation.robust
    bad = ()
    if spec is not None and spec.scaled:
        if len(client_names or ()) <= federation.robustness.bad_clients:
            raise ValueError(f"scaled bad updates need the federation's client names, got {client_names}")
        bad = bad_client_names(federation, client_names)
    chain = read_dense_chain(model_fn)
    with tf.Graph().as_default():
        weights_type = tff.learning.models.weights_type_from_model(model_fn())
        input_spec = model_fn().input_spec
    optimizer = optimizers.client_optimizer(train)
    group_round = round_groups
    if plan is not None and plan.level == "record":  # DP-SGD at every client, on its Poisson round inputs
        from tff_apps.learning.grouped_dp_sgd import dp_sgd_training, poisson_round_groups

        local_training, group_type = dp_sgd_training(chain, optimizer, plan, input_spec)
        group_round = poisson_round_groups
    else:
        proximal = float(train.proximal_strength) if train.algorithm == "fedprox" else 0.0
        local_training = functools.partial(_local_training, chain, optimizer, proximal)
        group_type = stacked_group_type(input_spec, chain.shaped_input, spec)
    dp = dp_computations(aggregation.query, weights_type) if aggregation.kind == "dp" else None
    params_type = dp.derive_params.type_signature.result if dp else None
    robust = None
    if spec is not None:
        robust = RobustAggregation(spec, tff.types.type_to_tf_tensor_specs(weights_type.trainable))
        aggregation = dataclasses.replace(aggregation, query=robust)
        params_type = tff.tensorflow.computation(robust.initial_state).type_signature.result
    train_group = _train_group_computation(local_training, aggregation, weights_type, group_type, params_type)
    initialize_fn, server_next = server_start(
        train, model_fn, weights_type, dp.initial_state if dp else robust.initial_state if robust else tuple
    )

    sums_type = train_group.type_signature.result

    @tff.tensorflow.computation(sums_type["metrics"])
    def finish_metrics(sums):
        return _finalize_metrics(sums)

    if aggregation.kind == "ddp":  # TFF's distributed DP, split at its secure sums, between TFF calls
        return build_ddp_process(train, model_fn, plan, secure, privacy, weights_type, train_group, finish_metrics,
                                 group_type)
    if aggregation.kind == "masked":  # the secure sum runs in Python between two TFF calls
        @tff.federated_computation(initialize_fn.type_signature.result, tff.FederatedType(weights_type.trainable, tff.SERVER))
        def server_phase(state, update):
            return apply_update(server_next, state, update, state.aggregator)

        next_masked = masked_next(initialize_fn, train_group, server_phase, finish_metrics, secure, weights_type.trainable,
                                  group_type)
        return GroupedProcess(initialize_fn, next_masked, group_round=group_round)

    if dp is None and robust is None:
        @tff.tensorflow.computation(sums_type)
        def finish(sums):
            mean = finish_mean(aggregation, sums["value"], sums["weight"], sums["clients"])
            return mean, _finalize_metrics(sums["metrics"])

    if robust is not None:
        @tff.tensorflow.computation(sums_type, params_type)
        def robust_finish(sums, robust_state):
            update, new_state, measurements = robust.finish(sums["value"], robust_state, sums["clients"])
            return update, new_state, measurements, _finalize_metrics(sums["metrics"])

    def aggregate(state, groups):
        """(mean update, aggregator state, aggregator measurements, train metrics), at SERVER."""
        weights = tff.federated_broadcast(state.global_model_weights)
        if robust is not None:  # the estimators' state and the rotation's seed go to the clients
            params = tff.federated_broadcast(state.aggregator)
            group_sums = tff.federated_map(train_group, (weights, params, groups))
            sums = concatenating_sum(group_sums) if robust.spec.stacks else tff.federated_sum(group_sums)
            return tff.federated_map(robust_finish, (sums, state.aggregator))
        if dp is None:
            sums = tff.federated_sum(tff.federated_map(train_group, (weights, groups)))
            update, train_metrics = tff.federated_map(finish, sums)
            return update, state.aggregator, _mean_measurements(aggregation), train_metrics
        params = tff.federated_broadcast(tff.federated_map(dp.derive_params, state.aggregator.query_state))
        sums = tff.federated_sum(tff.federated_map(train_group, (weights, params, groups)))
        update, query_state, event, query_metrics = tff.federated_map(dp.noised_mean, (sums["value"], state.aggregator.query_state))
        aggregator = tff.federated_zip(differential_privacy.DPAggregatorState(
            query_state, tff.federated_value((), tff.SERVER), event, tff.federated_value(False, tff.SERVER)
        ))
        measurements = tff.federated_zip(collections.OrderedDict(dp_query_metrics=query_metrics, dp=tff.federated_value((), tff.SERVER)))
        return update, aggregator, measurements, tff.federated_map(finish_metrics, sums["metrics"])

    @tff.federated_computation(initialize_fn.type_signature.result, tff.FederatedType(group_type, tff.CLIENTS))
    def next_fn(state, groups):
        update, aggregator, aggregator_measurements, train_metrics = aggregate(state, groups)
        new_state, finalizer_measurements = apply_update(server_next, state, update, aggregator)
        metrics = tff.federated_zip(collections.OrderedDict(
            distributor=tff.federated_value((), tff.SERVER),
            client_work=tff.federated_zip(collections.OrderedDict(train=train_metrics)),
            aggregator=aggregator_measurements,
            finalizer=finalizer_measurements,
        ))
        return new_state, metrics

    scale = federation.robustness.bad_update_scale if bad else 1.0
    return GroupedProcess(initialize_fn, next_fn, spec, bad, scale, group_round=group_round)


def _mean_measurements(aggregation):
    """The stock mean's measurements (MeanFactory's, UnweightedMeanFactory's; none for a secure sum's), at SERVER."""
    if aggregation.kind not in ("mean", "unweighted"):
        return tff.federated_value((), tff.SERVER)
    count = "mean_weight" if aggregation.weighted else "mean_count"
    return tff.federated_value(collections.OrderedDict([("mean_value", ()), (count, ())]), tff.SERVER)


def _train_group_computation(local_training, aggregation, weights_type, group_type, params_type=None):
    """(weights, [DP query's sample params or the robust aggregation's state,] group) -> the group's sums;
    `local_training(start, group)` -> (updates [clients, ...], weights [clients], metric sums)."""

    def sums(weights, group, params=None):
        start = [tf.convert_to_tensor(w) for w in weights.trainable]
        updates, client_weights, metrics = local_training(start, group)
        clients = tf.shape(group["mask"], out_type=tf.int64)[0]
        if aggregation.kind in ("robust", "masked", "ddp"):  # grouped_robust's sums (weight sum included), or the stacks
            value = aggregation.query.client_sums(updates, client_weights, params, group)
            return collections.OrderedDict(value=value, clients=clients, metrics=metrics)
        value, weight = per_client_sums(aggregation, updates, client_weights, params)
        return collections.OrderedDict(value=value, weight=weight, clients=clients, metrics=metrics)

    if params_type is None:
        return tff.tensorflow.computation(lambda weights, group: sums(weights, group), weights_type, group_type)
    return tff.tensorflow.computation(
        lambda weights, params, group: sums(weights, group, params), weights_type, params_type, group_type
    )


def _local_training(chain: DenseChain, optimizer, proximal: float, start: list[tf.Tensor], group):
    """Every client's local training from `start`; returns (updates [clients, ...] with
    non-finite clients zeroed, weights [clients], metric sums)."""
    x, y, mask = group["x"], group["y"], group["mask"]
    clients, steps = tf.shape(mask)[0], tf.shape(mask)[1]
    anchor = [tf.tile(tf.expand_dims(w, 0), [clients] + [1] * w.shape.rank) for w in start]
    optimizer_state = stacked_optimizer_state(optimizer, start, clients)
    final, _, sums = stacked_steps(
        chain, optimizer, anchor, optimizer_state, lambda s: (x[:, s], y[:, s], mask[:, s]), steps,
        proximal=proximal, sums=_zero_metric_sums(chain),
    )
    updates = [a - w for a, w in zip(anchor, final)]
    finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(u), axis=list(range(1, u.shape.rank))) for u in updates]), 0
    )
    updates = [where_client(finite, u, tf.zeros_like(u)) for u in updates]
    # NUM_EXAMPLES weights; the unweighted aggregations ignore them, as TFF's
    # as_weighted_aggregator does, so one definition serves every aggregation.
    weight = tf.where(finite, tf.reduce_sum(mask, axis=[1, 2]), 0.0)
    return updates, weight, sums


def stacked_steps(chain: DenseChain, optimizer, weights, state, batches, steps, proximal: float = 0.0, sums=None):
    """`steps` steps of every client's local training at once: `weights` [clients, ...] per
    tensor, `state` the client optimizer's (`stacked_optimizer_state`), `batches(s)` -> (x, y,
    mask) of step s ([clients, batch, ...]; a client without examples at a step keeps its
    weights and state). FedProx's anchor is `weights` as given. Returns (weights, state, metric
    sums), the sums only when `sums` (`_zero_metric_sums`) is given."""
    anchor, track = weights, sums is not None

    def step(s, weights, state, sums):
        batch_x, batch_y, batch_mask = batches(s)
        examples = tf.reduce_sum(batch_mask, axis=1)  # [clients]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            predictions = chain.forward(weights, batch_x)
            data_loss = chain.client_losses(batch_y, predictions, batch_mask)
            total = tf.reduce_sum(data_loss + chain.regularization(weights))
        gradients = tape.gradient(total, weights)
        if proximal > 0:  # FedProx: the gradient of (mu/2)||w - w0||^2 (client_works.py)
            gradients = [g + proximal * (w - w0) for g, w, w0 in zip(gradients, weights, anchor)]
        new_state, new_weights = optimizer.next(state, tuple(weights), tuple(gradients))
        active = examples > 0  # a client's padding steps come after its last batch
        new_weights = [where_client(active, n, w) for n, w in zip(new_weights, weights)]
        new_state = tf.nest.map_structure(lambda n, o: where_client(active, n, o), new_state, state)
        if track:
            sums = _add_metric_sums(chain, sums, batch_y, predictions, data_loss, batch_mask, examples)
        return s + 1, new_weights, new_state, sums

    initial = (tf.constant(0), list(weights), state, sums if track else ())
    _, final, state, sums = tf.while_loop(lambda s, *_: s < steps, step, initial)
    return final, state, sums


def _zero_metric_sums(chain: DenseChain) -> collections.OrderedDict:
    sums = collections.OrderedDict()
    for name in chain.metric_names:
        if name in ("num_examples", "num_batches"):
            sums[name] = tf.constant(0, tf.int64)
        else:
            sums[name] = (tf.constant(0.0), tf.constant(0.0))  # Keras Mean: total, count
    return sums


def _add_metric_sums(chain, sums, batch_y, predictions, data_loss, batch_mask, examples):
    added = collections.OrderedDict()
    user = dict(chain.metrics)
    for name, value in sums.items():
        if name == "num_examples":
            added[name] = value + tf.cast(tf.reduce_sum(examples), tf.int64)
        elif name == "num_batches":
            added[name] = value + tf.reduce_sum(tf.cast(examples > 0, tf.int64))
        elif name == "loss":  # the batch loss without regularization, weighted by batch size
            added[name] = (value[0] + tf.reduce_sum(data_loss * examples), value[1] + tf.reduce_sum(examples))
        else:
            metric = user[name]
            values = metric._fn(batch_y, predictions, **metric._fn_kwargs)  # Keras Mean: over all elements
            added[name] = (
                value[0] + tf.reduce_sum(masked_sum(values, batch_mask)),
                value[1] + tf.reduce_sum(examples) * per_example_elements(values),
            )
    return added


def _finalize_metrics(sums) -> collections.OrderedDict:
    """The metric sums of `_zero_metric_sums` (none for DP-SGD) -> the metrics TFF's client work reports."""
    finalized = collections.OrderedDict()
    for name, value in sums.items():
        finalized[name] = value if name in ("num_examples", "num_batches") else tf.math.divide_no_nan(value[0], value[1])
    return finalized
