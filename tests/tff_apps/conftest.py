"""One TFF worker per test module, owned by a Runtime (no worker outlives the tests)."""

import pytest

from tff_apps.runtime.context import Runtime


@pytest.fixture(scope="module")
def runtime():
    with Runtime() as rt:
        yield rt
