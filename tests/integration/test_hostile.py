"""Hostile input on the wire, from raw SOCK_SEQPACKET sockets: every bad
datagram gets the reply PROTOCOL.md names (or the close it names), fds sent
to the daemon are closed at once, and no client can stall the others.

Each reply is checked field by field: a failure is exactly
``{"id", "ok": false, "error": {"code", "message"}}``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import pytest

from tests.support.contract import SEGMENT_KEYS
from tests.support.helpers import DaemonProc, eventually

MAX_MESSAGE = 65536


class Raw:
    """A client that speaks bytes, not the protocol."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self.sock.sendmsg([data], anc)
        else:
            self.sock.send(data)

    def recv_raw(self) -> tuple[bytes, list[int]]:
        """One datagram and the fds that came with it (b"" at end of connection)."""
        data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(16 * 4))
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), "reply truncated"
        assert len(data) <= MAX_MESSAGE
        return data, list(fds)

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        data, fds = self.recv_raw()
        assert data, "the daemon closed the connection"
        reply = json.loads(data.decode("utf-8"))
        assert isinstance(reply, dict)
        return reply, fds

    def ask(self, data: bytes, fds: Sequence[int] = ()) -> dict[str, Any]:
        """Send one datagram; the reply, which must carry no fd."""
        self.send(data, fds)
        reply, got = self.recv()
        for fd in got:
            os.close(fd)
        assert not got, f"unexpected fds with {reply}"
        return reply

    def request(self, obj: object) -> dict[str, Any]:
        return self.ask(encode(obj))

    def close(self) -> None:
        self.sock.close()


def encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def check_error(reply: dict[str, Any], rid: int | None, code: str) -> None:
    assert set(reply) == {"id", "ok", "error"}, reply
    if rid is None:
        assert reply["id"] is None, reply
    else:
        assert type(reply["id"]) is int, reply
        assert reply["id"] == rid, reply
    assert reply["ok"] is False, reply
    err = reply["error"]
    assert isinstance(err, dict), reply
    assert set(err) == {"code", "message"}, reply
    assert err["code"] == code, reply
    assert isinstance(err["message"], str), reply
    assert err["message"], reply


def check_ok(reply: dict[str, Any], rid: int) -> None:
    assert type(reply["id"]) is int, reply
    assert reply["id"] == rid, reply
    assert reply["ok"] is True, reply
    assert "error" not in reply, reply


def check_hello(reply: dict[str, Any], rid: int) -> None:
    check_ok(reply, rid)
    assert isinstance(reply["server"], str), reply
    assert reply["versions"] == [1], reply
    assert all(isinstance(f, str) for f in reply["features"]), reply
    limits = reply["limits"]
    for key in ("max_message", "max_segment_size", "max_wait", "reclaim_window"):
        assert isinstance(limits[key], int | float), reply
    assert limits["max_message"] == MAX_MESSAGE


def assert_serves(daemon: DaemonProc) -> None:
    """The daemon is alive and a fresh connection gets hello answered."""
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, daemon.log()
    fresh = Raw(daemon.socket)
    try:
        check_hello(fresh.request({"id": 7, "op": "hello", "client": "probe"}), 7)
    finally:
        fresh.close()


# -- bad datagrams ------------------------------------------------------------------

NOT_A_JSON_OBJECT = [
    b"garbage",
    b"\x00\x01\x02\x03",
    b"\xff\xfe\xfd",
    b'{"id":1,"op":"hello","client":"\xff"}',  # not UTF-8, though the id is readable
    b'{"id":1,"op":"hello","client":"\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
    b"[1,2,3]",
    b'[{"id":1,"op":"hello"}]',
    b'"hello"',
    b"42",
    b"null",
    b"true",
    b"{",
    b'{"id":1,"op":"hello"} {"id":2,"op":"hello"}',
    b'{"id":1,"op":"hello","client":NaN}',
    b'{"id":1,"op":"hello","client":Infinity}',
    b" ",
]


def test_datagrams_that_are_not_a_utf8_json_object_get_EBADMSG_with_null_id(
    daemon: DaemonProc,
) -> None:
    raw = Raw(daemon.socket)
    try:
        for data in NOT_A_JSON_OBJECT:
            check_error(raw.ask(data), None, "EBADMSG")
        # the same connection still serves a good request
        check_hello(raw.request({"id": 3, "op": "hello"}), 3)
    finally:
        raw.close()
    assert_serves(daemon)


