"""The daemon's bounds, against a real daemon: connections in all and per uid,
accept under fd exhaustion, waiting opens per connection, a peer that never
reads its replies, and the segment limits (with a live ``reload``).

Connections here are raw ``SOCK_SEQPACKET`` sockets where the test needs to
see exactly what the daemon sends (the ``EMFILE`` reply with ``id`` null,
then the end of the connection); other uids are real client processes.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmbroker import Broker, BrokerError
from tests.support.helpers import (
    DaemonProc,
    eventually,
    run_client,
    running_daemon,
    spawn_client,
    wait_line,
)

OTHER_UID = 1000
THIRD_UID = 1001
MAX_MESSAGE = 65536


class Raw:
    """One connection that speaks JSON datagrams and shows every reply as sent."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, rid: int, op: str, **params: Any) -> None:
        self.sock.send(json.dumps({"id": rid, "op": op, **params}).encode())

    def recv(self) -> dict[str, Any] | None:
        """The next reply (None at the end of the connection); fds it carries are closed."""
        data, anc, _flags, _ = self.sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(16 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            return None
        reply: dict[str, Any] = json.loads(data)
        reply["_nfds"] = sum(
            len(p) // 4 for lv, k, p in anc if lv == socket.SOL_SOCKET and k == socket.SCM_RIGHTS
        )
        return reply

    def call(self, rid: int, op: str, **params: Any) -> dict[str, Any]:
        self.send(rid, op, **params)
        reply = self.recv()
        assert reply is not None, f"connection closed instead of answering {op}"
        return reply

    def close(self) -> None:
        self.sock.close()


def assert_turned_away(conn: Raw) -> None:
    """The contract's EMFILE: one reply with id null, then the end of the connection."""
    try:
        reply = conn.recv()
    except ConnectionResetError:
        pytest.fail("connection reset instead of the EMFILE reply")
    assert reply is not None
    del reply["_nfds"]
    assert set(reply) == {"id", "ok", "error"}
    assert reply["id"] is None
    assert reply["ok"] is False
    assert set(reply["error"]) == {"code", "message"}
    assert reply["error"]["code"] == "EMFILE"
    assert isinstance(reply["error"]["message"], str)
    assert conn.recv() is None  # then closed


def admitted(path: str, timeout: float = 5.0) -> Raw:
    """A connection the daemon serves, retrying while it still counts a closed one."""
    deadline = time.monotonic() + timeout
    while True:
        conn = Raw(path)
        try:
            reply = conn.call(1, "hello")
        except ConnectionError:  # refused: see the test of a client that speaks first
            reply = {"ok": False, "error": {"code": "EMFILE"}}
        if reply["ok"]:
            return conn
        conn.close()
        assert reply["error"]["code"] == "EMFILE", reply
        assert time.monotonic() < deadline, "never admitted again"
        time.sleep(0.02)


@contextlib.contextmanager
def closing_all(conns: list[Raw]) -> Iterator[list[Raw]]:
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


# -- (1) connections: in all, and per uid -----------------------------------------


def test_max_clients_answers_EMFILE_then_closes_and_admits_again_after_a_close() -> None:
    with running_daemon({"max_clients": 3}) as d, closing_all([]) as conns:
        for _ in range(3):  # (admitted: the daemon may still count its start-up probe)
            conns.append(admitted(d.socket))
        fourth = Raw(d.socket)
        conns.append(fourth)
        assert_turned_away(fourth)
        assert "refused peer" in d.log()
        assert "max_clients reached" in d.log()
        # the three are still served, and the refused one was never counted
        stats = conns[0].call(10, "stats")
        assert stats["ok"]
        assert stats["clients"] == 3
        assert conns[1].call(11, "hello")["ok"]
        # once one of the three leaves, a newcomer gets in (and a fifth does not)
        conns[2].close()
        conns.append(admitted(d.socket))
        extra = Raw(d.socket)
        conns.append(extra)
        assert_turned_away(extra)


def test_a_refused_client_that_spoke_first_still_reads_EMFILE_then_the_end() -> None:
    """Real clients send their first request right after ``connect``, before the
    daemon gets to refuse them: the refusal must still arrive, then the end.

    The client waits for the hangup first, so the daemon has surely replied
    and closed; then it reads.
    """
    with running_daemon({"max_clients": 1}) as d, closing_all([]) as conns:
        conns.append(admitted(d.socket))
        late = Raw(d.socket)
        conns.append(late)
        late.send(1, "hello")
        poller = select.poll()
        poller.register(late.sock, select.POLLHUP)
        assert poller.poll(10_000), "the daemon never closed the refused connection"
        assert_turned_away(late)


# A uid-1000 client holds two connections, then tries a third; it then waits
# for a line on stdin before using its two connections once more.
HOLD_TWO = """
import socket
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(SOCK)
    return s
def hello(s, rid):
    s.send(json.dumps({"id": rid, "op": "hello"}).encode())
    return json.loads(s.recv(65536))
a, b = conn(), conn()
out = [hello(a, 1)["ok"], hello(b, 2)["ok"]]
c = conn()
out.append(json.loads(c.recv(65536)))
out.append(c.recv(65536) == b"")
print(json.dumps(out))
print("READY", flush=True)
sys.stdin.readline()
print(json.dumps([hello(a, 3)["ok"], hello(b, 4)["ok"]]))
"""

# One connection: prints the reply to a hello, or {"reset": true} when refused
# (a refused client that speaks first may see a reset: see the test above).
ONE_HELLO = """
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect(SOCK)
try:
    s.send(json.dumps({"id": 7, "op": "hello"}).encode())
    print(json.dumps(json.loads(s.recv(65536))))
except (BrokenPipeError, ConnectionResetError):
    print(json.dumps({"reset": True}))
"""

# One connection that says nothing: prints what the daemon sends, then whether it closed.
SILENT = """
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect(SOCK)
print(json.dumps([json.loads(s.recv(65536)), s.recv(65536) == b""]))
"""


def hello_as(d: DaemonProc, uid: int) -> dict[str, Any]:
    out = run_client(ONE_HELLO, d.socket, uid=uid)
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


def test_max_clients_per_uid_refuses_a_third_connection_of_that_uid_only() -> None:
    with running_daemon({"max_clients_per_uid": 2}) as d:
        holder = spawn_client(HOLD_TWO, d.socket, uid=OTHER_UID, stdin=subprocess.PIPE)
        try:
            first = json.loads(wait_line(holder, "["))
            wait_line(holder)
            assert first[:2] == [True, True]
            refusal = first[2]
            assert refusal["id"] is None
            assert refusal["ok"] is False
            assert refusal["error"]["code"] == "EMFILE"
            assert first[3] is True  # closed after the reply
            assert f"uid={OTHER_UID}: max_clients_per_uid reached" in d.log()
            # the bound is per uid, not per process: another uid-1000 process is refused...
            refusal, closed = json.loads(run_client(SILENT, d.socket, uid=OTHER_UID).stdout)
            assert refusal["error"]["code"] == "EMFILE"
            assert closed
            # ...while other uids still get in
            reply = hello_as(d, THIRD_UID)
            assert reply["ok"], reply
            with closing_all([Raw(d.socket)]) as (mine,):
                assert mine.call(1, "hello")["ok"]
            assert holder.stdin is not None
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert json.loads(wait_line(holder, "[")) == [True, True]
            assert holder.wait(10) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.communicate()
        # once the holder is gone, uid 1000 is admitted again
        eventually(lambda: hello_as(d, OTHER_UID).get("ok"))


# -- (2) accept when the daemon is out of fds ---------------------------------------

NOFILE = 40
# Sets RLIMIT_NOFILE, then becomes the daemon (exec keeps the pid).
LIMITED = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'shmbrokerd', *sys.argv[2:]])\n"
)


