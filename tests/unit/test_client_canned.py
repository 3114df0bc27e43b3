"""Both brokers over canned bytes, with no daemon: httpcore's mock backend, as a socket.

A scripted peer listens where a daemon would.  It checks each request's
datagram byte for byte and answers with canned bytes (and a memfd where the
reply carries an fd), so every public method of :class:`Broker` (generated
from ``_async.py``) and :class:`AsyncBroker`, over each transport, is pinned
to what it sends and to what it makes of a reply: the result, the mapping,
the errno-based exception, the pipelined release.  The daemon's side of the
same exchanges is tested against real daemons elsewhere.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmbroker import (
    AsyncBroker,
    Broker,
    BrokerError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentPermissionError,
    SegmentTimeoutError,
    wire,
)

#: one step of a script: the request expected, the reply (None: hang up), an fd to send
Step = tuple[bytes, bytes | None, int | None]

HANG_UP = None


def segment(name: str = "a", size: int = 4096, sid: str = "s1", **over: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "name": name,
        "size": size,
        "lifetime": "refcount",
        "ttl": None,
        "sealed": False,
        "backing": "shm",
        "mode": 0o600,
        "created": 1.5,
        "owner_uid": 1000,
        "owner_gid": 1000,
        "leases": 1,
        **over,
    }


def ok(rid: int, **result: Any) -> bytes:
    return json.dumps({"id": rid, "ok": True, **result}).encode()


def fail(rid: int | None, code: str, message: str = "no") -> bytes:
    return json.dumps(
        {"id": rid, "ok": False, "error": {"code": code, "message": message}}
    ).encode()


def memfd(size: int = 4096) -> int:
    fd = os.memfd_create("canned", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class Peer:
    """Plays a script on the first connection, then records what else comes until EOF."""

    def __init__(self, path: Path, steps: list[Step]) -> None:
        self.path = str(path)
        self.steps = steps
        self.got: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            for want, reply, fd in self.steps:
                data = _recv(conn)
                self.got.append(data)
                if data != want or reply is HANG_UP:
                    self._stop_listening()
                    return
                anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fds(fd))]
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.sendmsg([reply], anc)  # an async release's reply may find it gone
            while data := _recv(conn):  # what the script did not expect
                self.got.append(data)
        self._stop_listening()

    def _stop_listening(self) -> None:
        self._listener.close()
        os.unlink(self.path)  # a reconnect finds no daemon

    def join(self) -> list[bytes]:
        """What the client sent, once it hung up (or the script stopped)."""
        self._thread.join(10)
        assert not self._thread.is_alive(), "the client never hung up"
        return self.got


def _recv(conn: socket.socket) -> bytes:
    """One datagram; b"" at the client's end (a reset: it left a reply unread)."""
    try:
        return conn.recv(wire.MAX_MESSAGE + 1)
    except ConnectionResetError:
        return b""


def _fds(fd: int) -> bytes:
    return array.array("i", [fd]).tobytes()


class Client:
    """One broker of either flavour, called the same way (iterators collected)."""

    def __init__(self, flavour: str, path: str, **kwargs: Any) -> None:
        self.flavour = flavour
        self.loop = asyncio.new_event_loop() if flavour == "async" else None
        self.broker: Any
        if self.loop is None:
            self.broker = Broker(path, **kwargs)
        else:
            self.broker = self.loop.run_until_complete(AsyncBroker.connect(path, **kwargs))

    def __call__(self, method: str, *args: Any) -> Any:
        got = getattr(self.broker, method)(*args)
        if self.loop is None:
            return list(got) if isinstance(got, Iterator) else got
        if hasattr(got, "__aiter__"):
            return self.loop.run_until_complete(_collect(got))
        return self.loop.run_until_complete(got)

    def pause(self, seconds: float) -> None:
        """Let time pass; the async flavour's loop runs meanwhile (its reader reads)."""
        if self.loop is None:
            time.sleep(seconds)
        else:
            self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        if self.loop is None:
            self.broker.close()
            return
        self.loop.run_until_complete(self.broker.aclose())
        self.loop.close()


async def _collect(it: Any) -> list[Any]:
    return [x async for x in it]


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def play(tmp_path: Path, flavour: str, steps: list[Step], **kwargs: Any) -> tuple[Peer, Client]:
    peer = Peer(tmp_path / "sock", steps)
    return peer, Client(flavour, peer.path, **kwargs)