def test_deep_nesting_is_refused_without_harm(daemon: DaemonProc) -> None:
    depth = 30000
    data = b'{"id":1,"op":"hello","client":' + b"[" * depth + b"]" * depth + b"}"
    assert len(data) <= MAX_MESSAGE
    raw = Raw(daemon.socket)
    try:
        reply = raw.ask(data)
        assert reply["ok"] is False
        assert reply["error"]["code"] in ("EBADMSG", "EINVAL"), reply
        check_hello(raw.request({"id": 2, "op": "hello"}), 2)
    finally:
        raw.close()
    assert_serves(daemon)


BAD_ID = [
    {"op": "hello"},
    {"id": None, "op": "hello"},
    {"id": "1", "op": "hello"},
    {"id": 1.0, "op": "hello"},
    {"id": True, "op": "hello"},
    {"id": -1, "op": "hello"},
    {"id": 2**63, "op": "hello"},
    {"id": 10**30, "op": "hello"},
    {"id": [1], "op": "hello"},
]


def test_a_request_without_a_valid_id_gets_EINVAL_with_null_id(daemon: DaemonProc) -> None:
    raw = Raw(daemon.socket)
    try:
        for obj in BAD_ID:
            check_error(raw.request(obj), None, "EINVAL")
        # the bounds themselves are valid ids, echoed as sent
        check_hello(raw.request({"id": 0, "op": "hello"}), 0)
        check_hello(raw.request({"id": 2**63 - 1, "op": "hello"}), 2**63 - 1)
    finally:
        raw.close()
    assert_serves(daemon)


WRONG_PARAMS: list[tuple[dict[str, Any], str]] = [
    # missing or non-string op
    ({}, "EINVAL"),
    ({"op": 5}, "EINVAL"),
    ({"op": None}, "EINVAL"),
    # unknown parameters, including attempts to claim an identity
    ({"op": "hello", "bogus": 1}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "owner_uid": 0}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "uid": 0}, "EINVAL"),
    ({"op": "open", "name": "h/a", "pid": 1}, "EINVAL"),
    ({"op": "stats", "verbose": True}, "EINVAL"),
    # wrong types and out-of-range values
    ({"op": "hello", "client": 5}, "EINVAL"),
    ({"op": "hello", "client": "c" * 5000}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": "4096"}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": True}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096.0}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 0}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": -4096}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 2**64}, "EINVAL"),
    ({"op": "create", "name": "h/a"}, "EINVAL"),
    ({"op": "create", "size": 4096}, "EINVAL"),
    ({"op": "create", "name": 5, "size": 4096}, "EINVAL"),
    ({"op": "create", "name": None, "size": 4096}, "EINVAL"),
    ({"op": "create", "name": ["h/a"], "size": 4096}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "mode": "0644"}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "mode": 0o1000}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "mode": -1}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "lifetime": "forever"}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "backing": "disk"}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "exist_ok": "yes"}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "exist_ok": 1}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "ttl": 5}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "lifetime": "ttl"}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "lifetime": "ttl", "ttl": -1}, "EINVAL"),
    ({"op": "create", "name": "h/a", "size": 4096, "lifetime": "ttl", "ttl": "5"}, "EINVAL"),
    ({"op": "open", "name": "h/a", "access": "wx"}, "EINVAL"),
    ({"op": "open", "name": "h/a", "wait": -1}, "EINVAL"),
    ({"op": "open", "name": "h/a", "wait": "1"}, "EINVAL"),
    ({"op": "open", "name": "h/a", "fd": "no"}, "EINVAL"),
    ({"op": "release", "lease": 123}, "EINVAL"),
    ({"op": "release"}, "EINVAL"),
    ({"op": "list", "limit": 0}, "EINVAL"),
    ({"op": "list", "limit": 101}, "EINVAL"),
    ({"op": "list", "limit": "5"}, "EINVAL"),
    ({"op": "clients", "after": -1}, "EINVAL"),
]


def test_wrong_params_and_unknown_ops_are_refused_with_the_id_echoed(daemon: DaemonProc) -> None:
    raw = Raw(daemon.socket)
    try:
        for rid, (obj, code) in enumerate(WRONG_PARAMS, start=100):
            reply = raw.request({"id": rid, **obj})
            check_error(reply, rid, code)
            assert len(encode(reply)) < 4096, "the reply echoes hostile input"
        # nothing was created by any of them
        listing = raw.request({"id": 1, "op": "list"})
        check_ok(listing, 1)
        assert listing["segments"] == []
        assert listing["next"] is None
    finally:
        raw.close()
    assert daemon.objects() == []
    assert_serves(daemon)


