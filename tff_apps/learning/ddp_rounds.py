"""Distributed DP whose secure sum is the real masked protocol (`privacy.level = "client"`
with `privacy.secure_aggregation = "masked"`): each client clips, rotates, rounds and noises
its own update, and only the masked sum of the integer vectors reaches the server.

The mechanism is TFF's own, not a copy: the distributed DP aggregator the "simulated" mode
runs whole (`dp_aggregators.ddp_factory`: DistributedDpSumFactory with the distributed
discrete Gaussian inside an UnweightedMeanFactory) is split at its secure sums by TFF's
MapReduceForm compiler (`tff.backends.mapreduce.get_map_reduce_form_for_computation`, the
form TFF uses to hand a computation to a production secure-aggregation backend):

  prepare(state)      server: what the clients need (the rotation seed, the scale, the DP
                      query's L2 bound and local noise scale, the clipping ranges)
  work(update, b)     client: concat, L2 clip, randomized Hadamard rotation, scaling and
                      stochastic rounding, the DP query's `preprocess_record` (norm check and
                      the client's share of the discrete Gaussian noise, drawn by TFP's sampler
                      with TF's unseeded random ops on the machine that runs it), modular
                      clipping into [0, 2^bits); plus 0/1 counts (clients, clipped clients)
  update(state, sums) server: modular clip of the sum, the query's result (no noise: it is
                      in the sum already), unscaling, the inverse rotation, reshape, / count

`work`'s secure-sum inputs travel as one integer vector in the masking ring Z_{2^bits}
(`secure_settings.DDP_BITS`, the field TFF's factory clips into): the field vector's sum is
wanted mod 2^bits (TFF's own server-side modular clip takes it so), and the counts' sums are
exact because they stay below 2^(bits-1). Across sites, `work` runs on each site's worker
(`tff_apps.sites.masked_rounds`); here, in simulation, every client runs in this process.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from shared import secagg
from tff_apps.learning.dp_aggregators import ddp_factory
from tff_apps.learning.secure_rounds import round_metrics
from tff_apps.learning.split_rounds import LearningProcessOutput, SplitRoundProcess

SECURE_SUMS = 1  # the element of `work`'s result holding the secure_sum_bitwidth inputs


class DdpSplit:
    """TFF's distributed DP aggregation process for `value_type`, split at its secure sums."""

    def __init__(self, value_type, l2_clip: float, clients_per_round: int, noise_multiplier: float, bits: int):
        factory, self.details = ddp_factory(l2_clip, clients_per_round, noise_multiplier, _dimension(value_type))
        self.process = factory.create(value_type)
        self.bits = bits

        @tff.federated_computation(self.process.initialize.type_signature.result, self.process.next.type_signature.parameter[1])
        def round_fn(state, value):  # the (state, data) -> (state, output) form the compiler takes
            out = self.process.next(state, value)
            return out.state, tff.federated_zip((out.result, out.measurements))

        form = tff.backends.mapreduce.get_map_reduce_form_for_computation(round_fn)
        self.prepare, self.work, self.update = form.prepare, form.work, form.update
        self.bitwidths = [int(b) for b in form.secure_sum_bitwidth()]
        self._check_form(form)
        sums_type = self.work.type_signature.result[SECURE_SUMS]
        self.sizes = [int(np.prod(t.shape, dtype=np.int64)) for t in sums_type]
        self.shapes = [tuple(t.shape) for t in sums_type]

        @tff.tensorflow.computation(self.work.type_signature.result)
        def flatten(outputs):
            return _secure_sum_vector(outputs)

        state_type = self.process.initialize.type_signature.result

        @tff.federated_computation(tff.FederatedType(value_type, tff.CLIENTS), state_type)
        def encode(value, state):
            broadcast = tff.federated_broadcast(tff.federated_map(self.prepare, state))
            outputs = tff.federated_map(self.work, tff.federated_zip((value, broadcast)))
            return tff.federated_map(flatten, outputs)

        self.encode = encode

    def stacked_encoder(self, stacked_type):
        """`encode` for the grouped engine: (each client's update stacked [clients, ...], the
        aggregator's state) -> the clients' vectors [clients, length], in ONE TF call that runs
        each client's `work` in a tf.map_fn (TF's unseeded random ops draw afresh each time)."""
        work = _concrete_work(self.work)

        @tff.tensorflow.computation(stacked_type, self.prepare.type_signature.result)
        def encode_all(updates, broadcast):
            flat_broadcast = tff.structure.flatten(broadcast)
            return tf.map_fn(lambda update: work(*update, *flat_broadcast), tuple(updates),
                             fn_output_signature=tf.float64)

        return lambda updates, state: np.asarray(encode_all(updates, self.prepare(state)))

    def _check_form(self, form) -> None:
        """Only secure sums of at most `bits` bits: the masked ring carries them all."""
        sums = self.work.type_signature.result
        if len(sums[0]) or len(sums[2]) or len(sums[3]) or max(self.bitwidths) > self.bits:
            raise ValueError(f"distributed DP: unexpected aggregations in TFF's form (bitwidths {self.bitwidths})")
        if sorted(self.bitwidths)[-2] > 1:  # one field vector, the rest 0/1 counts
            raise ValueError(f"distributed DP: more than one wide secure sum (bitwidths {self.bitwidths})")

    def decode(self, state, total: np.ndarray):
        """(new aggregator state, mean update, aggregator measurements) from the sum of the
        clients' encoded vectors, as signed residues mod 2^bits (`secagg`'s modular ring)."""
        parts, start = [], 0
        for size, shape, width in zip(self.sizes, self.shapes, self.bitwidths):
            chunk = np.mod(np.rint(total[start:start + size]).astype(np.int64), 2**self.bits)
            start += size
            if width < self.bits and np.any(chunk >= 2 ** (self.bits - 1)):
                raise ValueError("distributed DP: a count's sum wrapped the masking ring")
            parts.append(chunk.astype(np.int32).reshape(shape) if shape else np.int32(chunk[0]))
        new_state, (mean, measurements) = self.update([state, [(), parts, (), ()]])
        return new_state, mean, measurements


