"""One handler per op: a request and its peer in, what to answer out; no sockets.

A handler returns its answer instead of sending it, so the server
(``server.Server``) alone sends, persists first, and knows whether a
request was answered:

- ``bytes``: an encoded reply;
- a :class:`~shmbrokerd.registry.Grant`: a lease, sent with its fd;
- :class:`~shmbrokerd.registry.Waiting`: an ``open`` with ``wait`` that waits;
- a :class:`Reply`: one of those with work to do after it has left
  (``then``: a release that removes nothing answers before its bookkeeping)
  or if it cannot be put on file (``undo``: a refused create frees its name).

A handler raises :class:`~shmbroker.errors.BrokerError` (or the
``OSError`` the system gave) to refuse.  Handlers are named ``op_<op>``;
``server.Server`` builds its table from ``wire.OPS`` by that name.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shmbroker import wire
from shmbroker.errors import error_from_errno

from .backing import Store
from .codec import encode_done, encode_ok
from .model import Peer
from .registry import CreatePlan, Grant, Registry, Waiting
from .transport import Connection, ServerLimits

__all__ = ["Outcome", "Reply", "Service"]

log = logging.getLogger("shmbrokerd")


@dataclass(slots=True)  # not frozen: a frozen init costs a setattr call per field
class Reply:
    answer: bytes | Grant
    then: Callable[[], None] | None = None
    undo: Callable[[], None] | None = None


Outcome = bytes | Grant | Waiting | Reply


class Service:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        limits: ServerLimits,
        conns: dict[int, Connection],
        *,
        close: Callable[[Connection, str | None], None],
        run_effects: Callable[[], None],
        run_logged: Callable[[str], None],
        hello_info: Callable[[], dict[str, Any]],
        reload: Callable[[], list[str]],
        is_monitor: Callable[[int, int, frozenset[int]], bool],
        stats: Callable[[], dict[str, Any]],
        memfd_created: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self.store = store
        self.limits = limits
        self._conns = conns
        self._close = close
        self._run_effects = run_effects
        self._run_logged = run_logged
        self._hello_info = hello_info
        self._reload = reload
        self._is_monitor = is_monitor
        self._stats = stats
        self._memfd_created = memfd_created

    def op_hello(self, peer: Peer, req: wire.Hello) -> Outcome:
        if req.client is not None:  # what operators see in clients and stat
            peer.name = req.client[: wire.MAX_CLIENT_NAME]
        return encode_ok(req.id, self._hello_info())

    def op_create(self, peer: Peer, req: wire.Create) -> Outcome:
        now = time.time()
        decision = self.registry.check_create(peer, req, now)
        if not isinstance(decision, CreatePlan):  # exist_ok: the segment there already
            return decision
        self.store.create(decision.segment_id, req.size, decision.backing)
        grant = self.registry.commit_create(decision, now)
        if grant.segment.backing == "memfd":
            self._memfd_created(grant.segment.id)

        def undo() -> None:  # not on file, so refused: the segment goes too, its name is free
            self.registry.abandon(grant.segment)
            self._run_logged("refused create")

        return Reply(grant, undo=undo)

    def op_open(self, peer: Peer, req: wire.Open) -> Outcome:
        if req.wait and len(peer.waiters) >= self.limits.max_waiting_opens:
            raise error_from_errno(
                errno.EAGAIN, f"{self.limits.max_waiting_opens} opens already waiting"
            )
        return self.registry.open(peer, req, time.time())

    def op_release(self, peer: Peer, req: wire.Release) -> Outcome:
        registry = self.registry
        if registry.release_removes(peer, req.lease):
            registry.release(peer, req.lease, time.time())
            return encode_done(req.id)
        # nothing the reply reports depends on it: answer first (see release_removes)
        return Reply(encode_done(req.id), then=functools.partial(self._release_after, peer, req))

    def _release_after(self, peer: Peer, req: wire.Release) -> None:
        if peer.id in self._conns:  # else the disconnect has ended the lease already
            self.registry.release(peer, req.lease, time.time())
            self._run_effects()

    def op_seal(self, peer: Peer, req: wire.Seal) -> Outcome:
        seg = self.registry.seal(peer, req.name)
        return encode_ok(req.id, {"segment": seg.describe()})

    def op_delete(self, peer: Peer, req: wire.Delete) -> Outcome:
        self.registry.delete(peer, req.name)
        return encode_done(req.id)

    def op_stat(self, peer: Peer, req: wire.Stat) -> Outcome:
        if req.holders:  # an addition: who holds it
            _require_operator(peer, "stat with holders")
        seg = self.registry.stat(peer, req.name)
        result: dict[str, Any] = {"segment": seg.describe()}
        if req.holders:
            result["holders"], result["holders_more"] = self.registry.holders(req.name)
        return encode_ok(req.id, result)

    def op_list(self, peer: Peer, req: wire.List) -> Outcome:
        limit = req.limit
        while True:  # a page must fit one datagram: shrink it if it would not
            page, nxt = self.registry.list_page(peer, req.prefix, req.after, limit)
            reply = encode_ok(req.id, {"segments": [s.describe() for s in page], "next": nxt})
            if len(reply) <= wire.MAX_MESSAGE or limit == 1:
                return reply
            limit //= 2

    def op_reclaim(self, peer: Peer, req: wire.Reclaim) -> Outcome:
        return self.registry.reclaim(peer, req.lease, time.time())

    def op_reload(self, peer: Peer, req: wire.Reload) -> Outcome:
        _require_operator(peer, "reload")
        try:
            restart = self._reload()
        except ValueError as exc:
            raise error_from_errno(errno.EINVAL, str(exc)) from None
        return encode_ok(req.id, {"restart": restart})

    def op_clients(self, peer: Peer, req: wire.Clients) -> Outcome:
        _require_operator(peer, "clients")
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
        return encode_ok(req.id, {"clients": clients, "next": nxt})

    def op_stats(self, peer: Peer, req: wire.Stats) -> Outcome:
        if not peer.operator and not self._is_monitor(peer.uid, peer.gid, peer.groups):
            raise error_from_errno(errno.EACCES, "stats is for operators only")
        return encode_ok(req.id, self._stats())

    def op_drop(self, peer: Peer, req: wire.Drop) -> Outcome:
        """An addition (operators only): close a client's connection, as if it had."""
        _require_operator(peer, "drop")
        target = self._conns.get(req.client)
        if target is None:
            raise error_from_errno(errno.ENOENT, f"no such client: {req.client}")
        them = target.peer
        log.warning(
            "client %d (pid=%d uid=%d) dropped by operator pid=%d uid=%d: %d leases end",
            them.id,
            them.pid,
            them.uid,
            peer.pid,
            peer.uid,
            len(them.leases),
            extra={"PEER_PID": them.pid, "PEER_UID": them.uid, "OP": "drop"},
        )
        self.registry.dropped(them)
        # closed after the reply: an operator may drop itself
        reply = encode_ok(req.id, {"leases": len(them.leases)})
        return Reply(reply, then=functools.partial(self._close, target, None))


def _require_operator(peer: Peer, op: str) -> None:
    if not peer.operator:
        raise error_from_errno(errno.EACCES, f"{op} is for operators only")
