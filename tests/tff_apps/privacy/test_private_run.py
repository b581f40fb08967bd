"""The job's privacy plumbing without TensorFlow: plan, reserve, commit, release."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.errors import UserError
from tff_apps import config as config_lib
from tff_apps.privacy import private_run
from tff_apps.privacy import dp_config
from tff_apps.privacy.ledger import BudgetExhausted, Ledger

DEFAULT = Path(__file__).resolve().parents[3] / "healthcare" / "default.toml"


@dataclass
class FakeApp:
    name: str = "fake"

    def client_rows(self, cfg, prepared):
        return {"a": 100, "b": 40}

    def fingerprint(self, prepared):
        return "f" * 64


def job(tmp_path, *overrides):
    from healthcare.app import APP

    return config_lib.resolve(DEFAULT, APP.sections, None, [f'job.runs_dir="{tmp_path}"', *overrides])


def test_privacy_section_defaults_to_none_and_validates(tmp_path):
    cfg = job(tmp_path)
    assert cfg.privacy == dp_config.PrivacySection() and cfg.privacy.level == "none"
    assert private_run.start(FakeApp(), cfg, None, "r") is None
    assert "privacy" in cfg.to_dict()
    with pytest.raises(UserError, match=r"privacy\.level"):
        job(tmp_path, "privacy.level=everything")


def test_reservation_released_when_no_round_ran_and_committed_as_run(tmp_path):
    settings = ["privacy.level=client", "privacy.noise_multiplier=2.0", "train.rounds=5",
                "privacy.lifetime_epsilon=100"]
    cfg = job(tmp_path, *settings)
    failed = private_run.start(FakeApp(), cfg, None, "r1")
    assert failed.reservation is not None and failed.ledger.path == tmp_path / "privacy_ledger.sqlite"
    failed.finish()  # e.g. the worker did not start: nothing was spent
    ran = private_run.start(FakeApp(), cfg, None, "r2")
    eps = [ran.record_round(["a", "b"]) for _ in range(2)]  # stopped after 2 of 5 rounds
    ran.finish()
    history = Ledger(tmp_path / "privacy_ledger.sqlite").history("f" * 64)
    assert [(e.run_id, e.status) for e in history] == [("r1", "released"), ("r2", "committed")]
    assert history[1].epsilon == pytest.approx(eps[-1]) and eps[0] < eps[1]
    assert ran.statement()["lifetime_epsilon_spent"] == pytest.approx(eps[-1])
    assert ran.statement()["rounds"] == 2 and ran.statement()["rounds_planned"] == 5


def test_budget_refusal_happens_at_start(tmp_path):
    cfg = job(tmp_path, "privacy.level=record", "privacy.noise_multiplier=1.0", "train.rounds=3",
              "privacy.lifetime_epsilon=0.5", f'privacy.ledger="{tmp_path / "l.sqlite"}"')
    with pytest.raises(BudgetExhausted, match=r"spent ε = 0.*remaining 0.5"):
        private_run.start(FakeApp(), cfg, None, "r1")


def test_app_without_privacy_support_is_refused(tmp_path):
    class Bare:
        name = "bare"

    cfg = job(tmp_path, "privacy.level=client", "privacy.noise_multiplier=1.0")
    with pytest.raises(UserError, match="does not support"):
        private_run.start(Bare(), cfg, None, "r1")


@dataclass
class ManyClients(FakeApp):
    def client_rows(self, cfg, prepared):
        return {f"c{i}": 50 for i in range(200)}


def test_a_job_whose_client_noise_swamps_the_mean_update_is_warned(tmp_path, caplog):
    dp = ["privacy.level=client", "privacy.clipping=fixed", "privacy.noise_multiplier=1.0"]
    few = private_run.start(FakeApp(), job(tmp_path, *dp), None, "few")  # 2 clients: std 0.5 x clip
    assert few.warning.startswith("privacy: client-level DP over 2 clients a round adds noise of std 0.5 x")
    assert 'privacy.level = "record"' in few.warning and "\n" not in few.warning
    assert few.warning in caplog.text
    many = private_run.start(ManyClients(), job(tmp_path, *dp, "train.clients_per_round=100"), None, "many")
    assert many.warning is None  # std 0.01 x clip per coordinate
    record = private_run.start(FakeApp(), job(tmp_path, "privacy.level=record", "privacy.noise_multiplier=1.0"), None, "r")
    assert record.warning is None
