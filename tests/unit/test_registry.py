"""The registry (every lifetime and permission rule) driven directly, no I/O.

Peers are plain objects, requests are the contract's models, tokens and ids
come from counters and ``now`` is passed explicitly, so every case is exact:
what stays live, which effects are queued in which order, how many leases
remain.
"""

from __future__ import annotations

import base64
import errno
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from shmbroker import wire
from shmbroker.errors import BrokerError
from shmbrokerd.ids import TokenSource
from shmbrokerd.registry import (
    ArmTimer,
    CreatePlan,
    Effect,
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
OWNER_UID = 1000
OWNER_GID = 1000


def make_registry(**limits: Any) -> Registry:
    lim: dict[str, Any] = {
        "max_segment_size": 1 << 20,
        "max_segments": 64,
        "max_total_bytes": 1 << 24,
        "max_wait": 60.0,
    }
    lim.update(limits)
    tokens = itertools.count(1)
    ids = itertools.count(1)
    return Registry(
        RegistryLimits(**lim),
        new_token=lambda: f"tok-{next(tokens)}",
        new_segment_id=lambda: f"seg-{next(ids)}",
    )


_peer_ids = itertools.count(1)


def make_peer(
    reg: Registry,
    uid: int = OWNER_UID,
    gid: int = OWNER_GID,
    groups: frozenset[int] = frozenset(),
    operator: bool = False,
) -> Peer:
    pid = next(_peer_ids)
    peer = Peer(
        id=pid, pid=10_000 + pid, uid=uid, gid=gid, groups=groups, operator=operator, connected=T0
    )
    reg.connect(peer)
    return peer


def create_req(name: str = "s", size: int = 4096, **kw: Any) -> wire.Create:
    return wire.Create.model_validate({"id": 1, "op": "create", "name": name, "size": size, **kw})


def open_req(name: str = "s", rid: int = 2, **kw: Any) -> wire.Open:
    return wire.Open.model_validate({"id": rid, "op": "open", "name": name, **kw})


def create(reg: Registry, peer: Peer, name: str = "s", now: float = T0, **kw: Any) -> Grant:
    plan = reg.check_create(peer, create_req(name, **kw), now)
    assert isinstance(plan, CreatePlan)
    return reg.commit_create(plan, now)


def open_(reg: Registry, peer: Peer, name: str = "s", now: float = T0, **kw: Any) -> Grant:
    grant = reg.open(peer, open_req(name, **kw), now)
    assert isinstance(grant, Grant)
    return grant


def refused(num: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> BrokerError:
    with pytest.raises(BrokerError) as info:
        fn(*args, **kw)
    assert info.value.errno == num, (errno.errorcode[info.value.errno or 0], info.value)
    return info.value


def summary(effects: list[Effect]) -> list[str]:
    """Effects in order, as short words: event names, 'unlink', 'arm:<delay>', ..."""
    out: list[str] = []
    for eff in effects:
        if isinstance(eff, Publish):
            out.append(eff.event)
        elif isinstance(eff, Unlink):
            out.append("unlink")
        elif isinstance(eff, ArmTimer):
            out.append(f"arm:{eff.delay:g}")
        elif isinstance(eff, SealBacking):
            out.append("seal-backing")
        else:
            out.append(f"waitdone:{eff.waiter}")
    return out


# -- the lifetime table -------------------------------------------------------------

LIFETIMES: dict[str, dict[str, Any]] = {
    "persistent": {"lifetime": "persistent"},
    "owner": {"lifetime": "owner"},
    "refcount": {"lifetime": "refcount"},
    "ttl5": {"lifetime": "ttl", "ttl": 5},
    "ttl0": {"lifetime": "ttl", "ttl": 0},
}

#: event -> the steps that make it happen (A created the segment, B opened it rw).
EVENTS: dict[str, list[str]] = {
    "creator-releases": ["release A"],
    "other-releases": ["release B"],
    "creator-then-other-release": ["release A", "release B"],
    "other-then-creator-release": ["release B", "release A"],
    "creator-disconnects": ["disconnect A"],
    "other-disconnects": ["disconnect B"],
    "both-disconnect": ["disconnect B", "disconnect A"],
    "delete-while-leased": ["delete A"],
    "delete-then-all-release": ["delete A", "release A", "release B"],
    "timer-fires-current-generation": ["release A", "release B", "fire last"],
    "timer-fires-stale-after-new-open": ["release A", "release B", "open C", "fire first"],
    "new-open-then-release-rearms": [
        "release A",
        "release B",
        "open C",
        "release C",
        "fire first",
        "fire last",
    ],
}

R, U, D, X, OPN = "released", "unlink", "deleted", "expired", "opened"
ARM5 = "arm:5"
GONE_OWNER_ALL = [R, U, D, R]  # owner: gone with the creator's lease
GONE_LAST = [R, R, U, D]  # refcount (and owner when the creator goes last)

# (lifetime, event) -> (effects, live at the end, leases on the segment at the end)
EXPECTED: dict[tuple[str, str], tuple[list[str], bool, int]] = {
    # persistent: only delete removes it
    ("persistent", "creator-releases"): ([R], True, 1),
    ("persistent", "other-releases"): ([R], True, 1),
    ("persistent", "creator-then-other-release"): ([R, R], True, 0),
    ("persistent", "other-then-creator-release"): ([R, R], True, 0),
    ("persistent", "creator-disconnects"): ([R], True, 1),
    ("persistent", "other-disconnects"): ([R], True, 1),
    ("persistent", "both-disconnect"): ([R, R], True, 0),
    ("persistent", "delete-while-leased"): ([U, D], False, 2),
    ("persistent", "delete-then-all-release"): ([U, D, R, R], False, 0),
    ("persistent", "timer-fires-current-generation"): ([R, R], True, 0),
    ("persistent", "timer-fires-stale-after-new-open"): ([R, R, OPN], True, 1),
    ("persistent", "new-open-then-release-rearms"): ([R, R, OPN, R], True, 0),
    # owner: the creating lease decides
    ("owner", "creator-releases"): ([R, U, D], False, 1),
    ("owner", "other-releases"): ([R], True, 1),
    ("owner", "creator-then-other-release"): (GONE_OWNER_ALL, False, 0),
    ("owner", "other-then-creator-release"): (GONE_LAST, False, 0),
    ("owner", "creator-disconnects"): ([R, U, D], False, 1),
    ("owner", "other-disconnects"): ([R], True, 1),
    ("owner", "both-disconnect"): (GONE_LAST, False, 0),
    ("owner", "delete-while-leased"): ([U, D], False, 2),
    ("owner", "delete-then-all-release"): ([U, D, R, R], False, 0),
    ("owner", "timer-fires-current-generation"): (GONE_OWNER_ALL, False, 0),
    ("owner", "timer-fires-stale-after-new-open"): ([*GONE_OWNER_ALL, "ENOENT"], False, 0),
    ("owner", "new-open-then-release-rearms"): ([*GONE_OWNER_ALL, "ENOENT"], False, 0),
    # refcount: the last lease decides
    ("refcount", "creator-releases"): ([R], True, 1),
    ("refcount", "other-releases"): ([R], True, 1),
    ("refcount", "creator-then-other-release"): (GONE_LAST, False, 0),
    ("refcount", "other-then-creator-release"): (GONE_LAST, False, 0),
    ("refcount", "creator-disconnects"): ([R], True, 1),
    ("refcount", "other-disconnects"): ([R], True, 1),
    ("refcount", "both-disconnect"): (GONE_LAST, False, 0),
    ("refcount", "delete-while-leased"): ([U, D], False, 2),
    ("refcount", "delete-then-all-release"): ([U, D, R, R], False, 0),
    ("refcount", "timer-fires-current-generation"): (GONE_LAST, False, 0),
    ("refcount", "timer-fires-stale-after-new-open"): ([*GONE_LAST, "ENOENT"], False, 0),
    ("refcount", "new-open-then-release-rearms"): ([*GONE_LAST, "ENOENT"], False, 0),
    # ttl 5: a countdown after the last lease; a new lease cancels it
    ("ttl5", "creator-releases"): ([R], True, 1),
    ("ttl5", "other-releases"): ([R], True, 1),
    ("ttl5", "creator-then-other-release"): ([R, R, ARM5], True, 0),
    ("ttl5", "other-then-creator-release"): ([R, R, ARM5], True, 0),
    ("ttl5", "creator-disconnects"): ([R], True, 1),
    ("ttl5", "other-disconnects"): ([R], True, 1),
    ("ttl5", "both-disconnect"): ([R, R, ARM5], True, 0),
    ("ttl5", "delete-while-leased"): ([U, D], False, 2),
    ("ttl5", "delete-then-all-release"): ([U, D, R, R], False, 0),  # no countdown once deleted
    ("ttl5", "timer-fires-current-generation"): ([R, R, ARM5, U, X], False, 0),
    ("ttl5", "timer-fires-stale-after-new-open"): ([R, R, ARM5, OPN], True, 1),
    ("ttl5", "new-open-then-release-rearms"): ([R, R, ARM5, OPN, R, ARM5, U, X], False, 0),
    # ttl 0: expires the moment the last lease ends
    ("ttl0", "creator-releases"): ([R], True, 1),
    ("ttl0", "other-releases"): ([R], True, 1),
    ("ttl0", "creator-then-other-release"): ([R, R, U, X], False, 0),
    ("ttl0", "other-then-creator-release"): ([R, R, U, X], False, 0),
    ("ttl0", "creator-disconnects"): ([R], True, 1),
    ("ttl0", "other-disconnects"): ([R], True, 1),
    ("ttl0", "both-disconnect"): ([R, R, U, X], False, 0),
    ("ttl0", "delete-while-leased"): ([U, D], False, 2),
    ("ttl0", "delete-then-all-release"): ([U, D, R, R], False, 0),
    ("ttl0", "timer-fires-current-generation"): ([R, R, U, X], False, 0),
    ("ttl0", "timer-fires-stale-after-new-open"): ([R, R, U, X, "ENOENT"], False, 0),
    ("ttl0", "new-open-then-release-rearms"): ([R, R, U, X, "ENOENT"], False, 0),
}


def test_lifetime_table_is_complete() -> None:
    assert set(EXPECTED) == set(itertools.product(LIFETIMES, EVENTS))


@pytest.mark.parametrize(
    ("lifetime", "event"), sorted(EXPECTED), ids=[f"{lt}-{ev}" for lt, ev in sorted(EXPECTED)]
)
def test_lifetime_table(lifetime: str, event: str) -> None:
    want_effects, want_live, want_leases = EXPECTED[(lifetime, event)]
    reg = make_registry()
    a, b, c = make_peer(reg), make_peer(reg), make_peer(reg)
    peers = {"A": a, "B": b, "C": c}
    ga = create(reg, a, mode=0o644, **LIFETIMES[lifetime])
    seg = ga.segment
    gb = open_(reg, b, access="rw")
    assert summary(reg.drain()) == ["created", "opened"]
    assert len(seg.leases) == 2
    tokens = {"A": ga.lease, "B": gb.lease}

    got: list[str] = []
    arms: list[ArmTimer] = []
    for step in EVENTS[event]:
        verb, who = step.split()
        if verb == "release":
            if who in tokens:
                reg.release(peers[who], tokens.pop(who), T0 + 1)
        elif verb == "disconnect":
            reg.disconnect(peers[who].id, T0 + 1)
            tokens.pop(who, None)
        elif verb == "delete":
            reg.delete(peers[who], "s")
        elif verb == "open":
            try:
                tokens[who] = open_(reg, peers[who], now=T0 + 2).lease
            except BrokerError as exc:
                got.append(errno.errorcode[exc.errno or 0])
        elif verb == "fire":
            gen = (arms[0] if who == "first" else arms[-1]).generation if arms else 0
            reg.expire(seg.id, gen, T0 + 10)
        effects = reg.drain()
        arms += [e for e in effects if isinstance(e, ArmTimer)]
        got += summary(effects)

    assert got == want_effects
    assert seg.live is want_live
    assert ("s" in reg.segments) is want_live
    assert len(seg.leases) == want_leases
    assert reg.total_bytes == (4096 if want_live else 0)
    # every lease still held is in the registry's table and its peer's set
    for who, token in tokens.items():
        assert token in seg.leases
        assert token in peers[who].leases
        assert reg.leases[token].segment is seg
    assert len(reg.leases) == want_leases
    for arm in arms:
        assert arm.segment_id == seg.id
    if want_live:
        assert reg.stat(a, "s") is seg
    else:
        refused(errno.ENOENT, reg.stat, a, "s")
        refused(errno.ENOENT, reg.open, c, open_req(), T0 + 20)
        # the registry forgets a dead segment once no lease names it
        assert (seg.id in reg.by_id) is bool(seg.leases)


def test_ttl_timer_generations_and_stray_timers() -> None:
    reg = make_registry()
    a, b = make_peer(reg), make_peer(reg)
    g = create(reg, a, lifetime="ttl", ttl=2.5)
    seg = g.segment
    reg.release(a, g.lease, T0 + 1)
    (arm1,) = [e for e in reg.drain() if isinstance(e, ArmTimer)]
    assert (arm1.segment_id, arm1.delay) == (seg.id, 2.5)
    lease = open_(reg, b, now=T0 + 2).lease  # cancels the countdown
    reg.release(b, lease, T0 + 3)
    (arm2,) = [e for e in reg.drain() if isinstance(e, ArmTimer)]
    assert arm2.generation != arm1.generation
    # stale generation, unknown segment id, wrong generation: nothing happens
    reg.expire(seg.id, arm1.generation, T0 + 4)
    reg.expire("seg-unknown", arm2.generation, T0 + 4)
    reg.expire(seg.id, arm2.generation + 1, T0 + 4)
    assert reg.drain() == []
    assert seg.live
    reg.expire(seg.id, arm2.generation, T0 + 6)
    effects = reg.drain()
    assert summary(effects) == [U, X]
    (pub,) = [e for e in effects if isinstance(e, Publish)]
    assert (pub.name, pub.size, pub.uid, pub.pid) == ("s", 4096, None, None)
    # the same timer firing twice does nothing more
    reg.expire(seg.id, arm2.generation, T0 + 7)
    assert reg.drain() == []


def test_ttl_timer_after_delete_does_nothing() -> None:
    reg = make_registry()
    a = make_peer(reg)
    g = create(reg, a, lifetime="ttl", ttl=9, mode=0o600)
    reg.release(a, g.lease, T0)
    (arm,) = [e for e in reg.drain() if isinstance(e, ArmTimer)]
    reg.delete(a, "s")
    assert summary(reg.drain()) == [U, D]
    g2 = create(reg, a, lifetime="ttl", ttl=9)  # same name, a new segment
    reg.drain()
    reg.expire(arm.segment_id, arm.generation, T0 + 9)
    assert reg.drain() == []
    assert g2.segment.live


def test_owner_segment_survives_the_creators_other_leases() -> None:
    reg = make_registry()
    a = make_peer(reg)
    g = create(reg, a, lifetime="owner")
    second = open_(reg, a, access="rw")
    reg.release(a, second.lease, T0)
    assert g.segment.live
    reg.release(a, g.lease, T0)
    assert not g.segment.live


def test_events_carry_the_acting_peer() -> None:
    reg = make_registry()
    a, b = make_peer(reg, uid=1000), make_peer(reg, uid=2000, gid=2000)
    create(reg, a, mode=0o644)
    open_(reg, b)
    reg.disconnect(b.id, T0)
    reg.disconnect(a.id, T0)
    pubs = [e for e in reg.drain() if isinstance(e, Publish)]
    assert [(p.event, p.uid, p.pid) for p in pubs] == [
        ("created", 1000, a.pid),
        ("opened", 2000, b.pid),
        ("released", 2000, b.pid),
        ("released", 1000, a.pid),
        ("deleted", 1000, a.pid),
    ]
    assert {(p.name, p.size) for p in pubs} == {("s", 4096)}


def test_disconnect_releases_every_lease_of_the_peer_only() -> None:
    reg = make_registry()
    a, b = make_peer(reg), make_peer(reg)
    ga = create(reg, a, "one")
    create(reg, a, "two", lifetime="persistent")
    gb = open_(reg, b, "one")
    reg.disconnect(a.id, T0)
    assert a.leases == set()
    assert set(reg.leases) == {gb.lease}
    assert reg.segments["one"].leases == {gb.lease}
    assert reg.segments["two"].leases == set()
    assert ga.segment.live
    assert a.id not in reg.peers
    reg.disconnect(a.id, T0)  # twice: harmless
    reg.disconnect(999, T0)  # unknown: harmless


# -- permissions ------------------------------------------------------------------


def _who(reg: Registry, who: str) -> Peer:
    return {
        "owner": lambda: make_peer(reg, uid=OWNER_UID, gid=OWNER_GID),
        "group": lambda: make_peer(reg, uid=2000, gid=OWNER_GID),
        "supplementary": lambda: make_peer(
            reg, uid=2001, gid=3000, groups=frozenset({5, OWNER_GID})
        ),
        "other": lambda: make_peer(reg, uid=3000, gid=3000, groups=frozenset({5, 6})),
        "operator": lambda: make_peer(reg, uid=0, gid=0, operator=True),
        # the operator flag is the daemon's decision; without it uid 0 is just "other"
        "uid0-not-operator": lambda: make_peer(reg, uid=0, gid=0, operator=False),
    }[who]()


_CLASS_SHIFT = {
    "owner": 6,
    "group": 3,
    "supplementary": 3,
    "other": 0,
    "uid0-not-operator": 0,
}
MODES = [
    0o000,
    0o400,
    0o200,
    0o600,
    0o640,
    0o660,
    0o604,
    0o606,
    0o044,
    0o066,
    0o004,
    0o002,
    0o460,
    0o777,
]
OPS = ["open-ro", "open-rw", "stat", "seal", "delete"]


def _do(reg: Registry, peer: Peer, op: str) -> None:
    if op == "open-ro":
        assert open_(reg, peer).access == "ro"
    elif op == "open-rw":
        assert open_(reg, peer, access="rw").access == "rw"
    elif op == "stat":
        assert reg.stat(peer, "s").name == "s"
    elif op == "seal":
        assert reg.seal(peer, "s").sealed
    else:
        reg.delete(peer, "s")
        assert "s" not in reg.segments


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m:03o}")
@pytest.mark.parametrize("who", [*_CLASS_SHIFT, "operator"])
def test_mode_bits_decide_per_class(mode: int, who: str) -> None:
    for op in OPS:
        reg = make_registry()
        owner = make_peer(reg)
        g = create(reg, owner, mode=mode)
        reg.drain()
        peer = _who(reg, who)
        if who == "operator":
            allowed = True
        else:
            bits = (mode >> _CLASS_SHIFT[who]) & 7
            allowed = bool(bits & (2 if op in ("open-rw", "seal", "delete") else 4))
        if allowed:
            _do(reg, peer, op)
        else:
            exc = refused(errno.EACCES, _do, reg, peer, op)
            assert isinstance(exc, PermissionError)
            assert reg.drain() == [], op
            assert peer.leases == set()
            assert g.segment.live
            assert g.segment.leases == {g.lease}


def test_owner_class_wins_over_group_bits() -> None:
    # 0o460: the owner may only read even though the group may write, as for a file
    reg = make_registry()
    owner = make_peer(reg)
    create(reg, owner, mode=0o460)
    refused(errno.EACCES, reg.open, owner, open_req(access="rw"), T0)
    member = make_peer(reg, uid=2000, gid=OWNER_GID)
    assert open_(reg, member, access="rw").access == "rw"


def test_creator_may_create_a_segment_it_cannot_open() -> None:
    reg = make_registry()
    owner = make_peer(reg)
    g = create(reg, owner, mode=0)
    assert g.access == "rw"
    refused(errno.EACCES, reg.stat, owner, "s")


def test_seal_then_rw_open_is_eperm_and_ro_is_fine() -> None:
    reg = make_registry()
    a, op = make_peer(reg), make_peer(reg, uid=0, gid=0, operator=True)
    g = create(reg, a, mode=0o600, backing="shm")
    reg.drain()
    assert reg.seal(a, "s") is g.segment
    assert summary(reg.drain()) == ["sealed"]
    assert g.segment.sealed
    assert g.segment.describe()["sealed"] is True
    exc = refused(errno.EPERM, reg.open, a, open_req(access="rw"), T0)
    assert isinstance(exc, PermissionError)
    refused(errno.EPERM, reg.open, op, open_req(access="rw"), T0)  # operators too
    refused(errno.EPERM, reg.check_create, a, create_req(exist_ok=True), T0)
    assert open_(reg, a).access == "ro"
    assert open_(reg, op).access == "ro"
    reg.drain()
    reg.seal(a, "s")  # sealing again: no second event
    assert reg.drain() == []
    # the writable lease granted before the seal is not taken away
    assert reg.leases[g.lease].access == "rw"


def test_abandon_takes_back_a_segment_as_if_never_made() -> None:
    reg = make_registry()
    peer = make_peer(reg)
    g = create(reg, peer, lifetime="persistent")
    reg.drain()
    reg.release(peer, g.lease, T0)
    reg.abandon(g.segment)
    assert "s" not in reg.segments
    assert any(isinstance(e, Unlink) and e.segment is g.segment for e in reg.drain())
    assert reg.total_bytes == 0
    reg.abandon(g.segment)  # gone already: nothing more
    assert not reg.drain()
    create(reg, peer)  # the name is free


def test_seal_drops_the_cached_encoding_of_the_segment() -> None:
    reg = make_registry()
    peer = make_peer(reg)
    g = create(reg, peer)
    g.segment.head = b"stale"
    reg.seal(peer, g.segment.name)
    assert g.segment.head is None


def test_lease_tokens_are_distinct_192_bit_urlsafe_strings() -> None:
    source = TokenSource()
    tokens = [source.next() for _ in range(3 * 170 + 5)]  # across pool refills
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert len(token) == 32
        assert len(base64.urlsafe_b64decode(token)) == 24


def test_seal_of_a_memfd_asks_the_edge_to_seal_the_backing() -> None:
    reg = make_registry()
    a = make_peer(reg)
    g = create(reg, a, backing="memfd")
    reg.drain()
    reg.seal(a, "s")
    effects = reg.drain()
    assert summary(effects) == ["seal-backing", "sealed"]
    assert effects[0].segment is g.segment  # type: ignore[union-attr]


def test_seal_delete_stat_of_a_missing_name_is_enoent() -> None:
    reg = make_registry()
    a = make_peer(reg)
    for fn in (reg.seal, reg.delete, reg.stat):
        refused(errno.ENOENT, fn, a, "nope")
    refused(errno.ENOENT, reg.open, a, open_req("nope"), T0)


# -- create: exist_ok, limits --------------------------------------------------------


def test_create_of_an_existing_name_is_eexist() -> None:
    reg = make_registry()
    a = make_peer(reg)
    create(reg, a)
    reg.drain()
    exc = refused(errno.EEXIST, reg.check_create, a, create_req(), T0)
    assert isinstance(exc, FileExistsError)
    assert reg.drain() == []


def test_exist_ok_same_size_grants_rw_and_emits_opened() -> None:
    reg = make_registry()
    a, b = make_peer(reg), make_peer(reg)
    g1 = create(reg, a, mode=0o600, lifetime="owner")
    reg.drain()
    g2 = reg.check_create(b, create_req(exist_ok=True, lifetime="persistent", mode=0o777), T0)
    assert isinstance(g2, Grant)
    assert (g2.access, g2.fd) == ("rw", True)
    assert g2.segment is g1.segment
    assert g2.lease != g1.lease
    assert g1.segment.leases == {g1.lease, g2.lease}
    assert summary(reg.drain()) == ["opened"]
    # the existing segment keeps its own lifetime and mode
    assert (g1.segment.lifetime, g1.segment.mode) == ("owner", 0o600)
    # b's lease is not the creator's: releasing it leaves the owner segment
    reg.release(b, g2.lease, T0)
    assert g1.segment.live


def test_exist_ok_other_size_is_eexist() -> None:
    reg = make_registry()
    a = make_peer(reg)
    g = create(reg, a, size=4096)
    refused(errno.EEXIST, reg.check_create, a, create_req(size=8192, exist_ok=True), T0)
    assert g.segment.leases == {g.lease}


def test_exist_ok_needs_write_permission() -> None:
    reg = make_registry()
    a, other = make_peer(reg), make_peer(reg, uid=3000, gid=3000)
    create(reg, a, mode=0o644)
    refused(errno.EACCES, reg.check_create, other, create_req(exist_ok=True), T0)


def test_max_segments_is_enospc_and_frees_on_delete() -> None:
    reg = make_registry(max_segments=2)
    a = make_peer(reg)
    create(reg, a, "one")
    create(reg, a, "two")
    refused(errno.ENOSPC, reg.check_create, a, create_req("three"), T0)
    reg.delete(a, "one")
    create(reg, a, "three")


def test_max_total_bytes_is_enospc_and_frees_on_unlink() -> None:
    reg = make_registry(max_total_bytes=10_000)
    a = make_peer(reg)
    g = create(reg, a, "one", size=6000)
    refused(errno.ENOSPC, reg.check_create, a, create_req("two", size=4001), T0)
    create(reg, a, "two", size=4000)  # exactly at the limit
    assert reg.total_bytes == 10_000
    refused(errno.ENOSPC, reg.check_create, a, create_req("three", size=1), T0)
    reg.release(a, g.lease, T0)  # refcount: unlinked, its bytes come back
    assert reg.total_bytes == 4000
    create(reg, a, "three", size=6000)


def test_over_max_segment_size_is_einval() -> None:
    reg = make_registry(max_segment_size=1 << 16)
    a = make_peer(reg)
    create(reg, a, "ok", size=1 << 16)
    refused(errno.EINVAL, reg.check_create, a, create_req("big", size=(1 << 16) + 1), T0)


@pytest.mark.parametrize(
    ("backing", "lifetime", "memfd_persistent", "ok"),
    [
        ("memfd", "persistent", False, False),
        ("memfd", "persistent", True, True),
        ("shm", "persistent", False, True),
        ("memfd", "refcount", False, True),
        ("memfd", "owner", False, True),
    ],
)
def test_memfd_persistent_needs_the_fd_store(
    backing: str, lifetime: str, memfd_persistent: bool, ok: bool
) -> None:
    reg = make_registry(memfd_persistent=memfd_persistent)
    a = make_peer(reg)
    req = create_req(backing=backing, lifetime=lifetime)
    if ok:
        assert isinstance(reg.check_create(a, req, T0), CreatePlan)
    else:
        refused(errno.EOPNOTSUPP, reg.check_create, a, req, T0)


def test_check_create_has_no_effect_until_commit() -> None:
    reg = make_registry()
    a = make_peer(reg)
    plan = reg.check_create(a, create_req(), T0)
    assert isinstance(plan, CreatePlan)
    assert reg.segments == {}
    assert reg.total_bytes == 0
    assert reg.drain() == []
    g = reg.commit_create(plan, T0 + 1)
    assert g.segment.id == plan.segment_id
    assert g.segment.created == T0 + 1
    assert (g.segment.owner_uid, g.segment.owner_gid) == (a.uid, a.gid)
    assert wire.SegmentInfo.model_validate(g.segment.describe()).leases == 1


# -- leases -------------------------------------------------------------------------


def test_release_of_another_connections_lease_is_enoent() -> None:
    reg = make_registry()
    a, b = make_peer(reg), make_peer(reg)
    g = create(reg, a)
    exc = refused(errno.ENOENT, reg.release, b, g.lease, T0)
    assert isinstance(exc, FileNotFoundError)
    assert g.lease in reg.leases
    assert g.segment.live
    refused(errno.ENOENT, reg.release, a, "tok-unknown", T0)
    reg.release(a, g.lease, T0)
    refused(errno.ENOENT, reg.release, a, g.lease, T0)  # twice


def test_lease_outlives_deletion_and_releasing_it_succeeds() -> None:
    reg = make_registry()
    a, b = make_peer(reg), make_peer(reg)
    ga = create(reg, a, lifetime="persistent")
    gb = open_(reg, b)
    old = ga.segment
    reg.delete(a, "s")
    reg.drain()
    assert old.id in reg.by_id  # leases still name it
    reg.release(b, gb.lease, T0)
    assert summary(reg.drain()) == [R]  # no second unlink
    reg.release(a, ga.lease, T0)
    assert summary(reg.drain()) == [R]
    assert old.id not in reg.by_id
    assert reg.leases == {}


def test_name_can_be_created_again_at_once_with_a_new_id() -> None:
    reg = make_registry()
    a, b = make_peer(reg), make_peer(reg)
    old = create(reg, a, lifetime="refcount")
    reg.delete(a, "s")
    new = create(reg, b, lifetime="refcount")
    assert new.segment.id != old.segment.id
    assert reg.segments["s"] is new.segment
    reg.drain()
    # the old lease ending must not touch the new segment of the same name
    reg.release(a, old.lease, T0)
    assert summary(reg.drain()) == [R]
    assert new.segment.live
    assert reg.stat(b, "s") is new.segment
    assert new.segment.leases == {new.lease}


def test_segment_ids_are_never_reused() -> None:
    reg = make_registry()
    a = make_peer(reg)
    seen = set()
    for _ in range(5):
        g = create(reg, a)
        assert g.segment.id not in seen
        seen.add(g.segment.id)
        reg.release(a, g.lease, T0)


def test_open_fd_false_grants_a_lease_without_fd() -> None:
    reg = make_registry()
    a = make_peer(reg)
    create(reg, a)
    g = open_(reg, a, fd=False)
    assert (g.fd, g.access) == (False, "ro")
    assert g.lease in reg.leases


# -- open with wait -------------------------------------------------------------------


def test_waiter_is_woken_by_create_with_a_grant() -> None:
    reg = make_registry()
    w, c = make_peer(reg), make_peer(reg)
    out = reg.open(w, open_req(rid=77, wait=5, access="rw", fd=False), T0)
    assert isinstance(out, Waiting)
    assert out.timeout == 5
    assert reg.waiting(w.id) == 1
    assert reg.drain() == []
    g = create(reg, c, mode=0o600)
    effects = reg.drain()
    assert summary(effects) == ["created", "opened", f"waitdone:{out.waiter}"]
    done = effects[-1]
    assert isinstance(done, WaitDone)
    assert (done.peer, done.waiter, done.request_id, done.error) == (w.id, out.waiter, 77, None)
    assert done.grant is not None
    assert done.grant.segment is g.segment
    assert (done.grant.access, done.grant.fd) == ("rw", False)
    assert done.grant.lease in w.leases
    assert g.segment.leases == {g.lease, done.grant.lease}
    assert reg.waiting(w.id) == 0
    reg.wait_timeout(out.waiter)  # its timer firing late: nothing
    assert reg.drain() == []


def test_several_waiters_woken_in_order_and_other_names_left_waiting() -> None:
    reg = make_registry()
    p1, p2, p3, c = (make_peer(reg) for _ in range(4))
    w1 = reg.open(p1, open_req("x", rid=1, wait=5), T0)
    w2 = reg.open(p2, open_req("x", rid=2, wait=5), T0)
    w3 = reg.open(p3, open_req("y", rid=3, wait=5), T0)
    assert isinstance(w1, Waiting)
    assert isinstance(w2, Waiting)
    assert isinstance(w3, Waiting)
    assert len({w1.waiter, w2.waiter, w3.waiter}) == 3
    create(reg, c, "x")
    dones = [e for e in reg.drain() if isinstance(e, WaitDone)]
    assert [d.request_id for d in dones] == [1, 2]
    assert reg.waiting(p3.id) == 1


def test_waiter_timeout_is_etimedout() -> None:
    reg = make_registry()
    w, c = make_peer(reg), make_peer(reg)
    out = reg.open(w, open_req(rid=9, wait=1.5), T0)
    assert isinstance(out, Waiting)
    reg.wait_timeout(out.waiter)
    (done,) = reg.drain()
    assert isinstance(done, WaitDone)
    assert (done.peer, done.request_id, done.grant) == (w.id, 9, None)
    assert isinstance(done.error, TimeoutError)
    assert done.error.errno == errno.ETIMEDOUT
    assert reg.waiting(w.id) == 0
    create(reg, c)  # too late: nobody is woken
    assert summary(reg.drain()) == ["created"]
    reg.wait_timeout(out.waiter)
    assert reg.drain() == []


def test_wait_zero_on_an_absent_name_is_etimedout_at_once() -> None:
    reg = make_registry()
    a = make_peer(reg)
    exc = refused(errno.ETIMEDOUT, reg.open, a, open_req(wait=0), T0)
    assert isinstance(exc, TimeoutError)
    assert reg.waiting(a.id) == 0
    create(reg, a)
    assert isinstance(reg.open(a, open_req(wait=0), T0), Grant)


def test_open_without_wait_on_an_absent_name_is_enoent() -> None:
    reg = make_registry()
    a = make_peer(reg)
    refused(errno.ENOENT, reg.open, a, open_req(), T0)
    assert reg.waiting(a.id) == 0


def test_wait_over_max_wait_is_einval() -> None:
    reg = make_registry(max_wait=10.0)
    a = make_peer(reg)
    refused(errno.EINVAL, reg.open, a, open_req(wait=10.5), T0)
    assert reg.waiting(a.id) == 0
    out = reg.open(a, open_req(wait=10.0), T0)  # the bound itself is fine
    assert isinstance(out, Waiting)


def test_wait_over_max_wait_is_einval_even_when_the_segment_exists() -> None:
    """PROTOCOL.md: `wait` ranges over 0..limits.max_wait; out of range is EINVAL.

    The answer to a bad parameter must not depend on whether the name exists.
    """
    reg = make_registry(max_wait=10.0)
    a = make_peer(reg)
    create(reg, a)
    refused(errno.EINVAL, reg.open, a, open_req(wait=11), T0)


def test_waiter_failing_the_mode_check_at_wake_gets_eacces() -> None:
    reg = make_registry()
    creator = make_peer(reg, uid=1000, gid=1000)
    stranger = make_peer(reg, uid=3000, gid=3000)
    reader = make_peer(reg, uid=2000, gid=1000)
    ws = reg.open(stranger, open_req(rid=5, wait=5), T0)
    wr = reg.open(reader, open_req(rid=6, wait=5, access="rw"), T0)
    assert isinstance(ws, Waiting)
    assert isinstance(wr, Waiting)
    create(reg, creator, mode=0o640)
    dones = {e.request_id: e for e in reg.drain() if isinstance(e, WaitDone)}
    assert set(dones) == {5, 6}
    for rid in (5, 6):  # other: no bits; group: r but not w
        assert dones[rid].grant is None
        assert isinstance(dones[rid].error, PermissionError)
        assert dones[rid].error.errno == errno.EACCES  # type: ignore[union-attr]
    assert stranger.leases == set()
    assert reader.leases == set()
    assert reg.waiting(stranger.id) == reg.waiting(reader.id) == 0


def test_disconnect_drops_waiters() -> None:
    reg = make_registry()
    w, c = make_peer(reg), make_peer(reg)
    out = reg.open(w, open_req(wait=5), T0)
    assert isinstance(out, Waiting)
    reg.open(w, open_req("other", wait=5), T0)
    reg.disconnect(w.id, T0)
    assert reg.waiting(w.id) == 0
    create(reg, c)
    assert summary(reg.drain()) == ["created"]
    reg.wait_timeout(out.waiter)
    assert reg.drain() == []


# -- list ------------------------------------------------------------------------


def _names(page: list[SegmentRecord]) -> list[str]:
    return [s.name for s in page]


def test_list_for_a_peer_that_may_read_little_scans_a_bounded_number_of_names() -> None:
    from shmbrokerd import registry

    reg = make_registry(max_segments=3 * registry.LIST_SCAN, max_total_bytes=1 << 40)
    owner, other = make_peer(reg), make_peer(reg, uid=2000, gid=2000)
    readable = {f"n/{i:06d}" for i in (5, 2 * registry.LIST_SCAN + 7)}
    for i in range(2 * registry.LIST_SCAN + 10):
        name = f"n/{i:06d}"
        create(reg, owner, name, size=1, mode=0o644 if name in readable else 0o600)
    checks = 0
    may = reg.may

    def counting(*args: Any, **kwargs: Any) -> bool:
        nonlocal checks
        checks += 1
        return may(*args, **kwargs)

    reg.may = counting
    found: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        checks = 0
        page, after = reg.list_page(other, "n/", after, 100)
        assert checks <= registry.LIST_SCAN  # one request never looks at them all
        found += _names(page)
        pages += 1
        if after is None:
            break
    assert set(found) == readable  # and paging still finds every one, in order
    assert found == sorted(found)
    assert pages >= 3


def test_list_pages_by_prefix_after_and_limit() -> None:
    reg = make_registry()
    a = make_peer(reg)
    for name in ["c", "b/2", "a", "b/3", "ba", "b/1"]:  # not in name order
        create(reg, a, name, mode=0o644)
    assert reg.list_page(a, None, None, 100) == (
        [reg.segments[n] for n in ["a", "b/1", "b/2", "b/3", "ba", "c"]],
        None,
    )
    page, nxt = reg.list_page(a, "b/", None, 2)
    assert (_names(page), nxt) == (["b/1", "b/2"], "b/2")
    page, nxt = reg.list_page(a, "b/", nxt, 2)
    assert (_names(page), nxt) == (["b/3"], None)
    # exactly a full page and nothing after: no useless cursor
    page, nxt = reg.list_page(a, "b/", None, 3)
    assert (_names(page), nxt) == (["b/1", "b/2", "b/3"], None)
    assert _names(reg.list_page(a, "b", None, 100)[0]) == ["b/1", "b/2", "b/3", "ba"]
    assert _names(reg.list_page(a, None, "b/2", 100)[0]) == ["b/3", "ba", "c"]
    assert _names(reg.list_page(a, None, "b/25", 100)[0]) == ["b/3", "ba", "c"]  # need not exist
    assert _names(reg.list_page(a, "b/", "a", 100)[0]) == ["b/1", "b/2", "b/3"]
    assert reg.list_page(a, None, "z", 100) == ([], None)
    assert reg.list_page(a, "zz", None, 100) == ([], None)
    assert reg.list_page(a, "", None, 1) == ([reg.segments["a"]], "a")


def test_list_leaves_out_deleted_segments() -> None:
    reg = make_registry()
    a = make_peer(reg)
    create(reg, a, "x", mode=0o644, lifetime="persistent")
    create(reg, a, "y", mode=0o644)
    reg.delete(a, "x")
    assert _names(reg.list_page(a, None, None, 100)[0]) == ["y"]


def test_list_shows_non_operators_only_readable_segments() -> None:
    reg = make_registry()
    owner = make_peer(reg, uid=1000, gid=1000)
    member = make_peer(reg, uid=2000, gid=1000)
    other = make_peer(reg, uid=3000, gid=3000)
    operator = make_peer(reg, uid=0, gid=0, operator=True)
    modes = {"n/0": 0o600, "n/1": 0o640, "n/2": 0o604, "n/3": 0o000, "n/4": 0o644, "n/5": 0o200}
    for name, mode in modes.items():
        create(reg, owner, name, mode=mode)

    def all_pages(peer: Peer, limit: int) -> list[str]:
        out: list[str] = []
        after = None
        while True:
            page, after = reg.list_page(peer, "n/", after, limit)
            assert len(page) <= limit
            out += _names(page)
            if after is None:
                return out
            assert page
            assert after == page[-1].name

    want = [
        (owner, ["n/0", "n/1", "n/2", "n/4"]),
        (member, ["n/1", "n/4"]),
        (other, ["n/2", "n/4"]),
        (operator, sorted(modes)),
    ]
    for peer, names in want:
        for limit in (1, 2, 3, 100):
            assert all_pages(peer, limit) == names, (peer.uid, limit)


# -- restart: shutdown, restore, reclaim -------------------------------------------------


def _restored(
    seg_id: str, name: str, lifetime: str, ttl: float | None = None, **kw: Any
) -> SegmentRecord:
    return SegmentRecord(
        id=seg_id,
        name=name,
        size=4096,
        lifetime=lifetime,
        ttl=ttl,
        backing="shm",
        mode=0o600,
        created=T0 - 100,
        owner_uid=1000,
        owner_gid=1000,
        **kw,
    )


def _restart_registry(window: float = 30.0) -> Registry:
    reg = make_registry()
    reg.restore(_restored("old-1", "keep", "persistent"), [("t-p", 1000, "rw", True)])
    reg.restore(
        _restored("old-2", "rc", "refcount"),
        [("t-rc1", 1000, "rw", True), ("t-rc2", 2000, "ro", False)],
    )
    reg.restore(_restored("old-3", "own", "owner"), [("t-own", 1000, "rw", True)])
    reg.restore(_restored("old-4", "tt", "ttl", ttl=7.0), [("t-tt", 1000, "ro", False)])
    reg.open_reclaim_window(T0, window)
    return reg


def test_restore_puts_segments_and_unreclaimed_leases_back() -> None:
    reg = _restart_registry()
    assert reg.drain() == []
    assert sorted(reg.segments) == ["keep", "own", "rc", "tt"]
    assert reg.unreclaimed() == 5
    assert reg.total_bytes == 4 * 4096
    assert reg.segments["rc"].leases == {"t-rc1", "t-rc2"}
    assert reg.segments["own"].creator_lease == "t-own"


def test_reclaim_by_the_right_uid_in_the_window() -> None:
    reg = _restart_registry()
    p = make_peer(reg, uid=1000)
    g = reg.reclaim(p, "t-rc1", T0 + 29)
    assert (g.lease, g.access, g.fd) == ("t-rc1", "rw", False)
    assert g.segment is reg.segments["rc"]
    assert "t-rc1" in p.leases
    assert reg.unreclaimed() == 4
    # reclaimed once: nobody can reclaim it again, not even the same uid
    q = make_peer(reg, uid=1000)
    refused(errno.ENOENT, reg.reclaim, q, "t-rc1", T0 + 29)
    refused(errno.ENOENT, reg.reclaim, p, "t-rc1", T0 + 29)
    # and it is a lease like any other: its holder releases it
    reg.release(p, "t-rc1", T0 + 29)
    assert reg.segments["rc"].leases == {"t-rc2"}


def test_reclaim_by_another_uid_is_enoent() -> None:
    reg = _restart_registry()
    other = make_peer(reg, uid=2000)
    exc = refused(errno.ENOENT, reg.reclaim, other, "t-p", T0)
    assert isinstance(exc, FileNotFoundError)
    assert reg.unreclaimed() == 5
    assert isinstance(reg.reclaim(other, "t-rc2", T0), Grant)  # its own one works
    # operators are no exception: a lease belongs to a uid
    root = make_peer(reg, uid=0, gid=0, operator=True)
    refused(errno.ENOENT, reg.reclaim, root, "t-p", T0)


def test_reclaim_of_an_unknown_or_live_token_is_enoent() -> None:
    reg = _restart_registry()
    p = make_peer(reg, uid=1000)
    refused(errno.ENOENT, reg.reclaim, p, "t-unknown", T0)
    g = create(reg, p, "fresh")  # a lease of this run is not reclaimable
    refused(errno.ENOENT, reg.reclaim, p, g.lease, T0)


def test_reclaim_after_the_window_is_enoent() -> None:
    reg = _restart_registry(window=30.0)
    p = make_peer(reg, uid=1000)
    refused(errno.ENOENT, reg.reclaim, p, "t-p", T0 + 30.5)
    assert isinstance(reg.reclaim(p, "t-own", T0 + 30), Grant)  # the bound itself


def test_end_reclaim_window_releases_the_rest_and_lifetimes_apply() -> None:
    reg = _restart_registry()
    p = make_peer(reg, uid=2000)
    reg.reclaim(p, "t-rc2", T0 + 1)
    reg.drain()
    reg.end_reclaim_window(T0 + 30)
    effects = reg.drain()
    by_name: dict[str, list[str]] = {}
    for eff in effects:
        if isinstance(eff, Publish):
            name = eff.name
        elif isinstance(eff, ArmTimer):
            name = reg.by_id[eff.segment_id].name
        else:
            name = eff.segment.name  # type: ignore[union-attr]
        by_name.setdefault(name, []).extend(summary([eff]))
    assert by_name == {
        "keep": [R],  # persistent: stays
        "rc": [R],  # refcount: t-rc2 was reclaimed, so it stays
        "own": [R, U, D],  # owner: its creator's lease was not reclaimed
        "tt": [R, "arm:7"],  # ttl: the countdown starts
    }
    assert sorted(reg.segments) == ["keep", "rc", "tt"]
    assert reg.unreclaimed() == 0
    assert set(reg.leases) == {"t-rc2"}
    released = [e for e in effects if isinstance(e, Publish) and e.event == R]
    assert {(e.uid, e.pid) for e in released} == {(None, None)}
    refused(errno.ENOENT, reg.reclaim, make_peer(reg, uid=1000), "t-p", T0 + 1)
    # the reclaimed lease still ends the refcount segment when released
    reg.release(p, "t-rc2", T0 + 31)
    assert summary(reg.drain()) == [R, U, D]


def test_open_reclaim_window_resumes_or_ends_leaseless_segments() -> None:
    reg = make_registry()
    reg.restore(_restored("o-1", "ttl-running", "ttl", ttl=10.0, ttl_deadline=T0 + 4), [])
    reg.restore(_restored("o-2", "ttl-passed", "ttl", ttl=10.0, ttl_deadline=T0 - 1), [])
    reg.restore(_restored("o-3", "rc-empty", "refcount"), [])
    reg.restore(_restored("o-4", "p-empty", "persistent"), [])
    reg.open_reclaim_window(T0, 30.0)
    effects = reg.drain()
    arms = [e for e in effects if isinstance(e, ArmTimer)]
    assert [(e.segment_id, e.delay) for e in arms] == [("o-1", 4.0)]
    unlinked = sorted(e.segment.name for e in effects if isinstance(e, Unlink))
    assert unlinked == ["rc-empty", "ttl-passed"]
    assert sorted(reg.segments) == ["p-empty", "ttl-running"]
    reg.expire("o-1", arms[0].generation, T0 + 4)
    assert summary(reg.drain()) == [U, X]


def test_shutdown_then_restore_round_trip() -> None:
    reg = make_registry()
    a = make_peer(reg, uid=1000)
    create(reg, a, "p", lifetime="persistent")
    gt = create(reg, a, "t", lifetime="ttl", ttl=3)
    gr = create(reg, a, "r", lifetime="refcount")
    create(reg, a, "o", lifetime="owner")
    gone = create(reg, a, "r-released", lifetime="refcount")
    reg.release(a, gone.lease, T0)
    deleted = create(reg, a, "deleted", lifetime="refcount")
    reg.delete(a, "deleted")
    w = reg.open(a, open_req("later", wait=5), T0)
    assert isinstance(w, Waiting)
    reg.drain()
    reg.shutdown(T0 + 1)
    effects = reg.drain()
    # a stop is no holder's doing: held segments stay, whatever their lifetime
    assert [e for e in effects if isinstance(e, Unlink)] == []
    assert sorted(reg.segments) == ["o", "p", "r", "t"]
    assert reg.unreclaimed() == 4
    assert deleted.lease not in reg.leases  # nothing could reclaim it: ended
    records = list(reg.records())
    segs = {r["id"]: r for r in records if r["k"] == "seg"}
    leases = [r for r in records if r["k"] == "lease"]
    assert sorted(r["name"] for r in segs.values()) == ["o", "p", "r", "t"]
    # a new registry built from those records, as the daemon restores after restart
    new = make_registry()
    for seg_id, rec in segs.items():
        fields = {k: v for k, v in rec.items() if k not in ("k", "at")}
        seg = SegmentRecord(**{**fields, "ttl_deadline": rec["at"]})
        new.restore(seg, [(r["t"], r["u"], r["a"], r["c"]) for r in leases if r["s"] == seg_id])
    new.open_reclaim_window(T0 + 2, 30.0)
    assert new.drain() == []
    b = make_peer(new, uid=1000)
    g = new.reclaim(b, gt.lease, T0 + 3)
    assert g.segment.name == "t"
    assert g.segment.creator_lease == gt.lease
    new.release(b, gt.lease, T0 + 4)
    assert summary(new.drain()) == [R, "arm:3"]
    assert new.reclaim(b, gr.lease, T0 + 5).segment.name == "r"
    new.end_reclaim_window(T0 + 40)  # "o" not reclaimed: its creator's lease ends it
    assert sorted(new.segments) == ["p", "r", "t"]


def test_events_nobody_wants_are_not_built() -> None:
    asked: list[str] = []

    def wants(name: str) -> bool:
        asked.append(name)
        return name.startswith("watched/")

    reg = Registry(
        RegistryLimits(1 << 20, 64, 1 << 24, 60.0),
        new_token=itertools.count().__next__.__str__,
        new_segment_id=lambda: f"seg-{len(asked)}",
        wants_event=wants,
    )
    peer = make_peer(reg)
    reg.release(peer, create(reg, peer, "quiet/a").lease, T0)
    reg.release(peer, create(reg, peer, "watched/a").lease, T0)
    events = [(e.event, e.name) for e in reg.drain() if isinstance(e, Publish)]
    assert events == [("created", "watched/a"), ("released", "watched/a"), ("deleted", "watched/a")]
    assert "quiet/a" in asked
