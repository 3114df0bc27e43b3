"""The op handlers fed directly: a real registry and store, no socket, no loop.

What each handler answers (bytes, a grant, a wait, or a reply with work
after it) is what lets the server alone decide when to persist and send;
these check that split holds for the ops whose order matters.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmbroker import wire
from shmbrokerd.backing import Store
from shmbrokerd.registry import Grant, Registry, Waiting
from shmbrokerd.service import Reply, Service
from shmbrokerd.transport import Connection, ServerLimits
from tests.unit.test_registry import create_req, make_peer, make_registry, open_req, refused


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.registry: Registry = make_registry()
        self.store = Store("svc.", shm_dir=str(tmp))
        self.conns: dict[int, Connection] = {}
        self.closed: list[Connection] = []
        self.effects_runs = 0
        self.service = Service(
            self.registry,
            self.store,
            ServerLimits(max_clients=8, max_waiting_opens=1),
            self.conns,
            close=lambda conn, reason: self.closed.append(conn),
            run_effects=self._run,
            run_logged=lambda what: self._run(),
            hello_info=lambda: {"server": "test"},
            reload=lambda: [],
            is_monitor=lambda uid, gid, groups: False,
            stats=lambda: {"segments": len(self.registry.segments)},
            memfd_created=lambda segment_id: None,
        )

    def _run(self) -> None:
        self.effects_runs += 1
        for eff in self.registry.drain():
            del eff

    def connection(self, **peer: Any) -> Connection:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.close()
        conn = Connection(a, make_peer(self.registry, **peer))
        self.conns[conn.peer.id] = conn
        return conn

    def make(self, conn: Connection, name: str, **kw: Any) -> Grant:
        out = self.service.op_create(conn.peer, create_req(name, **kw))
        assert isinstance(out, Reply)
        assert isinstance(out.answer, Grant)
        return out.answer


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    for conn in harness.conns.values():
        conn.sock.close()


def _decoded(out: object) -> dict[str, Any]:
    assert isinstance(out, bytes), out
    reply: dict[str, Any] = json.loads(out)
    return reply


def test_create_answers_a_grant_and_its_undo_frees_the_name(h: Harness, tmp_path: Path) -> None:
    conn = h.connection()
    out = h.service.op_create(conn.peer, create_req("a"))
    assert isinstance(out, Reply)
    assert isinstance(out.answer, Grant)
    assert out.undo is not None
    assert out.then is None
    assert list(tmp_path.iterdir())  # the object exists before the reply leaves
    out.undo()  # as when the grant cannot be put on file
    assert "a" not in h.registry.segments
    again = h.service.op_create(conn.peer, create_req("a"))
    assert isinstance(again, Reply)


def test_open_answers_a_grant_or_waits_or_refuses(h: Harness) -> None:
    owner, reader = h.connection(), h.connection()
    h.make(owner, "s", mode=0o644)
    assert isinstance(h.service.op_open(reader.peer, open_req("s")), Grant)
    assert isinstance(h.service.op_open(reader.peer, open_req("later", wait=5)), Waiting)
    refused(errno.ENOENT, h.service.op_open, reader.peer, open_req("nothing"))
    # max_waiting_opens is 1 here: the second wait is refused before the registry sees it
    refused(errno.EAGAIN, h.service.op_open, reader.peer, open_req("later", wait=5))


def test_a_release_that_removes_nothing_answers_before_its_bookkeeping(h: Harness) -> None:
    owner, reader = h.connection(), h.connection()
    h.make(owner, "s", mode=0o644)
    lease = h.service.op_open(reader.peer, open_req("s"))
    assert isinstance(lease, Grant)
    req = wire.Release(id=7, op="release", lease=lease.lease)
    out = h.service.op_release(reader.peer, req)
    assert isinstance(out, Reply)
    assert out.then is not None
    assert _decoded(out.answer) == {"id": 7, "ok": True}
    assert lease.lease in h.registry.leases  # not yet: the reply goes first
    out.then()
    assert lease.lease not in h.registry.leases
    assert h.effects_runs == 1


def test_a_release_after_its_peer_left_does_nothing_more(h: Harness) -> None:
    owner, reader = h.connection(), h.connection()
    h.make(owner, "s", mode=0o644)
    lease = h.service.op_open(reader.peer, open_req("s"))
    assert isinstance(lease, Grant)
    out = h.service.op_release(reader.peer, wire.Release(id=1, op="release", lease=lease.lease))
    assert isinstance(out, Reply)
    assert out.then is not None
    del h.conns[reader.peer.id]  # the send failed: the transport closed it
    reader.sock.close()
    out.then()
    assert h.effects_runs == 0


def test_a_release_that_removes_the_segment_does_it_before_answering(h: Harness) -> None:
    owner = h.connection()
    grant = h.make(owner, "r", lifetime="refcount")
    out = h.service.op_release(owner.peer, wire.Release(id=3, op="release", lease=grant.lease))
    assert _decoded(out)["ok"] is True
    assert "r" not in h.registry.segments  # the name is free when the reply arrives


def test_operator_only_ops_refuse_other_peers(h: Harness) -> None:
    peer = h.connection().peer
    refused(errno.EACCES, h.service.op_clients, peer, wire.Clients(id=1, op="clients"))
    refused(errno.EACCES, h.service.op_stats, peer, wire.Stats(id=1, op="stats"))
    refused(errno.EACCES, h.service.op_drop, peer, wire.Drop(id=1, op="drop", client=peer.id))
    refused(errno.EACCES, h.service.op_reload, peer, wire.Reload(id=1, op="reload"))


def test_drop_closes_its_target_only_after_the_reply(h: Harness) -> None:
    operator, target = h.connection(operator=True), h.connection()
    out = h.service.op_drop(operator.peer, wire.Drop(id=2, op="drop", client=target.peer.id))
    assert isinstance(out, Reply)
    assert out.then is not None
    assert _decoded(out.answer) == {"id": 2, "ok": True, "leases": 0}
    assert h.closed == []
    out.then()
    assert h.closed == [target]
    refused(errno.ENOENT, h.service.op_drop, operator.peer, wire.Drop(id=3, op="drop", client=999))
