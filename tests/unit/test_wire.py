"""The contract's pydantic models alone: name rules, strict requests, lenient replies.

Pure tests: no daemon, no socket.  Requests are validated exactly as the
daemon validates them (``model_validate`` on the decoded JSON dict).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shmbroker import wire
from shmbrokerd.registry import Grant, SegmentRecord
from tests.support.contract import MINIMAL


def _error_types(exc: ValidationError) -> list[str]:
    return [e["type"] for e in exc.errors()]


def _refused(model: type[Any], body: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return info.value


# -- names -------------------------------------------------------------------

VALID_NAMES = [
    "a",
    "camera/front/frames",
    "A-Z_a-z.0-9",
    "a.b",
    "...",  # only '.' and '..' are forbidden components
    ".hidden",
    "a..b/c",
    "-",
    "_/-/.x",
    "a" * 255,
    "ab/" * 84 + "abc",  # 255 bytes with separators
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_pass(name: str) -> None:
    assert wire.check_name(name) == name
    assert wire.REQUESTS["open"].model_validate({"id": 1, "op": "open", "name": name})


def test_the_255_byte_fixture_names_really_are_255_bytes() -> None:
    assert len("ab/" * 84 + "abc") == 255


TOO_LONG = [
    "a" * 256,
    "ab/" * 85 + "a",  # 256 bytes with separators
    "a" * 10_000,
    "\u00e9" * 128,  # 128 characters but 256 bytes: the limit counts bytes
]


@pytest.mark.parametrize("name", TOO_LONG, ids=["256", "256-slashes", "10000", "256-bytes-utf8"])
def test_names_over_255_bytes_are_name_too_long(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        wire.REQUESTS["create"].model_validate({"id": 1, "op": "create", "name": name, "size": 1})
    assert _error_types(info.value) == ["name_too_long"]


BAD_NAMES = [
    "",
    "/",
    "/a",
    "a/",
    "a//b",
    "//",
    ".",
    "..",
    "./a",
    "a/.",
    "a/./b",
    "a/../b",
    "../a",
    "\u00e9",
    "caf\u00e9/x",
    "a b",
    " a",
    "a ",
    "a\tb",
    "a\nb",
    "a\x00b",
    "a\\b",
    "a:b",
    "a*",
    "~a",
    "\ud800",  # a lone surrogate, as JSON "\ud800" decodes
    "\uff41",  # fullwidth 'a': not ASCII even though isalnum()
    "\u0661",  # an Arabic-Indic digit: \d would match it, the contract does not
]


def _ops_with(param: str) -> list[str]:
    """The ops whose request has ``param``, from wire.OPS."""
    return [spec.op for spec in wire.OPS if param in spec.request.model_fields]


#: ops that name a segment
NAMED_OPS = _ops_with("name")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_bad_name(name: str) -> None:
    for op in NAMED_OPS:
        body: dict[str, Any] = {**_req(op), "name": name}
        assert _error_types(_refused(wire.REQUESTS[op], body)) == ["bad_name"], op


def test_check_name_raises_the_pydantic_error_types_directly() -> None:
    from pydantic_core import PydanticCustomError

    with pytest.raises(PydanticCustomError) as long_info:
        wire.check_name("x" * 256)
    assert long_info.value.type == "name_too_long"
    with pytest.raises(PydanticCustomError) as bad_info:
        wire.check_name("a//b")
    assert bad_info.value.type == "bad_name"


def _rule_by_rule(name: str) -> str:
    """The name rules of PROTOCOL.md read one by one (check_name matches in one go)."""
    if len(name.encode("utf-8", "surrogatepass")) > wire.MAX_NAME:
        return "name_too_long"
    for part in name.split("/"):
        if part in ("", ".", "..") or not all(c in _NAME_CHARS for c in part):
            return "bad_name"
    return "ok"


_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _check_name_verdict(name: str) -> str:
    from pydantic_core import PydanticCustomError

    try:
        wire.check_name(name)
    except PydanticCustomError as exc:
        return exc.type
    return "ok"


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(
        st.sampled_from(["a", "Z9", ".", "..", "/", "-", "_", "é", "\n", "\x00", " "]),
        max_size=12,
    )
    | st.text(max_size=300)
    | st.builds(lambda n, c: c * n, st.integers(250, 260), st.sampled_from(["a", "é", "a/"]))
)
def test_check_name_agrees_with_the_rules_read_one_by_one(parts: list[str] | str) -> None:
    name = parts if isinstance(parts, str) else "".join(parts)
    assert _check_name_verdict(name) == _rule_by_rule(name), name


def test_name_must_be_a_string() -> None:
    for value in (1, None, ["a"], {"a": 1}, b"a", True):
        err = _refused(wire.REQUESTS["stat"], {"id": 1, "op": "stat", "name": value})
        assert "bad_name" not in _error_types(err)


# -- request strictness -------------------------------------------------------------


#: One minimal valid request per op.
def _req(op: str, **params: Any) -> dict[str, Any]:
    return {"id": 7, "op": op, **MINIMAL[op], **params}


def test_minimal_table_covers_every_op() -> None:
    assert set(MINIMAL) == set(wire.REQUESTS) == set(wire.OP_NAMES)
    for spec in wire.OPS:  # exactly the required parameters
        fields = spec.request.model_fields.items()
        assert set(MINIMAL[spec.op]) == {k for k, f in fields if f.is_required()} - {"id"}


@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_minimal_request_is_valid_and_keeps_its_id(op: str) -> None:
    req = wire.REQUESTS[op].model_validate(_req(op))
    assert req.id == 7
    assert req.model_dump()["op"] == op


@pytest.mark.parametrize("op", wire.OP_NAMES)
@pytest.mark.parametrize(
    "rid",
    [True, False, "1", 1.0, 0.5, -1, 2**63, 2**64, None, [1], {"id": 1}],
    ids=repr,
)
def test_id_must_be_an_unsigned_int_below_2_63(op: str, rid: Any) -> None:
    body = _req(op)
    body["id"] = rid
    err = _refused(wire.REQUESTS[op], body)
    assert [e["loc"] for e in err.errors()] == [("id",)]


@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_id_bounds_that_are_valid(op: str) -> None:
    for rid in (0, 1, 2**63 - 1):
        body = _req(op)
        body["id"] = rid
        assert wire.REQUESTS[op].model_validate(body).id == rid


@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_id_is_required(op: str) -> None:
    body = _req(op)
    del body["id"]
    err = _refused(wire.REQUESTS[op], body)
    assert _error_types(err) == ["missing"]


@pytest.mark.parametrize("op", wire.OP_NAMES)
@pytest.mark.parametrize("extra", ["x", "ID", "Name", "fds", "__class__", "op2"])
def test_unknown_parameters_are_refused(op: str, extra: str) -> None:
    err = _refused(wire.REQUESTS[op], _req(op, **{extra: 1}))
    assert _error_types(err) == ["extra_forbidden"]


def test_parameters_of_another_op_are_refused() -> None:
    # each op accepts only its own parameters: 'size' belongs to create alone
    err = _refused(wire.REQUESTS["open"], _req("open", size=1))
    assert _error_types(err) == ["extra_forbidden"]
    err = _refused(wire.REQUESTS["stat"], _req("stat", access="ro"))
    assert _error_types(err) == ["extra_forbidden"]


@pytest.mark.parametrize("op", wire.OP_NAMES)
def test_op_must_match_the_model(op: str) -> None:
    other = "stats" if op != "stats" else "hello"
    body = _req(op)
    body["op"] = other
    _refused(wire.REQUESTS[op], body)


def test_create_defaults_match_the_contract() -> None:
    req = wire.REQUESTS["create"].model_validate(_req("create"))
    assert req.model_dump() == {
        "id": 7,
        "op": "create",
        "name": "a",
        "size": 1,
        "lifetime": "refcount",
        "ttl": None,
        "exist_ok": False,
        "mode": 0o600,
        # left to the daemon, whose default is the contract's "shm"
        # (test_registry checks it) unless its operator chose memfd
        "backing": None,
    }


def test_open_list_clients_defaults_match_the_contract() -> None:
    assert wire.REQUESTS["open"].model_validate(_req("open")).model_dump() == {
        "id": 7,
        "op": "open",
        "name": "a",
        "access": "ro",
        "wait": None,
        "fd": True,
    }
    assert wire.REQUESTS["list"].model_validate(_req("list")).model_dump()["limit"] == 100
    assert wire.REQUESTS["clients"].model_validate(_req("clients")).model_dump()["limit"] == 100


# (op, field, value, valid?)
FIELD_CASES: list[tuple[str, str, Any, bool]] = [
    # size: int > 0, never a float or a bool or a string
    ("create", "size", 1, True),
    ("create", "size", 2**40, True),
    ("create", "size", 0, False),
    ("create", "size", -1, False),
    ("create", "size", 1.0, False),
    ("create", "size", True, False),
    ("create", "size", "4096", False),
    ("create", "size", None, False),
    ("create", "size", 2**63, False),
    # mode: permission bits 0..0o777
    ("create", "mode", 0, True),
    ("create", "mode", 0o777, True),
    ("create", "mode", 0o644, True),
    ("create", "mode", -1, False),
    ("create", "mode", 0o1000, False),
    ("create", "mode", 0o4755, False),
    ("create", "mode", "0o600", False),
    ("create", "mode", "384", False),
    ("create", "mode", 384.0, False),
    ("create", "mode", True, False),
    # enums
    ("create", "lifetime", "persistent", True),
    ("create", "lifetime", "owner", True),
    ("create", "lifetime", "refcount", True),
    ("create", "lifetime", "Refcount", False),
    ("create", "lifetime", "forever", False),
    ("create", "lifetime", None, False),
    ("create", "backing", "shm", True),
    ("create", "backing", "memfd", True),
    ("create", "backing", "file", False),
    ("create", "backing", "", False),
    ("create", "exist_ok", True, True),
    ("create", "exist_ok", False, True),
    ("create", "exist_ok", 1, False),
    ("create", "exist_ok", "true", False),
    ("open", "access", "ro", True),
    ("open", "access", "rw", True),
    ("open", "access", "wo", False),
    ("open", "access", "RW", False),
    ("open", "access", True, False),
    ("open", "fd", True, True),
    ("open", "fd", False, True),
    ("open", "fd", 0, False),
    ("open", "fd", "false", False),
    # wait: seconds >= 0, finite
    ("open", "wait", 0, True),
    ("open", "wait", 0.0, True),
    ("open", "wait", 2.5, True),
    ("open", "wait", 30, True),
    ("open", "wait", -0.001, False),
    ("open", "wait", -1, False),
    ("open", "wait", float("inf"), False),
    ("open", "wait", float("nan"), False),
    ("open", "wait", wire.MAX_TTL * 2, False),
    ("open", "wait", "1", False),
    ("open", "wait", True, False),
    # list
    ("list", "limit", 1, True),
    ("list", "limit", 100, True),
    ("list", "limit", 0, False),
    ("list", "limit", 101, False),
    ("list", "limit", -1, False),
    ("list", "limit", 10.0, False),
    ("list", "limit", True, False),
    ("list", "prefix", "camera/", True),
    ("list", "prefix", "", True),
    ("list", "prefix", 1, False),
    ("list", "after", "a/b", True),
    ("list", "after", 5, False),
    # clients
    ("clients", "limit", 1, True),
    ("clients", "limit", 100, True),
    ("clients", "limit", 0, False),
    ("clients", "limit", 101, False),
    ("clients", "after", 0, True),
    ("clients", "after", 12, True),
    ("clients", "after", -1, False),
    ("clients", "after", "12", False),
    ("clients", "after", True, False),
    # tokens
    ("release", "lease", "x" * 256, True),
    ("release", "lease", "", False),
    ("release", "lease", "x" * 257, False),
    ("release", "lease", 12, False),
    ("release", "lease", None, False),
    ("reclaim", "lease", "", False),
    ("reclaim", "lease", ["tok"], False),
    # hello
    ("hello", "client", "my-app 1.0", True),
    ("hello", "client", 1, False),
]


@pytest.mark.parametrize(
    ("op", "field", "value", "valid"),
    FIELD_CASES,
    ids=[f"{o}-{f}-{v!r}-{'ok' if ok else 'bad'}" for o, f, v, ok in FIELD_CASES],
)
def test_field_types_and_ranges(op: str, field: str, value: Any, valid: bool) -> None:
    body = _req(op, **{field: value})
    model = wire.REQUESTS[op]
    if valid:
        req = model.model_validate(body)
        assert getattr(req, field) == value
        assert type(getattr(req, field)) in (type(value), float)
    else:
        err = _refused(model, body)
        assert [e["loc"] for e in err.errors()] == [(field,)]


@pytest.mark.parametrize("op", NAMED_OPS)
def test_name_is_required(op: str) -> None:
    body = _req(op)
    del body["name"]
    assert _error_types(_refused(wire.REQUESTS[op], body)) == ["missing"]


@pytest.mark.parametrize("op", _ops_with("lease"))
def test_lease_is_required(op: str) -> None:
    body = _req(op)
    del body["lease"]
    assert _error_types(_refused(wire.REQUESTS[op], body)) == ["missing"]


def test_create_size_is_required() -> None:
    body = _req("create")
    del body["size"]
    assert _error_types(_refused(wire.REQUESTS["create"], body)) == ["missing"]


# -- ttl is required with lifetime ttl and refused with any other ----------------


@pytest.mark.parametrize("ttl", [0, 0.0, 0.5, 1, 3600, wire.MAX_TTL])
def test_ttl_lifetime_with_ttl_is_valid(ttl: float) -> None:
    req = wire.REQUESTS["create"].model_validate(_req("create", lifetime="ttl", ttl=ttl))
    assert req.model_dump()["ttl"] == ttl


def test_ttl_lifetime_without_ttl_is_refused() -> None:
    err = _refused(wire.REQUESTS["create"], _req("create", lifetime="ttl"))
    assert _error_types(err) == ["ttl_lifetime"]
    err = _refused(wire.REQUESTS["create"], _req("create", lifetime="ttl", ttl=None))
    assert _error_types(err) == ["ttl_lifetime"]


@pytest.mark.parametrize("lifetime", ["persistent", "owner", "refcount", None])
@pytest.mark.parametrize("ttl", [0, 5.0])
def test_ttl_with_another_lifetime_is_refused(lifetime: str | None, ttl: float) -> None:
    params: dict[str, Any] = {"ttl": ttl}
    if lifetime is not None:  # None: the default lifetime, refcount
        params["lifetime"] = lifetime
    err = _refused(wire.REQUESTS["create"], _req("create", **params))
    assert _error_types(err) == ["ttl_lifetime"]


@pytest.mark.parametrize(
    "ttl", [-1, -0.5, float("inf"), float("nan"), wire.MAX_TTL + 1, "5", True], ids=repr
)
def test_ttl_out_of_range_or_of_the_wrong_type_is_refused(ttl: Any) -> None:
    err = _refused(wire.REQUESTS["create"], _req("create", lifetime="ttl", ttl=ttl))
    assert ("ttl",) in [e["loc"] for e in err.errors()]


def test_requests_are_frozen() -> None:
    req = wire.REQUESTS["open"].model_validate(_req("open"))
    with pytest.raises(ValidationError):
        req.name = "b"  # type: ignore[attr-defined]


# -- replies: what the daemon produces, read back by the client --------------------


def _record(**kw: Any) -> SegmentRecord:
    fields: dict[str, Any] = {
        "id": "seg-1",
        "name": "camera/front",
        "size": 4096,
        "lifetime": "refcount",
        "ttl": None,
        "backing": "shm",
        "mode": 0o640,
        "created": 1_700_000_000.25,
        "owner_uid": 1000,
        "owner_gid": 100,
    }
    fields.update(kw)
    return SegmentRecord(**fields)


RECORDS = [
    _record(),
    _record(lifetime="ttl", ttl=0.0),
    _record(lifetime="ttl", ttl=2.5, backing="memfd", sealed=True),
    _record(lifetime="persistent", mode=0, owner_uid=0, owner_gid=0, size=1),
    _record(lifetime="owner", leases={"t1", "t2", "t3"}),
]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: f"{r.lifetime}-{r.backing}")
def test_segment_record_describe_validates_as_wire_segment(rec: SegmentRecord) -> None:
    described = rec.describe()
    seg = wire.SegmentInfo.model_validate(described)
    assert seg.model_dump() == described
    assert seg.leases == len(rec.leases)
    # the daemon's describe() gives exactly the contract's Segment keys
    assert set(described) == set(wire.SegmentInfo.model_fields)


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: f"{r.lifetime}-{r.backing}")
def test_segment_survives_a_json_round_trip(rec: SegmentRecord) -> None:
    import json

    seg = wire.SegmentInfo.model_validate_json(json.dumps(rec.describe()))
    assert seg.model_dump() == rec.describe()


def test_grant_result_validates_as_segment_lease_result() -> None:
    rec = _record(leases={"tok-1"})
    res = wire.SegmentLeaseResult.model_validate(Grant(rec, "tok-1", "rw", True).result())
    assert res.lease == "tok-1"
    assert res.segment.name == "camera/front"
    assert res.segment.leases == 1


def test_list_result_validates() -> None:
    body = {"segments": [r.describe() for r in RECORDS], "next": "camera/front"}
    res = wire.ListResult.model_validate(body)
    assert [s.id for s in res.segments] == [r.id for r in RECORDS]
    assert res.next == "camera/front"
    assert wire.ListResult.model_validate({"segments": [], "next": None}).next is None


def test_replies_ignore_unknown_keys_so_a_newer_daemon_can_add_some() -> None:
    body = {**_record().describe(), "generation": 3, "future": {"x": 1}}
    seg = wire.SegmentInfo.model_validate(body)
    assert not hasattr(seg, "generation")
    assert seg.name == "camera/front"


def test_segment_reply_missing_a_key_is_refused() -> None:
    body = _record().describe()
    del body["leases"]
    with pytest.raises(ValidationError):
        wire.SegmentInfo.model_validate(body)


def test_hello_result_keeps_extra_limits() -> None:
    body = {
        "server": "shmbrokerd 0.1.0",
        "versions": [1],
        "features": ["shm", "memfd"],
        "limits": {
            "max_message": 65536,
            "max_segment_size": 1 << 30,
            "max_wait": 60.0,
            "reclaim_window": 30.0,
            "max_leases": 4096,
        },
    }
    res = wire.HelloResult.model_validate(body)
    assert res.versions == [wire.PROTOCOL_VERSION]
    assert res.limits.max_message == wire.MAX_MESSAGE
    assert res.limits.model_extra == {"max_leases": 4096}


def test_hello_result_needs_the_contract_limits() -> None:
    body = {
        "server": "x",
        "versions": [1],
        "features": [],
        "limits": {"max_message": 65536, "max_segment_size": 1, "max_wait": 1.0},
    }
    with pytest.raises(ValidationError):
        wire.HelloResult.model_validate(body)


def test_clients_and_stats_results_validate() -> None:
    clients = wire.ClientsResult.model_validate(
        {
            "clients": [
                {"id": 1, "pid": 10, "uid": 0, "gid": 0, "leases": 2, "connected": 1.5},
            ],
            "next": None,
        }
    )
    assert clients.clients[0].leases == 2
    stats = wire.StatsResult.model_validate(
        {
            "uptime": 1.0,
            "segments": 2,
            "bytes": 8192,
            "leases": 3,
            "clients": 1,
            "requests": {"create": 2},
            "errors": {},
        }
    )
    assert stats.model_extra == {"leases": 3}


@pytest.mark.parametrize("event", ["created", "opened", "released", "sealed", "deleted", "expired"])
def test_event_model_accepts_the_contract_event_names(event: str) -> None:
    body = {"event": event, "name": "a", "size": 1, "uid": None, "pid": None, "ts": 1.0}
    assert wire.Event.model_validate(body).event == event


def test_event_model_refuses_unknown_event_names() -> None:
    body = {"event": "renamed", "name": "a", "size": 1, "uid": 1, "pid": 1, "ts": 1.0}
    with pytest.raises(ValidationError):
        wire.Event.model_validate(body)


def test_results_table_covers_every_op() -> None:
    assert set(wire.RESULTS) == set(wire.REQUESTS)
    assert sorted(wire.FD_OPS) == ["create", "open"]
    # the tables are wire.OPS, in its order
    assert list(wire.REQUESTS) == list(wire.RESULTS) == list(wire.OP_NAMES)
    for spec in wire.OPS:
        assert wire.REQUESTS[spec.op] is spec.request
        assert wire.RESULTS[spec.op] is spec.result
        assert (spec.op in wire.FD_OPS) == spec.fd
    assert len(set(wire.OP_NAMES)) == len(wire.OPS)
