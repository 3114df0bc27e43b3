"""``Segment.close()``: released when it returns, or, with
``Broker(pipeline_release=True)``, sent without waiting for the reply.

Pipelined, the daemon serves one connection's requests in order, so the
broker's next call already sees the lease gone; the reply is read with that
call's.  A client that only closes never leaves more than a bounded number
of replies unread (else the daemon would drop it as a peer that does not
read).
"""

from __future__ import annotations

import os

from shmbroker import Broker
from tests.support.helpers import DaemonProc, eventually, fd_is_open


def test_by_default_others_see_the_release_when_close_returns(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b:
        for _ in range(20):
            seg = a.create("rel/z", 4096)  # refcount: the release unlinks it
            path = f"/dev/shm/{daemon.prefix}{seg.id}"
            seg.close()
            assert not os.path.exists(path)
            b.create("rel/z", 4096).close()  # the name is free at once


def test_the_next_call_sees_the_release(daemon: DaemonProc) -> None:
    with Broker(daemon.socket, pipeline_release=True) as b:
        keep = b.create("rel/a", 4096, lifetime="persistent")
        for _ in range(50):
            b.open("rel/a").close()
            assert b.stat("rel/a").leases == 1
        keep.close()
        assert b.stat("rel/a").leases == 0
        b.delete("rel/a")


def test_other_clients_see_the_release_soon(daemon: DaemonProc) -> None:
    with Broker(daemon.socket, pipeline_release=True) as a, Broker(daemon.socket) as b:
        seg = a.create("rel/b", 4096)  # refcount: the release unlinks it
        path = f"/dev/shm/{daemon.prefix}{seg.id}"
        assert os.path.exists(path)
        seg.close()
        eventually(lambda: not os.path.exists(path))
        eventually(lambda: not any(s.name == "rel/b" for s in b.list("rel/")))


def test_closing_thousands_in_a_row_keeps_the_connection(daemon: DaemonProc) -> None:
    with Broker(daemon.socket, pipeline_release=True) as b:
        keep = b.create("rel/c", 4096, lifetime="persistent")
        segs = [b.open("rel/c") for _ in range(2000)]
        sock = b._sock
        for s in segs:
            s.close()
            assert b._unread <= 32  # bounded: the daemon's reply queue never fills
        assert b.stat("rel/c").leases == 1  # every release seen
        assert b._sock is sock  # on the same connection: never dropped, never reconnected
        keep.close()
        b.delete("rel/c")


def test_close_after_the_daemon_died_returns_at_once(daemon: DaemonProc) -> None:
    b = Broker(daemon.socket, reconnect_timeout=0.5, pipeline_release=True)
    try:
        seg = b.create("rel/d", 4096)
        daemon.kill()
        seg.close()  # neither raises nor waits
        seg.close()
    finally:
        b.close()
        os.unlink(f"/dev/shm/{daemon.prefix}{seg.id}")  # a SIGKILLed daemon leaves it


def test_close_unmaps_whether_or_not_the_release_goes_out(daemon: DaemonProc) -> None:
    """close() unmaps and closes the fd, also when the release cannot be sent
    (the daemon died), and does not raise."""
    for pipelined in (False, True):
        b = Broker(daemon.socket, reconnect_timeout=0.5, pipeline_release=pipelined)
        try:
            keep = b.create("rel/u", 4096, lifetime="persistent")
            seg = b.open("rel/u")  # ro: a mapping of its own (keep's is rw)
            fd = seg.fd
            seg.close()  # the daemon answers: unmapped, fd closed
            assert not fd_is_open(fd)
            assert b.stat("rel/u").leases == 1
            keep.close()
            b.delete("rel/u")
        finally:
            b.close()
    b = Broker(daemon.socket, reconnect_timeout=0.5)
    seg = b.create("rel/v", 4096)
    fd = seg.fd
    try:
        daemon.kill()
        seg.close()  # the release is not sent: unmapped all the same
        assert not fd_is_open(fd), os.readlink(f"/proc/self/fd/{fd}")
        assert seg.closed
    finally:
        b.close()
        os.unlink(f"/dev/shm/{daemon.prefix}{seg.id}")  # a SIGKILLed daemon leaves it
