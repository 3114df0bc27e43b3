"""``python -m bench.dataplane [--quick]``: the data plane, producer -> consumer.

How fast bytes move from one process to another through a brokered ring
(:class:`shmbroker.Ring`), next to the usual ways of doing it, all measured
in the same run, on the same machine:

- ``ring``: a back-pressure ring (8 slots of the message size by default) in
  a segment created through a real ``shmbrokerd`` (started here, as the
  other figures do); the producer ``write``s each message into a slot (one
  copy), the consumer ``read_into``s its own preallocated buffer (one copy);
- ``ring, zero-copy``: the same producer; the consumer looks at the message
  in place (``with reader.next() as view``) and reads one byte of it.  It
  does not get the bytes into its own memory, so it is not comparable with
  the others: a reference for consumers that can work in place;
- ``zmq``: pyzmq ``PUSH`` -> ``PULL`` over ``ipc://``, ``send(copy=False)``,
  ``recv(copy=False)`` (default high-water marks);
- ``multiprocessing.Pipe``: ``Pipe()`` (a socketpair), ``send_bytes`` /
  ``recv_bytes_into`` a preallocated buffer;
- ``os.pipe``: ``os.write`` / ``os.readv`` into a preallocated buffer
  (default 64 KiB pipe buffer);
- two ``memcpy`` ceilings, in one process, no transport: ``memcpy`` copies
  the run's bytes (1 GiB) from one buffer into another in one call (both
  touched before timing, so no page faults: it is memory bandwidth, with
  the non-temporal stores glibc uses for copies that large; the
  "single-process memcpy" of the issue that asked for this figure);
  ``hot memcpy`` copies one message-sized buffer into another as many times
  (both stay in cache: the one copy every transport above needs per
  message, at its fastest).  A ring message is copied twice (into the slot,
  out of it) by two processes in parallel, so it can approach the first,
  not the second.

Every transport runs in two fresh processes (fork): the producer sends the
same preallocated message over and over, the consumer checks each length
and, at the end, a few bytes of its buffer.  After ``warmup`` messages the
producer reads ``CLOCK_MONOTONIC`` (``perf_counter_ns``, shared by all
processes) and sends ``total`` bytes; the consumer reads the clock after the
last one; the figure is ``total / (t_end - t_start)`` in GB/s (10^9 bytes
per second).  Each round runs every transport once, in turn.  The table
gives each transport's best round, and the ratios are of best rounds: as
``timeit`` argues, slower rounds are not the code being slower but other
processes getting in the way, and on 2 CPUs anything else running halves
what two processes can do in parallel (the header says how much CPU time
other processes took during the run; the median column shows how much it
mattered).  Nothing is asserted: it is a table, read by people; run it on a
quiet machine.  Processes are not pinned to CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ._daemon import BrokerDaemon
from ._machine import busy_seconds, own_seconds, terminate

MiB = 1 << 20
GiB = 1 << 30

_ctx = mp.get_context("fork")


@dataclass(frozen=True)
class Run:
    """What one producer/consumer pair moves."""

    size: int  # bytes per message
    count: int  # timed messages
    warmup: int  # untimed messages sent first
    slots: int
    socket: str  # the broker's
    tmp: str  # a private directory (zmq's ipc socket)
    tag: str  # unique per run (ring names)

    @property
    def total(self) -> int:
        return self.size * self.count


def _message(size: int) -> bytearray:
    return bytearray((i * 7 + 3) & 0xFF for i in range(256)) * (size // 256) + bytearray(size % 256)


def _check(dst: memoryview, src: bytearray) -> None:
    if dst[:64] != src[:64] or dst[-64:] != src[-64:]:
        raise AssertionError("consumer buffer does not hold the message")


# -- the transports: a producer and a consumer each ------------------------------------
# A producer returns its start instant (ns); a consumer its end instant (ns).


def _ring_producer(run: Run, _: Any) -> int:
    from shmbroker import Broker, Ring

    src = _message(run.size)
    with (
        Broker(run.socket) as b,
        Ring.create(b, f"bench/ring/{run.tag}", run.slots, run.size, backpressure=True) as w,
    ):
        w.wait_for_readers(1, timeout=30)
        for _ in range(run.warmup):
            w.write(src)
        t0 = time.perf_counter_ns()
        for _ in range(run.count):
            w.write(src)
        return t0


def _ring_consumer(run: Run, _: Any, zero_copy: bool = False) -> int:
    from shmbroker import Broker, Ring

    src = _message(run.size)
    dst = memoryview(bytearray(run.size))
    with Broker(run.socket) as b, Ring.open(b, f"bench/ring/{run.tag}", wait=30) as r:
        if zero_copy:
            for _ in range(run.warmup + run.count):
                with r.next() as view:
                    if len(view) != run.size or view[-1] != src[-1]:
                        raise AssertionError("short message")
            dst[:] = src  # what the check below wants: nothing was copied
        else:
            for _ in range(run.warmup + run.count):
                if r.read_into(dst) != run.size:
                    raise AssertionError("short message")
        t1 = time.perf_counter_ns()
        if r.lost:
            raise AssertionError(f"the consumer lost {r.lost} messages")
    _check(dst, src)
    return t1


def _ring_zero_copy_consumer(run: Run, arg: Any) -> int:
    return _ring_consumer(run, arg, zero_copy=True)


def _zmq_endpoint(run: Run) -> str:
    return f"ipc://{run.tmp}/zmq-{run.tag}.sock"


def _zmq_producer(run: Run, _: Any) -> int:
    import zmq

    src = _message(run.size)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    try:
        s.connect(_zmq_endpoint(run))
        for _ in range(run.warmup):
            s.send(src, copy=False)
        t0 = time.perf_counter_ns()
        for _ in range(run.count):
            s.send(src, copy=False)
        return t0
    finally:
        s.close(linger=-1)  # every message is delivered before the context goes
        ctx.term()


def _zmq_consumer(run: Run, _: Any) -> int:
    import zmq

    src = _message(run.size)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    try:
        s.bind(_zmq_endpoint(run))
        frame = None
        for _ in range(run.warmup + run.count):
            frame = s.recv(copy=False)
            if len(frame) != run.size:
                raise AssertionError("short message")
        t1 = time.perf_counter_ns()
        assert frame is not None
        _check(frame.buffer, src)
        return t1
    finally:
        s.close(linger=0)
        ctx.term()


def _mp_producer(run: Run, conn: Connection) -> int:
    src = _message(run.size)
    for _ in range(run.warmup):
        conn.send_bytes(src)
    t0 = time.perf_counter_ns()
    for _ in range(run.count):
        conn.send_bytes(src)
    return t0


def _mp_consumer(run: Run, conn: Connection) -> int:
    src = _message(run.size)
    dst = bytearray(run.size)
    for _ in range(run.warmup + run.count):
        if conn.recv_bytes_into(dst) != run.size:
            raise AssertionError("short message")
    t1 = time.perf_counter_ns()
    _check(memoryview(dst), src)
    return t1


def _pipe_producer(run: Run, fd: int) -> int:
    src = memoryview(_message(run.size))

    def send() -> None:
        done = 0
        while done < run.size:
            done += os.write(fd, src[done:])

    for _ in range(run.warmup):
        send()
    t0 = time.perf_counter_ns()
    for _ in range(run.count):
        send()
    return t0


def _pipe_consumer(run: Run, fd: int) -> int:
    src = _message(run.size)
    dst = memoryview(bytearray(run.size))
    for _ in range(run.warmup + run.count):
        done = 0
        while done < run.size:
            n = os.readv(fd, [dst[done:]])
            if not n:
                raise AssertionError("pipe closed early")
            done += n
    t1 = time.perf_counter_ns()
    _check(dst, src)
    return t1


# -- the ceilings: one process, no transport -----------------------------------------


def _memcpy_hot(run: Run, _: Any) -> tuple[int, int]:
    src = memoryview(_message(run.size))
    dst = memoryview(bytearray(run.size))
    for _ in range(run.warmup):
        dst[:] = src
    t0 = time.perf_counter_ns()
    for _ in range(run.count):
        dst[:] = src
    return t0, time.perf_counter_ns()


def _memcpy_bulk(run: Run, _: Any) -> tuple[int, int]:
    src = memoryview(_message(run.size) * run.count)
    dst = memoryview(bytearray(run.total))
    dst[:] = src  # fault every page in, outside the timing
    t0 = time.perf_counter_ns()
    dst[:] = src
    return t0, time.perf_counter_ns()


# -- running a pair ----------------------------------------------------------------------


def _child(fn: Callable[[Run, Any], Any], run: Run, arg: Any, out: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench ends us, not a Ctrl-C
    try:
        out.send(("ok", fn(run, arg)))
    except BaseException:
        out.send(("error", traceback.format_exc()))
    finally:
        out.close()


def _start(fn: Callable[[Run, Any], Any], run: Run, arg: Any) -> tuple[Any, Connection]:
    recv, send = _ctx.Pipe(duplex=False)
    proc = _ctx.Process(target=_child, args=(fn, run, arg, send), daemon=True)
    proc.start()
    send.close()
    return proc, recv


def _collect(procs: list[tuple[Any, Connection]], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc, recv in procs:
            if not recv.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a {proc.name} gave no result in {timeout:.0f} s")
            status, value = recv.recv()
            if status != "ok":
                raise RuntimeError(f"a bench process failed:\n{value}")
            results.append(value)
    finally:
        for proc, recv in procs:
            recv.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


@dataclass
class Transport:
    label: str
    producer: Callable[[Run, Any], Any] | None
    consumer: Callable[[Run, Any], Any]
    comparable: bool = True
    results: dict[int, list[float]] = field(default_factory=dict)

    def measure(self, run: Run, timeout: float) -> float:
        if self.producer is None:  # a ceiling: one process times itself
            ((t0, t1),) = _collect([_start(self.consumer, run, None)], timeout)
            return float(run.total / (t1 - t0))
        closers: list[Callable[[], None]] = []
        parg: Any = None
        carg: Any = None
        if self.producer is _mp_producer:
            carg, parg = _ctx.Pipe()
            closers += [carg.close, parg.close]
        elif self.producer is _pipe_producer:
            carg, parg = os.pipe()
            closers += [lambda: os.close(carg), lambda: os.close(parg)]
        try:
            consumer = _start(self.consumer, run, carg)
            producer = _start(self.producer, run, parg)
        finally:
            for close in closers:  # the children have their own copies
                close()
        t1, t0 = _collect([consumer, producer], timeout)
        return float(run.total / (t1 - t0))


TRANSPORTS = [
    Transport("ring via shmbrokerd, read_into own buffer", _ring_producer, _ring_consumer),
    Transport("zmq ipc:// PUSH/PULL, copy=False", _zmq_producer, _zmq_consumer),
    Transport("multiprocessing.Pipe, recv_bytes_into", _mp_producer, _mp_consumer),
    Transport("os.pipe, write / readv", _pipe_producer, _pipe_consumer),
    Transport("memcpy, one process, {total} in one call", None, _memcpy_bulk),
    Transport("memcpy, one process, hot buffers", None, _memcpy_hot),
    Transport(
        "ring via shmbrokerd, zero-copy view",
        _ring_producer,
        _ring_zero_copy_consumer,
        comparable=False,
    ),
]
_, ZMQ, _, _, BULK, HOT, _ = TRANSPORTS


def _size_label(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // 1024} KiB"


def _table(size: int, total: int) -> str:
    zmq, bulk, hot = (max(t.results[size]) for t in (ZMQ, BULK, HOT))
    rows = []
    for t in TRANSPORTS:
        values = t.results[size]
        best = max(values)
        label = t.label.format(total=_size_label(total)) + ("" if t.comparable else " *")
        ratios = (f"{best / zmq:.2f}x", f"{best / bulk:.2f}x", f"{best / hot:.2f}x")
        rows.append((label, f"{best:.2f}", f"{statistics.median(values):.2f}", *ratios))
    header = ("transport", "GB/s", "median", "vs zmq", "vs memcpy", "vs hot memcpy")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for n, r in enumerate((header, *rows)):
        rest = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append(" | ".join([r[0].ljust(widths[0]), *rest]))
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.dataplane", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="128 MiB per run, one round")
    p.add_argument("--total", type=int, help="MiB per run (default 1024, quick 128)")
    p.add_argument("--rounds", type=int, help="runs per transport (default 5, quick 1)")
    p.add_argument("--slots", type=int, default=8, help="ring slots (default 8)")
    p.add_argument(
        "--sizes", default="1024,64", help="message sizes in KiB, comma separated (default 1024,64)"
    )
    a = p.parse_args(argv)
    total = (a.total or (128 if a.quick else 1024)) * MiB
    rounds = a.rounds or (1 if a.quick else 5)
    sizes = [int(s) * 1024 for s in a.sizes.split(",")]

    signal.signal(signal.SIGTERM, terminate)
    load_before = os.getloadavg()[0]
    busy_before, own_before = busy_seconds(), own_seconds()
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="sbd-", dir="/tmp")
    daemon = BrokerDaemon()
    print(f"bench: daemon pid {daemon.pid}", file=sys.stderr, flush=True)
    problems: list[str] = []
    try:
        for size in sizes:
            for t in TRANSPORTS:
                t.results[size] = []
            for rnd in range(rounds):
                for n, t in enumerate(TRANSPORTS):
                    run = Run(
                        size, total // size, 32, a.slots, daemon.socket, tmp, f"{rnd}-{n}-{size}"
                    )
                    gbs = t.measure(run, timeout=300)  # bytes/ns
                    t.results[size].append(gbs)
                    label = t.label.format(total=_size_label(total))
                    print(
                        f"bench: {_size_label(size)} round {rnd + 1}: {label}: {gbs:.2f} GB/s",
                        file=sys.stderr,
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        left = daemon.cleanup()
        if left:
            problems.append(f"daemon left /dev/shm objects (removed): {left}")
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    others = max(0.0, (busy_seconds() - busy_before) - (own_seconds() - own_before))
    share = others / (elapsed * (os.cpu_count() or 1))

    print(
        f"shmbroker data plane: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average before {load_before:.2f}"
    )
    print(
        f"{_size_label(total)} per run, best and median of {rounds} round(s); "
        f"ring of {a.slots} slots; took {elapsed:.0f} s"
    )
    print(
        f"other work on the machine during the run: {others:.1f} CPU-seconds "
        f"({share:.0%} of its capacity)"
    )
    for size in sizes:
        print()
        print(f"messages of {_size_label(size)}:")
        print(_table(size, total))
    print()
    print("GB/s: each transport's best round (10^9 bytes/s); ratios are of best rounds.")
    print("memcpy: the run's bytes copied buffer to buffer in one call, one process")
    print("(memory bandwidth); hot memcpy: one message copied as often between two")
    print("buffers that stay in cache.")
    print("* not comparable: the consumer does not copy the bytes into its own memory.")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
