"""The client half of the wire protocol, with no I/O (sans-IO): calls as bytes.

Both :class:`~shmbroker.Broker` and :class:`~shmbroker.AsyncBroker` drive
this one object: it numbers requests, encodes them, and turns each received
datagram (with its fds) into the result model or the exception to raise, so
the sync and async clients differ only in how they wait.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json, to_json

from . import wire
from .errors import BrokerError, error_from_code, error_from_errno

__all__ = ["ClientProtocol", "Reply"]


@dataclass(slots=True)
class Reply:
    id: int
    op: str
    result: BaseModel | None
    error: BrokerError | None
    fd: int | None

    def unwrap(self) -> BaseModel:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class ClientProtocol:
    def __init__(self) -> None:
        self._next_id = 1
        self._pending: dict[int, tuple[str, bool]] = {}

    def request(self, op: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """Encode one request; returns its id and the datagram to send."""
        rid = self._next_id
        self._next_id += 1
        body = {"id": rid, "op": op, **{k: v for k, v in params.items() if v is not None}}
        try:
            data = to_json(body)
        except ValueError:  # e.g. a lone surrogate in a name
            raise error_from_errno(errno.EINVAL, f"{op}: parameters cannot be encoded") from None
        if len(data) > wire.MAX_MESSAGE:
            raise error_from_errno(errno.EMSGSIZE, "request over 65536 bytes")
        expects_fd = op in wire.FD_OPS and params.get("fd", True) is not False
        self._pending[rid] = (op, expects_fd)
        return rid, data

    def forget(self, rid: int) -> None:
        """Stop waiting for ``rid`` (its reply, if it comes, is discarded)."""
        self._pending.pop(rid, None)

    def receive(self, data: bytes, fds: list[int]) -> Reply | None:
        """Decode a reply; None if it answers nothing we wait for (fds closed)."""
        try:
            body = from_json(data)
            rid = body["id"]
            ok = body["ok"]
        except (ValueError, TypeError, KeyError, RecursionError):
            _close(fds)
            raise error_from_errno(errno.EBADMSG, "malformed reply from the daemon") from None
        entry = self._pending.pop(rid, None) if type(rid) is int else None
        if entry is None:
            _close(fds)
            if rid is None and ok is False:  # the daemon could not read our request
                raise _reply_error(body)
            return None
        op, expects_fd = entry
        if ok is not True:
            _close(fds)
            return Reply(rid, op, None, _reply_error(body), None)
        model = wire.RESULTS[op]
        del body["id"], body["ok"]  # the result is the rest (some models keep unknown keys)
        try:
            # an empty result takes any object: not validated again and again
            result = (
                _EMPTY
                if model is wire.Empty
                else model.__pydantic_validator__.validate_python(body)
            )
        except ValidationError:
            _close(fds)
            return Reply(rid, op, None, error_from_errno(errno.EBADMSG, f"bad {op} reply"), None)
        if expects_fd and len(fds) != 1:
            _close(fds)
            return Reply(rid, op, None, error_from_errno(errno.EBADMSG, "expected one fd"), None)
        if not expects_fd and fds:
            _close(fds)
            fds = []
        return Reply(rid, op, result, None, fds[0] if fds else None)


_EMPTY = wire.Empty()


def _reply_error(body: dict[str, Any]) -> BrokerError:
    err = body.get("error")
    if not isinstance(err, dict):
        return error_from_errno(errno.EBADMSG, "malformed error reply from the daemon")
    return error_from_code(str(err.get("code", "EIO")), str(err.get("message", "")))


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
