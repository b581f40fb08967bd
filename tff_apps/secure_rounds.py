"""Learning rounds whose aggregation is a real secure sum: pairwise-masked secure
aggregation after Bonawitz et al. (CCS 2017), `shared/secagg.py`.

TFF's open runtime only simulates secure sum, and its C++ worker cannot call back into
Python, so a round is split in three (`MaskedLearningProcess.next`):

1. client phase, a TFF computation: broadcast + client work (FedAvg, FedProx or DP-SGD),
   exactly the parts `compose_learning_process` composes. It returns the clients' model
   updates and weights as CLIENTS-placed values, which the execution context hands to
   Python as one value per participating client, in the order of the round's datasets.
2. secure sum: client i (ids 0..n-1 for the round's n participants) flattens its update
   into one vector, encodes it (below) and takes part in `shared.secagg.secure_sum`; the
   server side learns only the sum over the surviving clients. A round in which more than
   n - t clients drop out raises `SecAggError` and NO model update is applied (the state
   passed in is left as it was; the program fails the job with the error).
3. server phase, a TFF computation: the finalizer (server optimizer) applied to the
   decoded mean.

Encoding (per client, weight w = examples processed this round for weighted FedAvg and
FedProx, w = 1 otherwise; W = `SecureAggregation.max_weight`, B = its `bound`):
    [ w*u / W  (clipped per coordinate to +-B by the quantizer, i.e. w*u clipped to +-B*W),
      (w / W) * B_w,
      B_w if any coordinate was clipped else 0 ]
with B_w = floor(B * 2^s) / 2^s, exactly representable in fixed point, so the weight's
fixed-point level is round(w / W * floor(B * 2^s)) (half a level of error) and unweighted
counts are exact. The server decodes sum(w*u) = W * total[:-2], sum(w) = W * total[-2] /
B_w, and divides (0 if the weights sum to 0, like TFF's `divide_no_nan`). This clips
exactly as the "simulated" mode's `SecureSumFactory` bounds (+-B*W on w*u, [0, W] on w) do,
so the two modes give the same model up to their quantization
(tests/tff_apps/test_secure_aggregation.py derives both bounds).
The last coordinate counts, still only as a sum, the clients whose update was clipped
(TFF's SecureSumFactory reports the same count).

Randomness: the protocol's keys and masks come from `os.urandom` (secagg's default), not
from the job seed - anyone holding the config could otherwise unmask every input. The masks
cancel exactly, so the model does not depend on them: same config, same model.

In this process every client and the server run in one Python process (the protocol's
messages are real, the parties are not separate machines): the client updates exist in
the clear in this process before masking, as they do in TFF's simulation runtime.
"""

from __future__ import annotations

import collections
import collections.abc
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_federated as tff

from shared import secagg
from tff_apps.privacy import SecureAggregation

LearningAlgorithmState = tff.learning.templates.LearningAlgorithmState
LearningProcessOutput = tff.learning.templates.LearningProcessOutput


def weight_level(secure: SecureAggregation) -> int:
    """floor(B * 2^s): the fixed-point level that stands for weight W."""
    return int(math.floor(secure.bound * 2.0**secure.scale_bits))


def encode(update: Sequence[np.ndarray], weight: float, secure: SecureAggregation) -> np.ndarray:
    """One client's input to the secure sum (module docstring, "Encoding")."""
    flat = np.concatenate([np.asarray(t, np.float64).ravel() for t in update])
    w = float(weight) if secure.weighted else 1.0
    share = w / secure.max_weight
    values = flat * w / secure.max_weight  # float32 * float32 is exact in float64
    bound_w = weight_level(secure) / 2.0**secure.scale_bits
    clipped = bool(np.any(np.abs(values) > secure.bound))
    return np.concatenate([values, [share * bound_w, bound_w if clipped else 0.0]])


def decode(total: np.ndarray, secure: SecureAggregation) -> tuple[np.ndarray, float, int]:
    """(mean update as a flat float64 vector, sum of weights, clients clipped) from the sum."""
    scale = 2.0**secure.scale_bits
    level = weight_level(secure)
    value_sum = total[:-2] * secure.max_weight
    weight_sum = float(total[-2] * scale / level * secure.max_weight)
    clipped = int(round(total[-1] * scale / level))
    mean = value_sum / weight_sum if weight_sum != 0 else np.zeros_like(value_sum)
    return mean, weight_sum, clipped


