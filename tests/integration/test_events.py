"""The event stream, against a real daemon: sequences, fields, prefixes, the
socket file, and a subscriber that never reads.

ZeroMQ's slow joiner: a SUB socket receives nothing published before its
subscription reaches the PUB side, and nothing says when that is.  So every
watcher is first synchronised (``synced_watch``): probe segments are created
under its prefix until one of their events arrives.  After that, sequences
are read up to a marker (``collect``): a segment created and closed after the
operations under test, whose ``deleted`` event closes the list, so a sequence
is checked exactly, with no sleeping and no "nothing more within N s".
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shmbroker import Broker
from shmbroker.wire import Event
from tests.support.helpers import DaemonProc, eventually, spawn_client, wait_line

if TYPE_CHECKING:
    from shmbroker._watch import Watcher

_markers = itertools.count()
MARK = "zz-marker-"


def synced_watch(b: Broker, prefix: str) -> Watcher:
    """A watcher on ``prefix`` that is known to receive, with nothing pending."""
    w = b.watch(prefix)
    try:
        for i in itertools.count():
            if i == 500:
                raise AssertionError(f"no event for {prefix!r} after {i} probes")
            b.create(f"{prefix}probe", 1).close()
            with contextlib.suppress(TimeoutError):
                w.next(timeout=0.05)
                break
        collect(w, b, prefix)  # drop the rest of the probes' events
    except BaseException:
        w.close()
        raise
    return w


def collect(w: Watcher, b: Broker, prefix: str) -> list[Event]:
    """Every event before a fresh marker's ``deleted``, markers left out.

    Operations done before this call (and their effects) are all published
    before the marker's own ``create`` is handled, so nothing is missed.
    """
    marker = f"{prefix}{MARK}{next(_markers)}"
    b.create(marker, 1).close()
    events: list[Event] = []
    while True:
        ev = w.next(timeout=10)
        if ev.name == marker and ev.event == "deleted":
            return events
        if MARK not in ev.name:
            events.append(ev)


@contextlib.contextmanager
def watching(b: Broker, prefix: str) -> Iterator[Watcher]:
    w = synced_watch(b, prefix)
    try:
        yield w
    finally:
        w.close()


@contextlib.contextmanager
def client(
    code: str, daemon: DaemonProc, stdin: int | None = None, uid: int | None = None
) -> Iterator[subprocess.Popen[str]]:
    proc = spawn_client(code, daemon.socket, stdin=stdin, uid=uid)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def seq(events: list[Event]) -> list[tuple[str, str, int | None]]:
    return [(e.event, e.name, e.pid) for e in events]


def gone(b: Broker, name: str) -> bool:
    try:
        b.stat(name)
    except FileNotFoundError:
        return True
    return False


def opener(name: str, wait: float) -> str:
    """A client that opens ``name`` (waiting), says OPENED, closes it when told."""
    return f"""
