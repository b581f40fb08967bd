"""tff_apps.sites.messages: what may leave a site in a Compute response, the fingerprints of
the computations sent to it, and TFF's messages read without TensorFlow."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from tff_apps.sites.messages import METHODS, computation_hashes, computation_pb, pb, release_refusal

Value = pb.Value


def response(value) -> bytes:
    return pb.ComputeResponse(value=value).SerializeToString()


def sequence() -> Value:
    return Value(sequence=Value.Sequence(serialized_graph_def=b"graph of a dataset"))


def struct(**elements) -> Value:
    return Value(struct=Value.Struct(element=[Value.Struct.Element(name=k, value=v) for k, v in elements.items()]))


def federated(*members) -> Value:
    return Value(federated=Value.Federated(value=list(members)))


def test_every_executor_method_is_known() -> None:
    assert METHODS == ("GetExecutor", "CreateValue", "CreateCall", "CreateStruct", "CreateSelection",
                       "Compute", "Dispose", "DisposeExecutor")


def test_a_sequence_is_refused_wherever_it_is_nested() -> None:
    assert release_refusal(response(sequence()), 0) == (
        "the result contains a sequence (a dataset); only aggregates may leave the site"
    )
    nested = struct(weights=Value(), data=federated(Value(), sequence()))
    assert release_refusal(response(nested), 0) == (
        "the result contains a sequence (a dataset) at result[data]@1; only aggregates may leave the site"
    )


def test_aggregates_pass_and_size_is_bounded() -> None:
    value = struct(total=federated(Value(computation=computation_pb.Computation())), count=Value())
    raw = response(value)
    assert release_refusal(raw, 0) is None
    assert release_refusal(raw, len(raw)) is None
    assert release_refusal(raw, len(raw) - 1) == (
        f"the result is {len(raw)} bytes, over the job's max_value_bytes = {len(raw) - 1}"
    )


def test_computation_hashes_fingerprint_every_computation_sent() -> None:
    first = computation_pb.Computation(reference=computation_pb.Reference(name="a"))
    second = computation_pb.Computation(reference=computation_pb.Reference(name="b"))
    request = pb.CreateValueRequest(value=struct(f=Value(computation=first), g=federated(Value(computation=second))))
    expected = [hashlib.sha256(c.SerializeToString(deterministic=True)).hexdigest() for c in (first, second)]
    assert computation_hashes(request.SerializeToString()) == expected
    assert expected[0] != expected[1]
    assert computation_hashes(pb.CreateValueRequest(value=Value()).SerializeToString()) == []


def test_the_site_modules_load_no_tensorflow_and_tff_still_imports_after_them() -> None:
    code = (
        "import sys\n"
        "import tff_apps.sites.serve, tff_apps.sites.channel, tff_apps.sites.commands\n"
        "from tff_apps.sites import messages\n"
        "print(sorted(m for m in ('tensorflow', 'tensorflow_federated') if m in sys.modules))\n"
        "from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub\n"
        "from tensorflow_federated.proto.v0 import executor_pb2\n"
        "print(executor_pb2 is messages.pb)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True"]
