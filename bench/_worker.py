"""The client process every figure is measured from, and its handle.

A worker is a separate Python process (``python -m bench._worker KIND
WARMUP ARGS...``).  It connects, runs WARMUP iterations of its operation,
prints ``READY``, then obeys one command per stdin line:

- ``lat N``: time N iterations one by one with ``perf_counter_ns``; print
  the N durations (ns) on one line, space separated;
- ``ops START END``: sleep until ``perf_counter_ns() >= START`` (the clock
  is ``CLOCK_MONOTONIC``, shared by all processes), run iterations back to
  back until END, print how many it started;
- ``idle MODE [SETTLE]``: from now on wait for replies with that client
  idle strategy (``block``, ``spin``, ``adaptive`` or microseconds;
  ``shmbroker._idle``), then run SETTLE (default 50) untimed iterations;
- ``quit`` (or end of input): clean up and exit.

After the durations of ``lat`` it prints the process's CPU time (ns) over
those N iterations on a line of its own.  A KIND may end in ``@MODE``: the
idle strategy to start with (without it, the client library's default for
``lib-*`` kinds and a plain blocking ``recvmsg`` for ``raw-*``).

It ignores SIGINT: the bench ends it, so a Ctrl-C cannot leave half a run.

Kinds (one iteration each):

- ``lib-open SOCK NAME``: ``with Broker.open(NAME): pass`` (request, fd,
  mmap, munmap, release) through the client library;
- ``raw-open SOCK NAME``: the same round trips with a minimal client (JSON
  request, ``recvmsg``, ``json.loads``, mmap of the size in the reply,
  munmap, release); against the floor server this is the floor;
- ``lib-open-pipe SOCK NAME``, ``raw-open-pipe SOCK NAME``: the same, but the
  release is sent without waiting for its reply (``Broker(...,
  pipeline_release=True)``; the minimal client reads the reply with the
  next one);
- ``lib-create SOCK NAME``: ``with Broker.create(NAME, 4096): pass``
  (``refcount``, so the release deletes it);
- ``raw-create SOCK NAME``: the same with the minimal client, mapped
  read-write;
- ``lib-reopen SOCK NAME``, ``lib-reopen-pipe``: a repeat open, ``with
  Broker.open(NAME): pass`` while the broker keeps NAME open (``fd: false``,
  the mapping reused: checked once), with the release waited for or
  pipelined;
- ``raw-reopen SOCK NAME``: the same with the minimal client (``open`` with
  ``fd: false``, ``release``);
- ``raw-ping SOCK``: one round trip with nothing in it (a ``release`` of an
  unknown lease; the floor server answers it ``ok``);
- ``smm-create``: ``SharedMemoryManager().SharedMemory(4096)``, close, unlink;
- ``mmap PATH``: ``os.open`` + mmap + munmap + close of an existing file.
"""

from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import REPO

__all__ = ["Worker"]

Op = Callable[[], None]
SetIdle = Callable[[str], None]
_RECV = 65537
_ANC = socket.CMSG_SPACE(4 * 4)
SEGMENT_SIZE = 4096
#: iterations run (untimed) after an ``idle`` command
SETTLE = 50