def start_with_nofile(d: DaemonProc, limit: int) -> None:
    """DaemonProc.start, but the daemon runs with at most ``limit`` fds."""
    d.start(command=(sys.executable, "-c", LIMITED, str(limit)))


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_out_of_fds_backs_off_instead_of_spinning_and_recovers() -> None:
    d = DaemonProc()
    try:
        start_with_nofile(d, NOFILE)
        limits = Path(f"/proc/{d.pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and line.split()[3:5] == [str(NOFILE)] * 2
            for line in limits.splitlines()
        ), limits
        with closing_all([]) as conns:
            # more connections than the daemon has fds for; each asks hello
            for i in range(NOFILE):
                conns.append(Raw(d.socket, timeout=0.05))
                conns[-1].send(i, "hello")
            eventually(lambda: "pausing accepts" in d.log())
            assert "Too many open files" in d.log()
            # it sits at its limit: some were served, the rest wait in the backlog
            served = 0
            for c in conns:
                with contextlib.suppress(TimeoutError):
                    reply = c.recv()
                    assert reply is not None
                    assert reply["ok"], reply
                    served += 1
            assert 0 < served < NOFILE
            assert d.fd_count() == NOFILE
            # the listener stays readable all along: a loop that retried at once
            # would burn a core (~2 s of CPU here); backing off costs next to nothing
            before = cpu_seconds(d.pid)
            time.sleep(2.0)
            spent = cpu_seconds(d.pid) - before
            assert spent < 0.5, f"daemon used {spent:.2f} s of CPU in 2 s while out of fds"
            assert d.proc is not None
            assert d.proc.poll() is None
        # every connection closed: the daemon frees its fds and serves newcomers
        with closing_all([Raw(d.socket)]) as (late,):
            assert late.call(1, "hello")["ok"]
        with Broker(d.socket) as b, b.create("after/emfile", 4096) as seg:
            seg.buf[0] = 1
            assert b.stat("after/emfile").leases == 1
        assert d.proc.poll() is None
    finally:
        d.cleanup()


