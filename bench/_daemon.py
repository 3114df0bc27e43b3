"""A real ``shmbrokerd`` as a subprocess, in a private directory.

Its socket, state and config live in a fresh ``/tmp/sbb-*`` directory (short
enough for a socket path) and its shm objects under a prefix of its own, so
a bench never meets another daemon.  ``cleanup`` stops it and removes
everything it could have left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from . import REPO
from ._proc import stop, wait_connectable

__all__ = ["BrokerDaemon", "tree_env"]


def tree_env(tree: Path | None) -> dict[str, str] | None:
    """The environment that imports ``shmbrokerd`` and ``shmbroker`` from ``tree``."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'client'}"}


class BrokerDaemon:
    """``tree``: run the daemon of that source tree (``bench.ab``) instead of this one."""

    def __init__(self, tree: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sbb-", dir="/tmp"))
        self.socket = str(self.root / "s.sock")
        self.prefix = f"sbb{secrets.token_hex(4)}."
        self.log_path = self.root / "daemon.log"
        config = self.root / "shmbrokerd.toml"
        config.write_text(
            f'socket = "{self.socket}"\n'
            f'state_dir = "{self.root / "state"}"\n'
            f'shm_prefix = "{self.prefix}"\n'
            'log_level = "warning"\n'
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shmbrokerd", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tree or REPO,
                env=tree_env(tree),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.cleanup()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 15.0) -> None:
        wait_connectable(self.proc, self.socket, socket.SOCK_SEQPACKET, timeout, "daemon", self.log)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def objects(self) -> list[str]:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(self.prefix))

    def cleanup(self) -> list[str]:
        """Stop the daemon (SIGTERM, then SIGKILL); remove what it left; return that."""
        stop(self.proc)
        left = self.objects()
        for name in left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))
        shutil.rmtree(self.root, ignore_errors=True)
        return left
