"""Unreliable clients ([clients]): seeded dropout and speed draws, stragglers against a
deadline, over-selection, quorum-missed rounds, and the program's round loop with them.

The engine tests run `round_loop.run_rounds` in-process on five tiny clients (healthcare's
logistic regression on 3 inputs), 2-4 rounds each.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from shared.errors import UserError
from tff_apps.learning import federation as federation_lib
from tff_apps.learning import client_data, participation
from tff_apps.privacy.dp_config import examples_per_round
from tff_apps.program import round_loop, round_summary
from tff_apps.config import TrainSection
from tff_apps.learning.federation import ClientsSection, Federation
from tff_apps.privacy.dp_config import PrivacySection

D = 3
SEED = 5
TRAIN = TrainSection(rounds=3, batch_size=8, local_epochs=1, eval_every=1, checkpoint_every=0)
ROWS = (6, 9, 12, 15, 20)


# -- the draws (pure Python) --------------------------------------------------------------------


def test_dropout_draws_are_seeded_and_their_share_is_near_p():
    clients = ClientsSection(dropout=0.3)
    draws = [participation.client_draw(SEED, r, i, clients) for r in range(1, 401) for i in range(20)]
    again = [participation.client_draw(SEED, r, i, clients) for r in range(1, 401) for i in range(20)]
    assert draws == again  # same (seed, round, client): same fate, as a resumed run needs
    share = np.mean([d.dropped for d in draws])
    print(f"observed dropout share over {len(draws)} draws: {share:.4f} (p = 0.3)")
    assert abs(share - 0.3) < 0.015  # 4.6 standard errors
    other_seed = [participation.client_draw(SEED + 1, r, i, clients) for r in range(1, 401) for i in range(20)]
    assert [d.dropped for d in other_seed] != [d.dropped for d in draws]
    # the slowdown does not depend on p: changing dropout changes nothing else
    no_dropout = [participation.client_draw(SEED, r, i, ClientsSection()) for r in range(1, 401) for i in range(20)]
    assert [d.slowdown for d in no_dropout] == [d.slowdown for d in draws]
    assert not any(d.dropped for d in no_dropout)
    logs = np.log([d.slowdown for d in draws])
    assert abs(logs.std() - ClientsSection().speed_spread) < 0.02


def simulated_seconds(round_number: int, index: int, clients: ClientsSection, examples) -> float:
    slowdown = participation.client_draw(SEED, round_number, index, clients).slowdown
    return examples[index] * clients.seconds_per_example * slowdown


def test_deadline_cuts_the_slow_and_over_selection_keeps_the_first_m_to_finish():
    examples = [100 * (i + 1) for i in range(10)]
    sampled = list(range(10))
    times = [simulated_seconds(1, i, ClientsSection(), examples) for i in sampled]
    deadline = float(np.median(times))
    clients = ClientsSection(deadline_seconds=deadline, over_selection=1.0)
    came = participation.turnout(clients, SEED, 1, sampled, examples, wanted=3)
    assert sorted(came.stragglers) == [i for i in sampled if times[i] > deadline] and len(came.stragglers) == 5
    assert len(came.reported) == 3 and came.dropped == []
    in_time = sorted((times[i], i) for i in sampled if times[i] <= deadline)
    assert came.reported == sorted(i for _, i in in_time[:3])  # the three fastest in time
    assert came.unused == sorted(i for _, i in in_time[3:])
    assert came.simulated_seconds == pytest.approx(in_time[2][0])  # the third to finish
    assert not came.skipped
    # fewer than m in time: the server waited until the deadline
    late = participation.turnout(clients, SEED, 1, sampled, examples, wanted=7)
    assert len(late.reported) == 5 and late.simulated_seconds == deadline
    quorum = participation.turnout(dataclasses.replace(clients, quorum=6), SEED, 1, sampled, examples, wanted=7)
    assert quorum.skipped and quorum.reported == late.reported


def test_sample_size_over_selects_and_caps():
    assert participation.sample_size(10, 3, 0.0) == 3
    assert participation.sample_size(10, 0, 0.0) == 0  # the sampler's own "every client"
    assert participation.sample_size(10, 3, 0.5) == 5  # ceil(4.5)
    assert participation.sample_size(10, 4, 0.5) == 6
    assert participation.sample_size(10, 4, 5.0) == 10


def job(clients_per_round=0, level="none", secure="none", **clients):
    return SimpleNamespace(train=dataclasses.replace(TRAIN, clients_per_round=clients_per_round),
                           privacy=PrivacySection(level=level, secure_aggregation=secure)), Federation(
        clients=ClientsSection(**clients))


@pytest.mark.parametrize("setting, fix", [
    (dict(quorum=6), "set clients.quorum <= 5"),
    (dict(clients_per_round=3, quorum=4), "set clients.quorum <= 3"),
    (dict(over_selection=0.5), "clients.over_selection = 0"),
    (dict(clients_per_round=3, over_selection=0.5, level="client"), "set clients.over_selection = 0"),
    (dict(dropout=0.1, level="client", secure="simulated"), "privacy.secure_aggregation = 'none'"),
    (dict(dropout=0.1, secure="masked"), "set clients.quorum = 2"),
])
def test_check_clients_refuses_in_one_line(setting, fix):
    cfg, federation = job(**setting)
    with pytest.raises(UserError) as refused:
        federation_lib.check_clients(cfg, federation, dict(zip("abcde", ROWS)))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("clients.") and fix in message


def test_check_clients_accepts_a_hopeless_deadline_but_logs_it(caplog):
    cfg, federation = job(clients_per_round=3, over_selection=0.5, deadline_seconds=1e-6, quorum=2)
    with caplog.at_level(logging.WARNING):
        federation_lib.check_clients(cfg, federation, dict(zip("abcde", ROWS)))
    assert "clients.deadline_seconds = 1e-06" in caplog.text
    federation_lib.check_clients(*job(dropout=0.3, quorum=2, secure="masked"), dict(zip("abcde", ROWS)))


# -- the round loop (TFF) -----------------------------------------------------------------------


def make_clients():
    from tff_apps.learning.client_data import ClientTrainData

    rng = np.random.default_rng(0)
    clients = []
    for k, n in enumerate(ROWS):
        x = rng.standard_normal((n, D)).astype(np.float32) + 0.3 * k
        y = (x @ np.array([1.0, -1.0, 0.5]) > 0.3 * k).astype(np.float32).reshape(-1, 1)
        clients.append(ClientTrainData(f"c{k}", x, y))
    return clients


@pytest.fixture(scope="module")
def engine(runtime):
    from healthcare.model import ModelConfig, tff_model_fn
    from tff_apps.learning import factory

    return factory.build_learning_process(TRAIN, tff_model_fn(ModelConfig(kind="logistic"), D, SEED))


def flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(w).ravel() for w in weights.trainable])


def run(engine, run_dir, train=TRAIN, privacy=None, **clients):
    """run_rounds with every round's weights kept (evaluation every round)."""
    seen = []

    def evaluate(weights):
        seen.append(flat(weights))
        return {}

    federation = Federation(clients=ClientsSection(**clients)) if clients else None
    result = round_loop.run_rounds(engine, make_clients(), train, SEED, run_dir, evaluate, "loss",
                                federation=federation, privacy=privacy)
    return SimpleNamespace(result=result, weights=seen, final=flat(result.weights))


