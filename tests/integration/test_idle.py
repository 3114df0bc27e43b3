"""The client idle strategy (shmbroker._idle): its decisions fed values, and
real waits against a real daemon that spin, time out, see the daemon die,
and never spin on one CPU."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from shmbroker import AsyncBroker, Broker, _idle
from shmbroker._idle import (
    BLOCKED,
    BUSY_CHECK_NS,
    CAP,
    FORCED,
    GROW_START_NS,
    MAX_BUDGET_NS,
    SPIN_NS,
    SPUN,
    WINDOW_NS,
    Idle,
)
from tests.support.helpers import DaemonProc, run_client

US = 1000
MS = 1_000_000
two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="this process has one CPU: nothing spins"
)


# -- the decision, fed values ----------------------------------------------------


def test_arguments() -> None:
    assert not Idle("block").spins
    assert Idle("spin").budget == SPIN_NS
    assert Idle("adaptive").budget == SPIN_NS
    assert Idle("adaptive").adaptive
    assert Idle(50).budget == 50 * US
    assert Idle(2.5).budget == 2500
    assert not Idle(0).spins
    for bad in ("fast", "", "BLOCK"):
        with pytest.raises(ValueError, match="idle must be"):
            Idle(bad)  # type: ignore[arg-type]
    for out_of_range in (-1, 1_000_001, float("nan")):
        with pytest.raises(ValueError, match="microseconds"):
            Idle(out_of_range)
    for not_a_mode in (None, True, [10], b"spin"):
        with pytest.raises(TypeError):
            Idle(not_a_mode)  # type: ignore[arg-type]


def test_broker_refuses_a_bad_idle_before_connecting() -> None:
    with pytest.raises(ValueError, match="idle must be"):
        Broker("/nonexistent/sock", idle="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AsyncBroker("/nonexistent/sock", idle=None)  # type: ignore[arg-type]


def test_one_cpu_never_spins() -> None:
    for mode in ("spin", "adaptive", 500):
        idle = Idle(mode, count_cpus=lambda: 1)
        for t in range(0, 10 * WINDOW_NS, WINDOW_NS // 3):
            assert idle.begin(t) == 0
            idle.end(0, 50 * US)


def test_affinity_is_checked_again_each_window() -> None:
    n = [2]
    idle = Idle("spin", count_cpus=lambda: n[0], count_runnable=lambda: 1)
    assert idle.begin(0) == SPIN_NS
    n[0] = 1  # pinned to one CPU while running
    assert idle.begin(WINDOW_NS // 2) == SPIN_NS  # not seen before the window ends
    assert idle.begin(WINDOW_NS) == 0
    n[0] = 2
    assert idle.begin(2 * WINDOW_NS) == SPIN_NS


def test_no_spin_while_the_machine_has_more_runnable_tasks_than_cpus() -> None:
    tasks = [5]
    for mode in ("spin", "adaptive", 500):
        tasks[0] = 5
        idle = Idle(mode, count_cpus=lambda: 2, count_runnable=lambda: tasks[0])
        assert idle.begin(0) == 0
        assert idle.kind == FORCED
        tasks[0] = 2  # the daemon and this client: a CPU each
        assert idle.begin(BUSY_CHECK_NS // 2) == 0  # not looked at again yet
        assert idle.begin(BUSY_CHECK_NS) > 0 or idle.kind == BLOCKED


def test_missed_spins_are_capped_per_window() -> None:
    idle = Idle(100, count_cpus=lambda: 2, count_runnable=lambda: 1)
    t = 0
    misses = 0
    while idle.begin(t) and misses < 10_000:
        idle.end(100 * US, 300 * US)  # burnt the whole budget, then blocked
        misses += 1
        t += 300 * US
    assert misses == int(CAP * WINDOW_NS / (100 * US))  # 10% of a CPU, then block
    assert idle.begin(t) == 0
    assert idle.begin(WINDOW_NS) == 100 * US  # a new window spins again


def test_spins_that_caught_their_reply_are_not_capped() -> None:
    idle = Idle(100, count_cpus=lambda: 2, count_runnable=lambda: 1)
    for i in range(20_000):  # 20,000 x 40 us = 0.8 s of spinning, all of it caught
        assert idle.begin(i * 40 * US) == 100 * US
        idle.end(100 * US, 40 * US)


def _spinning(idle: Idle) -> Idle:
    """An adaptive strategy whose measurements make it prefer to spin."""
    idle.means = [100.0 * US, 30.0 * US]
    return idle


def test_adaptive_budget_grows_when_a_reply_just_missed_the_spin() -> None:
    idle = _spinning(Idle("adaptive", count_cpus=lambda: 2, count_runnable=lambda: 1))
    idle.budget = 20 * US
    budget = idle.begin(0, draw=lambda: 0.99)
    assert budget == 20 * US
    assert idle.kind == SPUN
    idle.end(budget, 35 * US)  # came 15 us after the spin gave up
    assert idle.budget == 40 * US
    for _ in range(5):
        idle.end(idle.begin(0, draw=lambda: 0.99), MAX_BUDGET_NS)
    assert idle.budget == MAX_BUDGET_NS  # doubled up to the bound, never past it


def test_adaptive_budget_shrinks_to_blocking_when_replies_come_late() -> None:
    idle = _spinning(Idle("adaptive", count_cpus=lambda: 2, count_runnable=lambda: 1))
    seen = []
    for _ in range(8):
        budget = idle.begin(0, draw=lambda: 0.99)
        idle.end(budget, 5 * MS)  # a slow daemon, an open with wait
        seen.append(idle.budget)
    assert seen[:3] == [SPIN_NS // 2, SPIN_NS // 4, SPIN_NS // 8]
    assert idle.budget == 0
    # at 0 it blocks at once, and a short wait starts it growing again
    budget = idle.begin(0, draw=lambda: 0.99)
    assert budget == 0
    idle.end(budget, 30 * US)
    assert idle.budget == GROW_START_NS


def test_adaptive_budget_stays_when_the_spin_catches_replies() -> None:
    idle = _spinning(Idle("adaptive", count_cpus=lambda: 2, count_runnable=lambda: 1))
    for _ in range(100):
        budget = idle.begin(0, draw=lambda: 0.99)
        idle.end(budget, 40 * US)
    assert idle.budget == SPIN_NS


def test_adaptive_uses_the_way_that_waits_less_and_keeps_measuring_the_other() -> None:
    idle = Idle("adaptive", count_cpus=lambda: 2, count_runnable=lambda: 1)
    # one wait each way first
    assert idle.begin(0) == 0
    assert idle.kind == BLOCKED
    idle.end(0, 120 * US)
    assert idle.begin(0) == SPIN_NS
    assert idle.kind == SPUN
    idle.end(SPIN_NS, 40 * US)
    assert idle.begin(0, draw=lambda: 0.99) == SPIN_NS  # spinning waited less
    assert idle.begin(0, draw=lambda: 0.0) == 0  # an exploring draw blocks
    # the machine changes: spun waits get long (a busy host), blocked ones short
    for _ in range(400):
        budget = idle.begin(0)
        idle.end(budget, 300 * US if idle.kind == SPUN else 50 * US)
    assert idle.means[BLOCKED] < idle.means[SPUN]
    assert idle.begin(0, draw=lambda: 0.99) == 0
    assert idle.begin(0, draw=lambda: 0.0) > 0 or idle.budget == 0  # still explores


def test_fixed_strategies_do_not_adapt() -> None:
    idle = Idle("spin", count_cpus=lambda: 2, count_runnable=lambda: 1)
    for _ in range(10):
        idle.end(idle.begin(0), 10 * MS)
    assert idle.budget == SPIN_NS
    assert idle.kind == SPUN


def test_forced_blocks_teach_nothing() -> None:
    idle = Idle("adaptive", count_cpus=lambda: 1)
    idle.end(idle.begin(0), 30 * US)
    assert idle.kind == FORCED
    assert idle.means == [0.0, 0.0]
    assert idle.budget == SPIN_NS


# -- the loops, on real sockets -----------------------------------------------------


@two_cpus
def test_recvmsg_spins_then_blocks_on_a_real_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        idle = Idle(200, count_runnable=lambda: 1)
        timer = threading.Timer(0.05, b.send, (b"late",))
        timer.start()
        t0 = time.monotonic()
        msg, _anc, _flags, _ = _idle.recvmsg(a, idle, 64, 0)
        timer.join()
        assert msg == b"late"
        assert time.monotonic() - t0 >= 0.04
        assert idle.last == 200 * US  # it spun its budget, then blocked for the rest
        b.send(b"soon")
        assert _idle.recvmsg(a, idle, 64, 0)[0] == b"soon"
        b.close()
        assert _idle.recvmsg(a, idle, 64, 0)[0] == b""  # the peer's end, as without a spin


def test_recvmsg_keeps_the_socket_timeout() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.settimeout(0.1)
        with pytest.raises(TimeoutError):
            _idle.recvmsg(a, Idle(300), 64, 0)


def test_async_never_spins_while_the_loop_has_other_work() -> None:
    polls = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        idle = Idle("spin", count_runnable=lambda: 1)
        loop.call_soon(lambda: None)  # ready work
        assert _idle.spin_loop(loop, idle, lambda: polls.append(1), lambda: False) == (0, 0)
        assert polls == []
        await asyncio.sleep(0)
        handle = loop.call_later(50e-6, lambda: None)  # a timer due within the budget
        assert _idle.spin_loop(loop, idle, lambda: polls.append(1), lambda: False) == (0, 0)
        assert polls == []
        handle.cancel()
        await asyncio.sleep(0)
        if len(os.sched_getaffinity(0)) > 1:
            # nothing else to do: it polls, and leaves as soon as a callback is ready
            def poll() -> None:
                polls.append(1)
                if len(polls) == 3:
                    loop.call_soon(lambda: None)

            assert _idle.spin_loop(loop, idle, poll, lambda: False) == (0, 0)
            assert len(polls) == 3

    asyncio.run(main())


# -- a real daemon -------------------------------------------------------------------


@two_cpus
def test_a_spinning_open_with_wait_still_times_out(daemon: DaemonProc) -> None:
    with Broker(daemon.socket, idle=1000) as b:
        b._idle.count_runnable = lambda: 1  # spin whatever else runs on the machine
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            b.open("idle/never", wait=0.3)
        assert time.monotonic() - t0 >= 0.29
        assert b._idle.last == 1000 * US  # the wait did spin first


@two_cpus
def test_a_spinning_async_open_with_wait_still_times_out(daemon: DaemonProc) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket, idle=1000) as b:
            b._idle.count_runnable = lambda: 1  # spin whatever else runs on the machine
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await b.open("idle/never", wait=0.3)
            assert time.monotonic() - t0 >= 0.29
            assert b._idle.last == 1000 * US

    asyncio.run(main())


def test_a_spinning_async_wait_raises_when_the_daemon_dies(daemon: DaemonProc) -> None:
    async def main() -> None:
        async with AsyncBroker.connect(daemon.socket, idle="spin", reconnect_timeout=0.2) as b:
            pending = asyncio.ensure_future(b.open("idle/absent", wait=30))
            await asyncio.sleep(0.2)
            daemon.kill()
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pending, 10)

    asyncio.run(main())


def test_spinning_clients_work(daemon: DaemonProc) -> None:
    """Every strategy gives the same results (the spin only changes how it waits)."""
    for mode in ("block", "spin", "adaptive", 20):
        with Broker(daemon.socket, idle=mode) as b:
            with b.create("idle/x", 4096) as seg:
                seg.buf[:2] = b"ok"
                for _ in range(50):
                    with b.open("idle/x") as again:
                        assert bytes(again.buf[:2]) == b"ok"
            assert b.stats().segments == 0


def test_a_process_pinned_to_one_cpu_chooses_block(daemon: DaemonProc) -> None:
    code = """
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    for mode in ("adaptive", "spin", 100):
        with Broker(SOCK, idle=mode) as b:
            for _ in range(20):
                b.hello()
            print(mode, b._idle.cpus, b._idle.last, b._idle.kind)
    """
    out = run_client(code, daemon.socket).stdout.split("\n")
    assert [line.split()[1:] for line in out if line] == [["1", "0", str(FORCED)]] * 3
