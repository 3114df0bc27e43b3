"""The wire contract (``PROTOCOL.md``, version 1) as pydantic models.

This module is the one definition of the contract in code: the client builds
requests and reads replies with it, and the daemon imports it to validate
requests and shape replies.  Each op is declared once, as an ``OpSpec`` in
``OPS``; every per-op table derives from it.  Requests are strict (no
coercion, unknown keys refused) because every byte from a peer is hostile;
replies are read leniently (unknown keys ignored) so an older client can
talk to a newer daemon.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "FD_OPS",
    "MAX_CLIENT_NAME",
    "MAX_HOLDERS",
    "MAX_ID",
    "MAX_MESSAGE",
    "MAX_NAME",
    "MAX_TTL",
    "OPS",
    "OP_NAMES",
    "PROTOCOL_VERSION",
    "REQUESTS",
    "RESULTS",
    "ClientInfo",
    "ClientsResult",
    "DropResult",
    "Event",
    "HelloResult",
    "Holder",
    "LimitsInfo",
    "ListResult",
    "OpSpec",
    "ReloadResult",
    "Request",
    "SegmentInfo",
    "SegmentLeaseResult",
    "SegmentResult",
    "StatResult",
    "StatsResult",
    "check_name",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 65536
MAX_NAME = 255
MAX_ID = 2**63
#: Longest ttl or wait accepted, in seconds (about 68 years): keeps timers finite.
MAX_TTL = float(2**31)
#: characters of a ``hello`` client name the daemon keeps and reports
MAX_CLIENT_NAME = 64
#: holders a ``stat`` reply lists at most (so that it fits one datagram)
MAX_HOLDERS = 64

_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")
#: a whole valid name (ASCII, so its length is its size): the common case in one match
_VALID_NAME = re.compile(r"(?:(?!\.\.?/)[A-Za-z0-9._-]+/)*(?!\.\.?\Z)[A-Za-z0-9._-]+")

Lifetime = Literal["persistent", "owner", "refcount", "ttl"]
Backing = Literal["shm", "memfd"]
Access = Literal["ro", "rw"]


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid segment name.

    Raises a pydantic error of type ``name_too_long`` (the daemon answers
    ``ENAMETOOLONG``) or ``bad_name`` (``EINVAL``).
    """
    if len(name) <= MAX_NAME and _VALID_NAME.fullmatch(name):
        return name  # every request names one: the rules below, in one match
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise PydanticCustomError("name_too_long", "segment name is over 255 bytes")
    for part in name.split("/"):
        if part in ("", ".", "..") or not _COMPONENT.fullmatch(part):
            raise PydanticCustomError(
                "bad_name",
                "segment name must be [A-Za-z0-9._-] components joined by '/', "
                "without empty, '.' or '..' components",
            )
    return name


