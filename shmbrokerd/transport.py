"""The socket edge: accept, admit, read, send queue, close.

Strategy: asyncio is used only as a readiness loop (``add_reader`` on
non-blocking ``SOCK_SEQPACKET`` sockets), because asyncio streams have no
message boundaries and no ``SCM_RIGHTS``.  A reply that the peer's socket
cannot take now is queued; a peer whose queue fills is dropped, so a client
that never reads never delays anyone else.  Each wakeup reads one datagram
from a peer, for the same reason and because it is cheapest: clients wait
for their replies, so a second read would almost always fail, and a failed
read costs an exception.  A peer with more queued is readable again at the
loop's next turn, after the others.

This module knows nothing of ops: what a datagram means is the
:class:`Handler`'s business (``server.Server``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shmbroker import wire
from shmbroker.errors import error_from_errno

from .codec import encode_error
from .model import Peer

__all__ = ["Connection", "Handler", "ServerLimits", "Transport", "close_all"]

log = logging.getLogger("shmbrokerd")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_FDS_IN = 253  # SCM_MAX_FD: whatever arrives fits, and is closed
_ANC_SPACE = socket.CMSG_SPACE(_MAX_FDS_IN * 4)
_BATCH = 32
_UCRED = struct.Struct("3i")
# plain ints: enum.Flag arithmetic on every datagram is measurable
_MSG_TRUNC = int(socket.MSG_TRUNC)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS


@dataclass
class ServerLimits:
    max_clients: int
    max_clients_per_uid: int = 256
    max_waiting_opens: int = 64
    max_queued_replies: int = 256
    accept_backoff: float = 0.1


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    peer: Peer
    queue: deque[tuple[bytes, list[int]]] = field(default_factory=deque)
    writing: bool = False
    closed: bool = False
    requests: int = 0  # for the busiest-clients list of ``stats``


class Handler(Protocol):
    """What the transport tells about its connections."""

    def admitted(self, conn: Connection) -> None: ...

    def received(self, conn: Connection, data: bytes, nfds: int, truncated: bool) -> None: ...

    #: the wakeup's datagram is handled: what may trail its replies goes now
    #: (an attribute, so the transport calls the runner's ``settle`` directly)
    read_done: Callable[[], None]

    def closed(self, conn: Connection) -> None: ...


class Transport:
    """One listening socket and its connections."""

    def __init__(
        self,
        limits: ServerLimits,
        handler: Handler,
        *,
        is_operator: Callable[[int, int, frozenset[int]], bool],
    ) -> None:
        self.limits = limits
        self._handler = handler
        self._received = handler.received  # per datagram: one lookup less
        self._read_done = handler.read_done
        self._is_operator = is_operator
        self.conns: dict[int, Connection] = {}
        # one receive buffer, reused: a datagram is copied out at its own size
        self._rbuf = bytearray(wire.MAX_MESSAGE + 1)
        self._rview = memoryview(self._rbuf)
        self._per_uid: dict[int, int] = {}
        self._next_peer = 1
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    def start(self, listener: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)

    def stop_accepting(self) -> None:
        """Close the listener (its file, if we bound it, is the caller's)."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def flush(self, deadline: float) -> None:
        """Send queued replies until they are all out or ``deadline`` (monotonic)."""
        while any(c.queue for c in self.conns.values()):
            self._flushed.clear()
            try:
                await asyncio.wait_for(self._flushed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break

    # -- accept ----------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(_BATCH):
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_backoff(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            self._admit(sock)

    def _accept_backoff(self, exc: OSError) -> None:
        """Out of fds or memory: stop accepting for a while instead of spinning."""
        assert self._listener is not None
        assert self._loop is not None
        log.warning(
            "accept failed (%s); pausing accepts for %.1f s",
            exc.strerror,
            self.limits.accept_backoff,
        )
        self._loop.remove_reader(self._listener.fileno())

        def resume() -> None:
            if self._listener is not None and self._loop is not None:
                self._loop.add_reader(self._listener.fileno(), self._accept)

        self._loop.call_later(self.limits.accept_backoff, resume)

    def _admit(self, sock: socket.socket) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        try:
            pid, uid, gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            groups = _peer_groups(sock)
        except OSError as exc:
            log.warning("dropped a peer before it spoke: %s", exc.strerror)
            sock.close()
            return
        if len(self.conns) >= self.limits.max_clients:
            self._turn_away(sock, pid, uid, "max_clients")
            return
        if self._per_uid.get(uid, 0) >= self.limits.max_clients_per_uid:
            self._turn_away(sock, pid, uid, "max_clients_per_uid")
            return
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        peer = Peer(
            id=self._next_peer,
            pid=pid,
            uid=uid,
            gid=gid,
            groups=groups,
            operator=self._is_operator(uid, gid, groups),
            connected=time.time(),
        )
        self._next_peer += 1
        conn = Connection(sock, peer)
        self.conns[peer.id] = conn
        self._handler.admitted(conn)
        self._loop.add_reader(sock.fileno(), self._readable, conn)

    def _turn_away(self, sock: socket.socket, pid: int, uid: int, limit: str) -> None:
        """Answer EMFILE (id null) and close: the contract's "reply, then close"."""
        log.warning(
            "refused peer pid=%d uid=%d: %s reached",
            pid,
            uid,
            limit,
            extra={"PEER_PID": pid, "PEER_UID": uid, "ERRNO": "EMFILE"},
        )
        with contextlib.suppress(OSError):
            sock.send(encode_error(None, error_from_errno(errno.EMFILE, f"{limit} reached")))
            # Closing with the peer's first request unread would reset the
            # connection and lose our reply: shut down, drop what is queued.
            sock.shutdown(socket.SHUT_RDWR)
            for _ in range(_BATCH):
                data, anc, _flags, _ = sock.recvmsg(wire.MAX_MESSAGE + 1, _ANC_SPACE)
                _close_fds(anc)
                if not data and not anc:
                    break
        sock.close()

    # -- read ------------------------------------------------------------------

    def _readable(self, conn: Connection) -> None:
        try:
            size, anc, flags, _ = conn.sock.recvmsg_into([self._rbuf], _ANC_SPACE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(conn, f"receive failed: {exc.strerror}")
            return
        try:
            nfds = _close_fds(anc) if anc else 0
            if not size and not nfds and not flags & _MSG_TRUNC:
                self.close(conn, None)  # an empty datagram is the end of the connection
            else:
                self._received(conn, self._rview[:size].tobytes(), nfds, bool(flags & _TRUNCATED))
        finally:
            self._read_done()

    # -- write -----------------------------------------------------------------

    def send(self, conn: Connection, payload: bytes, fds: list[int]) -> None:
        """Send now if the socket takes it, else queue; fds are ours to close."""
        if conn.closed:
            close_all(fds)
            return
        if conn.queue:
            self._enqueue(conn, payload, fds)
            return
        try:
            _sendmsg(conn.sock, payload, fds)
        except BlockingIOError:
            self._enqueue(conn, payload, fds)
            return
        except OSError as exc:
            close_all(fds)
            self.close(conn, f"send failed: {exc.strerror}")
            return
        close_all(fds)

    def _enqueue(self, conn: Connection, payload: bytes, fds: list[int]) -> None:
        assert self._loop is not None
        if len(conn.queue) >= self.limits.max_queued_replies:
            close_all(fds)
            self.close(conn, "reply queue full (peer does not read)")
            return
        conn.queue.append((payload, fds))
        if not conn.writing:
            conn.writing = True
            self._loop.add_writer(conn.sock.fileno(), self._writable, conn)

    def _writable(self, conn: Connection) -> None:
        assert self._loop is not None
        while conn.queue and not conn.closed:
            payload, fds = conn.queue[0]
            try:
                _sendmsg(conn.sock, payload, fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(conn, f"send failed: {exc.strerror}")
                return
            conn.queue.popleft()
            close_all(fds)
        if conn.writing and not conn.closed:
            conn.writing = False
            self._loop.remove_writer(conn.sock.fileno())
        self._flushed.set()

    def close(self, conn: Connection, reason: str | None) -> None:
        if conn.closed:
            return
        assert self._loop is not None
        conn.closed = True
        peer = conn.peer
        if reason:
            log.info(
                "dropped peer pid=%d uid=%d: %s",
                peer.pid,
                peer.uid,
                reason,
                extra={"PEER_PID": peer.pid, "PEER_UID": peer.uid},
            )
        fd = conn.sock.fileno()
        self._loop.remove_reader(fd)
        if conn.writing:
            self._loop.remove_writer(fd)
        for _payload, fds in conn.queue:
            close_all(fds)
        conn.queue.clear()
        conn.sock.close()
        del self.conns[peer.id]
        left = self._per_uid[peer.uid] - 1
        if left:
            self._per_uid[peer.uid] = left
        else:
            del self._per_uid[peer.uid]
        self._handler.closed(conn)


def _sendmsg(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    if fds:
        sock.sendmsg([payload], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(payload)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _close_fds(anc: list[tuple[int, int, bytes]]) -> int:
    """Close every fd a client sent; return how many there were."""
    count = 0
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            count += len(fds)
        else:
            count += 1  # any other ancillary data is refused the same way
    return count


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """Supplementary groups of the peer at connect time (``SO_PEERGROUPS``)."""
    size = 64 * 4
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 8
                continue
            raise
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % 4])
        return frozenset(groups)
    return frozenset()
