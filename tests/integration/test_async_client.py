"""AsyncBroker against a real daemon: the operations, many calls in flight on
one connection, the errors it raises, and a daemon killed under it.

pytest-asyncio is not used: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from shmbroker import AsyncBroker, BrokerError, Segment
from tests.support.helpers import DaemonProc

T = TypeVar("T")


async def until(pred: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``pred`` for up to 5 s."""
    for _ in range(500):
        if await pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def test_operations(daemon: DaemonProc) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket) as b:
            hello = await b.hello("async-test")
            assert 1 in hello.versions
            seg = await b.create("as/x", 4096, mode=0o644)
            assert (seg.name, seg.size, seg.readonly) == ("as/x", 4096, False)
            seg.buf[:5] = b"async"
            ro = await b.open("as/x")
            assert ro.readonly
            assert ro.id == seg.id
            assert bytes(ro.buf[:5]) == b"async"
            info = await b.stat("as/x")
            assert (info.id, info.leases, info.mode, info.sealed) == (seg.id, 2, 0o644, False)
            assert [s.name async for s in b.list("as/")] == ["as/x"]
            sealed = await b.seal("as/x")
            assert sealed.sealed
            assert (await b.stat("as/x")).sealed
            ro.close()  # Segment.close releases in the background

            async def one_lease() -> bool:
                return (await b.stat("as/x")).leases == 1

            await until(one_lease)
            await b.delete("as/x")
            assert [s.name async for s in b.list("as/")] == []
            with pytest.raises(FileNotFoundError):
                await b.stat("as/x")
            seg.buf[:4] = b"kept"  # the mapping outlives the deletion
            seg.close()
        assert seg.closed

    asyncio.run(main())
    assert daemon.objects() == []


def test_list_pages_through_many_segments(daemon: DaemonProc) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket) as b:
            names = [f"pg/{i:03d}" for i in range(130)]
            segs = await asyncio.gather(*(b.create(n, 1) for n in names))  # 130 in flight
            try:
                assert [s.name for s in segs] == names
                assert [s.name async for s in b.list("pg/")] == names  # two pages
            finally:
                for s in segs:
                    s.close()

    asyncio.run(main())


def test_calls_in_flight_together_on_one_connection(daemon: DaemonProc) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket) as b:
            done: list[str] = []

            async def tracked(tag: str, aw: Awaitable[T]) -> T:
                result = await aw
                done.append(tag)
                return result

            other = await b.create("fl/other", 64)
            # the open is sent first and waits; the calls sent after it are
            # answered meanwhile, and the create on this same connection ends
            # the wait (a client serialising calls would deadlock here)
            waited, info, created, hello = await asyncio.wait_for(
                asyncio.gather(
                    tracked("open", b.open("fl/late", "rw", wait=30)),
                    tracked("stat", b.stat("fl/other")),
                    tracked("create", b.create("fl/late", 4096)),
                    tracked("hello", b.hello()),
                ),
                timeout=20,
            )
            try:
                assert done.index("stat") < done.index("open")
                assert info.id == other.id
                assert hello.versions
                assert waited.id == created.id
                assert not waited.readonly
                created.buf[:4] = b"ping"
                assert bytes(waited.buf[:4]) == b"ping"
                waited.buf[:4] = b"pong"
                assert bytes(created.buf[:4]) == b"pong"
                assert (await b.stat("fl/late")).leases == 2
            finally:
                for s in (waited, created, other):
                    s.close()

    asyncio.run(main())


def _check(exc: BaseException, cls: type[OSError], code: int) -> None:
    """A refusal is a BrokerError of the OS's class, nothing from asyncio or pydantic."""
    assert isinstance(exc, cls), repr(exc)
    assert isinstance(exc, BrokerError), repr(exc)
    assert type(exc).__module__.startswith("shmbroker"), repr(exc)
    assert exc.errno == code, repr(exc)


