"""The four lifetimes as a table: when a segment leaves the namespace.

Strategy (as h11's ``_state.py`` keeps every transition in dicts looked up
in one place): each lifetime of ``PROTOCOL.md``'s table is one
:class:`Lifetime` in :data:`LIFETIMES`, and :func:`fate` is the one place that
reads them.  The registry asks it whenever a lease ends (``release``, a
disconnect, the end of the reclaim window) or a restart leaves a segment
no lease, and carries out the answer: keep the segment, unlink it at once
(the ``deleted`` event), or start its ttl countdown (``expired`` when it
runs out; a new lease cancels it; a ttl of 0 runs out at once).

Read against the contract:

* ``persistent``: only ``delete`` unlinks it;
* ``owner``: unlinked when the creating lease ends;
* ``refcount``: unlinked when the last lease ends;
* ``ttl``: unlinked ``ttl`` seconds after the last lease ends.

``delete`` ends any segment whatever its lifetime, and a lease outlives its
segment's deletion: neither is a lifetime's rule.  No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from .model import SegmentRecord

__all__ = ["LIFETIMES", "Fate", "Lifetime", "fate", "memfd_needs_fd_store"]


class Fate(Enum):
    """What becomes of a segment when one of its leases ends."""

    KEEP = "keep"
    UNLINK = "unlink"
    COUNTDOWN = "countdown"


@dataclass(frozen=True, slots=True)
class Lifetime:
    """One lifetime: which lease's end is the segment's, and what follows."""

    #: ``"creator"``: the end of the creating lease; ``"last"``: of the last
    #: lease; None: no lease's (only ``delete``)
    ends: Literal["creator", "last"] | None
    #: then a countdown of the segment's ``ttl`` seconds, not an unlink at once
    countdown: bool = False
    #: it outlives every lease and so the daemon's process: a memfd one needs
    #: the systemd fd store (``EOPNOTSUPP`` without it)
    memfd_needs_fd_store: bool = False


LIFETIMES: dict[str, Lifetime] = {
    "persistent": Lifetime(ends=None, memfd_needs_fd_store=True),
    "owner": Lifetime(ends="creator"),
    "refcount": Lifetime(ends="last"),
    "ttl": Lifetime(ends="last", countdown=True),
}


def fate(seg: SegmentRecord, ended: str | None, left: int) -> Fate:
    """What ``seg`` becomes once lease ``ended`` has ended, leaving ``left`` leases.

    ``ended`` is None after a restart, for a segment restored with ``left``
    leases: one restored with none ends then, as its last lease would have
    (an ``owner`` segment's creating lease is gone too).
    """
    rule = LIFETIMES[seg.lifetime]
    if rule.ends == "creator" and ended is not None:
        over = ended == seg.creator_lease
    else:
        over = rule.ends is not None and not left
    if not over:
        return Fate.KEEP
    return Fate.COUNTDOWN if rule.countdown else Fate.UNLINK


def memfd_needs_fd_store(lifetime: str) -> bool:
    """Is a ``memfd`` segment of this lifetime refused without the fd store?"""
    return LIFETIMES[lifetime].memfd_needs_fd_store
