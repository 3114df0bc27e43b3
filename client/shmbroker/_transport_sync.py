"""How a :class:`~shmbroker.Broker` calls: blocking, one call at a time.

The hand-written half of the sync client (the API is ``_sync.py``, generated
from ``_async.py``): a lock serialises the calls of all threads, a call
waits for its reply on the socket with the idle strategy (``_idle.py``),
and ``pipeline_release`` leaves release replies unread, counted, to be read
with the next reply (``_transport_async.py`` matches replies to futures
instead).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as _socket
import threading
import time
from types import TracebackType
from typing import Any, Self

from . import _fork, _idle, _transport
from ._calls import ClientProtocol, Reply
from ._held import Held, LostCallback
from ._paths import socket_path
from ._results import Mappings
from .errors import BrokerError

__all__ = ["SyncTransport"]

#: pipelined release replies a Broker leaves unread at most
_MAX_UNREAD = 32


class _NotSent(ConnectionResetError):
    """The connection was found dead when sending: safe to send again."""


class SyncTransport:
    """The connection under a :class:`~shmbroker.Broker`, and its ``close``."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        reconnect_timeout: float = 10.0,
        pipeline_release: bool = False,
        on_lost: LostCallback | None = None,
        idle: _idle.IdleArg = _idle.DEFAULT,
    ) -> None:
        """Connect to the daemon at ``socket`` (default: :func:`~shmbroker.socket_path`).

        Thread-safe: one request is in flight at a time.  ``reconnect_timeout``
        bounds the reconnect after a daemon restart.

        ``Segment.close()`` waits for the daemon to confirm the release, so
        that when it returns every other client sees the lease gone (a
        ``refcount`` segment unlinked, its name free).  With
        ``pipeline_release=True`` it sends the release without waiting, a
        round trip less per segment: this broker's next call still sees the
        release (the daemon serves a connection's requests in order), other
        clients a moment later.

        ``idle`` is how a call waits for its reply (docs/performance.md,
        "Idle strategies"): ``"adaptive"`` (the default) polls the socket for
        up to 100 us, adapted to how fast replies come, before it blocks;
        ``"block"`` blocks at once; ``"spin"`` always polls 100 us; a number
        polls that many microseconds.  No strategy spins on a one-CPU process.

        Raises ``FileNotFoundError``/``ConnectionRefusedError`` naming the
        socket path when no daemon listens there (another connect error as
        its errno's ``OSError``), ``ValueError``/``TypeError`` for another
        ``idle``.
        """
        self.path = socket_path(socket)
        self.reconnect_timeout = reconnect_timeout
        self.pipeline_release = pipeline_release
        self.on_lost = on_lost
        self._idle = _idle.Idle(idle)
        self._proto = ClientProtocol()
        self._lock = threading.Lock()
        self._closed = False
        self._leases = Held()
        self._mappings = Mappings()
        #: replies to pipelined releases not read yet (read with the next reply)
        self._unread = 0
        self._sock: _socket.socket | None = self._connect()
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child (see ``_fork.py``): nothing of the parent's is ours."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        if self._sock is not None:
            self._sock.close()  # our copy only: the parent's connection lives on
            self._sock = None
        self._proto = ClientProtocol()
        self._leases.disown()
        self._leases = Held()
        self._mappings = Mappings()
        self._unread = 0

    def _connect(self) -> _socket.socket:
        sock = _transport.sock_for(self.path)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise _transport.not_running(self.path, exc) from None
        return sock

    def _reconnect(self) -> None:
        """Connect again with backoff, then reclaim what we held.

        A connection lost again while reclaiming (the daemon restarting once
        more) starts over, a bounded number of times.
        """
        for _ in range(3):
            self._sock = self._connect_with_backoff()
            self._unread = 0
            try:
                for lease in self._leases.tokens():
                    try:
                        self._exchange("reclaim", {"lease": lease}).unwrap()
                    except FileNotFoundError:  # too late, or the segment is gone
                        self._leases.lost(lease)
                return
            except ConnectionError:
                continue  # _exchange has dropped the socket
        raise _transport.connection_lost(self.path)

    def _connect_with_backoff(self) -> _socket.socket:
        for delay in _transport.backoff(self.reconnect_timeout):
            try:
                return self._connect()
            except _transport.RETRYABLE:
                time.sleep(delay)
        return self._connect()

    def _exchange(self, op: str, params: dict[str, Any]) -> Reply:
        sock = self._sock
        assert sock is not None
        rid, data = self._proto.request(op, params)
        try:
            try:
                sock.send(data)
            except ConnectionError:
                raise _NotSent(errno.ECONNRESET, "connection lost before sending") from None
            while True:
                reply = self._receive(sock)
                if reply is None:  # most likely a pipelined release's
                    self._unread = max(self._unread - 1, 0)
                elif reply.id == rid:  # answers come in order: none is left unread
                    self._unread = 0
                    return reply
        except ConnectionError as exc:
            self._sock = None
            sock.close()
            if isinstance(exc, _NotSent):
                raise
            raise _transport.connection_lost(self.path) from None
        finally:
            self._proto.forget(rid)

    def _call(self, op: str, *, reconnect: bool = True, **params: Any) -> Reply:
        try:
            with self._lock:
                if self._closed:
                    raise _transport.closed_broker()
                if self._sock is None and not reconnect:
                    raise _transport.connection_lost(self.path)
                if self._sock is None:
                    self._reconnect()
                try:
                    return self._exchange(op, params)
                except _NotSent:  # the daemon went away before it saw this request
                    if not reconnect:
                        raise _transport.connection_lost(self.path) from None
                    self._reconnect()
                    return self._exchange(op, params)
        finally:
            self._leases.report_lost(self.on_lost)  # outside the lock: it may call us

    def close(self) -> None:
        """Close the connection: the daemon ends its leases (raises nothing)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None

    def _release_segment(self, lease: str) -> None:
        """Segment.close(): never waits for a daemon that is gone.

        With the connection lost, the lease is simply not reclaimed: the
        daemon releases it when its reclaim window ends.  A lease the daemon
        forgot (ENOENT) is no error either, nor a closed broker (its
        connection's end released everything).
        """
        self._leases.discard(lease)
        if self._closed:
            return
        if self.pipeline_release:
            self._send_release(lease)
            return
        try:  # noqa: SIM105 (as in Mapping.release)
            self._call("release", reconnect=False, lease=lease).unwrap()
        except (FileNotFoundError, ConnectionError):
            pass

    def _send_release(self, lease: str) -> None:
        """Send a release and leave its reply to be read with the next one.

        At most ``_MAX_UNREAD`` replies are left unread, so a client that
        only closes segments never fills the daemon's reply queue for it.
        """
        with self._lock:
            sock = self._sock
            if sock is None or self._closed:
                return
            rid, data = self._proto.request("release", {"lease": lease})
            self._proto.forget(rid)
            try:
                while self._unread >= _MAX_UNREAD:
                    self._read_dropped(sock)
                sock.send(data)
            except OSError:  # the connection is lost: the next call reconnects
                self._sock = None
                sock.close()
                return
            self._unread += 1

    def _receive(self, sock: _socket.socket) -> Reply | None:
        """Read one reply (None: one nobody waits for); raise if the daemon is gone."""
        msg, anc, _flags, _ = _idle.recvmsg(
            sock, self._idle, _transport.RECV_SIZE, _transport.ANC_SIZE
        )
        fds = _transport.split_fds(anc)
        if not msg:
            raise _transport.connection_lost(self.path)
        return self._proto.receive(msg, fds)

    def _read_dropped(self, sock: _socket.socket) -> None:
        """Read one reply nobody waits for (a pipelined release's)."""
        with contextlib.suppress(BrokerError):  # an error answering nobody: nothing to do
            self._receive(sock)
        self._unread -= 1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