def _secure_sum_vector(outputs) -> tf.Tensor:
    """`work`'s secure-sum inputs as one float64 vector (the masked protocol's input)."""
    return tf.concat([tf.reshape(tf.cast(x, tf.float64), [-1]) for x in outputs[SECURE_SUMS]], axis=0)


def _concrete_work(work):
    """TFF's `work` computation as a TF function of its flattened argument, which a loop body
    can call (a TFF computation called inside tf.map_fn cannot: TFF imports its graph by tensor
    names the loop's graph does not hold). Stamped by TFF 0.87's own deserializer."""
    from tensorflow_federated.python.core.impl.computation.computation_impl import ConcreteComputation
    from tensorflow_federated.python.core.impl.utils import tensorflow_utils

    specs = _tensor_specs(work.type_signature.parameter)
    proto = ConcreteComputation.get_proto(work)

    def body(*flat):
        arg = tf.nest.pack_sequence_as(specs, list(flat))
        graph = tf.compat.v1.get_default_graph()
        _, outputs = tensorflow_utils.deserialize_and_call_tf_computation(proto, arg, graph, "", tf.constant("work"))
        return _secure_sum_vector(outputs)

    return tf.compat.v1.wrap_function(body, tf.nest.flatten(specs))


def _tensor_specs(type_spec):
    """A TFF type as TensorSpecs, its named structs as OrderedDicts and the others as lists."""
    if isinstance(type_spec, tff.TensorType):
        return tf.TensorSpec(type_spec.shape, type_spec.dtype)
    elements = list(tff.structure.iter_elements(type_spec))
    if elements and all(name for name, _ in elements):
        return collections.OrderedDict((name, _tensor_specs(t)) for name, t in elements)
    return [_tensor_specs(t) for _, t in elements]


def _dimension(value_type) -> int:
    """Number of entries of the update (the rotation pads it to a power of 2)."""
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in tff.structure.flatten(value_type))


def build(initial_model_weights_fn, distributor, client_work, finalizer, secure, plan, privacy=None):
    """The masked distributed-DP process of `factory.build_learning_process`."""
    from tff_apps.privacy.secure_settings import DDP_BITS

    process = MaskedDdpProcess(initial_model_weights_fn, distributor, client_work, finalizer, secure, plan, DDP_BITS)
    if hasattr(privacy, "mechanism_details"):
        privacy.mechanism_details.update(process.split.details)
    return process


class MaskedDdpProcess(SplitRoundProcess):
    """Client phase (TFF), each client's `work` (TFF), the masked sum (`shared.secagg`, ring
    Z_{2^bits}), `update` and the server optimizer. The aggregator's state (rotation seed,
    scale, the DP query's parameters) lives in the state's aggregator slot."""

    def __init__(self, initial_model_weights_fn, distributor, client_work, finalizer, secure, plan, bits: int):
        update_type = client_work.next.type_signature.result.result.member.update
        self.split = DdpSplit(update_type, plan.section.clip_norm, plan.sampling.participants, plan.noise_multiplier, bits)
        super().__init__(initial_model_weights_fn, distributor, client_work, finalizer, aggregator=self.split.process)
        self.secure = secure

    def next(self, state, client_data, *, dropouts_after_masking=()) -> LearningProcessOutput:
        """One round in this process (every client here: the simulation of the sites' round)."""
        phase = self.run_client_phase(state, list(client_data))
        vectors = [np.asarray(v) for v in self.split.encode(phase.updates, state.aggregator)]
        result = secagg.secure_sum(vectors, self.secure.secagg_config(len(vectors)),
                                   dropouts_after_masking=dropouts_after_masking)
        return self.finish_masked(state, phase, result.total, secure_aggregation=round_metrics(result))

    def finish_masked(self, state, phase, total: np.ndarray, **extra: Any) -> LearningProcessOutput:
        """The server's part once the masked sum is known."""
        aggregator_state, mean, measurements = self.split.decode(state.aggregator, total)
        return self.finish_round(state, phase, list(mean), aggregator_state, measurements, **extra)
