"""Scale: the open round trip against live segments and connected clients,
the daemon's memory per segment, and its recovery after SIGKILL.

``python -m bench --only scale`` (30-50 s on 2 cores; with ``--quick``, up
to 10,000 segments and 64 clients; ``make bench-scale`` runs it with the
Plasma comparison and draws the plot).  One daemon of its own (limits
raised: ``max_segments``, ``max_clients``, ``max_clients_per_uid``), in the
order:

1. start it on an empty state directory; time from ``exec`` to the first
   answered ``hello`` (the reference for the recovery time);
2. create 100 segments (``persistent``, 1 byte), pipelined in batches of
   ``BATCH`` requests per connection (the daemon drops a peer with more than
   ``max_queued_replies`` unread replies), each lease released at once;
3. open latency (``scale/000000``, figure 1's cycle: open, fd, mmap, munmap,
   release) from two separate client processes, the minimal client and the
   client library, in interleaved rounds with a third, the minimal client
   against the floor server (``bench/floor.py``): the floor does not change
   with scale, so its moves from point to point are the machine's;
4. the same with 1, 8, 64 and 1,000 idle connections held by helper
   processes (``python -m bench.scale --hold SOCK N``; each says ``hello``
   on every connection, so the daemon has admitted them all), then once
   more with none: how far one configuration moves within a run;
5. grow to 1,000, 10,000 and 100,000 segments, measuring open at each; the
   daemon's ``VmRSS`` and open fds are read at each count; then measure
   again with 1,000 idle connections besides (both at once);
6. SIGKILL the daemon, restart it on the same state directory and time
   ``exec`` to the first answered ``hello``; read its ``VmRSS`` then.

Memory per segment is given two ways: the live daemon's ``VmRSS`` growth
from 100 to 100,000 segments over the 99,900 segments added, and the
restarted daemon's ``VmRSS`` less the empty daemon's at the same point
(right after its first ``hello``), over 100,000.

The numbers are written to ``bench/out/scale.json`` for ``bench/plot.py``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.support.launcher import Daemon

from . import REPO
from ._env import Env, Settings, interleaved_latency, log
from ._stats import Row, latency_rows, percentile
from ._worker import RawClient, Worker, start_all

__all__ = ["RESULTS", "run"]

OUT_DIR = REPO / "bench" / "out"
RESULTS = OUT_DIR / "scale.json"
OPEN_NAME = "scale/000000"
COUNTS = (100, 1_000, 10_000, 100_000)
CLIENTS = (1, 8, 64, 1_000)
QUICK_COUNTS = (100, 1_000, 10_000)
QUICK_CLIENTS = (1, 8, 64)
LIFE = "persistent"
BATCH = 200  # pipelined requests per connection: under max_queued_replies (256)
HOLD_PER_PROCESS = 500  # idle connections per helper process
REWARM = 200  # iterations each worker runs, unmeasured, before every point
_RECV = 65537
_ANC = socket.CMSG_SPACE(4 * 4)


def _name(i: int) -> str:
    return f"scale/{i:06d}"


class ScaleDaemon(Daemon):
    """The bench daemon with raised limits, restartable on its own state."""

    def __init__(self, max_segments: int, max_clients: int) -> None:
        super().__init__(
            {
                "log_level": "warning",
                "max_segments": max_segments,
                "max_clients": max_clients,
                "max_clients_per_uid": max_clients,
            },
            tag="sbs",
        )
        t0 = time.monotonic()
        self.start(wait=False, cwd=REPO)
        try:
            self.start_seconds = self._hello_after(t0)
        except BaseException:
            self.cleanup()
            raise

    def _hello_after(self, t0: float, timeout: float = 120.0) -> float:
        """Seconds from ``t0`` until the socket answers ``hello``."""
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                client = RawClient(self.socket)
            except OSError:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"no hello after {timeout} s:\n{self.log()}") from None
                time.sleep(0.002)
                continue
            try:
                client.call({"op": "hello", "client": "bench-scale"})
            finally:
                client.close()
            return time.monotonic() - t0

    def kill_and_restart(self) -> float:
        """SIGKILL, then start again on the same state; seconds to the first hello."""
        self.kill()
        t0 = time.monotonic()
        self.start(wait=False, cwd=REPO)
        return self._hello_after(t0)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stats(self) -> dict[str, Any]:
        """The daemon's ``stats`` (the bench runs as the daemon's uid: an operator)."""
        client = RawClient(self.socket)
        try:
            reply, _fd = client.call({"op": "stats"})
        finally:
            client.close()
        return reply


class Holder(Worker):
    """A helper process holding idle connections (``--hold``); a Worker's handle."""

    def __init__(self, path: str, count: int) -> None:
        self.kind = f"hold {count}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--hold", path, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )


