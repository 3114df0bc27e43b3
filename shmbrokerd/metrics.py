"""What the daemon counts for its operators (the ``stats`` reply, and the exporter).

Strategy: the request path pays for a clock read at each end of a request,
one bucket increment and one counter per connection; refusals pay one dict
update more.  Everything else is a gauge derived when ``stats`` is asked,
from state the daemon keeps anyway (the registry, the connections,
``statvfs`` of ``/dev/shm``), never maintained per request: a scrape every
few seconds costs one pass over the segments, a request costs nothing more.

Latency buckets are fixed (the exporter and ``shmbrokerctl top`` read them
from the reply): six per decade from 10 us to 100 ms (1, 1.5, 2, 3, 5, 7), neighbours
at most 5/3 apart, so a p50 or p99 interpolated inside a bucket is off by
less than that bucket's width.
"""

from __future__ import annotations

import heapq
import os
import pwd
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Protocol

from .registry import Registry, SegmentRecord

__all__ = [
    "BACKINGS",
    "BUCKETS",
    "LIFETIMES",
    "MAX_UIDS",
    "TOP",
    "RequestMetrics",
    "busiest",
    "registry_stats",
    "shm_usage",
]

#: upper bounds (seconds, inclusive) of the latency buckets; one more counts the rest
BUCKETS: tuple[float, ...] = (
    *(float(f"{m}e{e}") for e in range(-5, -1) for m in ("1", "1.5", "2", "3", "5", "7")),
    0.1,
)
BACKINGS = ("shm", "memfd")
LIFETIMES = ("persistent", "owner", "refcount", "ttl")
#: segments and clients listed in ``largest_segments`` and ``busiest_clients``
TOP = 10
#: uids listed in ``uids`` at most (those holding the most bytes): the reply
#: must fit one datagram, and a scrape should not grow with every uid seen
MAX_UIDS = 200


class RequestMetrics:
    """Per-op latency histograms and refusals by errno, bumped by the server."""

    __slots__ = ("_hist", "_waits", "errors", "events_unsaved")

    def __init__(self) -> None:
        #: op -> counts per bucket, the last one past every bound, then the sum
        self._hist: dict[str, list[float]] = {}
        #: waiter id -> when its open was received (answered later: ``waited``)
        self._waits: dict[int, float] = {}
        #: op -> errno name -> refusals
        self.errors: dict[str, dict[str, int]] = {}
        #: events not published because their changes could not be put on file
        self.events_unsaved = 0

    def observe(self, op: str, seconds: float) -> None:
        """One request of ``op`` took ``seconds`` from receipt to reply."""
        try:
            hist = self._hist[op]
        except KeyError:
            hist = self._hist[op] = [0] * (len(BUCKETS) + 2)
        hist[bisect_left(BUCKETS, seconds)] += 1
        hist[-1] += seconds

    def refused(self, op: str, code: str) -> None:
        by_errno = self.errors.get(op)
        if by_errno is None:
            by_errno = self.errors[op] = {}
        by_errno[code] = by_errno.get(code, 0) + 1

    def wait_started(self, waiter: int, received: float) -> None:
        """An open waits: its latency is observed when it is answered."""
        self._waits[waiter] = received

    def waited(self, waiter: int, now: float | None) -> None:
        """The wait ended: answered at ``now``, or (None) dropped unanswered."""
        received = self._waits.pop(waiter, None)
        if received is not None and now is not None:
            self.observe("open", now - received)

    def latency(self) -> dict[str, Any]:
        """The histograms as the ``stats`` reply gives them (per-bucket counts)."""
        return {
            "bounds": list(BUCKETS),
            "ops": {
                op: {
                    "buckets": [int(n) for n in hist[:-1]],
                    "count": int(sum(hist[:-1])),
                    "sum": hist[-1],
                }
                for op, hist in self._hist.items()
            },
        }

    def errors_by_errno(self) -> dict[str, dict[str, int]]:
        return {op: dict(codes) for op, codes in self.errors.items()}


class _Client(Protocol):
    """A server connection, as far as the busiest list is concerned."""

    requests: int

    @property
    def peer(self) -> Any: ...


def busiest(conns: Iterable[_Client], n: int = TOP) -> list[dict[str, Any]]:
    """The ``n`` connections that sent the most requests since they connected."""
    return [
        {
            "id": c.peer.id,
            "pid": c.peer.pid,
            "uid": c.peer.uid,
            "gid": c.peer.gid,
            "leases": len(c.peer.leases),
            "requests": c.requests,
            "connected": c.peer.connected,
        }
        for c in heapq.nlargest(n, conns, key=lambda c: c.requests)
    ]


def _groups_of(uid: int, known: dict[int, frozenset[int]]) -> frozenset[int]:
    """The groups a quota rule would match for ``uid``: a connected peer's, else the
    group database's (a uid it does not know matches by uid only)."""
    gids = known.get(uid)
    if gids is not None:
        return gids
    try:
        user = pwd.getpwuid(uid)
        return frozenset(os.getgrouplist(user.pw_name, user.pw_gid))
    except (KeyError, OSError):
        return frozenset()


def registry_stats(reg: Registry, n: int = TOP) -> dict[str, Any]:
    """Gauges derived from the registry now: one pass over the live segments."""
    kinds = {(b, lt): [0, 0] for b in BACKINGS for lt in LIFETIMES}
    for seg in reg.segments.values():
        row = kinds.setdefault((seg.backing, seg.lifetime), [0, 0])
        row[0] += 1
        row[1] += seg.size
    known = {p.uid: p.gids for p in reg.peers.values()}
    uids = []
    held = heapq.nlargest(MAX_UIDS, reg.usage.items(), key=_bytes_held)
    for uid, (used_bytes, used_segments) in sorted(held):
        quota = reg.policy.quota(uid, _groups_of(uid, known))
        uids.append(
            {
                "uid": uid,
                "bytes": used_bytes,
                "segments": used_segments,
                "quota_bytes": quota.bytes,
                "quota_segments": quota.segments,
            }
        )
    return {
        "by_kind": [
            {"backing": b, "lifetime": lt, "segments": count, "bytes": size}
            for (b, lt), (count, size) in kinds.items()
        ],
        "uids": uids,
        "largest_segments": [
            s.describe() for s in heapq.nlargest(n, reg.segments.values(), key=_size)
        ],
        "ttl_expiries": reg.expired,
        "reclaims": {"done": reg.reclaimed, "lapsed": reg.lapsed},
    }


def _bytes_held(usage: tuple[int, list[int]]) -> int:
    return usage[1][0]


def _size(seg: SegmentRecord) -> int:
    return seg.size


def shm_usage(path: str) -> dict[str, Any]:
    """``statvfs`` of the backing directory: what the kernel says, whoever filled it."""
    st = os.statvfs(path)
    return {
        "path": path,
        "size": st.f_blocks * st.f_frsize,
        "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
    }
