"""How an :class:`~shmbroker.AsyncBroker` calls: over the event loop, many at once.

The hand-written half of the async client (its API is ``_async.py``, from
which ``_sync.py`` is generated): replies are matched to requests by id, each
call awaiting a future the socket's reader callback resolves, so many calls
may be in flight on one connection (an ``open`` with ``wait`` does not hold
up the others); a reconnect is serialised by an ``asyncio.Lock``; a release
is sent without waiting, its reply dropped by the reader; and the idle
strategy spins only while the loop has nothing else to do (``_idle.py``).
``_transport_sync.py`` is the blocking counterpart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Generator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from . import _fork, _idle, _transport
from ._calls import ClientProtocol, Reply
from ._held import Held, LostCallback
from ._paths import socket_path
from ._results import Mappings
from .errors import BrokerError

__all__ = ["AsyncTransport"]


class AsyncTransport:
    """The connection under an :class:`~shmbroker.AsyncBroker`, and its ``aclose``."""

    def __init__(
        self,
        path: str,
        reconnect_timeout: float = 10.0,
        on_lost: LostCallback | None = None,
        idle: _idle.IdleArg = _idle.DEFAULT,
    ) -> None:
        """Not connected yet: use :meth:`connect` (raises as it does for ``idle``)."""
        self.path = path
        self.reconnect_timeout = reconnect_timeout
        self.on_lost = on_lost
        self._idle = _idle.Idle(idle)
        self._sock = _transport.sock_for(path)
        self._proto = ClientProtocol()
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: BaseException | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases = Held()
        self._mappings = Mappings()
        self._reconnecting: asyncio.Lock | None = None
        _fork.track(self)

    @classmethod
    def connect(
        cls,
        socket: str | os.PathLike[str] | None = None,
        *,
        reconnect_timeout: float = 10.0,
        on_lost: LostCallback | None = None,
        idle: _idle.IdleArg = _idle.DEFAULT,
    ) -> _Connecting[Self]:
        """Connect: ``await AsyncBroker.connect()`` or ``async with AsyncBroker.connect() as b``.

        Arguments as for :class:`~shmbroker.Broker` (``idle``: no spin while
        the loop has other work).  Many calls may be in flight at once.
        ``Segment.close()`` is synchronous, so here it always sends the
        release without waiting for it (as ``Broker(pipeline_release=True)``
        does); a call made on this broker after it is served after the
        release.  A forked child connects anew from its own event loop.

        Raises, once awaited, ``FileNotFoundError``/``ConnectionRefusedError``
        naming the socket path when no daemon listens there (another connect
        error as its errno's ``OSError``); at once ``ValueError``/
        ``TypeError`` for another ``idle``.
        """
        return _Connecting(cls(socket_path(socket), reconnect_timeout, on_lost, idle))

    def _after_fork(self) -> None:
        """In a forked child (see ``_fork.py``): nothing of the parent's is ours.

        The parent's loop is not touched (its epoll instance is shared with
        the parent): the next call reconnects from the child's running loop.
        """
        self._sock.close()  # our copy only: the parent's connection lives on
        self._lost = _transport.connection_lost(self.path)
        self._waiting = {}
        self._tasks = set()
        self._reconnecting = None
        self._proto = ClientProtocol()
        self._leases.disown()
        self._leases = Held()
        self._mappings = Mappings()

    async def _connect(self) -> Self:
        self._loop = asyncio.get_running_loop()
        sock = _transport.sock_for(self.path)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, self.path)
        except OSError as exc:
            sock.close()
            self._sock.close()  # the placeholder, if this was the first try
            raise _transport.not_running(self.path, exc) from None
        self._sock.close()  # the placeholder, or the connection we lost
        self._sock = sock
        self._lost = None
        self._loop.add_reader(sock.fileno(), self._readable)
        return self

    async def _reconnect(self) -> None:
        """Connect again with backoff, then reclaim what we held."""
        for delay in _transport.backoff(self.reconnect_timeout):
            try:
                await self._connect()
                break
            except _transport.RETRYABLE:
                await asyncio.sleep(delay)
        else:
            await self._connect()
        for lease in self._leases.tokens():
            try:
                (await self._send_call("reclaim", {"lease": lease})).unwrap()
            except FileNotFoundError:  # too late, or the segment is gone
                self._leases.lost(lease)

    def _readable(self) -> None:
        while True:
            try:
                msg, anc, _flags, _ = self._sock.recvmsg(_transport.RECV_SIZE, _transport.ANC_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            fds = _transport.split_fds(anc)
            if not msg:
                self._fail(_transport.connection_lost(self.path))
                return
            try:
                reply = self._proto.receive(msg, fds)
            except BrokerError as exc:
                self._fail(exc)
                return
            if reply is None:
                continue
            fut = self._waiting.pop(reply.id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
            elif reply.fd is not None:
                os.close(reply.fd)

    def _fail(self, exc: BaseException) -> None:
        self._lost = exc
        self._detach()
        self._sock.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(_transport.connection_lost(self.path))
        self._waiting.clear()

    def _detach(self) -> None:
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())

    async def _call(self, op: str, **params: Any) -> Reply:
        if self._closed:
            raise _transport.closed_broker()
        if self._loop is None:
            raise _transport.connection_lost(self.path)
        if self._lost is not None:
            if self._reconnecting is None:
                self._reconnecting = asyncio.Lock()
            try:
                async with self._reconnecting:
                    if self._lost is not None:
                        await self._reconnect()
            finally:
                self._leases.report_lost(self.on_lost)
        return await self._send_call(op, params)

    async def _send_call(self, op: str, params: dict[str, Any]) -> Reply:
        assert self._loop is not None
        rid, data = self._proto.request(op, params)
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._waiting[rid] = fut
        try:
            await self._loop.sock_sendall(self._sock, data)
            spun = _idle.spin_loop(self._loop, self._idle, self._readable, fut.done)
            reply = await fut
            _idle.finish(self._idle, spun)
            return reply
        except ConnectionError:
            self._fail(_transport.connection_lost(self.path))
            raise _transport.connection_lost(self.path) from None
        finally:
            self._waiting.pop(rid, None)
            self._proto.forget(rid)

    async def aclose(self) -> None:
        """Close the connection: the daemon ends its leases; calls in flight
        raise ``ConnectionResetError`` (raises nothing itself)."""
        self._closed = True
        self._fail(_transport.connection_lost(self.path))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _release_segment(self, lease: str) -> None:
        """Segment.close() is synchronous: send the release now, do not wait for it.

        Sent at once (unless the socket is full), so a call made after
        ``close()`` reaches the daemon after it: the daemon serves a
        connection's requests in order.  The reader drops the reply.  A
        connection lost is no error: the lease ends with the reclaim window.
        """
        self._leases.discard(lease)
        if self._closed or self._lost is not None or self._loop is None:
            return
        rid, data = self._proto.request("release", {"lease": lease})
        self._proto.forget(rid)
        try:
            self._sock.send(data)
        except BlockingIOError:  # full: send it as soon as the socket takes it
            task = self._loop.create_task(self._send_quietly(data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        except OSError:
            pass  # lost: the reader sees it too

    async def _send_quietly(self, data: bytes) -> None:
        assert self._loop is not None
        with contextlib.suppress(OSError):
            await self._loop.sock_sendall(self._sock, data)


_T = TypeVar("_T", bound=AsyncTransport)


class _Connecting(Generic[_T]):
    """Awaitable and async context manager returned by :meth:`AsyncTransport.connect`."""

    def __init__(self, broker: _T) -> None:
        self._broker = broker

    def __await__(self) -> Generator[Any, None, _T]:
        return self._broker._connect().__await__()

    async def __aenter__(self) -> _T:
        return await self._broker._connect()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._broker.aclose()
