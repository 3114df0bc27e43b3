"""The event stream: a ZeroMQ SUB socket (needs the ``zmq`` extra)."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from . import wire
from .errors import error_from_errno

try:
    import zmq
    import zmq.asyncio
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("watching events needs pyzmq: pip install 'shmbroker[zmq]'") from exc

__all__ = ["AsyncWatcher", "Watcher"]


def _parse(frames: list[bytes]) -> wire.Event | None:
    if len(frames) != 2:
        return None
    try:
        return wire.Event.model_validate_json(frames[1])
    except ValidationError:
        return None


class _Base:
    def __init__(self, endpoint: str, prefix: str, ctx: zmq.Context[Any]) -> None:
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._sock.connect(endpoint)

    def close(self) -> None:
        self._sock.close(linger=0)


class Watcher(_Base):
    """Iterate lifecycle events of names under a prefix; best effort, as published."""

    def __init__(self, endpoint: str, prefix: str = "") -> None:
        super().__init__(endpoint, prefix, zmq.Context.instance())

    def next(self, timeout: float | None = None) -> wire.Event:
        """The next event; ``TimeoutError`` if none arrives within ``timeout`` s."""
        while True:
            if not self._sock.poll(None if timeout is None else int(timeout * 1000)):
                raise error_from_errno(errno.ETIMEDOUT, "no event")
            event = _parse(self._sock.recv_multipart())
            if event is not None:
                return event

    def __iter__(self) -> Iterator[wire.Event]:
        while True:
            yield self.next()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncWatcher(_Base):
    """The asyncio form of :class:`Watcher`."""

    def __init__(self, endpoint: str, prefix: str = "") -> None:
        super().__init__(endpoint, prefix, zmq.asyncio.Context.instance())

    async def next(self) -> wire.Event:
        while True:
            event = _parse(await self._sock.recv_multipart())
            if event is not None:
                return event

    async def __aiter__(self) -> AsyncIterator[wire.Event]:
        while True:
            yield await self.next()

    async def __aenter__(self) -> AsyncWatcher:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
