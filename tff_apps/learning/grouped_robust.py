"""The grouped engine's robust and compressed aggregations: [robustness] and [communication]
reproduced on a group of clients ([clients, ...] updates), the same mathematics as the stock
aggregators the job would otherwise run.

- `robustness.aggregation = "median" / "trimmed_mean"` (stock: `split_rounds.RobustLearningProcess`,
  numpy in Python): each group returns its clients' updates stacked ([clients, ...]), the
  groups' stacks are concatenated in group order by one `federated_aggregate`
  (`concatenating_sum`; with `--workers` the partial aggregates merge in worker order), and
  the server computes the coordinate-wise statistic in the graph, in float64 as numpy does,
  over every participating client, unweighted; a client whose update was not finite counts
  with its zeroed update, as in the stock path.
  trimmed_mean drops `federation.trimmed_count(trim_fraction, n)` values per side.
- `"clip_zero"` (stock: `aggregators.clip_zero`, TFF's `_default_zeroing(_default_clipping(mean))`):
  per client, zeroing of an update whose max-norm exceeds 2 x the zeroing estimate + 1, then
  L2 clipping to the clipping estimate; both estimates are TFF's no-noise quantile estimator
  (`tfp.NoPrivacyQuantileEstimatorQuery`, 0.98 / 0.8 quantiles, geometric updates), fed each
  client's record (the max-norm before zeroing, the L2 norm before clipping) and updated at
  the server; the weight of a zeroed update is unchanged, as in TFF.
- `communication.compression` (stock: `compression.compressed_sum_factory`): each client's
  (weighted) update concatenated, rotated with the round's shared seed (TFF's randomized
  Hadamard / Fourier transform, seed fixed at `compression.ROTATION_SEED` and advanced by one
  each round, as `FixedSeedRotation` does), encoded by the same `tensor_encoding` quantizer
  and decoded before the sum, as TFF's `EncodedSumFactory` does in its accumulator; the server
  finishes the decoding, undoes the rotation and divides. Deterministic rounding and a fixed
  seed: the sum of decoded updates is stock's up to float summation order.
- `robustness.bad_client_mode = "scaled_update"`: the bad clients' updates are multiplied by
  `bad_update_scale` (the group's `scale`) before any of the above.

The aggregator slot of the state holds the estimators' states and the rotation seed in an
OrderedDict of its own (not the stock aggregator's nesting); the measurements carry the
stock names (zeroing_norm, zeroed_count, clipping_norm, clipped_count; clients and
trimmed_per_side for the statistics).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators import hadamard, rotation

from tff_apps.learning import compression

# TFF's model_update_aggregator._default_zeroing / _default_clipping
ZEROING = dict(initial_estimate=10.0, target_quantile=0.98, learning_rate=math.log(10.0))
ZEROING_MULTIPLIER, ZEROING_INCREMENT = 2.0, 1.0
CLIPPING = dict(initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2)
SEED_STRIDE = 1  # TFF's rotation: num_repeats (1) x tensors (1, the concatenated update)


@dataclass(frozen=True)
class RobustSpec:
    """What the round does besides the plain (un)weighted mean."""

    statistic: str = "mean"  # "mean", "median", "trimmed_mean"
    weighted: bool = True
    trim_fraction: float = 0.0
    clip_zero: bool = False
    compression: str = "none"
    bits: int = 8
    scaled: bool = False  # bad clients' updates scaled (the group carries `scale`)

    @property
    def stacks(self) -> bool:
        """The server needs every client's update (order statistics)."""
        return self.statistic != "mean"

    @property
    def split_rounds_metrics(self) -> bool:
        """The stock engine runs this job as `split_rounds` (its metrics have a robustness entry)."""
        return self.stacks or self.scaled


def robust_spec(train, federation) -> RobustSpec | None:
    """The job's spec, or None when the plain mean path of `grouped_aggregation` runs it."""
    from tff_apps.learning.optimizers import is_weighted

    if federation is None:
        return None
    section, communication = federation.robustness, federation.communication
    scaled = section.bad_clients > 0 and section.bad_client_mode == "scaled_update"
    if section.aggregation == "mean" and communication.compression == "none" and not scaled:
        return None
    statistic = section.aggregation if section.aggregation in ("median", "trimmed_mean") else "mean"
    return RobustSpec(
        statistic=statistic, weighted=is_weighted(train) and statistic == "mean",
        trim_fraction=float(section.trim_fraction), clip_zero=section.aggregation == "clip_zero",
        compression=communication.compression, bits=int(communication.bits), scaled=scaled,
    )


