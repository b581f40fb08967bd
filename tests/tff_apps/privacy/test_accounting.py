"""Tests for tff_apps.privacy: ε from the mechanism as run, against independent dp_accounting
computations written out from the raw numbers, calibration, budget, and the DP aggregators
running in our learning process."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from healthcare.model import ModelConfig, tff_model_fn
from shared.errors import UserError
from tff_apps.privacy.statement import privacy_statement
from tff_apps.privacy import dp_config
from tff_apps.privacy import calibration
from tff_apps.privacy import dp_events
from tff_apps.privacy import accounting
from tff_apps.learning import dp_aggregators
from tff_apps.learning import factory
from tff_apps.config import TrainSection, build_section
from tff_apps.privacy.dp_config import ClientSampling, PrivacySection, RecordSampling
from tff_apps.learning.client_data import ClientTrainData, client_dataset

DELTA = 1e-5
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE

G = dp_accounting.GaussianDpEvent
WOR = dp_accounting.SampledWithoutReplacementDpEvent
POISSON = dp_accounting.PoissonSampledDpEvent
SELF = dp_accounting.SelfComposedDpEvent


def rdp_epsilon(event, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
    return (
        rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(DELTA)
    )


def pld_epsilon(event) -> float:
    return pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(DELTA)


# -- ε of the three mechanisms equals an independent computation -----------------------------------

# 10 clients, 4 sampled per round, z = 1.3, 30 rounds. Replacing one client's data moves the
# sum of C-clipped updates by up to 2C while the noise is z*C: noise / sensitivity = z / 2.
N_CLIENTS, PER_ROUND, Z, ROUNDS = 10, 4, 1.3, 30
INDEPENDENT_CLIENT_EPS = rdp_epsilon(SELF(WOR(10, 4, G(1.3 / 2)), 30), REPLACE_ONE)


def test_client_level_fixed_clip_epsilon():
    sampling = ClientSampling(N_CLIENTS, PER_ROUND)
    spend = dp_events.dp_event(Z, sampling, ROUNDS, clipping="fixed")
    assert accounting.epsilon(spend, DELTA, "rdp") == pytest.approx(INDEPENDENT_CLIENT_EPS, rel=0.01)
    # amplification is real, and the z/2 matters
    assert INDEPENDENT_CLIENT_EPS < rdp_epsilon(SELF(G(1.3 / 2), 30))
    assert INDEPENDENT_CLIENT_EPS > rdp_epsilon(SELF(WOR(10, 4, G(1.3)), 30), REPLACE_ONE)


def test_client_level_adaptive_clip_epsilon_is_bounded_by_the_total_noise_multiplier():
    sampling = ClientSampling(N_CLIENTS, PER_ROUND)
    spend = dp_events.dp_event(Z, sampling, ROUNDS, clipping="adaptive")
    # the round event holds TFF's two Gaussians (value and clipped count), noisier each ...
    value, count = spend.event.event.events
    assert value.noise_multiplier > Z / 2 and count.noise_multiplier > Z / 2
    # ... whose combined effect is exactly the total z
    assert (value.noise_multiplier**-2 + count.noise_multiplier**-2) ** -0.5 == pytest.approx(
        Z / 2, rel=1e-12
    )
    assert accounting.epsilon(spend, DELTA, "rdp") == pytest.approx(INDEPENDENT_CLIENT_EPS, rel=0.01)


def test_record_level_dp_sgd_epsilon_is_max_over_clients():
    # 120 and 45 rows, batch 16, one local epoch: ceil(n/16) Poisson steps with q = 16/n per round.
    train = TrainSection(batch_size=16, local_epochs=1, rounds=10)
    sampling = dp_config.record_sampling(train, {"a": 120, "b": 45})
    spend = dp_events.dp_event(1.1, sampling, train.rounds)
    eps_a = rdp_epsilon(SELF(POISSON(16 / 120, G(1.1)), 8 * 10))
    eps_b = rdp_epsilon(SELF(POISSON(16 / 45, G(1.1)), 3 * 10))
    assert accounting.epsilon(spend, DELTA, "rdp") == pytest.approx(max(eps_a, eps_b), rel=0.01)
    # PLD, with more noise (PLDs of small noise are slow to build)
    pld_a = pld_epsilon(SELF(POISSON(16 / 120, G(2.0)), 80))
    pld_b = pld_epsilon(SELF(POISSON(16 / 45, G(2.0)), 30))
    noisier = dp_events.dp_event(2.0, sampling, train.rounds)
    assert accounting.epsilon(noisier, DELTA, "pld") == pytest.approx(max(pld_a, pld_b), rel=0.01)
    assert accounting.Composition("rdp").add(spend).epsilon_by_client(DELTA) == pytest.approx(
        {"a": eps_a, "b": eps_b}
    )


def test_pld_refused_for_fixed_size_client_sampling_and_exact_without_sampling():
    section = PrivacySection(level="client", noise_multiplier=4.0, accountant="pld")
    train = TrainSection(rounds=5, clients_per_round=3)
    with pytest.raises(UserError, match=r"privacy\.accountant = 'pld'.*clients_per_round"):
        calibration.plan(section, train, dp_config.client_sampling(train, 10))
    every = dp_config.client_sampling(dataclasses.replace(train, clients_per_round=0), 10)
    plan = calibration.plan(section, dataclasses.replace(train, clients_per_round=0), every)
    assert plan.epsilon() == pytest.approx(pld_epsilon(SELF(G(2.0), 5)), rel=1e-6)
    assert plan.epsilon() <= accounting.epsilon(plan.spend(), DELTA, "rdp")  # PLD is the tighter one


def test_zero_noise_is_infinite_epsilon():
    assert accounting.epsilon(dp_events.dp_event(0.0, ClientSampling(10, 4), 3), DELTA) == math.inf
    assert accounting.epsilon(dp_events.dp_event(0.0, ClientSampling(10, 0), 3), DELTA, "pld") == math.inf


# -- calibration and budget ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling, target",
    [
        (ClientSampling(20, 5), 4.0),
        (RecordSampling({"a": 300, "b": 90}, 16, {"a": 19, "b": 6}), 3.0),
    ],
    ids=["client", "record"],
)
def test_calibrated_noise_is_the_smallest_within_target(sampling, target):
    rounds = 15
    z = calibration.calibrate_noise_multiplier(target, DELTA, rounds, sampling)
    assert accounting.epsilon(dp_events.dp_event(z, sampling, rounds), DELTA) <= target
    assert accounting.epsilon(dp_events.dp_event(0.98 * z, sampling, rounds), DELTA) > target


def test_unreachable_target_is_refused():
    with pytest.raises(UserError, match=r"privacy\.target_epsilon = 0\.0001 is unreachable"):
        calibration.calibrate_noise_multiplier(1e-4, DELTA, 10, ClientSampling(4, 0))
    section = PrivacySection(level="client", target_epsilon=1e-4)
    with pytest.raises(UserError, match=r"privacy\.target_epsilon"):
        calibration.plan(section, TrainSection(rounds=10), ClientSampling(4, 0))


def test_epsilon_after_round_and_rounds_within_budget_agree():
    sampling = ClientSampling(12, 4)
    z, rounds = 1.1, 40
    eps = accounting.epsilon_after_round(z, DELTA, rounds, sampling)
    assert len(eps) == rounds and all(b > a for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(accounting.epsilon(dp_events.dp_event(z, sampling, rounds), DELTA), rel=1e-9)
    for target in (eps[0] * 0.5, eps[0], (eps[9] + eps[10]) / 2, eps[-1] * 2):
        r = calibration.rounds_within_budget(target, z, DELTA, rounds, sampling)
        assert r == sum(e <= target for e in eps)  # training stops before the round that would exceed
    budgets = [calibration.rounds_within_budget(t, z, DELTA, rounds, sampling) for t in np.linspace(1, 30, 12)]
    assert budgets == sorted(budgets)


def test_plan_resolves_noise_or_rounds():
    train = TrainSection(rounds=40, clients_per_round=4)
    sampling = dp_config.client_sampling(train, 12)
    eps = accounting.epsilon_after_round(1.1, DELTA, 40, sampling)
    stopped = calibration.plan(
        PrivacySection(level="client", noise_multiplier=1.1, target_epsilon=eps[19]), train, sampling
    )
    assert (stopped.rounds, stopped.calibrated) == (20, False)
    every = dataclasses.replace(train, clients_per_round=0)  # (calibration itself: test above)
    calibrated = calibration.plan(
        PrivacySection(level="client", target_epsilon=3.0), every, dp_config.client_sampling(every, 12)
    )
    assert calibrated.calibrated and calibrated.rounds == 40
    assert calibrated.epsilon() <= 3.0 < calibrated.epsilon_after_round()[-1] * 1.01
    with pytest.raises(UserError, match=r"privacy\.noise_multiplier > 0 or privacy\.target_epsilon > 0"):
        calibration.plan(PrivacySection(level="client"), train, sampling)
    with pytest.raises(UserError, match=r"train\.algorithm = 'fedprox'"):
        record = dp_config.record_sampling(train, {"a": 50})
        calibration.plan(
            PrivacySection(level="record", noise_multiplier=1.0),
            dataclasses.replace(train, algorithm="fedprox"),
            record,
        )
    assert calibration.plan(PrivacySection(), train, sampling) is None


def test_section_validates_through_the_config_schema():
    section = build_section("privacy", PrivacySection, {"level": "record", "clip_norm": 0.5, "delta": 1e-6})
    assert section.level == "record" and section.clip_norm == 0.5
    for bad in ({"level": "user"}, {"clip_norm": 0}, {"delta": 0.5}, {"accountant": "moments"}):
        with pytest.raises(UserError, match=r"privacy\."):
            build_section("privacy", PrivacySection, bad)


def test_spend_serialization_round_trips():
    client = dp_events.dp_event(1.3, ClientSampling(10, 4), 7, clipping="adaptive")
    record = dp_events.dp_event(1.1, RecordSampling({"a": 50, "b": 20}, 8, {"a": 7, "b": 3}), 4)
    for spend in (client, record):
        assert dp_events.spend_from_json(dp_events.spend_to_json(spend)) == spend
    with pytest.raises(ValueError, match="unknown dp event type"):
        dp_events.event_from_json({"type": "os.system"})


def test_mixed_levels_compose_tighter_than_adding():
    client = dp_events.dp_event(2.0, ClientSampling(10, 0), 5)
    record = dp_events.dp_event(1.0, RecordSampling({"a": 64}, 8, {"a": 8}), 5)
    both = accounting.composed_epsilon([client, record], DELTA)
    alone = [accounting.epsilon(client, DELTA), accounting.epsilon(record, DELTA)]
    assert max(alone) < both < sum(alone)


# -- the DP aggregators in our learning process ---------------------------------------------------------

D = 3
SEED = 2


def make_client(name: str, n: int, shift: float, seed: int) -> ClientTrainData:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, D)) + shift).astype(np.float32)
    y = (rng.random((n, 1)) < 1 / (1 + np.exp(-(x @ np.array([[1.0], [-1.0], [0.5]]))))).astype(np.float32)
    return ClientTrainData(name, x, y)


CLIENTS = [make_client("a", 8, 1.0, 1), make_client("b", 12, -1.0, 2), make_client("c", 6, 0.0, 3)]
TRAIN = TrainSection(
    algorithm="fedavg",
    batch_size=4,
    local_epochs=1,
    client_learning_rate=0.5,
    server_optimizer="sgd",
    server_learning_rate=1.0,
)


def flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in weights.trainable])


def datasets(clients=CLIENTS):
    return [client_dataset(c, TRAIN, seed=i) for i, c in enumerate(clients)]


def one_round(process, data):
    state = process.initialize()
    output = process.next(state, data)
    return flat(process.get_model_weights(state)), flat(process.get_model_weights(output.state)), output


def test_fixed_clip_bounds_the_global_update_and_equals_the_mean_of_clipped_updates(runtime):
    model_fn = tff_model_fn(ModelConfig(kind="logistic"), D, SEED)
    plain = factory.build_learning_process(
        dataclasses.replace(TRAIN, algorithm="fedavg_unweighted"), model_fn
    )
    client_updates = []
    for i, c in enumerate(CLIENTS):  # each client's own unclipped update, one at a time
        w0, w1, _ = one_round(plain, [client_dataset(c, TRAIN, seed=i)])
        client_updates.append(w0 - w1)
    clip = 0.05
    assert min(np.linalg.norm(u) for u in client_updates) > 2 * clip  # every client is clipped
    section = PrivacySection(level="client", clipping="fixed", clip_norm=clip)
    dp = factory.build_learning_process(
        TRAIN, model_fn, dp_aggregators.client_dp_aggregator(section, 3, noise_multiplier=0.0)
    )
    w0, w1, output = one_round(dp, datasets())
    step = w0 - w1
    assert np.linalg.norm(step) <= clip * (1 + 1e-5)
    expected = np.mean([u * min(1.0, clip / np.linalg.norm(u)) for u in client_updates], axis=0)
    np.testing.assert_allclose(step, expected, rtol=0, atol=1e-6)  # uniform weights, fixed denominator 3
    # the event TFF reports for the round is the one we account
    assert dp_events.mechanism_event_from_state(output.state) == dp_events.client_mechanism_event("fixed", 0.0, 3)


def test_adaptive_clip_round_runs_and_reports_the_total_noise(runtime):
    model_fn = tff_model_fn(ModelConfig(kind="logistic"), D, SEED)
    z, m = 1.0, 3  # TFF's default clipped-count stddev (0.05*m) could not reach z = 1 with 3 clients
    section = PrivacySection(level="client", clipping="adaptive", clip_norm=0.05, target_quantile=0.5)
    process = factory.build_learning_process(
        TRAIN, model_fn, dp_aggregators.client_dp_aggregator(section, m, noise_multiplier=z)
    )
    w0, w1, output = one_round(process, datasets())
    assert np.all(np.isfinite(w1)) and np.any(w1 != w0)
    reported = dp_events.mechanism_event_from_state(output.state)
    ours = dp_events.client_mechanism_event("adaptive", z, m)
    assert [e.noise_multiplier for e in reported.events] == pytest.approx(
        [e.noise_multiplier for e in ours.events], rel=1e-6
    )
    effective = sum(e.noise_multiplier**-2 for e in reported.events) ** -0.5
    assert effective == pytest.approx(z, rel=1e-6)
    # the clip adapted (its direction is not asserted: the clipped count carries noise of stddev
    # z / 1.2 = 0.83 on a count of 3 clients, drawn from the OS, so it can go either way)
    clip = output.metrics["aggregator"]["dp_query_metrics"]["clip"]
    assert np.isfinite(clip) and clip > 0 and clip != pytest.approx(0.05, rel=1e-6)
    sampling = ClientSampling(5, m)
    assert accounting.epsilon(dp_events.client_round_event(reported, sampling), DELTA) == pytest.approx(
        rdp_epsilon(WOR(5, 3, G(z / 2)), REPLACE_ONE), rel=1e-4
    )


def test_privacy_statement_reports_the_mechanism():
    train = TrainSection(rounds=10, clients_per_round=4)
    section = PrivacySection(level="client", clipping="fixed", clip_norm=0.7, noise_multiplier=1.3)
    plan = calibration.plan(section, train, dp_config.client_sampling(train, 10))
    statement = privacy_statement(plan, rounds_run=6, lifetime_spent=2.5)
    assert statement["epsilon"] == pytest.approx(
        rdp_epsilon(SELF(WOR(10, 4, G(0.65)), 6), REPLACE_ONE), rel=1e-9
    )
    assert statement["delta"] == 1e-5 and statement["noise_multiplier"] == 1.3 and statement["rounds"] == 6
    assert "4 of 10 clients" in statement["sampling"] and "0.7" in statement["clipping"]
    assert statement["accountant"].startswith("RDP") and statement["lifetime_epsilon_spent"] == 2.5
    assert privacy_statement(None)["level"] == "none"
