"""How busy the machine was during a run, and a SIGTERM that still cleans up."""

from __future__ import annotations

import os
from types import FrameType

__all__ = ["busy_seconds", "own_seconds", "terminate"]


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot, in core-seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU time of this process and of every descendant it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: exit through ``finally`` so the daemon and workers are stopped."""
    raise SystemExit(128 + signum)
