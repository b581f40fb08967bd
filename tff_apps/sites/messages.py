"""TFF's executor-service messages, read without importing TensorFlow, and the gateway's
checks on them: what a computation's result may contain when it leaves the site, and the
fingerprint of each computation the coordinator sends.

TFF's generated protobuf modules need only protobuf, but importing them through the
package runs ``tensorflow_federated/__init__.py``, which imports TensorFlow (10-25 s and
about 1 GB in a gateway that runs no TensorFlow). When TFF is not loaded yet, the four
generated modules are loaded under their real names behind placeholder parent packages,
which are removed right after: a later ``import tensorflow_federated`` runs the real
package and finds these same modules (one descriptor pool, no duplicates).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PROTOS = "tensorflow_federated.proto.v0"
_load_lock = threading.Lock()


def _import_protos() -> tuple[types.ModuleType, types.ModuleType]:
    return importlib.import_module(f"{_PROTOS}.executor_pb2"), importlib.import_module(f"{_PROTOS}.computation_pb2")


def _load_protos() -> tuple[types.ModuleType, types.ModuleType]:
    """(executor_pb2, computation_pb2)."""
    with _load_lock:
        if "tensorflow_federated" in sys.modules or f"{_PROTOS}.executor_pb2" in sys.modules:
            return _import_protos()
        spec = importlib.util.find_spec("tensorflow_federated")
        if spec is None or spec.origin is None:
            raise RuntimeError("tensorflow_federated is not installed")
        root = Path(spec.origin).parent
        parents = {}
        for name, folder in (
            ("tensorflow_federated", root), ("tensorflow_federated.proto", root / "proto"), (_PROTOS, root / "proto" / "v0"),
        ):
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            parents[name] = sys.modules[name] = module
        try:
            return _import_protos()
        finally:
            for name, module in parents.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]


pb, computation_pb = _load_protos()
SERVICE = "tensorflow_federated.v0.ExecutorGroup"
# Every method of the service, read from its descriptor so that none is missed.
METHODS = tuple(pb.DESCRIPTOR.services_by_name["ExecutorGroup"].methods_by_name)
REQUESTS = {m.name: m.input_type.name for m in pb.DESCRIPTOR.services_by_name["ExecutorGroup"].methods}


def cardinality_request(clients: int = 0) -> Any:
    """A GetExecutorRequest; the C++ worker needs a CLIENTS cardinality, 0 will do."""
    placement = computation_pb.Placement(uri="clients")
    return pb.GetExecutorRequest(cardinalities=[pb.Cardinality(placement=placement, cardinality=clients)])


def _walk(value: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(path, kind, message) for the value and everything nested in it."""
    kind = value.WhichOneof("value")
    yield path, kind or "empty", value
    if kind == "struct":
        for i, element in enumerate(value.struct.element):
            yield from _walk(element.value, f"{path}[{element.name or i}]")
    elif kind == "federated":
        for i, member in enumerate(value.federated.value):
            yield from _walk(member, f"{path}@{i}")


def release_refusal(response: bytes, max_value_bytes: int) -> str | None:
    """Why a Compute response may not leave the site, or None if it may.

    A sequence is a dataset: it would carry the site's records out, so none may leave,
    however deeply nested. ``max_value_bytes`` (0 = no limit) bounds what a job declared
    it would take out of the site, measured on the serialized response.
    """
    if max_value_bytes and len(response) > max_value_bytes:
        return f"the result is {len(response)} bytes, over the job's max_value_bytes = {max_value_bytes}"
    message = pb.ComputeResponse.FromString(response)
    for path, kind, _ in _walk(message.value, "result"):
        if kind == "sequence":
            where = "" if path == "result" else f" at {path}"
            return f"the result contains a sequence (a dataset){where}; only aggregates may leave the site"
    return None


def computation_hashes(create_value_request: bytes) -> list[str]:
    """SHA-256 of each computation in a CreateValue request (hex), in the order found.

    Hashed over the computation message serialized deterministically, so the coordinator
    can recompute it: ``hashlib.sha256(comp.SerializeToString(deterministic=True))``.
    """
    request = pb.CreateValueRequest.FromString(create_value_request)
    return [
        hashlib.sha256(value.computation.SerializeToString(deterministic=True)).hexdigest()
        for _, kind, value in _walk(request.value, "value")
        if kind == "computation"
    ]


# Requests that name value refs, and where: the gateway refuses those naming a private ref.
_REF_FIELDS = {
    "CreateCall": (pb.CreateCallRequest, ("function_ref", "argument_ref")),
    "CreateSelection": (pb.CreateSelectionRequest, ("source_ref",)),
    "Compute": (pb.ComputeRequest, ("value_ref",)),
}


def named_refs(method: str, request: bytes) -> list[str]:
    """The ids of the value refs an executor request names (its inputs), for the methods
    that read values; Dispose and DisposeExecutor only free them."""
    if method == "CreateStruct":
        return [element.value_ref.id for element in pb.CreateStructRequest.FromString(request).element]
    if method not in _REF_FIELDS:
        return []
    kind, fields = _REF_FIELDS[method]
    message = kind.FromString(request)
    return [getattr(message, name).id for name in fields if message.HasField(name)]


_FLOATS = ("float64_list", "float32_list")


def update_vector(compute_response: bytes):
    """The one float vector in a Compute result (unplaced, or CLIENTS-placed with one
    member, as a site's round computation returns its encoded update), as float64; None if
    the result is anything else. numpy only, as the gateway runs no TensorFlow."""
    import numpy as np

    value = pb.ComputeResponse.FromString(compute_response).value
    if value.WhichOneof("value") == "federated":
        if len(value.federated.value) != 1:
            return None
        value = value.federated.value[0]
    if value.WhichOneof("value") != "array" or len(value.array.shape.dim) != 1:
        return None
    array = value.array
    kind = array.WhichOneof("kind")
    if kind in _FLOATS:
        return np.asarray(getattr(array, kind).value, dtype=np.float64)
    if array.HasField("content"):  # raw little-endian bytes, typed by the dtype enum
        dtype = {"DT_DOUBLE": "<f8", "DT_FLOAT": "<f4"}.get(type(array).DESCRIPTOR.fields_by_name["dtype"]
                                                             .enum_type.values_by_number[array.dtype].name)
        return np.frombuffer(array.content, dtype=dtype).astype(np.float64) if dtype else None
    return None
