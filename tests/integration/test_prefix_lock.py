"""One daemon per shm_prefix: a second one refuses to start, and deletes nothing."""

from __future__ import annotations

import os

from shmbroker import Broker
from tests.support.helpers import DaemonProc

EX_CONFIG = 78


def test_a_second_daemon_on_the_same_prefix_refuses_and_deletes_nothing(
    daemon: DaemonProc,
) -> None:
    with Broker(daemon.socket) as b, b.create("lock/held", 4096) as seg:
        held = daemon.prefix + seg.id
        other = DaemonProc()  # its own socket and state, as the README shows
        try:
            other.start("--shm-prefix", daemon.prefix, wait=False)
            assert other.proc is not None
            assert other.proc.wait(15) == EX_CONFIG
            log = other.log()
            assert f"shm_prefix {daemon.prefix!r} is in use by another shmbrokerd" in log
            assert f"pid {daemon.pid}" in log
            assert "--shm-prefix" in log
            assert held in os.listdir("/dev/shm"), "the refused daemon deleted a segment"
            assert b.stat("lock/held").leases == 1
            # with a prefix of its own, it starts beside the first one
            other.start()
            with Broker(other.socket) as b2, b2.create("lock/other", 4096) as mine:
                assert other.objects() == [other.prefix + mine.id]
        finally:
            other.cleanup()
        assert daemon.objects() == [held]


def test_the_lock_goes_with_the_daemon_and_the_prefix_is_free_again(daemon: DaemonProc) -> None:
    lock = os.path.join("/dev/shm", daemon.lock_name)
    assert os.path.exists(lock)
    assert daemon.stop() == 0
    assert not os.path.exists(lock)
    again = DaemonProc()
    try:
        again.start("--shm-prefix", daemon.prefix)
        assert os.path.exists(lock)
        assert os.path.getsize(lock) == 0  # no page of a small tmpfs taken
    finally:
        again.cleanup()
        again.prefix = daemon.prefix  # what it left, if anything, under that prefix
        assert again.entries() == []


def test_a_lock_left_by_a_killed_daemon_does_not_block_the_next(daemon: DaemonProc) -> None:
    daemon.kill()
    assert os.path.exists(os.path.join("/dev/shm", daemon.lock_name))  # no one holds it
    daemon.start()
    with Broker(daemon.socket) as b:
        assert b.hello().server.startswith("shmbrokerd/")