b = Broker(SOCK)
print("READY", flush=True)
seg = b.open({name!r}, "ro", wait={wait!r})
print("OPENED", seg.id, flush=True)
sys.stdin.readline()
seg.close()
print("CLOSED", flush=True)
sys.stdin.readline()
"""


def tell(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


NOBODY = 65534


def test_sequence_and_fields_of_a_segments_life(daemon: DaemonProc) -> None:
    me, uid = os.getpid(), os.getuid()
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b, watching(a, "ev/") as w:
        t0 = time.time()
        with client(opener("ev/x", 30), daemon, stdin=subprocess.PIPE, uid=NOBODY) as other:
            wait_line(other)
            eventually(lambda: a.stats().requests.get("open", 0) >= 1)  # it waits
            seg = a.create("ev/x", 4096, mode=0o644)
            wait_line(other, "OPENED")
            twin = b.create("ev/x", 4096, exist_ok=True)
            a.seal("ev/x")
            tell(other)
            wait_line(other, "CLOSED")
            twin.close()
            seg.close()
            events = collect(w, a, "ev/")
            t1 = time.time()
    x = "ev/x"
    assert [(e.event, e.name, e.pid, e.uid) for e in events] == [
        ("created", x, me, uid),  # no "opened" for the creator's own lease
        ("opened", x, other.pid, NOBODY),  # the waiting open, granted by the create
        ("opened", x, me, uid),  # exist_ok
        ("sealed", x, me, uid),
        ("released", x, other.pid, NOBODY),
        ("released", x, me, uid),
        ("released", x, me, uid),
        ("deleted", x, me, uid),  # refcount: by the last release
    ]
    for ev in events:
        assert ev.size == 4096
        assert t0 <= ev.ts <= t1
    assert [e.ts for e in events] == sorted(e.ts for e in events)


def test_events_of_each_lifetime(daemon: DaemonProc) -> None:
    me = os.getpid()
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b, watching(a, "lt/") as w:
        # persistent: only delete unlinks it
        a.create("lt/p", 10, lifetime="persistent").close()
        a.delete("lt/p")
        # owner: the creator's release unlinks it; a later release still reports
        own = a.create("lt/o", 20, lifetime="owner")
        other = b.open("lt/o")
        own.close()
        other.close()
        # deleted while mapped: the lease ends after the deletion
        held = a.create("lt/d", 30)
        a.delete("lt/d")
        held.close()
        # ttl: released now, expired later, by nobody
        a.create("lt/t", 40, lifetime="ttl", ttl=0.2).close()
        eventually(lambda: gone(a, "lt/t"))
        a.create("lt/t0", 50, lifetime="ttl", ttl=0).close()
        events = collect(w, a, "lt/")
    assert seq(events) == [
        ("created", "lt/p", me),
        ("released", "lt/p", me),
        ("deleted", "lt/p", me),
        ("created", "lt/o", me),
        ("opened", "lt/o", me),
        ("released", "lt/o", me),
        ("deleted", "lt/o", me),
        ("released", "lt/o", me),
        ("created", "lt/d", me),
        ("deleted", "lt/d", me),
        ("released", "lt/d", me),
        ("created", "lt/t", me),
        ("released", "lt/t", me),
        ("expired", "lt/t", None),
        ("created", "lt/t0", me),
        ("released", "lt/t0", me),
        ("expired", "lt/t0", None),
    ]
    sizes = {"lt/p": 10, "lt/o": 20, "lt/d": 30, "lt/t": 40, "lt/t0": 50}
    for ev in events:
        assert ev.size == sizes[ev.name]
        assert ev.uid == (None if ev.event == "expired" else os.getuid())


def test_a_killed_clients_leases_are_released_in_events(daemon: DaemonProc) -> None:
    code = """
    b = Broker(SOCK)
    seg = b.create("kill/x", 4096)
    print("READY", flush=True)
    time.sleep(600)
    """
    with Broker(daemon.socket) as b, watching(b, "kill/") as w, client(code, daemon) as proc:
        wait_line(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        eventually(lambda: gone(b, "kill/x"))
        events = collect(w, b, "kill/")
    assert seq(events) == [
        ("created", "kill/x", proc.pid),
        ("released", "kill/x", proc.pid),
        ("deleted", "kill/x", proc.pid),
    ]


def test_subscription_selects_a_prefix(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, watching(b, "pf/a/") as narrow, watching(b, "pf/") as wide:
        for name in ("pf/b/x", "pf/ab", "pf/a", "pf/a/x", "other/x", "pf/a/y/z"):
            b.create(name, 1).close()
        narrow_events = collect(narrow, b, "pf/a/")
        wide_events = collect(wide, b, "pf/")
    assert [(e.event, e.name) for e in narrow_events] == [
        ("created", "pf/a/x"),
        ("released", "pf/a/x"),
        ("deleted", "pf/a/x"),
        ("created", "pf/a/y/z"),
        ("released", "pf/a/y/z"),
        ("deleted", "pf/a/y/z"),
    ]
    # the others were published: the wide watcher saw them, in order
    names = [e.name for e in wide_events if e.event == "created"]
    assert names == ["pf/b/x", "pf/ab", "pf/a", "pf/a/x", "pf/a/y/z"]


@pytest.mark.parametrize("mode", [0o620, 0o666])
def test_events_socket_file_has_the_request_sockets_mode(mode: int) -> None:
    d = DaemonProc({"socket_mode": mode})
    try:
        d.start()
        with Broker(d.socket) as b:
            endpoint = b.hello().events
        assert endpoint == "ipc://" + os.path.join(os.path.dirname(d.socket), "events.sock")
        events = os.stat(endpoint.removeprefix("ipc://"))
        request = os.stat(d.socket)
        assert stat.S_ISSOCK(events.st_mode)
        assert stat.S_IMODE(request.st_mode) == mode
        assert stat.S_IMODE(events.st_mode) == mode
        assert (events.st_uid, events.st_gid) == (request.st_uid, request.st_gid)
    finally:
        d.cleanup()


STUCK = """
import zmq
b = Broker(SOCK)
sub = zmq.Context.instance().socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.RCVHWM, 10)
sub.connect(b.hello().events)
for _ in range(500):  # until it surely receives
    b.create("stuck/probe", 1).close()
    if sub.poll(50):
        break
else:
    sys.exit("never received an event")