HELLO: dict[str, Any] = {
    "server": "shmbrokerd canned",
    "versions": [1],
    "features": ["memfd"],
    "limits": {"max_message": 65536, "max_segment_size": 1, "max_wait": 60, "reclaim_window": 5},
}
STATS: dict[str, Any] = {
    "uptime": 2.0,
    "segments": 1,
    "bytes": 4096,
    "clients": 1,
    "requests": {},
    "errors": {},
}
HOLDER: dict[str, Any] = {
    "client": 3,
    "pid": 42,
    "uid": 1000,
    "name": "cam",
    "access": "rw",
    "leases": 1,
}

#: method, arguments, the request it sends, the reply's result, what the method returns
METHODS: list[tuple[str, tuple[Any, ...], bytes, dict[str, Any], Any]] = [
    ("hello", (), b'{"id":1,"op":"hello"}', HELLO, wire.HelloResult(**HELLO)),
    ("hello", ("me",), b'{"id":1,"op":"hello","client":"me"}', HELLO, wire.HelloResult(**HELLO)),
    ("stat", ("a",), b'{"id":1,"op":"stat","name":"a"}', {"segment": segment()}, segment()),
    ("delete", ("a",), b'{"id":1,"op":"delete","name":"a"}', {}, None),
    ("release", ("L1",), b'{"id":1,"op":"release","lease":"L1"}', {}, None),
    (
        "seal",
        ("a",),
        b'{"id":1,"op":"seal","name":"a"}',
        {"segment": segment(sealed=True)},
        segment(sealed=True),
    ),
    (
        "holders",
        ("a",),
        b'{"id":1,"op":"stat","name":"a","holders":true}',
        {"segment": segment(), "holders": [HOLDER]},
        [wire.Holder(**HOLDER)],
    ),
    ("drop", (7,), b'{"id":1,"op":"drop","client":7}', {"leases": 2}, 2),
    (
        "reclaim",
        ("L1",),
        b'{"id":1,"op":"reclaim","lease":"L1"}',
        {"segment": segment(), "lease": "L1"},
        segment(),
    ),
    ("reload", (), b'{"id":1,"op":"reload"}', {"restart": ["socket"]}, ["socket"]),
    ("stats", (), b'{"id":1,"op":"stats"}', STATS, wire.StatsResult(**STATS)),
    (
        "list",
        ("cam/",),
        b'{"id":1,"op":"list","prefix":"cam/"}',
        {"segments": [segment("cam/x")], "next": None},
        [segment("cam/x")],
    ),
]


@pytest.mark.parametrize(
    ("method", "args", "request_", "result", "want"),
    METHODS,
    ids=[f"{m[0]}-{len(m[1])}" for m in METHODS],
)
def test_each_method_sends_its_datagram_and_returns_the_result(
    tmp_path: Path,
    flavour: str,
    method: str,
    args: tuple[Any, ...],
    request_: bytes,
    result: dict[str, Any],
    want: Any,
) -> None:
    peer, client = play(tmp_path, flavour, [(request_, ok(1, **result), None)])
    got = client(method, *args)
    client.close()
    assert peer.join() == [request_]
    if isinstance(want, dict):  # a Segment
        assert got == wire.SegmentInfo(**want)
    elif isinstance(want, list) and want and isinstance(want[0], dict):
        assert got == [wire.SegmentInfo(**w) for w in want]
    else:
        assert got == want


def test_list_and_clients_follow_next_page_by_page(tmp_path: Path, flavour: str) -> None:
    info = {"pid": 42, "uid": 1000, "gid": 1000, "leases": 0, "connected": 1.0}
    steps: list[Step] = [
        (b'{"id":1,"op":"list"}', ok(1, segments=[segment("a")], next="a"), None),
        (b'{"id":2,"op":"list","after":"a"}', ok(2, segments=[segment("b")], next=None), None),
        (b'{"id":3,"op":"clients"}', ok(3, clients=[{"id": 1, **info}], next=1), None),
        (b'{"id":4,"op":"clients","after":1}', ok(4, clients=[], next=None), None),
    ]
    peer, client = play(tmp_path, flavour, steps)
    assert [s.name for s in client("list")] == ["a", "b"]
    assert [c.id for c in client("clients")] == [1]
    client.close()
    assert peer.join() == [s[0] for s in steps]


