"""What the sync and async clients share besides the protocol: parameter
building and turning replies into results, so each public method of the two
clients is only "build, call, finish"."""

from __future__ import annotations

import array
import errno
import socket
from collections.abc import Callable, Generator, Iterator
from typing import Any, Literal

from . import wire
from ._held import Held
from ._protocol import Reply
from .errors import error_from_errno
from .segment import Mapping, Segment

Lifetime = Literal["persistent", "owner", "refcount", "ttl"]
Access = Literal["ro", "rw"]
Backing = Literal["shm", "memfd"]

RECV_SIZE = wire.MAX_MESSAGE + 1
ANC_SIZE = socket.CMSG_SPACE(4 * 4)


def _need(value: object, kinds: tuple[type, ...], what: str) -> None:
    """A TypeError for a wrong argument type, before anything is sent (``bool``
    is no integer here, as in the contract)."""
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return
    names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    raise TypeError(f"{what} must be {names}, not {type(value).__name__}")


_STR = (str,)
_INT = (int,)
_SECONDS = (int, float, type(None))


def str_param(value: object, what: str) -> Any:
    """``value``, checked to be a ``str`` (raises ``TypeError`` naming ``what``)."""
    _need(value, _STR, what)
    return value


def create_params(
    name: str,
    size: int,
    lifetime: Lifetime,
    ttl: float | None,
    mode: int,
    exist_ok: bool,
    backing: Backing,
) -> dict[str, Any]:
    """Raises ``TypeError`` for an argument of the wrong type."""
    _need(name, _STR, "name")
    _need(size, _INT, "size")
    _need(lifetime, _STR, "lifetime")
    _need(ttl, _SECONDS, "ttl")
    _need(mode, _INT, "mode")
    _need(exist_ok, (bool,), "exist_ok")
    _need(backing, _STR, "backing")
    return {
        "name": name,
        "size": size,
        "lifetime": lifetime,
        "ttl": ttl,
        "mode": mode,
        "exist_ok": exist_ok,
        "backing": backing,
    }


def open_params(name: str, access: Access, wait: float | None, fd: bool = True) -> dict[str, Any]:
    """Raises ``TypeError`` for an argument of the wrong type."""
    _need(name, _STR, "name")
    _need(access, _STR, "access")
    _need(wait, _SECONDS, "wait")
    return {"name": name, "access": access, "wait": wait, "fd": None if fd else False}


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


def client_param(client: object) -> Any:
    """A client id, checked to be an ``int`` (raises ``TypeError``)."""
    _need(client, _INT, "client")
    return client


def split_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    if not anc:
        return []
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def closed_broker() -> ValueError:
    """What a call on a broker closed by its user raises (as a closed file does)."""
    return ValueError("I/O operation on closed broker")


def connection_lost(path: str) -> ConnectionResetError:
    return ConnectionResetError(errno.ECONNRESET, f"the daemon closed the connection ({path})")


def not_running(path: str, exc: OSError) -> OSError:
    """A clear error for a daemon that is not there, naming the socket path."""
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"no shmbrokerd socket at {path}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionRefusedError(errno.ECONNREFUSED, f"shmbrokerd is not running at {path}")
    return error_from_errno(exc.errno or errno.EIO, f"cannot connect to {path}: {exc.strerror}")


def backoff(timeout: float) -> Iterator[float]:
    """Delays between reconnect attempts: 50 ms doubling to 1 s, for ``timeout`` s.

    Ends when the next delay would pass the deadline; the caller then makes
    one last attempt and lets its error out.
    """
    import time

    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(delay * 2, 1.0)


RETRYABLE = (FileNotFoundError, ConnectionRefusedError)


def sock_for(path: str) -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def default_events(path: str) -> str:
    """The contract's default event endpoint: ``events.sock`` beside the socket."""
    import os

    return "ipc://" + os.path.join(os.path.dirname(path), "events.sock")