def test_default_clients_section_trains_exactly_as_the_plain_loop(engine, tmp_path):

    train = dataclasses.replace(TRAIN, clients_per_round=3)
    with_section = run(engine, tmp_path / "a", train, quorum=1)  # every [clients] value at its default
    rng, state, clients = np.random.default_rng(SEED), engine.initialize(), make_clients()
    for r in range(1, train.rounds + 1):  # the loop as it was before [clients]
        chosen = round_loop.sample_clients(rng, len(clients), 3)
        state = engine.next(state, [client_data.client_dataset(clients[i], train, client_data.round_seed(SEED, r, i))
                                    for i in chosen]).state
    assert np.array_equal(with_section.final, flat(engine.get_model_weights(state)))
    records = with_section.result.history
    assert [(r["sampled"], r["reported"], r["dropped"], r["skipped"]) for r in records] == [(3, 3, 0, False)] * 3


def quorum_seed_rounds(clients: ClientsSection, rounds: int) -> list[bool]:
    """Which rounds miss the quorum with every client sampled (the pure draws)."""
    examples = [examples_per_round(TRAIN, n) for n in ROWS]
    return [participation.turnout(clients, SEED, r, range(len(ROWS)), examples, len(ROWS)).skipped
            for r in range(1, rounds + 1)]


