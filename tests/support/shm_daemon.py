"""The daemon that ``shmbroker.shared_memory`` tests talk to: one per module,
found as a user's program finds it, through ``$SHMBROKER_SOCKET`` (which
child processes inherit)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shmbroker import _shm_names
from tests.support.helpers import DaemonProc, running_daemon


def _close_default() -> None:
    broker = _shm_names._default
    _shm_names.forget_default()
    if broker is not None and broker[0] == os.getpid():
        broker[1].close()


@pytest.fixture(scope="module")
def shm_daemon() -> Iterator[DaemonProc]:
    old = os.environ.get("SHMBROKER_SOCKET")
    with running_daemon() as d:
        try:
            os.environ["SHMBROKER_SOCKET"] = d.socket
            _close_default()
            yield d
        finally:
            _close_default()
            if old is None:
                os.environ.pop("SHMBROKER_SOCKET", None)
            else:
                os.environ["SHMBROKER_SOCKET"] = old
