"""Healthcare jobs with [privacy] through the `tff-apps` command, as a user runs them.

Every ε a job reports is checked against an independent dp_accounting computation written
here from raw numbers (the resolved config and the sites' training rows), not through
tff_apps.privacy. Small jobs: few rounds, few local steps, no baselines.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from tests.cli import tff_apps_in_process

DELTA = 1e-5
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
G = dp_accounting.GaussianDpEvent
WOR = dp_accounting.SampledWithoutReplacementDpEvent
POISSON = dp_accounting.PoissonSampledDpEvent
SELF = dp_accounting.SelfComposedDpEvent
COMPOSED = dp_accounting.ComposedDpEvent

FAST = [
    "--set", "evaluate.centralized_baseline=false",
    "--set", "evaluate.local_baseline=false",
    "--set", "export.enabled=false",
    "--set", "train.eval_every=100",
]
N_CLIENTS = 5  # healthcare default: breast cancer over 5 hospitals


def rdp_epsilon(event, relation) -> float:
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(DELTA)


def run(runs: Path, run_id: str, *args: str):
    return tff_apps_in_process("run", "healthcare", *FAST, *args, "--set", f'job.runs_dir="{runs}"', "--run-id", run_id)


def outputs(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rounds


# -- client level ------------------------------------------------------------------------------


def client_fixed_epsilon(z: float, n: int, m: int, rounds: int) -> float:
    """DP-FedAvg, fixed clip, m of n clients without replacement: replace-one, noise / 2C."""
    return rdp_epsilon(SELF(WOR(n, m, G(z / 2)), rounds), REPLACE_ONE)


def test_client_level_fixed_clip_stops_before_the_target_and_accounts_what_ran(tmp_path):
    z, m, configured = 1.0, 3, 6
    eps = [client_fixed_epsilon(z, N_CLIENTS, m, r) for r in range(1, configured + 1)]
    target = (eps[3] + eps[4]) / 2  # 4 rounds fit, the 5th would pass the target
    result = run(
        tmp_path, "fixed",
        "--set", f"train.rounds={configured}", "--set", f"train.clients_per_round={m}",
        "--set", "train.local_epochs=1", "--set", "export.enabled=true",
        "--set", "privacy.level=client", "--set", "privacy.clipping=fixed",
        "--set", f"privacy.noise_multiplier={z}", "--set", f"privacy.target_epsilon={target}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "healthcare" / "fixed"
    summary, rounds = outputs(run_dir)
    # z / m = 1/3 x clip per coordinate of the mean update: warned before training, in the run's log
    assert "privacy: client-level DP over 3 clients a round adds noise of std 0.333 x" in (run_dir / "run.log").read_text()
    assert summary["rounds"] == 4 and [r["round"] for r in rounds] == [1, 2, 3, 4]
    # who took part stays with the operator: not in metrics.jsonl, in operator/rounds.jsonl
    assert not any("clients" in r for r in rounds)
    operator = [json.loads(line) for line in (run_dir / "operator" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in operator] == [1, 2, 3, 4] and all(len(r["clients"]) == m for r in operator)
    statement = summary["privacy"]
    assert statement["level"] == "client" and statement["rounds"] == 4 and statement["rounds_planned"] == 4
    assert statement["epsilon"] == pytest.approx(eps[3], rel=0.01)
    assert statement["epsilon"] <= target < eps[4]
    assert statement["noise_multiplier"] == z and statement["delta"] == DELTA
    assert "fixed L2 clip 1" in statement["clipping"] and "3 of 5" in statement["sampling"]
    per_round = [r["epsilon"] for r in rounds]
    assert per_round == pytest.approx(eps[:4], rel=0.01)
    assert all(a < b for a, b in zip(per_round, per_round[1:]))
    card = json.loads((run_dir / "export" / "healthcare" / "1" / "model_card.json").read_text())
    assert card["privacy"] == statement and card["rounds"] == 4


def operator_clients(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "operator" / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line)["clients"] for line in lines]


def test_dp_sampling_is_secret_two_runs_of_one_config_sample_differently(tmp_path):
    """ε assumes nobody can recompute who was sampled: with DP the sampling follows the OS's
    random source, not job.seed (which the model card carries)."""
    settings = [
        "--set", "train.rounds=4", "--set", "train.clients_per_round=2", "--set", "train.local_epochs=1",
        "--set", "privacy.level=client", "--set", "privacy.clipping=fixed", "--set", "privacy.noise_multiplier=1.0",
        "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
    ]
    for run_id in ("first", "second"):
        assert run(tmp_path, run_id, *settings).returncode == 0
    (first, first_rounds), (second, second_rounds) = (outputs(tmp_path / "healthcare" / r) for r in ("first", "second"))
    assert first["privacy"]["epsilon"] == second["privacy"]["epsilon"] > 0
    assert first["rounds"] == second["rounds"] == 4
    lists = [operator_clients(tmp_path / "healthcare" / r) for r in ("first", "second")]
    assert all(len(clients) == 2 for run_lists in lists for clients in run_lists)
    # 10 pairs a round, 4 rounds: equal lists by chance with probability 1e-4
    assert lists[0] != lists[1]
    assert "operator/rounds.jsonl" in " ".join(first["privacy"]["operator_only"])
    assert "hospital_" in json.dumps(lists) and "hospital_" not in json.dumps(first_rounds)


def test_client_level_adaptive_clip_epsilon(tmp_path):
    z, m, rounds = 1.2, 3, 3
    result = run(
        tmp_path, "adaptive",
        "--set", f"train.rounds={rounds}", "--set", f"train.clients_per_round={m}",
        "--set", "train.local_epochs=1",
        "--set", "privacy.level=client", "--set", "privacy.clipping=adaptive",
        "--set", f"privacy.noise_multiplier={z}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary, metrics = outputs(tmp_path / "healthcare" / "adaptive")
    # TFF's adaptive clip: value noise z_v and clipped-count stddev s whose total is z;
    # s = max(0.05 m, z / (2 sqrt(1 - 1.25^-2))) (value noise at most 1.25 z).
    s = max(0.05 * m, z / (2 * math.sqrt(1 - 1.25**-2)))
    z_value = (z**-2 - (2 * s) ** -2) ** -0.5
    per_round = COMPOSED([G(z_value / 2), G(2 * s / 2)])  # replace-one: noise over 2C (and 2 * 0.5)
    expected = rdp_epsilon(SELF(WOR(N_CLIENTS, m, per_round), rounds), REPLACE_ONE)
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, rel=0.01)
    assert summary["privacy"]["epsilon"] == pytest.approx(client_fixed_epsilon(z, N_CLIENTS, m, rounds), rel=0.01)
    assert "adaptive" in summary["privacy"]["clipping"]
    assert [r["epsilon"] for r in metrics][-1] == pytest.approx(expected, rel=0.01)


def test_client_level_pld_epsilon_matches_an_independent_pld_computation(tmp_path):
    z, rounds = 1.5, 3
    result = run(
        tmp_path, "pld",
        "--set", f"train.rounds={rounds}", "--set", "train.local_epochs=1",
        "--set", "privacy.level=client", "--set", "privacy.clipping=fixed",
        "--set", f"privacy.noise_multiplier={z}", "--set", "privacy.accountant=pld",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary, metrics = outputs(tmp_path / "healthcare" / "pld")
    # Every client every round (PLD cannot account fixed-size sampling): the Gaussian
    # mechanism with noise z*C under replace-one, i.e. L2 sensitivity 2C, composed `rounds` times.
    def pld_epsilon(r: int) -> float:
        mechanism = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=z, sensitivity=2.0, value_discretization_interval=1e-4
        )
        return mechanism.self_compose(r).get_epsilon_for_delta(DELTA)

    statement = summary["privacy"]
    assert statement["accountant"].startswith("PLD") and statement["rounds"] == rounds
    assert statement["epsilon"] == pytest.approx(pld_epsilon(rounds), rel=0.01)
    assert [r["epsilon"] for r in metrics] == pytest.approx([pld_epsilon(r) for r in (1, 2, 3)], rel=0.01)
    assert statement["epsilon"] < rdp_epsilon(SELF(G(z / 2), rounds), REPLACE_ONE)  # PLD is tighter


def test_baselines_train_the_configured_rounds_when_the_target_stops_training_early(monkeypatch):
    from healthcare import app as healthcare_app
    from healthcare import evaluate
    from tff_apps.privacy import private_run
    from tff_apps.program.job import resolve_job

    z, m, configured, local_epochs = 1.0, 3, 6, 2
    eps = [client_fixed_epsilon(z, N_CLIENTS, m, r) for r in (4, 5)]
    app, cfg = resolve_job("healthcare", None, [
        f"train.rounds={configured}", f"train.clients_per_round={m}", f"train.local_epochs={local_epochs}",
        "privacy.level=client", "privacy.clipping=fixed", f"privacy.noise_multiplier={z}",
        f"privacy.target_epsilon={sum(eps) / 2}",
    ])
    prepared = app.prepare(cfg)
    assert private_run.start(app, cfg, prepared, "baselines").rounds == 4  # the target stops training early
    epochs = []
    record = lambda *args, **kwargs: epochs.append(kwargs["epochs"]) or {}  # noqa: E731
    monkeypatch.setattr(evaluate, "centralized_baseline", record)
    monkeypatch.setattr(evaluate, "local_baseline", record)
    healthcare_app.run_baselines(cfg, prepared)
    assert epochs == [configured * local_epochs] * 2


# -- record level and the lifetime ledger --------------------------------------------------------


def record_epsilon(z: float, batch: int, steps: int, rounds: int, rows: dict[str, int], runs: int = 1) -> float:
    """DP-SGD at each site: Poisson q = batch / rows, `steps` per round; max over sites."""
    return max(
        rdp_epsilon(SELF(POISSON(min(1.0, batch / n), G(z)), steps * rounds * runs), ADD_REMOVE)
        for n in rows.values()
    )


def site_rows() -> dict[str, int]:
    """The sites' training rows, as the job splits them (seed 0, test fraction 0.25)."""
    from tff_apps.program.job import resolve_job

    app, cfg = resolve_job("healthcare", None, [])
    return app.client_rows(cfg, app.prepare(cfg))


