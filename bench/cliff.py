"""``python -m bench.cliff``: the VM wake-up cliff, with nothing but sockets.

A server process answers each datagram on an ``AF_UNIX`` ``SOCK_SEQPACKET``
socket after busy-waiting D microseconds (its "work"); a client process
sends one byte and waits for the answer, either blocking in ``recv`` or
polling with ``MSG_DONTWAIT`` (never blocking), or with the client
library's idle strategies (``shmbroker._idle``: ``adaptive``, a fixed spin
then block).  Printed: the p50 and p99 round trip per D and way of waiting,
and the round trip minus D, measured in rounds that alternate the ways
(one at a time), so that the machine's drift touches all alike.

On a machine whose idle CPU halts and is woken by a hypervisor (a VM), a
blocked client whose answer comes later than a few microseconds pays that
wake-up: the round trip minus D jumps once D passes the halt.  A polling
client does not.  No broker is involved: this is the transport and the
machine.  ``--ds 0,2,5,10,20,50,80``, ``--samples 2000``, ``--rounds 6``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

from shmbroker import _idle

WAYS = ("block", "poll", "adaptive")


def _server(sock: socket.socket) -> None:
    clock = time.perf_counter_ns
    while True:
        data = sock.recv(64)
        if not data:
            return
        until = clock() + int.from_bytes(data, "little") * 1000
        while clock() < until:
            pass
        sock.send(b"k")


def _round(sock: socket.socket, way: str, d: int, n: int, idle: _idle.Idle) -> list[int]:
    clock = time.perf_counter_ns
    msg = d.to_bytes(4, "little")
    out = [0] * n
    for i in range(n):
        t0 = clock()
        sock.send(msg)
        if way == "block":
            sock.recv(64)
        elif way == "poll":
            while True:
                try:
                    sock.recv(64, socket.MSG_DONTWAIT)
                    break
                except BlockingIOError:
                    pass
        else:
            _idle.recvmsg(sock, idle, 64, 0)
        out[i] = clock() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cliff", description=__doc__.split("\n")[0])
    p.add_argument("--ds", default="0,2,5,10,20,50,80", help="server work D, us, comma-separated")
    p.add_argument("--samples", type=int, default=2000, help="per D and way")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--ways", default=",".join(WAYS))
    a = p.parse_args(argv)
    ds = [int(x) for x in a.ds.split(",")]
    ways = a.ways.split(",")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the server
        ours.close()
        try:
            _server(theirs)
        finally:
            os._exit(0)
    theirs.close()
    try:
        idles = {d: _idle.Idle("adaptive") for d in ds}
        per = max(1, a.samples // a.rounds)
        got: dict[tuple[int, str], list[int]] = {(d, w): [] for d in ds for w in ways}
        for d in ds:
            _round(ours, "block", d, 200, idles[d])  # warm-up
        for r in range(a.rounds):
            for d in ds:
                for w in ways if r % 2 == 0 else reversed(ways):
                    got[d, w] += _round(ours, w, d, per, idles[d])
        print(f"{os.cpu_count()} CPUs; {per * a.rounds} round trips per D and way; us")
        print("D us | " + " | ".join(f"{w} p50 | {w} p99 | {w} p50-D" for w in ways))
        for d in ds:
            cells = []
            for w in ways:
                s = sorted(got[d, w])
                p50, p99 = statistics.median(s) / 1000, s[int(len(s) * 0.99)] / 1000
                cells.append(f"{p50:.1f} | {p99:.1f} | {p50 - d:.1f}")
            print(f"{d} | " + " | ".join(cells))
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
