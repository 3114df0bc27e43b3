"""Test helpers: a real daemon subprocess, and real client subprocesses.

Socket paths stay under 108 bytes by living in a short ``/tmp/sbt-*`` dir;
each daemon gets its own shm prefix so parallel daemons never meet.
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
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: shm prefix of every daemon this test process started (the leak check uses it)
PREFIXES: set[str] = set()
#: every test daemon's prefix starts so: entries of other test runs are not ours
TEST_PREFIX = "sbt"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


class DaemonProc:
    """``shmbrokerd`` started as a subprocess with its own socket, state and prefix."""

    def __init__(self, config: dict[str, Any] | None = None, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.socket = str(self.root / "s.sock")
        self.state_dir = self.root / "state"
        self.prefix = f"{TEST_PREFIX}{secrets.token_hex(4)}."
        PREFIXES.add(self.prefix)
        self.config_path = self.root / "shmbrokerd.toml"
        self.log_path = self.root / "daemon.log"
        self.config: dict[str, Any] = {
            "socket": self.socket,
            "state_dir": str(self.state_dir),
            "shm_prefix": self.prefix,
            "socket_mode": 0o666,
            "log_level": "debug",
        }
        self.config.update(config or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        text = "".join(f"{k} = {toml_value(v)}\n" for k, v in self.config.items())
        self.config_path.write_text(text)

    def start(
        self, *extra: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> DaemonProc:
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shmbrokerd", "--config", str(self.config_path), *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    s.connect(self.socket)
                    return
                finally:
                    s.close()
            time.sleep(0.02)
        raise TimeoutError(f"daemon not ready:\n{self.log()}")

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
        """SIGTERM and wait; SIGKILL if it does not go."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

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
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(self.prefix))

    def cleanup(self) -> None:
        self.stop()
        for name in self.entries():  # what a killed daemon left behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_daemon(config: dict[str, Any] | None = None) -> Iterator[DaemonProc]:
    d = DaemonProc(config)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def _client_argv(
    code: str, socket_path: str, uid: int | None, gid: int | None, groups: tuple[int, ...]
) -> list[str]:
    """A Python command line running ``code`` with ``SOCK`` and the client imported.

    With ``uid``, the process starts as root, imports, then drops to
    ``uid``/``gid``/``groups`` for good before the code runs: the daemon reads
    the peer's identity at connect, so it sees exactly that user (and this
    works even when the interpreter lives where that user cannot exec it).
    """
    prelude = "import os, sys, json, time\nfrom shmbroker import *\nSOCK = sys.argv[1]\n"
    if uid is not None:
        g = uid if gid is None else gid
        prelude += f"os.setgroups({list(groups)!r})\nos.setgid({g})\nos.setuid({uid})\n"
    return [sys.executable, "-u", "-c", prelude + textwrap.dedent(code), socket_path]


def run_client(
    code: str,
    socket_path: str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    groups: tuple[int, ...] = (),
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate Python process (optionally as another uid).

    The code sees ``SOCK`` (the socket path) and the client library imported.
    """
    proc = subprocess.run(
        _client_argv(code, socket_path, uid, gid, groups),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_client(
    code: str,
    socket_path: str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    groups: tuple[int, ...] = (),
    **kw: Any,
) -> subprocess.Popen[str]:
    """Start a client process and leave it running (it prints READY when set)."""
    return subprocess.Popen(
        _client_argv(code, socket_path, uid, gid, groups),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        **kw,
    )


def wait_line(proc: subprocess.Popen[str], want: str = "READY", timeout: float = 15) -> str:
    """Read stdout lines until one starts with ``want``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"client exited before {want!r}: {err}")
        if line.startswith(want):
            return line.strip()
    raise TimeoutError(want)


def eventually(pred: Any, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``pred`` until true; fail with its last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition never held (last value {value!r})")
        time.sleep(interval)


def fd_is_open(fd: int) -> bool:
    """Is ``fd`` open in this process?"""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