def _hold(path: str, count: int) -> None:
    """Open ``count`` connections, say hello on each, wait for end of input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conns = []
    try:
        for _ in range(count):
            c = RawClient(path)
            conns.append(c)
            c.call({"op": "hello", "client": "bench-idle"})
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
    finally:
        for c in conns:
            c.close()


def _recv(sock: socket.socket) -> dict[str, Any]:
    """One reply; any fd it carries is closed at once."""
    data, anc, _flags, _addr = sock.recvmsg(_RECV, _ANC)
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
            for fd in fds:
                os.close(fd)
    if not data:
        raise ConnectionResetError("the daemon closed the connection")
    reply: dict[str, Any] = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(f"request {reply.get('id')} failed: {reply}")
    return reply


def populate(path: str, start: int, stop: int) -> float:
    """Create segments ``start`` .. ``stop - 1`` (persistent, 1 byte); seconds taken.

    Pipelined: ``BATCH`` creates sent back to back, their replies read (fds
    closed), then the ``BATCH`` releases of their leases, likewise.
    """
    t0 = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        rid = 0
        for lo in range(start, stop, BATCH):
            hi = min(stop, lo + BATCH)
            for i in range(lo, hi):
                rid += 1
                body = {"id": rid, "op": "create", "name": _name(i), "size": 1, "lifetime": LIFE}
                sock.send(json.dumps(body, separators=(",", ":")).encode())
            leases = [_recv(sock)["lease"] for _ in range(lo, hi)]
            for lease in leases:
                rid += 1
                sock.send(json.dumps({"id": rid, "op": "release", "lease": lease}).encode())
            for _ in leases:
                _recv(sock)
    finally:
        sock.close()
    return time.monotonic() - t0


def _summary(samples: Sequence[int]) -> dict[str, float]:
    return {
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "max": max(samples) / 1000,
        "n": len(samples),
    }


def _measure(workers: dict[str, Worker], settings: Settings) -> dict[str, list[int]]:
    for w in workers.values():  # caches after a change of scale: not measured
        w.latency(REWARM)
    return interleaved_latency(workers, settings).lat


def _hold_clients(env: Env, path: str, count: int) -> list[Worker]:
    sizes = [HOLD_PER_PROCESS] * (count // HOLD_PER_PROCESS)
    if count % HOLD_PER_PROCESS:
        sizes.append(count % HOLD_PER_PROCESS)
    holders: list[Worker] = [Holder(path, n) for n in sizes]
    env.workers.extend(holders)  # so that env.close() stops them on any failure
    start_all(holders)
    return holders


def run(env: Env) -> list[Row]:
    quick = env.settings == Settings.quick()
    counts = QUICK_COUNTS if quick else COUNTS
    clients = QUICK_CLIENTS if quick else CLIENTS
    daemon = ScaleDaemon(max_segments=counts[-1] + 1000, max_clients=clients[-1] + 64)
    log(f"scale daemon pid {daemon.pid}, socket {daemon.socket}")
    try:
        return _run(env, daemon, counts, clients)
    finally:
        left = daemon.cleanup()  # the persistent segments, by design: removed
        log(f"scale: removed {len(left)} persistent segment objects")


def _run(env: Env, daemon: ScaleDaemon, counts: Sequence[int], clients: Sequence[int]) -> list[Row]:
    sock = daemon.socket
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        },
        "samples": env.settings.samples,
        "start_empty_s": daemon.start_seconds,
        "rss_empty_kib": daemon.rss_kib(),
        "segments": [],
        "clients": [],
    }
    made = 0
    workers: dict[str, Worker] = {}
    samples: dict[int, dict[str, list[int]]] = {}
    by_clients: dict[int, dict[str, list[int]]] = {}
    for count in counts:
        seconds = populate(sock, made, count)
        log(f"scale: {count:,} segments ({count - made:,} created in {seconds:.1f} s)")
        point: dict[str, Any] = {
            "count": count,
            "created": count - made,
            "create_seconds": seconds,
            "rss_kib": daemon.rss_kib(),
            "fds": daemon.fd_count(),
        }
        made = count
        if not workers:
            workers = {
                "raw": env.worker("raw-open", sock, OPEN_NAME),
                "lib": env.worker("lib-open", sock, OPEN_NAME),
                # the floor server in the same rounds: how much the machine moved
                "floor": env.worker("raw-open", env.floor.path, OPEN_NAME),
            }
            start_all(list(workers.values()))
        s = _measure(workers, env.settings)
        samples[count] = s
        point.update({k: _summary(v) for k, v in s.items()})
        point["stats_segments"] = daemon.stats()["segments"]
        result["segments"].append(point)
        if count == counts[0]:
            for n in clients:
                holders = _hold_clients(env, sock, n)
                try:
                    connected = daemon.stats()["clients"] - 1  # less the stats connection
                    log(f"scale: {n:,} idle connections ({connected} clients connected)")
                    by_clients[n] = _measure(workers, env.settings)
                    fds = daemon.fd_count()
                finally:
                    env.stop_workers(holders)
                result["clients"].append(
                    {
                        "idle": n,
                        "connected": connected,
                        "fds": fds,
                        **{k: _summary(v) for k, v in by_clients[n].items()},
                    }
                )
            # The first point once more: how far one configuration moves within a run.
            again = _measure(workers, env.settings)
            result["again"] = {"count": count, **{k: _summary(v) for k, v in again.items()}}
    # Both at once: the most segments and the most idle clients.
    holders = _hold_clients(env, sock, clients[-1])
    try:
        connected = daemon.stats()["clients"] - 1
        log(f"scale: {counts[-1]:,} segments and {clients[-1]:,} idle connections")
        both = _measure(workers, env.settings)
        result["both"] = {
            "count": counts[-1],
            "idle": clients[-1],
            "connected": connected,
            "fds": daemon.fd_count(),
            "rss_kib": daemon.rss_kib(),
            **{k: _summary(v) for k, v in both.items()},
        }
    finally:
        env.stop_workers(holders)
    env.stop_workers(workers)

    top = counts[-1]
    rss_top = result["segments"][-1]["rss_kib"]
    rss_first = result["segments"][0]["rss_kib"]
    log(f"scale: SIGKILL and restart with {top:,} persistent segments")
    restart = daemon.kill_and_restart()
    rss_recovered = daemon.rss_kib()
    recovered = daemon.stats()["segments"]
    result["recovery"] = {
        "segments": top,
        "recovered": recovered,
        "restart_s": restart,
        "start_empty_s": daemon.start_seconds,
    }
    result["memory"] = {
        "rss_first_kib": rss_first,
        "rss_top_kib": rss_top,
        "per_segment_live_bytes": (rss_top - rss_first) * 1024 / (top - counts[0]),
        "rss_recovered_kib": rss_recovered,
        "per_segment_recovered_bytes": (rss_recovered - result["rss_empty_kib"]) * 1024 / top,
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    log(f"scale: results written to {RESULTS.relative_to(REPO)}")
    if recovered != top:
        env.problems.append(f"scale: restarted daemon has {recovered} segments, not {top}")
    return _rows(result, samples, by_clients, again, both, counts, clients)


def _rows(
    result: dict[str, Any],
    samples: dict[int, dict[str, list[int]]],
    by_clients: dict[int, dict[str, list[int]]],
    again: dict[str, list[int]],
    both: dict[str, list[int]],
    counts: Sequence[int],
    clients: Sequence[int],
) -> list[Row]:
    base = samples[counts[0]]
    base_label = f"{counts[0]:,} segments"
    rows: list[Row] = []
    for variant, label in (("raw", "minimal client"), ("lib", "client library")):
        for count in counts:
            rows += latency_rows(
                f"scale: open, {label}, {count:,} segments",
                samples[count][variant],
                base[variant],
                base_label,
            )
        rows += latency_rows(
            f"scale: open, {label}, {counts[0]:,} segments again (after the clients)",
            again[variant],
            base[variant],
            base_label,
        )
    for variant, label in (("raw", "minimal client"), ("lib", "client library")):
        for n in clients:
            rows += latency_rows(
                f"scale: open, {label}, +{n:,} idle clients",
                by_clients[n][variant],
                base[variant],
                "no idle clients",
            )
    for variant, label in (("raw", "minimal client"), ("lib", "client library")):
        rows += latency_rows(
            f"scale: open, {label}, {counts[-1]:,} segments +{clients[-1]:,} idle clients",
            both[variant],
            base[variant],
            f"{base_label}, no idle clients",
        )
    top = counts[-1]
    rec = result["recovery"]
    mem = result["memory"]
    first, last = result["segments"][0], result["segments"][-1]
    rows.append(
        Row(
            f"scale: SIGKILL, restart with {top:,} persistent segments, to hello",
            rec["restart_s"] * 1e6,
            rec["start_empty_s"] * 1e6,
            "us",
            "start on an empty state",
        )
    )
    rows.append(
        Row(
            f"scale: daemon VmRSS per segment: {mem['per_segment_live_bytes']:,.0f} B "
            f"(live, {counts[0]:,} to {top:,}), {mem['per_segment_recovered_bytes']:,.0f} B "
            "(restarted vs empty)",
            None,
            None,
            "us",
        )
    )
    rows.append(
        Row(
            f"scale: daemon open fds: {first['fds']} at {counts[0]:,} segments, "
            f"{last['fds']} at {top:,}; {result['clients'][-1]['fds']} "
            f"with {clients[-1]:,} idle clients",
            None,
            None,
            "us",
        )
    )
    return rows


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "--hold":
        _hold(argv[1], int(argv[2]))
        return
    sys.exit("usage: python -m bench --only scale (this module's own entry is --hold SOCK N)")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