CREATE = b'{"id":1,"op":"create","name":"a","size":4096,"lifetime":"refcount","mode":384,"exist_ok":false,"backing":"shm"}'  # noqa: E501


def test_create_maps_the_fd_of_the_reply_and_close_releases_it(
    tmp_path: Path, flavour: str
) -> None:
    fd = memfd()
    steps: list[Step] = [
        (CREATE, ok(1, segment=segment(), lease="L1"), fd),
        (b'{"id":2,"op":"release","lease":"L1"}', ok(2), None),
    ]
    peer, client = play(tmp_path, flavour, steps)
    seg = client("create", "a", 4096)
    assert (seg.name, seg.lease, seg.size, seg.readonly) == ("a", "L1", 4096, False)
    seg.buf[:5] = b"hello"
    assert os.pread(fd, 5, 0) == b"hello"  # the very memory the peer sent
    seg.close()  # sync: waits for the release's reply; async: sends it, the reader drops it
    client.close()
    assert peer.join() == [s[0] for s in steps]
    os.close(fd)


def test_a_repeat_open_asks_without_an_fd_and_reuses_the_mapping(
    tmp_path: Path, flavour: str
) -> None:
    fd, fresh = memfd(), memfd()
    moved = segment(sid="s2")  # deleted and created again meanwhile: another id
    steps: list[Step] = [
        (
            b'{"id":1,"op":"open","name":"a","access":"rw"}',
            ok(1, segment=segment(), lease="L1"),
            fd,
        ),
        (
            b'{"id":2,"op":"open","name":"a","access":"rw","fd":false}',
            ok(2, segment=segment(leases=2), lease="L2"),
            None,
        ),
        (
            b'{"id":3,"op":"open","name":"a","access":"rw","fd":false}',
            ok(3, segment=moved, lease="L3"),
            None,
        ),
        (b'{"id":4,"op":"release","lease":"L3"}', ok(4), None),
        (b'{"id":5,"op":"open","name":"a","access":"rw"}', ok(5, segment=moved, lease="L4"), fresh),
        (b'{"id":6,"op":"release","lease":"L1"}', ok(6), None),
        (b'{"id":7,"op":"release","lease":"L2"}', ok(7), None),
        (b'{"id":8,"op":"release","lease":"L4"}', ok(8), None),
    ]
    peer, client = play(tmp_path, flavour, steps)
    first = client("open", "a", "rw")
    first.buf[0] = 7
    again = client("open", "a", "rw")
    assert (again.lease, again.buf[0]) == ("L2", 7)  # one mapping, shared
    other = client("open", "a", "rw")  # a stale id: released, opened afresh
    assert (other.lease, other.id, other.buf[0]) == ("L4", "s2", 0)
    for seg in (first, again, other):
        seg.close()
    # The async releases go out without waiting: hanging up with a reply
    # unread resets the connection, and on Linux the peer's next recv then
    # reports the reset before datagrams still queued to it.  (A daemon loses
    # nothing by that: the hang-up ends those leases too.)  So hang up once
    # the peer has them all.
    deadline = time.monotonic() + 10
    while len(peer.got) < len(steps) and time.monotonic() < deadline:
        client.pause(0.005)
    client.close()
    assert peer.join() == [s[0] for s in steps]
    os.close(fd)
    os.close(fresh)


ERRORS = [
    ("ENOENT", SegmentNotFoundError),
    ("EEXIST", SegmentExistsError),
    ("EACCES", SegmentPermissionError),
    ("EPERM", SegmentPermissionError),
    ("ETIMEDOUT", SegmentTimeoutError),
    ("EDQUOT", BrokerError),
    ("ENOSPC", BrokerError),
    ("EOPNOTSUPP", BrokerError),
]


