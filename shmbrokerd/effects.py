"""The effect runner: what the registry queued, carried out in order.

The registry decides and queues (unlink, seal, arm a ttl timer, answer a
waiter, publish); this runs the queue, keeps the timers, and orders the
journal against the replies: everything a reply reports is on file before
it leaves (:meth:`EffectRunner.persist`), and records no reply needs, then
events, trail the wakeup's replies (:meth:`EffectRunner.settle`).  Each
entry point from the loop (a read, a timer, a disconnect) settles once at
its end, so nothing here needs to know whether a request is being handled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from .backing import Store
from .metrics import RequestMetrics
from .registry import ArmTimer, Effect, Publish, Registry, SealBacking, Unlink, WaitDone

__all__ = ["EffectRunner", "Journal"]

log = logging.getLogger("shmbrokerd")


class Journal(Protocol):
    """The state file, as the runner sees it (``state.StateFile``)."""

    #: records are waiting that must be on file before the next reply
    urgent: bool

    def before_reply(self) -> None: ...

    def catch_up(self) -> None: ...


class EffectRunner:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        journal: Journal,
        metrics: RequestMetrics,
        *,
        publish: Callable[[Publish, float], None],
        answer_waiter: Callable[[WaitDone], None],
        after_replies: Callable[[], None],
        memfd_unlinked: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self.store = store
        self.journal = journal
        self.metrics = metrics
        self._publish = publish
        self._answer_waiter = answer_waiter
        self._after_replies = after_replies
        self._memfd_unlinked = memfd_unlinked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[tuple[Publish, float]] = []
        self._wait_timers: dict[int, asyncio.TimerHandle] = {}
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    # -- the queue ---------------------------------------------------------------

    def persist(self) -> None:
        """What a reply reports must be true before it leaves: unlinks, seals, journal."""
        if self.registry.effects or self.journal.urgent:
            self.run()

    def run(self) -> None:
        """Carry out what the registry queued, then persist its journal."""
        registry = self.registry
        failed: Exception | None = None
        while registry.effects:
            for eff in registry.drain():
                try:
                    self._effect(eff)
                except Exception as exc:  # the others are carried out all the same
                    failed = failed or exc
        if failed is not None:
            raise failed
        self.journal.before_reply()

    def run_logged(self, what: str) -> None:
        """For what no request waits on: a failure (an unlink refused, a journal
        that cannot be written: its records stay, written first once it can be)
        is logged; every effect was tried."""
        try:
            self.run()
        except OSError as exc:
            log.error("%s: %s", what, exc)

    def settle(self) -> None:
        """What may trail the replies: journal records no reply needs, then events."""
        if self._events:  # on file before anyone is told (a watcher may act on it)
            try:
                self.journal.catch_up()
            except OSError as exc:
                log.error(
                    "%d events dropped, their changes not on file: %s", len(self._events), exc
                )
                self.metrics.events_unsaved += len(self._events)
                self._events.clear()
            else:
                self.flush_events()
        else:
            self._after_replies()  # may trail a while (the daemon's JOURNAL_LAG)

    def flush_events(self) -> None:
        events, self._events = self._events, []
        for ev, ts in events:
            self._publish(ev, ts)

    def _effect(self, eff: Effect) -> None:
        assert self._loop is not None
        if isinstance(eff, Publish):
            # published once this wakeup's replies have left (settle):
            # events are best effort, replies are what clients wait for
            self._events.append((eff, time.time()))
        elif isinstance(eff, Unlink):
            self.store.unlink(eff.segment.id, eff.segment.backing)
            self._ttl_timers.pop(eff.segment.id, None)
            if eff.segment.backing == "memfd":
                self._memfd_unlinked(eff.segment.id)
        elif isinstance(eff, ArmTimer):
            old = self._ttl_timers.pop(eff.segment_id, None)
            if old is not None:
                old.cancel()
            self._ttl_timers[eff.segment_id] = self._loop.call_later(
                eff.delay, self._ttl_expired, eff.segment_id, eff.generation
            )
        elif isinstance(eff, SealBacking):
            self.store.seal(eff.segment.id)
        elif isinstance(eff, WaitDone):
            self.cancel_wait(eff.waiter)
            self._answer_waiter(eff)

    # -- timers ------------------------------------------------------------------

    def arm_wait(self, waiter: int, timeout: float) -> None:
        assert self._loop is not None
        self._wait_timers[waiter] = self._loop.call_later(timeout, self._wait_expired, waiter)

    def cancel_wait(self, waiter: int) -> None:
        timer = self._wait_timers.pop(waiter, None)
        if timer is not None:
            timer.cancel()

    def _ttl_expired(self, segment_id: str, generation: int) -> None:
        self._ttl_timers.pop(segment_id, None)
        self.registry.expire(segment_id, generation, time.time())
        self.run_logged("ttl expiry")
        self.settle()

    def _wait_expired(self, waiter: int) -> None:
        self._wait_timers.pop(waiter, None)
        self.registry.wait_timeout(waiter)
        self.run_logged("wait timeout")
        self.settle()

    def cancel_timers(self) -> None:
        for handle in [*self._wait_timers.values(), *self._ttl_timers.values()]:
            handle.cancel()
