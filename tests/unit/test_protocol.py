"""The sans-IO wire protocol on both sides, fed values: no daemon, no socket.

The daemon half (``shmbrokerd.codec``) must map every datagram, however
hostile, to a validated request or to an error reply with the contract's
code, and never raise; the client half (``shmbroker._calls``) must turn
every reply into the result model or the ``OSError`` subclass the OS would
raise.  Fds are real (``/dev/null`` opened) so that closing them is checked.
"""

from __future__ import annotations

import errno
import json
import os
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbroker import wire
from shmbroker._calls import ClientProtocol
from shmbroker.errors import BrokerError, error_from_errno
from shmbrokerd.codec import (
    decode,
    decode_checked,
    encode_done,
    encode_error,
    encode_grant,
    encode_ok,
    error_code,
)
from shmbrokerd.registry import Grant, SegmentRecord
from tests.support.contract import CONTRACT_CODES, MINIMAL
from tests.support.helpers import fd_is_open

#: The ones that depend on the datagram alone, which is all decode sees.
DECODE_CODES = frozenset({"EBADMSG", "EINVAL", "EOPNOTSUPP", "ENAMETOOLONG"})


def _property(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _j(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _check_error_reply(rid: int | None, err: BrokerError) -> dict[str, Any]:
    """The error reply the daemon would send is UTF-8 JSON of the contract's shape."""
    data = encode_error(rid, err)
    assert len(data) <= wire.MAX_MESSAGE
    body: dict[str, Any] = json.loads(data.decode("utf-8"))
    assert set(body) == {"id", "ok", "error"}
    assert body["id"] == rid
    assert body["ok"] is False
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["code"], str)
    assert body["error"]["code"] == error_code(err)
    assert isinstance(body["error"]["message"], str)
    return body


def _decode_error(data: bytes, **kw: Any) -> tuple[int | None, str]:
    rid, out = decode(data, **kw)
    assert isinstance(out, BrokerError), out
    _check_error_reply(rid, out)
    return rid, error_code(out)


# -- every op decodes to the model with the same fields --------------------------

#: One valid request per op, with non-default values wherever there is a parameter.
VALID: dict[str, dict[str, Any]] = {
    "hello": {"client": "tests/1.0"},
    "create": {
        "name": "camera/front/frames",
        "size": 1 << 20,
        "lifetime": "ttl",
        "ttl": 1.5,
        "exist_ok": True,
        "mode": 0o640,
        "backing": "memfd",
    },
    "open": {"name": "camera/front/frames", "access": "rw", "wait": 2.0, "fd": False},
    "release": {"lease": "Zm9vYmFyYmF6cXV4cXV1eA"},
    "seal": {"name": "a/b"},
    "delete": {"name": "a/b"},
    "stat": {"name": "a/b", "holders": True},
    "list": {"prefix": "camera/", "after": "camera/back", "limit": 5},
    "reclaim": {"lease": "Zm9vYmFyYmF6cXV4cXV1eA"},
    "reload": {},
    "clients": {"after": 3, "limit": 10},
    "stats": {},
    "drop": {"client": 7},
}


def test_valid_table_covers_every_op() -> None:
    assert set(VALID) == set(wire.REQUESTS)
    assert DECODE_CODES <= CONTRACT_CODES


@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_decode_round_trip_for_every_op(op: str) -> None:
    body = {"id": 42, "op": op, **VALID[op]}
    rid, req = decode(_j(body))
    assert rid == 42
    assert isinstance(req, wire.REQUESTS[op])
    dumped = req.model_dump()
    assert {k: dumped[k] for k in body} == body
    # the same as validating the dict directly
    assert req == wire.REQUESTS[op].model_validate(body)


@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_decode_minimal_request_fills_defaults(op: str) -> None:
    body = {"id": 0, "op": op, **MINIMAL[op]}
    rid, req = decode(_j(body))
    assert rid == 0
    assert req == wire.REQUESTS[op].model_validate(body)
    for key in set(VALID[op]) - set(body):  # every optional parameter took its default
        assert getattr(req, key) == wire.REQUESTS[op].model_fields[key].default


def test_decode_accepts_exactly_65536_bytes() -> None:
    head = b'{"id":1,"op":"hello"}'
    data = head + b" " * (wire.MAX_MESSAGE - len(head))
    assert len(data) == wire.MAX_MESSAGE
    rid, req = decode(data)
    assert rid == 1
    assert isinstance(req, wire.REQUESTS["hello"])


def test_decode_accepts_surrounding_json_whitespace() -> None:
    rid, req = decode(b' \n\t{"id":1,"op":"stat","name":"a"}\r\n ')
    assert rid == 1
    assert isinstance(req, wire.REQUESTS["stat"])


def test_decode_accepts_escaped_ascii_in_strings() -> None:
    rid, req = decode(b'{"id":1,"op":"stat","name":"\\u0061/\\u0062"}')
    assert rid == 1
    assert isinstance(req, wire.Stat)
    assert req.name == "a/b"


# -- error cases --------------------------------------------------------------

_OVER = b'{"id":1,"op":"hello","client":"' + b"a" * wire.MAX_MESSAGE + b'"}'
_DEEP_ARRAY = b"[" * 30000
_DEEP_OBJECT = b'{"a":' * 13000
_DEEP_IN_PARAM = b'{"id":1,"op":"hello","client":' + b"[" * 30000 + b"]" * 30000 + b"}"

# (datagram, nfds, truncated, expected id, expected code)
ERROR_CASES: list[tuple[str, bytes, int, bool, int | None, str]] = [
    # not UTF-8
    ("latin1", b'{"id":1,"op":"stat","name":"caf\xe9"}', 0, False, None, "EBADMSG"),
    ("lone-ff", b"\xff", 0, False, None, "EBADMSG"),
    ("overlong-slash", b'{"id":1,"op":"stat","name":"\xc0\xaf"}', 0, False, None, "EBADMSG"),
    ("utf8-surrogate", b'{"id":1,"op":"stat","name":"\xed\xa0\x80"}', 0, False, None, "EBADMSG"),
    ("utf16", '{"id":1,"op":"hello"}'.encode("utf-16"), 0, False, None, "EBADMSG"),
    ("utf8-bom", b'\xef\xbb\xbf{"id":1,"op":"hello"}', 0, False, None, "EBADMSG"),
    # not JSON
    ("empty", b"", 0, False, None, "EBADMSG"),
    ("word", b"hello", 0, False, None, "EBADMSG"),
    ("unterminated", b'{"id":1,"op":"hello"', 0, False, None, "EBADMSG"),
    ("bare-keys", b'{id:1,op:"hello"}', 0, False, None, "EBADMSG"),
    ("single-quotes", b"{'id':1,'op':'hello'}", 0, False, None, "EBADMSG"),
    ("trailing-comma", b'{"id":1,"op":"hello",}', 0, False, None, "EBADMSG"),
    ("trailing-garbage", b'{"id":1,"op":"hello"} x', 0, False, None, "EBADMSG"),
    ("two-objects", b'{"id":1,"op":"hello"}{"id":2,"op":"hello"}', 0, False, None, "EBADMSG"),
    ("trailing-nul", b'{"id":1,"op":"hello"}\x00', 0, False, None, "EBADMSG"),
    ("raw-newline-in-string", b'{"id":1,"op":"hello","client":"a\nb"}', 0, False, None, "EBADMSG"),
    ("comment", b'{"id":1,"op":"hello"/* hi */}', 0, False, None, "EBADMSG"),
    # JSON, but not an object
    ("array", b'[{"id":1,"op":"hello"}]', 0, False, None, "EBADMSG"),
    ("empty-array", b"[]", 0, False, None, "EBADMSG"),
    ("number", b"1", 0, False, None, "EBADMSG"),
    ("float", b"1.5", 0, False, None, "EBADMSG"),
    ("string", b'"hello"', 0, False, None, "EBADMSG"),
    ("null", b"null", 0, False, None, "EBADMSG"),
    ("true", b"true", 0, False, None, "EBADMSG"),
    # size and truncation
    ("over-65536", _OVER, 0, False, None, "EBADMSG"),
    ("65537", b'{"id":1,"op":"hello"}' + b" " * (wire.MAX_MESSAGE - 20), 0, False, None, "EBADMSG"),
    ("truncated", b'{"id":1,"op":"hello"}', 0, True, None, "EBADMSG"),
    ("truncated-prefix", b'{"id":1,"op":"hel', 0, True, None, "EBADMSG"),
    # fds attached: refused, the id kept when it can be read
    ("one-fd", b'{"id":9,"op":"hello"}', 1, False, 9, "EBADMSG"),
    ("many-fds", b'{"id":9,"op":"stat","name":"a"}', 253, False, 9, "EBADMSG"),
    ("fd-and-unknown-op", b'{"id":9,"op":"frobnicate"}', 1, False, 9, "EBADMSG"),
    ("fd-and-bad-params", b'{"id":9,"op":"stat","name":"a","x":1}', 1, False, 9, "EBADMSG"),
    ("fd-and-bad-id", b'{"id":-9,"op":"hello"}', 1, False, None, "EBADMSG"),
    ("fd-and-not-json", b"garbage", 2, False, None, "EBADMSG"),
    ("fd-and-array", b"[1]", 1, False, None, "EBADMSG"),
    # missing or invalid id: EINVAL with id null
    ("no-id", b'{"op":"hello"}', 0, False, None, "EINVAL"),
    ("empty-object", b"{}", 0, False, None, "EINVAL"),
    ("id-negative", b'{"id":-1,"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-2**63", _j({"id": 2**63, "op": "hello"}), 0, False, None, "EINVAL"),
    ("id-2**64", _j({"id": 2**64, "op": "hello"}), 0, False, None, "EINVAL"),
    ("id-true", b'{"id":true,"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-false", b'{"id":false,"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-string", b'{"id":"1","op":"hello"}', 0, False, None, "EINVAL"),
    ("id-float", b'{"id":1.0,"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-exp", b'{"id":1e2,"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-null", b'{"id":null,"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-array", b'{"id":[1],"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-object", b'{"id":{"id":1},"op":"hello"}', 0, False, None, "EINVAL"),
    ("id-bad-and-unknown-op", b'{"id":"x","op":"frobnicate"}', 0, False, None, "EINVAL"),
    # op
    ("unknown-op", b'{"id":3,"op":"frobnicate"}', 0, False, 3, "EOPNOTSUPP"),
    ("op-case", b'{"id":3,"op":"HELLO"}', 0, False, 3, "EOPNOTSUPP"),
    ("op-empty", b'{"id":3,"op":""}', 0, False, 3, "EOPNOTSUPP"),
    ("op-dunder", b'{"id":3,"op":"__class__"}', 0, False, 3, "EOPNOTSUPP"),
    ("op-long", _j({"id": 3, "op": "x" * 60000}), 0, False, 3, "EOPNOTSUPP"),
    ("op-missing", b'{"id":3}', 0, False, 3, "EINVAL"),
    ("op-number", b'{"id":3,"op":1}', 0, False, 3, "EINVAL"),
    ("op-null", b'{"id":3,"op":null}', 0, False, 3, "EINVAL"),
    ("op-list", b'{"id":3,"op":["hello"]}', 0, False, 3, "EINVAL"),
    # parameters
    ("unknown-param", b'{"id":4,"op":"hello","x":1}', 0, False, 4, "EINVAL"),
    ("param-of-other-op", b'{"id":4,"op":"stat","name":"a","size":1}', 0, False, 4, "EINVAL"),
    ("missing-name", b'{"id":4,"op":"stat"}', 0, False, 4, "EINVAL"),
    ("size-string", b'{"id":4,"op":"create","name":"a","size":"1"}', 0, False, 4, "EINVAL"),
    ("size-float", b'{"id":4,"op":"create","name":"a","size":1.0}', 0, False, 4, "EINVAL"),
    ("size-zero", b'{"id":4,"op":"create","name":"a","size":0}', 0, False, 4, "EINVAL"),
    ("size-bool", b'{"id":4,"op":"create","name":"a","size":true}', 0, False, 4, "EINVAL"),
    (
        "mode-string",
        b'{"id":4,"op":"create","name":"a","size":1,"mode":"0o600"}',
        0,
        False,
        4,
        "EINVAL",
    ),
    (
        "ttl-missing",
        b'{"id":4,"op":"create","name":"a","size":1,"lifetime":"ttl"}',
        0,
        False,
        4,
        "EINVAL",
    ),
    ("ttl-not-ttl", b'{"id":4,"op":"create","name":"a","size":1,"ttl":1}', 0, False, 4, "EINVAL"),
    ("access-bad", b'{"id":4,"op":"open","name":"a","access":"wo"}', 0, False, 4, "EINVAL"),
    ("wait-negative", b'{"id":4,"op":"open","name":"a","wait":-1}', 0, False, 4, "EINVAL"),
    ("wait-string", b'{"id":4,"op":"open","name":"a","wait":"1"}', 0, False, 4, "EINVAL"),
    ("fd-int", b'{"id":4,"op":"open","name":"a","fd":0}', 0, False, 4, "EINVAL"),
    ("limit-0", b'{"id":4,"op":"list","limit":0}', 0, False, 4, "EINVAL"),
    ("limit-101", b'{"id":4,"op":"list","limit":101}', 0, False, 4, "EINVAL"),
    ("lease-empty", b'{"id":4,"op":"release","lease":""}', 0, False, 4, "EINVAL"),
    ("lease-int", b'{"id":4,"op":"release","lease":1}', 0, False, 4, "EINVAL"),
    ("name-number", b'{"id":4,"op":"stat","name":1}', 0, False, 4, "EINVAL"),
    # names
    ("name-256", _j({"id": 5, "op": "stat", "name": "a" * 256}), 0, False, 5, "ENAMETOOLONG"),
    (
        "name-256-create",
        _j({"id": 5, "op": "create", "name": "b" * 256, "size": 1}),
        0,
        False,
        5,
        "ENAMETOOLONG",
    ),
    (
        "name-256-utf8",
        _j({"id": 5, "op": "open", "name": "\u00e9" * 128}),
        0,
        False,
        5,
        "ENAMETOOLONG",
    ),
    ("name-255", _j({"id": 5, "op": "stat", "name": "a" * 254 + "/"}), 0, False, 5, "EINVAL"),
    ("name-empty", b'{"id":5,"op":"stat","name":""}', 0, False, 5, "EINVAL"),
    ("name-dotdot", b'{"id":5,"op":"stat","name":"a/../b"}', 0, False, 5, "EINVAL"),
    ("name-abs", b'{"id":5,"op":"stat","name":"/etc/passwd"}', 0, False, 5, "EINVAL"),
    ("name-space", b'{"id":5,"op":"stat","name":"a b"}', 0, False, 5, "EINVAL"),
    ("name-nonascii", _j({"id": 5, "op": "stat", "name": "caf\u00e9"}), 0, False, 5, "EINVAL"),
    ("name-nul-escape", b'{"id":5,"op":"stat","name":"a\\u0000"}', 0, False, 5, "EINVAL"),
    # hostile JSON within 64 KiB
    ("deep-array", _DEEP_ARRAY, 0, False, None, "EBADMSG"),
    ("deep-array-closed", b"[" * 30000 + b"]" * 30000, 0, False, None, "EBADMSG"),
    ("deep-object", _DEEP_OBJECT, 0, False, None, "EBADMSG"),
    ("deep-in-param", _DEEP_IN_PARAM, 0, False, None, "EBADMSG"),
    ("huge-int", b"9" * 5000, 0, False, None, "EBADMSG"),
    ("huge-negative-int", b"-" + b"9" * 60000, 0, False, None, "EBADMSG"),
    ("huge-id", b'{"id":' + b"9" * 5000 + b',"op":"hello"}', 0, False, None, "EBADMSG"),
    # 41 to 4300 digits: Python would parse them; the decoder refuses them up front
    (
        "long-int-param",
        b'{"id":1,"op":"create","name":"a","size":' + b"9" * 100 + b"}",
        0,
        False,
        None,
        "EBADMSG",
    ),
    ("long-int-id", b'{"id":' + b"1" * 41 + b',"op":"hello"}', 0, False, None, "EBADMSG"),
    (
        "40-digit-size",
        _j({"id": 1, "op": "create", "name": "a", "size": 10**39}),
        0,
        False,
        1,
        "EINVAL",
    ),
    ("NaN", b"NaN", 0, False, None, "EBADMSG"),
    ("NaN-param", b'{"id":6,"op":"open","name":"a","wait":NaN}', 0, False, None, "EBADMSG"),
    (
        "Infinity-param",
        b'{"id":6,"op":"open","name":"a","wait":Infinity}',
        0,
        False,
        None,
        "EBADMSG",
    ),
    (
        "-Infinity-param",
        b'{"id":6,"op":"open","name":"a","wait":-Infinity}',
        0,
        False,
        None,
        "EBADMSG",
    ),
    ("Infinity-id", b'{"id":Infinity,"op":"hello"}', 0, False, None, "EBADMSG"),
    ("NaN-unknown-key", b'{"id":6,"op":"hello","x":NaN}', 0, False, None, "EBADMSG"),
    ("float-overflow", b'{"id":6,"op":"open","name":"a","wait":1e999}', 0, False, 6, "EINVAL"),
    ("duplicate-keys", b'{"id":6,"op":"hello","op":"hello"}', 0, False, None, "EBADMSG"),
    ("duplicate-id", b'{"id":6,"id":7,"op":"hello"}', 0, False, None, "EBADMSG"),
    (
        "duplicate-nested",
        b'{"id":6,"op":"hello","client":{"a":1,"a":2}}',
        0,
        False,
        None,
        "EBADMSG",
    ),
    # lone surrogate escapes: valid JSON, never a valid str for the contract
    ("surrogate-name", b'{"id":8,"op":"open","name":"\\ud800"}', 0, False, 8, "EINVAL"),
    ("surrogate-client", b'{"id":8,"op":"hello","client":"\\udfff"}', 0, False, 8, "EINVAL"),
    ("surrogate-lease", b'{"id":8,"op":"release","lease":"a\\ud800"}', 0, False, 8, "EINVAL"),
    ("surrogate-op", b'{"id":8,"op":"\\ud800"}', 0, False, 8, "EOPNOTSUPP"),
    ("surrogate-key", b'{"id":8,"op":"hello","\\ud800":1}', 0, False, 8, "EINVAL"),
    ("surrogate-prefix", b'{"id":8,"op":"list","prefix":"\\ud800"}', 0, False, 8, "EINVAL"),
]


@pytest.mark.parametrize(
    ("data", "nfds", "truncated", "want_id", "want_code"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_decode_error_cases(
    data: bytes, nfds: int, truncated: bool, want_id: int | None, want_code: str
) -> None:
    assert want_code in CONTRACT_CODES
    rid, code = _decode_error(data, nfds=nfds, truncated=truncated)
    assert (rid, code) == (want_id, want_code)


def test_error_case_sizes_stay_within_the_limit_where_meant_to() -> None:
    sized = dict((c[0], c[1]) for c in ERROR_CASES)
    for name in ("deep-array", "deep-object", "deep-in-param", "huge-negative-int", "op-long"):
        assert len(sized[name]) <= wire.MAX_MESSAGE, name
    assert len(sized["65537"]) == wire.MAX_MESSAGE + 1


def test_decode_accepts_moderate_nesting_then_refuses_the_type() -> None:
    # nesting the parser copes with reaches pydantic, which refuses the type
    data = b'{"id":1,"op":"hello","client":' + b"[" * 50 + b"]" * 50 + b"}"
    assert _decode_error(data) == (1, "EINVAL")


def test_decode_error_message_names_the_field() -> None:
    _, err = decode(b'{"id":1,"op":"create","name":"a","size":0}')
    assert isinstance(err, BrokerError)
    assert "size" in (err.strerror or "")
    _, err = decode(b'{"id":1,"op":"hello","bogus":0}')
    assert isinstance(err, BrokerError)
    assert "bogus" in (err.strerror or "")


def test_unknown_op_reply_stays_small() -> None:
    rid, err = decode(_j({"id": 3, "op": "y" * 60000}))
    assert isinstance(err, BrokerError)
    assert len(encode_error(rid, err)) < 1024


# -- encode_ok / encode_error ---------------------------------------------------


def test_encode_ok_shape() -> None:
    body = json.loads(encode_ok(5, {"segment": {"x": 1}, "lease": "t"}))
    assert body == {"id": 5, "ok": True, "segment": {"x": 1}, "lease": "t"}
    assert json.loads(encode_ok(0, {})) == {"id": 0, "ok": True}


def test_encode_done_is_encode_ok_of_nothing() -> None:
    for rid in (0, 7, 2**63 - 1):
        assert encode_done(rid) == encode_ok(rid, {})


@settings(max_examples=300, deadline=None)
@given(
    rid=st.integers(0, 2**63 - 1),
    name=st.sampled_from(["a", "x/y.z", "A-_9/" * 50 + "q"]),
    ttl=st.none() | st.floats(0, wire.MAX_TTL),
    created=st.floats(0, 2e9),
    leases=st.integers(0, 40),
    sealed=st.booleans(),
)
def test_encode_grant_is_encode_ok_of_the_grant(
    rid: int, name: str, ttl: float | None, created: float, leases: int, sealed: bool
) -> None:
    """The formatted grant reply is byte for byte the generic encoding, and its
    cached part follows what changes (a lease count, a seal that drops it)."""
    seg = SegmentRecord(
        id="p.1",
        name=name,
        size=4096,
        lifetime="ttl" if ttl is not None else "refcount",
        ttl=ttl,
        backing="shm",
        mode=0o640,
        created=created,
        owner_uid=0,
        owner_gid=7,
    )
    seg.leases.update(f"t{i}" for i in range(leases))
    grant = Grant(seg, "Tok_-0", "ro", True)
    assert encode_grant(rid, grant) == encode_ok(rid, grant.result())
    seg.leases.add("one-more")
    if sealed:
        seg.sealed, seg.head = True, None  # as Registry.seal does
    assert encode_grant(rid, grant) == encode_ok(rid, grant.result())


@pytest.mark.parametrize("code", sorted(CONTRACT_CODES))
@pytest.mark.parametrize("rid", [None, 0, 17, 2**63 - 1])
def test_encode_error_carries_the_errno_name(code: str, rid: int | None) -> None:
    err = error_from_errno(getattr(errno, code), f"because {code}")
    body = _check_error_reply(rid, err)
    assert body["error"] == {"code": code, "message": f"because {code}"}


def test_encode_error_of_a_plain_oserror() -> None:
    body = json.loads(encode_error(1, OSError(errno.EMFILE, "Too many open files")))
    assert body["error"] == {"code": "EMFILE", "message": "Too many open files"}


def test_encode_error_escapes_what_is_not_utf8() -> None:
    err = error_from_errno(errno.EINVAL, "bad \ud800 value")
    data = encode_error(1, err)
    data.decode("utf-8")
    assert json.loads(data)["error"]["message"] == "bad \ud800 value"


# -- the one-pass road gives what the checked road gives ---------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["ro", "rw", "shm", "memfd", "ttl", "refcount", "a/b", "x:y", ""]),
)
_keys = st.sampled_from(
    [
        "op",
        "id",
        "name",
        "size",
        "lifetime",
        "ttl",
        "access",
        "wait",
        "fd",
        "lease",
        "mode",
        "prefix",
        "after",
        "limit",
        "client",
        "backing",
        "exist_ok",
        "extra",
    ]
)


@st.composite
def _near_requests(draw: st.DrawFn) -> bytes:
    """Requests close to valid: a real op and fields, some of them wrong or doubled."""
    op = draw(st.sampled_from(wire.OP_NAMES))
    pairs: list[tuple[str, Any]] = [("op", op), ("id", draw(st.integers(0, 2**64)))]
    pairs += [(k, v) for k, v in VALID[op].items() if draw(st.booleans())]
    pairs += draw(st.lists(st.tuples(_keys, st.one_of(_scalars, st.just({"a": 1}))), max_size=3))
    pairs = draw(st.permutations(pairs))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", " : ")]))
    body = "{" + sep[0].join(json.dumps(k) + sep[1] + json.dumps(v) for k, v in pairs) + "}"
    return body.encode()


@_property(3000)
@given(_near_requests())
def test_one_pass_decoding_agrees_with_the_checked_decoder(data: bytes) -> None:
    _assert_same_decoding(data)


def _assert_same_decoding(data: bytes) -> None:
    fast, checked = decode(data), decode_checked(data)
    if isinstance(checked[1], BrokerError):
        assert isinstance(fast[1], BrokerError), (data, fast)
        assert (fast[0], error_code(fast[1]), fast[1].strerror) == (
            checked[0],
            error_code(checked[1]),
            checked[1].strerror,
        )
    else:
        assert fast == checked


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"open","name":"a","id":1,"id":2}',
        b'{"op":"open","name":"a","name":"b","id":1}',
        rb'{"op":"release","lease":"a\tb","id":1}',
        b'{"op":"release","lease":"a:b","id":1,"lease":"c"}',
        rb'{"op":"hello","id":1,"client":"\ud800"}',
        b'{"op":"open","name":"a","id":1,"wait":NaN}',
        b'{"op":"open","name":"a","id":100000000000000000000000000000000000000000001}',
        b'\xef\xbb\xbf{"op":"open","name":"a","id":1}',
        b'{"op":"open","name":"a","id":1}garbage',
    ],
)
def test_one_pass_decoding_agrees_where_the_json_parsers_differ(data: bytes) -> None:
    _assert_same_decoding(data)


# -- the client half, against the daemon half -------------------------------------


def _segment(**kw: Any) -> SegmentRecord:
    fields: dict[str, Any] = {
        "id": "s-1",
        "name": "camera/front/frames",
        "size": 1 << 20,
        "lifetime": "ttl",
        "ttl": 1.5,
        "backing": "memfd",
        "mode": 0o640,
        "created": 1_700_000_000.5,
        "owner_uid": 1000,
        "owner_gid": 1000,
        "leases": {"tok"},
    }
    fields.update(kw)
    return SegmentRecord(**fields)


def _result(op: str) -> dict[str, Any]:
    """What the daemon answers to ``op``, built as the daemon builds it."""
    seg = _segment()
    if wire.RESULTS[op] is wire.SegmentLeaseResult:  # create, open, reclaim
        return Grant(seg, "tok", "rw", op in wire.FD_OPS).result()
    if op == "seal":
        return {"segment": seg.describe()}
    if op == "stat":  # as to an operator
        holder = {"client": 1, "pid": 2, "uid": 3, "name": "w", "access": "ro", "leases": 1}
        return {"segment": seg.describe(), "holders": [holder], "holders_more": 0}
    if op == "reload":
        return {"restart": ["shm_prefix"]}
    if op == "drop":
        return {"leases": 2}
    if op == "list":
        return {"segments": [seg.describe(), _segment(id="s-2", name="x").describe()], "next": "x"}
    if op == "hello":
        return {
            "server": "shmbrokerd 0.1.0",
            "versions": [1],
            "features": ["shm", "memfd"],
            "limits": {
                "max_message": 65536,
                "max_segment_size": 1 << 30,
                "max_wait": 60.0,
                "reclaim_window": 30.0,
            },
            "events": "ipc:///run/shmbroker/events.sock",
        }
    if op == "clients":
        return {
            "clients": [
                {"id": 1, "pid": 2, "uid": 3, "gid": 4, "leases": 5, "connected": 6.0, "name": "w"}
            ],
            "next": None,
        }
    if op == "stats":
        return {
            "uptime": 1.0,
            "segments": 1,
            "bytes": 4096,
            "leases": 1,
            "clients": 1,
            "requests": {"create": 1},
            "errors": {"invalid": 2},
        }
    assert wire.RESULTS[op] is wire.Empty, f"no result for {op}"  # release, delete
    return {}


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY)


def _expects_fd(op: str, params: dict[str, Any]) -> bool:
    return op in wire.FD_OPS and params.get("fd", True) is not False


CLIENT_CASES: list[tuple[str, dict[str, Any]]] = [
    *VALID.items(),  # test_valid_table_covers_every_op: one per op
    ("open", {**VALID["open"], "fd": True}),
    ("open", {"name": "a"}),
    ("create", {"name": "a", "size": 1}),
]


@pytest.mark.parametrize(
    ("op", "params"), CLIENT_CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(CLIENT_CASES)]
)
def test_client_round_trip_success(op: str, params: dict[str, Any]) -> None:
    proto = ClientProtocol()
    rid, data = proto.request(op, params)
    assert len(data) <= wire.MAX_MESSAGE
    got_id, req = decode(data)
    assert got_id == rid
    assert isinstance(req, wire.REQUESTS[op])
    dumped = req.model_dump()
    assert {k: dumped[k] for k in params} == params

    result = _result(op)
    fd = _devnull()
    expects = _expects_fd(op, params)
    reply = proto.receive(encode_ok(rid, result), [fd] if expects else [])
    assert reply is not None
    assert (reply.id, reply.op, reply.error) == (rid, op, None)
    model = reply.unwrap()
    assert isinstance(model, wire.RESULTS[op])
    assert model.model_dump() == result
    if expects:
        assert reply.fd == fd
        assert fd_is_open(fd)
    else:
        assert reply.fd is None
    os.close(fd)
    # answered: a second copy of the reply is for nobody
    assert proto.receive(encode_ok(rid, result), []) is None


def test_client_drops_None_parameters() -> None:
    proto = ClientProtocol()
    _, data = proto.request("open", {"name": "a", "wait": None, "access": None})
    assert json.loads(data) == {"id": 1, "op": "open", "name": "a"}
    assert isinstance(decode(data)[1], wire.REQUESTS["open"])


def test_client_ids_are_distinct_and_increasing() -> None:
    proto = ClientProtocol()
    ids = [proto.request("hello", {})[0] for _ in range(5)]
    assert ids == sorted(set(ids))
    assert all(0 <= i < wire.MAX_ID for i in ids)


def test_client_refuses_to_send_over_65536_bytes() -> None:
    proto = ClientProtocol()
    with pytest.raises(BrokerError) as info:
        proto.request("hello", {"client": "x" * wire.MAX_MESSAGE})
    assert info.value.errno == errno.EMSGSIZE


def test_client_pipelined_replies_match_by_id_out_of_order() -> None:
    proto = ClientProtocol()
    r1, _ = proto.request("stat", {"name": "a"})
    r2, _ = proto.request("delete", {"name": "b"})
    r3, _ = proto.request("open", {"name": "c", "wait": 5.0, "fd": False})
    second = proto.receive(encode_ok(r2, {}), [])
    third = proto.receive(encode_ok(r3, _result("open")), [])
    first = proto.receive(encode_ok(r1, _result("stat")), [])
    assert first is not None
    assert second is not None
    assert third is not None
    assert (first.op, second.op, third.op) == ("stat", "delete", "open")
    assert isinstance(first.unwrap(), wire.SegmentResult)
    assert isinstance(third.unwrap(), wire.SegmentLeaseResult)


# errno -> the OSError subclass the OS would raise (None: a BrokerError of no such subclass)
ERRNO_CLASSES: list[tuple[str, type[OSError] | None]] = [
    ("ENOENT", FileNotFoundError),
    ("EEXIST", FileExistsError),
    ("EACCES", PermissionError),
    ("EPERM", PermissionError),
    ("ETIMEDOUT", TimeoutError),
    ("EBADMSG", None),
    ("EINVAL", None),
    ("EOPNOTSUPP", None),
    ("ENAMETOOLONG", None),
    ("EDQUOT", None),
    ("ENOSPC", None),
    ("EMFILE", None),
    ("EIO", None),
]
_SPECIFIC = (FileNotFoundError, FileExistsError, PermissionError, TimeoutError)


def test_errno_table_covers_the_contract() -> None:
    assert {c for c, _ in ERRNO_CLASSES} >= CONTRACT_CODES


@pytest.mark.parametrize(("code", "cls"), ERRNO_CLASSES, ids=[c for c, _ in ERRNO_CLASSES])
@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_client_round_trip_error(code: str, cls: type[OSError] | None, op: str) -> None:
    proto = ClientProtocol()
    rid, _ = proto.request(op, VALID[op])
    fd = _devnull()  # an fd the daemon should not have sent: the client closes it
    reply = proto.receive(encode_error(rid, error_from_errno(getattr(errno, code), "nope")), [fd])
    assert not fd_is_open(fd)
    assert reply is not None
    assert (reply.id, reply.result, reply.fd) == (rid, None, None)
    exc = reply.error
    assert isinstance(exc, BrokerError)
    assert exc.errno == getattr(errno, code)
    assert exc.code == code
    assert exc.strerror == "nope"
    if cls is None:
        assert not isinstance(exc, _SPECIFIC)
    else:
        assert isinstance(exc, cls)
    with pytest.raises(BrokerError) as info:
        reply.unwrap()
    assert info.value is exc


@pytest.mark.parametrize("case", ["not-json", "fds", "bad-id"])
def test_client_raises_daemon_errors_with_null_id(case: str) -> None:
    data, nfds = {"not-json": (b"\xff", 0), "fds": (b"[]", 1), "bad-id": (b'{"op":"x"}', 0)}[case]
    rid, err = decode(data, nfds=nfds)
    assert rid is None
    assert isinstance(err, BrokerError)
    proto = ClientProtocol()
    proto.request("hello", {})
    with pytest.raises(BrokerError) as info:
        proto.receive(encode_error(rid, err), [])
    assert info.value.errno == err.errno


def test_client_unknown_error_code_becomes_eio() -> None:
    proto = ClientProtocol()
    rid, _ = proto.request("stat", {"name": "a"})
    body = {"id": rid, "ok": False, "error": {"code": "EFUTURE", "message": "new"}}
    reply = proto.receive(_j(body), [])
    assert reply is not None
    assert isinstance(reply.error, BrokerError)
    assert reply.error.errno == errno.EIO


def test_client_fd_missing_from_a_grant_is_ebadmsg() -> None:
    proto = ClientProtocol()
    rid, _ = proto.request("create", VALID["create"])
    reply = proto.receive(encode_ok(rid, _result("create")), [])
    assert reply is not None
    assert isinstance(reply.error, BrokerError)
    assert reply.error.errno == errno.EBADMSG


def test_client_closes_extra_fds() -> None:
    proto = ClientProtocol()
    rid, _ = proto.request("create", VALID["create"])
    fds = [_devnull(), _devnull()]
    reply = proto.receive(encode_ok(rid, _result("create")), fds)
    assert reply is not None
    assert isinstance(reply.error, BrokerError)
    assert reply.error.errno == errno.EBADMSG
    assert not any(fd_is_open(fd) for fd in fds)
    rid, _ = proto.request("stat", {"name": "a"})
    fd = _devnull()
    reply = proto.receive(encode_ok(rid, _result("stat")), [fd])
    assert reply is not None
    assert reply.fd is None
    assert not fd_is_open(fd)


def test_client_bad_result_shape_is_ebadmsg_not_a_pydantic_error() -> None:
    proto = ClientProtocol()
    rid, _ = proto.request("stat", {"name": "a"})
    fd = _devnull()
    reply = proto.receive(encode_ok(rid, {"segment": {"name": 1}}), [fd])
    assert not fd_is_open(fd)
    assert reply is not None
    assert isinstance(reply.error, BrokerError)
    assert reply.error.errno == errno.EBADMSG


def test_client_reply_for_nobody_is_ignored_and_its_fds_closed() -> None:
    proto = ClientProtocol()
    fd = _devnull()
    assert proto.receive(encode_ok(99, _result("create")), [fd]) is None
    assert not fd_is_open(fd)
    rid, _ = proto.request("stat", {"name": "a"})
    proto.forget(rid)
    assert proto.receive(encode_ok(rid, _result("stat")), []) is None


MALFORMED_REPLIES = [
    b"",
    b"\xff",
    b"[]",
    b"1",
    b'"x"',
    b"null",
    b"{}",
    b'{"id":1}',
    b'{"ok":true}',
    b'{"id":null,"ok":false}',
    b'{"id":null,"ok":false,"error":null}',
    b'{"id":null,"ok":false,"error":"boom"}',
    b'{"id":null,"ok":false,"error":[1]}',
    b'{"id":null,"ok":false,"error":{"code":5,"message":null}}',
    b'{"id":1,"ok":false,"error":"boom"}',
    b'{"id":1,"ok":false,"error":7}',
    b'{"id":1,"ok":false,"error":{"code":["EIO"]}}',
    b'{"id":1,"ok":true,"segment":"x"}',
    b'{"id":1,"ok":true}',
]


@pytest.mark.parametrize("data", MALFORMED_REPLIES, ids=repr)
def test_client_malformed_reply_gives_a_broker_error_never_another_exception(data: bytes) -> None:
    """Nothing but BrokerError may reach a library user, whatever the daemon sends."""
    proto = ClientProtocol()
    proto.request("stat", {"name": "a"})  # id 1 is pending
    fd = _devnull()
    try:
        reply = proto.receive(data, [fd])
    except BrokerError:
        pass
    else:
        assert reply is None or isinstance(reply.error, BrokerError)
    assert not fd_is_open(fd)


# -- properties ---------------------------------------------------------------


def _assert_decode_total(data: bytes, nfds: int, truncated: bool) -> None:
    rid, out = decode(data, nfds=nfds, truncated=truncated)
    assert rid is None or (type(rid) is int and 0 <= rid < wire.MAX_ID)
    if isinstance(out, BrokerError):
        assert error_code(out) in DECODE_CODES
        body = _check_error_reply(rid, out)
        assert body["error"]["code"] in CONTRACT_CODES
        if truncated or len(data) > wire.MAX_MESSAGE:
            assert (rid, error_code(out)) == (None, "EBADMSG")
        elif nfds:
            assert error_code(out) == "EBADMSG"
    else:
        assert isinstance(out, wire.REQUESTS[out.model_dump()["op"]])
        assert not truncated
        assert nfds == 0
        assert len(data) <= wire.MAX_MESSAGE
        assert rid == out.id


_json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
).map(lambda v: json.dumps(v).encode())

