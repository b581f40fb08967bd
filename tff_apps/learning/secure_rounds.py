"""Learning rounds whose aggregation is a real secure sum: pairwise-masked secure
aggregation after Bonawitz et al. (CCS 2017), `shared/secagg.py`.

TFF's open runtime only simulates secure sum, and its C++ worker cannot call back into
Python, so a round is split in three (`MaskedLearningProcess.next`; the client and server
phases are `split_rounds.SplitRoundProcess`'s, shared with robust aggregation):

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
(tests/tff_apps/learning/test_secure_aggregation.py derives both bounds).
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
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared import secagg
from tff_apps.privacy.secure_settings import SecureAggregation
from tff_apps.learning.split_rounds import LearningProcessOutput, SplitRoundProcess, flatten_update


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


class MaskedLearningProcess(SplitRoundProcess):
    """A learning process (the `initialize` / `next` / `get_model_weights` that
    `round_loop.run_rounds` uses) whose aggregator is `shared.secagg.secure_sum`.

    Its client phase and server phase are `split_rounds.SplitRoundProcess`'s. State and
    metrics are shaped like `compose_learning_process`'s: a `LearningAlgorithmState` (the
    aggregator's part is empty: the protocol keeps no state between rounds) and metrics with
    `distributor`, `client_work`, `aggregator`, `finalizer`, plus `secure_aggregation` (the
    protocol's seconds and bytes per round, copied into metrics.jsonl by the program).
    """

    def __init__(self, initial_model_weights_fn, distributor, client_work, finalizer, secure: SecureAggregation):
        if secure.mode != "masked":
            raise ValueError(f"MaskedLearningProcess needs secure aggregation mode 'masked', got {secure.mode!r}")
        super().__init__(initial_model_weights_fn, distributor, client_work, finalizer)
        self.secure = secure

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
        their masked input (it is). More than n - t dropouts raise `SecAggError`;
        `state` is then not changed and no update is applied."""
        client_data = list(client_data)
        phase = self.run_client_phase(state, client_data)
        cfg = self.secure.secagg_config(len(client_data))
        vectors = [encode(flatten_update(u), w, self.secure) for u, w in zip(phase.updates, phase.weights)]
        result = secagg.secure_sum(
            vectors,
            cfg,
            dropouts_after_sharing=dropouts_after_sharing,
            dropouts_after_masking=dropouts_after_masking,
        )
        mean, _, clipped = decode(result.total, self.secure)
        return self.finish_round(
            state,
            phase,
            self.rebuild(mean),
            state.aggregator,
            collections.OrderedDict(secure_clipped_count=clipped),
            secure_aggregation=round_metrics(result, clipped),
        )


def round_metrics(result: secagg.SecAggResult, clipped: int | None = None) -> collections.OrderedDict:
    """The protocol's seconds, bytes, survivors and dropouts of a round (metrics' `secure_aggregation`),
    and the clients whose update the secure bound clipped (not with distributed DP: TFF clips there)."""
    metrics = collections.OrderedDict(
        secagg_seconds=float(result.seconds),
        secagg_bytes=int(sum(r.bytes_to_server + r.bytes_from_server for r in result.rounds)),
        secagg_survivors=len(result.survivors),
        secagg_dropped=len(result.dropped),
    )
    if clipped is not None:
        metrics["secagg_clipped_clients"] = clipped
    return metrics
