"""The leases a broker holds, with their Segments: what a reconnect reclaims.

Both clients keep one :class:`Held`.  After a daemon restart each lease in
it is reclaimed; one the daemon no longer knows (the reclaim window passed,
the segment was deleted, an operator dropped the connection) marks its
Segment ``lost`` and is reported once through the broker's ``on_lost``
callback, since the memory it still maps is no longer the one a new
``open`` of the name would find.  After a ``fork`` the child's broker starts
from an empty one (see ``_fork.py``): the parent's leases are not the
child's to release or reclaim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import wire
from .segment import Segment

__all__ = ["Held", "LostCallback"]

log = logging.getLogger("shmbroker")

#: called with each Segment whose lease a reconnect could not reclaim
LostCallback = Callable[[Segment], object]


class Held:
    def __init__(self) -> None:
        self._by_lease: dict[str, Segment] = {}
        #: lost since the broker last reported them (see :meth:`report_lost`)
        self._lost: list[Segment] = []

    def add(self, seg: Segment) -> None:
        self._by_lease[seg.lease] = seg

    def discard(self, lease: str) -> bool:
        """Forget ``lease``; False if it was not held here (nothing to release)."""
        return self._by_lease.pop(lease, None) is not None

    def __contains__(self, lease: object) -> bool:
        return lease in self._by_lease

    def tokens(self) -> list[str]:
        return list(self._by_lease)

    def lost(self, lease: str) -> None:
        """The daemon refused to reclaim ``lease``: its Segment is lost."""
        seg = self._by_lease.pop(lease, None)
        if seg is None:
            return
        seg.lost = True
        self._lost.append(seg)
        log.warning(
            "segment %r (id %s) could not be reclaimed after the daemon restarted:"
            " its mapping is no longer the segment of that name",
            seg.name,
            seg.id,
        )

    def report_lost(self, on_lost: LostCallback | None) -> None:
        """Give each newly lost Segment to ``on_lost`` (outside the broker's lock)."""
        if not self._lost:  # after every call: the common case costs one test
            return
        lost, self._lost = self._lost, []
        if on_lost is not None:
            for seg in lost:
                on_lost(seg)

    def disown(self) -> None:
        """After a fork, in the child: these Segments stay mapped, but their
        ``close()`` releases nothing (the leases are the parent's)."""
        for seg in self._by_lease.values():
            seg.disown()
        self._by_lease.clear()

    def sealed(self, info: wire.SegmentInfo) -> None:
        """``seal`` answered: this broker's Segments of that segment say so too."""
        for seg in self._by_lease.values():
            if seg.id == info.id:
                seg.info = info
