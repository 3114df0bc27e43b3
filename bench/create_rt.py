"""Figure 2: create and delete a 4 KiB segment, from a separate process.

One iteration: ``create`` (lifetime ``refcount``), the read-write fd,
``mmap``, ``munmap``, close, ``release`` (the last lease, so the daemon
unlinks it).  With the client library and with the minimal client, per
client idle strategy, next to the floor: the minimal client against the
floor server, with the same strategy (the same two round trips, the same
mapping, nothing created).  The standard library's answer to the same need,
``SharedMemoryManager().SharedMemory(4096)`` then ``close()`` and
``unlink()``, is measured in the same rounds as a reference, against the
client library with its default strategy.
"""

from __future__ import annotations

import os

from ._env import Env, Variant
from ._stats import Row, idle_rows, latency_rows


def run(env: Env) -> list[Row]:
    sock, daemon_pid = env.daemon.socket, env.daemon.pid
    tag = os.getpid()
    lib = env.worker("lib-create", sock, f"bench/create/lib-{tag}")
    raw = env.worker("raw-create", sock, f"bench/create/raw-{tag}")
    fl = env.worker("raw-create", env.floor.path, "bench/create/floor")
    variants: dict[str, Variant] = {}
    for idle in env.settings.idles:
        variants[f"lib@{idle}"] = Variant(lib, idle, daemon_pid)
        variants[f"raw@{idle}"] = Variant(raw, idle, daemon_pid)
        variants[f"floor@{idle}"] = Variant(fl, idle, env.floor.proc.pid)
    default = env.default_idle
    variants["lib-default"] = Variant(lib, default)
    variants["smm"] = Variant(env.worker("smm-create"))
    s = env.latencies(variants)
    return [
        *idle_rows("2 create+delete 4 KiB", s, env.settings.idles),
        *latency_rows(
            f"2 create+delete 4 KiB, client library, {default}",
            s["lib-default"],
            s["smm"],
            floor_label="SharedMemoryManager",
        ),
    ]
