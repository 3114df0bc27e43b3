"""The daemon's counters fed values, no daemon: histogram buckets, the gauges
derived from the registry, and the bound that keeps the ``stats`` reply in one
datagram (the exporter tests load a real daemon)."""

from __future__ import annotations

import itertools
import json

from shmbroker import wire
from shmbrokerd.metrics import BUCKETS, MAX_UIDS, TOP, RequestMetrics, registry_stats
from tests.unit.test_registry import create, make_peer, make_registry


def test_buckets_resolve_10us_to_100ms_and_count_at_their_bound() -> None:
    assert BUCKETS[0] == 1e-5
    assert BUCKETS[-1] == 0.1
    assert list(BUCKETS) == sorted(BUCKETS)
    assert all(b / a <= 5 / 3 + 1e-9 for a, b in itertools.pairwise(BUCKETS))
    m = RequestMetrics()
    for seconds in (5e-6, 1e-5, 1.1e-5, 0.1, 0.5):
        m.observe("open", seconds)
    h = m.latency()["ops"]["open"]
    assert h["count"] == 5
    assert h["buckets"][0] == 2  # 5 us and exactly 10 us: le is inclusive
    assert h["buckets"][1] == 1
    assert h["buckets"][len(BUCKETS) - 1] == 1  # 100 ms
    assert h["buckets"][-1] == 1  # past every bound
    assert h["sum"] == sum((5e-6, 1e-5, 1.1e-5, 0.1, 0.5))


def test_a_wait_is_observed_once_when_answered_never_when_dropped() -> None:
    m = RequestMetrics()
    m.wait_started(1, 10.0)
    m.wait_started(2, 10.0)
    m.waited(1, 10.5)
    m.waited(1, 11.0)  # a second end of the same wait: not counted again
    m.waited(2, None)
    assert m.latency()["ops"]["open"]["count"] == 1
    assert m.latency()["ops"]["open"]["sum"] == 0.5


def test_registry_gauges_by_kind_uid_and_size() -> None:
    reg = make_registry(max_segments=1000, max_total_bytes=1 << 30)
    a, b = make_peer(reg, uid=1000), make_peer(reg, uid=1001)
    for i in range(TOP + 2):
        create(reg, a, f"a{i}", size=4096 * (i + 1), lifetime="persistent")
    create(reg, b, "b", size=1 << 20, lifetime="ttl", ttl=5.0, backing="memfd")
    stats = registry_stats(reg)
    kinds = {(r["backing"], r["lifetime"]): (r["segments"], r["bytes"]) for r in stats["by_kind"]}
    assert len(kinds) == 8
    assert kinds[("shm", "persistent")] == (TOP + 2, 4096 * sum(range(1, TOP + 3)))
    assert kinds[("memfd", "ttl")] == (1, 1 << 20)
    assert kinds[("shm", "refcount")] == (0, 0)
    assert [u["uid"] for u in stats["uids"]] == [1000, 1001]
    assert stats["uids"][1]["bytes"] == 1 << 20
    sizes = [s["size"] for s in stats["largest_segments"]]
    assert len(sizes) == TOP
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 1 << 20


def test_uids_are_bounded_so_stats_fits_one_datagram() -> None:
    reg = make_registry(max_segments=10_000, max_total_bytes=1 << 40)
    for uid in range(MAX_UIDS + 50):
        create(reg, make_peer(reg, uid=100_000 + uid), f"u{uid}", size=4096 + uid)
    stats = registry_stats(reg)
    assert len(stats["uids"]) == MAX_UIDS
    assert min(u["bytes"] for u in stats["uids"]) == 4096 + 50  # the largest holders
    assert len(json.dumps(stats).encode()) < wire.MAX_MESSAGE // 2
