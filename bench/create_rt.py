"""Figure 2: create and delete a 4 KiB segment, from a separate process.

One iteration: ``create`` (lifetime ``refcount``), the read-write fd,
``mmap``, ``munmap``, close, ``release`` (the last lease, so the daemon
unlinks it).  With the client library and with the minimal client, next to
the floor (the minimal client against the floor server: same two round
trips, same mapping, nothing created) and next to the standard library's
answer to the same need, ``SharedMemoryManager().SharedMemory(4096)``, then
``close()`` and ``unlink()``, measured in the same rounds.
"""

from __future__ import annotations

import os

from ._env import Env
from ._stats import Row, latency_rows


def run(env: Env) -> list[Row]:
    sock = env.daemon.socket
    tag = os.getpid()
    workers = {
        "lib": env.worker("lib-create", sock, f"bench/create/lib-{tag}"),
        "raw": env.worker("raw-create", sock, f"bench/create/raw-{tag}"),
        "floor": env.worker("raw-create", env.floor.path, "bench/create/floor"),
        "smm": env.worker("smm-create"),
    }
    s = env.latencies(workers)
    return [
        *latency_rows("2 create+delete 4 KiB, client library", s["lib"], s["floor"]),
        *latency_rows("2 create+delete 4 KiB, minimal client", s["raw"], s["floor"]),
        *latency_rows(
            "2 create+delete 4 KiB, client library",
            s["lib"],
            s["smm"],
            floor_label="SharedMemoryManager",
        ),
    ]
