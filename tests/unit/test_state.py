"""The state file, fed directly: what is on disk before and after a reply."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbrokerd.state import Loaded, StateFile, _apply


def _lines(state: StateFile) -> list[str]:
    return state.journal.read_text().splitlines()


def test_a_grant_is_on_file_before_its_reply_an_unlease_may_trail(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    state.open()
    try:
        state.record({"k": "unlease", "t": "a"})
        state.before_reply()  # nothing here must precede a reply
        assert _lines(state) == []
        state.record({"k": "lease", "t": "b", "s": "x", "u": 0, "a": "ro", "c": False})
        state.before_reply()  # a lease must: written, with the unlease before it, in order
        assert [line.split('"t":"')[1][0] for line in _lines(state)] == ["a", "b"]
        state.record({"k": "unlease", "t": "b"})
        state.flush()  # after the replies: everything
        assert len(_lines(state)) == 3
    finally:
        state.close()


def test_a_snapshot_from_the_kept_records_loads_as_the_journal_would(tmp_path: Path) -> None:
    seg = {"k": "seg", "id": "s1", "name": "a", "size": 1, "sealed": False, "at": None}
    other = {**seg, "id": "s2", "name": "b"}
    history: list[dict[str, Any]] = [
        seg,
        other,
        {"k": "lease", "t": "t1", "s": "s1", "u": 0, "a": "ro", "c": True},
        {"k": "lease", "t": "t2", "s": "s2", "u": 0, "a": "ro", "c": True},
        {"k": "lease", "t": "t3", "s": "s1", "u": 0, "a": "rw", "c": False},
        {"k": "seal", "id": "s1"},
        {"k": "ttl", "id": "s1", "at": 12.5},
        {"k": "unlease", "t": "t3"},
        {"k": "unseg", "id": "s2"},  # its lease t2 goes with it
    ]
    state = StateFile(tmp_path)
    state.open()
    for rec in history:
        state.record(rec)
    state.flush()
    replayed = state.load()  # snapshot (none) + journal
    state.compact()  # from the kept records
    assert state.journal.read_bytes() == b""
    compacted = state.load()  # snapshot alone
    state.close()
    assert compacted.segments == replayed.segments
    assert compacted.leases == replayed.leases
    assert compacted.segments["s1"]["sealed"] is True
    assert compacted.segments["s1"]["at"] == 12.5
    assert set(compacted.leases) == {"t1"}


def _replayed(records: list[dict[str, Any]]) -> Loaded:
    loaded = Loaded()
    for rec in records:
        _apply(loaded, json.loads(json.dumps(rec)))
    return loaded


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 99)), max_size=80
    ),
    compact_after=st.sampled_from([1, 3, 10, 1000]),
)
def test_what_is_on_disk_follows_the_records_at_every_step(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[int, int, int]],
    compact_after: int,
) -> None:
    """Records mixed with the daemon's moments: before a reply (urgent ones
    written), catching up (everything written, maybe a snapshot), a snapshot.
    What a restart would load is the truth at every step, but for leases
    whose unlease is still waiting; after catching up it is the truth."""
    directory = tmp_path_factory.mktemp("state")
    state = StateFile(directory, compact_after)
    state.open()
    history: list[dict[str, Any]] = []
    segs: list[str] = []
    leases: list[str] = []
    try:
        for n, (kind, moment, pick) in enumerate(steps):
            rec: dict[str, Any] | None = None
            if kind < 2 or not segs:
                rec = {"k": "seg", "id": f"s{n}", "name": f"n{n}", "size": 1, "sealed": False}
                rec["at"] = None
                segs.append(rec["id"])
            elif kind < 5:
                rec = {"k": "lease", "t": f"t{n}", "s": segs[pick % len(segs)], "u": 0}
                rec.update(a="ro", c=False)
                leases.append(rec["t"])
            elif kind < 7 and leases:
                rec = {"k": "unlease", "t": leases.pop(pick % len(leases))}
            elif kind == 7:
                rec = {"k": "unseg", "id": segs.pop(pick % len(segs))}
            elif kind == 8:
                rec = {"k": "seal", "id": segs[pick % len(segs)]}
            else:
                rec = {"k": "ttl", "id": segs[pick % len(segs)], "at": float(pick)}
            if rec is not None:
                state.record(rec)
                history.append(rec)
            if moment < 4:
                state.before_reply()
            elif moment < 6:
                state.catch_up()
            elif moment == 6:
                state.compact()
            truth = _replayed(history)
            on_disk = StateFile(directory).load()
            if state.trailing or state.urgent:
                waiting = [json.loads(line) for line in state._buffer]
                if not state.urgent:
                    assert all(r["k"] == "unlease" for r in waiting)
                    assert on_disk.segments == truth.segments
                    assert set(truth.leases) <= set(on_disk.leases)
                    assert set(on_disk.leases) - set(truth.leases) <= {r["t"] for r in waiting}
            else:
                assert on_disk.segments == truth.segments
                assert on_disk.leases == truth.leases
        state.catch_up()
        truth = _replayed(history)
        assert StateFile(directory).load().leases == truth.leases
        kept = _replayed(json.loads(state.live.snapshot())["records"])
        assert kept.segments == truth.segments
        assert kept.leases == truth.leases
    finally:
        state.close()


def test_a_write_cut_short_loses_nothing_once_writing_works(tmp_path: Path) -> None:
    """A real short write (RLIMIT_FSIZE lets 7 bytes through, then EFBIG): the
    records stay buffered and urgent, and once writing works they follow the
    torn fragment on a line of their own, so none is glued to it and lost."""
    state = StateFile(tmp_path)
    state.open()
    seg = {"k": "seg", "id": "s1", "name": "a", "size": 1, "sealed": False, "at": None}
    lease = {"k": "lease", "t": "t1", "s": "s1", "u": 0, "a": "ro", "c": False}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        state.record(seg)
        state.before_reply()
        resource.setrlimit(resource.RLIMIT_FSIZE, (state.journal.stat().st_size + 7, hard))
        state.record(lease)
        with pytest.raises(OSError, match="too large"):
            state.before_reply()
        assert state.urgent  # no reply may go out
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        state.record({"k": "seal", "id": "s1"})
        state.before_reply()
        assert not state.urgent
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        state.close()
    loaded = StateFile(tmp_path).load()
    assert set(loaded.leases) == {"t1"}
    assert loaded.segments["s1"]["sealed"] is True
