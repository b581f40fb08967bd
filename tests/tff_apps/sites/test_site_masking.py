"""The site's side of masked secure aggregation, without TensorFlow: the protocol's messages
survive the wire encoding, the gateway reads a round's update from a worker's Compute
result, and it refuses executor calls that name a masked round's values."""

from __future__ import annotations

import numpy as np
import pytest

from shared import secagg_wire as wire
from shared.secagg import SecAggServer
from shared.secagg_client import SecAggClient
from shared.secagg_ring import SecAggConfig, quantization_error_bound, quantize
from tff_apps.sites.messages import computation_pb, named_refs, pb, update_vector


def test_the_protocol_runs_over_the_wire_encoding_with_a_dropout_after_masking():
    cfg = SecAggConfig(n_clients=3, threshold=2, bound=1.0, scale_bits=20)
    config = wire.config_from_json(wire.loads(wire.dumps({"config": wire.config_to_json(cfg)}))["config"])
    clients = [SecAggClient(i, config) for i in range(3)]
    server = SecAggServer(cfg)

    def over_wire(obj):
        return wire.loads(wire.dumps({"m": obj}))["m"]

    keys = server.collect_keys([wire.advert_from_json(over_wire(wire.advert_to_json(c.advertise_keys()))) for c in clients])
    keys = wire.key_list_from_json(over_wire(wire.key_list_to_json(keys)))
    inboxes = server.route_shares([wire.upload_from_json(over_wire(wire.upload_to_json(c.share_keys(keys)))) for c in clients])
    inputs = [np.random.default_rng(i).uniform(-1, 1, 50) for i in range(3)]
    masked = [
        wire.masked_from_json(over_wire(wire.masked_to_json(c.masked_input(x, wire.inbox_from_json(
            over_wire(wire.inbox_to_json(inboxes[c.client_id])))))), cfg)
        for c, x in zip(clients, inputs)
    ]
    request = wire.request_from_json(over_wire(wire.request_to_json(server.collect_masked_inputs(masked))))
    # client 2 vanishes after its masked input: the others' shares unmask the sum of all three
    responses = [wire.response_from_json(over_wire(wire.response_to_json(c.unmask(request)))) for c in clients[:2]]
    total = server.unmask(responses)
    assert np.max(np.abs(total - np.sum(inputs, axis=0))) <= quantization_error_bound(cfg, 3)


def test_distributed_dps_ring_is_its_field_and_the_sum_wraps_in_it():
    """Masked distributed DP: integer residues in Z_{2^20} (TFF's field), 32-bit words on the
    wire with the top 12 bits 0, the sum mod 2^20 as a signed residue, a dropout recovered."""
    from shared.secagg import secure_sum

    cfg = wire.config_from_json(wire.config_to_json(SecAggConfig(3, 2, 2.0**19, 0, 20, modular=True)))
    assert cfg.modular and cfg.word_bits == 32
    inputs = [np.random.default_rng(i).integers(0, 2**20, 400).astype(np.float64) for i in range(3)]
    result = secure_sum(inputs, cfg, dropouts_after_masking=[1])
    expected = np.mod(np.sum(inputs, axis=0), 2**20)
    np.testing.assert_array_equal(result.total, np.where(expected >= 2**19, expected - 2**20, expected))
    assert np.any(np.sum(inputs, axis=0) >= 2**20)  # it did wrap
    outside = {"sender": 0, "bits": 32, "y": wire.b64(np.array([2**20], "<u4").tobytes())}
    with pytest.raises(wire.WireError, match="outside the 20-bit ring"):
        wire.masked_from_json(outside, cfg)
    with pytest.raises(ValueError, match="integer inputs"):
        quantize(np.array([0.5]), cfg)


@pytest.mark.parametrize("message", [b"[]", b"not json", b'{"session": 1}'])
def test_a_malformed_message_is_a_wire_error(message):
    with pytest.raises(wire.WireError):
        wire.masked_from_json(wire.loads(message, "session", "masked"), SecAggConfig(2, 2, 1.0, 20))


def compute_response(values: np.ndarray, federated: bool) -> bytes:
    array = pb.Value(array={"dtype": 2, "shape": {"dim": [values.size]}, "float64_list": {"value": values.tolist()}})
    if federated:
        array = pb.Value(federated=pb.Value.Federated(
            type=computation_pb.FederatedType(placement=computation_pb.PlacementSpec(
                value=computation_pb.Placement(uri="clients"))), value=[array]))
    return pb.ComputeResponse(value=array).SerializeToString()


def test_the_gateway_reads_the_sites_update_from_the_compute_result():
    values = np.array([0.25, -1.5, 3.0])
    for federated in (False, True):
        np.testing.assert_array_equal(update_vector(compute_response(values, federated)), values)
    two = pb.Value(struct=pb.Value.Struct(element=[pb.Value.Struct.Element(value=pb.Value())]))
    assert update_vector(pb.ComputeResponse(value=two).SerializeToString()) is None


def test_executor_calls_name_the_refs_they_read():
    assert named_refs("Compute", pb.ComputeRequest(value_ref=pb.ValueRef(id="7")).SerializeToString()) == ["7"]
    call = pb.CreateCallRequest(function_ref=pb.ValueRef(id="1"), argument_ref=pb.ValueRef(id="2"))
    assert named_refs("CreateCall", call.SerializeToString()) == ["1", "2"]
    struct = pb.CreateStructRequest(element=[pb.CreateStructRequest.Element(value_ref=pb.ValueRef(id="3"))])
    assert named_refs("CreateStruct", struct.SerializeToString()) == ["3"]
    selection = pb.CreateSelectionRequest(source_ref=pb.ValueRef(id="4"), index=0)
    assert named_refs("CreateSelection", selection.SerializeToString()) == ["4"]
    assert named_refs("Dispose", pb.DisposeRequest(value_ref=[pb.ValueRef(id="4")]).SerializeToString()) == []
