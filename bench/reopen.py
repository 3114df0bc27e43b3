"""Repeat open (``fd: false``) next to one round trip of the floor.

A repeat open is an ``open`` of a segment the client already maps: the
client library asks with ``fd: false`` and reuses its mapping, so no fd
comes and nothing is mapped; then the ``release``.  Measured with the client
library (release waited for, and pipelined) and the minimal client, per
client idle strategy, next to a floor ping: the minimal client sending one
request to the floor server and reading its reply (no fd), with the same
strategy.  The waited-for release makes the repeat open two round trips;
the pipelined one, one round trip and a message whose reply is read later.
"""

from __future__ import annotations

from ._env import Env, Variant
from ._stats import Row, latency_rows

PING = "floor ping, one round trip"


def run(env: Env) -> list[Row]:
    name = env.open_segment()
    sock, pid = env.daemon.socket, env.daemon.pid
    workers = {
        "lib": env.worker("lib-reopen", sock, name),
        "lib-pipe": env.worker("lib-reopen-pipe", sock, name),
        "raw": env.worker("raw-reopen", sock, name),
        "ping": env.worker("raw-ping", env.floor.path),
    }
    variants = {
        f"{key}@{idle}": Variant(w, idle, pid if key != "ping" else env.floor.proc.pid)
        for idle in env.settings.idles
        for key, w in workers.items()
    }
    s = env.latencies(variants)
    rows: list[Row] = []
    for idle in env.settings.idles:
        ping = s[f"ping@{idle}"]
        for key, label in (
            ("lib", "client library"),
            ("lib-pipe", "client library, release pipelined"),
            ("raw", "minimal client"),
        ):
            rows += latency_rows(
                f"5 repeat open (fd: false) + release, {label}, {idle}",
                s[f"{key}@{idle}"],
                ping,
                floor_label=PING,
            )
    return rows
