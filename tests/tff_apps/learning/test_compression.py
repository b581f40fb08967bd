"""Tests for [communication] compression and robustness.aggregation = "clip_zero":
bytes from TFF's encoder against a hand count, an engine run that sends fewer bytes and
ends close to the uncompressed model, the composition refusals, and clip_zero zeroing a
huge update."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow_federated as tff

from healthcare.model import ModelConfig, build_keras_model, tff_model_fn
from shared.errors import UserError
from tff_apps.learning import compression
from tff_apps.learning import federation
from tff_apps.learning import aggregators
from tff_apps.learning import factory
from tff_apps.program import round_summary
from tff_apps.learning import client_data
from tff_apps.program import round_loop
from tff_apps.program import reporting
from tff_apps.config import EvaluateSection, ExportSection, JobConfig, JobSection, PreprocessSection, TrainSection
from tff_apps.learning.federation import CommunicationSection, Federation, RobustnessSection
from tff_apps.privacy.dp_config import PrivacySection

D = 30  # healthcare's default model: 30 kernel weights + 1 bias = 31 float32
TRAIN = TrainSection(
    algorithm="fedavg", rounds=3, batch_size=16, local_epochs=1, client_learning_rate=0.1,
    eval_every=100, checkpoint_every=0,
)
PACKED_BITS = 28  # tensor_encoding packs 28 bits into each int32 (varint-safe)


def hand_count(n_values: int, bits: int) -> int:
    """int32 words of the bit-packed levels, plus the float32 min and max."""
    return 4 * math.ceil(n_values * bits / PACKED_BITS) + 2 * 4


def communicating(compression_mode: str, bits: int, aggregation: str = "mean") -> Federation:
    return Federation(
        communication=CommunicationSection(compression=compression_mode, bits=bits),
        robustness=RobustnessSection(aggregation=aggregation),
    )


@pytest.mark.parametrize(
    "mode, bits, n_values, rotated_length",
    [("quantize", 4, 31, 31), ("quantize", 8, 1000, 1000), ("hadamard", 3, 31, 32), ("dft", 5, 31, 32), ("hadamard", 8, 33, 64)],
)
def test_encoder_bytes_match_a_hand_count(mode, bits, n_values, rotated_length):
    sent = compression.upload_bytes(CommunicationSection(mode, bits), n_values)
    assert sent["up"] == hand_count(rotated_length, bits)
    assert sent["down"] == (compression.ROTATION_SEED_BYTES if mode != "quantize" else 0)


def test_bytes_per_client_of_healthcares_model():
    weights = tff.learning.models.ModelWeights(
        trainable=[np.zeros((D, 1), np.float32), np.zeros(1, np.float32)], non_trainable=[]
    )
    plain = round_summary.bytes_per_client(weights)
    assert plain == {"bytes_up": 31 * 4 + 4, "bytes_down": 31 * 4}
    quantized = round_summary.bytes_per_client(weights, communicating("quantize", 4))
    assert quantized == {"bytes_up": 20 + 8 + 4, "bytes_down": 124, "bytes_up_uncompressed": 128}
    # clip_zero: two bounds down (float32), two quantile records (2 x float32) and flags (int32) up
    robust = round_summary.bytes_per_client(weights, communicating("quantize", 4, "clip_zero"))
    assert robust == {"bytes_up": 32 + 24, "bytes_down": 124 + 8, "bytes_up_uncompressed": 128 + 24}


def make_clients(n_clients: int = 3, rows: int = 40, seed: int = 0) -> list[client_data.ClientTrainData]:
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(D)
    clients = []
    for i in range(n_clients):
        x = rng.standard_normal((rows, D)).astype(np.float32) + 0.3 * i
        y = (x @ truth + 0.5 * rng.standard_normal(rows) > 0).astype(np.float32).reshape(-1, 1)
        clients.append(client_data.ClientTrainData(f"site{i}", x, y))
    return clients


def run(tmp_path, name: str, fed: Federation, clients=None, train: TrainSection = TRAIN):
    process = factory.build_learning_process(train, tff_model_fn(ModelConfig(), D, 0), federation=fed)
    run_dir = tmp_path / name
    run_dir.mkdir()
    result = round_loop.run_rounds(
        process, clients or make_clients(), train, 0, run_dir, lambda w: {}, "loss", federation=fed
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, records


def flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(w) for w in weights.trainable])


def test_compressed_run_sends_a_quarter_and_ends_near_the_plain_model(runtime, tmp_path):
    initial = np.concatenate([np.ravel(w) for w in build_keras_model(ModelConfig(), D, 0).get_weights()])
    plain, plain_records = run(tmp_path, "plain", Federation())
    packed, packed_records = run(tmp_path, "hadamard4", communicating("hadamard", 4))
    for before, after in zip(plain_records, packed_records):
        assert before["bytes_up"] == 3 * 128
        assert after["bytes_up"] == 3 * (hand_count(32, 4) + 4) == before["bytes_up"] / 4
        assert after["bytes_up_uncompressed"] == before["bytes_up"]
        assert after["bytes_down"] == before["bytes_down"] + 3 * compression.ROTATION_SEED_BYTES
    moved = np.linalg.norm(flat(plain.weights) - initial)
    gap = np.linalg.norm(flat(packed.weights) - flat(plain.weights))
    assert moved > 0.2, moved  # training did move the model
    assert gap < 0.2 * moved, (gap, moved)
    totals = round_summary.communication(packed.history, communicating("hadamard", 4))
    assert totals["upload_ratio"] == 4.0 and totals["bytes_up_uncompressed"] == 3 * 3 * 128


def test_same_state_and_input_same_compressed_round(runtime):
    """TFF seeds its rotation from the clock and rounds with unseeded noise; here the seed is
    fixed and the rounding deterministic, so one config gives one model."""
    train = dataclasses.replace(TRAIN, rounds=1)
    process = factory.build_learning_process(train, tff_model_fn(ModelConfig(), D, 0), federation=communicating("hadamard", 3))
    datasets = [client_data.client_dataset(c, train, seed=i) for i, c in enumerate(make_clients())]
    first, second = (process.next(process.initialize(), datasets) for _ in range(2))
    np.testing.assert_array_equal(flat(process.get_model_weights(first.state)), flat(process.get_model_weights(second.state)))


def test_clip_zero_zeroes_a_huge_update_and_clips_a_large_one(runtime):
    """Three clients of weight 1 through the job's aggregator: a huge update (zeroed: its
    max-norm is over TFF's initial zeroing bound 2 x 10 + 1), one of L2 norm 5 (clipped to
    TFF's initial clipping norm 1) and one of norm 0.5 (kept)."""
    value_type = tff.TensorType(np.float32, [D + 1])
    aggregator = aggregators.job_aggregator(TRAIN, communicating("none", 8, "clip_zero"))
    process = aggregator.create(value_type, tff.TensorType(np.float32))
    direction = np.random.default_rng(0).standard_normal(D + 1).astype(np.float32)
    direction /= np.linalg.norm(direction)
    huge, large, small = 1e6 * direction, 5.0 * direction[::-1], 0.5 * direction
    output = process.next(process.initialize(), [huge, large, small], [1.0, 1.0, 1.0])
    assert output.measurements["zeroed_count"] == 1
    assert output.measurements["zeroing"]["clipped_count"] == 1
    np.testing.assert_allclose(output.result, (large / 5.0 + small + 0.0) / 3, atol=1e-6)
    plain = aggregators.job_aggregator(TRAIN).create(value_type, tff.TensorType(np.float32))
    assert np.linalg.norm(plain.next(plain.initialize(), [huge, large, small], [1.0, 1.0, 1.0]).result) > 1e5


