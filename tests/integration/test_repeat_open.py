"""A repeat open of a segment this broker already maps costs no fd and no mapping."""

from __future__ import annotations

import os

from shmbroker import Broker
from tests.support.helpers import DaemonProc


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/" in line)


def test_repeat_open_shares_the_mapping(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as writer, Broker(daemon.socket) as b:
        seg = writer.create("rep/a", 8192, mode=0o644)
        first = b.open("rep/a")
        fds, maps = _fds(), _maps()
        again = [b.open("rep/a") for _ in range(20)]
        assert _fds() == fds  # no fd came with the repeat opens
        assert _maps() == maps  # and no new mapping was made
        assert {s.fd for s in again} == {first.fd}
        assert b.stat("rep/a").leases == 22  # each still holds its own lease
        seg.buf[:3] = b"new"
        assert bytes(again[-1].buf[:3]) == b"new"
        first.close()
        assert bytes(again[0].buf[:3]) == b"new"  # the mapping lives while one uses it
        for s in again:
            s.close()
        assert b.stat("rep/a").leases == 1
        seg.close()


def test_repeat_open_of_a_recreated_name_gets_the_new_segment(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as writer, Broker(daemon.socket) as b:
        old = writer.create("rep/b", 4096, mode=0o644, lifetime="persistent")
        held = b.open("rep/b")
        writer.delete("rep/b")
        new = writer.create("rep/b", 4096, mode=0o644, lifetime="persistent")
        new.buf[:3] = b"two"
        fresh = b.open("rep/b")
        assert fresh.id == new.id != held.id
        assert bytes(fresh.buf[:3]) == b"two"
        assert fresh.fd != held.fd
        assert b.stat("rep/b").leases == 2  # the stale reuse's lease was given back
        for s in (held, fresh, old, new):
            s.close()
        writer.delete("rep/b")


def test_ro_and_rw_mappings_are_not_mixed(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b:
        seg = b.create("rep/c", 4096)
        ro = b.open("rep/c")
        assert ro.readonly
        assert ro.fd != seg.fd
        rw = b.open("rep/c", "rw")
        assert not rw.readonly
        assert rw.fd == seg.fd  # the creator's rw mapping is reused
        for s in (ro, rw, seg):
            s.close()