def test_record_level_runs_compose_in_the_ledger_and_a_third_is_refused(tmp_path):
    z, batch, steps, rounds = 1.5, 16, 3, 2
    rows = site_rows()
    one, two, three = (record_epsilon(z, batch, steps, rounds, rows, k) for k in (1, 2, 3))
    budget = (two + three) / 2
    job = [
        "--set", f"train.rounds={rounds}", "--set", f"train.local_steps={steps}",
        "--set", f"train.batch_size={batch}", "--set", "train.algorithm=fedavg_unweighted",
        "--set", "privacy.level=record", "--set", f"privacy.noise_multiplier={z}",
        "--set", f"privacy.lifetime_epsilon={budget}",
    ]
    first = run(tmp_path, "r1", *job)
    assert first.returncode == 0, first.stderr[-3000:]
    summary, metrics = outputs(tmp_path / "healthcare" / "r1")
    statement = summary["privacy"]
    assert summary["data"]["sites"] and {k: v["train_rows"] for k, v in summary["data"]["sites"].items()} == rows
    assert statement["level"] == "record" and statement["epsilon"] == pytest.approx(one, rel=0.01)
    assert statement["lifetime_epsilon_spent"] == pytest.approx(one, rel=0.01)
    assert "DP-SGD" in statement["mechanism"]
    per_round = [r["epsilon"] for r in metrics]
    assert len(per_round) == rounds and per_round[0] < per_round[1]
    assert per_round[-1] == pytest.approx(one, rel=0.01)

    second = run(tmp_path, "r2", *job)
    assert second.returncode == 0, second.stderr[-3000:]
    summary2, _ = outputs(tmp_path / "healthcare" / "r2")
    assert summary2["privacy"]["epsilon"] == pytest.approx(one, rel=0.01)
    assert summary2["privacy"]["lifetime_epsilon_spent"] == pytest.approx(two, rel=0.01)
    assert two < 2 * one  # composed by the accountant, tighter than adding

    third = run(tmp_path, "r3", *job)
    assert third.returncode == 3, third.stderr[-3000:]
    message = third.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "spent" in message and "remaining" in message
    spent = float(re.search(r"spent ε = ([0-9.e+-]+)", message).group(1))
    remaining = float(re.search(r"remaining ([0-9.e+-]+)", message).group(1))
    assert spent == pytest.approx(two, rel=0.01) and remaining == pytest.approx(budget - spent, rel=0.01)
    assert not (tmp_path / "healthcare" / "r3").exists()

    from tff_apps.privacy.ledger import Ledger

    history = Ledger(tmp_path / "privacy_ledger.sqlite").history(summary["data"]["fingerprint"])
    assert [(e.run_id, e.status) for e in history] == [("r1", "committed"), ("r2", "committed")]


