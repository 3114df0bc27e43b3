"""The ring helper (``shmbroker.ring``) across real processes and a real daemon.

Writers and readers are separate processes (readers as another uid where it
matters), mapping the one segment the daemon granted.  Every message carries
its sequence number and a CRC of its body, so order, loss and torn bytes are
all visible to the reader that checks them.
"""

from __future__ import annotations

import inspect
import os
import platform
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmbroker import (
    Broker,
    Ring,
    RingClosedError,
    RingOverrunError,
    RingReader,
    RingWriter,
    RingWriterGoneError,
)
from tests.support.helpers import DaemonProc, eventually, spawn_client, wait_line

NOBODY = 65534


def message(seq: int, slot_size: int) -> bytes:
    """Message ``seq``: a 16-byte header (seq, length, CRC of the body), then a body
    whose length and bytes depend on ``seq``."""
    import random
    import struct
    import zlib

    n = (seq * 7919) % (slot_size - 15)  # 0 .. slot_size - 16: every size comes up
    body = random.Random(seq).randbytes(n)
    return struct.pack("<QII", seq, n, zlib.crc32(body)) + body


def check(data: bytes | memoryview) -> int:
    """The sequence number of a message, after checking its length and CRC."""
    import struct
    import zlib

    if len(data) < 16:
        raise AssertionError(f"a message of {len(data)} bytes has no header")
    seq, n, crc = struct.unpack_from("<QII", data)
    body = data[16:]
    if len(body) != n or zlib.crc32(body) != crc:
        raise AssertionError(f"message {seq} is corrupt")
    return int(seq)


CODEC = inspect.getsource(message) + inspect.getsource(check)


def client_code(body: str) -> str:
    return CODEC + textwrap.dedent(body)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The process's stdout once it exited 0 (fail with its stderr otherwise)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client hung:\n{out}\n{err}") from None
    assert proc.returncode == 0, f"client failed ({proc.returncode}):\n{out}\n{err}"
    return out


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Client processes a test starts: killed and reaped whatever happens."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture
def broker(daemon: DaemonProc) -> Iterator[Broker]:
    with Broker(daemon.socket) as b:
        yield b


# A reader that checks every message until the ring closes; it alternates the
# copying read and the zero-copy view.  Prints "DONE <count> <lost>".
CHECKING_READER = """
with Broker(SOCK) as b, Ring.open(b, NAME, wait=10) as r:
    print("READY", flush=True)
    buf = bytearray(SLOT)
    count = 0
    while True:
        try:
            if count % 2:
                with r.next(timeout=20) as view:
                    seq = check(view)
            else:
                seq = check(memoryview(buf)[: r.read_into(buf, timeout=20)])
        except RingClosedError:
            break
        assert seq == count, (seq, count)
        count += 1
    print("DONE", count, r.lost, flush=True)
"""


def checking_reader(name: str, slot: int) -> str:
    return client_code(f"NAME = {name!r}\nSLOT = {slot}\n" + textwrap.dedent(CHECKING_READER))


