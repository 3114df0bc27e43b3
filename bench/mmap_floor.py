"""Figure 4: the raw mapping cost, for reference.

``os.open`` + ``mmap`` (read-only, 4 KiB, ``MAP_SHARED``) + ``munmap`` +
``close`` of a file that already exists in ``/dev/shm``, in one process, no
IPC at all: what any shared memory scheme pays at the least.  It has no
broker column; compare it with the floors of figures 1 and 2 to see what the
round trips themselves cost.
"""

from __future__ import annotations

import contextlib
import os
import secrets

from ._env import Env
from ._stats import Row, latency_rows
from ._worker import SEGMENT_SIZE, start_all


def run(env: Env) -> list[Row]:
    path = f"/dev/shm/sbbench-{secrets.token_hex(6)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, SEGMENT_SIZE)
        finally:
            os.close(fd)
        w = env.worker("mmap", path)
        start_all([w])
        try:
            samples = w.latency(env.settings.samples)
        finally:
            env.stop_workers([w])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return latency_rows("4 os.open+mmap+munmap, /dev/shm file", None, samples)