_datagrams = st.one_of(
    st.binary(max_size=70_000),
    st.builds(  # around the size limit, cheaply
        lambda head, n: head + b" " * n, st.binary(max_size=64), st.integers(65_400, 70_000)
    ),
    st.builds(
        lambda head, n: b'{"id":1,"op":"hello"}' + head + b" " * n,
        st.binary(max_size=8),
        st.integers(65_500, 65_520),
    ),
    _json_texts,
    st.sampled_from([c[1] for c in ERROR_CASES]),
)


@_property(2000)
@given(data=_datagrams, nfds=st.integers(0, 300), truncated=st.booleans())
def test_property_any_bytes_decode_to_a_request_or_a_contract_error(
    data: bytes, nfds: int, truncated: bool
) -> None:
    _assert_decode_total(data, nfds, truncated)


@_property(1000)
@given(
    prefix=st.sampled_from([b"{", b'{"id":1,"op":"hello"', b'{"id":1,"op":"create","name":"']),
    body=st.binary(max_size=200),
    suffix=st.sampled_from([b"", b"}", b'"}', b"]}"]),
)
def test_property_mutated_requests_never_raise(prefix: bytes, body: bytes, suffix: bytes) -> None:
    _assert_decode_total(prefix + body + suffix, 0, False)


_PARAM_NAMES = sorted(
    {name for model in wire.REQUESTS.values() for name in model.model_fields} | {"op", "id"}
)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 2**64)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        [*wire.OP_NAMES, "ro", "rw", "ttl", "refcount", "owner", "persistent", "memfd"]
    )
    | st.sampled_from(["a", "a/b", "x" * 256, "a//b", "\ud800", ""]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_PARAM_NAMES) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(-2, 2**63 + 2), _json_values),
        "op": st.one_of(st.sampled_from(wire.OP_NAMES), _json_values),
    },
).flatmap(
    lambda head: st.dictionaries(
        st.sampled_from(_PARAM_NAMES) | st.text(max_size=8), _json_values, max_size=6
    ).map(lambda rest: {**rest, **head})
)


