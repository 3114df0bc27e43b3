"""The registry as a state machine: random runs of every request peers can make.

Hypothesis drives a pure :class:`Registry` with peers connecting and leaving,
``create``/``open``/``release``/``seal``/``delete``/``reclaim``, ttl timers
firing (the current one or a stale one), waiting opens timing out, quota
policies changing, and daemon restarts, clean (``shutdown``, snapshot) or
crashed (the journal replayed with ``state._apply``), rebuilt as
``recovery.recover`` does (its small glue written again here: ``restore`` each
segment whose object is still there, with its leases; compact when it would;
``open_reclaim_window``; the clients reconnect and reclaim).  Effects are
carried out as the server would: ``Unlink`` removes the object from a fake
backing store, ``ArmTimer`` is remembered with its generation, ``WaitDone``
answers a waiter of the model.

Each request's outcome is checked against what the contract says it must be
(its errno, or the lease it grants), every unlink must be justified by a
lifetime rule, and after every step the invariants that tie leases, peers,
segments, the name index, quotas, the store and the journal together are
checked.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmbroker import wire
from shmbroker.errors import BrokerError
from shmbrokerd import state
from shmbrokerd.policy import Policy, Quota
from shmbrokerd.registry import (
    ArmTimer,
    CreatePlan,
    Grant,
    Peer,
    Publish,
    Registry,
    RegistryLimits,
    SealBacking,
    SegmentRecord,
    Unlink,
    WaitDone,
    Waiting,
)

T0 = 1_700_000_000.0
WINDOW = 10.0
MAX_SEGMENT_SIZE = 16384
MAX_SEGMENTS = 5
MAX_TOTAL_BYTES = 32768
MAX_WAIT = 30.0

NAMES = ("a", "a/b", "a/c", "b", "b.x", "c")
UIDS = (0, 1000, 1001)
GIDS = (1000, 1001, 2000)
SIZES = (1, 4096, 8192, MAX_SEGMENT_SIZE, MAX_SEGMENT_SIZE + 1)
MODES = (0o600, 0o640, 0o644, 0o666, 0o666, 0o400, 0o000)
LIFETIMES = ("persistent", "owner", "refcount", "ttl", "ttl")
TTLS = (0.0, 2.0, 5.0, 5.0)
PICK = st.integers(0, 7)
OPEN_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "pick": PICK,
    "name": st.sampled_from(NAMES),
    "access": st.sampled_from(("ro", "rw")),
    "fd": st.booleans(),
    "wait": st.sampled_from((None, None, 0.0, 3.0, 3.0, MAX_WAIT + 1)),
    "which": st.sampled_from(("any", "absent", "live")),
}
RECLAIM_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "pick": PICK,
    "which": st.integers(0, 50),
    "pending": st.sampled_from((True, True, False)),
    "same_uid": st.sampled_from((True, True, False)),
    "when": st.sampled_from(("now", "now", "window-end", "late")),
}
CREATE_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "pick": PICK,
    "name": st.sampled_from(NAMES),
    "size": st.sampled_from(SIZES),
    "lifetime": st.sampled_from(LIFETIMES),
    "ttl": st.sampled_from(TTLS),
    "mode": st.sampled_from(MODES),
    "backing": st.sampled_from((None, "shm", "shm", "memfd")),
    "exist_ok": st.booleans(),
}
#: ``rule``, for ``@table_rule(**ARGS)``: mypy matches none of ``rule``'s overloads
#: to the ``**`` of a dict (whose keys could be ``target``)
table_rule: Callable[..., Callable[[Callable[..., None]], Callable[..., None]]] = rule

Access = Literal["ro", "rw"]


def may(peer: Peer, seg: SegmentRecord, want: str) -> bool:
    """The contract's permission bits, written again from PROTOCOL.md."""
    if peer.operator:
        return True
    bit = 4 if want == "r" else 2
    if peer.uid == seg.owner_uid:
        shift = 6
    elif seg.owner_gid == peer.gid or seg.owner_gid in peer.groups:
        shift = 3
    else:
        shift = 0
    return bool((seg.mode >> shift) & bit)


def replay(records: list[dict[str, Any]]) -> state.Loaded:
    """What a daemon reads back from these state-file lines."""
    loaded = state.Loaded()
    for rec in records:
        state._apply(loaded, json.loads(json.dumps(rec)))
    return loaded


def segment_from(rec: dict[str, Any]) -> SegmentRecord:
    """A state-file ``seg`` record back into a segment, as the daemon does."""
    fields = {k: v for k, v in rec.items() if k not in ("k", "at")}
    return SegmentRecord(**fields, ttl_deadline=rec.get("at"))


def leases_of(loaded: state.Loaded, seg_id: str) -> list[tuple[str, int, Any, bool]]:
    return [
        (rec["t"], rec["u"], rec["a"], rec["c"])
        for rec in loaded.leases.values()
        if rec["s"] == seg_id
    ]


