"""The asyncio client: the same protocol object, driven by the event loop.

Replies are matched to requests by id, so many calls may be in flight on one
connection (an ``open`` with ``wait`` does not hold up the others).  If the
connection drops, every call in flight raises ``ConnectionResetError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
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
    from ._watch import AsyncWatcher

__all__ = ["AsyncBroker"]


class AsyncBroker:
    """Use ``await AsyncBroker.connect()`` or ``async with AsyncBroker.connect() as b``.

    As with :class:`~shmbroker.Broker`, a daemon restart fails the calls in
    flight with ``ConnectionError``; the next call reconnects with backoff
    and reclaims the leases of open segments.

    ``Segment.close()`` is synchronous, so here it always sends the release
    without waiting for it (as ``Broker(pipeline_release=True)`` does); a
    call made on this broker after it is served after the release.

    Lost leases, ``on_lost``, ``fork`` and a closed broker (``ValueError``)
    are as for :class:`~shmbroker.Broker`; a forked child connects anew from
    its own event loop.
    """

    def __init__(
        self,
        path: str,
        reconnect_timeout: float = 10.0,
        on_lost: LostCallback | None = None,
        idle: _idle.IdleArg = _idle.DEFAULT,
    ) -> None:
        self.path = path
        self.reconnect_timeout = reconnect_timeout
        self.on_lost = on_lost
        self._idle = _idle.Idle(idle)
        self._sock = _api.sock_for(path)
        self._proto = ClientProtocol()
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: BaseException | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases = Held()
        self._mappings = _api.Mappings()
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
    ) -> _Connecting:
        """``idle`` as for :class:`~shmbroker.Broker`, but no spin while the loop has other work."""
        return _Connecting(cls(socket_path(socket), reconnect_timeout, on_lost, idle))

    def _after_fork(self) -> None:
        """In a forked child (see ``_fork.py``): nothing of the parent's is ours.

        The parent's loop is not touched (its epoll instance is shared with
        the parent): the next call reconnects from the child's running loop.
        """
        self._sock.close()  # our copy only: the parent's connection lives on
        self._lost = _api.connection_lost(self.path)
        self._waiting = {}
        self._tasks = set()
        self._reconnecting = None
        self._proto = ClientProtocol()
        self._leases.disown()
        self._leases = Held()
        self._mappings = _api.Mappings()

    async def _connect(self) -> AsyncBroker:
        self._loop = asyncio.get_running_loop()
        sock = _api.sock_for(self.path)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, self.path)
        except OSError as exc:
            sock.close()
            self._sock.close()  # the placeholder, if this was the first try
            raise _api.not_running(self.path, exc) from None
        self._sock.close()  # the placeholder, or the connection we lost
        self._sock = sock
        self._lost = None
        self._loop.add_reader(sock.fileno(), self._readable)
        return self

    async def _reconnect(self) -> None:
        """Connect again with backoff, then reclaim what we held."""
        for delay in _api.backoff(self.reconnect_timeout):
            try:
                await self._connect()
                break
            except _api.RETRYABLE:
                await asyncio.sleep(delay)
        else:
            await self._connect()
        for lease in self._leases.tokens():
            try:
                (await self._send_call("reclaim", {"lease": lease})).unwrap()
            except FileNotFoundError:  # too late, or the segment is gone
                self._leases.lost(lease)

    # -- plumbing ------------------------------------------------------------

    def _readable(self) -> None:
        while True:
            try:
                msg, anc, _flags, _ = self._sock.recvmsg(_api.RECV_SIZE, _api.ANC_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            fds = _api.split_fds(anc)
            if not msg:
                self._fail(_api.connection_lost(self.path))
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
                fut.set_exception(_api.connection_lost(self.path))
        self._waiting.clear()

    def _detach(self) -> None:
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())

    async def _call(self, op: str, **params: Any) -> Reply:
        if self._closed:
            raise _api.closed_broker()
        if self._loop is None:
            raise _api.connection_lost(self.path)
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
            self._fail(_api.connection_lost(self.path))
            raise _api.connection_lost(self.path) from None
        finally:
            self._waiting.pop(rid, None)
            self._proto.forget(rid)

    async def aclose(self) -> None:
        self._closed = True
        self._fail(_api.connection_lost(self.path))

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _segment(self, reply: Reply, access: Access) -> Segment:
        seg = self._mappings.segment(reply, access, self._release_later)
        self._leases.add(seg)
        return seg

    def _release_later(self, lease: str) -> None:
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

    # -- API -------------------------------------------------------------------

    async def hello(self, client: str | None = None) -> wire.HelloResult:
        if client is not None:
            _api.str_param(client, "client")
        result = (await self._call("hello", client=client)).unwrap()
        assert isinstance(result, wire.HelloResult)
        return result

    async def create(
        self,
        name: str,
        size: int,
        lifetime: Lifetime = "refcount",
        ttl: float | None = None,
        mode: int = 0o600,
        exist_ok: bool = False,
        backing: Backing = "shm",
    ) -> Segment:
        params = _api.create_params(name, size, lifetime, ttl, mode, exist_ok, backing)
        return self._segment(await self._call("create", **params), "rw")

    async def open(self, name: str, access: Access = "ro", wait: float | None = None) -> Segment:
        if self._mappings.cached(name, access) is None:  # open_flow's one request
            params = _api.open_params(name, access, wait)
            return self._segment(await self._call("open", **params), access)
        return await self._drive(
            _api.open_flow(self._mappings, name, access, wait, self._release_later, self._leases)
        )

    async def _drive(self, flow: _api.Flow) -> Segment:
        op, params = next(flow)
        while True:
            try:
                op, params = flow.send(await self._call(op, **params))
            except StopIteration as done:
                seg: Segment = done.value
                return seg

    async def release(self, lease: str) -> None:
        (await self._call("release", lease=_api.str_param(lease, "lease"))).unwrap()

    async def seal(self, name: str) -> wire.SegmentInfo:
        """As :meth:`Broker.seal`: this broker's Segments of it say ``sealed``."""
        info = _api.to_info(await self._call("seal", name=_api.str_param(name, "name")))
        self._leases.sealed(info)
        return info

    async def delete(self, name: str) -> None:
        (await self._call("delete", name=_api.str_param(name, "name"))).unwrap()

    async def stat(self, name: str) -> wire.SegmentInfo:
        return _api.to_info(await self._call("stat", name=_api.str_param(name, "name")))

    async def holders(self, name: str) -> list[wire.Holder]:
        """As :meth:`Broker.holders` (``PermissionError`` for non-operators)."""
        reply = await self._call("stat", name=_api.str_param(name, "name"), holders=True)
        return _api.to_holders(reply)

    async def drop(self, client: int) -> int:
        """As :meth:`Broker.drop` (operators only; ``ENOENT``: no such client)."""
        result = (await self._call("drop", client=_api.client_param(client))).unwrap()
        assert isinstance(result, wire.DropResult)
        return result.leases

    async def reclaim(self, lease: str) -> wire.SegmentInfo:
        result = (await self._call("reclaim", lease=_api.str_param(lease, "lease"))).unwrap()
        assert isinstance(result, wire.SegmentLeaseResult)
        return result.segment

    async def reload(self) -> list[str]:
        """As :meth:`Broker.reload`: the changed keys that wait for a restart."""
        result = (await self._call("reload")).unwrap()
        assert isinstance(result, wire.ReloadResult)
        return result.restart

    async def stats(self) -> wire.StatsResult:
        result = (await self._call("stats")).unwrap()
        assert isinstance(result, wire.StatsResult)
        return result

    async def list(self, prefix: str | None = None) -> AsyncIterator[wire.SegmentInfo]:
        after: str | None = None
        while True:
            page = (await self._call("list", prefix=prefix, after=after)).unwrap()
            assert isinstance(page, wire.ListResult)
            for seg in page.segments:
                yield seg
            if page.next is None:
                return
            after = page.next

    async def clients(self) -> AsyncIterator[wire.ClientInfo]:
        after: int | None = None
        while True:
            page = (await self._call("clients", after=after)).unwrap()
            assert isinstance(page, wire.ClientsResult)
            for client in page.clients:
                yield client
            if page.next is None:
                return
            after = page.next

    async def watch(self, prefix: str = "") -> AsyncWatcher:
        from ._watch import AsyncWatcher

        hello = await self.hello()
        return AsyncWatcher(hello.events or _api.default_events(self.path), prefix)


class _Connecting:
    """Awaitable and async context manager returned by :meth:`AsyncBroker.connect`."""

    def __init__(self, broker: AsyncBroker) -> None:
        self._broker = broker

    def __await__(self) -> Any:
        return self._broker._connect().__await__()

    async def __aenter__(self) -> AsyncBroker:
        return await self._broker._connect()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._broker.aclose()
