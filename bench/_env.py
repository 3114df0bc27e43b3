"""What the figures share: settings, the daemon, the floor server, the workers.

The daemon and the floor server are started on first use and live for the
whole run; ``close`` stops every process the bench started (by its handle,
never by name) and removes every file it made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._daemon import BrokerDaemon
from ._worker import SEGMENT_SIZE, Worker, start_all
from .floor import FloorServer

if TYPE_CHECKING:
    from shmbroker import Broker, Segment

__all__ = ["IDLES", "OPEN_NAME", "Env", "Sampled", "Settings", "Variant"]

OPEN_NAME = "bench/open"
#: the client idle strategies the figures are measured with (shmbroker._idle)
IDLES = ("block", "adaptive", "spin")


@dataclass(frozen=True)
class Settings:
    samples: int = 5000  # per latency figure and variant
    rounds: int = 10  # latency samples are taken in this many interleaved rounds
    warmup: int = 500  # iterations each latency worker runs before measuring
    ops_seconds: float = 2.0  # length of each ops/s run
    ops_warmup: int = 50
    concurrency: tuple[int, ...] = (1, 8, 64)
    idles: tuple[str, ...] = IDLES  # the client idle strategies measured

    @classmethod
    def quick(cls, **kw: object) -> Settings:
        return cls(samples=500, rounds=2, warmup=50, ops_seconds=0.5, ops_warmup=10, **kw)  # type: ignore[arg-type]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Env:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._daemon: BrokerDaemon | None = None
        self._floor: FloorServer | None = None
        self._floor_dir: Path | None = None
        self._holder: tuple[Broker, Segment] | None = None
        self.workers: list[Worker] = []
        self.problems: list[str] = []

    @property
    def default_idle(self) -> str:
        """The client library's default idle strategy (a name or microseconds)."""
        from shmbroker import _idle

        return str(_idle.DEFAULT)

    @property
    def daemon(self) -> BrokerDaemon:
        if self._daemon is None:
            self._daemon = BrokerDaemon()
            log(f"daemon pid {self._daemon.pid}, socket {self._daemon.socket}")
        return self._daemon

    @property
    def floor(self) -> FloorServer:
        if self._floor is None:
            self._floor_dir = Path(tempfile.mkdtemp(prefix="sbf-", dir="/tmp"))
            self._floor = FloorServer(str(self._floor_dir / "f.sock"), SEGMENT_SIZE)
            log(f"floor server pid {self._floor.proc.pid}")
        return self._floor

    def open_segment(self) -> str:
        """Create the segment the open figures open, held for the whole run."""
        if self._holder is None:
            from shmbroker import Broker

            broker = Broker(self.daemon.socket)
            self._holder = (broker, broker.create(OPEN_NAME, SEGMENT_SIZE))
        return OPEN_NAME

    def worker(self, kind: str, *args: str, warmup: int | None = None) -> Worker:
        if kind.startswith("raw-") and "@" not in kind:
            # with an idle strategy from the start: the import of the client
            # library it needs is then done before the measuring starts
            kind = f"{kind}@{self.settings.idles[0]}"
        w = Worker(kind, *args, warmup=self.settings.warmup if warmup is None else warmup)
        self.workers.append(w)
        return w

    def latencies(self, workers: Mapping[str, Worker | Variant]) -> Sampled:
        """Start the workers, sample the variants in interleaved rounds, stop the workers."""
        distinct = list({id(w): w for w in map(_worker_of, workers.values())}.values())
        start_all(distinct)
        try:
            return interleaved_latency(workers, self.settings)
        finally:
            self.stop_workers(distinct)

    def stop_workers(self, workers: list[Worker] | Mapping[str, Worker]) -> None:
        for w in workers.values() if isinstance(workers, Mapping) else workers:
            w.stop()
            self.workers.remove(w)
            if w.proc.returncode:
                self.problems.append(f"worker {w.kind} exited {w.proc.returncode}")

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers.clear()
        if self._holder is not None:
            broker, seg = self._holder
            with contextlib.suppress(OSError):
                seg.close()
            broker.close()
            self._holder = None
        if self._floor is not None:
            self._floor.stop()
            self._floor = None
        if self._floor_dir is not None:
            shutil.rmtree(self._floor_dir, ignore_errors=True)
            self._floor_dir = None
        if self._daemon is not None:
            left = self._daemon.cleanup()
            if left:
                self.problems.append(f"daemon left /dev/shm objects (removed): {left}")
            self._daemon = None


@dataclass(frozen=True)
class Variant:
    """One line of a latency figure: a worker, the idle strategy it uses for it
    (None: as started), and the server whose CPU time its rounds are charged
    (its pid), if any."""

    worker: Worker
    idle: str | None = None
    server: int | None = None


@dataclass
class Sampled:
    """What interleaved rounds measured, per variant: durations (ns), the
    client's CPU time over them (ns) and the server's (ns), if it has one."""

    lat: dict[str, list[int]]
    client_cpu: dict[str, int]
    server_cpu: dict[str, int]

    def __getitem__(self, key: str) -> list[int]:
        return self.lat[key]

    def client_us(self, key: str) -> float:
        """Client CPU time per iteration, in microseconds."""
        return self.client_cpu[key] / len(self.lat[key]) / 1000

    def server_us(self, key: str) -> float:
        """Server CPU time per iteration, in microseconds."""
        return self.server_cpu[key] / len(self.lat[key]) / 1000


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process, to the nanosecond (``schedstat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def _worker_of(v: Worker | Variant) -> Worker:
    return v.worker if isinstance(v, Variant) else v


def interleaved_latency(workers: Mapping[str, Worker | Variant], settings: Settings) -> Sampled:
    """``settings.samples`` per variant, taken in rounds that alternate between the
    variants (one at a time, the others idle), so a change of load on the
    machine during the run touches all of them alike."""
    per_round = max(1, settings.samples // settings.rounds)
    variants = {k: v if isinstance(v, Variant) else Variant(v) for k, v in workers.items()}
    out = Sampled({k: [] for k in variants}, dict.fromkeys(variants, 0), dict.fromkeys(variants, 0))
    current: dict[int, str | None] = {}
    items = list(variants.items())
    for r in range(settings.rounds):
        for key, v in items if r % 2 == 0 else reversed(items):
            w = v.worker
            if v.idle is not None and current.get(id(w)) != v.idle:
                w.set_idle(v.idle)
                current[id(w)] = v.idle
            before = process_cpu_ns(v.server) if v.server else 0
            out.lat[key].extend(w.latency(per_round))
            if v.server:
                out.server_cpu[key] += process_cpu_ns(v.server) - before
            out.client_cpu[key] += w.last_cpu
    return out
