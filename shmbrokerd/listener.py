"""The request socket: bound here, or handed over by systemd's socket unit.

Strategy (as aiohttp's ``UnixSite``): one small class owns the socket
file, so the runner only starts and stops it.  Binding refuses a path the
kernel would cut (108 bytes with the NUL), a file that is not a socket,
and a socket another daemon still answers on; a socket nobody answers on
is a leftover of a crash and is replaced.  The file is made with mode
``0600`` (umask) and then given the configured group and mode, so it is
never open wider than the config says.  A socket from systemd is the
socket unit's: its file is left alone at stop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from .config import ConfigError

__all__ = ["BACKLOG", "UnixListener"]

#: ``listen`` backlog: connections the kernel queues before ``accept``
BACKLOG = 512


class UnixListener:
    """The ``SOCK_SEQPACKET`` socket clients connect to, at ``path``."""

    def __init__(self, path: str, mode: int, gid: int | None) -> None:
        self.path = path
        self.mode = mode
        self.gid = gid
        #: was the socket handed over by systemd (its file is not ours)?
        self.from_systemd = False

    def start(self, inherited: socket.socket | None) -> socket.socket:
        """The listening socket: ``inherited`` from systemd, else bound now.

        Raises ``ConfigError`` for a path that cannot be served, ``OSError``
        from the kernel.
        """
        self.from_systemd = inherited is not None
        return inherited if inherited is not None else self._bind()

    def stop(self) -> None:
        """Remove the socket file, if it is ours (the server closes the socket)."""
        if not self.from_systemd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _bind(self) -> socket.socket:
        path = self.path
        if len(path.encode()) >= 108:
            raise ConfigError(f"socket path is over 107 bytes: {path}")
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        os.chmod(path, self.mode)
        sock.listen(BACKLOG)
        return sock


def _clear_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover of a crash
    else:
        raise ConfigError(f"another daemon is serving {path}")
    finally:
        probe.close()
