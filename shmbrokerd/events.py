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
"""

from __future__ import annotations

import contextlib
import logging
import os
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


class EventPublisher:
    def __init__(self, endpoint: str, hwm: int) -> None:
        self.endpoint = endpoint
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        # subscription messages queued for us: bounded, a flood of them is dropped
        self._sock.setsockopt(zmq.RCVHWM, 1000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._ipc_path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
        if self._ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)
        self._sock.bind(endpoint)
        self.dropped = 0
        #: topic prefixes with at least one subscriber (zmq deduplicates them)
        self.topics: set[bytes] = set()

    def _update_topics(self) -> None:
        """Read the (un)subscriptions zmq has queued since the last look."""
        sock = self._sock
        try:
            while int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                msg = sock.recv(_LAST)
                if msg[:1] == b"\x01":
                    self.topics.add(msg[1:])
                elif msg[:1] == b"\x00":
                    self.topics.discard(msg[1:])
        except zmq.ZMQError as exc:  # never let the stream take the daemon down
            log.warning("reading subscriptions failed: %s", exc)

    def fileno(self) -> int:
        """Readable when zmq has something for us (a subscription): call :meth:`readable`."""
        return int(self._sock.getsockopt(zmq.FD))

    def readable(self) -> None:
        self._update_topics()

    def wanted(self, name: str) -> bool:
        """Would any subscriber receive an event about ``name``?"""
        topics = self.topics
        if not topics:
            return False
        if b"" in topics or len(topics) > _MAX_TRACKED:
            return True
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
        if not self.wanted(ev.name):
            return
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
        except zmq.Again:
            self.dropped += 1
        except zmq.ZMQError as exc:  # never let the stream take the daemon down
            self.dropped += 1
            log.warning("event dropped: %s", exc)
        # A send may have taken zmq's pending commands (a new subscription)
        # without the fd telling us: look now.  With no subscriber nothing is
        # sent, so the fd alone is enough and publishing costs no system call.
        self._update_topics()

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)


def ipc_endpoint_for(socket_path: str) -> str:
    return "ipc://" + os.path.join(os.path.dirname(socket_path), "events.sock")


def is_valid_endpoint(endpoint: str) -> bool:
    return bool(urlparse(endpoint).scheme)