def job(privacy: PrivacySection = PrivacySection(), **sections) -> JobConfig:
    return JobConfig(
        job=JobSection(app="healthcare"), data=None, model=ModelConfig(), train=TrainSection(),
        preprocess=PreprocessSection(), evaluate=EvaluateSection(), export=ExportSection(), privacy=privacy,
        **sections,
    )


ROWS = {"a": 100, "b": 120, "c": 90}
QUANTIZE = CommunicationSection(compression="quantize", bits=4)
CLIP_ZERO = RobustnessSection(aggregation="clip_zero")


@pytest.mark.parametrize(
    "privacy, sections, words",
    [
        (PrivacySection(level="client"), {"communication": QUANTIZE}, ["communication.compression", "privacy.level"]),
        (PrivacySection(secure_aggregation="simulated"), {"communication": QUANTIZE},
         ["communication.compression", "privacy.secure_aggregation", "secure_scale_bits"]),
        (PrivacySection(secure_aggregation="masked"), {"communication": QUANTIZE},
         ["communication.compression", "privacy.secure_aggregation"]),
        (PrivacySection(level="client"), {"robustness": CLIP_ZERO}, ["robustness.aggregation", "privacy.level"]),
        (PrivacySection(secure_aggregation="masked"), {"robustness": CLIP_ZERO},
         ["robustness.aggregation", "privacy.secure_aggregation"]),
        (PrivacySection(), {"communication": CommunicationSection(bits=4)}, ["communication.bits", "compression"]),
    ],
)
def test_refusals_name_the_keys(privacy, sections, words):
    with pytest.raises(UserError) as refused:
        federation.check(job(privacy, **sections), ROWS)
    message = str(refused.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "privacy, sections",
    [
        (PrivacySection(), {"communication": QUANTIZE, "robustness": CLIP_ZERO}),
        (PrivacySection(level="record"), {"communication": QUANTIZE, "robustness": CLIP_ZERO}),
    ],
)
def test_compositions_that_run_pass_the_checks(privacy, sections):
    federation.check(job(privacy, **sections), ROWS)


def test_summary_and_report_name_the_compression_and_its_ratio():
    history = [{"bytes_up": 140, "bytes_down": 620, "bytes_up_uncompressed": 640}] * 2
    totals = round_summary.communication(history, communicating("quantize", 3))
    assert totals == {
        "bytes_up": 280, "bytes_down": 1240, "compression": "quantize", "bits": 3,
        "bytes_up_uncompressed": 1280, "upload_ratio": 4.571,
    }
    lines = reporting.summary_lines({"communication": totals})
    assert "Compression: quantize, 3 bits: upload 4.571x smaller than float32 (1,280 bytes)" in lines
    assert round_summary.communication(history) == {"bytes_up": 280, "bytes_down": 1240}