@pytest.mark.parametrize(("code", "cls"), ERRORS)
def test_a_refusal_raises_the_class_of_its_errno(
    tmp_path: Path, flavour: str, code: str, cls: type[BrokerError]
) -> None:
    steps: list[Step] = [
        (b'{"id":1,"op":"open","name":"a","access":"ro","wait":0.5}', fail(1, code, "why"), None)
    ]
    peer, client = play(tmp_path, flavour, steps)
    with pytest.raises(cls) as info:
        client("open", "a", "ro", 0.5)
    assert (info.value.code, info.value.strerror) == (code, "why")
    assert isinstance(info.value, BrokerError)
    client.close()
    assert peer.join() == [steps[0][0]]


def test_an_unknown_errno_name_is_eio(tmp_path: Path, flavour: str) -> None:
    peer, client = play(tmp_path, flavour, [(b'{"id":1,"op":"stats"}', fail(1, "EWHAT"), None)])
    with pytest.raises(BrokerError) as info:
        client("stats")
    assert info.value.errno == errno.EIO
    client.close()
    peer.join()


def test_holders_shown_to_operators_only_is_eacces(tmp_path: Path, flavour: str) -> None:
    reply = ok(1, segment=segment())  # a non-operator's stat: no holders in it
    peer, client = play(
        tmp_path, flavour, [(b'{"id":1,"op":"stat","name":"a","holders":true}', reply, None)]
    )
    with pytest.raises(SegmentPermissionError, match="operators only"):
        client("holders", "a")
    client.close()
    peer.join()


def test_a_grant_without_its_fd_is_ebadmsg(tmp_path: Path, flavour: str) -> None:
    peer, client = play(tmp_path, flavour, [(CREATE, ok(1, segment=segment(), lease="L1"), None)])
    with pytest.raises(BrokerError) as info:
        client("create", "a", 4096)
    assert info.value.errno == errno.EBADMSG
    client.close()
    peer.join()


def test_a_request_the_daemon_could_not_read(tmp_path: Path, flavour: str) -> None:
    """Its error comes with ``id`` null: the sync call raises it; the async
    connection cannot tell whose it is, so it fails every call in flight."""
    steps: list[Step] = [(b'{"id":1,"op":"stats"}', fail(None, "EBADMSG", "unreadable"), None)]
    peer, client = play(tmp_path, flavour, steps)
    want = BrokerError if flavour == "sync" else ConnectionResetError
    with pytest.raises(want) as info:
        client("stats")
    if flavour == "sync":
        assert info.value.errno == errno.EBADMSG
    client.close()
    peer.join()


def test_a_hang_up_in_a_call_is_connection_reset_then_reconnect_names_the_path(
    tmp_path: Path, flavour: str
) -> None:
    peer, client = play(
        tmp_path, flavour, [(b'{"id":1,"op":"stats"}', HANG_UP, None)], reconnect_timeout=0
    )
    with pytest.raises(ConnectionResetError):
        client("stats")
    assert peer.join() == [b'{"id":1,"op":"stats"}']
    with pytest.raises(FileNotFoundError, match=f"no shmbrokerd socket at {peer.path}"):
        client("stats")  # the next call reconnects: nobody listens any more
    client.close()


def test_wrong_types_and_a_closed_broker_send_nothing(tmp_path: Path, flavour: str) -> None:
    peer, client = play(tmp_path, flavour, [])
    with pytest.raises(TypeError, match="name must be str, not int"):
        client("stat", 7)
    with pytest.raises(TypeError, match="client must be int, not str"):
        client("drop", "7")
    client.close()
    with pytest.raises(ValueError, match="I/O operation on closed broker"):
        client.broker.stat("a") if flavour == "sync" else asyncio.run(client.broker.stat("a"))
    assert peer.join() == []


def test_a_pipelined_release_is_read_with_the_next_reply(tmp_path: Path) -> None:
    fd = memfd()
    steps: list[Step] = [
        (CREATE, ok(1, segment=segment(), lease="L1"), fd),
        (b'{"id":2,"op":"release","lease":"L1"}', ok(2), None),
        (b'{"id":3,"op":"stat","name":"a"}', ok(3, segment=segment(leases=0)), None),
    ]
    peer, client = play(tmp_path, "sync", steps, pipeline_release=True)
    client("create", "a", 4096).close()  # sent, its reply left unread
    assert client.broker._unread == 1
    assert client("stat", "a").leases == 0  # read past the release's reply
    assert client.broker._unread == 0
    client.close()
    assert peer.join() == [s[0] for s in steps]
    os.close(fd)
