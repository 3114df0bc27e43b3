"""The registry of segments, leases, peers and waiters: every transition.

Strategy (as h11 keeps its state machine in one module): this file holds
every transition of ``PROTOCOL.md``'s "Segments, leases and lifetimes",
so a reader can check them against the contract in one sitting; what they
consult lives next door, each in one place: the lifetimes as a table
(``lifetimes.py``), the mode, policy, limit and quota checks
(``access.py``), the journal records (``records.py``).  It does no I/O and
reads no clock: callers pass ``now`` and drive
ttl and wait timers from outside, and every side effect the daemon must
perform (unlink a backing object, publish an event, arm a timer, answer a
waiting ``open``) is queued as an effect object for the edge to execute,
drained with :meth:`Registry.drain`.  The edge may say, through
``wants_event``, which names anyone subscribes to: an event nobody would
receive is not even built.

Creating a segment is two-phase because reserving memory can fail
(``ENOSPC``) after every rule has passed: :meth:`Registry.check_create`
decides, the edge creates the backing object, :meth:`Registry.commit_create`
records it.  Nothing happens in between (the server is single-threaded).

The rules, in brief:

* a lease belongs to the connection that got it; only it may release it;
  a disconnect releases all of them; a daemon stop keeps every one on a live
  segment, to be reclaimed after the restart; a lease outlives its segment's
  deletion;
* ``persistent``: unlinked only by ``delete``;
* ``owner``: unlinked when the creating lease ends;
* ``refcount``: unlinked when the last lease ends;
* ``ttl``: unlinked ``ttl`` seconds after the last lease ends; a new lease
  cancels the countdown (a timer carries a generation number, and a stale
  generation is ignored);
* deletion removes the name at once (it may be created again); leases stay;
* ``seal`` makes every later ``rw`` open ``EPERM``.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from shmbroker.errors import BrokerError, error_from_errno
from shmbroker.wire import MAX_HOLDERS, Create, Open

from . import records
from .access import RegistryLimits, allowed, check_quota, check_room, may, require
from .lifetimes import Fate, fate
from .model import Access, Lease, Peer, SegmentRecord
from .policy import Policy
from .records import Record

__all__ = [
    "ArmTimer",
    "Effect",
    "Grant",
    "Lease",
    "Peer",
    "Publish",
    "Registry",
    "RegistryLimits",
    "SealBacking",
    "SegmentRecord",
    "Unlink",
    "WaitDone",
    "Waiting",
]

EventName = Literal["created", "opened", "released", "sealed", "deleted", "expired", "dropped"]


def _refuse(num: int, message: str) -> BrokerError:
    return error_from_errno(num, message)


def _not_held() -> BrokerError:
    return _refuse(errno.ENOENT, "no such lease on this connection")


def _holder_order(item: tuple[tuple[int | None, int, str], int]) -> tuple[int, int, int, str]:
    (client, uid, access), _n = item
    return (client is None, client or 0, uid, access)


@dataclass(slots=True)
class Grant:
    """A lease granted by create/open/reclaim; ``fd`` says whether to send one."""

    segment: SegmentRecord
    lease: str
    access: Access
    fd: bool

    def result(self) -> dict[str, object]:
        return {"segment": self.segment.describe(), "lease": self.lease}


@dataclass(slots=True)
class Waiting:
    """``open`` with ``wait`` on an absent name: arm a timer for ``waiter``."""

    waiter: int
    timeout: float


# -- effects ---------------------------------------------------------------


@dataclass(slots=True)
class Unlink:
    """Remove the backing object (its mappings stay valid)."""

    segment: SegmentRecord


@dataclass(slots=True)
class SealBacking:
    """Apply the kernel seals to a memfd."""

    segment: SegmentRecord


@dataclass(slots=True)
class Publish:
    event: EventName
    name: str
    size: int
    uid: int | None
    pid: int | None


@dataclass(slots=True)
class ArmTimer:
    """Call :meth:`Registry.expire` with these arguments after ``delay`` s."""

    segment_id: str
    generation: int
    delay: float


@dataclass(slots=True)
class WaitDone:
    """Answer a waiting ``open``: ``grant`` on success, else ``error``."""

    peer: int
    waiter: int
    request_id: int
    grant: Grant | None
    error: BrokerError | None


Effect = Unlink | SealBacking | Publish | ArmTimer | WaitDone


@dataclass(slots=True)
class _Waiter:
    id: int
    peer: Peer
    request: Open


@dataclass(slots=True)
class CreatePlan:
    """What :meth:`Registry.check_create` decided the edge must make."""

    segment_id: str
    peer: Peer
    request: Create
    backing: str


#: names a ``list`` request looks at, at most (see :meth:`Registry.list_page`)
LIST_SCAN = 4096


class Registry:
    def __init__(
        self,
        limits: RegistryLimits,
        *,
        new_token: Callable[[], str],
        new_segment_id: Callable[[], str],
        journal: Callable[[Record], None] = lambda rec: None,
        policy: Policy | None = None,
        wants_event: Callable[[str], bool] = lambda name: True,
    ) -> None:
        self.limits = limits
        self.policy = policy or Policy()
        #: uid -> [bytes, segments] of the live segments it created (quotas)
        self.usage: dict[int, list[int]] = {}
        self._journal = journal
        #: may be replaced once the edge knows its subscribers (the daemon does)
        self.wants_event = wants_event
        self._new_token = new_token
        self._new_segment_id = new_segment_id
        self.segments: dict[str, SegmentRecord] = {}  # live ones, by name
        self._names: list[str] = []  # sorted names of live segments
        self.by_id: dict[str, SegmentRecord] = {}  # every segment a lease or timer may name
        self.leases: dict[str, Lease] = {}
        self.peers: dict[int, Peer] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._waiting_names: dict[str, list[int]] = {}
        self._next_waiter = 1
        self.total_bytes = 0
        self.reclaim_until = 0.0
        #: lifetime counters for ``stats``: ttl countdowns that ran out, leases
        #: reclaimed after a restart, leases whose reclaim window ended first
        self.expired = 0
        self.reclaimed = 0
        self.lapsed = 0
        #: what the edge must carry out, in order (handed over by :meth:`drain`)
        self.effects: list[Effect] = []

    # -- plumbing ------------------------------------------------------------

    def drain(self) -> list[Effect]:
        """Hand over the effects queued since the last call."""
        effects, self.effects = self.effects, []
        return effects

    def _publish(self, event: EventName, seg: SegmentRecord, peer: Peer | None) -> None:
        if not self.wants_event(seg.name):  # nobody subscribed to it: skip the work
            return
        self.effects.append(
            Publish(
                event,
                seg.name,
                seg.size,
                peer.uid if peer else None,
                peer.pid if peer else None,
            )
        )

    def _live(self, name: str) -> SegmentRecord:
        seg = self.segments.get(name)
        if seg is None:
            raise _refuse(errno.ENOENT, f"no such segment: {name}")
        return seg

    #: the mode bits (``access.may``); an attribute, so a test may count the checks
    may = staticmethod(may)

    # -- peers -----------------------------------------------------------------

    def connect(self, peer: Peer) -> None:
        self.peers[peer.id] = peer

    def disconnect(self, peer_id: int, now: float) -> None:
        """A connection closed: drop its waiters and release all its leases."""
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        for wid in list(peer.waiters):
            self._drop_waiter(wid)
        for token in list(peer.leases):
            self._end_lease(token, peer, now)

    # -- create ----------------------------------------------------------------

    def check_create(self, peer: Peer, req: Create, now: float) -> CreatePlan | Grant:
        """Decide a ``create``: a plan to make the backing, or (``exist_ok``) a grant."""
        existing = self.segments.get(req.name)
        if existing is not None:
            if not req.exist_ok:
                raise _refuse(errno.EEXIST, f"segment exists: {req.name}")
            if existing.size != req.size:
                raise _refuse(
                    errno.EEXIST,
                    f"segment exists: {req.name} is {existing.size} bytes, not {req.size}",
                )
            return self._grant(peer, existing, "rw", fd=True, now=now, op="create")
        allowed(self.policy, peer, "create", req.name)
        backing = req.backing or self.limits.default_backing
        check_room(self.limits, req, backing, len(self.segments), self.total_bytes)
        check_quota(self.policy, self.usage, peer, req.size)
        return CreatePlan(self._new_segment_id(), peer, req, backing)

    def commit_create(self, plan: CreatePlan, now: float) -> Grant:
        """Record a segment whose backing object the edge has made."""
        req, peer = plan.request, plan.peer
        seg = SegmentRecord(
            id=plan.segment_id,
            name=req.name,
            size=req.size,
            lifetime=req.lifetime,
            ttl=req.ttl,
            backing=plan.backing,
            mode=req.mode,
            created=now,
            owner_uid=peer.uid,
            owner_gid=peer.gid,
        )
        self._insert(seg)
        self._journal(records.segment(seg))
        self._publish("created", seg, peer)
        token = self._add_lease(peer, seg, "rw", creator=True)
        seg.creator_lease = token
        self._wake_waiters(seg, now)
        return Grant(seg, token, "rw", fd=True)

    def _insert(self, seg: SegmentRecord, *, sort: bool = True) -> None:
        self.segments[seg.name] = seg
        self.by_id[seg.id] = seg
        if sort:
            bisect.insort(self._names, seg.name)
        else:  # restoring many: sorted once, by open_reclaim_window
            self._names.append(seg.name)
        self.total_bytes += seg.size
        used = self.usage.setdefault(seg.owner_uid, [0, 0])
        used[0] += seg.size
        used[1] += 1

    # -- open / wait -------------------------------------------------------------

    def open(self, peer: Peer, req: Open, now: float) -> Grant | Waiting:
        if req.wait is not None and req.wait > self.limits.max_wait:
            raise _refuse(errno.EINVAL, f"wait: over max_wait {self.limits.max_wait}")
        seg = self.segments.get(req.name)
        if seg is not None:
            return self._grant(peer, seg, req.access, fd=req.fd, now=now, op="open")
        if req.wait is None:
            raise _refuse(errno.ENOENT, f"no such segment: {req.name}")
        if req.wait == 0:
            raise _refuse(errno.ETIMEDOUT, f"no such segment: {req.name}")
        wid = self._next_waiter
        self._next_waiter += 1
        self._waiters[wid] = _Waiter(wid, peer, req)
        self._waiting_names.setdefault(req.name, []).append(wid)
        peer.waiters.add(wid)
        return Waiting(wid, req.wait)

    def wait_timeout(self, waiter: int) -> None:
        """The edge's timer for a waiting ``open`` ran out."""
        w = self._waiters.get(waiter)
        if w is None:
            return
        self._drop_waiter(waiter)
        err = _refuse(errno.ETIMEDOUT, f"no segment {w.request.name} within {w.request.wait} s")
        self.effects.append(WaitDone(w.peer.id, waiter, w.request.id, None, err))

    def waiting(self, peer_id: int) -> int:
        peer = self.peers.get(peer_id)
        return len(peer.waiters) if peer else 0

    def _drop_waiter(self, wid: int) -> None:
        w = self._waiters.pop(wid)
        w.peer.waiters.discard(wid)
        ids = self._waiting_names[w.request.name]
        ids.remove(wid)
        if not ids:
            del self._waiting_names[w.request.name]

    def _wake_waiters(self, seg: SegmentRecord, now: float) -> None:
        for wid in self._waiting_names.pop(seg.name, []):
            w = self._waiters.pop(wid)
            w.peer.waiters.discard(wid)
            try:
                grant = self._grant(
                    w.peer, seg, w.request.access, fd=w.request.fd, now=now, op="open"
                )
            except BrokerError as exc:
                self.effects.append(WaitDone(w.peer.id, wid, w.request.id, None, exc))
            else:
                self.effects.append(WaitDone(w.peer.id, wid, w.request.id, grant, None))

    # -- leases ----------------------------------------------------------------

    def _grant(
        self, peer: Peer, seg: SegmentRecord, access: Access, *, fd: bool, now: float, op: str
    ) -> Grant:
        if not peer.operator:  # operators pass both checks (the common open skips them)
            require(peer, seg, "w" if access == "rw" else "r", op)
            allowed(self.policy, peer, "open_rw" if access == "rw" else "open_ro", seg.name)
        if access == "rw" and seg.sealed:
            raise _refuse(errno.EPERM, f"{seg.name} is sealed: read-only opens only")
        token = self._add_lease(peer, seg, access)
        if self.wants_event(seg.name):  # _publish, inlined: every open comes here
            self.effects.append(Publish("opened", seg.name, seg.size, peer.uid, peer.pid))
        return Grant(seg, token, access, fd)

    def _add_lease(
        self, peer: Peer, seg: SegmentRecord, access: Access, creator: bool = False
    ) -> str:
        token = self._new_token()
        self.leases[token] = Lease(token, seg, peer.uid, access, peer.id)
        seg.leases.add(token)
        peer.leases.add(token)
        self._journal(records.lease(token, seg.id, peer.uid, access, creator))
        if seg.ttl_armed:  # a new lease cancels the countdown
            seg.ttl_armed = False
            seg.ttl_generation += 1
            seg.ttl_deadline = None
            self._journal(records.ttl(seg.id, None))
        return token

    def release(self, peer: Peer, token: str, now: float) -> None:
        if token not in peer.leases:  # checked inline here and below: the hot path
            raise _not_held()
        self._end_lease(token, peer, now)

    def release_removes(self, peer: Peer, token: str) -> bool:
        """Would releasing ``token`` take its segment out of the namespace?

        The edge answers a release that would not before carrying it out (in
        the same turn, so no other request sees the difference): the reply
        no longer waits for the bookkeeping.  One that would must be done
        first: when its reply arrives, the name is free.  Raises ``ENOENT``
        for a lease this peer does not hold, as :meth:`release` does.
        """
        if token not in peer.leases:
            raise _not_held()
        seg = self.leases[token].segment
        if not seg.live:
            return False
        then = fate(seg, token, len(seg.leases) - 1)
        return then is Fate.UNLINK or (then is Fate.COUNTDOWN and not seg.ttl)

    def _end_lease(self, token: str, peer: Peer | None, now: float) -> None:
        lease = self.leases.pop(token)
        seg = lease.segment
        seg.leases.discard(token)
        if peer is not None:
            peer.leases.discard(token)
        if seg.live:
            self._journal(records.unlease(token))
        self._publish("released", seg, peer)
        if not seg.live:
            if not seg.leases:
                self.by_id.pop(seg.id, None)
            return
        then = fate(seg, token, len(seg.leases))
        if then is Fate.UNLINK:
            self._remove(seg, "deleted", peer)
        elif then is Fate.COUNTDOWN:
            assert seg.ttl is not None
            self._arm_ttl(seg, now, seg.ttl)

    def _arm_ttl(self, seg: SegmentRecord, now: float, delay: float) -> None:
        if delay <= 0:
            self._remove(seg, "expired", None)
            return
        seg.ttl_armed = True
        seg.ttl_generation += 1
        seg.ttl_deadline = now + delay
        self._journal(records.ttl(seg.id, seg.ttl_deadline))
        self.effects.append(ArmTimer(seg.id, seg.ttl_generation, delay))

    def expire(self, segment_id: str, generation: int, now: float) -> None:
        """A ttl countdown armed by :class:`ArmTimer` ran out."""
        seg = self.by_id.get(segment_id)
        if seg is None or not seg.live or not seg.ttl_armed or seg.ttl_generation != generation:
            return
        self._remove(seg, "expired", None)

    def _remove(self, seg: SegmentRecord, event: EventName, peer: Peer | None) -> None:
        """Take a segment out of the namespace; its leases live on."""
        seg.live = False
        seg.ttl_armed = False
        seg.ttl_deadline = None
        del self.segments[seg.name]
        self._journal(records.unsegment(seg.id))
        i = bisect.bisect_left(self._names, seg.name)
        del self._names[i]
        self.total_bytes -= seg.size
        used = self.usage[seg.owner_uid]
        used[0] -= seg.size
        used[1] -= 1
        if not used[1]:
            del self.usage[seg.owner_uid]
        if not seg.leases:
            self.by_id.pop(seg.id, None)
        self.effects.append(Unlink(seg))
        if event == "expired":
            self.expired += 1
        self._publish(event, seg, peer)

    # -- seal, delete, stat, list ----------------------------------------------------

    def seal(self, peer: Peer, name: str) -> SegmentRecord:
        seg = self._live(name)
        require(peer, seg, "w", "seal")
        allowed(self.policy, peer, "seal", name)
        if not seg.sealed:
            seg.sealed = True
            seg.head = None
            self._journal(records.seal(seg.id))
            if seg.backing == "memfd":
                self.effects.append(SealBacking(seg))
            self._publish("sealed", seg, peer)
        return seg

    def abandon(self, seg: SegmentRecord) -> None:
        """Take back a segment just created whose creation the edge could not
        answer (it could not be put on file): as if it had never been made."""
        if seg.live:
            self._remove(seg, "deleted", None)

    def delete(self, peer: Peer, name: str) -> None:
        seg = self._live(name)
        require(peer, seg, "w", "delete")
        allowed(self.policy, peer, "delete", name)
        self._remove(seg, "deleted", peer)

    def stat(self, peer: Peer, name: str) -> SegmentRecord:
        seg = self._live(name)
        require(peer, seg, "r", "stat")
        return seg

    def list_page(
        self, peer: Peer, prefix: str | None, after: str | None, limit: int
    ) -> tuple[list[SegmentRecord], str | None]:
        """One page of readable live segments in name order, and the next cursor.

        A peer that may read few of many names would make a page scan them
        all: the scan stops after ``LIST_SCAN`` names, and the page (short,
        even empty) ends there with a cursor to go on from, so no request
        holds the daemon for long.
        """
        prefix = prefix or ""
        start = bisect.bisect_right(self._names, after) if after is not None else 0
        start = max(start, bisect.bisect_left(self._names, prefix))
        page: list[SegmentRecord] = []
        for scanned, name in enumerate(self._iter_names(start, prefix), 1):
            seg = self.segments[name]
            if self.may(peer, seg, "r"):
                if len(page) == limit:
                    return page, page[-1].name
                page.append(seg)
            if scanned == LIST_SCAN:
                return page, name if self._names[-1] != name else None
        return page, None

    def _iter_names(self, start: int, prefix: str) -> Iterator[str]:
        names = self._names
        for i in range(start, len(names)):
            name = names[i]
            if not name.startswith(prefix):
                return
            yield name

    def holders(self, name: str) -> tuple[list[dict[str, object]], int]:
        """Who holds ``name``'s leases, for an operator's ``stat``: one entry per
        client and access (leases awaiting reclaim: per uid, ``client`` null),
        by client id; at most ``MAX_HOLDERS``, and how many more there are."""
        seg = self._live(name)
        counts: dict[tuple[int | None, int, Access], int] = {}
        for token in seg.leases:
            lease = self.leases[token]
            key = (lease.peer, lease.uid, lease.access)
            counts[key] = counts.get(key, 0) + 1
        entries: list[dict[str, object]] = []
        for (client, uid, access), n in sorted(counts.items(), key=_holder_order):
            peer = self.peers.get(client) if client is not None else None
            entries.append(
                {
                    "client": client,
                    "pid": peer.pid if peer else None,
                    "uid": uid,
                    "name": peer.name if peer else None,
                    "access": access,
                    "leases": n,
                }
            )
        return entries[:MAX_HOLDERS], max(len(entries) - MAX_HOLDERS, 0)

    def dropped(self, peer: Peer) -> None:
        """An operator drops ``peer`` (the edge then closes it, which ends its
        leases): the ``dropped`` event, on the empty name."""
        if self.wants_event(""):
            self.effects.append(Publish("dropped", "", 0, peer.uid, peer.pid))

    def clients(self, after: int | None, limit: int) -> tuple[list[Peer], int | None]:
        ids = sorted(pid for pid in self.peers if after is None or pid > after)
        page = [self.peers[i] for i in ids[:limit]]
        return page, (page[-1].id if len(ids) > limit else None)

    # -- restart: shutdown, restore, reclaim ------------------------------------------

    def shutdown(self, now: float) -> None:
        """The daemon is stopping: keep every lease, as a crash would.

        A stop is not the holders' doing: they still map their segments, so
        every lease on a live segment stays in the state, to be reclaimed
        after the restart (``refcount`` and ``owner`` segments included;
        what is not reclaimed within the window ends then, and its segment
        follows its lifetime).  Only leases on segments already deleted end
        now: nothing could reclaim them.
        """
        for peer in list(self.peers.values()):
            for wid in list(peer.waiters):
                self._drop_waiter(wid)
            for token in list(peer.leases):
                if self.leases[token].segment.live:
                    self.leases[token].peer = None
                    peer.leases.discard(token)
                else:
                    self._end_lease(token, peer, now)
        self.peers.clear()

    def records(self) -> Iterator[Record]:
        """The whole state in state-file records (for a snapshot)."""
        for seg in self.segments.values():
            yield records.segment(seg)
        for lease in self.leases.values():
            seg = lease.segment
            if seg.live:
                yield records.lease(
                    lease.token, seg.id, lease.uid, lease.access, lease.token == seg.creator_lease
                )

    def restore(self, seg: SegmentRecord, leases: list[tuple[str, int, Access, bool]]) -> None:
        """Put back a segment, and its leases awaiting reclaim, after a restart.

        Call :meth:`open_reclaim_window` once all are back.
        """
        self._insert(seg, sort=False)
        for token, uid, access, creator in leases:
            self.leases[token] = Lease(token, seg, uid, access, None)
            seg.leases.add(token)
            if creator:
                seg.creator_lease = token

    def open_reclaim_window(self, now: float, window: float) -> None:
        """Start the reclaim window; countdowns of restored ttl segments resume."""
        self._names.sort()
        self.reclaim_until = now + window
        for seg in list(self.segments.values()):
            then = fate(seg, None, len(seg.leases))
            if then is Fate.UNLINK:
                self._remove(seg, "deleted", None)
            elif then is Fate.COUNTDOWN:  # resumed where the last run left it
                assert seg.ttl is not None
                remaining = seg.ttl if seg.ttl_deadline is None else seg.ttl_deadline - now
                self._arm_ttl(seg, now, remaining)

    def reclaim(self, peer: Peer, token: str, now: float) -> Grant:
        lease = self.leases.get(token)
        if (
            lease is None
            or lease.peer is not None
            or lease.uid != peer.uid
            or now > self.reclaim_until
            or not lease.segment.live
        ):
            raise _refuse(errno.ENOENT, "no such lease to reclaim")
        lease.peer = peer.id
        peer.leases.add(token)
        self.reclaimed += 1
        return Grant(lease.segment, token, lease.access, fd=False)

    def end_reclaim_window(self, now: float) -> None:
        """Release every lease nobody reclaimed; segments follow their lifetime."""
        self.reclaim_until = 0.0
        for token in [t for t, lease in self.leases.items() if lease.peer is None]:
            self._end_lease(token, None, now)
            self.lapsed += 1

    def unreclaimed(self) -> int:
        return sum(1 for lease in self.leases.values() if lease.peer is None)
