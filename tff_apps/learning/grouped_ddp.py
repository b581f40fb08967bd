"""The grouped engine with distributed DP (`privacy.level = "client"` with
`privacy.secure_aggregation = "simulated"` or `"masked"`): the clients trained in one TFF call
per group, then TFF's own distributed DP aggregation, split at its secure sums
(`ddp_rounds.DdpSplit`: TFF's MapReduceForm of DistributedDpSumFactory inside an
UnweightedMeanFactory).

A round, in four phases:
1. client phase, one TFF call (`grouped_masked.stacked_client_phase`): every group's clients
   trained at once, their updates stacked in client order;
2. each client's `work` (TFF's, one TF call for the round: `DdpSplit.stacked_encoder`): clip,
   rotate, scale, stochastically round, add the client's share of the discrete Gaussian noise,
   clip into the ring Z_{2^bits};
3. the secure sum of the clients' integer vectors: "masked", the Bonawitz protocol
   (`shared.secagg`, as `ddp_rounds.MaskedDdpProcess`); "simulated", their plain sum, which is
   what TFF's simulated secure sum computes (nothing is protected);
4. `update` (the server's modular clip, unscaling, inverse rotation, mean) and TFF's
   apply-optimizer finalizer (one TFF call).

The mechanism is the stock engine's to the line: the same TFF computations on the same
updates. Its rounding and noise are random (TF's unseeded ops), so the two engines agree in
distribution, not value (tests/tff_apps/learning/test_grouped_ddp.py).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow_federated as tff

from shared import secagg
from shared.errors import UserError
from tff_apps.learning.ddp_rounds import DdpSplit
from tff_apps.learning.dense_chain import ENGINE_KEY
from tff_apps.learning.grouped_masked import stacked_client_phase
from tff_apps.learning.grouped_process import GroupedProcess, apply_update, server_start
from tff_apps.learning.secure_rounds import round_metrics


def build_ddp_process(train, model_fn, plan, secure, privacy, weights_type, train_group, finish_metrics, group_type):
    """The grouped process of distributed DP; `train_group` returns each client's update stacked
    (`grouped_masked.StackedUpdates`)."""
    from tff_apps.privacy.secure_settings import DDP_BITS

    if plan.section.clipping != "fixed":
        raise UserError(
            f"{ENGINE_KEY} = 'grouped' runs distributed DP with privacy.clipping = 'fixed' only (as the stock engine)"
        )
    split = DdpSplit(weights_type.trainable, plan.section.clip_norm, plan.sampling.participants, plan.noise_multiplier,
                     DDP_BITS)
    if hasattr(privacy, "mechanism_details"):
        privacy.mechanism_details.update(split.details)
    base_initialize, server_next = server_start(train, model_fn, weights_type)
    aggregator_type = split.process.initialize.type_signature.result

    @tff.tensorflow.computation(base_initialize.type_signature.result.member, aggregator_type.member)
    def with_aggregator(state, aggregator):
        return state._replace(aggregator=aggregator)

    @tff.federated_computation
    def initialize_fn():
        return tff.federated_map(with_aggregator, (base_initialize(), split.process.initialize()))

    state_type = initialize_fn.type_signature.result

    @tff.federated_computation(state_type, tff.FederatedType(weights_type.trainable, tff.SERVER), aggregator_type)
    def server_phase(state, update, aggregator):
        return apply_update(server_next, state, update, aggregator)

    client_phase = stacked_client_phase(state_type, train_group, finish_metrics, group_type)
    encode = split.stacked_encoder(client_phase.type_signature.result[0].member["updates"])
    return GroupedProcess(initialize_fn, _ddp_next(client_phase, server_phase, encode, split, secure))


def _ddp_next(client_phase, server_phase, encode, split, secure):
    def next_fn(state, groups, dropouts_after_sharing=(), dropouts_after_masking=()):
        """One round; the dropouts (tests, masked only) as `grouped_masked.masked_next`'s."""
        stacked, train_metrics = client_phase(state, list(groups))
        vectors = encode([np.asarray(u) for u in stacked["updates"]], state.aggregator)  # [clients, length]
        extra = {}
        if secure.mode == "masked":
            result = secagg.secure_sum(list(vectors), secure.secagg_config(len(vectors)),
                                       dropouts_after_sharing=dropouts_after_sharing,
                                       dropouts_after_masking=dropouts_after_masking)
            total = result.total
            extra["secure_aggregation"] = round_metrics(result)
        else:  # TFF's simulated secure sum is the plain sum of the integer vectors
            total = np.sum(vectors, axis=0)
        aggregator, mean, measurements = split.decode(state.aggregator, total)
        new_state, finalizer_metrics = server_phase(state, list(mean), aggregator)
        return new_state, collections.OrderedDict(
            distributor=(),
            client_work=collections.OrderedDict(train=train_metrics),
            aggregator=measurements,
            finalizer=finalizer_metrics,
            **extra,
        )

    return next_fn
