"""Recovery: at start, take back the last run's segments and leases.

Strategy: the state file says what the last run held; ``/dev/shm`` (and,
for memfds, systemd's fd store) says what is really there.  An entry
whose object is gone is dropped; an object under our prefix that no entry
names is a leftover of a crash and is unlinked (a stored memfd no entry
names is closed).  Each is logged.  The registry gets every segment back
with its leases awaiting ``reclaim`` (it journals nothing for that); then
a fresh snapshot replaces the old state when the one read is not exactly
what was kept.  Runs once, before the socket accepts.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from . import records
from .backing import Store
from .registry import Registry
from .state import StateFile

__all__ = ["recover"]

log = logging.getLogger("shmbrokerd")


def recover(
    state: StateFile,
    store: Store,
    registry: Registry,
    memfds: dict[str, int],
    *,
    drop_fd: Callable[[str], None],
    reclaim_window: float,
) -> dict[str, Any]:
    """Restore the last run into ``registry`` and open ``state`` for this one.

    ``memfds`` are the fd store's, by segment id (those no entry names are
    closed, and ``drop_fd`` takes them out of the store).  Returns what
    ``stats`` reports as ``recovery``.  Raises ``OSError`` if the state
    cannot be opened or the snapshot written.
    """
    started = time.perf_counter()
    previous_run = state.snapshot.exists() or state.journal.exists()
    loaded = state.load()
    leases = loaded.leases_by_segment()
    objects = set(store.objects())
    kept = 0
    snapshot = not state.snapshot.exists()
    for seg_id, rec in loaded.segments.items():
        seg = records.segment_from(rec)
        if seg is None:
            log.warning("state: dropping unreadable entry %s", seg_id)
            continue
        if seg.backing == "memfd":
            fd = memfds.pop(seg_id, None)
            if fd is None:
                log.warning("state: memfd %s (%s) not in the fd store; dropped", seg.name, seg_id)
                continue
            store.adopt_memfd(seg_id, fd)
        elif seg_id in objects:
            objects.discard(seg_id)
        else:
            log.warning("state: object of %s (%s) is gone; dropped", seg.name, seg_id)
            continue
        registry.restore(seg, records.leases_from(leases.get(seg_id, [])))
        kept += 1
    for seg_id in objects:
        log.warning("removing orphaned object %s (no state entry)", store.path(seg_id))
        store.unlink(seg_id, "shm")
    for seg_id, fd in memfds.items():
        log.warning("closing stored memfd %s (no state entry)", seg_id)
        os.close(fd)
        drop_fd(seg_id)
    if loaded.segments:
        log.info(
            "recovered %d of %d segments; %d leases may be reclaimed for %.0f s",
            kept,
            len(loaded.segments),
            registry.unreclaimed(),
            reclaim_window,
        )
    state.open()
    recovery: dict[str, Any] = {
        "restarts": _count_restart(state) if previous_run else state.restarts(),
        "segments": kept,
        "dropped": len(loaded.segments) - kept,
        "leases": registry.unreclaimed(),
    }
    # what the state file keeps for later snapshots starts from what was
    # restored, compacted now or not (restore journals nothing)
    state.keep(registry.records())
    if snapshot or state.dirty or kept != len(loaded.segments):
        state.compact()
    del loaded, leases
    _give_back_memory()
    recovery["seconds"] = time.perf_counter() - started
    return recovery


def _count_restart(state: StateFile) -> int:
    try:
        return state.count_restart()
    except OSError as exc:  # a counter is not worth failing the start for
        log.warning("restart count not saved: %s", exc)
        return state.restarts()


def _give_back_memory() -> None:
    """Return the replayed state's freed heap to the system (glibc keeps it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
