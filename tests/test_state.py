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
        state.flush_urgent()  # nothing here must precede a reply
        assert _lines(state) == []
        state.record({"k": "lease", "t": "b", "s": "x", "u": 0, "a": "ro", "c": False})
        state.flush_urgent()  # a lease must: written, with the unlease before it, in order
        assert [line.split('"t":"')[1][0] for line in _lines(state)] == ["a", "b"]
        state.record({"k": "unlease", "t": "b"})
        state.flush()  # after the replies: everything
        assert len(_lines(state)) == 3
    finally:
        state.close()