def test_another_uid_reads_10000_messages_in_order_none_lost(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    slot = 4096
    with Ring.create(broker, "rings/main", 8, slot, mode=0o644, backpressure=True) as w:
        reader = spawn_client(checking_reader("rings/main", slot), daemon.socket, uid=NOBODY)
        procs.append(reader)
        wait_line(reader)
        assert w.wait_for_readers(1, timeout=10) == 1
        for seq in range(10_000):
            assert w.write(message(seq, slot), timeout=10) == seq
    assert finish(reader).split() == ["DONE", "10000", "0"]


def test_several_readers_each_get_the_whole_stream(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    slot = 1024
    with Ring.create(broker, "rings/fan", 4, slot, mode=0o644, backpressure=True) as w:
        for uid in (None, NOBODY, NOBODY):
            procs.append(spawn_client(checking_reader("rings/fan", slot), daemon.socket, uid=uid))
        for p in procs:
            wait_line(p)
        assert w.wait_for_readers(3, timeout=10) == 3
        for seq in range(3000):
            w.write(message(seq, slot), timeout=10)
    for p in procs:
        assert finish(p).split() == ["DONE", "3000", "0"]


SLOW_READER = """
with Broker(SOCK) as b, Ring.open(b, "rings/lossy", wait=10) as r:
    print("READY", flush=True)
    expected = received = lost = overruns = 0
    while True:
        try:
            seq = check(r.read(timeout=20))
        except RingOverrunError as e:
            assert e.seq == expected + e.lost == r.seq, (e.seq, expected, e.lost)
            expected += e.lost
            lost += e.lost
            overruns += 1
            continue
        except RingClosedError:
            break
        assert seq == expected, (seq, expected)  # every gap was reported, exactly
        expected += 1
        received += 1
        time.sleep(0.002)
    print("DONE", received, lost, r.lost, overruns, expected, flush=True)
"""


def test_a_slow_reader_counts_exactly_what_it_lost(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    total, slot = 3000, 128
    with Ring.create(broker, "rings/lossy", 4, slot, mode=0o644) as w:
        reader = spawn_client(client_code(SLOW_READER), daemon.socket, uid=NOBODY)
        procs.append(reader)
        wait_line(reader)
        for seq in range(total):
            w.write(message(seq, slot))  # lossy: never waits
    _, received, lost, counted, overruns, end = finish(reader).split()
    assert int(received) + int(lost) == total
    assert int(lost) == int(counted) > 0
    assert int(overruns) >= 1
    assert int(end) == total


READ_ONLY_READER = """
import mmap
with Broker(SOCK) as b, Ring.open(b, "rings/ro", wait=10, start="oldest") as r:
    results = []
    try:
        r.segment.buf[0] = 1
    except TypeError:
        results.append("buf-ro")
    with r.next(timeout=10) as view:
        try:
            view[0] = 1
        except TypeError:
            results.append("view-ro")
    try:
        mmap.mmap(r.segment.fd, r.segment.size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except PermissionError:
        results.append("mmap-refused")
    try:
        b.open("rings/ro", "rw")
    except PermissionError:
        results.append("rw-open-refused")
    print(*results, flush=True)
"""


def test_a_reader_cannot_write_the_ring(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    with Ring.create(broker, "rings/ro", 2, 64, mode=0o644) as w:
        w.write(b"x" * 64)
        before = bytes(w.segment.buf)
        out = finish(spawn_client(client_code(READ_ONLY_READER), daemon.socket, uid=NOBODY))
        assert out.split() == ["buf-ro", "view-ro", "mmap-refused", "rw-open-refused"]
        assert bytes(w.segment.buf) == before


TORN_READER = """
import itertools, mmap
SENTINEL = b"\\xff" * 16  # no message starts so
with Broker(SOCK) as b, Ring.open(b, "rings/stress", wait=10) as r:
    print("READY", flush=True)
    buf = mmap.mmap(-1, SLOT)
    ok = accepted_bad = caught = overruns = 0
    deadline = time.monotonic() + 8
    for i in itertools.count():
        if time.monotonic() > deadline or (ok >= 20 and caught >= 2):
            break
        good = True
        try:
            if ZERO_COPY:
                with r.next(timeout=5) as view:
                    if i % 4 == 1:
                        time.sleep(0.001)  # a slow consumer, working in place
                    try:  # on the live slot, while the writer runs
                        good = check(view) == r.seq
                    except AssertionError:
                        good = False
                # the release did not object: what we checked must have been intact
            else:
                buf.madvise(mmap.MADV_DONTNEED)  # a slow copy: it faults every page in
                buf[:16] = SENTINEL
                n = r.read_into(buf, timeout=5)
                try:
                    good = check(memoryview(buf)[:n]) == r.seq - 1
                except AssertionError:
                    good = False
            ok, accepted_bad = ok + good, accepted_bad + (not good)
        except RingOverrunError:
            overruns += 1
            # zero-copy: the release caught bytes we saw torn; copy: the check after
            # the copy (the sentinel is gone) refused what it had copied
            caught += (not good) if ZERO_COPY else (buf[:16] != SENTINEL)
    print("DONE", ok, accepted_bad, caught, overruns, flush=True)
"""


def test_torn_reads_never_surface(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    """A writer hammering a 2-slot lossy ring, so that it overwrites the slot a
    reader is reading.  One reader checks CRCs on the live zero-copy view (it
    sees torn bytes, and their release must raise), the other on its copies
    (which must never be torn).  Both must also have seen the check fire, or
    the stress proved nothing.  Writer and reader are pinned to different CPUs
    (when there are two), so that they do run at the same time even on a busy
    machine."""
    import random
    import zlib

    slot = 1 << 20
    rand = random.Random(1)
    bodies = [rand.randbytes(rand.randrange(slot - 16)) for _ in range(16)]
    crcs = [zlib.crc32(body) for body in bodies]
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2
    with Ring.create(broker, "rings/stress", 2, slot, mode=0o644) as w:
        for what, zero_copy in (("a zero-copy view", True), ("read_into", False)):
            head = f"ZERO_COPY = {zero_copy}\nSLOT = {slot}\n"
            reader = spawn_client(client_code(head + TORN_READER), daemon.socket, uid=NOBODY)
            procs.append(reader)
            wait_line(reader)
            if pinned:
                os.sched_setaffinity(reader.pid, {cpus[1]})
                os.sched_setaffinity(0, {cpus[0]})
            try:
                hammer(w, reader, bodies, crcs)
            finally:
                os.sched_setaffinity(0, cpus)
            _, ok, accepted_bad, caught, _ = finish(reader).split()
            assert int(accepted_bad) == 0, f"{what} gave torn bytes without an overrun"
            assert int(ok) > 0
            assert int(caught) > 0, f"{what}: the stress never tore a read: it proves nothing"


def hammer(
    w: RingWriter, reader: subprocess.Popen[str], bodies: list[bytes], crcs: list[int]
) -> None:
    """Write messages as fast as possible until ``reader`` exits."""
    import struct

    seq = w.seq
    while seq % 64 or reader.poll() is None:
        k = seq % len(bodies)
        n = 16 + len(bodies[k])
        buf = w.reserve()
        buf[16:n] = bodies[k]
        struct.pack_into("<QII", buf, 0, seq, n - 16, crcs[k])
        buf.release()
        seq = w.publish(n) + 1


IDLE_READER = """
import shmbroker.ring.reader
shmbroker.ring.reader._READER_WAIT = 30.0  # no safety-net wake-up: only the doorbell can wake us
with Broker(SOCK) as b, Ring.open(b, "rings/idle", wait=10) as r:
    print("READY", flush=True)
    data = r.read()
    print("GOT", time.monotonic(), data.decode(), flush=True)
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("backpressure", [False, True])
def test_an_idle_reader_sleeps_on_the_doorbell_and_wakes_when_written(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]], backpressure: bool
) -> None:
    """On a back-pressure ring the writer rings only for readers whose cursor
    says they sleep: this checks that path too."""
    with Ring.create(broker, "rings/idle", 4, 64, mode=0o644, backpressure=backpressure) as w:
        reader = spawn_client(client_code(IDLE_READER), daemon.socket, uid=NOBODY)
        procs.append(reader)
        wait_line(reader)
        if backpressure:
            w.wait_for_readers(1, timeout=10)
        time.sleep(0.2)  # past its spin
        cpu = _cpu_seconds(reader.pid)
        if platform.machine() == "x86_64":
            with open(f"/proc/{reader.pid}/syscall") as f:
                assert f.read().split()[0] == "202"  # blocked in futex(2)
        time.sleep(1.0)
        assert _cpu_seconds(reader.pid) - cpu < 0.05  # asleep, not spinning
        written = time.monotonic()
        w.write(b"ding")
        line = wait_line(reader, "GOT", timeout=10)
    _, woke, data = line.split()
    assert data == "ding"
    # its own sleep is 30 s: only the doorbell can have woken it this soon
    assert float(woke) - written < 5
    finish(reader)


CURSOR_READER = """
with Broker(SOCK) as b:
    r = Ring.open(b, "rings/bp", wait=10)
    print("READY", flush=True)
    sys.stdin.readline()
    r.close()
    print("CLOSED", flush=True)
    sys.stdin.readline()
"""


def test_closing_releases_the_leases_and_the_cursor(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    readers = "rings/bp/readers/"
    w = Ring.create(broker, "rings/bp", 4, 64, mode=0o644, backpressure=True)
    assert broker.stat("rings/bp").leases == 1
    reader = spawn_client(CURSOR_READER, daemon.socket, uid=NOBODY, stdin=subprocess.PIPE)
    procs.append(reader)
    wait_line(reader)
    assert w.wait_for_readers(1, timeout=10) == 1
    assert broker.stat("rings/bp").leases == 2  # the writer's, the reader's
    (cursor,) = broker.list(readers)
    assert cursor.owner_uid == NOBODY
    assert cursor.lifetime == "owner"
    assert cursor.leases == 2  # the reader's, and the writer's, which watches it

    assert reader.stdin is not None
    reader.stdin.write("close\n")
    reader.stdin.flush()
    wait_line(reader, "CLOSED")
    assert broker.stat("rings/bp").leases == 1
    assert list(broker.list(readers)) == []  # the daemon deleted the cursor
    time.sleep(w.refresh)
    w.write(b"x")  # a publish after the refresh interval forgets the cursor
    assert w.readers == 0

    w.close()
    with pytest.raises(FileNotFoundError):  # lifetime "owner": gone with the writer
        broker.stat("rings/bp")
    finish(reader)  # its stdin closes: it exits


STALLED_READER = """
with Broker(SOCK) as b, Ring.open(b, "rings/stall", wait=10) as r:
    print("READY", flush=True)
    time.sleep(60)
"""


def test_back_pressure_holds_the_writer_until_the_reader_dies(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    with Ring.create(broker, "rings/stall", 4, 64, mode=0o644, backpressure=True) as w:
        reader = spawn_client(STALLED_READER, daemon.socket, uid=NOBODY)
        procs.append(reader)
        wait_line(reader)
        w.wait_for_readers(1, timeout=10)
        for _ in range(4):
            w.write(b"m", timeout=1)
        with pytest.raises(TimeoutError):
            w.write(b"m", timeout=0.3)  # the reader still needs every slot
        reader.send_signal(signal.SIGKILL)
        reader.wait()
        w.write(b"m", timeout=10)  # its cursor went with it; the writer notices
        assert w.readers == 0


LONE_WRITER = """
with Broker(SOCK) as b, Ring.create(b, "rings/lone", 4, 64, mode=0o644) as w:
    for i in range(3):
        w.write(b"m%d" % i)
    print("READY", flush=True)
    time.sleep(60)
"""


def _read_in_short_waits(r: RingReader, total: float) -> bytes:
    """Reads of 0.3 s in a loop: their quiet time adds up for the writer check."""
    deadline = time.monotonic() + total
    while True:
        try:
            return r.read(timeout=0.3)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def test_a_reader_learns_that_the_writer_died(
    daemon: DaemonProc, broker: Broker, procs: list[subprocess.Popen[str]]
) -> None:
    writer = spawn_client(LONE_WRITER, daemon.socket)
    procs.append(writer)
    wait_line(writer)
    with Ring.open(broker, "rings/lone", start="oldest") as r:
        assert [r.read(timeout=5) for _ in range(3)] == [b"m0", b"m1", b"m2"]
        with pytest.raises(TimeoutError):
            r.read(timeout=1.5)  # a live writer that is quiet is not gone
        d = daemon
        d.stop()  # a daemon restart (the owner ring's name goes) is not the writer's end
        d.start()
        with pytest.raises(TimeoutError):
            r.read(timeout=2.5)
        writer.send_signal(signal.SIGKILL)
        stat = Path(f"/proc/{writer.pid}/stat")
        eventually(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")
        start = time.monotonic()
        with pytest.raises(RingWriterGoneError):  # a zombie has ended too
            _read_in_short_waits(r, 10)
        assert time.monotonic() - start < 10  # found within a few one-second checks
        writer.wait()
        with pytest.raises(RingClosedError):  # and it is a RingClosedError: loops end
            r.read(timeout=30)


# -- one process: the exact semantics, step by step -------------------------------


def test_a_view_overwritten_while_held_raises_on_release(broker: Broker) -> None:
    with Ring.create(broker, "rings/view", 4, 16) as w, Ring.open(broker, "rings/view") as r:
        w.write(b"m0")
        msg = r.next(timeout=1)
        assert (msg.seq, bytes(msg.view)) == (0, b"m0")
        for i in range(1, 5):
            w.write(b"m%d" % i)  # m4 goes into m0's slot
        with pytest.raises(RingOverrunError) as e:
            msg.release()
        assert (e.value.lost, e.value.seq, r.lost) == (1, 1, 1)
        with pytest.raises(ValueError, match="released"):
            msg.view[0]  # released: nobody reads the overwritten slot through it
        assert [r.read(timeout=0) for _ in range(4)] == [b"m1", b"m2", b"m3", b"m4"]
        with pytest.raises(TimeoutError):
            r.read(timeout=0)


def test_a_lapped_reader_skips_to_the_oldest_intact_message(broker: Broker) -> None:
    with Ring.create(broker, "rings/lap", 4, 16) as w, Ring.open(broker, "rings/lap") as r:
        for i in range(10):
            w.write(b"%d" % i)
        with pytest.raises(RingOverrunError) as e:
            r.read()
        assert (e.value.lost, r.seq) == (6, 6)  # 0-5 are gone, 6-9 are in the ring
        assert [r.read() for _ in range(4)] == [b"6", b"7", b"8", b"9"]
        assert r.lost == 6


def test_write_in_place_start_positions_and_end_of_stream(broker: Broker) -> None:
    with Ring.create(broker, "rings/api", 4, 32) as w:
        w.write(b"before")
        buf = w.reserve()
        assert (len(buf), buf.readonly) == (32, False)
        buf[:5] = b"hello"
        assert bytes(w.reserve()[:5]) == b"hello"  # the same slot again until published
        assert w.publish(5) == 1
        latest = Ring.open(broker, "rings/api")
        oldest = Ring.open(broker, "rings/api", start="oldest")
        assert (latest.seq, oldest.seq) == (2, 0)
        assert [oldest.read(), oldest.read()] == [b"before", b"hello"]
        w.write(b"last")
    # closed: both drain what was published, then hear the end
    for r in (latest, oldest):
        assert r.read(timeout=0) == b"last"
        with pytest.raises(RingClosedError):
            r.read(timeout=0)
        with pytest.raises(RingClosedError):
            r.next()
        r.close()


def test_misuse_is_refused(broker: Broker) -> None:
    with Ring.create(broker, "rings/misuse", 2, 8) as w, Ring.open(broker, "rings/misuse") as r:
        with pytest.raises(ValueError, match="does not fit"):
            w.write(b"123456789")
        with pytest.raises(RuntimeError):
            w.publish(1)  # nothing reserved
        w.write(b"12345678")
        small = bytearray(4)
        with pytest.raises(ValueError, match="buffer holds 4"):
            r.read_into(small)
        assert (small, r.seq) == (bytearray(4), 0)  # nothing read, nothing skipped
        msg = r.next()
        with pytest.raises(RuntimeError):
            r.next()
        msg.release()
        with pytest.raises(ValueError, match="backpressure"):
            w.wait_for_readers(1)
    with Ring.create(broker, "rings/taken", 1, 1), pytest.raises(FileExistsError):
        Ring.create(broker, "rings/taken", 1, 1)
    with broker.create("rings/plain", 4096) as plain:
        plain.buf[:10] = b"not a ring"
        with pytest.raises(ValueError, match="not a version 1 ring"):
            Ring.open(broker, "rings/plain")
    with pytest.raises(ValueError, match="at least one slot"):
        Ring.create(broker, "rings/empty", 0, 8)
