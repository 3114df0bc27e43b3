"""Figure 3: open round trips per second with 1, 8 and 64 client processes.

Every client process runs the minimal client's open cycle (as in figure 1)
back to back for ``ops_seconds``; all start at the same instant of
``CLOCK_MONOTONIC``.  The figure is the sum of the cycles they started, over
the run's length.  The broker run and the floor run use the same client
code, the floor run against the floor server, and the same client idle
strategy; they alternate per concurrency level and strategy.  Clients and
server share the machine's cores, so at 64 clients this measures the whole
system, clients included.
"""

from __future__ import annotations

import time

from ._env import Env, log
from ._stats import Row
from ._worker import Worker, start_all


def _ops_per_second(workers: list[Worker], seconds: float) -> float:
    lead = 0.3 + 0.005 * len(workers)  # time for every worker to get its command
    start = time.perf_counter_ns() + int(lead * 1e9)
    end = start + int(seconds * 1e9)
    for w in workers:
        w.send(f"ops {start} {end}")
    total = sum(w.ops_result() for w in workers)
    return total / seconds


def run(env: Env) -> list[Row]:
    name = env.open_segment()
    settings = env.settings
    most = max(settings.concurrency)
    warm = settings.ops_warmup
    broker = [env.worker("raw-open", env.daemon.socket, name, warmup=warm) for _ in range(most)]
    floor = [env.worker("raw-open", env.floor.path, name, warmup=warm) for _ in range(most)]
    start_all(broker + floor)
    rows = []
    try:
        for n in settings.concurrency:
            for k, idle in enumerate(settings.idles):
                for w in broker[:n] + floor[:n]:
                    w.set_idle(idle, settle=0)  # an adaptive budget settles within the run
                runs = [(broker, 0), (floor, 1)]
                got = [0.0, 0.0]
                for group, i in runs if k % 2 == 0 else reversed(runs):
                    got[i] = _ops_per_second(group[:n], settings.ops_seconds)
                b, f = got
                log(f"  {n} clients, {idle}: broker {b:,.0f} ops/s, floor {f:,.0f} ops/s")
                plural = "es" if n > 1 else ""
                label = f"3 open round trips/s, {n} client process{plural}, {idle}"
                rows.append(Row(label, b, f, "ops/s"))
    finally:
        env.stop_workers(broker + floor)
    return rows