# -- (3) waiting opens per connection -------------------------------------------------


def test_max_waiting_opens_refuses_one_more_with_EAGAIN_and_the_others_complete() -> None:
    with running_daemon({"max_waiting_opens": 2}) as d, closing_all([]) as conns:
        waiter, other = Raw(d.socket), Raw(d.socket)
        conns += [waiter, other]
        waiter.send(1, "open", name="w/seg", wait=30)
        waiter.send(2, "open", name="w/seg", access="rw", wait=30)
        third = waiter.call(3, "open", name="w/seg", wait=30)
        assert third["id"] == 3
        assert third["ok"] is False
        assert third["error"]["code"] == "EAGAIN"
        # the bound is per connection: another one may still wait
        other.send(1, "open", name="w/seg", wait=30)
        assert other.call(2, "hello")["ok"]  # its wait was taken, not refused
        with Broker(d.socket) as b, b.create("w/seg", 4096, mode=0o644) as seg:
            seg.buf[:2] = b"ok"
            replies = {r["id"]: r for r in (waiter.recv(), waiter.recv()) if r is not None}
            assert sorted(replies) == [1, 2]
            assert all(r["ok"] and r["_nfds"] == 1 for r in replies.values()), replies
            assert replies[1]["segment"]["name"] == "w/seg"
            got = other.recv()
            assert got is not None
            assert got["id"] == 1
            assert got["ok"]
            # the completed waits freed their slots
            waiter.send(4, "open", name="w/next", wait=30)
            waiter.send(5, "open", name="w/next", wait=30)
            assert waiter.call(6, "hello")["ok"]
            with b.create("w/next", 4096, mode=0o644):
                again = {r["id"]: r for r in (waiter.recv(), waiter.recv()) if r is not None}
                assert sorted(again) == [4, 5]
                assert all(r["ok"] for r in again.values()), again
                for c in conns:
                    c.close()  # leases end with the connections


# -- (4) a peer that never reads -------------------------------------------------------

