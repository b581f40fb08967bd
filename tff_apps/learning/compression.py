"""Update compression ([communication]): TFF's quantizing sum, optionally after TFF's rotation,
and the bytes it puts on the wire.

The factory is TFF's `EncodedSumFactory` over the `tensor_encoding` uniform quantization
encoder (flatten, quantize to `bits` between the update's own min and max, bit-pack into
int32 words of 28 bits), applied to the whole update concatenated into one vector
(`tff.aggregators.concat_factory`): TFF's stock `compression_aggregator` quantizes only
tensors over 20,000 elements and sends a min/max pair per tensor, which would leave a small
model (healthcare's 31 weights) uncompressed. "hadamard" / "dft" put TFF's randomized
rotation (`HadamardTransformFactory`, `DiscreteFourierTransformFactory`) between the
concatenation and the quantization: it spreads an update's energy over all coordinates, so
the min-max range is narrower than one large coordinate would make it (Suresh et al. 2017).

Rounding is deterministic (nearest level): TFF's stochastic rounding draws from an unseeded
`tf.random.uniform` inside the computation, which would make two runs of one config differ.
The rotation's signs come from a fixed seed advanced every round (TFF draws it from the
clock); they need independence across rounds, not secrecy.

The grouped engine (`grouped_robust`) runs the same encoder and rotations per client slice of
its group, with this seed and rounding, so both engines compute the same decoded sum.

`upload_bytes` measures one client's message by running the same encoder on a vector of the
update's length: the sizes depend on the length and bits only, not on the values.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import rotation
from tensorflow_model_optimization.python.core.internal import tensor_encoding as te

ROTATIONS = {
    "hadamard": rotation.HadamardTransformFactory,
    "dft": rotation.DiscreteFourierTransformFactory,
}
ROTATION_SEED = 0
# the rotation's seed (int64[2]), broadcast to the clients every round
ROTATION_SEED_BYTES = int(np.prod(rotation.SEED_TFF_TYPE.shape)) * np.dtype(rotation.SEED_TFF_TYPE.dtype).itemsize


@contextlib.contextmanager
def quiet_bitpacking_warning():
    """tensor_encoding's bit-packing logs a memory warning on the root logger every time an
    encoder is traced (when a process is built, not per round); it says nothing actionable here."""

    def keep(record: logging.LogRecord) -> bool:
        return "different bitpacking method" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class QuietEncodedSumFactory(tff.aggregators.EncodedSumFactory):
    """TFF's EncodedSumFactory, built without the bit-packing warning."""

    def create(self, value_type) -> tff.templates.AggregationProcess:
        with quiet_bitpacking_warning():
            return super().create(value_type)


def is_compressed(section) -> bool:
    """`section`: the job's [communication] (`federation.CommunicationSection`) or None."""
    return section is not None and section.compression != "none"


def quantizing_encoder(bits: int, spec: tf.TensorSpec) -> te.core.GatherEncoder:
    """The encoder every client runs on its (concatenated, maybe rotated) update."""
    return te.encoders.as_gather_encoder(te.encoders.uniform_quantization(bits, stochastic=False), spec)


def compressed_sum_factory(section) -> tff.aggregators.UnweightedAggregationFactory | None:
    """The value sum of the job's mean when [communication] compresses (else None): concatenate,
    (rotate), quantize."""
    if not is_compressed(section):
        return None
    factory = QuietEncodedSumFactory(functools.partial(quantizing_encoder, int(section.bits)))
    if section.compression in ROTATIONS:
        factory = FixedSeedRotation(ROTATIONS[section.compression](factory), ROTATION_SEED)
    return tff.aggregators.concat_factory(factory)


class FixedSeedRotation(tff.aggregators.UnweightedAggregationFactory):
    """TFF's rotation factory with its seed fixed (TFF's `_init_global_seed` reads the clock).
    The state is (inner state, int64[2] seed); TFF advances the seed's counter every round."""

    def __init__(self, rotation_factory, seed: int):
        self._rotation = rotation_factory
        self._seed = int(seed)

    def create(self, value_type) -> tff.templates.AggregationProcess:
        process = self._rotation.create(value_type)
        state_type = process.initialize.type_signature.result.member
        seed = self._seed

        @tff.tensorflow.computation(state_type)
        def with_fixed_seed(state):
            return state[0], tf.constant([seed, 0], dtype=tf.int64)

        @tff.federated_computation
        def initialize():
            return tff.federated_map(with_fixed_seed, process.initialize())

        return tff.templates.AggregationProcess(initialize, process.next)


def quantized_length(compression: str, n_values: int) -> int:
    """Length of the vector the encoder sees: the rotations pad with zeros (TFF's Hadamard to a
    power of 2, its Fourier transform to an even length)."""
    if compression == "hadamard":
        return 2 ** math.ceil(math.log2(max(1, n_values)))
    if compression == "dft":
        return n_values + n_values % 2
    return n_values


def _nbytes(structure) -> int:
    return int(sum(np.asarray(t).nbytes for t in tf.nest.flatten(structure)))


def upload_bytes(section, n_values: int) -> dict[str, int]:
    """One client's bytes for an `n_values` float32 update compressed as `section` says.

    "up": what TFF's `EncodedSumFactory` has each client send (`encoded._encoded_next_fn`:
    the encoded tensors, i.e. the bit-packed int32 words and the float32 min/max, plus the
    decode-before-sum parameters and state-update tensors it echoes back, empty for this
    encoder). "down": the encode and decode-before-sum parameters it broadcasts (empty: the
    quantization's constants live in the graph) and, with a rotation, the round's seed.
    """
    spec = tf.TensorSpec([quantized_length(section.compression, n_values)], tf.float32)
    with quiet_bitpacking_warning():
        encoder = quantizing_encoder(int(section.bits), spec)
        encode_params, decode_before_sum_params, _ = encoder.get_params(encoder.initial_state())
        encoded, state_update = encoder.encode(tf.zeros(spec.shape, spec.dtype), encode_params)
    up = _nbytes(encoded) + _nbytes(decode_before_sum_params) + _nbytes(state_update)
    down = _nbytes(encode_params) + _nbytes(decode_before_sum_params)
    if section.compression in ROTATIONS:
        down += ROTATION_SEED_BYTES
    return {"up": up, "down": down}
