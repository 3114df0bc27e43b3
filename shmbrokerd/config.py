"""The daemon's configuration: a TOML file validated by pydantic.

Every key has a default, so an empty file (or none) is a working config;
``config/shmbrokerd.toml`` documents each one.  Paths left empty are derived
at start from who runs the daemon: ``/run/shmbroker/`` as root, else
``$XDG_RUNTIME_DIR/shmbroker/``.  An unknown key or a bad value is an error
naming the key and the file, at start and on reload alike.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["DEFAULT_CONFIG", "Config", "ConfigError", "default_runtime_dir", "load"]

DEFAULT_CONFIG = Path("/etc/shmbroker/shmbrokerd.toml")
GiB = 1 << 30

LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names key and file."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    socket: str = ""
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    socket_group: str | int = ""
    events: str = ""
    events_hwm: int = Field(default=1000, ge=1)
    state_dir: str = ""
    shm_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = "shmbroker."
    admin_group: str | int = ""
    max_segment_size: int = Field(default=4 * GiB, ge=1)
    max_segments: int = Field(default=100_000, ge=1)
    max_total_bytes: int = Field(default=0, ge=0)
    max_clients: int = Field(default=1024, ge=1)
    max_wait: float = Field(default=3600.0, ge=0, allow_inf_nan=False)
    reclaim_window: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    memfd_fdstore: bool = False
    log_level: LogLevel = "info"


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
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None
