"""What the figures share: settings, the daemon, the floor server, the workers.

The daemon and the floor server are started on first use and live for the
whole run; ``close`` stops every process the bench started (by its handle,
never by name) and removes every file it made.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["OPEN_NAME", "Env", "Settings"]

OPEN_NAME = "bench/open"


@dataclass(frozen=True)
class Settings:
    samples: int = 5000  # per latency figure and variant
    rounds: int = 10  # latency samples are taken in this many interleaved rounds
    warmup: int = 500  # iterations each latency worker runs before measuring
    ops_seconds: float = 2.0  # length of each ops/s run
    ops_warmup: int = 50
    concurrency: tuple[int, ...] = (1, 8, 64)

    @classmethod
    def quick(cls) -> Settings:
        return cls(samples=500, rounds=2, warmup=50, ops_seconds=0.5, ops_warmup=10)


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
        w = Worker(kind, *args, warmup=self.settings.warmup if warmup is None else warmup)
        self.workers.append(w)
        return w

    def latencies(self, workers: Mapping[str, Worker]) -> dict[str, list[int]]:
        """Start ``workers``, sample them in interleaved rounds, stop them."""
        start_all(list(workers.values()))
        try:
            return interleaved_latency(workers, self.settings)
        finally:
            self.stop_workers(workers)

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


def interleaved_latency(workers: Mapping[str, Worker], settings: Settings) -> dict[str, list[int]]:
    """``settings.samples`` per worker, taken in rounds that alternate between the
    workers (one at a time, the others idle), so a change of load on the
    machine during the run touches all of them alike."""
    per_round = max(1, settings.samples // settings.rounds)
    out: dict[str, list[int]] = {k: [] for k in workers}
    items = list(workers.items())
    for r in range(settings.rounds):
        for key, w in items if r % 2 == 0 else reversed(items):
            out[key].extend(w.latency(per_round))
    return out