@dataclass
class ModelWaiter:
    peer: int
    name: str
    rid: int
    access: Access
    fd: bool
    due: float


@dataclass
class ModelLease:
    holder: int | None  # None: awaiting reclaim after a restart
    segment_id: str
    uid: int
    access: Access


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.memfd_persistent = False
        self._tokens = 0
        self._seg_ids = 0
        self._peer_ids = 0
        self._rids = 0
        self.seen_ids: set[str] = set()
        self.store: dict[str, tuple[str, int, str]] = {}  # id -> (name, size, backing)
        self.peers: dict[int, Peer] = {}
        self.leases: dict[str, ModelLease] = {}
        self.all_tokens: list[str] = ["never-granted"]
        self.waiters: dict[int, ModelWaiter] = {}
        self.wids: list[int] = []
        self.timers: list[tuple[str, int, float]] = []  # every ArmTimer: id, gen, due
        self.current_timer: dict[str, int] = {}  # id -> the generation that may fire
        self.snapshot: list[dict[str, Any]] = []
        self.journal: list[dict[str, Any]] = []
        self.on_disk = state.Loaded()  # snapshot + journal, replayed as they grow
        self.live = state.Live()  # the same, as the state file keeps it encoded
        self.reg = self._new_registry(Policy())
        # what the step in progress may unlink, and why
        self._deleting: str | None = None
        self._expiring: str | None = None
        self._timing_out: int | None = None
        self._restore_at: dict[str, float | None] | None = None

    # -- plumbing ----------------------------------------------------------------

    def _new_registry(self, policy: Policy) -> Registry:
        def new_token() -> str:
            self._tokens += 1
            return f"tok-{self._tokens}"

        def new_segment_id() -> str:
            self._seg_ids += 1
            return f"seg-{self._seg_ids}"

        return Registry(
            RegistryLimits(
                max_segment_size=MAX_SEGMENT_SIZE,
                max_segments=MAX_SEGMENTS,
                max_total_bytes=MAX_TOTAL_BYTES,
                max_wait=MAX_WAIT,
                memfd_persistent=self.memfd_persistent,
            ),
            new_token=new_token,
            new_segment_id=new_segment_id,
            journal=self._journal,
            policy=policy,
        )

    def _journal(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec)
        self.journal.append(json.loads(line))
        state._apply(self.on_disk, json.loads(line))
        self.live.add(json.loads(line), line.encode())

    def _peer(self, pick: int) -> Peer:
        ids = sorted(self.peers)
        return self.peers[ids[pick % len(ids)]]

    def _live_by_id(self) -> dict[str, SegmentRecord]:
        return {seg.id: seg for seg in self.reg.segments.values()}

    def _granted(self, peer: Peer, grant: Grant, access: Access, fd: bool) -> None:
        assert grant.lease not in self.leases
        assert grant.lease not in self.all_tokens, "a token was handed out twice"
        assert grant.access == access
        assert grant.fd == fd
        assert grant.segment.live
        assert self.reg.segments[grant.segment.name] is grant.segment
        assert grant.result()["lease"] == grant.lease
        self.leases[grant.lease] = ModelLease(peer.id, grant.segment.id, peer.uid, access)
        self.all_tokens.append(grant.lease)
        self.current_timer.pop(grant.segment.id, None)  # a new lease cancels a countdown

    @staticmethod
    def _writer_errors(peer: Peer, seg: SegmentRecord | None) -> set[int]:
        """What a request that needs ``w`` on ``seg`` (seal, delete) may be refused with."""
        if seg is None:
            return {errno.ENOENT}
        return set() if may(peer, seg, "w") else {errno.EACCES}

    def _refused(self, exc: BrokerError, expected: set[int], what: str) -> None:
        assert expected, f"{what} refused ({exc}), the contract says it succeeds"
        assert exc.errno in expected, (what, errno.errorcode[exc.errno or 0], expected)
        assert self.reg.drain() == [], f"refused {what} left effects"

    def _run(self) -> None:
        """Carry out the queued effects as the server does."""
        try:
            effects = self.reg.drain()
            while effects:
                for eff in effects:
                    self._effect(eff)
                effects = self.reg.drain()
        finally:
            self._deleting = self._expiring = self._timing_out = None
            self._restore_at = None

    def _effect(self, eff: object) -> None:
        if isinstance(eff, Unlink):
            self._unlink(eff.segment)
        elif isinstance(eff, ArmTimer):
            seg = self.reg.by_id[eff.segment_id]
            assert seg.live
            assert seg.lifetime == "ttl"
            assert not seg.leases
            assert eff.delay > 0
            # the full ttl, or after a restart what was left of the countdown
            at = (self._restore_at or {}).get(seg.id)
            assert seg.ttl is not None
            want = seg.ttl if at is None else at - self.now
            assert math.isclose(eff.delay, want), (seg.name, eff.delay, want)
            assert seg.ttl_deadline is not None
            assert math.isclose(seg.ttl_deadline, self.now + eff.delay)
            self.timers.append((eff.segment_id, eff.generation, self.now + eff.delay))
            self.current_timer[eff.segment_id] = eff.generation
        elif isinstance(eff, SealBacking):
            assert eff.segment.backing == "memfd"
            assert eff.segment.sealed
        elif isinstance(eff, WaitDone):
            self._wait_done(eff)
        else:
            assert isinstance(eff, Publish)

    def _unlink(self, seg: SegmentRecord) -> None:
        assert seg.id in self.store, f"{seg.name} ({seg.id}) unlinked twice"
        assert not seg.live
        assert self.reg.segments.get(seg.name) is not seg
        del self.store[seg.id]
        self.current_timer.pop(seg.id, None)
        if seg.id == self._deleting:
            return
        why = f"{seg.lifetime} segment {seg.name} unlinked"
        if seg.lifetime == "refcount":
            assert not seg.leases, f"{why} while it has leases"
        elif seg.lifetime == "owner":
            assert seg.creator_lease not in self.reg.leases, f"{why} with its creator lease"
        elif seg.lifetime == "ttl":
            assert not seg.leases, f"{why} while it has leases"
            assert seg.ttl is not None
            at = (self._restore_at or {}).get(seg.id)
            restored_late = (
                self._restore_at is not None and (seg.ttl if at is None else at - self.now) <= 0
            )
            assert seg.ttl == 0 or self._expiring == seg.id or restored_late, (
                f"{why} before its countdown ran out"
            )
        else:
            raise AssertionError(f"{why} without delete")

    def _wait_done(self, eff: WaitDone) -> None:
        w = self.waiters.pop(eff.waiter, None)
        assert w is not None, f"WaitDone for waiter {eff.waiter}, which is not waiting"
        assert (eff.peer, eff.request_id) == (w.peer, w.rid)
        if eff.waiter == self._timing_out:
            assert eff.grant is None
            assert eff.error is not None
            assert eff.error.errno == errno.ETIMEDOUT
            return
        # woken by the create of its name: the open is decided as any other
        seg = self.reg.segments[w.name]
        peer = self.peers[w.peer]
        allowed = may(peer, seg, "w" if w.access == "rw" else "r")
        if eff.grant is not None:
            assert eff.error is None
            assert allowed
            assert eff.grant.segment is seg
            self._granted(peer, eff.grant, w.access, w.fd)
        else:
            assert eff.error is not None
            assert not allowed
            assert eff.error.errno == errno.EACCES

    # -- peers -------------------------------------------------------------------

    def _connect(self, uid: int, gid: int, groups: frozenset[int], operator: bool) -> Peer:
        self._peer_ids += 1
        pid = self._peer_ids
        peer = Peer(
            id=pid,
            pid=20_000 + pid,
            uid=uid,
            gid=gid,
            groups=groups,
            operator=operator,
            connected=self.now,
        )
        self.reg.connect(peer)
        self.peers[pid] = peer
        return peer

    @initialize(
        memfd_persistent=st.booleans(),
        other_uid=st.sampled_from((0, 1001)),
        seeds=st.lists(st.fixed_dictionaries(CREATE_ARGS), max_size=4),
        opens=st.lists(st.fixed_dictionaries(OPEN_ARGS), max_size=4),
    )
    def configure(
        self, memfd_persistent: bool, other_uid: int, seeds: list[Any], opens: list[Any]
    ) -> None:
        """Two clients, a few creates and opens to start with: most requests need them."""
        self.memfd_persistent = memfd_persistent
        self.reg.limits.memfd_persistent = memfd_persistent
        self._connect(1000, 1000, frozenset(), operator=False)
        self._connect(other_uid, 1000, frozenset({2000}), operator=other_uid == 0)
        for kw in seeds:
            self._create(**kw)
        for kw in opens:
            self._open(**{**kw, "which": "live", "wait": None})

    @precondition(lambda self: len(self.peers) < 5)
    @rule(
        uid=st.sampled_from(UIDS),
        gid=st.sampled_from(GIDS),
        groups=st.sets(st.sampled_from(GIDS), max_size=2),
        admin=st.sampled_from((False, False, False, True)),
    )
    def connect(self, uid: int, gid: int, groups: set[int], admin: bool) -> None:
        """A client connects; root and the admin group are operators."""
        self._connect(uid, gid, frozenset(groups), operator=uid == 0 or admin)

    @precondition(lambda self: len(self.peers) > 1)
    @rule(pick=PICK, busy=st.booleans())
    def disconnect(self, pick: int, busy: bool) -> None:
        """A client goes away (maybe one with opens waiting, or leases)."""
        peer = self._peer(pick)
        if busy:
            waiting = {w.peer for w in self.waiters.values()}
            holding = {m.holder for m in self.leases.values()}
            peer = next(
                (p for p in self.peers.values() if p.id in waiting),
                next((p for p in self.peers.values() if p.id in holding), peer),
            )
        self.reg.disconnect(peer.id, self.now)
        del self.peers[peer.id]
        for token in [t for t, m in self.leases.items() if m.holder == peer.id]:
            del self.leases[token]
        for wid in [w for w, m in self.waiters.items() if m.peer == peer.id]:
            del self.waiters[wid]  # dropped without an answer: nobody to answer
        self._run()
        self.reg.disconnect(peer.id, self.now)  # a second time is a no-op
        assert self.reg.drain() == []

    @rule(dt=st.sampled_from((1.0, 4.0, 15.0)))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    # -- requests ----------------------------------------------------------------

    def _create_errors(self, peer: Peer, req: wire.Create) -> set[int]:
        existing = self.reg.segments.get(req.name)
        if existing is not None:
            if not req.exist_ok or existing.size != req.size:
                return {errno.EEXIST}
            errs = set()
            if not may(peer, existing, "w"):
                errs.add(errno.EACCES)
            if existing.sealed:
                errs.add(errno.EPERM)
            return errs
        errs = set()
        live = list(self.reg.segments.values())
        if req.size > MAX_SEGMENT_SIZE:
            errs.add(errno.EINVAL)
        if req.backing == "memfd" and req.lifetime == "persistent" and not self.memfd_persistent:
            errs.add(errno.EOPNOTSUPP)
        if len(live) >= MAX_SEGMENTS or sum(s.size for s in live) + req.size > MAX_TOTAL_BYTES:
            errs.add(errno.ENOSPC)
        quota = self.reg.policy.quota(peer.uid, peer.gids)
        mine = [s for s in live if s.owner_uid == peer.uid]
        if (quota.bytes and sum(s.size for s in mine) + req.size > quota.bytes) or (
            quota.segments and len(mine) + 1 > quota.segments
        ):
            errs.add(errno.EDQUOT)
        return errs

    @table_rule(**CREATE_ARGS)
    def create(self, **kw: Any) -> None:
        self._create(**kw)

    @table_rule(**CREATE_ARGS)
    def create_more(self, **kw: Any) -> None:
        """The same again, often of a name an open waits for."""
        if self.waiters and kw["pick"] < 6:
            kw["name"] = sorted(w.name for w in self.waiters.values())[kw["pick"] % 2 - 1]
        self._create(**kw)

    def _create(
        self,
        pick: int,
        name: str,
        size: int,
        lifetime: str,
        ttl: float,
        mode: int,
        backing: str | None,
        exist_ok: bool,
    ) -> None:
        peer = self._peer(pick)
        fields: dict[str, Any] = {"id": 1, "op": "create", "name": name, "size": size}
        fields.update(lifetime=lifetime, mode=mode, exist_ok=exist_ok)
        if lifetime == "ttl":
            fields["ttl"] = ttl
        if backing is not None:
            fields["backing"] = backing
        req = wire.Create.model_validate(fields)
        existing = self.reg.segments.get(name)
        expected = self._create_errors(peer, req)
        journaled = len(self.journal)
        try:
            decision = self.reg.check_create(peer, req, self.now)
        except BrokerError as exc:
            self._refused(exc, expected, f"create {name}")
            assert len(self.journal) == journaled
            return
        assert not expected, f"create {name} succeeded, expected {expected}"
        if isinstance(decision, CreatePlan):
            assert existing is None
            assert decision.segment_id not in self.seen_ids, "segment id reused"
            self.seen_ids.add(decision.segment_id)
            assert decision.backing == (backing or "shm")
            self.store[decision.segment_id] = (name, size, decision.backing)
            grant = self.reg.commit_create(decision, self.now)
            seg = grant.segment
            assert seg.id == decision.segment_id
            assert (seg.name, seg.size, seg.lifetime, seg.mode) == (name, size, lifetime, mode)
            assert (seg.owner_uid, seg.owner_gid, seg.sealed) == (peer.uid, peer.gid, False)
            assert seg.ttl == (ttl if lifetime == "ttl" else None)
            assert seg.creator_lease == grant.lease
        else:
            grant = decision
            assert existing is not None
            assert grant.segment is existing
        self._granted(peer, grant, "rw", True)
        self._run()

    @table_rule(**OPEN_ARGS)
    def open(self, **kw: Any) -> None:
        self._open(**kw)

    @table_rule(**OPEN_ARGS)
    def open_more(self, **kw: Any) -> None:
        """The same again: segments with several leases are where lifetimes bite."""
        self._open(**kw)

    def _open(
        self, pick: int, name: str, access: Access, fd: bool, wait: float | None, which: str
    ) -> None:
        """Open a name: any, one that does not exist yet, or a live one (a ttl
        segment counting down first: the open must stop the countdown)."""
        peer = self._peer(pick)
        if which == "absent":
            name = next((n for n in NAMES if n not in self.reg.segments), name)
        elif which == "live" and self.reg.segments:
            live = sorted(self.reg.segments.values(), key=lambda s: (not s.ttl_armed, s.name))
            name = live[0 if live[0].ttl_armed else pick % len(live)].name
        self._rids += 1
        fields: dict[str, Any] = {"id": self._rids, "op": "open", "name": name}
        fields.update(access=access, fd=fd)
        if wait is not None:
            fields["wait"] = wait
        req = wire.Open.model_validate(fields)
        seg = self.reg.segments.get(name)
        expected: set[int] = set()
        if wait is not None and wait > MAX_WAIT:
            expected = {errno.EINVAL}
        elif seg is not None:
            if not may(peer, seg, "w" if access == "rw" else "r"):
                expected.add(errno.EACCES)
            if access == "rw" and seg.sealed:
                expected.add(errno.EPERM)
        elif wait is None:
            expected = {errno.ENOENT}
        elif wait == 0:
            expected = {errno.ETIMEDOUT}
        try:
            outcome = self.reg.open(peer, req, self.now)
        except BrokerError as exc:
            self._refused(exc, expected, f"open {name} {access}")
            return
        assert not expected, f"open {name} {access} succeeded, expected {expected}"
        if isinstance(outcome, Waiting):
            assert seg is None
            assert wait
            assert outcome.timeout == wait
            assert outcome.waiter not in self.wids, "waiter id reused"
            assert outcome.waiter in peer.waiters
            self.wids.append(outcome.waiter)
            self.waiters[outcome.waiter] = ModelWaiter(
                peer.id, name, self._rids, access, fd, self.now + wait
            )
        else:
            assert outcome.segment is seg
            self._granted(peer, outcome, access, fd)
        self._run()

    @rule(pick=PICK, which=st.integers(0, 50), held=st.sampled_from((True, True, False)))
    def release(self, pick: int, which: int, held: bool) -> None:
        """Its holder releases a lease (those on ttl segments first), or a peer
        presents any token ever granted (its own, another's, a dead one)."""
        ttl = {seg.id for seg in self.reg.segments.values() if seg.lifetime == "ttl"}
        tokens = sorted(
            (m.segment_id not in ttl, t) for t, m in self.leases.items() if m.holder is not None
        )
        if held and tokens:
            token = tokens[which % 2 and which % len(tokens)][1]
            holder = self.leases[token].holder
            assert holder is not None
            peer = self.peers[holder]
        else:
            peer = self._peer(pick)
            token = self.all_tokens[which % len(self.all_tokens)]
        self._release(peer, token)

    def _release(self, peer: Peer, token: str) -> None:
        ok = token in self.leases and self.leases[token].holder == peer.id
        try:
            removes = self.reg.release_removes(peer, token)
        except BrokerError as exc:
            self._refused(exc, set() if ok else {errno.ENOENT}, f"release_removes {token}")
            removes = None
        try:
            self.reg.release(peer, token, self.now)
        except BrokerError as exc:
            self._refused(exc, set() if ok else {errno.ENOENT}, f"release {token}")
            return
        assert ok, f"release of {token} not held by peer {peer.id} succeeded"
        del self.leases[token]
        # the edge answers first the releases said not to remove their segment
        effects = self.reg.drain()
        assert removes == any(isinstance(e, Unlink) for e in effects), (token, removes, effects)
        self.reg.effects[:0] = effects  # as if not drained: _run carries them out
        self._run()

    @rule(pick=PICK, name=st.sampled_from(NAMES))
    def seal(self, pick: int, name: str) -> None:
        peer = self._peer(pick)
        seg = self.reg.segments.get(name)
        expected = self._writer_errors(peer, seg)
        try:
            sealed = self.reg.seal(peer, name)
        except BrokerError as exc:
            self._refused(exc, expected, f"seal {name}")
            return
        assert not expected
        assert sealed is seg
        assert sealed.sealed
        assert sealed.describe()["sealed"] is True
        self._run()

    @rule(pick=PICK, name=st.sampled_from(NAMES), leased=st.booleans())
    def delete(self, pick: int, name: str, leased: bool) -> None:
        """Delete a name (with ``leased``, one whose segment has leases, those
        awaiting reclaim first)."""
        peer = self._peer(pick)
        if leased:
            held = sorted(
                (lease.peer is not None, lease.segment.name)
                for lease in self.reg.leases.values()
                if lease.segment.live
            )
            name = held[pick % 2 and pick % len(held)][1] if held else name
        seg = self.reg.segments.get(name)
        expected = self._writer_errors(peer, seg)
        try:
            self.reg.delete(peer, name)
        except BrokerError as exc:
            self._refused(exc, expected, f"delete {name}")
            return
        assert not expected
        assert seg is not None
        self._deleting = seg.id
        self._run()
        assert seg.id not in self.store
        assert not seg.live
        assert name not in self.reg.segments

    @precondition(lambda self: any(seg.ttl_armed for seg in self.reg.segments.values()))
    @rule(pick=PICK, fd=st.booleans())
    def glance(self, pick: int, fd: bool) -> None:
        """A client opens a segment counting down and releases it at once: the
        countdown stops, then starts again (a new generation; the old timer is stale)."""
        name = min(seg.name for seg in self.reg.segments.values() if seg.ttl_armed)
        before = set(self.leases)
        self._open(pick, name, "ro", fd, None, "any")
        for token in set(self.leases) - before:
            holder = self.leases[token].holder
            assert holder is not None
            self._release(self.peers[holder], token)

    # -- timers ------------------------------------------------------------------

    @precondition(lambda self: self.timers)
    @rule(which=st.integers(0, 50), kind=st.sampled_from(("latest", "stale", "any")))
    def ttl_tick(self, which: int, kind: str) -> None:
        """A countdown's timer fires: the latest armed one, a stale one of a
        segment counting down again (a later generation), or any."""
        self.reg.expire("seg-unknown", which, self.now)  # a stray one is ignored
        assert self.reg.drain() == []
        timers = self.timers
        if kind == "stale":
            timers = [
                t for t in timers if t[0] in self.current_timer and self.current_timer[t[0]] != t[1]
            ] or timers
        seg_id, gen, due = timers[-1] if kind == "latest" else timers[which % len(timers)]
        self.now = max(self.now, due)
        current = self.current_timer.get(seg_id) == gen
        seg = self.reg.by_id.get(seg_id)
        self._expiring = seg_id if current else None
        self.reg.expire(seg_id, gen, self.now)
        if not current:
            assert self.reg.drain() == [], f"stale timer {seg_id}/{gen} changed something"
            self._run()
            return
        self._run()
        assert seg is not None
        assert not seg.live
        assert seg_id not in self.store

    @precondition(lambda self: self.wids)
    @rule(which=st.integers(0, 50))
    def wait_timeout(self, which: int) -> None:
        wid = self.wids[which % len(self.wids)]
        w = self.waiters.get(wid)
        if w is None:  # already answered or dropped: its timer is a no-op
            self.reg.wait_timeout(wid)
            assert self.reg.drain() == []
            return
        self.now = max(self.now, w.due)
        self._timing_out = wid
        self.reg.wait_timeout(wid)
        self._run()
        assert wid not in self.waiters, "a timed out waiter got no answer"

    # -- policy ------------------------------------------------------------------

    @rule(
        quota_bytes=st.sampled_from((0, 8192, 16384)),
        quota_segments=st.sampled_from((0, 1, 2)),
        uid_quota=st.none() | st.sampled_from(UIDS),
    )
    def apply_quota(self, quota_bytes: int, quota_segments: int, uid_quota: int | None) -> None:
        """What ``reload`` does with a new config's quotas."""
        quotas: tuple[Quota, ...] = ()
        if uid_quota is not None:
            quotas = (Quota(frozenset({uid_quota}), frozenset(), 4096, 1),)
        self.reg.policy = Policy(
            quotas=quotas,
            default_quota=Quota(frozenset(), frozenset(), quota_bytes, quota_segments),
        )

    # -- restart -----------------------------------------------------------------

    @rule(
        crash=st.booleans(),
        downtime=st.sampled_from((0.0, 3.0, 30.0)),
        reclaims=st.lists(
            st.none() | st.tuples(PICK, st.sampled_from((True, True, False))), max_size=6
        ),
    )
    def restart(
        self, crash: bool, downtime: float, reclaims: list[tuple[int, bool] | None]
    ) -> None:
        """A daemon restart: clean (shutdown, snapshot) or a crash (the journal).

        The clients reconnect at once and reclaim some of their leases; the
        rest await :meth:`reclaim` or :meth:`end_reclaim_window`.
        """
        old = self.reg
        if crash:
            lines = self.snapshot + self.journal
            for token, m in list(self.leases.items()):
                if m.segment_id in self._live_by_id():
                    m.holder = None
                else:
                    del self.leases[token]
        else:
            live_then = self._live_by_id()
            old.shutdown(self.now)
            for token, m in list(self.leases.items()):
                if m.holder is None:
                    continue
                if m.segment_id in live_then:  # a stop keeps held leases, as a crash
                    m.holder = None
                else:
                    del self.leases[token]
            self._run()
            assert old.peers == {}
            assert not old._waiters, "shutdown left opens waiting"
            assert all(lease.peer is None for lease in old.leases.values())
            lines = list(old.records())
        clients = [(p.uid, p.gid, p.groups, p.operator) for p in self.peers.values()]
        self.peers.clear()

        # the new process: recovery.recover, with the fake store for /dev/shm
        loaded = replay(lines)
        self.reg = new = self._new_registry(old.policy)
        restored: set[str] = set()
        for seg_id, rec in loaded.segments.items():
            seg = segment_from(rec)
            assert seg_id in self.store, f"state names {seg.name} ({seg_id}), its object is gone"
            if seg.backing == "memfd" and not self.memfd_persistent:
                del self.store[seg_id]  # no fd store: the memfd died with the old process
                continue
            new.restore(seg, leases_of(loaded, seg_id))
            restored.add(seg_id)
        orphans = set(self.store) - restored
        assert not orphans, f"objects the state does not name: {sorted(orphans)}"
        for token in [t for t, m in self.leases.items() if m.segment_id not in restored]:
            del self.leases[token]
        assert set(new.leases) == set(self.leases), "restored leases differ from those held"
        for token, m in self.leases.items():
            lease = new.leases[token]
            assert (lease.segment.id, lease.uid, lease.access) == (m.segment_id, m.uid, m.access)
        # the daemon compacts unless the state it read is exactly what it kept
        if (crash and self.journal) or restored != set(loaded.segments):
            lines = [json.loads(json.dumps(rec)) for rec in new.records()]
        self.snapshot = lines
        self.journal = []
        self.on_disk = replay(lines)
        self.live = state.Live()  # as the daemon does: from the registry once restored
        for rec in new.records():
            self.live.add(rec, json.dumps(rec).encode())
        self.timers.clear()
        self.current_timer.clear()
        self.waiters.clear()
        self.wids.clear()

        self.now += downtime
        self._restore_at = {
            seg_id: rec.get("at") for seg_id, rec in loaded.segments.items() if seg_id in restored
        }
        new.open_reclaim_window(self.now, WINDOW)
        self._run()
        for creds in clients:  # the clients reconnect, to reclaim their leases
            self._connect(*creds)
        pending = sorted(self.leases)
        for token, how in zip(pending, reclaims, strict=False):
            if how is not None:  # by a client of its uid, or of another
                self._reclaim(token, *how)

    @table_rule(**RECLAIM_ARGS)
    def reclaim(self, **kw: Any) -> None:
        self._reclaim_one(**kw)

    @precondition(lambda self: self.reg.reclaim_until > 0)
    @table_rule(**RECLAIM_ARGS)
    def reclaim_in_window(self, **kw: Any) -> None:
        """The same, while leases await reclaim: where it matters most."""
        self._reclaim_one(**kw)

    def _reclaim_one(self, pick: int, which: int, pending: bool, same_uid: bool, when: str) -> None:
        """Reclaim a lease awaiting it (maybe by a peer of its uid, maybe one whose
        segment was deleted since), or any token; now, at the window's end or after."""
        if self.reg.reclaim_until and when != "now":
            late = 0.5 if when == "late" else 0.0
            self.now = max(self.now, self.reg.reclaim_until + late)
        live = self._live_by_id()
        waiting = sorted(
            (m.segment_id in live, t) for t, m in self.leases.items() if m.holder is None
        )
        pool = [t for _, t in waiting] if pending and waiting else self.all_tokens
        self._reclaim(pool[which % 2 and which % len(pool)], pick, same_uid)

    def _reclaim(self, token: str, pick: int, same_uid: bool) -> None:
        m = self.leases.get(token)
        peer = self._peer(pick)
        if m is not None:  # a peer of its uid, or of another uid
            others = [p for p in self.peers.values() if (p.uid == m.uid) == same_uid]
            peer = others[pick % len(others)] if others else peer
        live = self._live_by_id()
        ok = (
            m is not None
            and m.holder is None
            and m.uid == peer.uid
            and self.now <= self.reg.reclaim_until
            and m.segment_id in live
        )
        try:
            grant = self.reg.reclaim(peer, token, self.now)
        except BrokerError as exc:
            self._refused(exc, set() if ok else {errno.ENOENT}, f"reclaim {token}")
            return
        assert ok, f"reclaim of {token} by uid {peer.uid} succeeded"
        assert m is not None
        assert (grant.lease, grant.access, grant.fd) == (token, m.access, False)
        assert grant.segment is live[m.segment_id]
        m.holder = peer.id
        self._run()

    @precondition(lambda self: self.reg.reclaim_until > 0)
    @rule()
    def end_reclaim_window(self) -> None:
        self.now = max(self.now, self.reg.reclaim_until)
        self.reg.end_reclaim_window(self.now)
        for token in [t for t, m in self.leases.items() if m.holder is None]:
            del self.leases[token]
        self._run()
        assert self.reg.reclaim_until == 0

    # -- invariants --------------------------------------------------------------

    @invariant()
    def leases_are_held_once(self) -> None:
        reg = self.reg
        assert set(reg.peers) == set(self.peers)
        holder: dict[str, int] = {}
        for pid, peer in reg.peers.items():
            for token in peer.leases:
                assert token not in holder, f"{token} held by peers {holder[token]} and {pid}"
                holder[token] = pid
        for token, lease in reg.leases.items():
            assert lease.token == token
            assert token in lease.segment.leases
            if lease.peer is None:
                assert reg.reclaim_until > 0, f"{token} has no holder outside a reclaim window"
                assert token not in holder
            else:
                assert holder.get(token) == lease.peer
        assert set(holder) <= set(reg.leases)
        assert {t: lease.peer for t, lease in reg.leases.items()} == {
            t: m.holder for t, m in self.leases.items()
        }
        assert reg.unreclaimed() == sum(1 for m in self.leases.values() if m.holder is None)

    @invariant()
    def segments_match_leases_and_store(self) -> None:
        reg = self.reg
        live = self._live_by_id()
        for name, seg in reg.segments.items():
            assert seg.name == name
            assert seg.live
        # a segment stays known while it is live or a lease names it, no longer
        known = {**live, **{lease.segment.id: lease.segment for lease in reg.leases.values()}}
        assert reg.by_id == known
        for seg in known.values():
            tokens = {t for t, lease in reg.leases.items() if lease.segment is seg}
            assert seg.leases == tokens
            assert seg.describe()["leases"] == len(tokens)
            assert len(tokens) == sum(1 for m in self.leases.values() if m.segment_id == seg.id)
        # no live segment is unlinked, no unlinked one is live
        assert set(self.store) == set(live)
        for seg_id, (name, size, backing) in self.store.items():
            seg = live[seg_id]
            assert (seg.name, seg.size, seg.backing) == (name, size, backing)
        assert reg.total_bytes == sum(seg.size for seg in live.values())
        usage: dict[int, list[int]] = {}
        for seg in live.values():
            used = usage.setdefault(seg.owner_uid, [0, 0])
            used[0] += seg.size
            used[1] += 1
        assert reg.usage == usage

    @invariant()
    def lifetimes_hold(self) -> None:
        reg = self.reg
        for seg in reg.segments.values():
            if seg.lifetime == "refcount":
                assert seg.leases, f"refcount segment {seg.name} is live without leases"
            elif seg.lifetime == "owner":
                assert seg.creator_lease in reg.leases, (
                    f"owner segment {seg.name} is live without its creator lease"
                )
            elif seg.lifetime == "ttl":
                if seg.leases:
                    assert not seg.ttl_armed
                    assert seg.id not in self.current_timer
                    assert seg.ttl_deadline is None
                else:
                    assert seg.ttl_armed
                    assert seg.ttl_deadline is not None
                    assert self.current_timer.get(seg.id) == seg.ttl_generation, (
                        f"ttl segment {seg.name} without leases has no countdown"
                    )
            else:
                assert seg.lifetime == "persistent"
        for seg_id in self.current_timer:
            assert seg_id in reg.by_id
            assert reg.by_id[seg_id].live

    @invariant()
    def names_index_and_list(self) -> None:
        reg = self.reg
        names = sorted(reg.segments)
        assert reg._names == names
        probe = Peer(
            id=0, pid=1, uid=4242, gid=4242, groups=frozenset(), operator=True, connected=T0
        )
        checks = [(probe, prefix) for prefix in (None, "a", "a/", "b")]
        classes = {(p.uid, p.gid, p.groups, p.operator): p for p in reg.peers.values()}
        checks += [(peer, None) for peer in classes.values()]
        for peer, prefix in checks:
            want = [
                n for n in names if n.startswith(prefix or "") and may(peer, reg.segments[n], "r")
            ]
            for limit in (1, 3):
                got: list[str] = []
                after: str | None = None
                for _ in range(len(names) + 1):  # bounded: a cursor that repeats ends
                    page, after = reg.list_page(peer, prefix, after, limit)
                    assert len(page) <= limit
                    got.extend(seg.name for seg in page)
                    if after is None:
                        break
                    assert len(page) == limit
                    assert after == page[-1].name
                assert after is None, f"list does not end: {got}"
                assert got == want, (peer.operator, prefix, limit)

    @invariant()
    def waiters_match(self) -> None:
        reg = self.reg
        for pid, peer in reg.peers.items():
            mine = {wid for wid, w in self.waiters.items() if w.peer == pid}
            assert peer.waiters == mine
            assert reg.waiting(pid) == len(mine)
        # nothing waits for a peer that is gone, nor for a name that exists
        assert {wid: w.peer.id for wid, w in reg._waiters.items()} == {
            wid: w.peer for wid, w in self.waiters.items()
        }
        by_name: dict[str, list[int]] = {}
        for wid, w in sorted(self.waiters.items()):
            assert w.name not in reg.segments
            by_name.setdefault(w.name, []).append(wid)
        assert reg._waiting_names == by_name

    @invariant()
    def journal_tells_the_state(self) -> None:
        """A crash now loses nothing: snapshot + journal == the registry's records."""
        now = replay(list(self.reg.records()))
        assert self.on_disk.segments == now.segments
        assert self.on_disk.leases == now.leases
        # and a snapshot written from the encoded records says the same
        kept = replay(json.loads(self.live.snapshot())["records"])
        assert kept.segments == now.segments
        assert kept.leases == now.leases


RegistryMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestRegistryState = RegistryMachine.TestCase
