"""The lifetimes' table read against PROTOCOL.md's, one case at a time (pure)."""

from __future__ import annotations

import pytest

from shmbrokerd.lifetimes import LIFETIMES, Fate, fate, memfd_needs_fd_store
from shmbrokerd.model import SegmentRecord

KEEP, UNLINK, COUNTDOWN = Fate.KEEP, Fate.UNLINK, Fate.COUNTDOWN


def seg(lifetime: str, creator: str | None = "c") -> SegmentRecord:
    s = SegmentRecord(
        id="1",
        name="n",
        size=1,
        lifetime=lifetime,
        ttl=5.0 if lifetime == "ttl" else None,
        backing="shm",
        mode=0o600,
        created=0.0,
        owner_uid=1,
        owner_gid=1,
    )
    s.creator_lease = creator
    return s


def test_the_table_names_the_contracts_lifetimes() -> None:
    assert set(LIFETIMES) == {"persistent", "owner", "refcount", "ttl"}


@pytest.mark.parametrize(
    ("lifetime", "ended", "left", "then"),
    [
        ("persistent", "c", 0, KEEP),
        ("persistent", None, 0, KEEP),
        ("owner", "c", 3, UNLINK),  # the creating lease: whatever is left
        ("owner", "x", 0, KEEP),  # another one: even the last
        ("owner", None, 0, UNLINK),  # a restart left it no lease
        ("owner", None, 1, KEEP),
        ("refcount", "c", 1, KEEP),
        ("refcount", "x", 0, UNLINK),
        ("refcount", None, 0, UNLINK),
        ("ttl", "c", 1, KEEP),
        ("ttl", "x", 0, COUNTDOWN),
        ("ttl", None, 0, COUNTDOWN),
        ("ttl", None, 2, KEEP),
    ],
)
def test_fate(lifetime: str, ended: str | None, left: int, then: Fate) -> None:
    assert fate(seg(lifetime), ended, left) is then


def test_only_persistent_memfd_segments_need_the_fd_store() -> None:
    assert [lt for lt in LIFETIMES if memfd_needs_fd_store(lt)] == ["persistent"]
