"""The state file, fed directly: what is on disk before and after a reply."""

from __future__ import annotations

from pathlib import Path

from shmbrokerd.state import StateFile


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
    history = [
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
