# Generated from _async.py by scripts/unasync.py: do not edit.  Edit _async.py, then run
# `python scripts/unasync.py` (`make lint` checks that this file is current).
"""The client's API, written once for both clients: a method per op.

``_async.py`` is the source; ``_sync.py`` is generated from it by
``scripts/unasync.py``, and ``make lint`` checks that it is current.  What really differs between
the two, how a call is sent and its reply waited for, is hand-written in
the transports (``_transport_*.py``) each broker class derives from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import _params, _results, _transport, wire
from ._calls import Reply
from ._params import Access, Backing, Lifetime
from ._transport_sync import SyncTransport
from .segment import Segment

if TYPE_CHECKING:
    from ._watch import Watcher

__all__ = ["Broker"]


class Broker(SyncTransport):
    """A connection to shmbrokerd; how it is made, closed and waits: :class:`SyncTransport`.

    A daemon restart fails the calls in flight with ``ConnectionError``; the
    next call reconnects (retrying with backoff for up to
    ``reconnect_timeout`` seconds) and reclaims the leases of this broker's
    open segments, whose mappings never stopped working.  A lease the daemon
    no longer knows after a restart (the reclaim window passed, the segment
    was deleted meanwhile) marks its Segment ``lost``, is logged, and is
    given to ``on_lost(segment)`` once the call that reconnected is done
    (what ``on_lost`` raises comes out of that call).

    After ``os.fork()`` the child's broker does not use the parent's
    connection: its first call connects anew, and Segments it inherited stay
    mapped but their ``close()`` releases nothing (the leases are the
    parent's).

    Errors are ``OSError`` subclasses named by their errno
    (:mod:`shmbroker.errors`): each method lists what the daemon answers it.
    Any method also raises ``ValueError`` on a closed broker (as a closed
    file does); ``ConnectionResetError`` when the connection drops during
    the call; ``FileNotFoundError``/``ConnectionRefusedError`` when a
    reconnect finds no daemon within ``reconnect_timeout``; ``TypeError``
    for an argument of the wrong type, before anything is sent;
    ``BrokerError`` ``EINVAL`` for a value the daemon refuses, ``EMSGSIZE``
    for a request over 65536 bytes, ``EBADMSG`` for a malformed reply and
    ``EMFILE`` when the daemon is at its connection or fd limit.
    """

    def hello(self, client: str | None = None) -> wire.HelloResult:
        """What the daemon offers (version, features, limits); ``client`` names
        this program to operators.  Raises only what any call raises."""
        if client is not None:
            _params.str_param(client, "client")
        reply = self._call("hello", client=client)
        result = reply.unwrap()
        assert isinstance(result, wire.HelloResult)
        return result

    def create(
        self,
        name: str,
        size: int,
        lifetime: Lifetime = "refcount",
        ttl: float | None = None,
        mode: int = 0o600,
        exist_ok: bool = False,
        backing: Backing = "shm",
    ) -> Segment:
        """Create a segment and map it read-write.

        Raises ``SegmentExistsError`` (``EEXIST``) if the name is taken
        (with ``exist_ok``: by a segment of another size),
        ``SegmentPermissionError`` (``EACCES``) if the policy denies it,
        ``BrokerError`` ``EDQUOT`` over this peer's quota, ``ENOSPC`` if the
        memory cannot be reserved, ``ENAMETOOLONG`` for a name over 255
        bytes, ``EOPNOTSUPP`` for a backing the daemon does not offer so.
        """
        params = _params.create_params(name, size, lifetime, ttl, mode, exist_ok, backing)
        return self._segment(self._call("create", **params), "rw")

    def open(self, name: str, access: Access = "ro", wait: float | None = None) -> Segment:
        """Open and map a segment; with ``wait``, wait that long for its creation.

        Raises ``SegmentNotFoundError`` (``ENOENT``) if there is none,
        ``SegmentTimeoutError`` (``ETIMEDOUT``) when ``wait`` runs out,
        ``SegmentPermissionError`` (``EACCES``: mode or policy; ``EPERM``:
        ``rw`` of a sealed segment), ``BrokerError`` ``ENAMETOOLONG`` for a
        name over 255 bytes.
        """
        if self._mappings.cached(name, access) is None:  # open_flow's one request
            params = _params.open_params(name, access, wait)
            return self._segment(self._call("open", **params), access)
        return self._drive(
            _results.open_flow(
                self._mappings, name, access, wait, self._release_segment, self._leases
            )
        )

    def _segment(self, reply: Reply, access: Access) -> Segment:
        seg = self._mappings.segment(reply, access, self._release_segment)
        self._leases.add(seg)
        return seg

    def _drive(self, flow: _results.Flow) -> Segment:
        op, params = next(flow)
        while True:
            try:
                op, params = flow.send(self._call(op, **params))
            except StopIteration as done:
                seg: Segment = done.value
                return seg

    def release(self, lease: str) -> None:
        """End a lease by its token (``Segment.close()`` does it for its own).

        Raises ``SegmentNotFoundError`` (``ENOENT``) for a lease this
        connection does not hold.
        """
        reply = self._call("release", lease=_params.str_param(lease, "lease"))
        reply.unwrap()

    def seal(self, name: str) -> wire.SegmentInfo:
        """Seal a segment: from now on only ``ro`` opens are granted.

        This broker's Segments of it then say ``sealed``; their mappings
        stay as they were (a writable one still writes: see docs/security.md).
        Raises ``SegmentNotFoundError`` (``ENOENT``), ``SegmentPermissionError``
        (``EACCES``: no write permission).
        """
        reply = self._call("seal", name=_params.str_param(name, "name"))
        info = _results.to_info(reply)
        self._leases.sealed(info)
        return info

    def delete(self, name: str) -> None:
        """Unlink a segment: mappings stay valid, the name is free at once.

        Raises ``SegmentNotFoundError`` (``ENOENT``), ``SegmentPermissionError``
        (``EACCES``: no write permission, or the policy denies it).
        """
        reply = self._call("delete", name=_params.str_param(name, "name"))
        reply.unwrap()

    def stat(self, name: str) -> wire.SegmentInfo:
        """A segment's description.  Raises ``SegmentNotFoundError`` (``ENOENT``),
        ``SegmentPermissionError`` (``EACCES``: no read permission)."""
        return _results.to_info(self._call("stat", name=_params.str_param(name, "name")))

    def holders(self, name: str) -> list[wire.Holder]:
        """Who holds leases on ``name``.  Raises ``SegmentPermissionError``
        (``EACCES``) for non-operators, ``SegmentNotFoundError`` (``ENOENT``)."""
        reply = self._call("stat", name=_params.str_param(name, "name"), holders=True)
        return _results.to_holders(reply)

    def drop(self, client: int) -> int:
        """End client ``client``'s connection as if it had closed it; returns
        how many leases ended.  Raises ``SegmentNotFoundError`` (``ENOENT``)
        for no such client, ``SegmentPermissionError`` (``EACCES``) for
        non-operators."""
        reply = self._call("drop", client=_params.client_param(client))
        result = reply.unwrap()
        assert isinstance(result, wire.DropResult)
        return result.leases

    def reclaim(self, lease: str) -> wire.SegmentInfo:
        """Re-attach a lease after a daemon restart (reconnects do it for
        this broker's own).  Raises ``SegmentNotFoundError`` (``ENOENT``) for
        an unknown lease, one past the reclaim window, or another uid's."""
        reply = self._call("reclaim", lease=_params.str_param(lease, "lease"))
        result = reply.unwrap()
        assert isinstance(result, wire.SegmentLeaseResult)
        return result.segment

    def reload(self) -> list[str]:
        """Have the daemon re-read its config; returns the changed keys that
        take effect only at its next start.  Raises ``SegmentPermissionError``
        (``EACCES``) for non-operators, ``BrokerError`` ``EINVAL`` for an
        invalid config (the message names the key; the old config stays)."""
        reply = self._call("reload")
        result = reply.unwrap()
        assert isinstance(result, wire.ReloadResult)
        return result.restart

    def stats(self) -> wire.StatsResult:
        """The daemon's counters.  Raises ``SegmentPermissionError``
        (``EACCES``) for non-operators."""
        reply = self._call("stats")
        result = reply.unwrap()
        assert isinstance(result, wire.StatsResult)
        return result

    def list(self, prefix: str | None = None) -> Iterator[wire.SegmentInfo]:
        """Every segment this peer may read, in name order, page by page.

        Raises only what any call raises (on the page that meets it).
        """
        after: str | None = None
        while True:
            reply = self._call("list", prefix=prefix, after=after)
            page = reply.unwrap()
            assert isinstance(page, wire.ListResult)
            for seg in page.segments:
                yield seg
            if page.next is None:
                return
            after = page.next

    def clients(self) -> Iterator[wire.ClientInfo]:
        """The daemon's connected clients, by id, page by page.  Raises
        ``SegmentPermissionError`` (``EACCES``) for non-operators."""
        after: int | None = None
        while True:
            reply = self._call("clients", after=after)
            page = reply.unwrap()
            assert isinstance(page, wire.ClientsResult)
            for client in page.clients:
                yield client
            if page.next is None:
                return
            after = page.next

    def watch(self, prefix: str = "") -> Watcher:
        """Subscribe to lifecycle events of names starting with ``prefix``.

        Raises ``ImportError`` without pyzmq (the ``zmq`` extra), and what
        ``hello`` raises.
        """
        from ._watch import Watcher

        hello = self.hello()
        return Watcher(hello.events or _transport.default_events(self.path), prefix)
