"""Figure 1: the open round trip, from a separate process against a real daemon.

One iteration is a whole use of a segment by a reader: ``open`` request, the
fd in the reply, ``mmap``, ``munmap``, close, ``release`` request.  Measured
with the client library (``Broker.open`` as a context manager) and with the
minimal client of ``_worker.RawClient``, each with every client idle
strategy of the run (``--idle``); the floor is that minimal client against
the floor server, which answers without doing anything, waiting for its
replies with the same strategy.  A further line pipelines the release
(``Broker(pipeline_release=True)``), next to a floor whose client pipelines
it too; then the same client with each strategy against itself blocking
(what the strategy bought), the client CPU time per cycle, and the daemon's
CPU time per cycle next to the floor server's.
"""

from __future__ import annotations

from ._env import Env, Variant
from ._stats import Row, idle_rows, latency_rows


def run(env: Env) -> list[Row]:
    name = env.open_segment()
    sock, floor = env.daemon.socket, env.floor.path
    daemon_pid, floor_pid = env.daemon.pid, env.floor.proc.pid
    lib, raw = env.worker("lib-open", sock, name), env.worker("raw-open", sock, name)
    fl = env.worker("raw-open", floor, name)
    variants: dict[str, Variant] = {}
    for idle in env.settings.idles:
        variants[f"lib@{idle}"] = Variant(lib, idle, daemon_pid)
        variants[f"raw@{idle}"] = Variant(raw, idle, daemon_pid)
        variants[f"floor@{idle}"] = Variant(fl, idle, floor_pid)
    default = env.default_idle
    variants["lib-pipe"] = Variant(env.worker(f"lib-open-pipe@{default}", sock, name))
    variants["floor-pipe"] = Variant(env.worker(f"raw-open-pipe@{default}", floor, name))
    s = env.latencies(variants)
    return [
        *idle_rows("1 open round trip", s, env.settings.idles),
        *latency_rows(
            f"1 open round trip, client library, release pipelined, {default}",
            s["lib-pipe"],
            s["floor-pipe"],
        ),
    ]
