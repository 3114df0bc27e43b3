"""Figure 1: the open round trip, from a separate process against a real daemon.

One iteration is a whole use of a segment by a reader: ``open`` request, the
fd in the reply, ``mmap``, ``munmap``, close, ``release`` request.  Measured
twice, with the client library (``Broker.open`` as a context manager) and
with the minimal client of ``_worker.RawClient``; the floor is that minimal
client against the floor server, which answers without doing anything.  A
third line pipelines the release (``Broker(pipeline_release=True)``), next
to a floor whose client pipelines it too.
"""

from __future__ import annotations

from ._env import Env
from ._stats import Row, latency_rows


def run(env: Env) -> list[Row]:
    name = env.open_segment()
    sock = env.daemon.socket
    workers = {
        "lib": env.worker("lib-open", sock, name),
        "raw": env.worker("raw-open", sock, name),
        "floor": env.worker("raw-open", env.floor.path, name),
        "lib-pipe": env.worker("lib-open-pipe", sock, name),
        "floor-pipe": env.worker("raw-open-pipe", env.floor.path, name),
    }
    s = env.latencies(workers)
    return [
        *latency_rows("1 open round trip, client library", s["lib"], s["floor"]),
        *latency_rows("1 open round trip, minimal client", s["raw"], s["floor"]),
        *latency_rows(
            "1 open round trip, client library, release pipelined",
            s["lib-pipe"],
            s["floor-pipe"],
        ),
    ]
