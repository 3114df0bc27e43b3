"""The repeat open next to the Arrow Plasma store's get+release, in one run.

A repeat open is an ``open`` of a segment the client already maps: the
client library asks with ``fd: false``, checks that the reply's segment
``id`` is the one it maps, and reuses its mapping, so it costs no new fd and
no new mapping, only the lease's round trips (``open``, then ``release``
when the Segment closes).  The peer is the Plasma store of Apache Arrow
(C++), ``pyarrow==11.0.0``, the last release that ships it: ``get_buffers``
of an object the client has already mapped (one request and its reply), and
the buffer's release when Python drops it (a one-way message).

Plasma lives in a venv of its own, ``bench/.venv-plasma`` (it needs
``numpy<2``), made on first use with ``/usr/bin/python3 -m venv`` and
``pip install pyarrow==11.0.0 'numpy<2'``.  If that cannot be done the
figure is skipped with the reason in the table.

Three client processes, in interleaved rounds (``python -m bench.plasma
--worker KIND WARMUP ARGS...``, the protocol of ``bench/_worker.py``):

- ``plasma-get SOCK`` (Plasma's venv): connect, put one 4 KiB object, then
  ``client.get_buffers([id])`` per iteration, released as the list is dropped;
- ``lib-reopen SOCK NAME``: ``Broker.open(NAME)`` once and kept, then
  ``with broker.open(NAME): pass`` per iteration (checked once: same fd, no
  fd added to the process);
- ``lib-reopen-pipe SOCK NAME``: the same with
  ``Broker(pipeline_release=True)``: the release is a one-way message, as
  Plasma's is;
- ``raw-reopen SOCK NAME``: the minimal client, one full open kept mapped,
  then per iteration ``open`` with ``fd: false`` (no fd may come, the
  segment ``id`` must match) and ``release``;
- and, in the same rounds, figure 1's floor (``bench/_worker.py``
  ``raw-open`` against ``bench/floor.py``): two round trips with a server
  that does nothing, and a mapping; what the transport alone costs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.launcher import stop, wait_connectable

from . import REPO
from ._env import Env, interleaved_latency, log
from ._stats import Row, latency_rows
from ._worker import SEGMENT_SIZE, Worker, _make_op, serve, start_all

__all__ = ["VENV", "run"]

VENV = REPO / "bench" / ".venv-plasma"
SYSTEM_PYTHON = "/usr/bin/python3"
REQUIREMENTS = ("pyarrow==11.0.0", "numpy<2")
STORE_BYTES = 100_000_000
PEER = "Arrow Plasma get+release"

Op = Callable[[], None]


# -- the bench's side ---------------------------------------------------------


def _tail(text: str, lines: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _pyarrow_dir(python: Path) -> Path | None:
    try:
        r = subprocess.run(
            [str(python), "-c", "import os, pyarrow; print(os.path.dirname(pyarrow.__file__))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError:
        return None
    return Path(r.stdout.strip()) if r.returncode == 0 else None


def ensure_venv() -> tuple[Path, Path] | str:
    """Plasma's venv python and ``plasma-store-server``, or why they cannot be had."""
    python = VENV / "bin" / "python"
    site = _pyarrow_dir(python) if python.exists() else None
    if site is None:
        log(f"plasma: creating {VENV} with {' '.join(REQUIREMENTS)}")
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        steps = {
            f"{SYSTEM_PYTHON} -m venv {VENV}": [SYSTEM_PYTHON, "-m", "venv", str(VENV)],
            f"pip install {' '.join(REQUIREMENTS)}": [*pip, *REQUIREMENTS],
        }
        for what, cmd in steps.items():
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{what}: {exc}"
            if r.returncode:
                return f"{what} failed: {_tail(r.stderr or r.stdout)}"
        site = _pyarrow_dir(python)
        if site is None:
            return "pyarrow installed but not importable"
    binary = site / "plasma-store-server"
    if not binary.exists():
        return f"no plasma-store-server in {site}"
    return python, binary


class PlasmaStore:
    """``plasma-store-server`` as a subprocess, on a socket in a private directory."""

    def __init__(self, binary: Path, directory: Path) -> None:
        self.path = str(directory / "plasma.sock")
        self.log_path = directory / "plasma.log"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(binary), "-m", str(STORE_BYTES), "-s", self.path],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 15.0) -> None:
        wait_connectable(
            self.proc,
            self.path,
            socket.SOCK_STREAM,
            timeout,
            "plasma store",
            lambda: self.log_path.read_text(errors="replace"),
        )

    def stop(self) -> None:
        stop(self.proc)


