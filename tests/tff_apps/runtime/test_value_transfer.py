"""`value_transfer.fill_value` writes the message TFF's own serializer makes, and the
in-place executor carries a computation's argument to the worker and back."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization

from tff_apps.runtime.value_transfer import fill_value

GROUP = tff.types.StructWithPythonType(
    [("x", tff.TensorType(np.float32, [None, 2, 3])), ("mask", tff.TensorType(np.float32, [None, 2]))],
    collections.OrderedDict,
)


def group(clients: int, seed: int) -> collections.OrderedDict:
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        x=rng.normal(size=(clients, 2, 3)).astype(np.float32), mask=np.ones((clients, 2), np.float32)
    )


def filled(value, type_spec):
    target = executor_pb2.Value()
    fill_value(target, value, type_spec)
    return target


CASES = [
    ("clients' groups", [group(3, 0), group(1, 1), group(0, 2)], tff.FederatedType(GROUP, tff.CLIENTS)),
    ("server value", np.arange(6, dtype=np.int64).reshape(2, 3), tff.FederatedType(tff.TensorType(np.int64, [2, 3]), tff.SERVER)),
    ("unnamed struct with scalars", (np.float32(2.5), np.int32(3), True), tff.StructType([np.float32, np.int32, np.bool_])),
    ("empty struct", (), tff.StructType([])),
    ("nested", collections.OrderedDict(a=(np.zeros([0], np.float32),), b=np.ones([2, 2], np.float64)),
     tff.StructType([("a", tff.StructType([tff.TensorType(np.float32, [None])])), ("b", tff.TensorType(np.float64, [2, 2]))])),
    ("python list for a vector", [1.0, 2.0], tff.TensorType(np.float32, [2])),
    ("strings", np.array([b"a", b"bc"], object), tff.TensorType(np.str_, [2])),
]


@pytest.mark.parametrize("name, value, type_spec", CASES, ids=[c[0] for c in CASES])
def test_fill_value_makes_the_message_tffs_serializer_makes(name, value, type_spec):
    expected, _ = value_serialization.serialize_value(value, type_spec)
    assert filled(value, type_spec) == expected


def test_fill_value_refuses_what_tffs_serializer_refuses():
    with pytest.raises(TypeError, match="struct"):
        filled((np.float32(1.0),), tff.StructType([np.float32, np.float32]))
    with pytest.raises(TypeError):  # float64 rows for a float32 type: TFF's own check, not a silent cast
        filled(np.zeros([2], np.float64), tff.TensorType(np.float32, [2]))
    with pytest.raises(TypeError):  # a shape the type does not admit
        filled(np.zeros([3], np.float32), tff.TensorType(np.float32, [2]))


def test_a_computation_gets_its_argument_through_the_in_place_executor(runtime):
    @tff.tensorflow.computation(GROUP)
    def total(g):
        return g["x"] * g["mask"][..., None]

    @tff.federated_computation(tff.FederatedType(GROUP, tff.CLIENTS))
    def masked(groups):
        return tff.federated_map(total, groups)

    groups = [group(3, 0), group(2, 1)]
    groups[1]["mask"][1] = 0.0
    out = masked(groups)
    np.testing.assert_array_equal(out[0], groups[0]["x"])
    np.testing.assert_array_equal(out[1], groups[1]["x"] * groups[1]["mask"][..., None])