UNKNOWN_OPS = ["format_disk", "__init__", "_op_hello", "_handlers", "HELLO", "hello ", "x" * 60000]


def test_unknown_op_is_EOPNOTSUPP_with_the_id_echoed(daemon: DaemonProc) -> None:
    raw = Raw(daemon.socket)
    try:
        for rid, op in enumerate(UNKNOWN_OPS, start=100):
            reply = raw.request({"id": rid, "op": op})
            check_error(reply, rid, "EOPNOTSUPP")
            assert len(encode(reply)) < 4096, "the reply echoes hostile input"
    finally:
        raw.close()
    assert_serves(daemon)


def test_message_size_limit_is_65536_bytes(daemon: DaemonProc) -> None:
    raw = Raw(daemon.socket)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    head = b'{"id":5,"op":"hello"'
    try:
        exact = head + b" " * (MAX_MESSAGE - len(head) - 1) + b"}"
        assert len(exact) == MAX_MESSAGE
        check_hello(raw.ask(exact), 5)
        over = head + b" " * (MAX_MESSAGE - len(head)) + b"}"
        assert len(over) == MAX_MESSAGE + 1
        check_error(raw.ask(over), None, "EBADMSG")
        far_over = head + b" " * 200_000 + b"}"
        check_error(raw.ask(far_over), None, "EBADMSG")
        # an oversized name is answered briefly, not echoed
        reply = raw.request({"id": 6, "op": "open", "name": "n" * 60_000})
        check_error(reply, 6, "ENAMETOOLONG")
        check_hello(raw.request({"id": 8, "op": "hello"}), 8)
    finally:
        raw.close()
    assert_serves(daemon)


BAD_NAMES = [
    "",
    "/",
    "/abs",
    "trailing/",
    "a//b",
    ".",
    "..",
    "../../etc/passwd",
    "a/./b",
    "a/../b",
    "sp ace",
    "nul\x00byte",
    "tab\tname",
    "back\\slash",
    "\u00fcmlaut",
    "é" * 100,  # 200 bytes: short enough, bad characters
]


def test_name_length_and_syntax_over_the_wire(daemon: DaemonProc) -> None:
    name255 = "a" * 127 + "/" + "b" * 127
    assert len(name255.encode()) == 255
    raw = Raw(daemon.socket)
    try:
        raw.send(encode({"id": 1, "op": "create", "name": name255, "size": 4096, "mode": 0o600}))
        reply, fds = raw.recv()
        try:
            check_ok(reply, 1)
            assert set(reply) == {"id", "ok", "segment", "lease"}, reply
            assert set(reply["segment"]) == SEGMENT_KEYS, reply
            assert reply["segment"]["name"] == name255
            assert reply["segment"]["size"] == 4096
            assert isinstance(reply["lease"], str)
            assert len(reply["lease"]) >= 22  # >= 128 bits in any printable encoding
            assert len(fds) == 1
            assert os.fstat(fds[0]).st_size == 4096
        finally:
            for fd in fds:
                os.close(fd)
        # 255 bytes is fine for open too
        opened = raw.request({"id": 2, "op": "open", "name": name255, "fd": False})
        check_ok(opened, 2)
        assert opened["segment"]["id"] == reply["segment"]["id"]

        for rid, name in enumerate(["c" * 256, "a" * 128 + "/" + "b" * 127, "é" * 128], 10):
            assert len(name.encode()) == 256
            check_error(
                raw.request({"id": rid, "op": "create", "name": name, "size": 4096}),
                rid,
                "ENAMETOOLONG",
            )
            check_error(raw.request({"id": rid, "op": "open", "name": name}), rid, "ENAMETOOLONG")
        for rid, name in enumerate(BAD_NAMES, 100):
            check_error(
                raw.request({"id": rid, "op": "create", "name": name, "size": 4096}),
                rid,
                "EINVAL",
            )
            check_error(raw.request({"id": rid, "op": "stat", "name": name}), rid, "EINVAL")
        # only the one good segment exists, and its object is not named after it
        assert len(daemon.objects()) == 1
        assert all(not n.startswith(("a" * 20, "..", "etc")) for n in os.listdir("/dev/shm"))
        listing = raw.request({"id": 3, "op": "list"})
        assert [s["name"] for s in listing["segments"]] == [name255]
    finally:
        raw.close()
    eventually(lambda: daemon.objects() == [])  # refcount: gone with the connection
    assert_serves(daemon)


