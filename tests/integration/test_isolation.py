"""make test runs pytest in tests/run-isolated: a /dev/shm of its own, so the
leak check is exact and never touches another program's objects.

Proved one level down: this test plays "the host" (another program holding
objects in its /dev/shm, named as a user's daemon and Python would name
them, some made before the inner run, some while it runs) and runs a small
suite (tests/support/isolation_probe.py, real conftest, real daemon) through the
wrapper. The inner suite must not see them, its leak check must catch and
remove its own leak, and every host object must be intact afterwards: same
inode, same bytes, and a live mapping of one not "(deleted)".
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import REPO, wait_line

WRAPPER = REPO / "tests" / "run-isolated"

HOLDER = """
import mmap, os, sys, time
names = sys.argv[1:]
maps = []
for n in names[:1]:
    fd = os.open("/dev/shm/" + n, os.O_RDWR)
    maps.append(mmap.mmap(fd, 4096))
    os.close(fd)
print("READY", flush=True)
made = 0
while sys.stdin.readline():  # a line per request: make one more object now
    n = names[1] + str(made)
    fd = os.open("/dev/shm/" + n, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.write(fd, n.encode())
    os.close(fd)
    made += 1
    print("MADE", n, flush=True)
"""


def _make(name: str) -> int:
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.ftruncate(fd, 4096)
    os.pwrite(fd, name.encode(), 0)
    os.close(fd)
    return os.stat(f"/dev/shm/{name}").st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -m needs root")
def test_the_suite_never_touches_the_hosts_shm(tmp_path: Path) -> None:
    tok = secrets.token_hex(4)
    before = [f"nu-sb.k.persist-{tok}", f"psm_{tok}", f"shmbroker.{tok}", f"sbt{tok}.x"]
    during = f"nu-sb.during-{tok}-"
    leak = f"leak-{tok}"
    inodes = {n: _make(n) for n in before}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, before[0], during],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    made: list[str] = []
    try:
        wait_line(holder)
        assert holder.stdin is not None
        env = dict(os.environ)
        env.update(
            SHMBROKER_PROBE_HOST_NAMES=" ".join([*before, during + "0"]),
            SHMBROKER_PROBE_LEAK=leak,
        )
        # Objects appear on "the host" while the inner suite runs.
        inner = subprocess.Popen(
            [str(WRAPPER), sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/support/isolation_probe.py"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for _ in range(3):
            holder.stdin.write("\n")
            holder.stdin.flush()
            made.append(wait_line(holder, "MADE").split()[1])
        out, _ = inner.communicate(timeout=120)
        maps = Path(f"/proc/{holder.pid}/maps").read_text()
        after = {n: os.stat(f"/dev/shm/{n}").st_ino for n in [*before, *made]}
        data = {n: Path(f"/dev/shm/{n}").read_bytes()[: len(n)] for n in [*before, *made]}
    finally:
        holder.kill()
        holder.communicate()  # reaps it and closes its pipes
        for n in [*before, *made]:
            Path(f"/dev/shm/{n}").unlink(missing_ok=True)
    # The inner suite: both tests passed, the second failed the leak check (its own leak only).
    assert inner.returncode == 1, out
    assert "2 passed, 1 error" in out, out
    assert f"test left entries in /dev/shm: ['{leak}']" in out, out
    # The host: nothing gained, nothing lost, nothing changed.
    assert not Path(f"/dev/shm/{leak}").exists()
    assert {n: after[n] for n in before} == inodes
    assert all(data[n] == n.encode() for n in data), data
    assert f"/dev/shm/{before[0]}" in maps
    assert f"/dev/shm/{before[0]} (deleted)" not in maps