Name = Annotated[str, AfterValidator(check_name)]
Seconds = Annotated[float, Field(ge=0, le=MAX_TTL, allow_inf_nan=False)]
Token = Annotated[str, Field(min_length=1, max_length=256)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: int = Field(ge=0, lt=MAX_ID)


class Hello(_Request):
    op: Literal["hello"] = "hello"
    client: Annotated[str, Field(max_length=1024)] | None = None


class Create(_Request):
    op: Literal["create"] = "create"
    name: Name
    size: int = Field(gt=0, lt=2**63)
    lifetime: Lifetime = "refcount"
    ttl: Seconds | None = None
    exist_ok: bool = False
    mode: int = Field(default=0o600, ge=0, le=0o777)
    #: None: the daemon's default (``shm`` unless its operator chose ``memfd``)
    backing: Backing | None = None

    @model_validator(mode="after")
    def _ttl_with_ttl_lifetime(self) -> Create:
        if (self.lifetime == "ttl") != (self.ttl is not None):
            raise PydanticCustomError(
                "ttl_lifetime", "'ttl' is required with lifetime 'ttl' and refused otherwise"
            )
        return self


class Open(_Request):
    op: Literal["open"] = "open"
    name: Name
    access: Access = "ro"
    wait: Seconds | None = None
    fd: bool = True


class Release(_Request):
    op: Literal["release"] = "release"
    lease: Token


class Seal(_Request):
    op: Literal["seal"] = "seal"
    name: Name


class Delete(_Request):
    op: Literal["delete"] = "delete"
    name: Name


class Stat(_Request):
    op: Literal["stat"] = "stat"
    name: Name
    #: an addition (operators only): also list who holds it
    holders: bool = False


class List(_Request):
    op: Literal["list"] = "list"
    prefix: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    after: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    limit: int = Field(default=100, ge=1, le=100)


class Reclaim(_Request):
    op: Literal["reclaim"] = "reclaim"
    lease: Token


class Reload(_Request):
    op: Literal["reload"] = "reload"


class Clients(_Request):
    op: Literal["clients"] = "clients"
    after: int | None = Field(default=None, ge=0, lt=MAX_ID)
    limit: int = Field(default=100, ge=1, le=100)


class Stats(_Request):
    op: Literal["stats"] = "stats"


class Drop(_Request):
    """An addition to the contract (operators only): end a client's connection."""

    op: Literal["drop"] = "drop"
    client: int = Field(ge=0, lt=MAX_ID)


#: The requests as one type, for mypy and pydantic's discriminated union
#: (``shmbrokerd.codec``).  It must be spelled out to be a static type;
#: tests/unit/test_surface.py checks that it holds exactly the models of ``OPS``.
Request = (
    Hello
    | Create
    | Open
    | Release
    | Seal
    | Delete
    | Stat
    | List
    | Reclaim
    | Reload
    | Clients
    | Stats
    | Drop
)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SegmentInfo(_Reply):
    """A segment as the daemon describes it (the contract's Segment object)."""

    id: str
    name: str
    size: int
    lifetime: Lifetime
    ttl: float | None
    sealed: bool
    backing: Backing
    mode: int
    created: float
    owner_uid: int
    owner_gid: int
    leases: int


class LimitsInfo(_Reply):
    """The daemon's limits, as ``hello`` reports them (more keys may come: kept)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    max_message: int
    max_segment_size: int
    max_wait: float
    reclaim_window: float


class HelloResult(_Reply):
    server: str
    versions: list[int]
    features: list[str]
    limits: LimitsInfo
    events: str | None = None


class SegmentResult(_Reply):
    segment: SegmentInfo


class Holder(_Reply):
    """Leases of one client (or awaiting reclaim: ``client`` null) on a segment."""

    client: int | None
    pid: int | None
    uid: int
    name: str | None
    access: Access
    leases: int


class StatResult(SegmentResult):
    """``stat``; operators also get the holders (an addition to the contract)."""

    holders: list[Holder] | None = None
    #: holders not listed (the list stops at ``MAX_HOLDERS``)
    holders_more: int = 0


class ReloadResult(_Reply):
    """``reload``; ``restart`` names changed keys applied only at the next start."""

    restart: list[str] = []


class DropResult(_Reply):
    leases: int


class SegmentLeaseResult(_Reply):
    segment: SegmentInfo
    lease: str


class ListResult(_Reply):
    segments: list[SegmentInfo]
    next: str | None


class ClientInfo(_Reply):
    id: int
    pid: int
    uid: int
    gid: int
    leases: int
    connected: float
    #: what the client passed to ``hello`` (its first MAX_CLIENT_NAME characters)
    name: str | None = None


class ClientsResult(_Reply):
    clients: list[ClientInfo]
    next: int | None


class Empty(_Reply):
    pass


class StatsResult(_Reply):
    """Counters; more keys may come, so unknown ones are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    uptime: float
    segments: int
    bytes: int
    clients: int
    requests: dict[str, int]
    errors: dict[str, int]


class Event(_Reply):
    #: ``dropped`` (an addition): an operator dropped a client, name ""
    event: Literal["created", "opened", "released", "sealed", "deleted", "expired", "dropped"]
    name: str
    size: int
    uid: int | None
    pid: int | None
    ts: float


@dataclass(frozen=True)
class OpSpec:
    """One op of the contract: all that the code and the tests look up per op.

    Adding an op is adding one of these to ``OPS`` (docs/protocol.md, "Adding
    an op", lists the rest); the tables below and the daemon's dispatch
    derive from it, and tests/unit/test_surface.py fails until every part exists.
    """

    request: type[_Request]
    #: the model of its success result
    result: type[_Reply]
    #: the success reply carries one fd (``open``: unless its ``fd`` is false)
    fd: bool = False
    #: refused (``EACCES``) to a peer that is not an operator (``stats``: nor a monitor)
    operator: bool = False
    #: the config policy's operations that may refuse it (``shmbrokerd.policy.OPS``)
    policy: tuple[str, ...] = ()
    #: the ``Broker`` and ``AsyncBroker`` methods that send it; () means one named as the op
    methods: tuple[str, ...] = ()
    #: the name on the wire, taken from the request model's ``op``
    op: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", self.request.model_fields["op"].default)
        if not self.methods:
            object.__setattr__(self, "methods", (self.op,))


#: Every op, in the contract's order: the one declaration the tables derive from.
OPS: tuple[OpSpec, ...] = (
    OpSpec(Hello, HelloResult),
    OpSpec(Create, SegmentLeaseResult, fd=True, policy=("create",)),
    OpSpec(Open, SegmentLeaseResult, fd=True, policy=("open_ro", "open_rw")),
    OpSpec(Release, Empty),
    OpSpec(Seal, SegmentResult, policy=("seal",)),
    OpSpec(Delete, Empty, policy=("delete",)),
    OpSpec(Stat, StatResult, methods=("stat", "holders")),
    OpSpec(List, ListResult),
    OpSpec(Reclaim, SegmentLeaseResult),
    OpSpec(Reload, ReloadResult, operator=True),
    OpSpec(Clients, ClientsResult, operator=True),
    OpSpec(Stats, StatsResult, operator=True),
    OpSpec(Drop, DropResult, operator=True),
)
#: op names, in order
OP_NAMES: tuple[str, ...] = tuple(spec.op for spec in OPS)
#: op name -> request model; the daemon dispatches on this table.
REQUESTS: dict[str, type[_Request]] = {spec.op: spec.request for spec in OPS}
#: op name -> model of its success result.
RESULTS: dict[str, type[_Reply]] = {spec.op: spec.result for spec in OPS}
#: Ops whose success reply carries exactly one fd (``open`` only when ``fd`` is true).
FD_OPS = frozenset(spec.op for spec in OPS if spec.fd)


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a model (what the daemon puts on the wire)."""
    return model.model_dump(mode="json")
