"""The core round trip across real processes, and the daemon's own lifecycle."""

from __future__ import annotations

import os
import signal
import time

import pytest

from shmbroker import Broker
from tests.support.helpers import DaemonProc, run_client


def test_two_unrelated_processes_share_a_region(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, b.create("demo/region", 4096, mode=0o644) as seg:
        seg.buf[:11] = b"from writer"
        out = run_client(
            """
            with Broker(SOCK) as b, b.open("demo/region") as seg:
                print(bytes(seg.buf[:11]).decode(), seg.readonly, seg.size)
            """,
            daemon.socket,
        )
        assert out.stdout.split() == ["from", "writer", "True", "4096"]
        # the reader's lease is gone with its close; ours remains
        assert b.stat("demo/region").leases == 1


def test_sigterm_exits_zero_within_5s_and_keeps_held_segments(daemon: DaemonProc) -> None:
    b = Broker(daemon.socket, reconnect_timeout=0.3)
    seg = b.create("x/refcounted", 8192)
    b.create("x/released", 8192).close()
    assert len(daemon.objects()) == 1
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc is not None
    assert daemon.proc.wait(5) == 0
    assert time.monotonic() - t0 < 5
    assert daemon.objects() == [daemon.prefix + seg.id]  # held: kept for reclaim
    assert not os.path.exists(daemon.socket)
    seg.buf[0] = 1  # the mapping outlives the unlink
    seg.buf.release()
    with pytest.raises(FileNotFoundError, match="no shmbrokerd socket at"):
        b.stat("x/refcounted")  # the reconnect finds no daemon
    b.close()