# Connects, sends hellos without ever reading a reply until the daemon drops
# it, then does it again, until the stop file exists. Prints FIRST-DROP once,
# then a summary.
FLOOD = """
import socket
stop = STOP_PATH
drops = sent = 0
print("READY", flush=True)
req = json.dumps({"id": 1, "op": "hello"}).encode()
while not os.path.exists(stop):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(SOCK)
    try:
        while True:
            s.send(req)
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        drops += 1
        if drops == 1:
            print("FIRST-DROP", sent, flush=True)
    except TimeoutError:
        print(json.dumps({"error": "never dropped", "sent": sent}), flush=True)
        sys.exit(1)
    finally:
        s.close()
print(json.dumps({"drops": drops, "sent": sent}), flush=True)
"""


def round_trips(conn: Raw, count: int) -> list[float]:
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        reply = conn.call(i, "hello")
        times.append(time.perf_counter() - t0)
        assert reply["ok"]
        assert reply["id"] == i
    return times


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99) - 1]


def test_a_peer_that_never_reads_is_dropped_and_does_not_delay_others() -> None:
    with running_daemon({"max_queued_replies": 8}) as d, closing_all([]) as conns:
        probe = Raw(d.socket)
        conns.append(probe)
        baseline = p99(round_trips(probe, 300))
        stop = d.root / "stop-flood"
        flood = spawn_client(FLOOD.replace("STOP_PATH", repr(str(stop))), d.socket)
        try:
            wait_line(flood)
            wait_line(flood, "FIRST-DROP")
            under_flood = p99(round_trips(probe, 300))
            stop.touch()
            summary = json.loads(wait_line(flood, "{"))
            assert flood.wait(15) == 0
        finally:
            stop.touch()
            if flood.poll() is None:
                flood.kill()
            flood.communicate()
        assert summary["drops"] >= 1, summary
        assert "reply queue full (peer does not read)" in d.log()
        # Robustness, not a benchmark: a daemon that waited on the stuck peer
        # would stall the probe until the peer gave up (seconds, or for good);
        # one that drops it keeps the probe near its baseline (a few ms here).
        # The machine is shared (2 cores, the flooder, other test runs; load
        # averages of 50 were seen), so the bound is loose on purpose: 10x the
        # baseline, and never under 0.2 s of scheduling noise.
        bound = max(10 * baseline, 0.2)
        assert under_flood < bound, (
            f"p99 hello round trip {under_flood * 1e3:.1f} ms under flood, "
            f"baseline {baseline * 1e3:.2f} ms"
        )
        eventually(lambda: probe.call(1000, "stats")["clients"] == 1)  # the flooder is gone


# -- (5) segment limits, and reload raising them -----------------------------------------


def refused(code: str, fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(BrokerError) as info:
        fn(*args, **kw).close()
    assert info.value.code == code, info.value
    return str(info.value)


def test_segment_limits_over_the_wire_and_reload_raises_them_live() -> None:
    config = {"max_segment_size": 8192, "max_segments": 3, "max_total_bytes": 20000}
    with running_daemon(config) as d, Broker(d.socket) as b:
        assert "max_segment_size" in refused("EINVAL", b.create, "lim/huge", 8193)
        a = b.create("lim/a", 8192)
        c = b.create("lim/b", 8192)
        assert "max_total_bytes" in refused("ENOSPC", b.create, "lim/c", 8192)
        e = b.create("lim/c", 2048)  # 18432 bytes in 3 segments
        assert "max_segments" in refused("ENOSPC", b.create, "lim/d", 1)
        assert b.stats().segments == 3
        # raise all three and reload, on this same connection
        d.write_config(max_segment_size=16384, max_segments=4, max_total_bytes=1 << 20)
        b.reload()
        assert "configuration reloaded" in d.log()
        assert b.hello().limits.max_segment_size == 16384
        f = b.create("lim/d", 16384)
        assert "max_segments" in refused("ENOSPC", b.create, "lim/e", 1)
        assert "max_segment_size" in refused("EINVAL", b.create, "lim/e", 16385)
        for seg in (a, c, e, f):
            seg.close()
        eventually(lambda: d.objects() == [])
