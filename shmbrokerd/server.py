"""The socket edge: accept, read, dispatch to the registry, reply with fds.

Strategy: asyncio is used only as a readiness loop (``add_reader`` on
non-blocking ``SOCK_SEQPACKET`` sockets), because asyncio streams have no
message boundaries and no ``SCM_RIGHTS``.  Every request is handled to the
end synchronously, so the registry never sees interleaved half-requests.  A
reply that the peer's socket cannot take now is queued; a peer whose queue
fills is dropped, so a client that never reads never delays anyone else.
Each wakeup reads one datagram from a peer, for the same reason and because
it is cheapest: clients wait for their replies, so a second read would
almost always fail, and a failed read costs an exception.  A peer with more
queued is readable again at the loop's next turn, after the others.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from shmbroker import wire
from shmbroker.errors import BrokerError, error_from_errno

from .backing import Store
from .metrics import RequestMetrics, busiest
from .protocol import decode, encode_done, encode_error, encode_grant, encode_ok, error_code
from .registry import (
    ArmTimer,
    CreatePlan,
    Effect,
    Grant,
    Peer,
    Publish,
    Registry,
    SealBacking,
    Unlink,
    WaitDone,
    Waiting,
)

__all__ = ["Server", "ServerLimits"]

log = logging.getLogger("shmbrokerd")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_FDS_IN = 253  # SCM_MAX_FD: whatever arrives fits, and is closed
_ANC_SPACE = socket.CMSG_SPACE(_MAX_FDS_IN * 4)
_BATCH = 32
_UCRED = struct.Struct("3i")
# plain ints: enum.Flag arithmetic on every datagram is measurable
_MSG_TRUNC = int(socket.MSG_TRUNC)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS
_clock = time.perf_counter


class Journal(Protocol):
    """The state file, as the server sees it (``state.StateFile``)."""

    #: records are waiting that must be on file before the next reply
    urgent: bool

    def before_reply(self) -> None: ...

    def catch_up(self) -> None: ...


@dataclass
class ServerLimits:
    max_clients: int
    max_clients_per_uid: int = 256
    max_waiting_opens: int = 64
    max_queued_replies: int = 256
    accept_backoff: float = 0.1


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    peer: Peer
    queue: deque[tuple[bytes, list[int]]] = field(default_factory=deque)
    writing: bool = False
    closed: bool = False
    requests: int = 0  # for the busiest-clients list of ``stats``


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
        self.limits = limits
        self._publish = publish
        self._hello_info = hello_info
        self._reload = reload
        self._is_operator = is_operator
        self._is_monitor = is_monitor
        self._journal = journal
        self._after_replies = after_replies
        self._memfd_created = memfd_created
        self._memfd_unlinked = memfd_unlinked
        self._stats_extra = stats_extra
        self.metrics = RequestMetrics()
        self._observe = self.metrics.observe  # per request: one lookup less
        self._received = 0.0  # when the request being handled was read
        self.conns: dict[int, Connection] = {}
        # one receive buffer, reused: a datagram is copied out at its own size
        self._rbuf = bytearray(wire.MAX_MESSAGE + 1)
        self._rview = memoryview(self._rbuf)
        self._per_uid: dict[int, int] = {}
        self._next_peer = 1
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wait_timers: dict[int, asyncio.TimerHandle] = {}
        self._events: list[tuple[Publish, float]] = []
        self._batching = False  # inside _readable: events wait for its end
        self._replied = False  # has the request being handled been answered?
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.started = time.time()
        self._flushed = asyncio.Event()
        # one per op of the contract: a missing _op_ method fails here, not as EIO
        self._handlers: dict[str, Callable[[Connection, Any], None]] = {
            spec.op: getattr(self, "_op_" + spec.op) for spec in wire.OPS
        }

    # -- lifecycle -------------------------------------------------------------

    def start(self, listener: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)

    def stop_accepting(self) -> None:
        """Close the listener (its file, if we bound it, is the caller's)."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def drain_and_close(self, deadline: float) -> None:
        """Flush queued replies until ``deadline`` (monotonic), then drop every peer."""
        while any(c.queue for c in self.conns.values()):
            self._flushed.clear()
            try:
                await asyncio.wait_for(self._flushed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        self.registry.shutdown(time.time())
        for conn in list(self.conns.values()):
            self._close(conn, None)
        self._run_effects_logged("shutdown")
        self._flush_events()
        for handle in [*self._wait_timers.values(), *self._ttl_timers.values()]:
            handle.cancel()

    # -- accept ----------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        assert self._loop is not None
        for _ in range(_BATCH):
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_backoff(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            self._admit(sock)

    def _accept_backoff(self, exc: OSError) -> None:
        """Out of fds or memory: stop accepting for a while instead of spinning."""
        assert self._listener is not None
        assert self._loop is not None
        log.warning(
            "accept failed (%s); pausing accepts for %.1f s",
            exc.strerror,
            self.limits.accept_backoff,
        )
        fd = self._listener.fileno()
        self._loop.remove_reader(fd)

        def resume() -> None:
            if self._listener is not None and self._loop is not None:
                self._loop.add_reader(self._listener.fileno(), self._accept)

        self._loop.call_later(self.limits.accept_backoff, resume)

    def _admit(self, sock: socket.socket) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        try:
            pid, uid, gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            groups = _peer_groups(sock)
        except OSError as exc:
            log.warning("dropped a peer before it spoke: %s", exc.strerror)
            sock.close()
            return
        if len(self.conns) >= self.limits.max_clients:
            self._turn_away(sock, pid, uid, "max_clients")
            return
        if self._per_uid.get(uid, 0) >= self.limits.max_clients_per_uid:
            self._turn_away(sock, pid, uid, "max_clients_per_uid")
            return
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        peer = Peer(
            id=self._next_peer,
            pid=pid,
            uid=uid,
            gid=gid,
            groups=groups,
            operator=self._is_operator(uid, gid, groups),
            connected=time.time(),
        )
        self._next_peer += 1
        conn = Connection(sock, peer)
        self.conns[peer.id] = conn
        self.registry.connect(peer)
        self._loop.add_reader(sock.fileno(), self._readable, conn)

    def _turn_away(self, sock: socket.socket, pid: int, uid: int, limit: str) -> None:
        """Answer EMFILE (id null) and close: the contract's "reply, then close"."""
        log.warning(
            "refused peer pid=%d uid=%d: %s reached",
            pid,
            uid,
            limit,
            extra={"PEER_PID": pid, "PEER_UID": uid, "ERRNO": "EMFILE"},
        )
        with contextlib.suppress(OSError):
            sock.send(encode_error(None, error_from_errno(errno.EMFILE, f"{limit} reached")))
            # Closing with the peer's first request unread would reset the
            # connection and lose our reply: shut down, drop what is queued.
            sock.shutdown(socket.SHUT_RDWR)
            for _ in range(_BATCH):
                data, anc, _flags, _ = sock.recvmsg(wire.MAX_MESSAGE + 1, _ANC_SPACE)
                _close_fds(anc)
                if not data and not anc:
                    break
        sock.close()

    # -- read ------------------------------------------------------------------

    def _readable(self, conn: Connection) -> None:
        try:
            size, anc, flags, _ = conn.sock.recvmsg_into([self._rbuf], _ANC_SPACE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(conn, f"receive failed: {exc.strerror}")
            return
        self._batching = True
        try:
            nfds = _close_fds(anc) if anc else 0
            if not size and not nfds and not flags & _MSG_TRUNC:
                self._close(conn, None)  # an empty datagram is the end of the connection
            else:
                self._handle(conn, self._rview[:size].tobytes(), nfds, bool(flags & _TRUNCATED))
        finally:
            self._batching = False
            self._replies_sent()

    def _replies_sent(self) -> None:
        """What may trail the replies: journal records no reply needs, then events."""
        if self._events:  # on file before anyone is told (a watcher may act on it)
            try:
                self._journal.catch_up()
            except OSError as exc:
                log.error(
                    "%d events dropped, their changes not on file: %s", len(self._events), exc
                )
                self.metrics.events_unsaved += len(self._events)
                self._events.clear()
            else:
                self._flush_events()
        else:
            self._after_replies()  # may trail a while (the daemon's JOURNAL_LAG)

    def _handle(self, conn: Connection, data: bytes, nfds: int, truncated: bool) -> None:
        self._received = received = _clock()
        conn.requests += 1
        rid, req = decode(data, nfds=nfds, truncated=truncated)
        if isinstance(req, BrokerError):
            self.requests["invalid"] += 1
            self._refuse(conn, rid, "invalid", req)
            self._observe("invalid", _clock() - received)
            return
        op = req.op
        self.requests[op] += 1
        self._replied = False
        try:
            self._handlers[op](conn, req)
        except Exception as exc:
            if self._replied:  # what a release does after its reply: never answer twice
                log.error("%s failed after its reply: %s", op, exc, exc_info=exc)
            elif isinstance(exc, BrokerError):
                self._refuse(conn, req.id, op, exc, getattr(req, "name", None))
            elif isinstance(exc, OSError):  # the system refused us (EMFILE, ENOMEM...)
                log.error("%s failed: %s", op, exc, extra={"OP": op, "ERRNO": error_code(exc)})
                self._refuse(conn, req.id, op, exc, getattr(req, "name", None))
            else:  # a bug: keep serving, say so loudly
                log.error("internal error in %s", op, exc_info=exc)
                self._refuse(conn, req.id, op, error_from_errno(errno.EIO, "internal error"))
        finally:
            if self._replied:
                self._observe(op, _clock() - received)
            else:  # a waiting open: nothing went out to run them
                self.run_effects()

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
        self._send(conn, encode_error(rid, exc), [], persist=False)

    # -- ops -------------------------------------------------------------------

    def _op_hello(self, conn: Connection, req: wire.Hello) -> None:
        if req.client is not None:  # what operators see in clients and stat
            conn.peer.name = req.client[: wire.MAX_CLIENT_NAME]
        self._send(conn, encode_ok(req.id, self._hello_info()), [])

    def _op_create(self, conn: Connection, req: wire.Create) -> None:
        now = time.time()
        decision = self.registry.check_create(conn.peer, req, now)
        if not isinstance(decision, CreatePlan):  # exist_ok: the segment there already
            self._send_grant(conn, req.id, decision)
            return
        self.store.create(decision.segment_id, req.size, decision.backing)
        grant = self.registry.commit_create(decision, now)
        if grant.segment.backing == "memfd":
            self._memfd_created(grant.segment.id)
        try:
            self._send_grant(conn, req.id, grant)
        except OSError:  # not on file, so refused: the segment goes too, its name is free
            self.registry.abandon(grant.segment)
            self._run_effects_logged("refused create")
            raise

    def _op_open(self, conn: Connection, req: wire.Open) -> None:
        assert self._loop is not None
        if req.wait and len(conn.peer.waiters) >= self.limits.max_waiting_opens:
            raise error_from_errno(
                errno.EAGAIN, f"{self.limits.max_waiting_opens} opens already waiting"
            )
        outcome = self.registry.open(conn.peer, req, time.time())
        if isinstance(outcome, Waiting):
            self._wait_timers[outcome.waiter] = self._loop.call_later(
                outcome.timeout, self._wait_expired, outcome.waiter
            )
            self.metrics.wait_started(outcome.waiter, self._received)
            return
        self._send_grant(conn, req.id, outcome)

    def _op_release(self, conn: Connection, req: wire.Release) -> None:
        registry = self.registry
        if registry.release_removes(conn.peer, req.lease):
            registry.release(conn.peer, req.lease, time.time())
            self._send(conn, encode_done(req.id), [])
            return
        # nothing the reply reports depends on it: answer first (see release_removes)
        self._send(conn, encode_done(req.id), [])
        if not conn.closed:  # else the disconnect has ended the lease already
            registry.release(conn.peer, req.lease, time.time())
            self.run_effects()

    def _op_seal(self, conn: Connection, req: wire.Seal) -> None:
        seg = self.registry.seal(conn.peer, req.name)
        self._send(conn, encode_ok(req.id, {"segment": seg.describe()}), [])

    def _op_delete(self, conn: Connection, req: wire.Delete) -> None:
        self.registry.delete(conn.peer, req.name)
        self._send(conn, encode_done(req.id), [])

    def _op_stat(self, conn: Connection, req: wire.Stat) -> None:
        if req.holders:  # an addition: who holds it
            self._require_operator(conn, "stat with holders")
        seg = self.registry.stat(conn.peer, req.name)
        result: dict[str, Any] = {"segment": seg.describe()}
        if req.holders:
            result["holders"], result["holders_more"] = self.registry.holders(req.name)
        self._send(conn, encode_ok(req.id, result), [])

    def _op_list(self, conn: Connection, req: wire.List) -> None:
        limit = req.limit
        while True:  # a page must fit one datagram: shrink it if it would not
            page, nxt = self.registry.list_page(conn.peer, req.prefix, req.after, limit)
            reply = encode_ok(req.id, {"segments": [s.describe() for s in page], "next": nxt})
            if len(reply) <= wire.MAX_MESSAGE or limit == 1:
                break
            limit //= 2
        self._send(conn, reply, [])

    def _op_reclaim(self, conn: Connection, req: wire.Reclaim) -> None:
        grant = self.registry.reclaim(conn.peer, req.lease, time.time())
        self._send_grant(conn, req.id, grant)

    def _require_operator(self, conn: Connection, op: str) -> None:
        if not conn.peer.operator:
            raise error_from_errno(errno.EACCES, f"{op} is for operators only")

    def _op_reload(self, conn: Connection, req: wire.Reload) -> None:
        self._require_operator(conn, "reload")
        try:
            restart = self._reload()
        except ValueError as exc:
            raise error_from_errno(errno.EINVAL, str(exc)) from None
        self._send(conn, encode_ok(req.id, {"restart": restart}), [])

    def _op_clients(self, conn: Connection, req: wire.Clients) -> None:
        self._require_operator(conn, "clients")
        page, nxt = self.registry.clients(req.after, req.limit)
        clients = [
            {
                "id": p.id,
                "pid": p.pid,
                "uid": p.uid,
                "gid": p.gid,
                "leases": len(p.leases),
                "connected": p.connected,
                "name": p.name,
            }
            for p in page
        ]
        self._send(conn, encode_ok(req.id, {"clients": clients, "next": nxt}), [])

    def _op_stats(self, conn: Connection, req: wire.Stats) -> None:
        peer = conn.peer
        if not peer.operator and not self._is_monitor(peer.uid, peer.gid, peer.groups):
            raise error_from_errno(errno.EACCES, "stats is for operators only")
        self._send(conn, encode_ok(req.id, self.stats()), [])

    def _op_drop(self, conn: Connection, req: wire.Drop) -> None:
        """An addition (operators only): close a client's connection, as if it had."""
        self._require_operator(conn, "drop")
        target = self.conns.get(req.client)
        if target is None:
            raise error_from_errno(errno.ENOENT, f"no such client: {req.client}")
        peer, by = target.peer, conn.peer
        log.warning(
            "client %d (pid=%d uid=%d) dropped by operator pid=%d uid=%d: %d leases end",
            peer.id,
            peer.pid,
            peer.uid,
            by.pid,
            by.uid,
            len(peer.leases),
            extra={"PEER_PID": peer.pid, "PEER_UID": peer.uid, "OP": "drop"},
        )
        self.registry.dropped(peer)
        self._send(conn, encode_ok(req.id, {"leases": len(peer.leases)}), [])
        self._close(target, None)  # after the reply: an operator may drop itself

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

    # -- grants, effects, timers -------------------------------------------------

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
            _close_all(fds)
            self.registry.release(conn.peer, grant.lease, time.time())
            raise
        self._send(conn, encode_grant(rid, grant), fds)

    def _persist(self) -> None:
        """What a reply reports must be true before it leaves: unlinks, seals, journal."""
        if self.registry.effects or self._journal.urgent:
            self.run_effects()

    def run_effects(self) -> None:
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
        self._journal.before_reply()
        if not self._batching:
            self._replies_sent()

    def _effect(self, eff: Effect) -> None:
        assert self._loop is not None
        if isinstance(eff, Publish):
            # published after this wakeup's reply has left (_replies_sent):
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
            timer = self._wait_timers.pop(eff.waiter, None)
            if timer is not None:
                timer.cancel()
            conn = self.conns.get(eff.peer)
            if conn is None:
                self.metrics.waited(eff.waiter, None)
                return
            replied = self._replied  # these answer another request than the one handled
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
                self._replied = replied
                self.metrics.waited(eff.waiter, _clock())

    def _flush_events(self) -> None:
        events, self._events = self._events, []
        for ev, ts in events:
            self._publish(ev, ts)

    def _ttl_expired(self, segment_id: str, generation: int) -> None:
        self._ttl_timers.pop(segment_id, None)
        self.registry.expire(segment_id, generation, time.time())
        self._run_effects_logged("ttl expiry")

    def _wait_expired(self, waiter: int) -> None:
        self._wait_timers.pop(waiter, None)
        self.registry.wait_timeout(waiter)
        self._run_effects_logged("wait timeout")

    def _run_effects_logged(self, what: str) -> None:
        """For what no request waits on: a failure (an unlink refused, a journal
        that cannot be written: its records stay, written first once it can be)
        is logged; every effect was tried."""
        try:
            self.run_effects()
        except OSError as exc:
            log.error("%s: %s", what, exc)

    # -- write -----------------------------------------------------------------

    def _send(
        self, conn: Connection, payload: bytes, fds: list[int], *, persist: bool = True
    ) -> None:
        """Send now if the socket takes it, else queue; fds are ours to close."""
        if conn.closed:
            _close_all(fds)
            return
        if persist:
            self._persist()
        self._replied = True
        if conn.queue:
            self._enqueue(conn, payload, fds)
            return
        try:
            _sendmsg(conn.sock, payload, fds)
        except BlockingIOError:
            self._enqueue(conn, payload, fds)
            return
        except OSError as exc:
            _close_all(fds)
            self._close(conn, f"send failed: {exc.strerror}")
            return
        _close_all(fds)

    def _enqueue(self, conn: Connection, payload: bytes, fds: list[int]) -> None:
        assert self._loop is not None
        if len(conn.queue) >= self.limits.max_queued_replies:
            _close_all(fds)
            self._close(conn, "reply queue full (peer does not read)")
            return
        conn.queue.append((payload, fds))
        if not conn.writing:
            conn.writing = True
            self._loop.add_writer(conn.sock.fileno(), self._writable, conn)

    def _writable(self, conn: Connection) -> None:
        assert self._loop is not None
        while conn.queue and not conn.closed:
            payload, fds = conn.queue[0]
            try:
                _sendmsg(conn.sock, payload, fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(conn, f"send failed: {exc.strerror}")
                return
            conn.queue.popleft()
            _close_all(fds)
        if conn.writing and not conn.closed:
            conn.writing = False
            self._loop.remove_writer(conn.sock.fileno())
        self._flushed.set()

    def _close(self, conn: Connection, reason: str | None) -> None:
        if conn.closed:
            return
        assert self._loop is not None
        conn.closed = True
        peer = conn.peer
        if reason:
            log.info(
                "dropped peer pid=%d uid=%d: %s",
                peer.pid,
                peer.uid,
                reason,
                extra={"PEER_PID": peer.pid, "PEER_UID": peer.uid},
            )
        fd = conn.sock.fileno()
        self._loop.remove_reader(fd)
        if conn.writing:
            self._loop.remove_writer(fd)
        for _payload, fds in conn.queue:
            _close_all(fds)
        conn.queue.clear()
        conn.sock.close()
        del self.conns[peer.id]
        left = self._per_uid[peer.uid] - 1
        if left:
            self._per_uid[peer.uid] = left
        else:
            del self._per_uid[peer.uid]
        for wid in peer.waiters:
            timer = self._wait_timers.pop(wid, None)
            if timer is not None:
                timer.cancel()
            self.metrics.waited(wid, None)
        self.registry.disconnect(peer.id, time.time())
        self._run_effects_logged("disconnect")


def _sendmsg(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    if fds:
        sock.sendmsg([payload], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(payload)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _close_fds(anc: list[tuple[int, int, bytes]]) -> int:
    """Close every fd a client sent; return how many there were."""
    count = 0
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            count += len(fds)
        else:
            count += 1  # any other ancillary data is refused the same way
    return count


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """Supplementary groups of the peer at connect time (``SO_PEERGROUPS``)."""
    size = 64 * 4
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 8
                continue
            raise
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % 4])
        return frozenset(groups)
    return frozenset()
