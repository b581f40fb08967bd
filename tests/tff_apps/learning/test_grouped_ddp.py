"""Distributed DP on the grouped engine (`grouped_ddp`) runs the stock engine's mechanism.

TFF's distributed DP needs noise > 0 and rounds stochastically with TF's unseeded ops, so the
engines cannot agree to the bit: with the smallest noise (one integer step per client) they
agree within 1e-5 over 3 rounds, and with z = 1 a round's noise has the standard deviation of
the planned mechanism (m clients' discrete Gaussians of integer scale k, over the scale).
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest

from healthcare.model import ModelConfig, tff_model_fn
from tests.tff_apps.learning.test_grouped import CLIENTS, D, TOLERANCE, TRAIN, dp_plan, max_difference, run_engine
from tff_apps.learning import client_data, factory
from tff_apps.privacy import secure_settings
from tff_apps.privacy.dp_config import PrivacySection

CLIP = 0.05
TRAIN_DP = dataclasses.replace(TRAIN, client_optimizer="adam", client_learning_rate=0.05)


def ddp_privacy(mode: str, noise: float):
    section = PrivacySection(level="client", clipping="fixed", clip_norm=CLIP, noise_multiplier=noise,
                             secure_aggregation=mode)
    spec = secure_settings.secure_aggregation(section, TRAIN_DP, {c.name: len(c.x) for c in CLIENTS})
    return types.SimpleNamespace(plan=dp_plan(CLIP, noise), secure=spec, mechanism_details={})


@pytest.mark.parametrize("mode", ["simulated", "masked"])
def test_distributed_dp_matches_stock_with_the_least_noise(runtime, mode):
    runs = {}
    for engine in ("tff", "grouped"):
        privacy = ddp_privacy(mode, 1e-5)
        runs[engine] = run_engine(engine, TRAIN_DP, privacy=privacy, secure=privacy.secure)
        assert privacy.mechanism_details["local_noise_scale_integer"] == 1  # one integer step at each client
    (initial, stock, _, stock_metrics), (_, grouped, _, grouped_metrics) = runs["tff"], runs["grouped"]
    assert max_difference(stock, initial) > 1e-2
    assert max_difference(stock, grouped) <= TOLERANCE
    stock_ddp, grouped_ddp = (m["aggregator"]["mean_value"] for m in (stock_metrics, grouped_metrics))
    for key in ("scale_factor", "scaled_inflated_l2", "scaled_local_stddev", "actual_num_clients", "padded_dim"):
        assert grouped_ddp[key] == pytest.approx(stock_ddp[key]), key
    if mode == "masked":
        assert grouped_metrics["secure_aggregation"]["secagg_survivors"] == len(CLIENTS)


def test_distributed_dp_noise_has_the_planned_standard_deviation(runtime):
    train = dataclasses.replace(TRAIN, engine="grouped")
    model_fn = tff_model_fn(ModelConfig(kind="mlp", hidden_units=64), D, 0)
    datasets = [client_data.client_dataset(c, train, i) for i, c in enumerate(CLIENTS)]
    rounds = {}
    for noise in (1.0, 1e-5):
        privacy = ddp_privacy("simulated", noise)
        process = factory.build_learning_process(train, model_fn, privacy=privacy, secure=privacy.secure)
        assert factory.engine_of(process) == "grouped"
        new_state = process.next(process.initialize(), datasets).state
        rounds[noise] = (np.concatenate([np.ravel(w) for w in new_state.global_model_weights.trainable]),
                         privacy.mechanism_details)
    (noised, details), (reference, _) = rounds[1.0], rounds[1e-5]
    m = len(CLIENTS)
    # server SGD at rate 1: the weights move by the mean's noise, the sum of m clients' discrete
    # Gaussians of integer scale k (in units of 1/scale), over m
    expected = math.sqrt(m) * details["local_noise_scale_integer"] / details["scale_factor"] / m
    difference = noised - reference
    assert difference.size > 500 and abs(np.std(difference) / expected - 1) < 0.15
    assert abs(np.mean(difference)) < 4 * expected / np.sqrt(difference.size)
