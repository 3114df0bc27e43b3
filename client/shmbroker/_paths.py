"""Where the daemon's socket is, in the contract's order of precedence."""

from __future__ import annotations

import os

SYSTEM_SOCKET = "/run/shmbroker/shmbroker.sock"


def socket_path(explicit: str | os.PathLike[str] | None = None) -> str:
    """Explicit argument, ``$SHMBROKER_SOCKET``, the system socket if it exists,
    then ``$XDG_RUNTIME_DIR/shmbroker/shmbroker.sock``."""
    if explicit:
        return os.fspath(explicit)
    env = os.environ.get("SHMBROKER_SOCKET")
    if env:
        return env
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "shmbroker", "shmbroker.sock")
    return SYSTEM_SOCKET
