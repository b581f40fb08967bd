"""DP data statistics on the privacy side: ranges, sensitivity, calibration, and the run's ε
composed of statistics and training, against dp_accounting used directly."""

from __future__ import annotations

import dataclasses

import dp_accounting
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant

from shared.errors import UserError
from tff_apps.config import TrainSection
from tff_apps.privacy import calibration, dp_config, dp_statistics
from tff_apps.privacy.dp_config import PrivacySection
from tff_apps.privacy.statement import privacy_statement

DELTA = 1e-5
ROWS = {"a": 300, "b": 120, "c": 60}


def rdp_epsilon(event: dpe.DpEvent) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    return accountant.compose(event).get_epsilon(DELTA)


def record_section(**changes) -> PrivacySection:
    base = PrivacySection(level="record", clipping="fixed", target_epsilon=3.0, delta=DELTA, preprocessing="dp")
    return dataclasses.replace(base, **changes)


def train_section() -> TrainSection:
    return dataclasses.replace(TrainSection(), rounds=4, batch_size=16, local_epochs=1)


def test_spec_takes_public_ranges_and_names_what_is_missing():
    spec = dp_statistics.spec_from(["age", "cp", "chol"], ["cp"], {"age": [20, 90], "cp": [1, 4], "chol": [100, 600]})
    assert spec.numeric == {"age": (20.0, 90.0), "chol": (100.0, 600.0)} and spec.categorical == {"cp": (1, 4)}
    # rows + 3 per numeric column + 1 per categorical column (+ 1 for the label in a profile)
    assert spec.sensitivity() == pytest.approx((1 + 3 * 2 + 1) ** 0.5)
    assert spec.sensitivity(with_labels=True) == pytest.approx((1 + 3 * 2 + 1 + 1) ** 0.5)
    with pytest.raises(UserError, match="preprocess.bounds lacks chol: give each"):
        dp_statistics.spec_from(["age", "chol"], [], {"age": [20, 90]})
    with pytest.raises(UserError, match=r"preprocess.bounds.age = \[90, 20\]: give \[low, high\] with low < high"):
        dp_statistics.spec_from(["age"], [], {"age": [90, 20]})
    with pytest.raises(UserError, match="a categorical column needs integer codes"):
        dp_statistics.spec_from(["cp"], ["cp"], {"cp": [1, 4.5]})


@pytest.mark.parametrize(("changes", "message"), [
    ({"level": "client"}, 'privacy.preprocessing = "dp" is accounted per record: it needs privacy.level = "record"'),
    ({"preprocessing": "exact", "profiles": "dp", "level": "none"}, 'privacy.profiles = "dp" is accounted per record'),
    ({"target_epsilon": 0.0, "noise_multiplier": 1.0}, "need privacy.statistics_epsilon > 0"),
    ({"statistics_epsilon": 3.0}, "leaves nothing of privacy.target_epsilon = 3 for training"),
])
def test_statistics_settings_that_cannot_work_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        dp_statistics.check_section(record_section(**changes))


@pytest.mark.parametrize("count", [1, 2])
def test_calibrated_statistics_noise_spends_the_asked_epsilon(count):
    z = dp_statistics.calibrate(0.5, DELTA, count, "rdp")
    assert rdp_epsilon(dpe.ComposedDpEvent([dpe.GaussianDpEvent(z)] * count)) == pytest.approx(0.5, rel=1e-3)
    assert rdp_epsilon(dpe.ComposedDpEvent([dpe.GaussianDpEvent(z)] * count)) <= 0.5 + 1e-9


@pytest.mark.parametrize("target", [1.0, 3.0])
def test_plan_composes_statistics_and_training_into_the_target(target):
    section = record_section(target_epsilon=target, profiles="dp")
    train = train_section()
    sampling = dp_config.record_sampling(train, ROWS)
    plan = calibration.plan(section, train, sampling)
    assert plan.statistics == ("preprocessing", "profiles") and plan.calibrated
    # independently: every client's records went through both statistics and its DP-SGD steps
    statistics = [dpe.GaussianDpEvent(plan.statistics_noise_multiplier)] * 2
    z_stats_alone = rdp_epsilon(dpe.ComposedDpEvent(statistics))
    assert z_stats_alone == pytest.approx(target / 4, rel=1e-3)
    per_client = []
    for name, rows in ROWS.items():
        steps = sampling.steps_per_round[name] * train.rounds
        training = dpe.SelfComposedDpEvent(
            dpe.PoissonSampledDpEvent(min(1.0, 16 / rows), dpe.GaussianDpEvent(plan.noise_multiplier)), steps
        )
        per_client.append(rdp_epsilon(dpe.ComposedDpEvent([*statistics, training])))
    assert max(per_client) == pytest.approx(target, rel=0.01)
    statement = privacy_statement(plan)
    assert statement["epsilon"] == pytest.approx(max(per_client), rel=0.01)
    assert statement["epsilon_statistics"] == pytest.approx(z_stats_alone, rel=0.01)
    assert statement["epsilon_statistics"] < statement["epsilon_training"] < statement["epsilon"]


def test_a_client_never_sampled_still_spent_the_statistics():
    section = record_section(noise_multiplier=1.5, target_epsilon=0.0, statistics_epsilon=0.4)
    train = train_section()
    plan = calibration.plan(section, train, dp_config.record_sampling(train, ROWS))
    spend = plan.spend(rounds=2, participation={"a": 2, "b": 1})
    assert set(spend) == set(ROWS)
    assert rdp_epsilon(spend["c"]) == pytest.approx(0.4, rel=1e-3)