class RawClient:
    """The least client that speaks the wire contract correctly enough to measure."""

    def __init__(self, path: str, pipeline: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.recvmsg: Callable[[int, int], tuple[bytes, list[tuple[int, int, bytes]], int, Any]]
        self.recvmsg = self.sock.recvmsg
        self.next_id = 1
        self.pipeline = pipeline  # send releases without waiting for the reply
        self.unread = 0  # replies of pipelined releases, read before the next one

    def send(self, body: dict[str, Any]) -> None:
        body["id"] = self.next_id
        self.next_id += 1
        self.sock.send(json.dumps(body, separators=(",", ":")).encode())

    def call(self, body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        self.send(body)
        for _ in range(self.unread):  # answers come in order: skip the releases'
            self.recvmsg(_RECV, _ANC)
        self.unread = 0
        data, anc, _flags, _addr = self.recvmsg(_RECV, _ANC)
        fds = array.array("i")
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        reply = json.loads(data)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"request {body} failed: {reply}")
        return reply, (fds[0] if fds else None)

    def grant_cycle(self, request: dict[str, Any], prot: int) -> None:
        """Ask for a grant, map and unmap its fd, release its lease."""
        reply, fd = self.call(dict(request))
        if fd is None:
            raise RuntimeError(f"no fd with {reply}")
        try:
            m = mmap.mmap(fd, reply["segment"]["size"], flags=mmap.MAP_SHARED, prot=prot)
            m.close()
        finally:
            os.close(fd)
        if self.pipeline:
            self.send({"op": "release", "lease": reply["lease"]})
            self.unread += 1
        else:
            self.call({"op": "release", "lease": reply["lease"]})

    def set_idle(self, mode: str) -> None:
        """Wait for replies as the client library does with ``idle=mode``."""
        from shmbroker import _idle

        strategy = _idle.Idle(idle_arg(mode))
        sock = self.sock

        def recvmsg(size: int, anc: int) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
            return _idle.recvmsg(sock, strategy, size, anc)

        self.recvmsg = recvmsg

    def close(self) -> None:
        self.sock.close()


def idle_arg(mode: str) -> Any:
    """``Broker(idle=...)`` from a command word: a name, or microseconds."""
    try:
        return float(mode)
    except ValueError:
        return mode


def _no_idle(mode: str) -> None:
    raise ValueError("this kind has no client to set an idle strategy on")


def _lib_idle(broker: Any) -> SetIdle:
    def set_idle(mode: str) -> None:
        from shmbroker import _idle

        broker._idle = _idle.Idle(idle_arg(mode))

    return set_idle


def _make_op(kind: str, args: list[str]) -> tuple[Op, Op, SetIdle]:
    """The operation of one iteration, what to do at exit, how to set the idle strategy."""
    if kind in ("raw-open", "raw-create", "raw-open-pipe"):
        raw = RawClient(args[0], pipeline=kind == "raw-open-pipe")
        if kind != "raw-create":
            req: dict[str, Any] = {"op": "open", "name": args[1], "access": "ro"}
            prot = mmap.PROT_READ
        else:
            req = {"op": "create", "name": args[1], "size": SEGMENT_SIZE}
            prot = mmap.PROT_READ | mmap.PROT_WRITE
        return (lambda: raw.grant_cycle(req, prot)), raw.close, raw.set_idle
    if kind == "raw-ping":
        raw = RawClient(args[0])
        ping = {"op": "release", "lease": "bench-ping"}
        return (lambda: raw.call(dict(ping)) and None), raw.close, raw.set_idle
    if kind == "raw-reopen":
        return _raw_reopen(args[0], args[1])
    if kind in ("lib-reopen", "lib-reopen-pipe"):
        return _lib_reopen(args[0], args[1], pipeline=kind == "lib-reopen-pipe")
    if kind in ("lib-open", "lib-create", "lib-open-pipe"):
        from shmbroker import Broker

        broker = Broker(args[0], pipeline_release=kind == "lib-open-pipe")
        name = args[1]
        if kind != "lib-create":

            def lib_open() -> None:
                with broker.open(name):
                    pass

            return lib_open, broker.close, _lib_idle(broker)

        def lib_create() -> None:
            with broker.create(name, SEGMENT_SIZE):
                pass

        return lib_create, broker.close, _lib_idle(broker)
    if kind == "smm-create":
        from multiprocessing.managers import SharedMemoryManager

        smm = SharedMemoryManager()
        smm.start()

        def smm_create() -> None:
            sm = smm.SharedMemory(SEGMENT_SIZE)
            sm.close()
            sm.unlink()

        return smm_create, smm.shutdown, _no_idle
    if kind == "mmap":
        path = args[0]
        size = os.stat(path).st_size

        def raw_mmap() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                m.close()
            finally:
                os.close(fd)

        return raw_mmap, lambda: None, _no_idle
    raise SystemExit(f"unknown worker kind {kind!r}")


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _lib_reopen(path: str, name: str, pipeline: bool = False) -> tuple[Op, Op, SetIdle]:
    from shmbroker import Broker

    broker = Broker(path, pipeline_release=pipeline)
    held = broker.open(name)
    before = _fd_count()
    with broker.open(name) as again:
        if again.fd != held.fd or _fd_count() != before:
            raise RuntimeError("the repeat open did not reuse the mapping")

    def reopen() -> None:
        with broker.open(name):
            pass

    def close() -> None:
        held.close()
        broker.close()

    return reopen, close, _lib_idle(broker)


def _raw_reopen(path: str, name: str) -> tuple[Op, Op, SetIdle]:
    raw = RawClient(path)
    first, fd = raw.call({"op": "open", "name": name, "access": "ro"})
    if fd is None:
        raise RuntimeError("no fd with the first open")
    seg = first["segment"]
    mapping = mmap.mmap(fd, seg["size"], flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)

    def reopen() -> None:
        reply, extra = raw.call({"op": "open", "name": name, "access": "ro", "fd": False})
        if extra is not None:
            os.close(extra)
            raise RuntimeError("an fd came with fd: false")
        if reply["segment"]["id"] != seg["id"]:
            raise RuntimeError("the name now means another segment")
        raw.call({"op": "release", "lease": reply["lease"]})

    def close() -> None:
        raw.call({"op": "release", "lease": first["lease"]})
        mapping.close()
        os.close(fd)
        raw.close()

    return reopen, close, raw.set_idle


def _latency(op: Op, n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        op()
        out[i] = clock() - t0
    return out


def _ops(op: Op, start: int, end: int) -> int:
    clock = time.perf_counter_ns
    wait = start - clock()
    if wait > 0:
        time.sleep(wait / 1e9)
    count = 0
    while clock() < end:
        op()
        count += 1
    return count


def main(argv: list[str]) -> None:
    # A Ctrl-C reaches the whole process group; the bench ends its workers
    # itself (``quit`` or end of input), so that it can do it in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kind, warmup, args = argv[0], int(argv[1]), argv[2:]
    try:
        _serve(kind, warmup, args)
    except Exception as exc:  # one line, not 64 tracebacks, when the daemon goes away
        sys.exit(f"bench worker {kind}: {type(exc).__name__}: {exc}")


def _serve(kind: str, warmup: int, args: list[str]) -> None:
    kind, _, mode = kind.partition("@")
    op, close, set_idle = _make_op(kind, args)
    if mode:
        set_idle(mode)
    serve(op, close, warmup, set_idle)


def serve(op: Op, close: Op, warmup: int, set_idle: SetIdle = _no_idle) -> None:
    """Warm up, say READY, obey ``lat``/``ops``/``idle``/``quit``; ``close`` at the end."""
    try:
        for _ in range(warmup):
            op()
        print("READY", flush=True)
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "lat":
                cpu = time.process_time_ns()
                durations = _latency(op, int(rest[0]))
                cpu = time.process_time_ns() - cpu
                print(" ".join(map(str, durations)), flush=True)
                print(cpu, flush=True)
            elif cmd == "idle":
                set_idle(rest[0])
                for _ in range(int(rest[1]) if len(rest) > 1 else SETTLE):
                    op()  # let an adaptive budget settle
            elif cmd == "ops":
                print(_ops(op, int(rest[0]), int(rest[1])), flush=True)
            elif cmd == "quit":
                break
            else:
                raise ValueError(f"unknown command {line!r}")
    finally:
        close()


class Worker:
    """The bench's handle on one worker process."""

    def __init__(
        self, kind: str, *args: str, warmup: int, env: dict[str, str] | None = None
    ) -> None:
        self.kind = kind
        self.last_cpu = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._worker", kind, str(warmup), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )

    def wait_ready(self) -> None:
        line = self._line()
        if line != "READY":
            raise RuntimeError(f"worker {self.kind} did not start (said {line!r})")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"worker {self.kind} exited ({code})")
        return line.strip()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def latency(self, n: int) -> list[int]:
        """N durations (ns); ``last_cpu`` is then the worker's CPU time over them (ns)."""
        self.send(f"lat {n}")
        out = [int(x) for x in self._line().split()]
        self.last_cpu = int(self._line())
        return out

    def set_idle(self, mode: str, settle: int = SETTLE) -> None:
        """Switch its client to idle strategy ``mode``, then run ``settle`` cycles
        (no reply: the commands after it wait for it)."""
        self.send(f"idle {mode} {settle}")

    def ops_result(self) -> int:
        return int(self._line())

    def stop(self, timeout: float = 15.0) -> None:
        """Ask it to quit (closing stdin), wait, and kill it if it does not go."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.send("quit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                with contextlib.suppress(BrokenPipeError):
                    f.close()


def start_all(workers: list[Worker]) -> list[Worker]:
    """Wait until every worker is ready (they warm up in parallel); stop all on failure."""
    try:
        for w in workers:
            w.wait_ready()
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


if __name__ == "__main__":
    main(sys.argv[1:])
