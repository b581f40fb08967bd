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
    assert all(len(r["clients"]) == m for r in rounds)
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
