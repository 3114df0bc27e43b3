"""The persisted state: what a restarted daemon needs to take its segments back.

Strategy: a snapshot plus an append-only journal, both JSON Lines in the
state directory.  Every change the registry makes is a small record; records
are buffered and written (one ``write``) before the reply that depends on
them leaves, so a client never holds a lease the state does not know, even
if the daemon is SIGKILLed the next instant.  When the journal grows past a
bound, a new snapshot is written atomically (temp file, fsync, rename, fsync
of the directory) and the journal starts over.  A torn last line (a crash
mid-write) is ignored on load.

Records: ``seg`` (a segment, all its fields), ``unseg`` (it left the
namespace), ``seal``, ``ttl`` (countdown deadline, wall clock, or null),
``lease`` (token, segment id, uid, access, creator flag), ``unlease``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Loaded", "StateFile"]

log = logging.getLogger("shmbrokerd.state")

Record = dict[str, Any]


@dataclass
class Loaded:
    """The state replayed from disk: live segments and held leases, by id/token."""

    segments: dict[str, Record] = field(default_factory=dict)
    leases: dict[str, Record] = field(default_factory=dict)
    next_id: int = 0


class StateFile:
    def __init__(self, directory: Path, compact_after: int = 200_000) -> None:
        self.dir = directory
        self.snapshot = directory / "state.jsonl"
        self.journal = directory / "journal.jsonl"
        self.compact_after = compact_after
        self._fd = -1
        self._buffer: list[str] = []
        self._journaled = 0

    # -- reading -----------------------------------------------------------------

    def load(self) -> Loaded:
        state = Loaded()
        for path in (self.snapshot, self.journal):
            for rec in _read_lines(path):
                _apply(state, rec)
        return state

    # -- writing -----------------------------------------------------------------

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(
            self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    def record(self, rec: Record) -> None:
        """Queue one change; :meth:`flush` writes it."""
        self._buffer.append(json.dumps(rec, separators=(",", ":")))

    def flush(self) -> None:
        if not self._buffer or self._fd < 0:
            return
        data = ("\n".join(self._buffer) + "\n").encode()
        self._journaled += len(self._buffer)
        self._buffer.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    @property
    def wants_compaction(self) -> bool:
        return self._journaled >= self.compact_after

    def compact(self, records: Iterable[Record]) -> None:
        """Write a snapshot of ``records`` atomically and start a new journal."""
        self.flush()
        tmp = self.snapshot.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", closefd=False) as f:
                for rec in records:
                    f.write(json.dumps(rec, separators=(",", ":")))
                    f.write("\n")
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
        self._journaled = 0

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_lines(path: Path) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s:%d: skipping a torn or corrupt record", path, n)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _apply(state: Loaded, rec: Record) -> None:
    kind = rec.get("k")
    with contextlib.suppress(KeyError, TypeError):
        if kind == "seg":
            state.segments[rec["id"]] = rec
        elif kind == "unseg":
            state.segments.pop(rec["id"], None)
            for token in [t for t, lease in state.leases.items() if lease["s"] == rec["id"]]:
                del state.leases[token]
        elif kind == "seal":
            state.segments[rec["id"]]["sealed"] = True
        elif kind == "ttl":
            state.segments[rec["id"]]["at"] = rec["at"]
        elif kind == "lease":
            if rec["s"] in state.segments:
                state.leases[rec["t"]] = rec
        elif kind == "unlease":
            state.leases.pop(rec["t"], None)
