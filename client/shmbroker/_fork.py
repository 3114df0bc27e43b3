"""Fork safety: a forked child never acts on its parent's connection or leases.

A child process inherits the parent's connected socket and its lease
tokens.  Sending on that socket would put the child's requests on the
parent's connection (its leases would be the parent's, and a ``close()`` of
an inherited Segment would release the parent's lease).  So, right after
``fork`` in the child (``os.register_at_fork``), every live broker drops its
copy of the socket (the parent's connection lives on) and forgets the
parent's leases: the child's first call connects anew, and inherited
Segments stay mapped but release nothing when closed.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["track"]


class _Forkable(Protocol):
    def _after_fork(self) -> None: ...


_live: weakref.WeakSet[_Forkable] = weakref.WeakSet()


def track(broker: _Forkable) -> None:
    """Have ``broker._after_fork()`` called in every child forked from now on."""
    _live.add(broker)


def _in_child() -> None:
    for broker in list(_live):
        broker._after_fork()


os.register_at_fork(after_in_child=_in_child)
