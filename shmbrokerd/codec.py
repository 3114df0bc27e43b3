"""Request decoding and reply encoding, with no I/O (sans-IO).

The server hands this module exactly what ``recvmsg`` gave it (the datagram,
how many fds came with it, whether anything was truncated) and gets back a
validated request or the error to answer.  It never raises for bad input:
every byte string, however hostile, maps to a reply, which the property tests
check.  Parsing is done with the stdlib ``json`` under hooks that refuse what
JSON allows but a request never needs (NaN/Infinity, duplicate keys, huge
integers, deep nesting), then pydantic validates in strict mode.

Most requests take a shorter road first: pydantic parses and validates the
bytes in one pass (``validate_json``), which costs about half as much.  Its
parser differs from ours on duplicate keys (the last one wins), so its
answer is only taken when it cannot differ: no escape sequences in the
datagram, and exactly one ``:`` per field it set, which proves there was no
key twice and no nested object.  Anything else, valid or not, goes the
long road, which alone decides every error.
"""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import to_json

from shmbroker.errors import BrokerError, errno_name, error_from_errno
from shmbroker.wire import MAX_ID, MAX_MESSAGE, REQUESTS, Request

if TYPE_CHECKING:
    from .registry import Grant

__all__ = ["decode", "encode_done", "encode_error", "encode_grant", "encode_ok", "error_code"]

_MAX_INT_DIGITS = 40


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError("integer too long")
    return int(text)


_decoder = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_int=_bounded_int
)


_one_pass: TypeAdapter[Request] = TypeAdapter(Annotated[Request, Field(discriminator="op")])
#: the adapter's validator itself: its Python wrapper costs a fifth of a decode
_validate_json = _one_pass.validator.validate_json


def _bad(num: int, message: str) -> BrokerError:
    return error_from_errno(num, message)


def _request_id(obj: object) -> int | None:
    if isinstance(obj, dict):
        rid = obj.get("id")
        if type(rid) is int and 0 <= rid < MAX_ID:
            return rid
    return None


def _describe(exc: ValidationError) -> tuple[int, str]:
    """Map the first pydantic error to an errno and a message naming the field."""
    err = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    num = errno.ENAMETOOLONG if err["type"] == "name_too_long" else errno.EINVAL
    return num, f"{loc}: {err['msg']}" if loc else err["msg"]


def decode(
    data: bytes, *, nfds: int = 0, truncated: bool = False
) -> tuple[int | None, Request | BrokerError]:
    """Turn one received datagram into ``(id, request)`` or ``(id, error)``.

    ``id`` is the request's id when it could be read, else None.
    """
    if not truncated and not nfds and len(data) <= MAX_MESSAGE and b"\\" not in data:
        try:
            req: Request = _validate_json(data)
        except ValidationError:
            pass
        else:
            if data.count(b":") == len(req.model_fields_set):
                return req.id, req
    return decode_checked(data, nfds=nfds, truncated=truncated)


def decode_checked(
    data: bytes, *, nfds: int = 0, truncated: bool = False
) -> tuple[int | None, Request | BrokerError]:
    """:func:`decode` by the long road only (the reference the short road must match)."""
    if truncated or len(data) > MAX_MESSAGE:
        return None, _bad(errno.EBADMSG, "message over 65536 bytes or truncated")
    try:
        text = data.decode("utf-8")
        obj = _decoder.decode(text)
    except (ValueError, RecursionError):
        return None, _bad(errno.EBADMSG, "not a UTF-8 JSON object")
    rid = _request_id(obj)
    if not isinstance(obj, dict):
        return None, _bad(errno.EBADMSG, "not a JSON object")
    if nfds:
        return rid, _bad(errno.EBADMSG, "file descriptors are not accepted from clients")
    if rid is None:
        return None, _bad(errno.EINVAL, "id: an integer from 0 to 2^63-1 is required")
    op = obj.get("op")
    model = REQUESTS.get(op) if isinstance(op, str) else None
    if model is None:
        if not isinstance(op, str):
            return rid, _bad(errno.EINVAL, "op: a string is required")
        return rid, _bad(errno.EOPNOTSUPP, f"unknown op {op[:64]!r}")
    try:
        return rid, model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        num, message = _describe(exc)
        return rid, _bad(num, message)


def error_code(exc: OSError) -> str:
    return errno_name(exc.errno)


def encode_ok(rid: int, result: dict[str, Any]) -> bytes:
    return to_json({"id": rid, "ok": True, **result})


def encode_done(rid: int) -> bytes:
    """``encode_ok(rid, {})``, formatted: the reply to every release."""
    return b'{"id":%d,"ok":true}' % rid


def encode_grant(rid: int, grant: Grant) -> bytes:
    """``encode_ok(rid, grant.result())``, from the segment's cached encoding.

    Every open answers with the whole Segment object; only its lease count
    changes from one open to the next, so the rest is encoded once.
    """
    seg = grant.segment
    head = seg.head
    if head is None:  # describe() without its last member, "leases", left open
        desc = seg.describe()
        del desc["leases"]
        head = seg.head = to_json(desc)[:-1] + b',"leases":'
    return b'{"id":%d,"ok":true,"segment":%s%d},"lease":"%s"}' % (
        rid,
        head,
        len(seg.leases),
        grant.lease.encode(),
    )


def encode_error(rid: int | None, exc: OSError) -> bytes:
    message = exc.strerror or str(exc)
    body = {"id": rid, "ok": False, "error": {"code": error_code(exc), "message": message}}
    try:
        return to_json(body)
    except ValueError:  # a message quoting something not encodable (a lone surrogate)
        return json.dumps(body, ensure_ascii=True).encode()
