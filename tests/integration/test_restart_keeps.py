"""A daemon stop (SIGTERM: `systemctl restart`, an upgrade) keeps what clients
hold, as a crash does; a holder whose lease could not be reclaimed is told.

Real daemons restarted on the same state and prefix; holders and readers
are separate client processes.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from shmbroker import Broker, SegmentNotFoundError
from tests.support.helpers import (
    DaemonProc,
    eventually,
    run_client,
    running_daemon,
    spawn_client,
    wait_line,
)

HOLDER = """
import logging
logging.disable(logging.WARNING)  # the lost segment's warning: not on stderr here
lost = []
b = Broker(SOCK, on_lost=lambda seg: lost.append(seg.name))
segs = [b.create("keep/rc", 4096), b.create("keep/own", 4096, lifetime="owner")]
b.create("keep/gone", 4096).close()  # released before the stop: ends at stop
for s in segs:
    s.buf[:5] = b"bytes"
print("READY", flush=True)
for line in sys.stdin:  # each line: one call, then what this holder knows
    leases = b.stat("keep/rc").leases if line.strip() == "stat" else b.hello() and None
    print("STATE", json.dumps({"leases": leases, "lost": lost,
                               "flags": [s.lost for s in segs]}), flush=True)
"""


def _ask(holder: subprocess.Popen[str], what: str) -> str:
    assert holder.stdin is not None
    holder.stdin.write(what + "\n")
    holder.stdin.flush()
    return wait_line(holder, "STATE").removeprefix("STATE ")


def _read(d: DaemonProc, name: str) -> str:
    code = f"with Broker(SOCK) as b, b.open({name!r}) as s: print(bytes(s.buf[:5]).decode())"
    return run_client(code, d.socket).stdout.strip()


@pytest.fixture
def holder_daemon() -> Iterator[DaemonProc]:
    with running_daemon({"reclaim_window": 1.5}) as d:
        yield d


def test_sigterm_keeps_held_segments_and_the_holder_reclaims_them(
    holder_daemon: DaemonProc,
) -> None:
    d = holder_daemon
    with spawn_client(HOLDER, d.socket, stdin=subprocess.PIPE) as holder:
        try:
            wait_line(holder)
            kept = d.objects()
            assert len(kept) == 2  # keep/gone went with its release
            assert d.stop() == 0
            assert d.objects() == kept, "a stop ended segments that clients hold"
            d.start()
            # readers find them, bytes and all, before and after the holder reclaims
            assert _read(d, "keep/rc") == "bytes"
            assert _ask(holder, "stat") == '{"leases": 1, "lost": [], "flags": [false, false]}'
            time.sleep(2)  # past the window: reclaimed leases keep their segments
            assert _read(d, "keep/own") == "bytes"
            with Broker(d.socket) as b:
                with pytest.raises(SegmentNotFoundError):
                    b.stat("keep/gone")
                assert b.stat("keep/rc").leases == 1
        finally:
            holder.kill()
            holder.wait()
        # the holder's end releases its leases: the segments follow their lifetime
        with Broker(d.socket) as b:

            def gone() -> bool:
                try:
                    b.stat("keep/rc")
                except SegmentNotFoundError:
                    return True
                return False

            eventually(gone)
        assert d.objects() == []


def test_a_holder_whose_lease_was_not_reclaimed_is_told(holder_daemon: DaemonProc) -> None:
    d = holder_daemon
    with spawn_client(HOLDER, d.socket, stdin=subprocess.PIPE) as holder:
        try:
            wait_line(holder)
            d.stop()
            d.start()
            time.sleep(2.5)  # the window ends with nobody reclaiming: both segments go
            eventually(lambda: d.objects() == [])
            state = _ask(holder, "hello")  # any call reconnects and tries to reclaim
            assert state == (
                '{"leases": null, "lost": ["keep/rc", "keep/own"], "flags": [true, true]}'
            )
            assert _ask(holder, "hello").endswith('"flags": [true, true]}')  # told once
        finally:
            holder.kill()
            holder.wait()
