"""The lifecycle event stream: a ZeroMQ publisher socket, best effort.

A send never blocks and never raises into the daemon: the high-water mark is
bounded and ``NOBLOCK`` drops what a slow subscriber cannot take (PUB drops
on HWM anyway; ``NOBLOCK`` guards the rare cases where it would wait).

The socket is an ``XPUB``: to subscribers it is the contract's PUB, and to
the daemon it reports which topic prefixes anyone subscribes to, so an event
nobody asked for is never encoded or handed to zmq (most daemons run with
no subscriber most of the time, and the encoding was a measurable share of
an ``open``).  The loop watches zmq's fd (``fileno``) to learn of new
subscriptions without a system call per event.

What comes up the socket is hostile like everything else: at most
``_READ_BATCH`` messages are read per turn of the loop (the rest on the
next turn, so a peer flooding it cannot stall the daemon), anything but a
subscription is ignored, and unsubscriptions are not trusted: libzmq passes
one up even when it matched nothing, so a peer could silence the real
subscribers of a prefix.  The set of prefixes therefore only grows (until
``_MAX_TRACKED``, past which every event is built and zmq alone filters),
and an event is never lost for a subscriber, at worst built for nobody.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from urllib.parse import urlparse

import zmq
from pydantic_core import to_json

from .registry import Publish

__all__ = ["EventPublisher"]

log = logging.getLogger("shmbrokerd.events")
# plain ints: pyzmq's Flag arithmetic per send is measurable on the hot path
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
#: past this many distinct prefixes, stop matching them here and let zmq filter
_MAX_TRACKED = 64
#: messages read from subscribers per turn of the loop
_READ_BATCH = 64


class EventPublisher:
    def __init__(
        self,
        endpoint: str,
        hwm: int,
        defer: Callable[[Callable[[], None]], object] = lambda cb: None,
    ) -> None:
        """``defer(cb)`` runs ``cb`` at the loop's next turn (``loop.call_soon``)."""
        self.endpoint = endpoint
        self._defer = defer
        self._deferred = False
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        # what subscribers send up, queued for us: bounded
        self._sock.setsockopt(zmq.RCVHWM, 1000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._ipc_path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
        if self._ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)
        self._sock.bind(endpoint)
        #: events handed to zmq, and events zmq refused (a subscriber's own
        #: queue overflowing inside libzmq is silent: libzmq does not report it)
        self.published = 0
        self.dropped = 0
        #: topic prefixes subscribed to since the start (see the module's note)
        self.topics: set[bytes] = set()
        #: past _MAX_TRACKED prefixes: every event is wanted
        self.everything = False

    def readable(self) -> None:
        """Read what subscribers sent since the last look, a bounded batch of it.

        Call when :meth:`fileno` is readable, and after sending.
        """
        sock = self._sock
        try:
            for _ in range(_READ_BATCH):
                if not int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                    return
                msg = sock.recv(_LAST)
                if msg[:1] == b"\x01" and not self.everything:
                    self.topics.add(msg[1:])
                    self.everything = msg == b"\x01" or len(self.topics) > _MAX_TRACKED
            # more is queued, and zmq's fd will not say so again: next turn
            if not self._deferred:
                self._deferred = True
                self._defer(self._read_deferred)
        except zmq.ZMQError as exc:  # never let the stream take the daemon down
            log.warning("reading subscriptions failed: %s", exc)

    def _read_deferred(self) -> None:
        self._deferred = False
        self.readable()

    def fileno(self) -> int:
        """Readable when zmq has something for us (a subscription): call :meth:`readable`."""
        return int(self._sock.getsockopt(zmq.FD))

    def wanted(self, name: str) -> bool:
        """Could a subscriber receive an event about ``name``?"""
        if self.everything:
            return True
        topics = self.topics
        if not topics:
            return False
        key = name.encode()
        return any(key.startswith(t) for t in topics)

    def set_access(self, uid: int, gid: int, mode: int) -> None:
        """Give the ipc socket file the request socket's owner, group and mode."""
        if self._ipc_path:
            st = os.stat(self._ipc_path)
            if (st.st_uid, st.st_gid) != (uid, gid):  # chown only when it changes anything
                os.chown(self._ipc_path, uid, gid)
            os.chmod(self._ipc_path, mode)

    def publish(self, ev: Publish, ts: float) -> None:
        """Send one event (the registry built it only if :meth:`wanted` said so)."""
        body = {
            "event": ev.event,
            "name": ev.name,
            "size": ev.size,
            "uid": ev.uid,
            "pid": ev.pid,
            "ts": ts,
        }
        try:
            self._sock.send(ev.name.encode(), _MORE)
            self._sock.send(to_json(body), _LAST)
            self.published += 1
        except zmq.Again:
            self.dropped += 1
        except zmq.ZMQError as exc:  # never let the stream take the daemon down
            self.dropped += 1
            log.warning("event dropped: %s", exc)
        # A send may have taken zmq's pending commands (a new subscription)
        # without the fd telling us: look now.  With no subscriber nothing is
        # sent, so the fd alone is enough and publishing costs no system call.
        self.readable()

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)


def ipc_endpoint_for(socket_path: str) -> str:
    return "ipc://" + os.path.join(os.path.dirname(socket_path), "events.sock")


def is_valid_endpoint(endpoint: str) -> bool:
    return bool(urlparse(endpoint).scheme)
