"""The state file's records: every kind, how it is built and read back, what a run leaves live.

Strategy: the registry journals each change as one small record, the state
file writes them (``state.py``) and a restart reads them back; this module
is the one place that knows their fields, so the three agree by
construction.  A record is a plain dict, encoded as it stands (JSON, by
``pydantic_core.to_json``): the key order of each builder below is the
file format, byte for byte, and must not change (state files of earlier
runs must load).

Kinds, with their keys (``k`` names the kind):

* ``seg``: a segment, every field of the contract's Segment object but
  ``leases``, then ``at`` (the wall-clock end of its ttl countdown, or null);
* ``unseg`` (``id``): it left the namespace; its leases' records go with it;
* ``seal`` (``id``);
* ``ttl`` (``id``, ``at``): a countdown began (``at``) or was cancelled (null);
* ``lease`` (``t`` token, ``s`` segment id, ``u`` uid, ``a`` access,
  ``c`` whether it is the creating lease);
* ``unlease`` (``t``): the one kind that may trail its reply (``state.py``).

The builders are plain functions (one call each, no validation): they run
on every ``open`` and ``release``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from .model import Access, SegmentRecord

__all__ = [
    "UNLEASE",
    "Record",
    "Replay",
    "lease",
    "leases_from",
    "seal",
    "segment",
    "segment_from",
    "ttl",
    "unlease",
    "unsegment",
]

Record = dict[str, Any]
V = TypeVar("V")

#: the kind of record no reply waits for (see ``state.py``)
UNLEASE = "unlease"

# -- building ------------------------------------------------------------------


def segment(seg: SegmentRecord) -> Record:
    """A segment's ``seg`` record (journaled at create, and in every snapshot):
    its contract description but ``leases``, then ``k`` and ``at``, in that order."""
    rec: Record = seg.describe()
    del rec["leases"]
    rec["k"] = "seg"
    rec["at"] = seg.ttl_deadline
    return rec


def unsegment(segment_id: str) -> Record:
    return {"k": "unseg", "id": segment_id}


def seal(segment_id: str) -> Record:
    return {"k": "seal", "id": segment_id}


def ttl(segment_id: str, at: float | None) -> Record:
    return {"k": "ttl", "id": segment_id, "at": at}


def lease(token: str, segment_id: str, uid: int, access: Access, creator: bool) -> Record:
    return {"k": "lease", "t": token, "s": segment_id, "u": uid, "a": access, "c": creator}


def unlease(token: str) -> Record:
    return {"k": UNLEASE, "t": token}


# -- reading back ------------------------------------------------------------------


def segment_from(rec: Record) -> SegmentRecord | None:
    """The segment a ``seg`` record describes; None if it is malformed."""
    try:
        return SegmentRecord(
            id=str(rec["id"]),
            name=str(rec["name"]),
            size=int(rec["size"]),
            lifetime=str(rec["lifetime"]),
            ttl=None if rec.get("ttl") is None else float(rec["ttl"]),
            backing=str(rec["backing"]),
            mode=int(rec["mode"]),
            created=float(rec["created"]),
            owner_uid=int(rec["owner_uid"]),
            owner_gid=int(rec["owner_gid"]),
            sealed=bool(rec.get("sealed", False)),
            ttl_deadline=None if rec.get("at") is None else float(rec["at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def leases_from(records: Iterable[Record]) -> list[tuple[str, int, Any, bool]]:
    """``(token, uid, access, creator)`` of each well-formed ``lease`` record,
    as :meth:`Registry.restore <shmbrokerd.registry.Registry.restore>` takes them."""
    return [
        (str(rec["t"]), int(rec["u"]), rec["a"], bool(rec.get("c")))
        for rec in records
        if rec.get("a") in ("ro", "rw")
    ]


class Replay(Generic[V]):
    """The journal's rules: which segments and leases a sequence of records leaves live.

    One set of rules for both forms of the state: records as dicts (what a
    restarting daemon reads) and as their encoded bytes (what a snapshot
    would hold now), both in ``state.py``.  ``patch`` changes one field of a
    segment's record (``seal``, ``ttl``).  A malformed record raises
    ``KeyError`` or ``TypeError`` (the reader skips it).
    """

    def __init__(self, patch: Callable[[V, str, Any], V]) -> None:
        self.segments: dict[str, V] = {}
        self.leases: dict[str, V] = {}
        #: segment id -> tokens of its leases (so an unlink drops them in O(leases))
        self.by_segment: dict[str, set[str]] = {}
        self._segment_of: dict[str, str] = {}
        self._patch = patch

    def add(self, rec: Record, value: V) -> None:
        kind = rec.get("k")
        if kind == "lease":
            token, sid = rec["t"], rec["s"]
            if sid in self.segments and token not in self.leases:
                self.leases[token] = value
                self._segment_of[token] = sid
                self.by_segment.setdefault(sid, set()).add(token)
        elif kind == UNLEASE:
            sid = self._segment_of.pop(rec["t"], None)
            if sid is not None:
                del self.leases[rec["t"]]
                tokens = self.by_segment[sid]
                tokens.discard(rec["t"])
                if not tokens:
                    del self.by_segment[sid]
        elif kind == "seg":
            self.segments[rec["id"]] = value
        elif kind == "unseg":
            self.segments.pop(rec["id"], None)
            for token in self.by_segment.pop(rec["id"], ()):
                del self.leases[token]
                del self._segment_of[token]
        elif kind in ("seal", "ttl") and rec["id"] in self.segments:
            field, new = ("sealed", True) if kind == "seal" else ("at", rec["at"])
            self.segments[rec["id"]] = self._patch(self.segments[rec["id"]], field, new)
