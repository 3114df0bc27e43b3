"""What :mod:`shmbroker.shared_memory` needs besides its classes: CPython's
names turned into broker names, and the process's default connection.

Names.  CPython on Linux hands ``"/" + name`` to ``shm_open``, and glibc
drops every leading ``/``: ``"x"`` and ``"/x"`` are one object.  The broker's
names are stricter (``[A-Za-z0-9._-]`` components), so a name it would refuse
but glibc accepts (``"a:b"``, ``"été"``) is stored hex-encoded under
``.psm/``, a component no CPython name can produce (CPython names hold no
inner ``/``).  A name glibc refuses is refused with glibc's errno.

Connection.  One :class:`~shmbroker.Broker` per process, made on first use.
A forked child must not talk over its parent's socket (the replies would
interleave), so a pid change makes a new one; the inherited one is left to
the parent, whose segments it holds.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TypedDict

from pydantic_core import PydanticCustomError

from . import wire
from ._params import Lifetime
from ._sync import Broker
from .errors import BrokerError

__all__ = ["Extras", "broker_name", "check_extras", "default_broker", "forget_default", "translate"]


class Extras(TypedDict, total=False):
    """The keyword-only extras of SharedMemory (and ShareableList), beyond CPython's."""

    mode: int | None
    readonly: bool
    wait: float | None
    lifetime: Lifetime
    ttl: float | None
    broker: Broker | None


def check_extras(extras: Extras) -> None:
    """``TypeError`` for a keyword that is no extra (``**`` would take it silently)."""
    unknown = sorted(extras.keys() - Extras.__annotations__.keys())
    if unknown:
        raise TypeError(f"SharedMemory() got an unexpected keyword argument {unknown[0]!r}")


#: the component under which names outside the broker's alphabet are kept
ESCAPED = ".psm"

_lock = threading.Lock()
_default: tuple[int, Broker] | None = None


def _invalid(num: int, name: str) -> OSError:
    return OSError(num, os.strerror(num), name)


def broker_name(name: str) -> str:
    """The broker name for a CPython-style name (leading ``/`` allowed).

    Raises ``ValueError`` for an embedded NUL (as CPython does), ``OSError``
    ``EINVAL`` for an empty name or a misplaced ``/`` and ``ENAMETOOLONG``
    past 255 bytes (as ``shm_open`` does).
    """
    if "\0" in name:
        raise ValueError("embedded null character")
    bare = name.lstrip("/")
    raw = bare.encode("utf-8", "surrogateescape")
    if not bare:
        raise _invalid(errno.EINVAL, name)
    if len(raw) > wire.MAX_NAME:
        raise _invalid(errno.ENAMETOOLONG, name)
    try:
        return wire.check_name(bare)  # the broker's own names, hierarchy included
    except PydanticCustomError:
        pass
    if "/" in bare:
        raise _invalid(errno.EINVAL, name) from None
    escaped = f"{ESCAPED}/{raw.hex()}"
    if len(escaped) > wire.MAX_NAME:
        raise _invalid(errno.ENAMETOOLONG, name)
    return escaped


def translate(exc: BrokerError, name: str) -> BrokerError:
    """The same error naming the file as CPython's would (``'/name'``)."""
    return type(exc)(exc.errno, exc.strerror, name)


def default_broker() -> Broker:
    """This process's connection to the daemon, made (again after a fork) on first use.

    Raises ``FileNotFoundError`` or ``ConnectionRefusedError`` naming the
    socket when no daemon listens.
    """
    global _default
    with _lock:
        pid = os.getpid()
        if _default is None or _default[0] != pid:
            _default = (pid, Broker())
        return _default[1]


def forget_default() -> None:
    """Forget the default connection (in a forked child, where the parent's
    lock may be held; or to follow a changed ``$SHMBROKER_SOCKET``)."""
    global _default, _lock
    _default = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=forget_default)
