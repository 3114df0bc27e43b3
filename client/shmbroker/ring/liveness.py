"""Is a ring's writer still running?  Asked of the kernel, never of the daemon.

The writer names itself in the ring's header (:func:`writer_identity`); a
reader that has waited a second asks :func:`writer_gone`.  A pid alone could
be reused, and means nothing in another pid namespace: the start time and
the namespace tell those cases apart.
"""

from __future__ import annotations

import os

__all__ = ["has_ended", "own_identity", "writer_gone", "writer_identity"]


def writer_identity() -> tuple[int, int, int] | None:
    """``(pid, start time, pid namespace)`` of this process, for the header."""
    me = own_identity()
    return None if me is None else (os.getpid(), *me)


def writer_gone(pid: int, start: int, pidns: int) -> bool:
    """Has the writer so named ended?  False when this process cannot tell: no
    identity in the header (``pid`` 0), or another pid namespace than ours."""
    if not pid:
        return False
    mine = own_identity()
    if mine is None or mine[1] != pidns:
        return False
    return has_ended(pid, start)


def own_identity() -> tuple[int, int] | None:
    """``(start time, pid namespace)`` of this process, None if ``/proc`` cannot say.

    ``/proc`` may be another pid namespace's (``unshare -p`` without a new
    ``/proc``): then its ``self`` is not this process, and nothing is said.
    """
    try:
        fields = _stat_fields("self")
        if int(fields[0]) != os.getpid():
            return None
        return int(fields[21]), os.stat("/proc/self/ns/pid").st_ino
    except (OSError, IndexError, ValueError):
        return None


def has_ended(pid: int, start: int) -> bool:
    """Has process ``pid``, started at ``start``, ended?  False when it cannot be told.

    ``kill(pid, 0)`` says whether the pid exists at all (``/proc`` may hide
    other users' processes); ``/proc/<pid>/stat``, when readable, tells a
    zombie and a reused pid apart.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, someone else's
    try:
        fields = _stat_fields(str(pid))
        return fields[2] in (b"Z", b"X") or int(fields[21]) != start
    except (OSError, IndexError, ValueError):
        return False  # hidden: it exists, that is all one can tell


def _stat_fields(pid: str) -> list[bytes]:
    """``/proc/<pid>/stat`` split into fields, the command name kept whole."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    head, _, rest = data.rpartition(b")")
    return [head.split(b" (", 1)[0], b"", *rest.split()]
