"""``python -m bench.ab OLD NEW``: is NEW faster than OLD at figure 1?

OLD and NEW are git revisions of this repository (or source directories).
Each gets its own daemon, and its own measuring worker that imports that
tree's client library; the two are measured in short rounds, one after the
other, alternating which goes first, so that the machine's drift (2-3x
within an hour on a small VM) touches both alike.  Printed: per tree, the
median over rounds of the open round trip's p50 and of the daemon's CPU per
cycle (its main thread's, ``/proc/PID/schedstat``), with their ranges, and
NEW's ratio to OLD.

A change worth less than the spread of two runs of the same tree
(``python -m bench.ab HEAD HEAD``, a few percent) is not measured by this.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shmbroker import Broker

from . import REPO
from ._daemon import BrokerDaemon, tree_env
from ._env import OPEN_NAME, log
from ._worker import SEGMENT_SIZE, Worker, start_all

SAMPLES_PER_ROUND = 1000


def _tree(rev: str, into: Path) -> Path:
    """A directory holding ``rev``: itself if it is one, else a ``git archive`` of it."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _cpu_seconds(pid: int) -> float:
    """CPU time of the daemon's main thread, to the nanosecond (``stat`` counts ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--client", choices=("raw", "lib"), default="raw")
    p.add_argument(
        "--idle",
        help="client idle strategy of both workers (block, adaptive, spin, microseconds); "
        "both trees must have shmbroker._idle.  Default: each client's own default "
        "(the client library's; a blocking recvmsg for raw)",
    )
    a = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="sbab-", dir="/tmp"))
    daemons: list[BrokerDaemon] = []
    workers: list[Worker] = []
    try:
        trees = [_tree(rev, scratch / name) for rev, name in ((a.old, "old"), (a.new, "new"))]
        for tree in trees:
            daemons.append(BrokerDaemon(tree))
            with Broker(daemons[-1].socket) as b:
                b.create(OPEN_NAME, SEGMENT_SIZE, lifetime="persistent").close()
        kind = f"{a.client}-open" + (f"@{a.idle}" if a.idle else "")
        workers = start_all(
            [
                Worker(kind, d.socket, OPEN_NAME, warmup=500, env=tree_env(t))
                for d, t in zip(daemons, trees, strict=True)
            ]
        )
        p50s: list[list[float]] = [[], []]
        cpus: list[list[float]] = [[], []]
        for r in range(a.rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                before = _cpu_seconds(daemons[i].pid)
                lat = sorted(workers[i].latency(SAMPLES_PER_ROUND))
                cpus[i].append((_cpu_seconds(daemons[i].pid) - before) / len(lat) * 1e6)
                p50s[i].append(lat[len(lat) // 2] / 1000)
            log(f"round {r + 1}/{a.rounds}")
        rows = zip(("old", "new"), (a.old, a.new), p50s, cpus, strict=True)
        for label, rev, lat_us, cpu_us in rows:
            print(
                f"{label} {rev:>12}: open p50 {statistics.median(lat_us):6.1f} us "
                f"[{min(lat_us):.0f}-{max(lat_us):.0f}], daemon CPU "
                f"{statistics.median(cpu_us):6.1f} us/cycle [{min(cpu_us):.0f}-{max(cpu_us):.0f}]"
            )
        print(
            f"new/old: p50 {statistics.median(p50s[1]) / statistics.median(p50s[0]):.3f}, "
            f"daemon CPU {statistics.median(cpus[1]) / statistics.median(cpus[0]):.3f}"
            f" ({a.client} client{', idle ' + a.idle if a.idle else ''}, "
            f"{a.rounds} rounds of {SAMPLES_PER_ROUND})"
        )
        return 0
    finally:
        for w in workers:
            w.stop()
        for d in daemons:
            with contextlib.suppress(OSError), Broker(d.socket) as b:
                b.delete(OPEN_NAME)
            left = d.cleanup()
            if left:
                print(f"bench.ab: removed what a daemon left: {left}", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