print("READY", flush=True)
time.sleep(600)  # and never read again
"""


def test_a_subscriber_that_never_reads_does_not_slow_the_daemon(daemon: DaemonProc) -> None:
    cycles = 10_000  # an open and a release each: 20,000 events
    with Broker(daemon.socket) as b, client(STUCK, daemon) as stuck:
        wait_line(stuck)
        stuck.send_signal(signal.SIGSTOP)  # not even its zmq thread reads now
        try:
            with b.create("storm/x", 64, lifetime="persistent") as keep:
                t0 = time.monotonic()
                for _ in range(cycles):
                    b.open("storm/x").close()
                elapsed = time.monotonic() - t0
                assert elapsed < 60, f"{cycles} open/close cycles took {elapsed:.1f} s"
                assert b.stat("storm/x").leases == 1
            b.delete("storm/x")
            assert keep.closed
            # the stream still flows to a subscriber that reads
            with watching(b, "storm/") as w:
                b.create("storm/after", 8).close()
                events = collect(w, b, "storm/")
            assert [(e.event, e.name) for e in events] == [
                ("created", "storm/after"),
                ("released", "storm/after"),
                ("deleted", "storm/after"),
            ]
        finally:
            stuck.send_signal(signal.SIGKILL)


class _Publisher:
    """An EventPublisher driven as the daemon's loop drives it, with a SUB or XSUB peer."""

    def __init__(self, tmp_path: Path) -> None:
        from shmbrokerd.events import EventPublisher

        self.endpoint = f"ipc://{tmp_path}/ev.sock"
        self.deferred: list[Callable[[], None]] = []
        self.pub = EventPublisher(self.endpoint, 100, defer=self.deferred.append)
        self.poller = select.poll()
        self.poller.register(self.pub.fileno(), select.POLLIN)

    def turn(self) -> None:
        """One turn of the loop: zmq's fd if it says so, then what was deferred."""
        if self.poller.poll(10):
            self.pub.readable()
        todo, self.deferred[:] = list(self.deferred), []
        for cb in todo:
            cb()

    def until(self, cond: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            self.turn()
        return cond()

    def publish(self, name: str) -> None:
        from shmbrokerd.registry import Publish

        self.pub.publish(Publish("created", name, 1, 0, 1), 0.0)


def test_the_publisher_knows_which_prefixes_are_subscribed(tmp_path: Path) -> None:
    """Events nobody subscribed to are never encoded: the XPUB side tracks topics."""
    import zmq

    p = _Publisher(tmp_path)
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    try:
        assert not p.pub.wanted("a/x")
        sub.connect(p.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"a/")
        assert p.until(lambda: bool(p.pub.topics))
        assert p.pub.wanted("a/x")
        assert not p.pub.wanted("b/x")
        p.publish("a/x")
        p.publish("b/x")
        assert sub.poll(5000)
        assert sub.recv_multipart()[0] == b"a/x"
        assert not sub.poll(100)  # b/x was never sent
    finally:
        sub.close(linger=0)
        p.pub.close()


def test_a_stray_unsubscribe_does_not_silence_subscribers(tmp_path: Path) -> None:
    """libzmq passes up an unsubscribe that matched nothing: it must not count."""
    import zmq

    p = _Publisher(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub, rogue = ctx.socket(zmq.SUB), ctx.socket(zmq.XSUB)
    try:
        sub.connect(p.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"cam/")
        assert p.until(lambda: p.pub.wanted("cam/1"))
        rogue.connect(p.endpoint)
        for _ in range(50):
            rogue.send(b"\x00cam/")  # cancel what it never subscribed to
            p.turn()
        assert p.pub.wanted("cam/1")
        p.publish("cam/1")
        assert sub.poll(5000)
        assert sub.recv_multipart()[0] == b"cam/1"
    finally:
        sub.close(linger=0)
        rogue.close(linger=0)
        p.pub.close()


def test_a_flood_up_the_event_socket_is_read_in_bounded_turns(tmp_path: Path) -> None:
    """A peer sending junk never keeps the daemon in one callback."""
    import zmq

    p = _Publisher(tmp_path)
    rogue: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XSUB)
    try:
        rogue.connect(p.endpoint)
        for i in range(900):  # under the socket's receive high-water mark (1000)
            rogue.send(b"junk %d" % i)
        rogue.send(b"\x01late/")
        reads = 0
        read = p.pub.readable

        def counted() -> None:
            nonlocal reads
            reads += 1
            read()

        p.pub.readable = counted  # type: ignore[method-assign]
        turns = 0
        while not p.pub.wanted("late/x"):
            assert turns < 1000
            start = time.monotonic()
            p.turn()
            assert time.monotonic() - start < 1.0
            turns += 1
        # 64 messages per callback at most, the rest deferred to a later callback
        # (a turn may run two: zmq's fd, then what was deferred)
        assert reads >= -(-901 // 64)
        assert p.pub.topics == {b"late/"}  # junk is not a subscription
    finally:
        rogue.close(linger=0)
        p.pub.close()
