"""Test helpers: a real daemon subprocess, and real client subprocesses.

Socket paths stay under 108 bytes by living in a short ``/tmp/sbt-*`` dir;
each daemon gets its own shm prefix so parallel daemons never meet.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import launcher
from .launcher import REPO as REPO  # re-exported: tests/stress and others use it
from .launcher import Daemon

#: shm prefix of every daemon this test process started (the leak check uses it)
PREFIXES: set[str] = set()
#: every test daemon's prefix starts so: entries of other test runs are not ours
TEST_PREFIX = "sbt"


class DaemonProc(Daemon):
    """The tests' daemon: world-connectable, logging at debug, its prefix known to
    the leak check (``conftest.no_leaks``)."""

    def __init__(self, config: dict[str, Any] | None = None, root: Path | None = None) -> None:
        super().__init__(
            {"socket_mode": 0o666, "log_level": "debug", **(config or {})}, root, tag=TEST_PREFIX
        )
        PREFIXES.add(self.prefix)


@contextlib.contextmanager
def running_daemon(config: dict[str, Any] | None = None) -> Iterator[DaemonProc]:
    with launcher.running_daemon(DaemonProc(config)) as d:
        yield d


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