def test_unreachable_privacy_settings_are_refused_before_a_run_folder(tmp_path):
    result = run(
        tmp_path, "bad", "--set", "privacy.level=client", "--set", "privacy.noise_multiplier=0.1",
        "--set", "privacy.target_epsilon=0.01", "--set", "train.rounds=3",
    )
    assert result.returncode == 2
    assert "privacy.target_epsilon" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "healthcare" / "bad").exists()


# -- DP data statistics ------------------------------------------------------------------------


def heart_rows() -> dict[str, int]:
    from tff_apps.program.job import resolve_job

    app, cfg = resolve_job("healthcare", None, ["data.source=heart"])
    return app.client_rows(cfg, app.prepare(cfg))


def test_dp_statistics_compose_with_training_into_the_target(tmp_path):
    """heart, record level, total ε 1: normalization and profiles through the Gaussian
    mechanism, ε split as an independent dp_accounting computation finds it."""
    batch, steps, rounds, target = 16, 2, 2, 1.0
    result = run(
        tmp_path, "stats", "--set", "data.source=heart", "--set", f"train.rounds={rounds}",
        "--set", f"train.local_steps={steps}", "--set", f"train.batch_size={batch}",
        "--set", "train.algorithm=fedavg_unweighted", "--set", "privacy.level=record",
        "--set", f"privacy.target_epsilon={target}", "--set", "privacy.preprocessing=dp", "--set", "privacy.profiles=dp",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "healthcare" / "stats"
    summary, _ = outputs(run_dir)
    statement = summary["privacy"]
    z, z_stats = statement["noise_multiplier"], statement["statistics"]["noise_multiplier"]
    statistics = [G(z_stats), G(z_stats)]  # the normalization and the profiles
    per_site = [
        rdp_epsilon(COMPOSED([*statistics, SELF(POISSON(min(1.0, batch / n), G(z)), steps * rounds)]), ADD_REMOVE)
        for n in heart_rows().values()
    ]
    assert statement["epsilon"] == pytest.approx(max(per_site), rel=0.01) and statement["epsilon"] <= target
    assert max(per_site) == pytest.approx(target, rel=0.01)
    assert statement["epsilon_statistics"] == pytest.approx(rdp_epsilon(COMPOSED(statistics), ADD_REMOVE), rel=0.01)
    assert statement["epsilon_statistics"] == pytest.approx(target / 4, rel=0.01)
    assert statement["epsilon_training"] < statement["epsilon"]
    # the released statistics are inside ε now; profiles carry no min or max
    released = {entry["release"] for entry in statement["released_outside_epsilon"]}
    assert "normalization" not in released and "profiles" not in released and "site_counts" in released
    profiles = summary["profiles"]
    assert set(profiles) == set(heart_rows()) and all(p["dp"] for p in profiles.values())
    assert not any({"min", "max"} & set(c) for p in profiles.values() for c in p["columns"].values())
    stored = json.loads((run_dir / "dp_statistics.json").read_text())
    assert stored["preprocessor"]["categories"] == {"cp": [1.0, 2.0, 3.0, 4.0], "restecg": [0.0, 1.0, 2.0]}


@pytest.mark.parametrize(("settings", "message"), [
    (["privacy.level=client", "privacy.noise_multiplier=1", "privacy.preprocessing=dp"],
     'privacy.preprocessing = "dp" is accounted per record: it needs privacy.level = "record"'),
    (["privacy.level=record", "privacy.target_epsilon=3", "privacy.preprocessing=dp"],
     "preprocess.bounds lacks mean_radius, mean_texture, "),
    (["data.source=heart", "privacy.level=record", "privacy.target_epsilon=3", "privacy.preprocessing=dp",
      "preprocess.bounds={ age = [90, 20] }"], r"preprocess.bounds.age = \[90.0, 20.0\]: give \[low, high\]"),
])
def test_dp_statistics_without_what_they_need_are_refused_before_a_run_folder(tmp_path, settings, message):
    result = run(tmp_path, "bad", *[part for setting in settings for part in ("--set", setting)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "healthcare" / "bad").exists()
