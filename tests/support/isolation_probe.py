"""Run only by tests/integration/test_isolation.py, inside tests/run-isolated: a small
suite under the real conftest whose second test leaks on purpose.

Not collected by default (the name does not match ``test_*.py``). The outer
test passes the names of the objects it keeps in its own /dev/shm ("the
host", from here) in ``SHMBROKER_PROBE_HOST_NAMES``.
"""

from __future__ import annotations

import os

from shmbroker import Broker
from tests.support.helpers import DaemonProc

HOST_NAMES = os.environ.get("SHMBROKER_PROBE_HOST_NAMES", "").split()
LEAK = os.environ.get("SHMBROKER_PROBE_LEAK", "")


def test_sees_none_of_the_hosts_objects(daemon: DaemonProc) -> None:
    assert HOST_NAMES
    with Broker(daemon.socket) as b:
        with b.create("probe/refcount", 4096) as seg:
            seg.buf[:2] = b"ok"
            assert not set(os.listdir("/dev/shm")) & set(HOST_NAMES)
        b.create("probe/persist", 4096, lifetime="persistent").close()
        b.delete("probe/persist")
    assert not set(os.listdir("/dev/shm")) & set(HOST_NAMES)


def test_leaks_on_purpose() -> None:
    """The leak check must name and remove an entry of no daemon at all
    (inside a private /dev/shm every entry is the run's own)."""
    os.close(os.open(f"/dev/shm/{LEAK}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