class VenvWorker(Worker):
    """A ``--worker`` process of this module, under a given interpreter."""

    def __init__(self, python: str, kind: str, *args: str, warmup: int) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [python, "-m", "bench.plasma", "--worker", kind, str(warmup), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )


def run(env: Env) -> list[Row]:
    found = ensure_venv()
    if isinstance(found, str):
        log(f"plasma: skipped: {found}")
        return [Row(f"plasma: skipped ({found})", None, None, "us")]
    python, binary = found
    name = env.open_segment()
    sock = env.daemon.socket
    directory = Path(tempfile.mkdtemp(prefix="sbp-", dir="/tmp"))
    store: PlasmaStore | None = None
    try:
        store = PlasmaStore(binary, directory)
        log(f"plasma store pid {store.proc.pid}")
        warmup = env.settings.warmup
        workers: dict[str, Worker] = {
            "plasma": VenvWorker(str(python), "plasma-get", store.path, warmup=warmup),
            "lib": VenvWorker(sys.executable, "lib-reopen", sock, name, warmup=warmup),
            "lib-pipe": VenvWorker(sys.executable, "lib-reopen-pipe", sock, name, warmup=warmup),
            "raw": VenvWorker(sys.executable, "raw-reopen", sock, name, warmup=warmup),
            # figure 1's floor: what the transport costs for two round trips
            "floor": env.worker("raw-open", env.floor.path, name),
        }
        env.workers.extend(w for w in workers.values() if w not in env.workers)
        start_all(list(workers.values()))
        try:
            cpu = (_cpu_seconds(env.daemon.pid), _cpu_seconds(store.proc.pid))
            s = interleaved_latency(workers, env.settings)
            cpu = (_cpu_seconds(env.daemon.pid) - cpu[0], _cpu_seconds(store.proc.pid) - cpu[1])
        finally:
            env.stop_workers(workers)
    finally:
        if store is not None:
            store.stop()
        shutil.rmtree(directory, ignore_errors=True)
    cycles = len(s["lib"]) + len(s["lib-pipe"]) + len(s["raw"])
    return [
        *latency_rows(
            "repeat open (fd: false) + release, client library", s["lib"], s["plasma"], PEER
        ),
        *latency_rows(
            "repeat open (fd: false) + release pipelined, client library",
            s["lib-pipe"],
            s["plasma"],
            PEER,
        ),
        *latency_rows(
            "repeat open (fd: false) + release, minimal client", s["raw"], s["plasma"], PEER
        ),
        *latency_rows(
            "floor server: open + fd + mmap + munmap + release, minimal client",
            s["floor"],
            s["plasma"],
            PEER,
        ),
        # Where the time goes: each server's own CPU time per cycle (the daemon's
        # over both broker clients' cycles; clock ticks of 10 ms: coarse with --quick).
        Row(
            "server CPU per repeat open + release, daemon",
            cpu[0] * 1e6 / cycles,
            cpu[1] * 1e6 / len(s["plasma"]),
            "us",
            "Plasma store CPU per get+release",
        ),
    ]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the worker processes -------------------------------------------------------


def _plasma_get(path: str) -> tuple[Op, Op]:
    # pyarrow.plasma warns, on import and on connect, that it is deprecated since Arrow 10
    warnings.simplefilter("ignore", DeprecationWarning)
    plasma: Any = importlib.import_module("pyarrow.plasma")
    client = plasma.connect(path)
    oid = plasma.ObjectID(os.urandom(20))
    client.put_raw_buffer(b"\x01" * SEGMENT_SIZE, object_id=oid)
    ids = [oid]
    if len(client.get_buffers(ids)[0]) != SEGMENT_SIZE:
        raise RuntimeError("plasma returned a buffer of another size")

    def get_release() -> None:
        client.get_buffers(ids)  # the buffers, dropped here, are released

    return get_release, client.disconnect


def _serve(kind: str, warmup: int, args: list[str]) -> None:
    if kind == "plasma-get":
        serve(*_plasma_get(*args), warmup)
    else:  # the broker's kinds, run under this interpreter
        op, close, set_idle = _make_op(kind, args)
        serve(op, close, warmup, set_idle)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--worker":
        sys.exit("usage: python -m bench --only plasma (this module's own entry is --worker)")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench ends its workers itself
    kind, warmup, args = argv[1], int(argv[2]), argv[3:]
    try:
        _serve(kind, warmup, args)
    except Exception as exc:  # one line, not a traceback
        sys.exit(f"bench worker {kind}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