def test_a_missed_quorum_skips_the_round_and_keeps_the_weights(engine, tmp_path):
    clients = dict(dropout=0.5, quorum=3)
    skipped = quorum_seed_rounds(ClientsSection(**clients), 4)
    assert True in skipped and False in skipped  # both kinds of rounds happen with this seed
    out = run(engine, tmp_path, dataclasses.replace(TRAIN, rounds=4), **clients)
    records = out.result.history
    assert [r["skipped"] for r in records] == skipped
    before = [flat(engine.get_model_weights(engine.initialize()))] + out.weights[:-1]
    for record, start, end in zip(records, before, out.weights):
        assert record["sampled"] == 5 and record["dropped"] + record["reported"] == 5
        assert len(record["clients"]) == record["reported"]
        if record["skipped"]:
            assert record["reported"] < 3 and np.array_equal(start, end) and "train_loss" not in record
        else:
            assert record["reported"] >= 3 and not np.array_equal(start, end) and "train_loss" in record
    summary = participation.summary(records)
    assert summary["rounds_skipped"] == sum(skipped)
    assert summary["mean_reported"] == pytest.approx(np.mean([r["reported"] for r in records]))


def test_stragglers_and_over_selection_in_the_round_loop(engine, tmp_path):

    train = dataclasses.replace(TRAIN, clients_per_round=2, rounds=2)
    clients = dict(over_selection=1.0, deadline_seconds=0.012, seconds_per_example=0.001, speed_spread=0.5)
    out = run(engine, tmp_path, train, **clients)
    per_client = round_summary.bytes_per_client(out.result.weights)
    for record in out.result.history:
        assert record["sampled"] == 4  # ceil(2 x (1 + 1.0))
        assert record["reported"] == min(2, 4 - record["stragglers"]) == len(record["clients"])
        assert record["stragglers"] + record["unused"] + record["reported"] == 4
        assert record["bytes_down"] == 4 * per_client["bytes_down"]
        assert record["bytes_up"] == record["reported"] * per_client["bytes_up"]
    assert sum(r["stragglers"] for r in out.result.history) > 0 and sum(r["unused"] for r in out.result.history) > 0


def test_resume_mid_run_with_dropout_ends_with_the_same_weights(engine, tmp_path):
    clients = dict(dropout=0.3, quorum=2)
    every = dataclasses.replace(TRAIN, rounds=4, checkpoint_every=2)
    whole = run(engine, tmp_path / "whole", every, **clients)
    run(engine, tmp_path / "cut", dataclasses.replace(every, rounds=2), **clients)  # stops after checkpoint 2
    resumed = run(engine, tmp_path / "cut", every, **clients)
    assert len(resumed.weights) == 2  # rounds 3 and 4 only
    assert np.array_equal(resumed.final, whole.final)
    assert [r["clients"] for r in resumed.result.history] == [r["clients"] for r in whole.result.history]
    assert any(r["dropped"] for r in whole.result.history)


def client_level_privacy(train):
    """The program's side of client-level DP (the sampling and the accountant); the engine
    here adds no noise, which the sampling does not depend on."""
    from tff_apps.privacy import calibration, dp_config
    from tff_apps.privacy.private_run import RunPrivacy

    section = PrivacySection(level="client", clipping="fixed", noise_multiplier=1.0)
    sampling = dp_config.client_sampling(train, len(ROWS))
    return RunPrivacy(calibration.plan(section, train, sampling), fingerprint="test")


def test_dp_sampling_is_secret_and_a_resume_replays_it(engine, tmp_path):
    import json
    import shutil

    every = dataclasses.replace(TRAIN, rounds=8, clients_per_round=2, checkpoint_every=2)
    cut = dataclasses.replace(every, rounds=2)
    run(engine, tmp_path / "a", cut, privacy=client_level_privacy(cut))  # stops after checkpoint 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = [run(engine, tmp_path / name, every, privacy=client_level_privacy(every)) for name in ("a", "b")]
    fresh = run(engine, tmp_path / "fresh", every, privacy=client_level_privacy(every))
    lists = [[r["clients"] for r in out.result.history] for out in (*resumed, fresh)]
    # both resumes replay the seed stored in the checkpoint (6 rounds of 10 pairs: 1e-6 to agree
    # by chance); a fresh run draws its own
    assert len(lists[0]) == 8 and lists[0] == lists[1] and lists[2] != lists[0]
    for name in ("a", "fresh"):
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        operator = [json.loads(line) for line in (tmp_path / name / "operator" / "rounds.jsonl").read_text().splitlines()]
        assert not any("clients" in r for r in metrics) and [r["round"] for r in operator] == list(range(1, 9))
    assert [r["clients"] for r in operator] == lists[2]