def test_empty_datagram_is_the_end_of_the_connection(daemon: DaemonProc) -> None:
    raw = Raw(daemon.socket)
    try:
        check_hello(raw.request({"id": 1, "op": "hello"}), 1)
        raw.send(b"")
        data, fds = raw.recv_raw()  # no reply: the end of the connection
        assert (data, fds) == (b"", [])
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            raw.send(encode({"id": 2, "op": "hello"}))
    finally:
        raw.close()
    assert_serves(daemon)


# -- fds sent to the daemon -------------------------------------------------------------


def _links(pid: int) -> set[str]:
    out = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):
            out.add(os.readlink(os.path.join(base, name)))
    return out


def test_fds_sent_by_a_client_are_refused_and_closed_at_once(daemon: DaemonProc) -> None:
    marker = daemon.root / "marker-file-sent-to-daemon"
    marker.write_bytes(b"x")
    file_fd = os.open(marker, os.O_RDONLY)
    pipe_r, pipe_w = os.pipe()
    sock_a, sock_b = socket.socketpair()
    sock_b.settimeout(5)
    ours = [file_fd, pipe_r, sock_a.fileno()]
    our_links = {os.readlink(f"/proc/self/fd/{fd}") for fd in ours}
    assert str(marker) in our_links
    raw = Raw(daemon.socket)
    try:
        check_hello(raw.request({"id": 1, "op": "hello"}), 1)
        baseline = daemon.fd_count()
        assert not our_links & _links(daemon.pid)
        for i in range(1000):
            fds = ours[: 1 + i % 3]
            rid = 10 + i
            if i % 10 == 9:
                # a request that would grant an fd, carrying fds: refused, nothing created
                req = {"id": rid, "op": "create", "name": f"fd/x{i}", "size": 4096}
                check_error(raw.ask(encode(req), fds), rid, "EBADMSG")
            elif i % 10 == 8:
                # garbage with fds: the id cannot be read
                check_error(raw.ask(b"\xffnot json", fds), None, "EBADMSG")
            else:
                check_error(raw.ask(encode({"id": rid, "op": "hello"}), fds), rid, "EBADMSG")
            if i == 500:
                assert daemon.fd_count() == baseline
        eventually(lambda: daemon.fd_count() == baseline)
        assert not our_links & _links(daemon.pid)
        assert daemon.objects() == []
        # the kernel agrees that nobody else holds them: once ours are closed,
        # the other ends see the last reference gone
        os.close(pipe_r)
        pipe_r = -1
        with pytest.raises(BrokenPipeError):
            os.write(pipe_w, b"x")
        sock_a.close()
        assert sock_b.recv(1) == b""
        check_hello(raw.request({"id": 2, "op": "hello"}), 2)
    finally:
        raw.close()
        for fd in (file_fd, pipe_r, pipe_w):
            if fd >= 0:
                os.close(fd)
        sock_a.close()
        sock_b.close()
    assert_serves(daemon)


# -- a flooding client ------------------------------------------------------------------


def test_a_client_that_never_reads_is_dropped_and_never_blocks_others(
    daemon: DaemonProc,
) -> None:
    flooder = Raw(daemon.socket)
    other = Raw(daemon.socket)
    sent = 0
    dropped = False
    try:
        check_hello(other.request({"id": 1, "op": "hello"}), 1)
        for sent in range(1, 50_001):
            try:
                flooder.send(encode({"id": sent, "op": "hello"}))
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            if sent % 64 == 0:
                check_hello(other.request({"id": sent, "op": "hello"}), sent)
        assert dropped, f"a client that sent {sent} requests and read none is still connected"
        # the replies that reached it before the drop are there, then the end
        received = 0
        while True:
            data, fds = flooder.recv_raw()
            assert fds == []
            if not data:
                break
            received += 1
            reply = json.loads(data)
            check_hello(reply, received)  # in order: one connection, no waits
        assert 0 < received < sent
        check_hello(other.request({"id": 2, "op": "hello"}), 2)
    finally:
        flooder.close()
        other.close()
    assert "reply queue full" in daemon.log()
    assert_serves(daemon)
