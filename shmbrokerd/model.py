"""The registry's plain data: peers, segments and leases, with no rules.

Apart from ``registry.py`` so that the modules holding the rules about them
(``access.py``, ``records.py``) can name them without importing the
registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Access", "Lease", "Peer", "SegmentRecord"]

Access = Literal["ro", "rw"]


@dataclass(slots=True)
class Peer:
    """One connection, identified by ``SO_PEERCRED`` at accept."""

    id: int
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    operator: bool
    connected: float
    leases: set[str] = field(default_factory=set)
    waiters: set[int] = field(default_factory=set)
    #: the name it gave ``hello`` (cut to ``MAX_CLIENT_NAME``), for operators
    name: str | None = None
    #: primary and supplementary groups: what group bits and policy match
    gids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.gids = self.groups | {self.gid}


@dataclass(slots=True, eq=False)
class SegmentRecord:
    """One segment the registry knows: live (named) or deleted with leases left."""

    id: str
    name: str
    size: int
    lifetime: str
    ttl: float | None
    backing: str
    mode: int
    created: float
    owner_uid: int
    owner_gid: int
    sealed: bool = False
    live: bool = True
    creator_lease: str | None = None
    leases: set[str] = field(default_factory=set)
    ttl_generation: int = 0
    ttl_armed: bool = False
    #: wall-clock end of the running ttl countdown (persisted for restarts)
    ttl_deadline: float | None = None
    #: the edge's cache of its encoded description (``codec.encode_grant``);
    #: of the fields ``describe`` reports but ``leases``, only ``sealed`` changes
    head: bytes | None = field(default=None, repr=False)

    def describe(self) -> dict[str, object]:
        """The contract's Segment object."""
        return {
            "id": self.id,
            "name": self.name,
            "size": self.size,
            "lifetime": self.lifetime,
            "ttl": self.ttl,
            "sealed": self.sealed,
            "backing": self.backing,
            "mode": self.mode,
            "created": self.created,
            "owner_uid": self.owner_uid,
            "owner_gid": self.owner_gid,
            "leases": len(self.leases),
        }


@dataclass(slots=True)
class Lease:
    """One lease: held by a connection (``peer``) or awaiting reclaim."""

    token: str
    segment: SegmentRecord
    uid: int
    access: Access
    #: None while the lease waits to be reclaimed after a restart.
    peer: int | None
