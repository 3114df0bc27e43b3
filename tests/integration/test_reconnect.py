"""Clients survive a daemon restart: mappings stay, leases are reclaimed,
and a call in flight fails with ConnectionError instead of hanging."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import pytest

from shmbroker import AsyncBroker, Broker
from shmbrokerd.daemon import JOURNAL_LAG
from tests.support.helpers import DaemonProc, running_daemon


@pytest.fixture
def restartable() -> Iterator[DaemonProc]:
    with running_daemon({"reclaim_window": 20.0}) as d:
        yield d


def test_sync_client_reclaims_after_sigkill(restartable: DaemonProc) -> None:
    d = restartable
    with Broker(d.socket) as b:
        seg = b.create("re/persist", 4096, lifetime="persistent")
        seg.buf[:4] = b"abcd"
        d.kill()
        d.start()
        # the mapping never stopped working
        seg.buf[4:8] = b"efgh"
        # the next call reconnects and reclaims our lease
        assert b.stat("re/persist").leases == 1
        with b.open("re/persist") as again:
            assert bytes(again.buf[:8]) == b"abcdefgh"
        seg.close()
        assert b.stat("re/persist").leases == 0
        b.delete("re/persist")


@pytest.mark.parametrize("idle", ["block", "spin"])
def test_call_in_flight_raises_connection_error(restartable: DaemonProc, idle: str) -> None:
    """Also while the wait spins (the client idle strategy): the end of file is seen."""
    d = restartable
    with Broker(d.socket, reconnect_timeout=0.5, idle=idle) as b:  # type: ignore[arg-type]
        b.hello()
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                b.open("re/never", wait=30)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        d.kill()
        t.join(10)
        assert not t.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], ConnectionError)
        # with no daemon, reconnecting gives up after reconnect_timeout with a clear error
        with pytest.raises(OSError, match=d.socket):
            b.hello()


def test_async_client_reclaims_after_restart(restartable: DaemonProc) -> None:
    d = restartable

    async def scenario() -> None:
        async with AsyncBroker.connect(d.socket) as b:
            seg = await b.create("re/async", 4096, lifetime="ttl", ttl=60)
            pending = asyncio.ensure_future(b.open("re/absent", wait=30))
            await asyncio.sleep(0.1)
            d.stop()  # SIGTERM: the ttl segment and its lease are kept for reclaim
            with pytest.raises(ConnectionError):
                await pending
            d.start()
            info = await b.stat("re/async")
            assert info.leases == 1
            seg.buf[0] = 7
            seg.close()
            await asyncio.sleep(0.1)
            assert (await b.stat("re/async")).leases == 0
            await b.delete("re/async")

    asyncio.run(scenario())


def test_snapshots_written_while_serving_keep_what_a_restart_restored() -> None:
    """Stop, start, serve until a snapshot is written, SIGKILL: nothing restored is lost."""
    d = DaemonProc({"reclaim_window": 0.5, "state_compact_after": 20})
    d.start()
    try:
        with Broker(d.socket) as b:
            keeper = b.create("snap/keep", 4096, lifetime="persistent")
            keeper.buf[:4] = b"kept"
            keeper.close()
        d.stop()
        d.start()  # a clean start: nothing to compact, the restored segment is only in memory
        with Broker(d.socket) as b:
            with b.create("snap/busy", 64):
                for _ in range(30):  # 60 journal records: at least one snapshot while serving
                    b.open("snap/busy").close()
            assert b.stat("snap/keep").leases == 0
        d.kill()
        d.start()
        with Broker(d.socket) as b:
            assert [s.name for s in b.list("snap/")] == ["snap/keep"]
            with b.open("snap/keep") as seg:
                assert bytes(seg.buf[:4]) == b"kept"
            b.delete("snap/keep")
    finally:
        d.cleanup()


def test_a_journal_holding_only_a_torn_record_does_not_swallow_the_next() -> None:
    d = DaemonProc({"reclaim_window": 0.5})
    d.start()
    try:
        with Broker(d.socket) as b:
            b.create("torn/a", 4096, lifetime="persistent").close()
        d.stop()  # a clean stop: snapshot written, journal empty
        journal = d.root / "state" / "journal.jsonl"
        journal.write_bytes(b'{"k":"lease","t":"to')  # a write cut short by a crash
        d.start()
        with Broker(d.socket) as b:
            b.create("torn/b", 4096, lifetime="persistent").close()
        d.kill()
        d.start()
        with Broker(d.socket) as b:
            assert [s.name for s in b.list("torn/")] == ["torn/a", "torn/b"]
            b.delete("torn/a")
            b.delete("torn/b")
    finally:
        d.cleanup()


def test_a_release_is_on_file_soon_after_its_reply(restartable: DaemonProc) -> None:
    """An unlease may trail its reply (JOURNAL_LAG), not wait for the next write."""
    d = restartable
    with Broker(d.socket) as b:
        b.create("lag/keep", 4096, lifetime="persistent").close()
        b.open("lag/keep").close()
        time.sleep(JOURNAL_LAG + 0.5)  # idle: nothing else would write it
        journal = (d.root / "state" / "journal.jsonl").read_text().splitlines()
        assert json.loads(journal[-1])["k"] == "unlease"
    d.kill()
    d.start()
    with Broker(d.socket) as b:  # no lease left to reclaim for 20 s
        assert b.stat("lag/keep").leases == 0
        b.delete("lag/keep")


def test_a_stop_right_after_a_release_keeps_it(restartable: DaemonProc) -> None:
    """SIGTERM within JOURNAL_LAG of a release: the stop writes what trails."""
    d = restartable
    with Broker(d.socket) as b:
        b.create("lag/stop", 4096, lifetime="persistent").close()
        b.open("lag/stop").close()
        assert d.stop() == 0  # at once: the lag timer is still pending
    d.start()
    with Broker(d.socket) as b:  # nothing left to reclaim
        assert b.stat("lag/stop").leases == 0
        b.delete("lag/stop")
