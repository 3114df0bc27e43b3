"""What both transports (``_transport_sync``, ``_transport_async``) share:
the socket, its fds, the errors of a connection, and the reconnect backoff."""

from __future__ import annotations

import array
import errno
import os
import socket
import time
from collections.abc import Iterator

from . import wire
from .errors import error_from_errno

RECV_SIZE = wire.MAX_MESSAGE + 1
ANC_SIZE = socket.CMSG_SPACE(4 * 4)
#: what a reconnect retries (the daemon not there yet); any other error ends it
RETRYABLE = (FileNotFoundError, ConnectionRefusedError)


def sock_for(path: str) -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


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
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(delay * 2, 1.0)


def default_events(path: str) -> str:
    """The contract's default event endpoint: ``events.sock`` beside the socket."""
    return "ipc://" + os.path.join(os.path.dirname(path), "events.sock")
