"""A state directory that fails under the daemon: requests are still
answered, each exactly once, and nothing the daemon holds leaks.

Faults are real: a directory squatting on the snapshot's temporary file
(every snapshot fails with ``EISDIR``), and the journal made immutable
under the running daemon (``chattr +i``: every write to it fails with
``EPERM``, even through the daemon's open fd).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmbroker import Broker
from shmbrokerd.daemon import JOURNAL_LAG
from tests.integration.test_hostile import Raw, encode
from tests.support.helpers import DaemonProc, eventually, running_daemon


def _no_more_replies(raw: Raw) -> None:
    raw.sock.settimeout(0.3)
    try:
        extra = raw.sock.recv(65537)
    except TimeoutError:
        return
    finally:
        raw.sock.settimeout(10.0)
    raise AssertionError(f"a second reply: {extra!r}")


def _call(raw: Raw, rid: int, op: str, **params: Any) -> tuple[dict[str, Any], list[int]]:
    raw.send(encode({"id": rid, "op": op, **params}))
    reply, fds = raw.recv()
    assert reply["id"] == rid
    return reply, fds


@pytest.fixture
def d() -> Iterator[DaemonProc]:
    with running_daemon({"reclaim_window": 0.5}) as daemon:
        yield daemon


def _journal(d: DaemonProc) -> Path:
    return d.root / "state" / "journal.jsonl"


def test_failing_snapshots_fail_no_request_and_are_tried_again() -> None:
    with running_daemon({"state_compact_after": 4, "reclaim_window": 0.5}) as d:
        squatter = d.root / "state" / "state.tmp"
        squatter.mkdir()
        raw = Raw(d.socket)
        try:
            reply, _ = _call(raw, 1, "create", name="sf/a", size=4096, lifetime="persistent")
            assert reply["ok"], reply
            lease = reply["lease"]
            for rid in range(2, 40, 2):  # far past state_compact_after
                reply, fds = _call(raw, rid, "open", name="sf/a")
                assert reply["ok"], reply
                for fd in fds:
                    os.close(fd)
                reply, _ = _call(raw, rid + 1, "release", lease=reply["lease"])
                assert reply == {"id": rid + 1, "ok": True}
            _no_more_replies(raw)
            assert "snapshot" in d.log()
            assert "failed" in d.log()
            squatter.rmdir()
            for rid in range(100, 140, 2):  # the next tries succeed
                reply, fds = _call(raw, rid, "open", name="sf/a")
                for fd in fds:
                    os.close(fd)
                _call(raw, rid + 1, "release", lease=reply["lease"])
            eventually(lambda: (d.root / "state" / "state.json").exists())
            _call(raw, 200, "release", lease=lease)
        finally:
            raw.close()
        time.sleep(4 * JOURNAL_LAG)  # the last unleases on file too
        d.kill()
        d.start()  # the journal alone, or snapshot + journal: nothing lost
        with Broker(d.socket) as b:
            assert b.stat("sf/a").leases == 0
            b.delete("sf/a")


def test_a_release_that_fails_after_its_reply_is_answered_once(d: DaemonProc) -> None:
    """The last lease of a ttl segment: answered first, then the ttl countdown is
    journaled, which fails here; the failure is logged, not answered again.
    While the journal cannot be written, every reply that would report what
    is not on file is a refusal with the write's errno (and no fd, no lease
    left); once it can, what waited is written first and all goes on."""
    raw = Raw(d.socket)
    journal = _journal(d)
    try:
        reply, _ = _call(raw, 1, "create", name="sf/t", size=4096, lifetime="ttl", ttl=60)
        assert reply["ok"], reply
        _immutable(journal, True)
        raw.send(encode({"id": 2, "op": "release", "lease": reply["lease"]}))
        reply, _ = raw.recv()
        assert reply == {"id": 2, "ok": True}
        _no_more_replies(raw)
        eventually(lambda: "failed after its reply" in d.log())
        fd_count = d.fd_count()
        for rid in range(3, 53):
            reply, fds = _call(raw, rid, "open", name="sf/t")
            assert not fds
            assert reply["ok"] is False
            assert reply["error"]["code"] == "EPERM", reply
        assert d.fd_count() == fd_count  # no fd left behind by a refused grant
        _immutable(journal, False)
        reply, _ = _call(raw, 60, "stat", name="sf/t")
        assert reply["ok"], reply
        assert reply["segment"]["leases"] == 0  # the refused grants left no lease
    finally:
        raw.close()
        _immutable(journal, False)
    d.kill()
    d.start()  # what waited was written: the countdown runs, no lease is held
    with Broker(d.socket) as b:
        assert b.stat("sf/t").leases == 0
        b.delete("sf/t")


def _immutable(path: Path, on: bool) -> None:
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    if done.returncode and on:
        pytest.skip(f"chattr +i not possible here: {done.stderr.decode().strip()}")


def test_no_reply_reports_what_a_failed_write_left_off_file(d: DaemonProc) -> None:
    """A waiter is woken by a create while the journal cannot be written: the
    waiter's grant fails first; the creator must not then be told ok (its
    segment's record is still not on file), and each gets one reply."""
    journal = _journal(d)
    a, b = Raw(d.socket), Raw(d.socket)
    try:
        b.send(encode({"id": 1, "op": "open", "name": "sf/w", "wait": 5}))
        assert _call(a, 1, "hello")[0]["ok"]  # b's open is waiting by now
        _immutable(journal, True)
        created, fds = _call(a, 2, "create", name="sf/w", size=4096, lifetime="persistent")
        assert created["ok"] is False, created
        assert created["error"]["code"] == "EPERM"
        assert not fds
        woken, fds = b.recv()
        assert woken["id"] == 1
        assert woken["ok"] is False, woken
        assert not fds
        _no_more_replies(a)
        _no_more_replies(b)
        _immutable(journal, False)
        assert _call(a, 3, "hello")[0]["ok"]
    finally:
        a.close()
        b.close()
        _immutable(journal, False)


