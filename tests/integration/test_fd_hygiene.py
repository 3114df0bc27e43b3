"""No fd, mapping or /dev/shm object outlives the segments it served: many
create/open/close cycles against a real daemon, then both processes' fd
tables are compared with where they started."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter

import pytest

from shmbroker import Broker
from tests.support.helpers import DaemonProc, eventually

CYCLES = 10_000


def fd_table(pid: int | str) -> Counter[str]:
    """What each open fd of ``pid`` points at (a multiset, so growth shows)."""
    table: Counter[str] = Counter()
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            table[os.readlink(f"{base}/{fd}")] += 1
    return table


def shm_mappings(prefix: str) -> int:
    """How many of this process's mappings are the daemon's objects (or memfds)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if prefix in line or "memfd:shmbroker" in line)


def assert_same(before: Counter[str], after: Counter[str], who: str) -> None:
    grown = after - before
    assert not grown, f"{who} holds more fds than at the start: {dict(grown)}"


def cycle(a: Broker, b: Broker, name: str, backing: str, repeat: bool) -> None:
    seg = a.create(name, 4096, backing=backing)  # type: ignore[arg-type]
    ro = b.open(name)
    if repeat:  # a second open in the same broker shares the mapping (fd: false)
        again = b.open(name)
        seg.close()
        ro.close()
        again.close()
    else:
        ro.close()
        seg.close()


@pytest.mark.parametrize(
    ("backing", "cycles", "repeat"),
    [("shm", CYCLES, False), ("memfd", 2_000, False), ("shm", 2_000, True)],
    ids=["shm", "memfd", "repeat-open"],
)
def test_create_open_close_cycles_leave_nothing(
    daemon: DaemonProc, backing: str, cycles: int, repeat: bool
) -> None:
    daemon_start = fd_table(daemon.pid)
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b:
        for _ in range(10):  # warm up whatever is set up lazily
            cycle(a, b, "fd/warm", backing, repeat)
        mine, theirs = fd_table("self"), fd_table(daemon.pid)
        maps = shm_mappings(daemon.prefix)

        t0 = time.monotonic()
        for i in range(cycles):
            if i % 1000 == 0:  # now and then, check the cycle does real work
                seg = a.create("fd/x", 4096, backing=backing)  # type: ignore[arg-type]
                seg.buf[:4] = i.to_bytes(4, "little")
                with b.open("fd/x") as ro:
                    assert ro.id == seg.id
                    assert bytes(ro.buf[:4]) == i.to_bytes(4, "little")
                    assert shm_mappings(daemon.prefix) == maps + 2
                    assert b.stat("fd/x").leases == 2
                    if repeat:
                        with b.open("fd/x") as again:
                            assert again.fd == ro.fd  # no new fd, no new mapping
                            assert shm_mappings(daemon.prefix) == maps + 2
                            assert b.stat("fd/x").leases == 3
                seg.close()
            else:
                cycle(a, b, "fd/x", backing, repeat)
        elapsed = time.monotonic() - t0

        assert_same(mine, fd_table("self"), "the client")
        assert_same(theirs, fd_table(daemon.pid), "the daemon")
        assert shm_mappings(daemon.prefix) == maps
        assert daemon.objects() == []
        assert list(a.list()) == []
    # the daemon lets go of both connections too
    eventually(lambda: not (fd_table(daemon.pid) - daemon_start))
    print(f"{backing} {repeat=}: {cycles} cycles, {elapsed / cycles * 1e3:.3f} ms per cycle")


def test_refused_requests_leave_nothing(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as a, Broker(daemon.socket) as b:
        sealed = a.create("fd/sealed", 4096)
        a.seal("fd/sealed")
        mine, theirs = fd_table("self"), fd_table(daemon.pid)
        for _ in range(500):
            with pytest.raises(FileNotFoundError):
                b.open("fd/absent")
            with pytest.raises(TimeoutError):
                b.open("fd/absent", wait=0)
            with pytest.raises(FileExistsError):
                b.create("fd/sealed", 4096)
            with pytest.raises(FileExistsError):
                b.create("fd/sealed", 8192, exist_ok=True)
            with pytest.raises(PermissionError):
                b.open("fd/sealed", "rw")
            with pytest.raises(PermissionError):
                b.create("fd/sealed", 4096, exist_ok=True)
        assert_same(mine, fd_table("self"), "the client")
        assert_same(theirs, fd_table(daemon.pid), "the daemon")
        assert a.stat("fd/sealed").leases == 1
        sealed.close()
        assert daemon.objects() == []
