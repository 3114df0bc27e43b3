"""The persisted state: what a restarted daemon needs to take its segments back.

Strategy: a snapshot (one JSON document) plus an append-only journal (JSON
Lines) in the state directory.  Every change the registry makes is a small
record; records are buffered and written (one ``write``) before the reply
that depends on them leaves, so a client never holds a lease the state does
not know, even if the daemon is SIGKILLed the next instant.  An ``unlease``
alone is the exception: it may trail its reply, written with the next
record that must precede one or at most ``JOURNAL_LAG`` (50 ms) later
(:meth:`StateFile.catch_up`, scheduled by the daemon), because losing it
costs nothing lasting: after a restart the lease is merely reclaimable,
and ends with the reclaim window.
When the journal grows past a bound, a new snapshot is written atomically
(temp file, fsync, rename, fsync of the directory) and the journal starts
over.  That snapshot is not re-encoded from the registry: the state file
keeps the encoded record of every live segment and lease (:class:`Live`,
the journal replayed in bytes, after the replies of each wakeup), so
writing it while
serving is a join and a write: 40-60 ms with 100,000 segments, where
building and encoding their records from the registry stalled the daemon
for about 0.3 s.  A torn last line (a crash
mid-write) is ignored on load.

The records themselves, their fields and the rules of their replay are
``records.py``'s; this module stores them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import from_json, to_json

from .records import UNLEASE, Record, Replay

__all__ = ["Loaded", "StateCounters", "StateFile"]

log = logging.getLogger("shmbrokerd.state")


def _patch_dict(rec: Record, field: str, value: Any) -> Record:
    rec[field] = value
    return rec


def _patch_bytes(data: bytes, field: str, value: Any) -> bytes:
    rec = from_json(data)
    rec[field] = value
    return to_json(rec)


class Loaded(Replay[Record]):
    """The state replayed from disk: live segments and held leases, by id/token."""

    def __init__(self) -> None:
        super().__init__(_patch_dict)

    def leases_by_segment(self) -> dict[str, list[Record]]:
        """Leases of the live segments, grouped by segment id."""
        return {sid: [self.leases[t] for t in tokens] for sid, tokens in self.by_segment.items()}


class Live(Replay[bytes]):
    """What a snapshot would hold now, kept encoded: the journal replayed in bytes.

    A segment's ``seal`` and ``ttl`` (rare) re-encode its record.
    """

    def __init__(self) -> None:
        super().__init__(_patch_bytes)

    def snapshot(self) -> bytes:
        """The snapshot document: segments first (a lease needs its segment on load)."""
        records = b",".join(itertools.chain(self.segments.values(), self.leases.values()))
        return b'{"version":1,"records":[' + records + b"]}"


class StateFile:
    def __init__(self, directory: Path, compact_after: int = 200_000) -> None:
        self.dir = directory
        self.snapshot = directory / "state.json"
        self.journal = directory / "journal.jsonl"
        self.compact_after = compact_after
        #: journal length at which a snapshot is next tried while serving
        self._compact_at = compact_after
        self._fd = -1
        self._buffer: list[bytes] = []
        #: buffered records must be written before the next reply (before_reply)
        self.urgent = False
        self.live = Live()
        #: records not yet replayed into ``live`` (see :meth:`settle`)
        self._unsettled: list[tuple[Record, bytes]] = []
        self._torn = False  # did the last write fail, maybe halfway through a line?
        self._journaled = 0
        self.counters = StateCounters()

    # -- reading -----------------------------------------------------------------

    def load(self) -> Loaded:
        state = Loaded()
        for rec in _read_snapshot(self.snapshot):
            _apply(state, rec)
        journal = _read_lines(self.journal)
        for rec in journal:
            _apply(state, rec)
        self._journaled = len(journal)
        if not journal and _size(self.journal):
            # only a torn fragment: dirty, so that it is compacted away now,
            # not glued to the next record appended
            self._journaled = 1
        return state

    # -- writing -----------------------------------------------------------------

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(
            self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    def record(self, rec: Record) -> None:
        """Queue one change; :meth:`flush` writes it."""
        data = to_json(rec)
        self._buffer.append(data)
        self._unsettled.append((rec, data))
        if rec["k"] != UNLEASE:
            self.urgent = True

    def settle(self) -> None:
        """Replay the records journaled since the last call into ``live``.

        Nothing on file depends on it, no reply waits for it: done after
        the replies (:meth:`catch_up`), or before a snapshot is taken from
        ``live``.
        """
        add = self.live.add
        for rec, data in self._unsettled:
            add(rec, data)
        self._unsettled.clear()

    @property
    def trailing(self) -> bool:
        """Is anything left for :meth:`catch_up`?"""
        return bool(self._buffer or self._unsettled)

    def catch_up(self) -> None:
        """What may trail the replies: the rest of the journal, then :meth:`settle`."""
        self.flush()
        self.settle()
        if self._journaled >= self._compact_at:
            self._compact_while_serving()

    def before_reply(self) -> None:
        """The state must know a change before any reply that depends on it leaves;
        then, if the journal is long, a snapshot (from ``live``: a short stall)."""
        if self.urgent:
            self.flush()
        if self._journaled >= self._compact_at:
            self._compact_while_serving()

    def _compact_while_serving(self) -> None:
        """A snapshot that fails (a full or broken state directory) fails no request:
        the journal, still written, holds everything; it is tried again later."""
        try:
            self.compact()
        except OSError as exc:
            self._compact_at = self._journaled + max(self.compact_after // 8, 1)
            log.error(
                "snapshot %s failed: %s; the journal keeps growing, next try after %d more records",
                self.snapshot,
                exc.strerror or exc,
                self._compact_at - self._journaled,
            )

    def flush(self) -> None:
        """Write what is buffered.  A write that fails (a full or broken state
        directory) raises and keeps the records, still urgent: no reply that
        needs them goes out, and they are written first once writing works."""
        if not self._buffer or self._fd < 0:
            self.urgent = False
            return
        data = b"\n".join(self._buffer) + b"\n"
        if self._torn:  # a failed write may have left part of a line: end it
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._torn = True
            self.counters.write_failures += 1
            raise
        self._torn = False
        self.counters.writes += 1
        self.counters.records += len(self._buffer)
        self._journaled += len(self._buffer)
        self._buffer.clear()
        self.urgent = False

    @property
    def dirty(self) -> bool:
        """Has anything been journaled since the last snapshot?"""
        return bool(self._journaled or self._buffer)

    def keep(self, records: Iterable[Record]) -> None:
        """Start what a snapshot would hold over from ``records`` (the registry's).

        At start, after the registry restored what the state described (a
        restore journals nothing), so that the next snapshot written while
        serving holds the restored segments and leases.
        """
        self.live = Live()
        self._unsettled.clear()  # what ``records`` hold already
        for rec in records:
            self.live.add(rec, to_json(rec))

    def compact(self, records: Iterable[Record] | None = None) -> None:
        """Write a snapshot atomically and start a new journal.

        The snapshot is of ``records`` when given (at start and stop: the
        registry's view, after recovery reconciled it with ``/dev/shm``),
        else of what the journal says is live (while serving).
        """
        started = time.perf_counter()
        try:
            self._compact(records)
        except OSError:
            self.counters.snapshot_failures += 1
            raise
        self.counters.snapshot_took(time.perf_counter() - started)

    def _compact(self, records: Iterable[Record] | None) -> None:
        self.flush()
        if records is not None:
            self.keep(records)
        else:
            self.settle()
        tmp = self.snapshot.with_suffix(".tmp")
        data = self.live.snapshot()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.snapshot)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            self._torn = False
        self._journaled = 0
        self._compact_at = self.compact_after

    def count_restart(self) -> int:
        """One more start that found a previous run's state; the count so far.

        Kept in its own small file (replaced atomically), read by ``stats``.
        """
        path = self.dir / "restarts"
        try:
            count = int(path.read_text()) + 1
        except (FileNotFoundError, ValueError):
            count = 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{count}\n")
        os.rename(tmp, path)
        return count

    def restarts(self) -> int:
        """How many starts found a previous run's state (0 before the first)."""
        try:
            return int((self.dir / "restarts").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def close(self) -> None:
        """Write what is left if it can (a failure was said already), then close."""
        with contextlib.suppress(OSError):
            self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class StateCounters:
    """What the state file did, for ``stats``."""

    #: successful journal writes (one ``write`` holds the records of a reply or more)
    writes: int = 0
    records: int = 0
    write_failures: int = 0
    snapshots: int = 0
    snapshot_failures: int = 0
    snapshot_seconds: float = 0.0
    last_snapshot_seconds: float = 0.0

    def snapshot_took(self, seconds: float) -> None:
        self.snapshots += 1
        self.snapshot_seconds += seconds
        self.last_snapshot_seconds = seconds


def _read_snapshot(path: Path) -> list[Record]:
    try:
        doc = from_json(path.read_bytes())
    except FileNotFoundError:
        return []
    except ValueError:
        log.error("%s: unreadable snapshot ignored", path)
        return []
    records = doc.get("records") if isinstance(doc, dict) else None
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_lines(path: Path) -> list[Record]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line:
            continue
        try:
            rec = from_json(line)
        except ValueError:
            log.warning("%s:%d: skipping a torn or corrupt record", path, n)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _apply(state: Loaded, rec: Record) -> None:
    """Replay one record read from disk (a malformed one changes nothing)."""
    with contextlib.suppress(KeyError, TypeError):
        state.add(rec, rec)