def test_an_effect_that_fails_does_not_drop_the_others(d: DaemonProc) -> None:
    """A client holding two refcount segments goes away: both are unlinked in one
    batch of effects. One object cannot be unlinked (immutable): the other still is."""
    for stuck in (0, 1):  # whichever of the two the batch meets first
        with Broker(d.socket) as b:
            segs = [b.create(f"sf/r{i}", 4096) for i in range(2)]
            paths = [Path(f"/dev/shm/{d.prefix}{s.id}") for s in segs]
            _immutable(paths[stuck], True)
            try:
                b.close()  # the disconnect ends both leases at once
                eventually(lambda p=paths[1 - stuck]: not p.exists())
                assert "disconnect: " in d.log()
            finally:
                _immutable(paths[stuck], False)
                paths[stuck].unlink(missing_ok=True)
            for s in segs:
                s.close()
    with Broker(d.socket) as b:
        assert list(b.list("sf/")) == []


def test_a_refused_create_leaves_no_segment(d: DaemonProc) -> None:
    """A create whose records cannot be put on file is refused, and undone: the
    name stays free and no object is left in /dev/shm."""
    journal = _journal(d)
    raw = Raw(d.socket)
    try:
        _immutable(journal, True)
        for lifetime in ("persistent", "refcount", "owner"):
            reply, fds = _call(
                raw, 1, "create", name=f"sf/{lifetime}", size=4096, lifetime=lifetime
            )
            assert not fds
            assert reply["ok"] is False
            assert reply["error"]["code"] == "EPERM", reply
        eventually(lambda: d.objects() == [])
        _immutable(journal, False)
        for lifetime in ("persistent", "refcount", "owner"):
            reply, fds = _call(
                raw, 2, "create", name=f"sf/{lifetime}", size=4096, lifetime=lifetime
            )
            assert reply["ok"], reply  # the name was free
            for fd in fds:
                os.close(fd)
            assert _call(raw, 3, "delete", name=f"sf/{lifetime}")[0]["ok"]
    finally:
        raw.close()
        _immutable(journal, False)
    d.kill()
    d.start()
    with Broker(d.socket) as b:
        assert list(b.list("sf/")) == []
