"""Finishing a reply into what a public method returns: a model, or a Segment.

``Mappings`` turns ``create``/``open`` replies into Segments over mappings
(one per name and access, reused by the ``fd: false`` repeat open), and
``open_flow`` is that repeat open's requests, written once for both clients.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Generator
from typing import Any

from . import wire
from ._calls import Reply
from ._held import Held
from ._params import Access, open_params
from .errors import error_from_errno
from .segment import Mapping, Segment


class Mappings:
    """A broker's mappings by name and access, for the ``fd: false`` repeat open.

    A repeat open asks the daemon for a lease without an fd and reuses the
    mapping if the segment's ``id`` is still the one mapped (a name deleted
    and created again has a new id, and gets a fresh fd and mapping).
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[str, bool], Mapping] = {}

    def cached(self, name: str, access: Access) -> Mapping | None:
        return self._maps.get((name, access == "rw"))

    def segment(self, reply: Reply, access: Access, release: Callable[[str], None]) -> Segment:
        """A Segment over a new mapping of the fd the reply carries."""
        result = reply.unwrap()
        assert isinstance(result, wire.SegmentLeaseResult)
        assert reply.fd is not None
        try:
            mapping = Mapping(result.segment, reply.fd, access == "rw", self._forget)
        except BaseException:
            release(result.lease)
            raise
        self._maps[(mapping.name, mapping.writable)] = mapping
        return Segment(result.segment, result.lease, mapping, release)

    def reuse(
        self, reply: Reply, mapping: Mapping, release: Callable[[str], None]
    ) -> Segment | str:
        """A Segment sharing ``mapping``, or the lease to give back if it is stale."""
        result = reply.unwrap()
        assert isinstance(result, wire.SegmentLeaseResult)
        if result.segment.id != mapping.id or mapping.refs == 0:
            self._forget(mapping)
            return result.lease
        return Segment(result.segment, result.lease, mapping, release)

    def _forget(self, mapping: Mapping) -> None:
        key = (mapping.name, mapping.writable)
        if self._maps.get(key) is mapping:
            del self._maps[key]


#: A request flow: yields (op, params), is sent each Reply, returns its result.
Flow = Generator[tuple[str, dict[str, Any]], Reply, Segment]


def open_flow(
    mappings: Mappings,
    name: str,
    access: Access,
    wait: float | None,
    release: Callable[[str], None],
    leases: Held,
) -> Flow:
    """``open``, for both clients: reuse this broker's mapping when the id matches.

    The sync client drives it with blocking calls, the async one with awaits.
    """
    cached = mappings.cached(name, access)
    if cached is not None:  # already mapped here: a lease without an fd
        reply = yield "open", open_params(name, access, wait, fd=False)
        reused = mappings.reuse(reply, cached, release)
        if isinstance(reused, Segment):
            leases.add(reused)
            return reused
        yield "release", {"lease": reused}  # the name now means another segment
    reply = yield "open", open_params(name, access, wait)
    seg = mappings.segment(reply, access, release)
    leases.add(seg)
    return seg


def to_info(reply: Reply) -> wire.SegmentInfo:
    result = reply.unwrap()
    assert isinstance(result, wire.SegmentResult)
    return result.segment


def to_holders(reply: Reply) -> list[wire.Holder]:
    """The holders in a ``stat`` reply (``holders: true``); ``EACCES`` if none came."""
    result = reply.unwrap()
    assert isinstance(result, wire.StatResult)
    if result.holders is None:
        raise error_from_errno(errno.EACCES, "holders are shown to operators only")
    return result.holders
