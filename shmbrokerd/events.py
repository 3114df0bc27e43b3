"""The lifecycle event stream: a ZeroMQ PUB socket, best effort.

A send never blocks and never raises into the daemon: the high-water mark is
bounded and ``NOBLOCK`` drops what a slow subscriber cannot take (PUB drops
on HWM anyway; ``NOBLOCK`` guards the rare cases where it would wait).
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


class EventPublisher:
    def __init__(self, endpoint: str, hwm: int) -> None:
        self.endpoint = endpoint
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._ipc_path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
        if self._ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)
        self._sock.bind(endpoint)
        self.dropped = 0

    def set_access(self, uid: int, gid: int, mode: int) -> None:
        """Give the ipc socket file the request socket's owner, group and mode."""
        if self._ipc_path:
            st = os.stat(self._ipc_path)
            if (st.st_uid, st.st_gid) != (uid, gid):  # chown only when it changes anything
                os.chown(self._ipc_path, uid, gid)
            os.chmod(self._ipc_path, mode)

    def publish(self, ev: Publish, ts: float) -> None:
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

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._ipc_path)


def ipc_endpoint_for(socket_path: str) -> str:
    return "ipc://" + os.path.join(os.path.dirname(socket_path), "events.sock")


def is_valid_endpoint(endpoint: str) -> bool:
    return bool(urlparse(endpoint).scheme)
