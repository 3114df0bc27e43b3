"""The blocking client."""

from __future__ import annotations

import contextlib
import errno
import os
import socket as _socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _api, _fork, _idle, wire
from ._api import Access, Backing, Lifetime
from ._held import Held, LostCallback
from ._paths import socket_path
from ._protocol import ClientProtocol, Reply
from .errors import BrokerError
from .segment import Segment

if TYPE_CHECKING:
    from ._watch import Watcher

__all__ = ["Broker"]

#: pipelined release replies a Broker leaves unread at most
_MAX_UNREAD = 32


class _NotSent(ConnectionResetError):
    """The connection was found dead when sending: safe to send again."""


class Broker:
    """A connection to shmbrokerd; thread-safe, one request in flight at a time.

    Raises ``FileNotFoundError``/``ConnectionRefusedError`` naming the socket
    path when no daemon listens there.  If the daemon restarts, the call in
    flight raises ``ConnectionError``; the next call reconnects (retrying with
    backoff for up to ``reconnect_timeout`` seconds) and reclaims the leases
    of this broker's open segments, whose mappings never stopped working.

    ``Segment.close()`` waits for the daemon to confirm the release, so that
    when it returns every other client sees the lease gone (a ``refcount``
    segment unlinked, its name free).  With ``pipeline_release=True`` it
    sends the release without waiting, a round trip less per segment: this
    broker's next call still sees the release (the daemon serves a
    connection's requests in order), other clients a moment later.

    A lease the daemon no longer knows after a restart (the reclaim window
    passed, the segment was deleted meanwhile) marks its Segment ``lost``,
    is logged, and is given to ``on_lost(segment)`` once the call that
    reconnected is done (what ``on_lost`` raises comes out of that call).

    After ``os.fork()`` the child's broker does not use the parent's
    connection: its first call connects anew, and Segments it inherited stay
    mapped but their ``close()`` releases nothing (the leases are the
    parent's).  Calls on a closed broker raise ``ValueError``, as a closed
    file does.

    ``idle`` is how a call waits for its reply (docs/performance.md, "Idle
    strategies"): ``"adaptive"`` (the default) polls the socket for up to
    100 us, adapted to how fast replies come, before it blocks;
    ``"block"`` blocks at once; ``"spin"`` always polls 100 us; a number
    polls that many microseconds.  No strategy spins on a one-CPU process.
    Raises ``ValueError``/``TypeError`` for another ``idle``.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        reconnect_timeout: float = 10.0,
        pipeline_release: bool = False,
        on_lost: LostCallback | None = None,
        idle: _idle.IdleArg = _idle.DEFAULT,
    ) -> None:
        self.path = socket_path(socket)
        self.reconnect_timeout = reconnect_timeout
        self.pipeline_release = pipeline_release
        self.on_lost = on_lost
        self._idle = _idle.Idle(idle)
        self._proto = ClientProtocol()
        self._lock = threading.Lock()
        self._closed = False
        self._leases = Held()
        self._mappings = _api.Mappings()
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
        self._mappings = _api.Mappings()
        self._unread = 0

    # -- plumbing ------------------------------------------------------------

    def _connect(self) -> _socket.socket:
        sock = _api.sock_for(self.path)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise _api.not_running(self.path, exc) from None
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
        raise _api.connection_lost(self.path)

    def _connect_with_backoff(self) -> _socket.socket:
        for delay in _api.backoff(self.reconnect_timeout):
            try:
                return self._connect()
            except _api.RETRYABLE:
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
            raise _api.connection_lost(self.path) from None
        finally:
            self._proto.forget(rid)

    def _call(self, op: str, *, reconnect: bool = True, **params: Any) -> Reply:
        try:
            with self._lock:
                if self._closed:
                    raise _api.closed_broker()
                if self._sock is None and not reconnect:
                    raise _api.connection_lost(self.path)
                if self._sock is None:
                    self._reconnect()
                try:
                    return self._exchange(op, params)
                except _NotSent:  # the daemon went away before it saw this request
                    if not reconnect:
                        raise _api.connection_lost(self.path) from None
                    self._reconnect()
                    return self._exchange(op, params)
        finally:
            self._leases.report_lost(self.on_lost)  # outside the lock: it may call us

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None

    def _segment(self, reply: Reply, access: Access) -> Segment:
        seg = self._mappings.segment(reply, access, self._release_segment)
        self._leases.add(seg)
        return seg

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
        msg, anc, _flags, _ = _idle.recvmsg(sock, self._idle, _api.RECV_SIZE, _api.ANC_SIZE)
        fds = _api.split_fds(anc)
        if not msg:
            raise _api.connection_lost(self.path)
        return self._proto.receive(msg, fds)

    def _read_dropped(self, sock: _socket.socket) -> None:
        """Read one reply nobody waits for (a pipelined release's)."""
        with contextlib.suppress(BrokerError):  # an error answering nobody: nothing to do
            self._receive(sock)
        self._unread -= 1

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- API -------------------------------------------------------------------

    def hello(self, client: str | None = None) -> wire.HelloResult:
        """Ask what the daemon offers; ``client`` names this program to operators."""
        if client is not None:
            _api.str_param(client, "client")
        result = self._call("hello", client=client).unwrap()
        assert isinstance(result, wire.HelloResult)
        return result

    def create(
        self,
        name: str,
        size: int,
        lifetime: Lifetime = "refcount",
        ttl: float | None = None,
        mode: int = 0o600,
        exist_ok: bool = False,
        backing: Backing = "shm",
    ) -> Segment:
        """Create a segment and map it read-write."""
        params = _api.create_params(name, size, lifetime, ttl, mode, exist_ok, backing)
        return self._segment(self._call("create", **params), "rw")

    def open(self, name: str, access: Access = "ro", wait: float | None = None) -> Segment:
        """Open and map a segment; with ``wait``, wait that long for its creation."""
        if self._mappings.cached(name, access) is None:  # open_flow's one request
            return self._segment(self._call("open", **_api.open_params(name, access, wait)), access)
        return self._drive(
            _api.open_flow(self._mappings, name, access, wait, self._release_segment, self._leases)
        )

    def _drive(self, flow: _api.Flow) -> Segment:
        op, params = next(flow)
        while True:
            try:
                op, params = flow.send(self._call(op, **params))
            except StopIteration as done:
                seg: Segment = done.value
                return seg

    def release(self, lease: str) -> None:
        self._call("release", lease=_api.str_param(lease, "lease")).unwrap()

    def seal(self, name: str) -> wire.SegmentInfo:
        """Seal a segment: from now on only ``ro`` opens are granted.

        This broker's Segments of it then say ``sealed``; their mappings
        stay as they were (a writable one still writes: see docs/security.md).
        """
        info = _api.to_info(self._call("seal", name=_api.str_param(name, "name")))
        self._leases.sealed(info)
        return info

    def delete(self, name: str) -> None:
        self._call("delete", name=_api.str_param(name, "name")).unwrap()

    def stat(self, name: str) -> wire.SegmentInfo:
        return _api.to_info(self._call("stat", name=_api.str_param(name, "name")))

    def holders(self, name: str) -> list[wire.Holder]:
        """Who holds leases on ``name`` (operators only: ``PermissionError`` otherwise)."""
        return _api.to_holders(self._call("stat", name=_api.str_param(name, "name"), holders=True))

    def drop(self, client: int) -> int:
        """End client ``client``'s connection as if it had closed it (operators
        only); returns how many leases ended.  ``ENOENT``: no such client."""
        result = self._call("drop", client=_api.client_param(client)).unwrap()
        assert isinstance(result, wire.DropResult)
        return result.leases

    def reclaim(self, lease: str) -> wire.SegmentInfo:
        result = self._call("reclaim", lease=_api.str_param(lease, "lease")).unwrap()
        assert isinstance(result, wire.SegmentLeaseResult)
        return result.segment

    def reload(self) -> list[str]:
        """Have the daemon re-read its config (operators only); returns the
        changed keys that take effect only at its next start."""
        result = self._call("reload").unwrap()
        assert isinstance(result, wire.ReloadResult)
        return result.restart

    def stats(self) -> wire.StatsResult:
        result = self._call("stats").unwrap()
        assert isinstance(result, wire.StatsResult)
        return result

    def list(self, prefix: str | None = None) -> Iterator[wire.SegmentInfo]:
        """Every segment this peer may read, in name order, page by page."""
        after: str | None = None
        while True:
            page = self._call("list", prefix=prefix, after=after).unwrap()
            assert isinstance(page, wire.ListResult)
            yield from page.segments
            if page.next is None:
                return
            after = page.next

    def clients(self) -> Iterator[wire.ClientInfo]:
        after: int | None = None
        while True:
            page = self._call("clients", after=after).unwrap()
            assert isinstance(page, wire.ClientsResult)
            yield from page.clients
            if page.next is None:
                return
            after = page.next

    def watch(self, prefix: str = "") -> Watcher:
        """Subscribe to lifecycle events of names starting with ``prefix`` (needs pyzmq)."""
        from ._watch import Watcher

        return Watcher(self.hello().events or _api.default_events(self.path), prefix)