class MaskedLearningProcess:
    """A learning process (the `initialize` / `next` / `get_model_weights` that
    `program.run_rounds` uses) whose aggregator is `shared.secagg.secure_sum`.

    State and metrics are shaped like `compose_learning_process`'s: a
    `LearningAlgorithmState` (the aggregator's part is empty: the protocol keeps no state
    between rounds) and metrics with `distributor`, `client_work`, `aggregator`,
    `finalizer`, plus `secure_aggregation` (the protocol's seconds and bytes per round,
    copied into metrics.jsonl by the program).
    """

    def __init__(self, initial_model_weights_fn, distributor, client_work, finalizer, secure: SecureAggregation):
        if secure.mode != "masked":
            raise ValueError(f"MaskedLearningProcess needs secure aggregation mode 'masked', got {secure.mode!r}")
        self.secure = secure
        self._finalizer = finalizer
        weights_type = initial_model_weights_fn.type_signature.result
        self._trainable_type = weights_type.trainable
        data_type = client_work.next.type_signature.parameter[2]

        @tff.federated_computation()
        def init_fn():
            return tff.federated_zip(
                LearningAlgorithmState(
                    tff.federated_eval(initial_model_weights_fn, tff.SERVER),
                    distributor.initialize(),
                    client_work.initialize(),
                    tff.federated_value((), tff.SERVER),
                    finalizer.initialize(),
                )
            )

        @tff.federated_computation(init_fn.type_signature.result, data_type)
        def client_phase(state, client_data):
            distributed = distributor.next(state.distributor, state.global_model_weights)
            work = client_work.next(state.client_work, distributed.result, client_data)
            return (
                distributed.state,
                work.state,
                work.result.update,  # CLIENTS-placed: one value per client, in data order
                work.result.update_weight,
                distributed.measurements,
                work.measurements,
            )

        self._init_fn = init_fn
        self._client_phase = client_phase

    def initialize(self):
        return self._init_fn()

    def get_model_weights(self, state) -> tff.learning.models.ModelWeights:
        return state.global_model_weights

    def next(
        self,
        state,
        client_data: Sequence[Any],
        *,
        dropouts_after_sharing: Sequence[int] = (),
        dropouts_after_masking: Sequence[int] = (),
    ) -> LearningProcessOutput:
        """One round. `dropouts_*` (tests): protocol client ids (positions in `client_data`)
        that vanish after sharing keys (their update is not in the sum) or after sending
        their masked input (it is). More than n - t dropouts raise `secagg.SecAggError`;
        `state` is then not changed and no update is applied."""
        client_data = list(client_data)
        dist_state, work_state, updates, weights, dist_metrics, work_metrics = self._client_phase(
            state, client_data
        )
        n = len(client_data)
        updates = _per_client(updates, n)
        weights = _per_client(weights, n)
        cfg = self.secure.secagg_config(n)
        vectors = [encode(_flatten(u), w, self.secure) for u, w in zip(updates, weights)]
        result = secagg.secure_sum(
            vectors,
            cfg,
            dropouts_after_sharing=dropouts_after_sharing,
            dropouts_after_masking=dropouts_after_masking,
        )
        mean, _, clipped = decode(result.total, self.secure)
        update = _rebuild(self._trainable_type, mean)
        finalized = self._finalizer.next(state.finalizer, state.global_model_weights, update)
        new_state = LearningAlgorithmState(
            finalized.result, dist_state, work_state, state.aggregator, finalized.state
        )
        metrics = collections.OrderedDict(
            distributor=dist_metrics,
            client_work=work_metrics,
            aggregator=collections.OrderedDict(secure_clipped_count=clipped),
            finalizer=finalized.measurements,
            secure_aggregation=collections.OrderedDict(
                secagg_seconds=float(result.seconds),
                secagg_bytes=int(sum(r.bytes_to_server + r.bytes_from_server for r in result.rounds)),
                secagg_survivors=len(result.survivors),
                secagg_dropped=len(result.dropped),
                secagg_clipped_clients=clipped,
            ),
        )
        return LearningProcessOutput(new_state, metrics)


def _flatten(value) -> list[np.ndarray]:
    """A client's update (nested lists / mappings of arrays, in TFF's element order) as arrays."""
    if isinstance(value, collections.abc.Mapping):
        return [a for v in value.values() for a in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _flatten(v)]
    return [np.asarray(value)]


def _rebuild(type_spec, flat: np.ndarray):
    """The float32 structure of `type_spec` (the model's trainable weights) from a flat vector."""
    offset = 0

    def build(t):
        nonlocal offset
        if isinstance(t, tff.TensorType):
            size = int(np.prod(t.shape, dtype=np.int64))
            array = flat[offset : offset + size].reshape(t.shape).astype(t.dtype)
            offset += size
            return array
        names = [name for name, _ in tff.structure.iter_elements(t)]
        members = [build(member) for member in t]
        if names and all(names):
            return collections.OrderedDict(zip(names, members))
        return members

    result = build(type_spec)
    if offset != flat.size:
        raise RuntimeError(f"secure sum returned {flat.size} values, the model has {offset}")
    return result


def _per_client(value, n: int) -> list:
    """The execution context returns a CLIENTS-placed value as a list (one per client)."""
    if not isinstance(value, list) or len(value) != n:
        raise RuntimeError(f"client phase returned {type(value).__name__} for {n} clients, expected a list of {n}")
    return value