def _estimator(settings: dict) -> tfp.NoPrivacyQuantileEstimatorQuery:
    return tfp.NoPrivacyQuantileEstimatorQuery(geometric_update=True, **settings)


class RobustAggregation:
    """The client end (`client_sums`, in the group's computation) and the server end
    (`finish`) of one `RobustSpec`, for trainable weights of `specs` (tf.TensorSpecs)."""

    def __init__(self, spec: RobustSpec, specs: list[tf.TensorSpec]):
        self.spec = spec
        self.shapes = [s.shape for s in specs]
        self.sizes = [int(np.prod(s.shape, dtype=np.int64)) for s in specs]
        self.zeroing, self.clipping = _estimator(ZEROING), _estimator(CLIPPING)
        self.length = compression.quantized_length(spec.compression, sum(self.sizes))

    def initial_state(self) -> collections.OrderedDict:
        """Inside a TF computation: the estimators' states and the rotation's seed."""
        state = collections.OrderedDict()
        if self.spec.clip_zero:
            state["zeroing"] = self.zeroing.initial_global_state()
            state["clipping"] = self.clipping.initial_global_state()
        if self.spec.compression in compression.ROTATIONS:
            state["seed"] = tf.constant([compression.ROTATION_SEED, 0], tf.int64)
        if not state:  # the group computation always takes this state: a stateless one carries a flag
            state["stateless"] = tf.constant(True)
        return state

    # -- at the clients (a group) ---------------------------------------------------------------

    def client_sums(self, updates: list[tf.Tensor], weights: tf.Tensor, state, group) -> collections.OrderedDict:
        """The group's summable contribution: updates [clients, ...], weights [clients]."""
        sums = collections.OrderedDict()
        if self.spec.scaled:  # split_rounds.scale_update, before any aggregation
            updates = [u * _per_client(group["scale"], u) for u in updates]
        if self.spec.clip_zero:
            updates = self._zero_and_clip(updates, state, sums)
        if self.spec.stacks:  # concatenated over the groups, not summed (`concatenating_sum`)
            sums["value"] = updates
            return sums
        if self.spec.weighted:
            updates = [u * _per_client(weights, u) for u in updates]  # MeanFactory's value * weight
        if self.spec.compression != "none":
            sums["value"] = self._decoded_sum(updates, state)
        else:
            sums["value"] = [tf.reduce_sum(u, 0) for u in updates]
        clients = tf.cast(tf.shape(weights)[0], tf.float32)
        sums["weight"] = tf.reduce_sum(weights) if self.spec.weighted else clients
        return sums

    def _zero_and_clip(self, updates, state, sums) -> list[tf.Tensor]:
        """TFF's zero_fn then clip_fn per client (robust.py), and the estimators' records."""
        zeroing_norm = ZEROING_MULTIPLIER * state["zeroing"].current_estimate + ZEROING_INCREMENT
        max_norm = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(_rows(u)), 1) for u in updates]), 0)
        zeroed = max_norm > zeroing_norm
        updates = [tf.where(_per_client(zeroed, u) > 0, tf.zeros_like(u), u) for u in updates]
        sums["zeroing_record"] = _summed_records(self.zeroing, state["zeroing"], max_norm)
        sums["zeroed_count"] = tf.reduce_sum(tf.cast(zeroed, tf.int32))

        clip = state["clipping"].current_estimate
        squares = tf.stack([tf.square(tf.norm(_rows(u), axis=1)) for u in updates])  # _global_l2_norm
        norm = tf.sqrt(tf.reduce_sum(squares, 0))
        clipped = norm > clip
        divisor = tf.where(clipped, norm / clip, 1.0)
        updates = [tf.where(_per_client(clipped, u) > 0, u / _per_client(divisor, u), u) for u in updates]
        sums["clipping_record"] = _summed_records(self.clipping, state["clipping"], norm)
        sums["clipped_count"] = tf.reduce_sum(tf.cast(clipped, tf.int32))
        return updates

    def _encoder(self):
        return compression.quantizing_encoder(self.spec.bits, tf.TensorSpec([self.length], tf.float32))

    def _decoded_sum(self, updates, state):
        """Per client: concatenate, rotate, encode, decode before the sum (EncodedSumFactory's
        accumulator); summed over the group: the part-decoded sum."""
        vectors = tf.concat([_rows(u) for u in updates], 1)
        with compression.quiet_bitpacking_warning():
            encoder = self._encoder()
            encode_params, before_sum_params, _ = encoder.get_params(encoder.initial_state())

            def one_client(vector):
                if self.spec.compression in compression.ROTATIONS:
                    vector = _rotate(self.spec.compression, vector, state["seed"])
                encoded, _ = encoder.encode(vector, encode_params)
                return encoder.decode_before_sum(encoded, before_sum_params)

            # vectorized over the clients: every op works per row (each client's own min / max)
            parts = tf.vectorized_map(one_client, vectors)
        return tf.nest.map_structure(lambda p: tf.reduce_sum(p, 0), parts)

    # -- at the server --------------------------------------------------------------------------

    def finish(self, sums, state, clients):
        """(mean update, new state, measurements) from the summed contributions of every
        group; `clients`: the round's number of clients (int64)."""
        if self.spec.stacks:
            return self._statistic(sums["value"], clients), state, collections.OrderedDict(
                clients=tf.cast(clients, tf.int32), trimmed_per_side=self._trimmed(clients)
            )
        value = sums["value"]
        if self.spec.compression != "none":
            value = self._decode_after_sum(value, state, clients)
        update = [tf.math.divide(v, tf.cast(sums["weight"], v.dtype)) for v in value]
        new_state = collections.OrderedDict(state)
        mean = collections.OrderedDict()
        if "seed" in state:
            new_state["seed"] = state["seed"] + tf.constant([0, SEED_STRIDE], tf.int64)
        if not self.spec.clip_zero:
            return update, new_state, mean
        new_state["zeroing"] = self.zeroing.get_noised_result(sums["zeroing_record"], state["zeroing"])[1]
        new_state["clipping"] = self.clipping.get_noised_result(sums["clipping_record"], state["clipping"])[1]
        clipping = collections.OrderedDict(
            clipping=mean, clipping_norm=state["clipping"].current_estimate, clipped_count=sums["clipped_count"]
        )
        zeroing_norm = ZEROING_MULTIPLIER * state["zeroing"].current_estimate + ZEROING_INCREMENT
        return update, new_state, collections.OrderedDict(
            zeroing=clipping, zeroing_norm=zeroing_norm, zeroed_count=sums["zeroed_count"]
        )

    def _decode_after_sum(self, part_sum, state, clients) -> list[tf.Tensor]:
        with compression.quiet_bitpacking_warning():
            encoder = self._encoder()
            _, _, after_sum_params = encoder.get_params(encoder.initial_state())
            vector = encoder.decode_after_sum(part_sum, after_sum_params, tf.cast(clients, tf.int32))
        if self.spec.compression in compression.ROTATIONS:
            vector = _unrotate(self.spec.compression, vector, state["seed"])
        return self._unflatten(vector[: sum(self.sizes)])

    def _unflatten(self, vector) -> list[tf.Tensor]:
        parts = tf.split(vector, self.sizes)
        return [tf.reshape(p, shape) for p, shape in zip(parts, self.shapes)]

    def _trimmed(self, clients) -> tf.Tensor:
        """federation.trimmed_count in the graph (0 for the median)."""
        if self.spec.statistic != "trimmed_mean":
            return tf.constant(0, tf.int32)
        n = tf.cast(clients, tf.float64)
        return tf.cast(tf.floor(self.spec.trim_fraction * n + 1e-9), tf.int32)

    def _statistic(self, stacked: list[tf.Tensor], clients) -> list[tf.Tensor]:
        """split_rounds.coordinate_median / coordinate_trimmed_mean: float64, as numpy."""
        n = tf.cast(clients, tf.int32)
        # [values, clients], ranked along the last axis in float32 (casting to float64 keeps the
        # order); only the kept values are averaged in float64
        values = tf.transpose(tf.concat([_rows(s) for s in stacked], 1))
        if self.spec.statistic == "median":  # nth_element, not a sort: about 2x faster at 1,000 clients
            middle = [tf.raw_ops.NthElement(input=values, n=rank) for rank in ((n - 1) // 2, n // 2)]
            result = (tf.cast(middle[0], tf.float64) + tf.cast(middle[1], tf.float64)) / 2.0
        else:
            k = self._trimmed(clients)
            kept = tf.sort(values, axis=1)[:, k : n - k]
            result = tf.reduce_mean(tf.cast(kept, tf.float64), 1)
        return self._unflatten(tf.cast(result, tf.float32))


def concatenating_sum(values):
    """The groups' sums (CLIENTS-placed) at the SERVER: tensors whose first dimension is the
    clients' (the stacked updates) concatenated in group order, every other tensor summed.
    federated_sum needs fully defined shapes; federated_aggregate takes these."""
    value_type = values.type_signature.member
    specs = tff.types.type_to_tf_tensor_specs(value_type)

    def stacked(spec) -> bool:
        return spec.shape.rank and spec.shape[0] is None

    @tff.tensorflow.computation
    def zero():
        def empty(spec):
            if not stacked(spec):
                return tf.zeros(spec.shape, spec.dtype)
            nothing = tf.zeros([0, *spec.shape[1:]], spec.dtype)
            return tf.compat.v1.placeholder_with_default(nothing, spec.shape)  # keeps [None, ...]

        return tf.nest.map_structure(empty, specs)

    @tff.tensorflow.computation(value_type, value_type)
    def accumulate(total, value):
        return tf.nest.map_structure(
            lambda spec, a, b: tf.concat([a, b], 0) if stacked(spec) else a + b, specs, total, value
        )

    report = tff.tensorflow.computation(lambda total: total, value_type)
    return tff.federated_aggregate(values, zero(), accumulate, accumulate, report)


def _rows(u: tf.Tensor) -> tf.Tensor:
    """[clients, ...] -> [clients, values], the values' count static (the encoder's shapes are)."""
    return tf.reshape(u, [-1, u.shape[1:].num_elements()])


def _per_client(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """[clients] values shaped to broadcast against [clients, ...] `like`."""
    return tf.reshape(tf.cast(values, like.dtype), [-1] + [1] * (like.shape.rank - 1))


def _summed_records(query, query_state, norms: tf.Tensor):
    """Each client's record of the quantile estimator, summed (TFF sums them with SumFactory)."""
    params = query.derive_sample_params(query_state)
    records = tf.vectorized_map(lambda norm: query.preprocess_record(params, norm), norms)
    return tf.nest.map_structure(lambda r: tf.reduce_sum(r, 0), records)


def _rotate(kind: str, vector: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """TFF's client_transform of HadamardTransformFactory / DiscreteFourierTransformFactory
    (rotation.py, one repeat) on one client's concatenated update."""
    if kind == "hadamard":
        tensor = rotation._pad_zeros_pow2(tf.cast(vector, rotation.OUTPUT_TF_DTYPE))
        tensor *= rotation.sample_rademacher(tf.shape(tensor), tensor.dtype, seed)
        return tf.squeeze(hadamard.fast_walsh_hadamard_transform(tf.expand_dims(tensor, 0)), 0)
    tensor = tf.reshape(rotation._pad_zeros_even(tf.cast(vector, rotation.OUTPUT_TF_DTYPE)), [2, -1])
    tensor = tf.complex(real=tensor[0], imag=tensor[1])
    tensor *= rotation.sample_cis(tf.shape(tensor), seed, inverse=False)
    tensor = tf.signal.fft(tensor)
    tensor = tf.concat([tf.math.real(tensor), tf.math.imag(tensor)], axis=0)
    return tensor / tf.cast(tf.sqrt(tf.size(tensor) / 2), rotation.OUTPUT_TF_DTYPE)


def _unrotate(kind: str, tensor: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """TFF's server_transform (the inverse rotation of the summed vector)."""
    if kind == "hadamard":
        tensor = tf.squeeze(hadamard.fast_walsh_hadamard_transform(tf.expand_dims(tensor, 0)), 0)
        return tensor * rotation.sample_rademacher(tf.shape(tensor), tensor.dtype, seed)
    tensor *= tf.sqrt(tf.size(tensor, out_type=tensor.dtype) / 2.0)
    tensor = tf.reshape(tensor, [2, -1])
    tensor = tf.complex(real=tensor[0], imag=tensor[1])
    tensor = tf.signal.ifft(tensor)
    tensor *= rotation.sample_cis(tf.shape(tensor), seed, inverse=True)
    return tf.concat([tf.math.real(tensor), tf.math.imag(tensor)], axis=0)