@_property(500)
@given(obj=_objects, ensure_ascii=st.booleans(), nfds=st.sampled_from([0, 0, 0, 1]))
def test_property_random_json_objects(obj: dict[str, Any], ensure_ascii: bool, nfds: int) -> None:
    try:
        data = json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate without ensure_ascii: not UTF-8
        data = json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    _assert_decode_total(data, nfds, False)
    rid, out = decode(data, nfds=nfds)
    obj_id = obj.get("id")
    valid_id = type(obj_id) is int and 0 <= obj_id < wire.MAX_ID
    # the id is echoed whenever it was valid (or the message could not be parsed)
    assert rid is None or rid == obj_id
    if isinstance(out, BrokerError):
        if not valid_id and error_code(out) != "EBADMSG":
            assert (rid, error_code(out)) == (None, "EINVAL")
    else:
        op = obj["op"]
        assert out == wire.REQUESTS[op].model_validate(obj)
        # and what decode accepted survives being sent again
        assert decode(_j(out.model_dump(mode="json"))) == (rid, out)


# valid requests, generated: each decodes to exactly itself
_name = (
    st.lists(
        st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(
            lambda c: c not in (".", "..")
        ),
        min_size=1,
        max_size=6,
    )
    .map("/".join)
    .filter(lambda n: len(n) <= wire.MAX_NAME)
)
_seconds = st.floats(0, wire.MAX_TTL) | st.integers(0, 2**31)
_rid = st.integers(0, wire.MAX_ID - 1)
_token = st.text(min_size=1, max_size=256)
_create = st.one_of(
    st.fixed_dictionaries(
        {
            "name": _name,
            "size": st.integers(1, 2**63 - 1),
            "lifetime": st.just("ttl"),
            "ttl": _seconds,
        },
        optional={
            "exist_ok": st.booleans(),
            "mode": st.integers(0, 0o777),
            "backing": st.sampled_from(["shm", "memfd"]),
        },
    ),
    st.fixed_dictionaries(
        {"name": _name, "size": st.integers(1, 2**63 - 1)},
        optional={
            "lifetime": st.sampled_from(["persistent", "owner", "refcount"]),
            "exist_ok": st.booleans(),
            "mode": st.integers(0, 0o777),
            "backing": st.sampled_from(["shm", "memfd"]),
        },
    ),
)
_VALID_PARAMS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "hello": st.fixed_dictionaries({}, optional={"client": st.text(max_size=1024)}),
    "create": _create,
    "open": st.fixed_dictionaries(
        {"name": _name},
        optional={"access": st.sampled_from(["ro", "rw"]), "wait": _seconds, "fd": st.booleans()},
    ),
    "release": st.fixed_dictionaries({"lease": _token}),
    "seal": st.fixed_dictionaries({"name": _name}),
    "delete": st.fixed_dictionaries({"name": _name}),
    "stat": st.fixed_dictionaries({"name": _name}, optional={"holders": st.booleans()}),
    "list": st.fixed_dictionaries(
        {},
        optional={
            "prefix": st.text(max_size=255),
            "after": st.text(max_size=255),
            "limit": st.integers(1, 100),
        },
    ),
    "reclaim": st.fixed_dictionaries({"lease": _token}),
    "reload": st.just({}),
    "clients": st.fixed_dictionaries(
        {}, optional={"after": st.integers(0, wire.MAX_ID - 1), "limit": st.integers(1, 100)}
    ),
    "stats": st.just({}),
    "drop": st.fixed_dictionaries({"client": st.integers(0, wire.MAX_ID - 1)}),
}


def test_valid_strategies_cover_every_op() -> None:
    assert set(_VALID_PARAMS) == set(wire.REQUESTS)


@_property(500)
@given(
    op_params=st.sampled_from(wire.OP_NAMES).flatmap(
        lambda op: st.tuples(st.just(op), _VALID_PARAMS[op])
    ),
    rid=_rid,
    ensure_ascii=st.booleans(),
)
def test_property_valid_requests_decode_to_themselves(
    op_params: tuple[str, dict[str, Any]], rid: int, ensure_ascii: bool
) -> None:
    op, params = op_params
    body = {"id": rid, "op": op, **params}
    got_id, req = decode(json.dumps(body, ensure_ascii=ensure_ascii).encode())
    assert got_id == rid
    assert isinstance(req, wire.REQUESTS[op]), req
    dumped = req.model_dump()
    assert {k: dumped[k] for k in body} == body
