"""The server: a request read by the transport, answered by the service.

Three parts, each with one job: :mod:`.transport` (sockets: accept, read,
send queue, close), :mod:`.service` (one handler per op, no sockets: it
returns its answer) and :mod:`.effects` (what the registry queued, timers,
the journal's order against replies).  This module joins them: it decodes a
datagram, calls the op's handler, and sends what it returned, persisting
first.  Every request is handled to the end synchronously, so the registry
never sees interleaved half-requests.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from shmbroker import wire
from shmbroker.errors import BrokerError, error_from_errno

from .backing import Store
from .codec import decode, encode_error, encode_grant, error_code
from .effects import EffectRunner, Journal
from .metrics import RequestMetrics, busiest
from .registry import Grant, Publish, Registry, WaitDone, Waiting
from .service import Outcome, Reply, Service
from .transport import Connection, ServerLimits, Transport, close_all

__all__ = ["Journal", "Server", "ServerLimits"]

log = logging.getLogger("shmbrokerd")

_clock = time.perf_counter


class Server:
    """Serves the wire protocol on one listening socket."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        limits: ServerLimits,
        *,
        publish: Callable[[Publish, float], None],
        hello_info: Callable[[], dict[str, Any]],
        reload: Callable[[], list[str]],
        is_operator: Callable[[int, int, frozenset[int]], bool],
        is_monitor: Callable[[int, int, frozenset[int]], bool] = lambda uid, gid, groups: False,
        journal: Journal,
        after_replies: Callable[[], None] = lambda: None,
        memfd_created: Callable[[str], None] = lambda segment_id: None,
        memfd_unlinked: Callable[[str], None] = lambda segment_id: None,
        stats_extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.registry = registry
        self.store = store
        self._stats_extra = stats_extra
        self.metrics = RequestMetrics()
        self._observe = self.metrics.observe  # per request: one lookup less
        self.effects = EffectRunner(
            registry,
            store,
            journal,
            self.metrics,
            publish=publish,
            answer_waiter=self._answer_waiter,
            after_replies=after_replies,
            memfd_unlinked=memfd_unlinked,
        )
        self._persist = self.effects.persist
        self.read_done: Callable[[], None] = self.effects.settle
        self.transport = Transport(limits, self, is_operator=is_operator)
        self.conns = self.transport.conns
        self._send_now = self.transport.send
        self.service = Service(
            registry,
            store,
            limits,
            self.conns,
            close=self.transport.close,
            run_effects=self.effects.run,
            run_logged=self.effects.run_logged,
            hello_info=hello_info,
            reload=reload,
            is_monitor=is_monitor,
            stats=self.stats,
            memfd_created=memfd_created,
        )
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.started = time.time()
        # one per op of the contract: a missing op_ method fails here, not as EIO
        self._handlers: dict[str, Callable[[Any, Any], Outcome]] = {
            spec.op: getattr(self.service, "op_" + spec.op) for spec in wire.OPS
        }

    @property
    def limits(self) -> ServerLimits:
        return self.transport.limits

    @limits.setter
    def limits(self, limits: ServerLimits) -> None:  # a reload
        self.transport.limits = self.service.limits = limits

    # -- lifecycle -------------------------------------------------------------

    def start(self, listener: socket.socket) -> None:
        self.effects.start()
        self.transport.start(listener)

    def stop_accepting(self) -> None:
        """Close the listener (its file, if we bound it, is the caller's)."""
        self.transport.stop_accepting()

    async def drain_and_close(self, deadline: float) -> None:
        """Flush queued replies until ``deadline`` (monotonic), then drop every peer."""
        await self.transport.flush(deadline)
        self.registry.shutdown(time.time())
        for conn in list(self.conns.values()):
            self.transport.close(conn, None)
        self.effects.run_logged("shutdown")
        self.effects.settle()
        self.effects.flush_events()
        self.effects.cancel_timers()

    def run_effects(self) -> None:
        """Carry out what the registry queued (outside a request: a reload)."""
        self.effects.run()
        self.effects.settle()

    # -- the transport's handler -------------------------------------------------

    def admitted(self, conn: Connection) -> None:
        self.registry.connect(conn.peer)

    def closed(self, conn: Connection) -> None:
        peer = conn.peer
        for wid in peer.waiters:
            self.effects.cancel_wait(wid)
            self.metrics.waited(wid, None)
        self.registry.disconnect(peer.id, time.time())
        self.effects.run_logged("disconnect")
        self.effects.settle()

    def received(self, conn: Connection, data: bytes, nfds: int, truncated: bool) -> None:
        received = _clock()
        conn.requests += 1
        rid, req = decode(data, nfds=nfds, truncated=truncated)
        if isinstance(req, BrokerError):
            self.requests["invalid"] += 1
            self._refuse(conn, rid, "invalid", req)
            self._observe("invalid", _clock() - received)
            return
        op = req.op
        self.requests[op] += 1
        then = undo = None
        try:
            out = self._handlers[op](conn.peer, req)
            if type(out) is Reply:
                then, undo, out = out.then, out.undo, out.answer
            if type(out) is bytes:
                self._send(conn, out, [])
            elif type(out) is Waiting:
                self.effects.arm_wait(out.waiter, out.timeout)
                self.metrics.wait_started(out.waiter, received)
            else:
                assert isinstance(out, Grant)
                self._send_grant(conn, req.id, out)
        except Exception as exc:
            if undo is not None and isinstance(exc, OSError):
                try:
                    undo()
                except Exception as again:  # refused with what went wrong last
                    exc = again
            self._failed(conn, req, exc)
            self._observe(op, _clock() - received)
            return
        if type(out) is Waiting:  # answered later: nothing went out to run them
            self.effects.run()
            return
        if then is not None:
            try:
                then()
            except Exception as exc:  # after its reply: never answer twice
                log.error("%s failed after its reply: %s", op, exc, exc_info=exc)
        self._observe(op, _clock() - received)

    def _failed(self, conn: Connection, req: wire.Request, exc: Exception) -> None:
        op = req.op
        if isinstance(exc, BrokerError):
            self._refuse(conn, req.id, op, exc, getattr(req, "name", None))
        elif isinstance(exc, OSError):  # the system refused us (EMFILE, ENOMEM...)
            log.error("%s failed: %s", op, exc, extra={"OP": op, "ERRNO": error_code(exc)})
            self._refuse(conn, req.id, op, exc, getattr(req, "name", None))
        else:  # a bug: keep serving, say so loudly
            log.error("internal error in %s", op, exc_info=exc)
            self._refuse(conn, req.id, op, error_from_errno(errno.EIO, "internal error"))

    def _refuse(
        self, conn: Connection, rid: int | None, op: str, exc: OSError, name: str | None = None
    ) -> None:
        self.errors[op] += 1
        code = error_code(exc)
        self.metrics.refused(op, code)
        if code in ("EACCES", "EPERM", "EDQUOT"):
            peer = conn.peer
            log.info(
                "denied %s %s to pid=%d uid=%d: %s",
                op,
                name or "",
                peer.pid,
                peer.uid,
                exc.strerror,
                extra={
                    "OP": op,
                    "SEGMENT": name or "",
                    "PEER_PID": peer.pid,
                    "PEER_UID": peer.uid,
                    "ERRNO": code,
                },
            )
        # a refusal reports no change: sent even when the journal cannot be written
        self._send_now(conn, encode_error(rid, exc), [])

    def stats(self) -> dict[str, Any]:
        reg = self.registry
        return {
            "uptime": time.time() - self.started,
            "segments": len(reg.segments),
            "bytes": reg.total_bytes,
            "leases": len(reg.leases),
            "clients": len(self.conns),
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "started": self.started,
            "errors_by_errno": self.metrics.errors_by_errno(),
            "latency": self.metrics.latency(),
            "waiting_opens": sum(len(c.peer.waiters) for c in self.conns.values()),
            "busiest_clients": busiest(self.conns.values()),
            **self._stats_extra(),
        }

    # -- sending -----------------------------------------------------------------

    def _send(self, conn: Connection, payload: bytes, fds: list[int]) -> None:
        """What the reply reports goes on file first; fds are ours to close."""
        if conn.closed:
            close_all(fds)
            return
        self._persist()
        self._send_now(conn, payload, fds)

    def _send_grant(self, conn: Connection, rid: int, grant: Grant) -> None:
        fds: list[int] = []
        if grant.fd:
            seg = grant.segment
            try:
                fds.append(self.store.open_fd(seg.id, seg.backing, grant.access))
            except OSError:
                self.registry.release(conn.peer, grant.lease, time.time())
                raise
        try:
            self._persist()
        except OSError:  # the grant could not be put on file: refuse it
            close_all(fds)
            self.registry.release(conn.peer, grant.lease, time.time())
            raise
        self._send_now(conn, encode_grant(rid, grant), fds)  # persisted just above

    def _answer_waiter(self, eff: WaitDone) -> None:
        """A waiting open's answer: the reply to an earlier request, maybe another peer's."""
        conn = self.conns.get(eff.peer)
        if conn is None:
            self.metrics.waited(eff.waiter, None)
            return
        try:
            if eff.grant is not None:
                try:
                    self._send_grant(conn, eff.request_id, eff.grant)
                except OSError as exc:
                    self._refuse(conn, eff.request_id, "open", exc)
            else:
                assert eff.error is not None
                self._refuse(conn, eff.request_id, "open", eff.error)
        finally:
            self.metrics.waited(eff.waiter, _clock())
