"""How a client waits for a reply: spin a little, then block.

Why.  On a VM whose idle vCPU halts (most clouds; this project's own
Firecracker guest), a reply that comes later than a few microseconds after
the client blocked finds its vCPU halted and pays a hypervisor wake-up:
55-80 us here on top of the daemon's work (docs/performance.md, "The VM
wake-up cliff").  Polling the socket without blocking for a short budget
catches most replies before the vCPU halts.  The design is Aeron's idle
strategies (spin, then yield, then park) with the park a blocking
``recvmsg`` (never a sleep: a timed sleep costs its own wake-up), and the
budget adapted as KVM's halt polling adapts its window:

- a reply that came within the spin: the budget stays;
- a reply that came after it, but within ``MAX_BUDGET_NS`` of the start
  (the spin just missed it): the budget doubles (from ``GROW_START_NS``);
- a reply that came later than that (a slow daemon, ``open`` with
  ``wait``, a loaded host): the budget halves, and under ``MIN_BUDGET_NS``
  it is 0 (block at once) until a short wait grows it again.

Spinning pays only when the CPU would otherwise go idle (and halt).  On a
busy host it does not, and on two CPUs a spinning client, even yielding,
can delay the daemon it waits for (docs/performance.md measures both).  So
``"adaptive"`` also measures: it keeps the mean wait of the waits that
spun and of those that blocked at once, uses the shorter way, and spends
``EXPLORE`` of the waits (at random, so not always the same request of a
loop) on the other way, to notice when the machine changes.

Bounds, whatever the strategy: no spin on a machine that gives this
process one CPU (``os.sched_getaffinity``, checked again every second),
none while more tasks are runnable than this process has CPUs (counted
every 0.1 s from ``/proc/loadavg``: an oversubscribed host never halts a
CPU, so a spin there buys nothing and takes a CPU from someone, maybe the
daemon),
``os.sched_yield()`` between polls after the first ``YIELD_AFTER_NS``, and
spins that missed (budget burnt, then blocked anyway) may take at most
``CAP`` of a CPU per second; above it the strategy blocks until the second
is over.  A spin that caught its reply is not counted against the cap: it
is bounded by the latency it removed.

:class:`Idle` is the decision, fed times and outcomes (unit-tested without
a socket); :func:`recvmsg` is the one loop that applies it to a socket.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Literal

__all__ = [
    "CAP",
    "DEFAULT",
    "Idle",
    "IdleArg",
    "finish",
    "recvmsg",
    "spin_loop",
]

IdleArg = Literal["block", "spin", "adaptive"] | int | float

#: the strategy a Broker uses unless told (chosen by bench measurement)
DEFAULT: IdleArg = "adaptive"
#: the fixed budget of ``"spin"`` and the first budget of ``"adaptive"``
SPIN_NS = 100_000
MAX_BUDGET_NS = 200_000
MIN_BUDGET_NS = 10_000
GROW_START_NS = 10_000
YIELD_AFTER_NS = 20_000
#: share of one CPU that missed spins may burn per window
CAP = 0.10
WINDOW_NS = 1_000_000_000
#: adaptive: the share of waits spent on the way not preferred, the weight of
#: a new wait in the means, and the most one wait counts (a preemption's ms)
EXPLORE = 1 / 16
ALPHA = 1 / 32
CLAMP_NS = 1_000_000
#: how often the machine's runnable tasks are counted (a read of /proc/loadavg)
BUSY_CHECK_NS = 100_000_000
#: what a wait was (``Idle.kind``): blocked at once, spun first, or told (no choice)
BLOCKED, SPUN, FORCED = 0, 1, 2


def cpus() -> int:
    """CPUs this process may run on (not the machine's: a pinned process has one)."""
    return len(os.sched_getaffinity(0))


def runnable() -> int:
    """Tasks runnable on the machine now, this one included (``/proc/loadavg``)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):  # no procfs: assume a quiet machine
        return 1


class Idle:
    """One connection's idle strategy: the spin budget of each wait, adapted.

    ``idle`` is ``"block"`` (never spin), ``"spin"`` (a fixed
    ``SPIN_NS`` budget), ``"adaptive"`` (starts at ``SPIN_NS``, adapts) or
    a fixed budget in microseconds (0 is ``"block"``).  Raises
    ``ValueError`` for anything else, ``TypeError`` for a non-number.
    """

    __slots__ = (
        "adaptive",
        "budget",
        "busy",
        "busy_end",
        "count_cpus",
        "count_runnable",
        "cpus",
        "kind",
        "last",
        "means",
        "mode",
        "spent",
        "window_end",
    )

    def __init__(
        self,
        idle: IdleArg = DEFAULT,
        *,
        count_cpus: Callable[[], int] = cpus,
        count_runnable: Callable[[], int] = runnable,
    ) -> None:
        if isinstance(idle, bool) or not isinstance(idle, str | int | float):
            raise TypeError(
                f"idle must be 'block', 'spin', 'adaptive' or microseconds, not {idle!r}"
            )
        if isinstance(idle, str):
            if idle not in ("block", "spin", "adaptive"):
                raise ValueError(
                    f"idle must be 'block', 'spin', 'adaptive' or microseconds: {idle!r}"
                )
            budget = 0 if idle == "block" else SPIN_NS
            self.mode: str = idle
        else:
            if not 0 <= idle <= 1_000_000:
                raise ValueError(f"an idle budget is 0 to 1,000,000 microseconds, not {idle!r}")
            budget = int(idle * 1000)
            self.mode = f"{idle:g} us" if budget else "block"
        self.adaptive = idle == "adaptive"
        #: the spin budget (ns) of the next wait that spins; 0 blocks at once
        self.budget = budget
        self.count_cpus = count_cpus
        self.cpus = count_cpus()
        self.count_runnable = count_runnable
        #: more tasks runnable than CPUs at the last look (then no spin until the next)
        self.busy = False
        self.busy_end = 0
        #: the budget :meth:`begin` gave the last wait (what it chose)
        self.last = 0
        #: what the last wait was: BLOCKED or SPUN (learnt from), or FORCED (not)
        self.kind = FORCED
        #: adaptive: mean wait (ns) of the waits that blocked at once, and of those that spun
        self.means = [0.0, 0.0]
        self.spent = 0  # ns of missed spins in this window
        self.window_end = 0

    @property
    def spins(self) -> bool:
        """Whether this strategy may spin at all (False: skip the clock too)."""
        return self.mode != "block"

    def begin(self, now: int, draw: Callable[[], float] = random.random) -> int:
        """The spin budget (ns) of a wait starting at ``now`` (0: block at once).

        ``draw`` (uniform in [0, 1)) picks the waits an adaptive strategy
        spends on the way it does not prefer, to keep measuring it.
        """
        if now >= self.window_end:
            self.window_end = now + WINDOW_NS
            self.spent = 0
            self.cpus = self.count_cpus()
        if now >= self.busy_end:
            self.busy_end = now + BUSY_CHECK_NS
            self.busy = self.count_runnable() > self.cpus
        if self.cpus <= 1 or self.busy or self.spent >= CAP * WINDOW_NS:
            self.kind = FORCED
        elif not self.adaptive:
            self.kind = SPUN
        else:
            blocked, spun = self.means
            if not (blocked and spun):  # measure each way once first
                self.kind = BLOCKED if not blocked else SPUN
            else:
                self.kind = SPUN if spun < blocked else BLOCKED
                if draw() < EXPLORE:
                    self.kind = SPUN + BLOCKED - self.kind
        self.last = self.budget if self.kind == SPUN else 0
        return self.last

    def end(self, budget: int, waited: int) -> None:
        """Record a wait given ``budget`` (from :meth:`begin`), answered after ``waited`` ns."""
        if waited > budget:
            self.spent += budget
        if not self.adaptive or self.kind == FORCED:
            return
        mean = self.means[self.kind]
        sample = min(waited, CLAMP_NS)
        self.means[self.kind] = mean + (sample - mean) * ALPHA if mean else float(sample)
        if self.kind != SPUN or waited <= budget:  # caught by the spin: the budget stays
            return
        if waited <= MAX_BUDGET_NS:  # the spin just missed it: a longer one would have caught it
            self.budget = min(max(budget * 2, GROW_START_NS), MAX_BUDGET_NS)
        else:  # a long wait: spinning for it was wasted
            self.budget = budget // 2 if budget // 2 >= MIN_BUDGET_NS else 0


def recvmsg(
    sock: socket.socket, idle: Idle, bufsize: int, ancbufsize: int
) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]:
    """``sock.recvmsg``, polling without blocking for the strategy's budget first.

    It blocks as a plain ``recvmsg`` would after the budget (the socket's own
    blocking mode and timeout apply), so an error, the peer's end of file
    or a timeout surfaces exactly as without a spin.
    """
    if not idle.spins:
        return sock.recvmsg(bufsize, ancbufsize)
    clock = time.perf_counter_ns
    start = clock()
    budget = idle.begin(start)
    if budget:
        deadline = start + budget
        yield_at = start + YIELD_AFTER_NS
        flags = socket.MSG_DONTWAIT
        while True:
            try:
                got = sock.recvmsg(bufsize, ancbufsize, flags)
            except BlockingIOError:
                now = clock()
                if now >= deadline:
                    break
                if now >= yield_at:
                    os.sched_yield()
                continue
            idle.end(budget, clock() - start)
            return got
    got = sock.recvmsg(bufsize, ancbufsize)
    idle.end(budget, clock() - start)
    return got


def spin_loop(
    loop: asyncio.AbstractEventLoop, idle: Idle, poll: Callable[[], None], done: Callable[[], bool]
) -> tuple[int, int]:
    """Call ``poll`` (a non-blocking read) until ``done()``, inside the budget, in an asyncio loop.

    Spins only while the loop has nothing else to do: no callback ready, no
    timer due within the budget, and stops as soon as one is.  A loop that
    is not asyncio's own (whose ready queue it cannot see) is never spun
    in.  Returns ``(start, budget)`` for :func:`finish` once the reply is in.
    """
    if not idle.spins:
        return 0, 0
    clock = time.perf_counter_ns
    start = clock()
    ready = getattr(loop, "_ready", None)
    scheduled = getattr(loop, "_scheduled", None)
    if ready or ready is None or done():
        return 0, 0  # not a wait of ours to learn from
    budget = idle.begin(start)
    if budget and scheduled and scheduled[0].when() <= loop.time() + budget / 1e9:
        return 0, 0  # a timer is due: no spin past it
    if budget:
        deadline = start + budget
        yield_at = start + YIELD_AFTER_NS
        while True:
            poll()
            if done():
                break
            if ready:  # other work came: leave the loop to it, learn nothing
                return 0, 0
            now = clock()
            if now >= deadline:
                break
            if now >= yield_at:
                os.sched_yield()
    return start, budget


def finish(idle: Idle, spun: tuple[int, int]) -> None:
    """Record the wait :func:`spin_loop` began, now that its reply has come."""
    start, budget = spun
    if start:
        idle.end(budget, time.perf_counter_ns() - start)
