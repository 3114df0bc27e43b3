"""The daemon's configuration: a TOML file validated by pydantic.

Every key has a default, so an empty file (or none) is a working config;
``config/shmbrokerd.toml`` documents each one.  Paths left empty are derived
at start from who runs the daemon: ``/run/shmbroker/`` as root, else
``$XDG_RUNTIME_DIR/shmbroker/``.  An unknown key or a bad value is an error
naming the key and the file, at start and on reload alike.
"""

from __future__ import annotations

import grp
import os
import pwd
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .policy import OPS, Op, Policy, Quota, Rule

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "ConfigError",
    "build_policy",
    "default_runtime_dir",
    "load",
    "restart_needed",
]

DEFAULT_CONFIG = Path("/etc/shmbroker/shmbrokerd.toml")
GiB = 1 << 30

LogLevel = Literal["debug", "info", "warning", "error"]
Backing = Literal["shm", "memfd"]
Principal = str | int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PolicyRule(_Strict):
    """``[[policy]]``: for these names and peers, only these operations."""

    names: list[str] = Field(min_length=1)
    users: list[Principal] = []
    groups: list[Principal] = []
    allow: list[Op] = []


class QuotaRule(_Strict):
    """``[[quota]]``: per-uid ceiling for these peers (0: none)."""

    users: list[Principal] = []
    groups: list[Principal] = []
    bytes: int = Field(default=0, ge=0)
    segments: int = Field(default=0, ge=0)


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names key and file."""


class Config(_Strict):
    socket: str = ""
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    socket_group: str | int = ""
    events: str = ""
    events_hwm: int = Field(default=1000, ge=1)
    state_dir: str = ""
    state_compact_after: int = Field(default=200_000, ge=1, le=100_000_000)
    shm_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = "shmbroker."
    admin_group: str | int = ""
    monitor_group: str | int = ""
    max_segment_size: int = Field(default=4 * GiB, ge=1)
    max_segments: int = Field(default=100_000, ge=1)
    max_total_bytes: int = Field(default=0, ge=0)
    max_clients: int = Field(default=1024, ge=1)
    max_clients_per_uid: int = Field(default=256, ge=1)
    max_waiting_opens: int = Field(default=64, ge=0)
    max_queued_replies: int = Field(default=256, ge=1)
    max_wait: float = Field(default=3600.0, ge=0, allow_inf_nan=False)
    reclaim_window: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    memfd_fdstore: bool = False
    default_backing: Backing = "shm"
    policy: list[PolicyRule] = []
    default_allow: list[Op] = list(OPS)
    quota: list[QuotaRule] = []
    default_quota_bytes: int = Field(default=0, ge=0)
    default_quota_segments: int = Field(default=0, ge=0)
    log_level: LogLevel = "info"


def restart_needed(keys: list[str]) -> str:
    """What a reload says of changed keys it cannot apply (daemon log and ctl)."""
    verb = "takes" if len(keys) == 1 else "take"
    return f"{', '.join(keys)} {verb} effect only on restart; the rest is applied"


def default_runtime_dir() -> Path:
    """``/run/shmbroker`` as root, else ``$XDG_RUNTIME_DIR/shmbroker``."""
    if os.geteuid() == 0:
        return Path("/run/shmbroker")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise ConfigError(
            "XDG_RUNTIME_DIR is not set: give --socket and --state-dir, or run as root"
        )
    return Path(xdg) / "shmbroker"


def _describe(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: key '{key}': {err['msg']}")
    return "\n".join(lines)


def load(path: Path | None, overrides: dict[str, object] | None = None) -> Config:
    """Read and validate ``path`` (None: built-in defaults), then apply overrides."""
    data: dict[str, object] = {}
    where = str(path) if path else "(defaults)"
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None
    build_policy(cfg, where)  # names of users and groups must resolve now
    return cfg


def _ids(items: list[Principal], key: str, where: str, *, group: bool) -> frozenset[int]:
    out = set()
    for item in items:
        if isinstance(item, int):
            out.add(item)
            continue
        try:
            out.add(grp.getgrnam(item).gr_gid if group else pwd.getpwnam(item).pw_uid)
        except KeyError:
            kind = "group" if group else "user"
            raise ConfigError(f"{where}: key '{key}': no such {kind} {item!r}") from None
    return frozenset(out)


def build_policy(cfg: Config, where: str = "(config)") -> Policy:
    """Resolve the config's rules and quotas (names to ids) into a :class:`Policy`."""
    rules = tuple(
        Rule(
            tuple(r.names),
            _ids(r.users, f"policy.{i}.users", where, group=False),
            _ids(r.groups, f"policy.{i}.groups", where, group=True),
            frozenset(r.allow),
        )
        for i, r in enumerate(cfg.policy)
    )
    quotas = tuple(
        Quota(
            _ids(q.users, f"quota.{i}.users", where, group=False),
            _ids(q.groups, f"quota.{i}.groups", where, group=True),
            q.bytes,
            q.segments,
        )
        for i, q in enumerate(cfg.quota)
    )
    default = Quota(frozenset(), frozenset(), cfg.default_quota_bytes, cfg.default_quota_segments)
    return Policy(rules, frozenset(cfg.default_allow), quotas, default)