def test_errors_are_oserror_subclasses(daemon: DaemonProc) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket) as b:
            seg = await b.create("er/x", 4096)
            await b.seal("er/x")
            max_wait = (await b.hello()).limits.max_wait
            cases: list[tuple[Callable[[], Awaitable[Any]], type[OSError], int]] = [
                (lambda: b.stat("er/absent"), FileNotFoundError, errno.ENOENT),
                (lambda: b.open("er/absent"), FileNotFoundError, errno.ENOENT),
                (lambda: b.delete("er/absent"), FileNotFoundError, errno.ENOENT),
                (lambda: b.release("no-such-lease"), FileNotFoundError, errno.ENOENT),
                (lambda: b.create("er/x", 4096), FileExistsError, errno.EEXIST),
                (lambda: b.create("er/x", 8192, exist_ok=True), FileExistsError, errno.EEXIST),
                (lambda: b.open("er/x", "rw"), PermissionError, errno.EPERM),
                (lambda: b.open("er/absent", wait=0), TimeoutError, errno.ETIMEDOUT),
                (lambda: b.open("er/absent", wait=0.2), TimeoutError, errno.ETIMEDOUT),
                (lambda: b.open("er/absent", wait=max_wait + 1), BrokerError, errno.EINVAL),
                (lambda: b.create("er//bad", 1), BrokerError, errno.EINVAL),
                (lambda: b.create("er/../x", 1), BrokerError, errno.EINVAL),
                (lambda: b.create("x" * 256, 1), BrokerError, errno.ENAMETOOLONG),
                (lambda: b.create("er/y", 0), BrokerError, errno.EINVAL),
                (lambda: b.create("er/y", 1, lifetime="ever"), BrokerError, errno.EINVAL),  # type: ignore[arg-type]
                (lambda: b.create("er/y", 1, ttl=1), BrokerError, errno.EINVAL),
                (lambda: b.create("er/y", 1, lifetime="ttl"), BrokerError, errno.EINVAL),
                (lambda: b.open("er/x", "rx"), BrokerError, errno.EINVAL),  # type: ignore[arg-type]
            ]
            for make, cls, code in cases:
                with pytest.raises(cls) as info:
                    await make()
                _check(info.value, cls, code)
            assert (await b.stat("er/x")).leases == 1  # nothing above granted a lease
            assert [s.name async for s in b.list("er/")] == ["er/x"]
            seg.close()

    asyncio.run(main())


def test_connect_to_a_missing_socket_names_it(daemon: DaemonProc) -> None:
    path = os.path.join(os.path.dirname(daemon.socket), "nobody.sock")

    async def main() -> None:
        fds = set(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(FileNotFoundError) as info:
                await AsyncBroker.connect(path)
            assert path in str(info.value)
            del info
        leaked = set(os.listdir("/proc/self/fd")) - fds
        gc.collect()  # any ResourceWarning for a leaked socket lands in this test
        assert not leaked, f"a failed connect left {len(leaked)} fd(s) open"

    asyncio.run(main())


def test_calls_in_flight_when_the_daemon_is_killed_raise_connection_error(
    daemon: DaemonProc,
) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket, reconnect_timeout=0.2) as b:
            seg: Segment = await b.create("kill/x", 4096)
            waits = [asyncio.create_task(b.open(f"kill/never{i}", wait=60)) for i in range(3)]
            await b.hello()  # answered after the opens were read: they are waiting
            assert not any(t.done() for t in waits)
            daemon.kill()
            for t in waits:
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(t, 10)
            with pytest.raises(ConnectionError):  # a later call: no daemon to reconnect to
                await asyncio.wait_for(b.stat("kill/x"), 10)
            seg.buf[:4] = b"live"  # the mapping does not depend on the daemon
            assert bytes(seg.buf[:4]) == b"live"
            seg.close()

    asyncio.run(main())


def test_a_call_after_close_sees_the_release(daemon: DaemonProc) -> None:
    """close() sends the release at once: the next call is served after it."""

    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket) as b:
            keep = await b.create("ac/keep", 4096, lifetime="persistent")
            for _ in range(50):
                seg = await b.open("ac/keep")
                seg.close()
                assert (await b.stat("ac/keep")).leases == 1  # no sleep, no retry
            keep.close()
            assert (await b.stat("ac/keep")).leases == 0
            await b.delete("ac/keep")

    asyncio.run(main())
