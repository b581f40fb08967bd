"""tff_apps.sites.policy: each rule refuses with one line naming it, and admits what it allows."""

from __future__ import annotations

import pytest

from shared.errors import UserError
from tff_apps.sites.policy import BadJob, Job, Refused, SitePolicy, load_policy, parse_job

STRICT = SitePolicy(
    site="hospital_a", apps=("healthcare",), max_rounds=10, require_privacy="record",
    max_epsilon=3.0, max_value_bytes=1000, callers=("coordinator",),
)
GOOD = {"app": "healthcare", "run_id": "r1", "rounds": 10, "privacy_level": "record", "epsilon": 3.0,
        "max_value_bytes": 1000}


def test_a_job_within_every_limit_is_admitted() -> None:
    STRICT.check(GOOD)
    STRICT.check_caller("coordinator")
    SitePolicy(site="open").check({"app": "traffic", "run_id": "r", "rounds": 10_000})


@pytest.mark.parametrize("change, message", [
    ({"app": "traffic"}, "site hospital_a: policy apps = ['healthcare'], the job's app is 'traffic'"),
    ({"rounds": 11}, "site hospital_a: policy max_rounds = 10, the job plans rounds = 11"),
    ({"privacy_level": "none"}, "site hospital_a: policy require_privacy = 'record', the job has privacy.level = 'none'"),
    ({"privacy_level": "client"}, "site hospital_a: policy require_privacy = 'record', the job has privacy.level = 'client'"),
    ({"epsilon": 3.5}, "site hospital_a: policy max_epsilon = 3.0, the job plans epsilon = 3.5"),
    ({"epsilon": None}, "site hospital_a: policy max_epsilon = 3.0, the job plans no epsilon (privacy.level = 'record')"),
    ({"max_value_bytes": 0}, "site hospital_a: policy max_value_bytes = 1000, the job asks for max_value_bytes = 0 (no limit)"),
    ({"max_value_bytes": 1001}, "site hospital_a: policy max_value_bytes = 1000, the job asks for max_value_bytes = 1001"),
])
def test_each_rule_refuses_with_its_own_line(change, message) -> None:
    with pytest.raises(Refused) as err:
        STRICT.check({**GOOD, **change})
    assert str(err.value) == message


def test_privacy_levels_are_ordered() -> None:
    client = SitePolicy(site="s", require_privacy="client")
    client.check({**GOOD, "privacy_level": "record"})
    client.check({**GOOD, "privacy_level": "client"})
    with pytest.raises(Refused):
        client.check({**GOOD, "privacy_level": "none"})


def test_callers() -> None:
    with pytest.raises(Refused) as err:
        STRICT.check_caller("hospital_b")
    assert str(err.value) == "site hospital_a: policy callers = ['coordinator'], the caller's certificate is 'hospital_b'"


@pytest.mark.parametrize("raw, message", [
    ("{", "job descriptor: not JSON"),
    ("[1]", "job descriptor: expected a JSON object, got list"),
    ({"app": "a", "run_id": "r"}, "job descriptor: no 'rounds'"),
    ({**GOOD, "extra": 1}, "job descriptor: unknown key 'extra'"),
    ({**GOOD, "rounds": True}, "job descriptor: rounds = True, expected an integer >= 1"),
    ({**GOOD, "privacy_level": "high"}, "job descriptor: privacy_level = 'high', expected one of ['none', 'client', 'record']"),
    ({**GOOD, "epsilon": -1}, "job descriptor: epsilon = -1, expected a number > 0 or null"),
])
def test_malformed_job_descriptors(raw, message) -> None:
    with pytest.raises(BadJob) as err:
        parse_job(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_job_round_trips_through_json() -> None:
    job = parse_job(GOOD)
    assert parse_job(job.to_json()) == job == Job(**GOOD)


def test_load_policy_from_site_toml(tmp_path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[policy]\napps = ["healthcare"]\nrequire_privacy = "client"\nmax_epsilon = 8\n')
    assert load_policy(path, "hospital_a") == SitePolicy(
        site="hospital_a", apps=("healthcare",), require_privacy="client", max_epsilon=8
    )
    assert load_policy(None, "s") == SitePolicy(site="s")


@pytest.mark.parametrize("text, message", [
    ("[policy]\nmax_round = 3\n", "[policy] has no key 'max_round'"),
    ("[policy]\nmax_rounds = -1\n", "[policy] max_rounds = -1, expected an integer >= 0 (0 = no limit)"),
    ('[policy]\nrequire_privacy = "strong"\n', "[policy] require_privacy = 'strong', expected one of"),
    ('[policy]\napps = "healthcare"\n', "[policy] apps = 'healthcare', expected a list of app names"),
    ("[policy\n", "not valid TOML"),
])
def test_policy_mistakes_name_the_file_and_key(tmp_path, text, message) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_policy(path, "s")
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
