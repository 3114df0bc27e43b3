"""Lifetimes, deletion, waits, exist_ok and seal, against a real daemon.

Other holders are real separate processes (``Holder``: a client process
driven line by line over its stdin), killed with a real SIGKILL where the
contract speaks of a client dying.
"""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmbroker import Broker, BrokerError, SegmentTimeoutError
from tests.support.helpers import DaemonProc, eventually, spawn_client, wait_line

# A client process that executes one JSON command per stdin line and answers
# one "R {json}" line: open/read/write/close on segments it keeps by name.
HOLDER = """
b = Broker(SOCK)
segs = {}
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, name = cmd["op"], cmd.get("name")
    try:
        if op == "open":
            s = b.open(name, cmd.get("access", "ro"), cmd.get("wait"))
            segs[name] = s
            out = {"id": s.id, "size": s.size}
        elif op == "create":
            s = b.create(name, cmd["size"], cmd.get("lifetime", "refcount"))
            segs[name] = s
            out = {"id": s.id}
        elif op == "read":
            out = {"data": bytes(segs[name].buf[: cmd["n"]]).decode()}
        elif op == "write":
            data = cmd["data"].encode()
            segs[name].buf[: len(data)] = data
            out = {}
        elif op == "close":
            segs.pop(name).close()
            out = {}
        else:
            out = {"error": "bad command"}
    except OSError as exc:
        builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
        out = {"error": builtin.__name__, "errno": exc.errno}
    print("R " + json.dumps(out), flush=True)
"""


