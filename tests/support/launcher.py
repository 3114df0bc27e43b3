"""The one way to run a real ``shmbrokerd``, for the tests and for ``bench/``.

A :class:`Daemon` lives in a fresh ``/tmp/<tag>-*`` directory (short enough
for a socket path) holding its config, socket, state and log, and names its
shm objects under a prefix of its own, so that daemons of parallel runs
never meet.  :meth:`Daemon.cleanup` stops it and removes all it could have
left.

Here rather than under ``bench/`` because the tests are its main user and
``tests/support/`` is where they keep what is not a test; ``bench`` runs as
``python -m bench...`` from the repository root, where ``tests`` is a package
it imports like any other.  Standard library only, no pytest.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

__all__ = ["REPO", "Daemon", "running_daemon", "stop", "toml_value", "wait_connectable"]

REPO = Path(__file__).resolve().parents[2]

#: how the daemon is run, before ``--config PATH``
COMMAND = (sys.executable, "-m", "shmbrokerd")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s: a process we started, by its handle.
    Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_connectable(
    proc: subprocess.Popen[str] | subprocess.Popen[bytes],
    path: str,
    kind: int,
    timeout: float,
    what: str,
    log: Callable[[], str],
) -> None:
    """Poll until ``path`` accepts a connection of ``kind``; fail if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log()}")
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {timeout} s:\n{log()}")


class Daemon:
    """``shmbrokerd`` as a subprocess with its own directory, socket, state and prefix.

    ``config`` adds to (or overrides) the keys that place it: ``socket``,
    ``state_dir``, ``shm_prefix``.  ``tag`` starts the directory's and the
    prefix's names (tests ``sbt``, benchmarks ``sbb``...), so that a leak
    says whose it is.  ``root``: use that directory instead of a fresh one.
    """

    def __init__(
        self, config: dict[str, Any] | None = None, root: Path | None = None, *, tag: str
    ) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp"))
        os.chmod(self.root, 0o755)  # clients of other uids reach the socket
        self.socket = str(self.root / "s.sock")
        self.state_dir = self.root / "state"
        self.prefix = f"{tag}{secrets.token_hex(4)}."
        self.config_path = self.root / "shmbrokerd.toml"
        self.log_path = self.root / "daemon.log"
        self.config: dict[str, Any] = {
            "socket": self.socket,
            "state_dir": str(self.state_dir),
            "shm_prefix": self.prefix,
        }
        self.config.update(config or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        text = "".join(f"{k} = {toml_value(v)}\n" for k, v in self.config.items())
        self.config_path.write_text(text)

    def start(
        self,
        *extra: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        command: Sequence[str] = COMMAND,
    ) -> Self:
        """Write the config and run ``command --config PATH *extra`` (again, after a
        stop: same directory, same state); with ``wait``, until the socket accepts."""
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "--config", str(self.config_path), *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        wait_connectable(self.proc, self.socket, socket.SOCK_SEQPACKET, timeout, "daemon", self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not go.  Its exit status (0 if never started)."""
        return 0 if self.proc is None else stop(self.proc, timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def objects(self) -> list[str]:
        """The segments' objects in /dev/shm (not the prefix lock)."""
        return sorted(n for n in self.entries() if n != self.lock_name)

    @property
    def lock_name(self) -> str:
        return self.prefix + "lock"

    def entries(self) -> list[str]:
        """Everything in /dev/shm under its prefix."""
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(self.prefix))

    def cleanup(self) -> list[str]:
        """Stop it; remove what it left in /dev/shm (returned) and its directory."""
        self.stop()
        left = self.entries()
        for name in left:  # what a killed daemon left behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))
        shutil.rmtree(self.root, ignore_errors=True)
        return left


D = TypeVar("D", bound=Daemon)


@contextlib.contextmanager
def running_daemon(daemon: D) -> Iterator[D]:
    """``daemon`` started (and ready), cleaned up on the way out whatever happens."""
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()
