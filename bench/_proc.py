"""Starting and stopping the bench's own server processes, in one place."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable

__all__ = ["stop", "wait_connectable"]


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: the process we started, by its handle."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
