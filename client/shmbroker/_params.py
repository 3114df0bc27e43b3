"""Building a request's parameters from a public method's arguments.

Both clients check argument types here, before anything is sent, so a wrong
type is a ``TypeError`` naming the argument rather than the daemon's
``EINVAL``; the ``Literal`` types are the public signatures' too.
"""

from __future__ import annotations

from typing import Any, Literal

Lifetime = Literal["persistent", "owner", "refcount", "ttl"]
Access = Literal["ro", "rw"]
Backing = Literal["shm", "memfd"]


def _need(value: object, kinds: tuple[type, ...], what: str) -> None:
    """A TypeError for a wrong argument type, before anything is sent (``bool``
    is no integer here, as in the contract)."""
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return
    names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    raise TypeError(f"{what} must be {names}, not {type(value).__name__}")


_STR = (str,)
_INT = (int,)
_SECONDS = (int, float, type(None))


def str_param(value: object, what: str) -> Any:
    """``value``, checked to be a ``str`` (raises ``TypeError`` naming ``what``)."""
    _need(value, _STR, what)
    return value


def client_param(client: object) -> Any:
    """A client id, checked to be an ``int`` (raises ``TypeError``)."""
    _need(client, _INT, "client")
    return client


def create_params(
    name: str,
    size: int,
    lifetime: Lifetime,
    ttl: float | None,
    mode: int,
    exist_ok: bool,
    backing: Backing,
) -> dict[str, Any]:
    """Raises ``TypeError`` for an argument of the wrong type."""
    _need(name, _STR, "name")
    _need(size, _INT, "size")
    _need(lifetime, _STR, "lifetime")
    _need(ttl, _SECONDS, "ttl")
    _need(mode, _INT, "mode")
    _need(exist_ok, (bool,), "exist_ok")
    _need(backing, _STR, "backing")
    return {
        "name": name,
        "size": size,
        "lifetime": lifetime,
        "ttl": ttl,
        "mode": mode,
        "exist_ok": exist_ok,
        "backing": backing,
    }


def open_params(name: str, access: Access, wait: float | None, fd: bool = True) -> dict[str, Any]:
    """Raises ``TypeError`` for an argument of the wrong type."""
    _need(name, _STR, "name")
    _need(access, _STR, "access")
    _need(wait, _SECONDS, "wait")
    return {"name": name, "access": access, "wait": wait, "fd": None if fd else False}
