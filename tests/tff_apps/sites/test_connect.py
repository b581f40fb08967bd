"""What does not run across sites is refused in one line naming the setting, before anything starts."""

from __future__ import annotations

import pytest

from shared.errors import UserError
from tff_apps.program.job import resolve_job


@pytest.mark.parametrize(("app", "override", "named"), [
    ("healthcare", "robustness.bad_clients=1", "robustness.bad_clients"),
    ("healthcare", "train.engine=grouped", "train.engine = 'grouped' (it stacks the clients' rows"),
    ("healthcare", "privacy.profiles=dp", "privacy.preprocessing / privacy.profiles = 'dp'"),
    ("traffic", "train.engine=grouped", "train.engine = 'grouped' (it stacks the districts' windows"),
    ("traffic", "preprocess.normalization=per_site", "preprocess.normalization = 'per_site'"),
])
def test_what_sites_do_not_run_is_refused_in_one_line(app, override, named):
    from importlib import import_module

    _, cfg = resolve_job(app, None, [override])
    with pytest.raises(UserError) as refused:
        import_module(f"{app}.sites").check_supported(cfg)
    message = str(refused.value)
    assert message.startswith(f"job.sites: {named}") and f"not available across sites for {app}" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("app", ["healthcare", "traffic"])
def test_the_default_job_runs_across_sites(app):
    from importlib import import_module

    _, cfg = resolve_job(app, None, [])
    import_module(f"{app}.sites").check_supported(cfg)  # nothing refused
