"""Every ops test leaves the host's /dev as a new machine has it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.systemd_sandbox import host_dev_intruders


@pytest.fixture(autouse=True)
def host_dev_untouched() -> Iterator[None]:
    yield
    intruders = host_dev_intruders()
    assert not intruders, f"the host's /dev gained {intruders} (a sandbox wrote there)"