class Holder:
    """A separate client process holding segments, driven over stdin."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(wait_line(self.proc, "R ")[2:])
        return result

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.send(op, **kw)
        return self.reply()


@contextlib.contextmanager
def holder(daemon: DaemonProc) -> Iterator[Holder]:
    proc = spawn_client(HOLDER, daemon.socket, stdin=subprocess.PIPE)
    try:
        wait_line(proc)
        yield Holder(proc)
    finally:
        _end(proc)


@contextlib.contextmanager
def client(code: str, daemon: DaemonProc) -> Iterator[subprocess.Popen[str]]:
    proc = spawn_client(code, daemon.socket)
    try:
        yield proc
    finally:
        _end(proc)


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def gone(b: Broker, name: str) -> bool:
    try:
        b.stat(name)
    except FileNotFoundError:
        return True
    return False


def objects_are(daemon: DaemonProc, *names: str) -> None:
    """The daemon's objects in /dev/shm are exactly ``names`` (unlinks happen
    before the reply that reports them)."""
    assert daemon.objects() == sorted(names)


def assert_still_there(b: Broker, name: str, released_at: float, ttl: float) -> None:
    """The ttl segment released at ``released_at`` must exist until ``ttl`` s later."""
    try:
        b.stat(name)
    except FileNotFoundError:
        late = time.monotonic() - released_at
        assert late >= ttl, f"{name} expired {late:.3f} s after release, ttl is {ttl}"
        pytest.fail(f"too slow to observe {name} before its ttl ({late:.3f} s)")


# -- a client dying -------------------------------------------------------------


def test_sigkilled_client_leases_are_released(daemon: DaemonProc) -> None:
    code = """
    b = Broker(SOCK)
    rc = b.create("kill/rc", 4096)
    own = b.create("kill/own", 4096, lifetime="owner")
    own.buf[:6] = b"killed"
    keep = b.open("kill/keep")
    print("READY", rc.id, own.id, keep.id, flush=True)
    time.sleep(600)
    """
    with Broker(daemon.socket) as b, b.create("kill/keep", 4096, lifetime="persistent") as keep:
        with client(code, daemon) as proc:
            _, rc_id, own_id, keep_id = wait_line(proc).split()
            assert keep_id == keep.id
            with b.open("kill/own") as own:  # a second holder does not save an owner segment
                assert b.stat("kill/rc").leases == 1
                assert b.stat("kill/own").leases == 2
                assert b.stat("kill/keep").leases == 2
                expected = {daemon.prefix + i for i in (rc_id, own_id, keep.id)}
                objects_are(daemon, *expected)

                proc.send_signal(signal.SIGKILL)
                assert proc.wait(10) == -signal.SIGKILL

                eventually(lambda: gone(b, "kill/rc") and gone(b, "kill/own"))
                eventually(lambda: b.stat("kill/keep").leases == 1)
                objects_are(daemon, daemon.prefix + keep.id)
                assert [s.name for s in b.list("kill/")] == ["kill/keep"]
                with pytest.raises(FileNotFoundError):
                    b.open("kill/own")
                assert bytes(own.buf[:6]) == b"killed"  # our mapping outlives the unlink
            # releasing a lease on a deleted segment still succeeds (close did not raise)
        b.delete("kill/keep")
    objects_are(daemon)


def test_persistent_survives_its_creator_and_goes_only_by_delete(daemon: DaemonProc) -> None:
    code = """
    b = Broker(SOCK)
    seg = b.create("p/x", 4096, lifetime="persistent", mode=0o644)
    seg.buf[:7] = b"persist"
    print("READY", seg.id, flush=True)
    time.sleep(600)
    """
    with client(code, daemon) as proc:
        seg_id = wait_line(proc).split()[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with Broker(daemon.socket) as b:
        eventually(lambda: b.stat("p/x").leases == 0)
        info = b.stat("p/x")
        assert (info.id, info.lifetime, info.size) == (seg_id, "persistent", 4096)
        with b.open("p/x") as seg:
            assert bytes(seg.buf[:7]) == b"persist"
        assert b.stat("p/x").leases == 0
        objects_are(daemon, daemon.prefix + seg_id)
        b.delete("p/x")
        assert gone(b, "p/x")
        objects_are(daemon)
        with pytest.raises(FileNotFoundError) as exc:
            b.delete("p/x")
        assert exc.value.errno == errno.ENOENT


# -- owner and refcount -----------------------------------------------------------


def test_owner_segment_goes_with_the_creating_lease(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b, holder(daemon) as h:
        owner = a.create("own/x", 4096, lifetime="owner")
        owner.buf[:5] = b"owner"
        seg_id = owner.id
        assert h.call("open", name="own/x", access="rw")["id"] == seg_id
        with b.open("own/x", "rw") as mine:
            assert b.stat("own/x").leases == 3
            owner.close()
            # the name is gone at once; new opens fail
            assert gone(b, "own/x")
            assert h.call("open", name="own/x") == {"error": "FileNotFoundError", "errno": 2}
            with pytest.raises(FileNotFoundError):
                b.open("own/x")
            objects_are(daemon)
            # the other holders still share the same memory, both ways
            assert h.call("read", name="own/x", n=5) == {"data": "owner"}
            assert h.call("write", name="own/x", data="other") == {}
            assert bytes(mine.buf[:5]) == b"other"
            mine.buf[:5] = b"mine!"
            assert h.call("read", name="own/x", n=5) == {"data": "mine!"}
        assert h.call("close", name="own/x") == {}
        # the name may be created again, as a new segment
        with a.create("own/x", 4096, lifetime="owner") as again:
            assert again.id != seg_id
            assert bytes(again.buf[:5]) == bytes(5)
    objects_are(daemon)


def test_refcount_segment_goes_after_its_last_holder(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b, holder(daemon) as h:
        first = a.create("rc/x", 4096)  # lifetime defaults to refcount
        assert first.info.lifetime == "refcount"
        assert h.call("open", name="rc/x")["id"] == first.id
        second = b.open("rc/x")
        assert a.stat("rc/x").leases == 3
        first.close()  # the creator is not special
        assert a.stat("rc/x").leases == 2
        second.close()
        assert a.stat("rc/x").leases == 1
        objects_are(daemon, daemon.prefix + first.id)
        assert h.call("close", name="rc/x") == {}
        assert gone(a, "rc/x")
        objects_are(daemon)


# -- ttl ----------------------------------------------------------------------------


def test_ttl_counts_down_from_the_last_release(daemon: DaemonProc) -> None:
    ttl = 0.3
    with Broker(daemon.socket) as b:
        seg = b.create("ttl/x", 4096, lifetime="ttl", ttl=ttl)
        info = b.stat("ttl/x")
        assert (info.lifetime, info.ttl) == ("ttl", ttl)
        time.sleep(2 * ttl)  # held: no countdown
        assert b.stat("ttl/x").leases == 1
        seg.close()
        released = time.monotonic()
        assert_still_there(b, "ttl/x", released, ttl)
        assert b.stat("ttl/x").leases == 0
        eventually(lambda: gone(b, "ttl/x"))
        assert time.monotonic() - released >= ttl - 0.01
        objects_are(daemon)
        with pytest.raises(FileNotFoundError):
            b.open("ttl/x")


def test_new_lease_cancels_the_ttl_countdown(daemon: DaemonProc) -> None:
    ttl = 0.5
    with Broker(daemon.socket) as a, holder(daemon) as h:
        a.create("ttl/c", 4096, lifetime="ttl", ttl=ttl).close()
        released = time.monotonic()
        reply = h.call("open", name="ttl/c")  # another process, during the countdown
        assert "id" in reply, f"open during the countdown failed: {reply}"
        assert_still_there(a, "ttl/c", released, ttl)
        time.sleep(3 * ttl)  # well past the original deadline
        assert a.stat("ttl/c").leases == 1
        assert h.call("close", name="ttl/c") == {}
        released = time.monotonic()
        assert_still_there(a, "ttl/c", released, ttl)  # the countdown starts over
        eventually(lambda: gone(a, "ttl/c"))
        objects_are(daemon)


def test_ttl_zero_goes_at_once(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b:
        with b.create("ttl/zero", 4096, lifetime="ttl", ttl=0) as seg, b.open("ttl/zero"):
            assert seg.info.ttl == 0
        assert gone(b, "ttl/zero")
        objects_are(daemon)


# -- delete ---------------------------------------------------------------------------


def test_delete_while_mapped_keeps_mappings_and_frees_the_name(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, holder(daemon) as h:
        seg = b.create("del/x", 4096, lifetime="persistent")
        seg.buf[:3] = b"old"
        old_id = seg.id
        assert h.call("open", name="del/x", access="rw")["id"] == old_id
        b.delete("del/x")
        assert gone(b, "del/x")
        objects_are(daemon)
        assert h.call("open", name="del/x") == {"error": "FileNotFoundError", "errno": 2}
        # both mappings remain one shared, writable memory
        seg.buf[:5] = b"after"
        assert h.call("read", name="del/x", n=5) == {"data": "after"}
        assert h.call("write", name="del/x", data="back!") == {}
        assert bytes(seg.buf[:5]) == b"back!"
        # the name is free at once, for a new segment
        with b.create("del/x", 4096) as again:
            assert again.id != old_id
            assert bytes(again.buf[:5]) == bytes(5)
            assert b.stat("del/x").id == again.id
            assert h.call("read", name="del/x", n=5) == {"data": "back!"}
            seg.close()  # releasing a lease of the deleted segment succeeds
            assert h.call("close", name="del/x") == {}
            assert b.stat("del/x").leases == 1  # the new segment was not touched
        objects_are(daemon)


# -- open with wait ----------------------------------------------------------------------


def test_waiter_gets_the_segment_another_process_creates(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, holder(daemon) as h:
        h.send("open", name="w/late", wait=30)
        eventually(lambda: b.stats().requests.get("open", 0) >= 1)  # it is waiting
        assert gone(b, "w/late")
        with b.create("w/late", 8192) as seg:
            seg.buf[:12] = b"for a waiter"
            reply = h.reply()
            assert reply == {"id": seg.id, "size": 8192}
            assert h.call("read", name="w/late", n=12) == {"data": "for a waiter"}
            assert b.stat("w/late").leases == 2
            assert h.call("close", name="w/late") == {}
    objects_are(daemon)


def test_wait_that_runs_out_is_timeout(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as exc:
            b.open("w/never", wait=0.3)
        assert time.monotonic() - t0 >= 0.29  # it did wait
        assert exc.value.errno == errno.ETIMEDOUT
        assert isinstance(exc.value, SegmentTimeoutError)
        with b.create("w/never", 4096):  # the expired waiter got no lease
            assert b.stat("w/never").leases == 1


def test_wait_zero_on_absent_is_timeout_at_once(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as exc:
            b.open("w/zero", wait=0)
        assert exc.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - t0 < 10
        with b.create("w/zero", 4096), b.open("w/zero", wait=0) as seg:  # present: granted
            assert seg.size == 4096


def test_wait_over_max_wait_is_einval(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b:
        max_wait = b.hello().limits.max_wait
        for bad in (max_wait + 1, -1):
            with pytest.raises(BrokerError) as exc:
                b.open("w/long", wait=bad)
            assert exc.value.errno == errno.EINVAL, bad
        with b.create("w/long", 4096):  # out of range whether or not it would wait
            with pytest.raises(BrokerError) as exc:
                b.open("w/long", wait=max_wait + 1)
            assert exc.value.errno == errno.EINVAL
            assert b.stat("w/long").leases == 1


# -- exist_ok, seal --------------------------------------------------------------------------


def test_create_exist_ok_maps_the_same_memory(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b:
        with a.create("ex/x", 4096) as first, b.create("ex/x", 4096, exist_ok=True) as second:
            assert second.id == first.id
            assert not second.readonly
            assert a.stat("ex/x").leases == 2
            first.buf[:5] = b"first"
            assert bytes(second.buf[:5]) == b"first"
            second.buf[:6] = b"second"
            assert bytes(first.buf[:6]) == b"second"
            with pytest.raises(FileExistsError) as exc:
                b.create("ex/x", 8192, exist_ok=True)
            assert exc.value.errno == errno.EEXIST
            with pytest.raises(FileExistsError):
                b.create("ex/x", 4096)
            assert a.stat("ex/x").leases == 2
        with b.create("ex/new", 4096, exist_ok=True) as made:  # absent: an ordinary create
            assert made.info.leases == 1
    objects_are(daemon)


def test_sealed_segment_refuses_rw_and_grants_ro(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b, a.create("seal/x", 4096) as seg:
        seg.buf[:6] = b"sealed"
        info = a.seal("seal/x")
        assert info.sealed
        assert a.stat("seal/x").sealed
        with pytest.raises(PermissionError) as exc:
            b.open("seal/x", "rw")
        assert exc.value.errno == errno.EPERM
        with pytest.raises(PermissionError) as exc:
            b.create("seal/x", 4096, exist_ok=True)  # behaves like an rw open
        assert exc.value.errno == errno.EPERM
        with b.open("seal/x") as ro:
            assert ro.readonly
            assert ro.sealed
            assert bytes(ro.buf[:6]) == b"sealed"
        assert a.stat("seal/x").leases == 1
    objects_are(daemon)


# -- the daemon going away ----------------------------------------------------------------------


def test_mappings_survive_daemon_sigterm(daemon: DaemonProc) -> None:
    b = Broker(daemon.socket, reconnect_timeout=0)
    with holder(daemon) as h:
        seg = b.create("term/x", 4096)
        assert h.call("open", name="term/x", access="rw")["id"] == seg.id
        daemon.signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(5) == 0
        objects_are(
            daemon, daemon.prefix + seg.id
        )  # held: kept for reclaim after a restart, as by a crash
        seg.buf[:4] = b"term"
        assert h.call("read", name="term/x", n=4) == {"data": "term"}
        assert h.call("write", name="term/x", data="live") == {}
        assert bytes(seg.buf[:4]) == b"live"
        seg.close()  # the lease went with the daemon: no error
        assert seg.closed
    b.close()
