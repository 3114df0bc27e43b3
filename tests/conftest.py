"""Fixtures that every test gets: nothing may leak into /dev/shm, and no
process a test started may outlive it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import PREFIXES, DaemonProc, running_daemon


def _children(pid: int) -> set[int]:
    """Live (non-zombie) direct children of ``pid``."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.add(int(entry.name))
    return kids


def _shm_id() -> str:
    st = os.stat("/dev/shm")
    return f"{st.st_dev}:{st.st_ino}"


#: True inside tests/run-isolated (make test): /dev/shm is this run's own
#: tmpfs, so every entry a test leaves is a leak and may be removed.
PRIVATE_SHM = os.environ.get("SHMBROKER_PRIVATE_SHM") == _shm_id()


def _ours(name: str) -> bool:
    """Entries the leak check may count and remove: all of them in a private
    /dev/shm; on the host's (pytest run by hand), only those of the daemons
    this process started: never another program's objects."""
    return PRIVATE_SHM or name.startswith(tuple(PREFIXES))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    shm_before = set(os.listdir("/dev/shm"))
    kids_before = _children(os.getpid())
    yield
    deadline = time.monotonic() + 3
    while True:
        shm_left = {n for n in set(os.listdir("/dev/shm")) - shm_before if _ours(n)}
        kids_left = _children(os.getpid()) - kids_before
        if not (shm_left or kids_left) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in kids_left:  # end them so one failure does not cascade, then fail
        os.kill(pid, signal.SIGKILL)
    for name in shm_left:
        os.unlink(os.path.join("/dev/shm", name))
    assert not shm_left, f"test left entries in /dev/shm: {sorted(shm_left)}"
    assert not kids_left, f"test left processes running: {sorted(kids_left)}"


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    with running_daemon() as d:
        yield d
