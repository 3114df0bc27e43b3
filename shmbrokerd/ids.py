"""Lease tokens and segment ids: where the names a registry hands out come from.

Kept apart from the daemon so that the registry, and its tests, take them
as plain callables (``new_token``, ``new_segment_id``) without importing
the daemon's lifecycle.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable

__all__ = ["TokenSource", "segment_ids"]


class TokenSource:
    """Lease tokens: 192 random bits each, as ``secrets.token_urlsafe(24)`` gives.

    The bits come from ``os.urandom`` a few KiB at a time instead of one
    ``getrandom`` call per token: the same source, a system call less per
    ``open``.  They are encoded a pool at a time too: 24 bytes are 32
    base64 characters with no padding, so the encoding of the pool is the
    tokens of its 24-byte pieces, end to end.
    """

    _CHUNK = 24 * 170

    def __init__(self) -> None:
        self._pool = ""
        self._at = 0

    def next(self) -> str:
        at = self._at
        if at == len(self._pool):
            self._pool = base64.urlsafe_b64encode(os.urandom(self._CHUNK)).decode("ascii")
            at = 0
        self._at = at + 32
        return self._pool[at : at + 32]


def segment_ids() -> Callable[[], str]:
    """Ids unique across restarts: start time in ns, then a counter, in hex."""
    epoch = time.time_ns()
    counter = 0

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"{epoch:x}-{counter:x}"

    return new_id
