"""The client process every figure is measured from, and its handle.

A worker is a separate Python process (``python -m bench._worker KIND
WARMUP ARGS...``).  It connects, runs WARMUP iterations of its operation,
prints ``READY``, then obeys one command per stdin line:

- ``lat N``: time N iterations one by one with ``perf_counter_ns``; print
  the N durations (ns) on one line, space separated;
- ``ops START END``: sleep until ``perf_counter_ns() >= START`` (the clock
  is ``CLOCK_MONOTONIC``, shared by all processes), run iterations back to
  back until END, print how many it started;
- ``quit`` (or end of input): clean up and exit.

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
_RECV = 65537
_ANC = socket.CMSG_SPACE(4 * 4)
SEGMENT_SIZE = 4096


class RawClient:
    """The least client that speaks the wire contract correctly enough to measure."""

    def __init__(self, path: str, pipeline: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
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
            self.sock.recv(_RECV)
        self.unread = 0
        data, anc, _flags, _addr = self.sock.recvmsg(_RECV, _ANC)
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

    def close(self) -> None:
        self.sock.close()


def _make_op(kind: str, args: list[str]) -> tuple[Op, Op]:
    """The operation of one iteration, and what to do at exit."""
    if kind in ("raw-open", "raw-create", "raw-open-pipe"):
        raw = RawClient(args[0], pipeline=kind == "raw-open-pipe")
        if kind != "raw-create":
            req: dict[str, Any] = {"op": "open", "name": args[1], "access": "ro"}
            prot = mmap.PROT_READ
        else:
            req = {"op": "create", "name": args[1], "size": SEGMENT_SIZE}
            prot = mmap.PROT_READ | mmap.PROT_WRITE
        return (lambda: raw.grant_cycle(req, prot)), raw.close
    if kind in ("lib-open", "lib-create", "lib-open-pipe"):
        from shmbroker import Broker

        broker = Broker(args[0], pipeline_release=kind == "lib-open-pipe")
        name = args[1]
        if kind != "lib-create":

            def lib_open() -> None:
                with broker.open(name):
                    pass

            return lib_open, broker.close

        def lib_create() -> None:
            with broker.create(name, SEGMENT_SIZE):
                pass

        return lib_create, broker.close
    if kind == "smm-create":
        from multiprocessing.managers import SharedMemoryManager

        smm = SharedMemoryManager()
        smm.start()

        def smm_create() -> None:
            sm = smm.SharedMemory(SEGMENT_SIZE)
            sm.close()
            sm.unlink()

        return smm_create, smm.shutdown
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

        return raw_mmap, lambda: None
    raise SystemExit(f"unknown worker kind {kind!r}")


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
    serve(*_make_op(kind, args), warmup)


def serve(op: Op, close: Op, warmup: int) -> None:
    """Warm up, say READY, obey ``lat``/``ops``/``quit`` from stdin; ``close`` at the end."""
    try:
        for _ in range(warmup):
            op()
        print("READY", flush=True)
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "lat":
                print(" ".join(map(str, _latency(op, int(rest[0])))), flush=True)
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
        self.send(f"lat {n}")
        return [int(x) for x in self._line().split()]

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
