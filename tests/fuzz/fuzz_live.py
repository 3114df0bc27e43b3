"""Fuzz a live shmbrokerd over its socket, with an oracle for every reply.

Usage::

    python -m tests.fuzz.fuzz_live --messages N [--connections K] (--socket PATH | --spawn)

prints one JSON line of counts and exits 1 if any reply broke the contract
(or, with ``--spawn``, if the daemon it started ended unhealthy).

Strategy: each of K threads drives one connection at a time and sends a mix
of random bytes, valid requests for every op over a small private name pool
(so creates, opens, seals, releases and deletes really happen, with the
leases the daemon returned), mutations of valid requests, and stray fds in
``SCM_RIGHTS``.  Every datagram is sent with what its reply must be (the
``id``, the error codes allowed, whether success is possible), computed from
``PROTOCOL.md`` and never from the daemon's code.  Replies come back in
request order except opens that wait, which are matched by id; so each
reply is checked against the request it answers.  Some connections close
abruptly, half-close, or send without reading until the daemon drops them,
and then reconnect.  Only names under a random ``fz<hex>/`` namespace are
touched (and deleted at the end), so ``--socket`` can point at a daemon that
serves others; as an operator the fuzzer also calls ``reload`` now and then.

A hang (no reply for REPLY_TIMEOUT seconds while some are owed) or a daemon
that has gone stops every worker; the summary's ``violation_samples`` then
show the last datagrams sent on the connection concerned.  ``--seed`` replays
the same datagrams per connection (not the same interleaving).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import json
import math
import os
import random
import select
import socket
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmbroker.wire import MAX_ID, MAX_MESSAGE, MAX_NAME, OP_NAMES
from tests.support.contract import DAEMON_CODES, SEGMENT_KEYS

__all__ = [
    "CODES",
    "FUZZ",
    "PARAMS",
    "FuzzOp",
    "FuzzResult",
    "cleanup",
    "daemon_fd_count",
    "daemon_rss",
    "fd_baseline",
    "hello",
    "main",
    "run_fuzz",
]

#: Error codes of the contract's table, plus EAGAIN (too many waiting opens).
CODES = DAEMON_CODES
LIFETIMES = ("persistent", "owner", "refcount", "ttl")
_ANC = socket.CMSG_SPACE(16 * 4)
_NO_ERROR: frozenset[str] = frozenset()
_BADMSG = frozenset({"EBADMSG"})
_EINVAL = frozenset({"EINVAL"})
#: While replies are owed, one must come within this many seconds (a hang
#: detector, generous for a loaded machine).
REPLY_TIMEOUT = 30.0
MAX_SAMPLES = 25
MAX_SAMPLE_LEN = 1500
#: violations after which the run stops: the daemon hangs or has gone
FATAL = frozenset({"no_reply", "send_stalled", "no_close", "connect_failed", "fuzzer_crashed"})


# -- expectations --------------------------------------------------------------------


@dataclass(slots=True)
class Pending:
    """A datagram sent, and what its reply must be."""

    kind: str
    rid: int | None  # the id the reply must carry (None: null)
    id_or_null: bool = False  # the reply may also carry a null id
    codes: frozenset[str] | None = None  # error codes allowed; None: any of CODES
    ok: bool = True  # success allowed
    op: str | None = None  # to read a success
    req: dict[str, Any] | None = None
    wait: bool = False  # an open that may wait: its reply may come out of order
    preview: bytes = b""


@dataclass(slots=True)
class Out:
    data: bytes
    pending: Pending | None  # None: no reply (an empty datagram ends the connection)
    nfds: int = 0


# -- the shared picture --------------------------------------------------------------


@dataclass
class Shared:
    socket: str
    names: list[str]
    ns: str
    #: from hello: valid requests stay within them
    max_size: int = 1 << 20
    max_wait: float = 0.2
    #: recent lease tokens of every connection (for cross-connection release/reclaim)
    tokens: deque[str] = field(default_factory=lambda: deque(maxlen=512))
    #: set when the daemon hangs or is gone: every worker stops, so a broken
    #: daemon fails the run in seconds instead of one timeout per message
    abort: threading.Event = field(default_factory=threading.Event)


@dataclass
class FuzzResult:
    counts: Counter[str]
    violations: Counter[str]
    samples: list[str]
    elapsed: float
    ns: str  # every name the run used is under "<ns>/"

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.counts["sent"],
            "elapsed": round(self.elapsed, 2),
            "rate": round(self.counts["sent"] / self.elapsed) if self.elapsed else 0,
            "violations": sum(self.violations.values()),
            "violation_kinds": dict(self.violations),
            "violation_samples": self.samples[:MAX_SAMPLES],
            "counts": dict(sorted(self.counts.items())),
        }


def name_pool(ns: str) -> list[str]:
    tails = ["a", "b", "c", "d/e", "d/f", "g.h", "i-j", "k_l", "m/n/o", "p"]
    names = [f"{ns}/{t}" for t in tails]
    names.append(f"{ns}/" + "x" * (MAX_NAME - len(ns) - 1))  # exactly 255 bytes
    return names


# -- message generation --------------------------------------------------------------


class Gen:
    """Datagrams and their expected replies for one connection's worker."""

    def __init__(self, rng: random.Random, shared: Shared, first_id: int) -> None:
        self.rng = rng
        self.shared = shared
        self.next_id = first_id

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def name(self) -> str:
        return self.rng.choice(self.shared.names)

    def message(self, conn: Conn) -> Out:
        r = self.rng.random()
        if r < 0.22:
            out = self.random_bytes()
        elif r < 0.30:
            out = self.random_json()
        elif r < 0.72:
            out = self.valid(conn)
        else:
            out = self.mutated(conn)
        if self.rng.random() < (0.3 if out.pending is None else 0.02):
            self.attach_fds(conn, out)
        return out

    def attach_fds(self, conn: Conn, out: Out) -> None:
        """Stray fds: the reply must be EBADMSG, whatever the datagram said."""
        out.nfds = self.rng.randint(1, 5)
        p = out.pending
        if p is None:  # an empty datagram with fds is a message, not the end
            out.pending = Pending("fds:empty", None, codes=_BADMSG, ok=False)
            return
        if p.op == "release" and p.codes == _NO_ERROR and p.req is not None:
            conn.leases[p.req["lease"]] = ""  # refused, so still held
        p.kind = "fds:" + p.kind
        p.codes = _BADMSG
        p.ok = False
        p.wait = False
        p.id_or_null = True

    # (1) random bytes

    def random_bytes(self) -> Out:
        rng = self.rng
        r = rng.random()
        if r < 0.80:
            n = rng.randint(0, 64)
        elif r < 0.95:
            n = rng.randint(65, 1024)
        elif r < 0.99:
            n = rng.randint(1025, 16384)
        else:
            n = rng.randint(16385, 70000)
        if n == 0 and rng.random() < 0.7:
            n = 1  # keep the ends of connection rare
        data = rng.randbytes(n)
        if n and rng.random() < 0.3:  # look like the start of a request
            data = (b'{"id":%d,"op":"' % self.new_id() + data)[:n]
        if not data:
            return Out(b"", None)
        return Out(data, self.expect_for_bytes("random", data))

    def expect_for_bytes(self, kind: str, data: bytes) -> Pending:
        """What any datagram deserves, judged with the stdlib's strict view of JSON."""
        if len(data) > MAX_MESSAGE:
            return Pending(kind, None, codes=_BADMSG, ok=False, preview=data[:80])
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=_reject)
        except (ValueError, RecursionError):
            return Pending(kind, None, codes=_BADMSG, ok=False, preview=data[:80])
        return self.expect_for_object(kind, obj, data)

    def expect_for_object(self, kind: str, obj: Any, data: bytes) -> Pending:
        preview = data[:80]
        if not isinstance(obj, dict):
            return Pending(kind, None, codes=_BADMSG, ok=False, preview=preview)
        rid = obj.get("id")
        if type(rid) is not int or not 0 <= rid < MAX_ID:
            return Pending(kind, None, codes=_EINVAL, ok=False, preview=preview)
        op = obj.get("op")
        if not isinstance(op, str):
            return Pending(kind, rid, codes=_EINVAL, ok=False, preview=preview)
        if op not in OP_NAMES:
            return Pending(kind, rid, codes=frozenset({"EOPNOTSUPP"}), ok=False, preview=preview)
        if set(obj) - PARAMS[op] - {"id", "op"}:
            return Pending(kind, rid, codes=_EINVAL, ok=False, preview=preview)
        return Pending(kind, rid, op=op, req=obj, preview=preview)

    # random JSON values, shaped like requests half of the time

    def random_value(self, depth: int = 0) -> Any:
        rng = self.rng
        r = rng.random()
        if depth > 3 or r < 0.5:
            k = rng.randrange(10)
            if k < len(_SCALARS):
                return _SCALARS[k]
            if k == 5:
                return rng.randint(-(2**70), 2**70)
            if k == 6:
                return rng.random() * 1e6
            if k == 7:
                return rng.choice(self.shared.names)
            # never a valid name: only the pool's names may be touched
            return rng.choice(" \u00e9\u2603") + "".join(
                rng.choices("ab/._- ", k=rng.randint(0, 20))
            )
        if r < 0.75:
            return [self.random_value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {
            rng.choice(["id", "op", "name", "x", "lease", ""]): self.random_value(depth + 1)
            for _ in range(rng.randint(0, 4))
        }

    def random_json(self) -> Out:
        rng = self.rng
        if rng.random() < 0.3:
            obj: Any = self.random_value()
        else:
            obj = {}
            if rng.random() < 0.8:
                obj["id"] = self.new_id() if rng.random() < 0.8 else self.random_value()
            if rng.random() < 0.9:
                obj["op"] = rng.choice(OP_NAMES) if rng.random() < 0.7 else self.random_value()
            op = obj.get("op")
            keys = sorted(PARAMS.get(op, set()) - {"wait"}) if isinstance(op, str) else []
            keys += ["x", "lease", "name"]
            for _ in range(rng.randint(0, 4)):
                key = rng.choice(keys)
                if key == "size":
                    obj[key] = rng.choice([rng.randint(1, 2**20), 2**40, 0, -1, "1"])
                else:
                    obj[key] = self.random_value(1)
        data = json.dumps(obj, separators=(",", ":")).encode()
        return Out(data, self.expect_for_object("json", obj, data))

    # (2) valid requests

    def valid_request(self, conn: Conn, op: str | None = None) -> tuple[dict[str, Any], Pending]:
        op = op or self.rng.choices(_OP_CHOICES, _OP_WEIGHTS)[0]
        rid = self.new_id()
        req: dict[str, Any] = {"id": rid, "op": op}
        p = Pending("valid:" + op, rid, op=op, req=req, codes=FUZZ[op].codes)
        fill: Callable[[Conn, dict[str, Any], Pending], None] = getattr(self, "valid_" + op)
        fill(conn, req, p)
        return req, p

    # one generator per op (valid_<op>): it sets FUZZ[op].params, or some of them

    def valid_hello(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            req["client"] = rng.choice(["fuzz", "", "\u2603" * 10, "x" * 1000])

    def valid_create(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        req["name"] = self.name()
        r = rng.random()
        size = rng.randint(1, 4096) if r < 0.8 else rng.choice([4096, 65536, 1 << 20, 12345])
        req["size"] = min(size, self.shared.max_size)
        lifetime = rng.choice([*LIFETIMES, None])
        if lifetime is not None:
            req["lifetime"] = lifetime
        if lifetime == "ttl":
            req["ttl"] = rng.choice([0, 0.0, 0.01, 0.05, 0.3, 1])
        if rng.random() < 0.4:
            req["exist_ok"] = rng.random() < 0.7
        if rng.random() < 0.3:
            req["mode"] = rng.choice([0o600, 0o644, 0o666, 0o400, 0, 0o777])
        if rng.random() < 0.6:
            req["backing"] = rng.choice(["shm", "memfd"])

    def valid_open(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        req["name"] = self.name()
        if rng.random() < 0.6:
            req["access"] = rng.choice(["ro", "rw"])
        if rng.random() < 0.25:
            req["fd"] = rng.random() < 0.5
        if rng.random() < 0.1 and len(conn.waiting) < 48:
            req["wait"] = min(rng.choice([0, 0.01, 0.05, 0.2]), self.shared.max_wait)
            p.wait = True

    def valid_release(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        r = rng.random()
        if req["op"] == "release" and conn.leases and r < 0.75:
            token = rng.choice(list(conn.leases))
        elif r < 0.9 and self.shared.tokens:
            token = rng.choice(self.shared.tokens)
        else:
            token = rng.randbytes(24).hex()
        req["lease"] = token
        if req["op"] == "reclaim" or token not in conn.leases:
            # not this connection's lease; nothing was restarted, so
            # nothing awaits reclaim either
            p.ok = False
            p.codes = frozenset({"ENOENT"})
        else:
            del conn.leases[token]  # released by the time any later request runs
            p.codes = _NO_ERROR

    valid_reclaim = valid_release

    def valid_seal(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        req["name"] = self.name()

    valid_delete = valid_seal

    def valid_stat(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        req["name"] = self.name()
        if rng.random() < 0.3:
            req["holders"] = rng.random() < 0.7

    def valid_list(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        if rng.random() < 0.7:
            req["prefix"] = rng.choice([self.shared.ns, self.shared.ns + "/d", self.name()])
        if rng.random() < 0.3:
            req["after"] = self.name()
        if rng.random() < 0.5:
            req["limit"] = rng.randint(1, 100)

    def valid_reload(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        """No parameters (``stats`` neither)."""

    valid_stats = valid_reload

    def valid_clients(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        rng = self.rng
        if rng.random() < 0.3:
            req["after"] = rng.randint(0, 100)
        if rng.random() < 0.5:
            req["limit"] = rng.randint(1, 100)

    def valid_drop(self, conn: Conn, req: dict[str, Any], p: Pending) -> None:
        """Never a client that exists: the fuzzer drops no one."""
        req["client"] = self.rng.randint(2**40, MAX_ID - 1)

    def valid(self, conn: Conn) -> Out:
        req, p = self.valid_request(conn)
        data = json.dumps(req, separators=(",", ":")).encode()
        p.preview = data[:80]
        return Out(data, p)

    # (3) mutations of valid requests

    def mutated(self, conn: Conn) -> Out:
        rng = self.rng
        op = rng.choices(_MUTABLE_OPS, _MUTABLE_WEIGHTS)[0]
        req, base = self.valid_request(conn, op)
        req.pop("wait", None)  # a mutation never waits (its reply comes in order)
        if base.op == "release" and base.codes == _NO_ERROR:
            conn.leases[req["lease"]] = ""  # it may not be released after all
            base.codes = None
            base.ok = True
        kind = rng.choice(_MUTATIONS)
        out: Out = getattr(self, "mut_" + kind)(req, base)
        return out

    def _out(self, kind: str, req: dict[str, Any], p: Pending, data: bytes | None = None) -> Out:
        if data is None:
            data = json.dumps(req, separators=(",", ":")).encode()
        p.kind = "mut:" + kind
        p.preview = data[:80]
        return Out(data, p)

    def _generic(self, kind: str, req: dict[str, Any], base: Pending) -> Out:
        """A mutation after which the reply's id is known but its outcome is not."""
        rid = req.get("id")
        valid_id = type(rid) is int and 0 <= rid < MAX_ID
        p = Pending(kind, rid if valid_id else None, op=base.op, req=req)
        if not valid_id:
            p.codes, p.ok = _EINVAL, False
        return self._out(kind, req, p)

    def mut_drop_key(self, req: dict[str, Any], base: Pending) -> Out:
        key = self.rng.choice(sorted(req))
        del req[key]
        if key == "op":
            p = Pending("", req["id"], codes=_EINVAL, ok=False)
            return self._out("drop_op", req, p)
        return self._generic("drop_" + ("id" if key == "id" else "key"), req, base)

    def mut_dup_key(self, req: dict[str, Any], base: Pending) -> Out:
        """A key twice: JSON leaves it to the reader, so only the shape is checked."""
        key = self.rng.choice(sorted(req))
        text = json.dumps(req, separators=(",", ":"))
        again = req[key] if key == "id" else self.rng.choice([req[key], 1, "x", None])
        data = (text[:-1] + "," + json.dumps(key) + ":" + json.dumps(again) + "}").encode()
        p = Pending("", base.rid, id_or_null=True, op=base.op, req=None)
        return self._out("dup_key", req, p, data)

    def mut_wrong_type(self, req: dict[str, Any], base: Pending) -> Out:
        key = self.rng.choice(sorted(req))
        old = req[key]
        choices: list[Any] = [None, [], {}, [old], {"v": old}, "7", 1.5, True, -3]
        req[key] = self.rng.choice([c for c in choices if type(c) is not type(old)])
        if key == "op":
            p = Pending("", req["id"], codes=frozenset({"EINVAL", "EOPNOTSUPP"}), ok=False)
            return self._out("wrong_type_op", req, p)
        return self._generic("wrong_type", req, base)

    def mut_bad_value(self, req: dict[str, Any], base: Pending) -> Out:
        """A value of the right shape but out of range: EINVAL, the contract says."""
        rng = self.rng
        op = req["op"]
        options = BAD_VALUES.get(op, [])
        value: Any
        if not options or rng.random() < 0.3:
            key, value = "id", rng.choice([-1, MAX_ID, MAX_ID + 5, 1.0, "1", True, None, []])
        else:
            key, value = rng.choice(options)
        if key == "lifetime_ttl_mismatch":
            req["lifetime"] = "refcount"
            req["ttl"] = 1.0
        elif key == "ttl_missing":
            req["lifetime"] = "ttl"
            req.pop("ttl", None)
        else:
            req[key] = value
        # over max_segment_size, or no room; a limit of the daemon's, not of the
        # protocol, so it may be checked after the name is found taken
        too_big = key == "size" and value == 2**40
        codes = frozenset({"EINVAL", "ENOSPC", "EEXIST"}) if too_big else _EINVAL
        rid = None if key == "id" else req["id"]
        return self._out("bad_" + key, req, Pending("", rid, codes=codes, ok=False))

    def mut_bad_name(self, req: dict[str, Any], base: Pending) -> Out:
        rng = self.rng
        if "name" not in req:
            req = {"id": req["id"], "op": "stat"}
        if rng.random() < 0.3:
            n = rng.choice([MAX_NAME + 1, MAX_NAME + 2, 1000, 4096])
            req["name"] = (self.shared.ns + "/" + "y" * n)[:n]
            codes = frozenset({"ENAMETOOLONG"})
        else:
            req["name"] = rng.choice(BAD_NAMES).replace("NS", self.shared.ns)
            codes = _EINVAL
        return self._out("bad_name", req, Pending("", req["id"], codes=codes, ok=False))

    def mut_unknown_op(self, req: dict[str, Any], base: Pending) -> Out:
        req["op"] = self.rng.choice(["", "HELLO", "hello ", "destroy", "x" * 300, "\u00e9"])
        codes = frozenset({"EOPNOTSUPP"})
        return self._out("unknown_op", req, Pending("", req["id"], codes=codes, ok=False))

    def mut_unknown_key(self, req: dict[str, Any], base: Pending) -> Out:
        req[self.rng.choice(["extra", "Name", "ID", "", "fds", "uid"])] = 1
        return self._out("unknown_key", req, Pending("", req["id"], codes=_EINVAL, ok=False))

    def mut_huge_number(self, req: dict[str, Any], base: Pending) -> Out:
        """A 5000-digit number: valid JSON, out of every range (EBADMSG or EINVAL)."""
        key = self.rng.choice(sorted(req))
        digits = self.rng.choice(["9" * 5000, "-" + "9" * 5000, "1" + "0" * 400, "1e999"])
        data = _replace_value(req, key, digits)
        p = Pending("", None if key == "id" else req["id"], id_or_null=key != "id")
        p.codes, p.ok = frozenset({"EBADMSG", "EINVAL"}), False
        return self._out("huge_number", req, p, data)

    def mut_nan(self, req: dict[str, Any], base: Pending) -> Out:
        key = self.rng.choice(sorted(req))
        data = _replace_value(req, key, self.rng.choice(["NaN", "Infinity", "-Infinity"]))
        return self._out("nan", req, Pending("", None, codes=_BADMSG, ok=False), data)

    def mut_deep(self, req: dict[str, Any], base: Pending) -> Out:
        rng = self.rng
        key = rng.choice(sorted(req))
        room = MAX_MESSAGE - len(json.dumps(req)) - 16
        n = rng.choice([100, 1000, 5000, room // 2])
        shape = rng.random()
        if shape < 0.4:
            value, balanced = "[" * n + "]" * n, True
        elif shape < 0.7:
            k = n // 6
            value, balanced = '{"a":' * k + "1" + "}" * k, True
        else:
            value, balanced = "[" * min(2 * n, room), False
        data = _replace_value(req, key, value)
        if balanced:  # valid JSON, nested past any sane limit
            p = Pending("", None if key == "id" else req["id"], id_or_null=key != "id")
            p.codes, p.ok = frozenset({"EBADMSG", "EINVAL"}), False
        else:
            p = Pending("", None, codes=_BADMSG, ok=False)
        return self._out("deep", req, p, data)

    def mut_bad_utf8(self, req: dict[str, Any], base: Pending) -> Out:
        data = json.dumps(req, separators=(",", ":"), ensure_ascii=False).encode()
        junk = self.rng.choice(
            [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]
        )
        at = self.rng.randint(0, len(data))
        data = data[:at] + junk + data[at:]
        return self._out("bad_utf8", req, Pending("", None, codes=_BADMSG, ok=False), data)

    def mut_surrogate(self, req: dict[str, Any], base: Pending) -> Out:
        """A lone surrogate escape in a string: valid JSON text, not a valid name."""
        keys = [k for k, v in req.items() if isinstance(v, str)]
        key = self.rng.choice(keys)
        req[key] = req[key] + self.rng.choice(["\ud800", "\udfff", "\udc80x"])
        if key == "op":
            p = Pending("", req["id"], codes=frozenset({"EOPNOTSUPP"}), ok=False)
            return self._out("surrogate_op", req, p)
        if key == "name":  # over 255 bytes too, if it was at the limit
            long = len(req[key].encode("utf-8", "surrogatepass")) > MAX_NAME
            codes = frozenset({"EINVAL", "ENAMETOOLONG"}) if long else _EINVAL
            p = Pending("", req["id"], codes=codes, ok=False)
            return self._out("surrogate_name", req, p)
        return self._generic("surrogate", req, base)

    def mut_oversize(self, req: dict[str, Any], base: Pending) -> Out:
        """Padded to just over, or exactly at, the 65536-byte limit."""
        text = json.dumps(req, separators=(",", ":"))
        if self.rng.random() < 0.25 and req["op"] in ("hello", "stat", "list", "stats"):
            data = (text[:-1] + " " * (MAX_MESSAGE - len(text)) + "}").encode()
            assert len(data) == MAX_MESSAGE
            p = Pending("", req["id"], op=base.op, req=req, codes=base.codes, ok=base.ok)
            return self._out("at_limit", req, p, data)
        size = self.rng.choice([MAX_MESSAGE + 1, MAX_MESSAGE + 2, 70000])
        data = (text[:-1] + " " * (size - len(text)) + "}").encode()
        return self._out("oversize", req, Pending("", None, codes=_BADMSG, ok=False), data)

    def mut_truncate(self, req: dict[str, Any], base: Pending) -> Out:
        data = json.dumps(req, separators=(",", ":")).encode()
        data = data[: self.rng.randint(1, len(data) - 1)]
        return self._out("truncate", req, Pending("", None, codes=_BADMSG, ok=False), data)


_SCALARS = (None, True, False, 0, -1)
_HOLDERS = ("holders", "holders_more")


def _reject(name: str) -> Any:
    raise ValueError(name)


def _replace_value(req: dict[str, Any], key: str, raw: str) -> bytes:
    parts = [
        json.dumps(k) + ":" + (raw if k == key else json.dumps(v, separators=(",", ":")))
        for k, v in req.items()
    ]
    return ("{" + ",".join(parts) + "}").encode()


@dataclass(frozen=True)
class FuzzOp:
    """The fuzzer's entry for one op (its generator is ``Gen.valid_<op>``)."""

    #: how often it is sent, relative to the others
    weight: float
    #: what a valid request over the fuzzer's own names may fail with. Never
    #: EINVAL: every request the generator calls valid must be taken.
    codes: frozenset[str]
    #: the parameters its generator sets (all of the request's)
    params: frozenset[str] = frozenset()


def _codes(*codes: str) -> frozenset[str]:
    return frozenset(codes)


#: One entry per op of wire.OPS (tests/unit/test_surface.py checks it).
FUZZ: dict[str, FuzzOp] = {
    "hello": FuzzOp(5, _NO_ERROR, _codes("client")),
    # EPERM: exist_ok on a sealed segment is an rw open; EOPNOTSUPP: persistent memfd
    "create": FuzzOp(
        22,
        _codes("EEXIST", "EACCES", "EDQUOT", "ENOSPC", "EOPNOTSUPP", "EPERM", "EMFILE"),
        _codes("name", "size", "lifetime", "ttl", "exist_ok", "mode", "backing"),
    ),
    "open": FuzzOp(
        22,
        _codes("ENOENT", "ETIMEDOUT", "EACCES", "EPERM", "EAGAIN", "EMFILE"),
        _codes("name", "access", "wait", "fd"),
    ),
    "release": FuzzOp(16, _codes("ENOENT"), _codes("lease")),  # codes narrowed per request
    "seal": FuzzOp(4, _codes("ENOENT", "EACCES"), _codes("name")),
    "delete": FuzzOp(7, _codes("ENOENT", "EACCES"), _codes("name")),
    "stat": FuzzOp(7, _codes("ENOENT", "EACCES"), _codes("name", "holders")),
    "list": FuzzOp(6, _NO_ERROR, _codes("prefix", "after", "limit")),
    "reclaim": FuzzOp(3, _codes("ENOENT"), _codes("lease")),
    # EINVAL: the config file on disk is bad
    "reload": FuzzOp(0.05, _codes("EACCES", "EINVAL")),
    "clients": FuzzOp(2, _codes("EACCES"), _codes("after", "limit")),  # for operators only
    "stats": FuzzOp(2, _codes("EACCES")),
    "drop": FuzzOp(1, _codes("ENOENT", "EACCES"), _codes("client")),
}
#: op -> the parameters the fuzzer knows
PARAMS: dict[str, frozenset[str]] = {op: entry.params for op, entry in FUZZ.items()}
_OP_WEIGHTS_BY_OP = {op: entry.weight for op, entry in FUZZ.items()}
_OP_CHOICES = list(_OP_WEIGHTS_BY_OP)
_OP_WEIGHTS = list(_OP_WEIGHTS_BY_OP.values())
_MUTABLE_OPS = [op for op in _OP_CHOICES if op != "reload"]
_MUTABLE_WEIGHTS = [_OP_WEIGHTS_BY_OP[op] for op in _MUTABLE_OPS]
_MUTATIONS = [
    "drop_key",
    "dup_key",
    "wrong_type",
    "wrong_type",
    "bad_value",
    "bad_value",
    "bad_name",
    "unknown_op",
    "unknown_key",
    "huge_number",
    "nan",
    "deep",
    "bad_utf8",
    "surrogate",
    "oversize",
    "truncate",
    "truncate",
]
BAD_VALUES: dict[str, list[tuple[str, Any]]] = {
    "create": [
        ("size", 0),
        ("size", -5),
        ("size", 2**63),
        ("size", 2**40),
        ("size", 1.5),
        ("size", "1"),
        ("size", True),
        ("lifetime", "forever"),
        ("lifetime_ttl_mismatch", None),
        ("ttl_missing", None),
        ("mode", -1),
        ("mode", 0o1000),
        ("exist_ok", 1),
        ("backing", "disk"),
    ],
    "open": [("access", "wx"), ("access", "RW"), ("wait", -1), ("wait", 1e12), ("fd", "yes")],
    "list": [("limit", 0), ("limit", 101), ("limit", -1), ("prefix", "p" * 300)],
    "clients": [("limit", 0), ("limit", 101), ("after", -1)],
    "release": [("lease", ""), ("lease", "t" * 300), ("lease", 5)],
    "reclaim": [("lease", ""), ("lease", 7)],
    "seal": [("name", 5)],
    "delete": [("name", None)],
    "stat": [("name", ["x"])],
    "hello": [("client", 5)],
}
BAD_NAMES = [
    "",
    "/",
    "NS/",
    "/NS/a",
    "NS//a",
    "NS/./a",
    "NS/../a",
    ".",
    "..",
    "NS/a b",
    "NS/\u00e9",
    "NS/a\x00b",
    "NS\\a",
    "NS/a*",
]


# -- one connection ------------------------------------------------------------------


class Closed(Exception):
    """The daemon ended the connection."""


@dataclass
class Conn:
    sock: socket.socket
    fifo: deque[Pending] = field(default_factory=deque)
    waiting: dict[int, Pending] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)  # token -> name
    eof: bool = False
    turned_away: bool = False  # the daemon said EMFILE, and closes
    #: the last datagrams sent, for the report of a hang or a close
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=6))

    def history(self) -> str:
        return "; last sent: " + " | ".join(self.recent)

    def owed(self) -> int:
        return len(self.fifo) + len(self.waiting)


class Worker(threading.Thread):
    def __init__(self, index: int, quota: int, shared: Shared, seed: int) -> None:
        super().__init__(name=f"fuzz-{index}", daemon=True)
        self.rng = random.Random(seed * 1000 + index)
        self.gen = Gen(self.rng, shared, (index + 1) << 48)
        self.quota = quota
        self.shared = shared
        self.counts: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.samples: list[str] = []
        self.conn: Conn | None = None
        self.window = 1
        self.finished = 0.0

    # bookkeeping

    def violation(self, what: str, detail: str) -> None:
        if what in FATAL:
            self.shared.abort.set()
        self.violations[what] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(f"{what}: {detail}"[:MAX_SAMPLE_LEN])

    # connection

    def connect(self) -> Conn | None:
        deadline = time.monotonic() + 5
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.shared.socket)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    self.violation("connect_failed", f"for 5 s: {exc}")
                    return None
                time.sleep(0.01)
        sock.setblocking(False)
        self.counts["connections"] += 1
        self.window = self.rng.choice([1, 8, 32, 64, 64, 64])
        self.conn = Conn(sock)
        return self.conn

    def end(self, conn: Conn, why: str) -> None:
        """Forget a connection; replies still owed on it are counted under ``why``."""
        self.counts[why] += 1
        self.counts[why + "_unanswered"] += conn.owed()
        conn.fifo.clear()
        conn.waiting.clear()
        with contextlib.suppress(OSError):
            conn.sock.close()
        if self.conn is conn:
            self.conn = None

    # send and receive

    def send(self, conn: Conn, out: Out, *, read: bool = True) -> None:
        """Send one datagram; raises Closed if the daemon has gone from this connection."""
        fds = make_fds(self.rng, out.nfds, self.shared.socket, conn.sock) if out.nfds else []
        try:
            while True:
                try:
                    if fds:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        conn.sock.sendmsg([out.data], anc)
                    else:
                        conn.sock.send(out.data)
                    break
                except BlockingIOError:
                    self.counts["send_blocked"] += 1
                    events = select.POLLOUT | (select.POLLIN if read else 0)
                    if not _poll(conn.sock, events, REPLY_TIMEOUT):
                        self.violation(
                            "send_stalled",
                            f"no room to send for {REPLY_TIMEOUT} s" + conn.history(),
                        )
                        raise Closed from None
                    if read:
                        self.drain(conn)
                except OSError as exc:  # EPIPE, ECONNRESET: the daemon dropped us
                    conn.eof = True
                    raise Closed from exc
        finally:
            for fd in fds:
                os.close(fd)
        self.counts["sent"] += 1
        conn.recent.append(f"{out.data[:100]!r} ({len(out.data)} bytes, {len(fds)} fds)")
        self.counts["bytes_sent"] += len(out.data)
        self.counts["fds_sent"] += len(fds)
        p = out.pending
        if p is None:
            self.counts["sent_empty"] += 1
            return
        self.counts["kind:" + p.kind] += 1
        if p.wait:
            assert p.rid is not None
            conn.waiting[p.rid] = p
        else:
            conn.fifo.append(p)

    def drain(self, conn: Conn) -> None:
        """Read every reply that is there now; raises Closed at the end of the connection."""
        while True:
            try:
                data, anc, flags, _ = conn.sock.recvmsg(MAX_MESSAGE + 1, _ANC)
            except BlockingIOError:
                return
            except OSError as exc:
                conn.eof = True
                raise Closed from exc
            fds = _fds(anc)
            if not data and not fds and not flags & socket.MSG_TRUNC:
                conn.eof = True
                raise Closed
            try:
                self.on_reply(conn, data, fds, flags)
            finally:
                for fd in fds:
                    os.close(fd)

    def wait_replies(self, conn: Conn, below: int) -> None:
        """Read until fewer than ``below`` replies are owed in order."""
        while len(conn.fifo) >= below:
            if not _poll(conn.sock, select.POLLIN, REPLY_TIMEOUT):
                self.violation(
                    "no_reply",
                    f"{len(conn.fifo)} replies owed, none for {REPLY_TIMEOUT} s; "
                    f"oldest {conn.fifo[0].kind} {conn.fifo[0].preview!r}" + conn.history(),
                )
                raise Closed
            self.drain(conn)

    # the oracle

    def on_reply(self, conn: Conn, data: bytes, fds: list[int], flags: int) -> None:
        self.counts["replies"] += 1
        self.counts["fds_received"] += len(fds)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self.violation("reply_truncated", f"flags {flags:#x} len {len(data)}")
        try:
            reply = json.loads(data.decode("utf-8"), parse_constant=_reject)
        except (ValueError, RecursionError):
            self.violation("reply_not_json", repr(data[:200]))
            return
        if not isinstance(reply, dict) or "id" not in reply or "ok" not in reply:
            self.violation("reply_shape", repr(data[:200]))
            return
        rid, ok = reply["id"], reply["ok"]
        if not (rid is None or type(rid) is int) or type(ok) is not bool:
            self.violation("reply_shape", repr(data[:200]))
            return
        code = None
        if not ok:
            code = self.check_error(reply, fds, data)
            self.counts["code:" + str(code)] += 1
        else:
            self.counts["ok"] += 1
        p = self.match(conn, rid, code, data)
        if p is None:
            return
        if p.rid is None and not p.id_or_null and rid is not None:
            self.violation("reply_id", f"id {rid} for {p.kind} (wants null): {p.preview!r}")
        elif p.rid is not None and rid != p.rid and not (p.id_or_null and rid is None):
            self.violation("reply_id", f"id {rid} for {p.kind} id {p.rid}: {p.preview!r}")
        if ok:
            if not p.ok:
                self.violation("unexpected_success", f"{p.kind} {p.preview!r} -> {data[:200]!r}")
            self.check_success(conn, p, reply, fds, data)
        elif code is not None and p.codes is not None and code not in p.codes:
            self.violation(
                "wrong_code",
                f"{p.kind} wants {sorted(p.codes) or 'success'} got {code}: "
                f"{p.preview!r} -> {data[:200]!r}",
            )

    def match(self, conn: Conn, rid: Any, code: str | None, data: bytes) -> Pending | None:
        if type(rid) is int and rid in conn.waiting:
            return conn.waiting.pop(rid)
        if code == "EMFILE" and rid is None:  # at a limit: "reply, then close"
            conn.turned_away = True
            return None
        if not conn.fifo:
            self.violation("unsolicited_reply", repr(data[:200]))
            return None
        head = conn.fifo[0]
        if type(rid) is int and rid != head.rid and any(q.rid == rid for q in conn.fifo):
            # replies were skipped: the ones before this reply's request are lost
            while conn.fifo[0].rid != rid:
                lost = conn.fifo.popleft()
                self.violation("reply_missing", f"{lost.kind} {lost.preview!r}")
        return conn.fifo.popleft()

    def check_error(self, reply: dict[str, Any], fds: list[int], data: bytes) -> str | None:
        err = reply.get("error")
        if set(reply) != {"id", "ok", "error"} or not isinstance(err, dict):
            self.violation("error_shape", repr(data[:200]))
            return None
        code, message = err.get("code"), err.get("message")
        if set(err) != {"code", "message"} or not isinstance(message, str) or not message:
            self.violation("error_shape", repr(data[:200]))
        if code not in CODES:
            self.violation("unknown_code", repr(data[:300]))
        if fds:
            self.violation("fds_with_error", f"{len(fds)} fds with {data[:200]!r}")
        return code if isinstance(code, str) else None

    def check_success(
        self, conn: Conn, p: Pending, reply: dict[str, Any], fds: list[int], data: bytes
    ) -> None:
        op, req = p.op, p.req or {}
        keys = set(reply) - {"id", "ok"}
        want_fds = 0
        problem = ""
        if op == "hello":
            limits = reply.get("limits")
            if not (
                isinstance(reply.get("server"), str)
                and isinstance(reply.get("versions"), list)
                and 1 in reply["versions"]
                and isinstance(reply.get("features"), list)
                and isinstance(limits, dict)
                and all(
                    isinstance(limits.get(k), int | float)
                    for k in ("max_message", "max_segment_size", "max_wait", "reclaim_window")
                )
            ):
                problem = "hello result"
        elif op in ("create", "open"):
            seg: Any
            seg, lease = reply.get("segment"), reply.get("lease")
            problem = _segment_problem(seg, req.get("name"))
            if keys != {"segment", "lease"} or not isinstance(lease, str) or len(lease) < 16:
                problem = problem or "keys or lease"
            access = "rw" if op == "create" else req.get("access", "ro")
            if not problem:
                problem = _grant_problem(op, req, seg, access)
            want_fds = 1 if op == "create" or req.get("fd", True) is not False else 0
            if not problem and len(fds) == want_fds == 1:
                problem = _fd_problem(fds[0], access, seg["size"])
            if isinstance(lease, str):
                conn.leases[lease] = str(req.get("name"))
                self.shared.tokens.append(lease)
                self.counts["leases"] += 1
        elif op in ("release", "delete"):
            problem = "unexpected keys" if keys else ""
        elif op == "reload":
            problem = "" if keys == {"restart"} else "unexpected keys"
        elif op in ("seal", "stat"):
            problem = _segment_problem(reply.get("segment"), req.get("name"))
            if not problem and op == "seal" and reply["segment"]["sealed"] is not True:
                problem = "not sealed after seal"
            want = {"segment", *_HOLDERS} if req.get("holders") is True else {"segment"}
            problem = problem or ("unexpected keys" if keys != want else "")
        elif op == "list":
            problem = _list_problem(reply, req)
        elif op == "clients":
            clients = reply.get("clients")
            if keys != {"clients", "next"} or not isinstance(clients, list):
                problem = "clients result"
            else:
                ids: list[Any] = [c.get("id") for c in clients if isinstance(c, dict)]
                if ids != sorted(ids) or len(ids) != len(clients):
                    problem = "clients not by id"
        elif op == "stats":
            if not all(k in reply for k in ("segments", "bytes", "clients", "requests", "errors")):
                problem = "stats result"
        elif op == "reclaim":
            problem = "reclaim granted though nothing was restarted"
        else:
            problem = f"success for {op}"
        if len(fds) != want_fds:
            problem = problem or f"{len(fds)} fds, wants {want_fds}"
        if problem:
            self.violation("bad_result", f"{problem}: {p.kind} {p.preview!r} -> {data[:300]!r}")

    # behaviours

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a fuzzer bug must not look like a clean run
            self.violation("fuzzer_crashed", traceback.format_exc()[-MAX_SAMPLE_LEN:])

    def _run(self) -> None:
        rng = self.rng
        while self.counts["sent"] < self.quota and not self.shared.abort.is_set():
            conn = self.conn or self.connect()
            if conn is None:
                break
            try:
                r = rng.random()
                if r < 0.002:
                    self.abrupt(conn)
                elif r < 0.0022:
                    self.burst(conn)
                elif r < 0.0025:
                    self.wait_flood(conn)
                else:
                    self.step(conn)
            except Closed:
                self.on_closed(conn)
        if self.conn is not None:
            self.finish(self.conn)
        self.finished = time.monotonic()

    def step(self, conn: Conn) -> None:
        out = self.gen.message(conn)
        self.send(conn, out)
        if out.pending is None:  # an empty datagram: the daemon must answer the rest, close
            self.counts["half_closes"] += 1
            self.read_to_eof(conn, "closed_by_empty")
            return
        self.drain(conn)
        if len(conn.fifo) >= self.window:
            self.wait_replies(conn, self.window // 4 + 1)

    def on_closed(self, conn: Conn) -> None:
        """The daemon closed a connection we did not expect it to."""
        if self.conn is not conn:
            return
        with contextlib.suppress(Closed):  # what came before the end, if a send saw it first
            self.drain(conn)
        if conn.turned_away:
            self.end(conn, "turned_away")
            time.sleep(0.01)  # until a slot frees
            return
        if conn.eof:
            oldest = conn.fifo[0] if conn.fifo else None
            self.violation(
                "unexpected_close",
                f"{conn.owed()} replies owed; oldest "
                + (f"{oldest.kind} {oldest.preview!r}" if oldest else "none")
                + conn.history(),
            )
        self.end(conn, "lost_connections")

    def await_replies(self, conn: Conn) -> bool:
        """Read until nothing is owed (True), or until none came for REPLY_TIMEOUT
        seconds (False); raises Closed at the end of the connection."""
        while conn.owed():
            if not _poll(conn.sock, select.POLLIN, REPLY_TIMEOUT):
                return False
            self.drain(conn)
        return True

    def read_to_eof(self, conn: Conn, why: str) -> None:
        """Read replies until the daemon closes; what it still owed is counted."""
        try:
            while _poll(conn.sock, select.POLLIN, REPLY_TIMEOUT):
                self.drain(conn)
            self.violation(
                "no_close", f"{why}: the daemon kept the connection open" + conn.history()
            )
        except Closed:
            pass
        # requests read before the end: answered, unless their replies had to queue
        self.counts[why + "_in_order_unanswered"] += len(conn.fifo)
        self.end(conn, why)

    def abrupt(self, conn: Conn) -> None:
        """Send a few requests, then go without reading the replies."""
        for _ in range(self.rng.randint(0, 20)):
            out = self.gen.valid(conn) if self.rng.random() < 0.7 else self.gen.message(conn)
            if out.pending is None:
                break
            self.send(conn, out, read=False)
        if self.rng.random() < 0.3:
            conn.sock.shutdown(socket.SHUT_WR)  # half-close: replies still readable
            self.counts["half_closes"] += 1
            self.read_to_eof(conn, "closed_by_shutdown")
        else:
            self.end(conn, "abrupt_closes")

    def burst(self, conn: Conn) -> None:
        """Send without reading; the daemon may drop us once our replies pile up."""
        n = self.rng.randint(200, 700)
        try:
            for _ in range(n):
                out = self.gen.valid(conn)
                if out.pending is not None and out.pending.wait:
                    continue
                self.send(conn, out, read=False)
        except Closed:
            pass
        self.counts["bursts"] += 1
        try:  # whatever it sent before dropping us must still be readable, in order
            answered = self.await_replies(conn)
        except Closed:
            self.end(conn, "dropped_after_burst")
            return
        if not answered:
            self.violation(
                "no_reply", f"burst: {conn.owed()} replies owed, none came" + conn.history()
            )
            self.end(conn, "stuck")
        else:
            self.counts["bursts_survived"] += 1

    def wait_flood(self, conn: Conn) -> None:
        """More waiting opens than a connection may have: the excess is EAGAIN."""
        name = f"{self.shared.ns}/nowhere"
        for _ in range(70):
            rid = self.gen.new_id()
            req = {"id": rid, "op": "open", "name": name, "wait": min(0.2, self.shared.max_wait)}
            data = json.dumps(req).encode()
            codes = frozenset({"ETIMEDOUT", "EAGAIN"})
            self.send(conn, Out(data, Pending("flood", rid, codes=codes, ok=False, wait=True)))
        self.counts["wait_floods"] += 1

    def finish(self, conn: Conn) -> None:
        if self.shared.abort.is_set():
            self.end(conn, "aborted")
            return
        try:
            answered = self.await_replies(conn)
        except Closed:
            self.on_closed(conn)
            return
        if not answered:
            oldest = (conn.fifo or list(conn.waiting.values()))[0]
            self.violation(
                "no_reply",
                f"at the end {conn.owed()} owed; {oldest.kind} {oldest.preview!r}" + conn.history(),
            )
        self.end(conn, "finished")


def _poll(sock: socket.socket, events: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(timeout * 1000))


def _fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def make_fds(rng: random.Random, n: int, path: str, own: socket.socket) -> list[int]:
    """``n`` fds of assorted kinds, to send where no fd belongs."""
    fds: list[int] = []
    while len(fds) < n:
        kind = rng.choice(["pipe", "null", "memfd", "socketpair", "eventfd", "daemon", "self"])
        if kind == "pipe":
            fds.extend(os.pipe())
        elif kind == "null":
            fds.append(os.open("/dev/null", os.O_RDWR))
        elif kind == "memfd":
            fd = os.memfd_create("fuzz")
            os.ftruncate(fd, 4096)
            fds.append(fd)
        elif kind == "socketpair":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.extend((a.detach(), b.detach()))
        elif kind == "eventfd":
            fds.append(os.eventfd(0))
        elif kind == "daemon":  # a second connection to the daemon, handed to it
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(path)
            except OSError:
                s.close()
                continue
            fds.append(s.detach())
        else:
            fds.append(os.dup(own.fileno()))
    for fd in fds[n:]:
        os.close(fd)
    return fds[:n]


def _segment_problem(seg: Any, name: Any) -> str:
    if not isinstance(seg, dict) or not set(seg) >= SEGMENT_KEYS:
        return "segment keys"
    checks = (
        isinstance(seg["id"], str) and seg["id"],
        seg["name"] == name if name is not None else isinstance(seg["name"], str),
        type(seg["size"]) is int and seg["size"] > 0,
        seg["lifetime"] in LIFETIMES,
        (seg["ttl"] is None) == (seg["lifetime"] != "ttl"),
        type(seg["sealed"]) is bool,
        seg["backing"] in ("shm", "memfd"),
        type(seg["mode"]) is int and 0 <= seg["mode"] <= 0o777,
        isinstance(seg["created"], int | float) and math.isfinite(seg["created"]),
        type(seg["owner_uid"]) is int and type(seg["owner_gid"]) is int,
        type(seg["leases"]) is int and seg["leases"] >= 0,
    )
    return "" if all(checks) else f"segment fields {seg!r}"


def _grant_problem(op: str, req: dict[str, Any], seg: dict[str, Any], access: str) -> str:
    """What a granted segment must say, given the request that got it."""
    if seg["leases"] < 1:
        return "granted, yet no lease counted"
    if access == "rw" and seg["sealed"]:
        return "rw granted on a sealed segment"
    if op != "create":
        return ""
    if seg["size"] != req.get("size"):
        return "size differs from the create's"
    if req.get("exist_ok"):
        return ""  # perhaps an open of the existing segment
    # a new segment: as asked, and as the contract's defaults say (its lease
    # count may be over 1: opens waiting for the name are granted at once)
    want = {
        "lifetime": req.get("lifetime", "refcount"),
        "ttl": req.get("ttl"),
        "mode": req.get("mode", 0o600),
        "sealed": False,
        "owner_uid": os.getuid(),
    }
    if req.get("backing") is not None:  # null: the daemon's default
        want["backing"] = req["backing"]
    wrong = {k: seg[k] for k, v in want.items() if seg[k] != v}
    return f"new segment differs from its create: {wrong}" if wrong else ""


def _fd_problem(fd: int, access: str, size: int) -> str:
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    want = os.O_RDWR if access == "rw" else os.O_RDONLY
    if mode != want:
        return f"fd opened {mode} for {access}"
    st = os.fstat(fd)
    if st.st_size != size:
        return f"fd size {st.st_size} != segment size {size}"
    if st.st_mode & 0o777 != 0o600:
        return f"backing mode {st.st_mode & 0o777:o}"
    return ""


def _list_problem(reply: dict[str, Any], req: dict[str, Any]) -> str:
    segs, nxt = reply.get("segments"), reply.get("next")
    if set(reply) - {"id", "ok"} != {"segments", "next"} or not isinstance(segs, list):
        return "list keys"
    if not (nxt is None or isinstance(nxt, str)):
        return "list next"
    names = []
    for seg in segs:
        problem = _segment_problem(seg, None)
        if problem:
            return problem
        names.append(seg["name"])
    if names != sorted(names) or len(set(names)) != len(names):
        return "list not in name order"
    if len(names) > req.get("limit", 100):
        return "list over its limit"
    prefix, after = req.get("prefix"), req.get("after")
    if isinstance(prefix, str) and any(not n.startswith(prefix) for n in names):
        return "list outside its prefix"
    if isinstance(after, str) and any(n <= after for n in names):
        return "list not after 'after'"
    return ""


# -- driving -------------------------------------------------------------------------


def run_fuzz(
    socket_path: str, messages: int, connections: int = 6, seed: int | None = None
) -> FuzzResult:
    """Fuzz the daemon at ``socket_path`` with ``messages`` datagrams from
    ``connections`` concurrent connections; the replies owed are all read (or
    counted as lost with their connection) before this returns."""
    seed = random.randrange(2**32) if seed is None else seed
    ns = f"fz{seed:08x}{os.getpid() % 65536:04x}"
    limits = hello(socket_path)["limits"]
    shared = Shared(socket_path, name_pool(ns), ns)
    shared.max_size = min(shared.max_size, limits["max_segment_size"])
    shared.max_wait = min(shared.max_wait, limits["max_wait"])
    quotas = [messages // connections + (i < messages % connections) for i in range(connections)]
    workers = [Worker(i, q, shared, seed) for i, q in enumerate(quotas)]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - start
    counts: Counter[str] = Counter()
    for w in workers:
        counts[f"finish_s:{w.name}"] = round(w.finished - start, 1)  # type: ignore[assignment]
    violations: Counter[str] = Counter()
    samples: list[str] = []
    for w in workers:
        counts.update(w.counts)
        violations.update(w.violations)
        samples.extend(w.samples)
    counts["seed"] = seed
    counts["aborted"] = shared.abort.is_set()
    return FuzzResult(counts, violations, samples, elapsed, ns)


def _request(sock: socket.socket, req: dict[str, Any]) -> dict[str, Any]:
    sock.send(json.dumps(req).encode())
    while True:
        data, anc, _flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _ANC)
        for fd in _fds(anc):
            os.close(fd)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        reply: dict[str, Any] = json.loads(data)
        if reply.get("id") == req["id"]:
            return reply


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def hello(path: str) -> dict[str, Any]:
    """Ask ``hello`` on a fresh connection."""
    with _connect(path) as sock:
        return _request(sock, {"id": 1, "op": "hello", "client": "fuzz-probe"})


def cleanup(path: str, prefix: str = "fz") -> int:
    """Delete every segment under ``prefix`` (the fuzzer's); how many went."""
    deleted = 0
    with _connect(path) as sock:
        rid = 10
        while True:
            page = _request(sock, {"id": rid, "op": "list", "prefix": prefix})
            rid += 1
            if not page.get("ok") or not page["segments"]:
                return deleted
            before = deleted
            for seg in page["segments"]:
                reply = _request(sock, {"id": rid, "op": "delete", "name": seg["name"]})
                rid += 1
                deleted += bool(reply.get("ok"))
            if deleted == before:
                return deleted


def daemon_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_baseline(pid: int) -> int:
    """The daemon's fd count at rest: the least of a few looks, so that a
    connection it is just closing is not counted."""
    counts = []
    for _ in range(5):
        counts.append(daemon_fd_count(pid))
        time.sleep(0.05)
    return min(counts)


def daemon_rss(pid: int) -> int:
    """Resident set size in bytes (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _settle(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _spawned(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Fuzz a daemon of our own, then judge its health as the CI test does."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.helpers import DaemonProc

    d = DaemonProc({"log_level": "info"})
    try:
        d.start()
        hello(d.socket)
        fd_base, rss_base = fd_baseline(d.pid), daemon_rss(d.pid)
        result = run_fuzz(d.socket, args.messages, args.connections, args.seed)
        summary = result.summary()
        health: dict[str, Any] = {"alive": d.proc is not None and d.proc.poll() is None}
        if health["alive"]:
            health["hello_ok"] = bool(hello(d.socket).get("ok"))
            health["deleted_at_end"] = cleanup(d.socket)
            health["fds_settled"] = _settle(lambda: daemon_fd_count(d.pid) <= fd_base)
            health["fds"] = [fd_base, daemon_fd_count(d.pid)]
            health["rss_mib"] = [rss_base >> 20, daemon_rss(d.pid) >> 20]
            health["rss_ok"] = daemon_rss(d.pid) < rss_base + (64 << 20)
            health["shm_clean"] = _settle(lambda: not d.objects())
        log = d.log()
        health["log_clean"] = "Traceback" not in log and "internal error" not in log
        summary["daemon"] = health
        healthy = all(v for k, v in health.items() if k not in ("fds", "rss_mib", "deleted_at_end"))
        if not healthy:
            summary["daemon_log_tail"] = log[-4000:]
        return summary, healthy and not summary["violations"]
    finally:
        d.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--seed", type=int, default=None)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", help="fuzz the daemon listening here")
    where.add_argument("--spawn", action="store_true", help="start a daemon (the default)")
    args = parser.parse_args(argv)
    if args.socket:
        result = run_fuzz(args.socket, args.messages, args.connections, args.seed)
        summary = result.summary()
        summary["deleted_at_end"] = cleanup(args.socket, result.ns + "/")
        passed = not summary["violations"]
    else:
        summary, passed = _spawned(args)
    print(json.dumps(summary), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
