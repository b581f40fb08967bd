"""The grouped engine with pairwise-masked secure aggregation (`privacy.secure_aggregation =
"masked"`, no DP): `secure_rounds.MaskedLearningProcess`'s round with the clients trained in
one TFF call per group.

A round, as the stock masked round (`split_rounds.SplitRoundProcess`), in three phases:
1. client phase, one TFF call: the weights broadcast, every group's clients trained at once
   (`grouped._local_training`), their updates and weights stacked, not summed
   (`grouped_robust.concatenating_sum`, in client order, over the round's groups); the
   training metrics finished at the server.
2. secure sum, in Python: client i's update and weight encoded exactly as the stock round
   encodes them (`secure_rounds.encode`), `shared.secagg.secure_sum` over the round's
   clients, the server decodes the mean (`secure_rounds.decode`).
3. server phase, one TFF call: TFF's apply-optimizer finalizer on the mean.

The weight is the stock client work's: the examples the client processed (weighted FedAvg,
FedProx; 0 for a client whose update was not finite, which sends zeros, as TFF's client work
does), or 1 (the unweighted mean, `secure_rounds.encode`). As in the stock round, every update exists
in the clear in this process before it is masked (one process plays every client).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow_federated as tff

from shared import secagg
from tff_apps.learning import secure_rounds
from tff_apps.learning.split_rounds import _rebuild


class StackedUpdates:
    """The group's contribution to the masked round: each client's update and weight, stacked
    (the `query` of an `Aggregation` of kind "robust" in `grouped._train_group_computation`)."""

    def client_sums(self, updates, weights, params, group) -> collections.OrderedDict:
        return collections.OrderedDict(updates=updates, weights=weights)


def masked_next(initialize_fn, train_group, server_phase, finish_metrics, secure, trainable_type, group_type):
    """The masked round as `grouped_process.GroupedProcess`'s next_fn: (state, groups) -> (new state, metrics).
    `train_group` returns each client's update and weight stacked (`StackedUpdates`),
    `server_phase(state, update)` -> (new state, finalizer measurements)."""
    client_phase = stacked_client_phase(initialize_fn.type_signature.result, train_group, finish_metrics, group_type)

    def next_fn(state, groups, dropouts_after_sharing=(), dropouts_after_masking=()):
        """One round; the dropouts (tests) as `secure_rounds.MaskedLearningProcess.next`'s: too
        many raise `SecAggError` before any update is applied."""
        stacked, train_metrics = client_phase(state, list(groups))
        updates = [np.asarray(u) for u in stacked["updates"]]
        weights = np.asarray(stacked["weights"], np.float64)
        vectors = [secure_rounds.encode([u[i] for u in updates], float(weights[i]), secure) for i in range(len(weights))]
        result = secagg.secure_sum(vectors, secure.secagg_config(len(vectors)), dropouts_after_sharing=dropouts_after_sharing,
                                   dropouts_after_masking=dropouts_after_masking)
        mean, _, clipped = secure_rounds.decode(result.total, secure)
        new_state, finalizer_metrics = server_phase(state, _rebuild(trainable_type, mean))
        return new_state, collections.OrderedDict(
            distributor=(),
            client_work=collections.OrderedDict(train=train_metrics),
            aggregator=collections.OrderedDict(secure_clipped_count=clipped),
            finalizer=finalizer_metrics,
            secure_aggregation=secure_rounds.round_metrics(result, clipped),
        )

    return next_fn


def stacked_client_phase(state_type, train_group, finish_metrics, group_type):
    """(state, groups) -> (each client's update and weight stacked, in client order over the
    groups; the round's training metrics), one TFF call."""
    from tff_apps.learning.grouped_robust import concatenating_sum

    @tff.federated_computation(state_type, tff.FederatedType(group_type, tff.CLIENTS))
    def client_phase(state, groups):
        weights = tff.federated_broadcast(state.global_model_weights)
        sums = concatenating_sum(tff.federated_map(train_group, (weights, groups)))
        return sums["value"], tff.federated_map(finish_metrics, sums["metrics"])

    return client_phase
