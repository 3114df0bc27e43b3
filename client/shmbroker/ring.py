"""A single-producer, many-reader ring of messages in a brokered segment.

In the producer::

    with Broker() as b, Ring.create(b, "camera/frames", 8, 1 << 20, mode=0o644) as ring:
        for frame in frames:
            ring.write(frame)               # one copy, into the next slot

In any number of consumers::

    with Broker() as b, Ring.open(b, "camera/frames", wait=5) as ring:
        while True:
            try:
                with ring.next(timeout=1) as view:  # the slot itself, read-only
                    use(view)
            except RingOverrunError as e:   # lapped: e.lost frames are gone
                log(e)

Strategy.  The daemon only brokers the segment; it is never on the data path.
One writer maps the ring read-write, every reader maps it read-only, so a
reader can never corrupt what the others see (the kernel refuses it: the
daemon sends readers an ``O_RDONLY`` fd).  Readers therefore cannot tell the
writer anything through the ring itself, which decides the rest:

* **Sequence numbers make every read checkable** (a seqlock per slot).
  Message ``s`` lives in slot ``s % slots``.  Before touching a slot the
  writer stores ``2s+1`` (odd: being written) in its header; when the bytes
  are in place it stores the length, then ``2s+2`` (even: message ``s``
  complete), then the published count.  A reader expecting ``s`` reads the
  slot's number: below ``2s+2`` means not yet written (wait), above means
  the writer has lapped it (overrun).  After copying (or when a zero-copy
  view is released) it reads the number again: if it changed, the writer
  started overwriting the slot meanwhile, the copy may be torn, and the
  reader reports an overrun instead of the bytes.  A torn message never
  surfaces as data.
* **Lossy by default, counted exactly.**  The writer never waits for readers
  (a slow or dead reader cannot stall a broadcast).  A lapped reader skips
  to the oldest message that may still be intact and raises
  :class:`RingOverrunError` with the number of messages it lost, so that
  every sequence number is either delivered or counted lost, once.
* **Optional back-pressure through per-reader cursor segments.**  With
  ``backpressure=True`` each reader creates its own tiny read-write segment,
  ``<ring>/readers/<ring nonce>/<random>`` (lifetime ``owner``, so the
  daemon deletes it when the reader closes or dies), and stores there the
  next sequence number it wants.  The writer finds cursors by ``list``-ing
  that prefix (at :meth:`RingWriter.wait_for_readers`, every ``refresh``
  seconds while publishing, and while blocked), maps each read-only, and
  before reusing a slot waits until every known reader is done with it.  A
  reader the writer has not yet found is lossy until it is found; a reader
  that died stalls the writer only until the next refresh sees its cursor
  gone, but a live reader that stops reading stalls it for good (writes then
  time out): use back-pressure with readers you trust to keep up.  The nonce
  in the name keeps readers of an older ring of the same name from holding
  up a new one.
* **A futex doorbell.**  A reader that finds nothing polls for ``spin``
  seconds (yielding the CPU at each turn, so that on a busy machine the
  writer it waits for gets to run), then sleeps in ``FUTEX_WAIT`` on the low
  32 bits of the published-count word (which also carries the closed bit).
  Shared (non-private) futexes on a ``MAP_SHARED`` file mapping are keyed by
  the file's page and offset, so they work across processes whatever the
  mapping addresses, and ``FUTEX_WAIT`` only reads the word, so it works on
  the read-only mapping (both checked by the tests).  On a lossy ring the
  writer does ``FUTEX_WAKE`` after every publish (about 1-2 us), since its
  readers cannot say whether they sleep; on a back-pressure ring a reader
  sets a word of its cursor while it sleeps and the writer rings only if a
  known reader's word is set (a reader the writer has not found yet may wake
  up to ``refresh`` s late).  Close always rings.
  A writer held up by a reader polls the same way, then writes in line 2 of
  the ring the cursor value that frees about half the ring and sleeps on
  that reader's cursor word; the reader wakes it when its cursor reaches
  that value.  So when the writer is the faster side it is woken once per
  half ring, not once per message, and a reader that keeps up makes no
  system call at all.  Every sleep is bounded (1 s for readers, ``refresh``
  for the writer) as a safety net for a wake that races a sleep (each side
  stores its flag and then reads the other's word, which x86-64 may reorder;
  the kernel re-reads the futex word behind a barrier, which closes that
  window in practice); the protocol does not rely on the bound.  On an
  architecture without a known futex syscall number the sleep is a 1 ms
  poll.
* **A writer that dies.**  The header names the writer's process: its pid,
  start time and pid namespace.  A reader that has waited a second for a
  message (in one call or over several short ones) asks the kernel
  (``kill(pid, 0)``, then ``/proc/<pid>/stat`` when visible; again every
  second it keeps waiting; nothing goes to the daemon); if that process has
  ended (or the pid is another process's now), and nothing was published
  meanwhile, the reader, having read everything published, gets
  :class:`RingWriterGoneError` (a :class:`RingClosedError`, so read loops
  end the same way).  A daemon restart changes nothing to it.  A reader
  that gets messages at least once a second never looks; one in another
  pid namespace than the writer's cannot tell and sees only the close.
* **Memory ordering.**  Python has no atomics.  Every control word is an
  8-byte aligned ``uint64`` read or written through a ``memoryview`` cast to
  ``"Q"``: CPython compiles that to one aligned 8-byte load or store, which
  is single-copy atomic on x86-64 and aarch64.  The seqlock also needs the
  writer's stores to become visible in program order and the reader's loads
  to happen in program order.  x86-64 (TSO) guarantees both.  On weakly
  ordered CPUs (aarch64) it is not guaranteed by the architecture; there the
  many instructions and calls between the data copy and the control stores
  make reordering across them practically impossible, but this module does
  not claim it is proven there.  Words are little-endian (the futex word is
  the low half of a ``uint64``), so the ring refuses big-endian machines.
* **One copy per message.**  ``RingWriter.write`` copies the message into the
  slot (``reserve``/``publish`` lets the producer build it in place instead);
  ``RingReader.read_into`` copies it into the caller's buffer, and
  ``RingReader.next`` gives a read-only view of the slot with no copy at all,
  valid until released (its release is the second seqlock check).

Layout (all fields ``uint64``, little-endian; lines are 64 bytes):

=======================  ==================================================
line 0                   magic, version, flags (bit 0: back-pressure),
                         slots, slot_size, stride, data_offset, nonce
line 1                   published count << 1 | closed (the doorbell word)
line 2                   the cursor value a sleeping writer waits for, or 0
line 3 + i               slot ``i``: sequence word, message length
``data_offset`` (page    slot ``i`` data at ``data_offset + i * stride``;
aligned)                 ``stride`` is ``slot_size`` rounded up to 64
=======================  ==================================================

A cursor segment is 64 bytes: word 0 is the reader's next sequence number
plus one; 0 (just created, start not chosen yet) holds every slot, so that
the reader's start is safe whenever the writer finds it; ``2**64 - 1`` is a
reader that closed.  Word 1 is 1 while the reader sleeps on the doorbell.
:meth:`RingWriter.wait_for_readers` counts readers that have chosen their
start.

Writers and readers are not thread-safe; use one per thread.  They need the
blocking :class:`~shmbroker.Broker` (an asyncio program can run a ring in a
thread).  A reader notices a writer whose process ended without closing (see
"A writer that dies" above), not one that is still running but dropped the
ring without closing it, nor one it cannot see (another pid namespace); for
those it waits, up to its timeout.  The writer is the process that created
the ring: a writer handed to a forked child is reported gone once its
creator exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import secrets
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from . import wire
from ._params import Backing, Lifetime
from .segment import Segment

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._sync import Broker

__all__ = [
    "Message",
    "Ring",
    "RingClosedError",
    "RingOverrunError",
    "RingReader",
    "RingWriter",
    "RingWriterGoneError",
]

MAGIC = int.from_bytes(b"shmring\x01", "little")
VERSION = 1
LINE = 64
PAGE = 4096
FLAG_BACKPRESSURE = 1
CURSOR_SIZE = LINE
DETACHED = 2**64 - 1

# word indexes (uint64) in the header
_MAGIC, _VERSION, _FLAGS, _SLOTS, _SLOT_SIZE, _STRIDE, _DATA_OFFSET, _NONCE = range(8)
_STATE = LINE // 8  # published << 1 | closed
# the writer, for readers to tell whether it still runs: pid, its start time
# (clock ticks after boot, so a reused pid is told apart), its pid namespace
# (a pid means nothing in another one); 0: unknown
_WRITER_PID, _WRITER_START, _WRITER_PIDNS = _STATE + 1, _STATE + 2, _STATE + 3
_WAITING = 2 * LINE // 8  # the cursor value a sleeping writer waits for (0: none)
_SLOT0 = 3 * LINE // 8  # slot i: seq at _SLOT0 + 8 i, length right after
_SLOT_WORDS = LINE // 8

_READER_WAIT = 1.0  # longest single futex sleep of a reader (a safety net)
_MAX_NAME = wire.MAX_NAME - len("/readers/") - 16 - 1 - 16


def _own_identity() -> tuple[int, int] | None:
    """``(start time, pid namespace)`` of this process, None if ``/proc`` cannot say.

    ``/proc`` may be another pid namespace's (``unshare -p`` without a new
    ``/proc``): then its ``self`` is not this process, and nothing is said.
    """
    try:
        fields = _stat_fields("self")
        if int(fields[0]) != os.getpid():
            return None
        return int(fields[21]), os.stat("/proc/self/ns/pid").st_ino
    except (OSError, IndexError, ValueError):
        return None


def _has_ended(pid: int, start: int) -> bool:
    """Has process ``pid``, started at ``start``, ended?  False when it cannot be told.

    ``kill(pid, 0)`` says whether the pid exists at all (``/proc`` may hide
    other users' processes); ``/proc/<pid>/stat``, when readable, tells a
    zombie and a reused pid apart.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, someone else's
    try:
        fields = _stat_fields(str(pid))
        return fields[2] in (b"Z", b"X") or int(fields[21]) != start
    except (OSError, IndexError, ValueError):
        return False  # hidden: it exists, that is all one can tell


def _stat_fields(pid: str) -> list[bytes]:
    """``/proc/<pid>/stat`` split into fields, the command name kept whole."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    head, _, rest = data.rpartition(b")")
    return [head.split(b" (", 1)[0], b"", *rest.split()]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _layout(slots: int, slot_size: int) -> tuple[int, int, int]:
    """``(stride, data_offset, total size)`` of a ring."""
    stride = _round_up(slot_size, LINE)
    data_offset = _round_up((3 + slots) * LINE, PAGE)
    return stride, data_offset, data_offset + slots * stride


# -- the futex doorbell ----------------------------------------------------------

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT = 0  # not FUTEX_PRIVATE_FLAG: waiters and wakers are other processes
_FUTEX_WAKE = 1
_WAKE_ALL = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _PyBuffer(ctypes.Structure):  # CPython's Py_buffer, stable since 3.0
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


if _SYS_FUTEX is not None and sys.platform == "linux":
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.POINTER(_Timespec),
        ctypes.c_void_p,
        ctypes.c_uint32,
    ]
    HAVE_FUTEX = True
else:  # pragma: no cover - no known futex number: poll
    HAVE_FUTEX = False


def _futex_wait(addr: int, value: int, timeout: float) -> None:
    """Sleep while the 32-bit word at ``addr`` holds ``value``, at most ``timeout`` s.

    Returns early on a wake, a changed value, or a signal; callers re-check.
    """
    if not HAVE_FUTEX:  # pragma: no cover
        time.sleep(min(timeout, 0.001))
        return
    timeout = max(timeout, 0.0)
    sec = int(timeout)
    ts = _Timespec(sec, int((timeout - sec) * 1e9))
    _syscall(_SYS_FUTEX, addr, _FUTEX_WAIT, value & 0xFFFFFFFF, ts, None, 0)


def _futex_wake(addr: int, n: int = _WAKE_ALL) -> None:
    if HAVE_FUTEX:
        _syscall(_SYS_FUTEX, addr, _FUTEX_WAKE, n, None, None, 0)


def _address(view: memoryview) -> int:
    """The address of the first byte of ``view`` (read-only views too)."""
    pybuf = _PyBuffer()
    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    if get(ctypes.py_object(view), ctypes.byref(pybuf), 0) != 0:  # pragma: no cover
        raise BufferError("cannot get the buffer's address")
    try:
        return int(pybuf.buf)
    finally:
        release(ctypes.byref(pybuf))


# -- errors --------------------------------------------------------------------


class RingOverrunError(Exception):
    """The writer lapped this reader: ``lost`` messages are gone.

    The reader has already moved past them: the next read returns the oldest
    message that may still be intact (or reports a further overrun).  When
    raised by a zero-copy :class:`Message` release, the bytes seen through
    its view may have been torn: discard whatever was read from them.
    """

    def __init__(self, lost: int, seq: int) -> None:
        super().__init__(f"reader overrun: {lost} message(s) lost, next is {seq}")
        self.lost = lost
        #: the sequence number the reader will read next
        self.seq = seq


class RingClosedError(EOFError):
    """The writer closed the ring and every message it published was read."""


class RingWriterGoneError(RingClosedError):
    """The writer went without closing (it died), and every message it published was read.

    Seen by a reader that finds nothing to read, in the writer's pid
    namespace (the ring's header names the writer's process).
    """


# -- the ring --------------------------------------------------------------------


class Ring:
    """What writers and readers share: the segment and its layout.

    Make one with :meth:`create` (a :class:`RingWriter`) or :meth:`open` (a
    :class:`RingReader`).
    """

    slots: int
    slot_size: int

    def __init__(self, segment: Segment) -> None:
        if segment.size < 3 * LINE:
            raise ValueError(f"segment {segment.name!r} is too small to be a ring")
        self.segment = segment
        self._closed = False
        self._buf: memoryview = segment.buf
        self._q: memoryview = self._buf[:LINE].cast("Q")  # replaced once the layout is known
        self._state_addr = 0

    def _bind(self) -> None:
        """Views of the header, once its layout fields are known."""
        q = self._q
        self.slots = int(q[_SLOTS])
        self.slot_size = int(q[_SLOT_SIZE])
        self._stride = int(q[_STRIDE])
        self._data_offset = int(q[_DATA_OFFSET])
        self._nonce = int(q[_NONCE])
        self._backpressure = bool(q[_FLAGS] & FLAG_BACKPRESSURE)
        q.release()
        self._q = self._buf[: (3 + self.slots) * LINE].cast("Q")
        self._state_addr = _address(self._buf[_STATE * 8 : _STATE * 8 + 8])

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def backpressure(self) -> bool:
        return self._backpressure

    @property
    def closed(self) -> bool:
        return self._closed

    def _cursor_prefix(self) -> str:
        return f"{self.name}/readers/{self._nonce:016x}/"

    def _release_views(self) -> None:
        self._closed = True
        self._q.release()

    @classmethod
    def create(
        cls,
        broker: Broker,
        name: str,
        slots: int,
        slot_size: int,
        *,
        mode: int = 0o600,
        lifetime: Lifetime = "owner",
        ttl: float | None = None,
        backpressure: bool = False,
        backing: Backing = "shm",
        refresh: float = 0.1,
        spin: float = 100e-6,
    ) -> RingWriter:
        """Create the ring's segment and return its (only) writer.

        ``mode`` must grant readers ``r`` (for example ``0o644``); the default
        lifetime ``owner`` deletes the ring when the writer closes (readers
        keep their mappings and drain what is left).  With ``backpressure``
        the writer waits for the readers it knows (see the module
        docstring); ``refresh`` is how often, in seconds, it looks for
        readers that came or went.  ``spin`` is how long a blocked writer
        polls before it sleeps.

        Raises ``ValueError`` for a bad shape, and what :meth:`Broker.create`
        raises (``FileExistsError`` if the name is taken, ...).
        """
        if slots < 1 or slot_size < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        if backpressure and len(name.encode()) > _MAX_NAME:
            raise ValueError(f"a back-pressure ring's name must be at most {_MAX_NAME} bytes")
        if sys.byteorder != "little":  # pragma: no cover
            raise OSError("shmbroker rings need a little-endian machine")
        stride, data_offset, size = _layout(slots, slot_size)
        seg = broker.create(
            name, size, lifetime=lifetime, ttl=ttl, mode=mode, backing=backing, exist_ok=False
        )
        try:
            q = seg.buf[:LINE].cast("Q")
            q[_VERSION] = VERSION
            q[_FLAGS] = FLAG_BACKPRESSURE if backpressure else 0
            q[_SLOTS] = slots
            q[_SLOT_SIZE] = slot_size
            q[_STRIDE] = stride
            q[_DATA_OFFSET] = data_offset
            q[_NONCE] = secrets.randbits(64)
            me = _own_identity()
            if me is not None:  # else 0: readers will not tell whether it runs
                state = seg.buf[LINE : 2 * LINE].cast("Q")
                state[_WRITER_PID - _STATE] = os.getpid()
                state[_WRITER_START - _STATE], state[_WRITER_PIDNS - _STATE] = me
                state.release()
            q[_MAGIC] = MAGIC  # last: a reader that sees it sees the rest
            q.release()
            return RingWriter(broker, seg, refresh=refresh, spin=spin)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def open(
        cls,
        broker: Broker,
        name: str,
        *,
        wait: float | None = None,
        start: Literal["latest", "oldest"] = "latest",
        cursor_mode: int = 0o644,
        spin: float = 100e-6,
    ) -> RingReader:
        """Map the ring read-only and return a reader.

        ``wait`` is passed to :meth:`Broker.open` (wait that long for the ring
        to be created).  ``start="latest"`` reads from the next message
        published; ``"oldest"`` from the oldest message still in the ring.
        On a back-pressure ring the reader creates its cursor segment, with
        ``cursor_mode`` (the writer's uid needs ``r`` on it).  ``spin`` is how
        long a reader polls before it sleeps on the doorbell.

        Raises ``ValueError`` if the segment is not a ring of this version,
        and what :meth:`Broker.open` and :meth:`Broker.create` raise.
        """
        seg = broker.open(name, "ro", wait=wait)
        try:
            return RingReader(broker, seg, start=start, cursor_mode=cursor_mode, spin=spin)
        except BaseException:
            seg.close()
            raise

    def __enter__(self) -> Ring:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class _Cursor:
    """A reader's cursor segment as the writer sees it (read-only)."""

    __slots__ = ("addr", "segment", "words")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.words = segment.buf[:16].cast("Q")  # next seq + 1, sleeping
        self.addr = _address(segment.buf[:8])

    def close(self) -> None:
        self.words.release()
        self.segment.close()


class RingWriter(Ring):
    """The ring's one writer.  Use as a context manager, or call :meth:`close`.

    ``seq`` is the sequence number the next message will get.
    """

    def __init__(self, broker: Broker, segment: Segment, *, refresh: float, spin: float) -> None:
        super().__init__(segment)
        self._broker = broker
        self._bind()
        self.refresh = refresh
        self.spin = spin
        self.seq = 0
        self._reserved = False
        self._cursors: dict[str, _Cursor] = {}
        self._cursor_list: list[_Cursor] = []  # the same, for the hot path
        self._refreshed = time.monotonic()

    @property
    def readers(self) -> int:
        """How many back-pressure readers the writer knows of (0 on a lossy ring)."""
        return len(self._cursors)

    def reserve(self, timeout: float | None = None) -> memoryview:
        """A writable view of the next slot (``slot_size`` bytes), for :meth:`publish`.

        From here on the slot's previous message is gone for readers.  Calling
        it again before :meth:`publish` returns the same slot.  With
        back-pressure it first waits until every known reader is done with
        the slot; ``TimeoutError`` after ``timeout`` seconds.
        """
        off = self._claim(timeout)
        return self._buf[off : off + self.slot_size]

    def _claim(self, timeout: float | None) -> int:
        """Mark the next slot as being written (after waiting for room); its offset."""
        if self._closed:
            raise ValueError("ring writer is closed")
        s = self.seq
        slot = s % self.slots
        if not self._reserved:
            if self._cursors:
                self._make_room(s, timeout)
            self._q[_SLOT0 + slot * _SLOT_WORDS] = 2 * s + 1
            self._reserved = True
        return self._data_offset + slot * self._stride

    def publish(self, length: int) -> int:
        """Publish the first ``length`` bytes of the reserved slot; return its sequence number."""
        if not self._reserved:
            raise RuntimeError("publish() without reserve()")
        if not 0 <= length <= self.slot_size:
            raise ValueError(f"length {length} is not within 0..{self.slot_size}")
        q = self._q
        s = self.seq
        i = _SLOT0 + (s % self.slots) * _SLOT_WORDS
        q[i + 1] = length
        q[i] = 2 * s + 2
        self.seq = s + 1
        self._reserved = False
        q[_STATE] = (s + 1) << 1
        if not self._backpressure:
            _futex_wake(self._state_addr)  # readers cannot say whether they sleep
            return s
        if time.monotonic() - self._refreshed >= self.refresh:
            self._refresh_quietly()  # first, so that a new reader's sleep is seen
        for cur in self._cursor_list:
            if cur.words[1]:
                _futex_wake(self._state_addr)
                break
        return s

    def write(self, data: Buffer, timeout: float | None = None) -> int:
        """Copy ``data`` into the next slot and publish it; return its sequence number.

        Raises ``ValueError`` if it is longer than ``slot_size``, and
        ``TimeoutError`` as :meth:`reserve` does.
        """
        src = memoryview(data)
        if src.ndim != 1 or src.format != "B":
            src = src.cast("B")
        n = src.nbytes
        if n > self.slot_size:
            raise ValueError(f"message of {n} bytes does not fit a {self.slot_size}-byte slot")
        off = self._claim(timeout)
        self._buf[off : off + n] = src
        return self.publish(n)

    def wait_for_readers(self, n: int = 1, timeout: float | None = None) -> int:
        """Block until the writer knows ``n`` back-pressure readers; return how many.

        Use it before the first write when the first messages must reach
        readers that are starting.  ``TimeoutError`` after ``timeout`` s.
        """
        if not self._backpressure:
            raise ValueError("wait_for_readers() needs a ring created with backpressure=True")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while True:
            self._refresh()
            started = sum(1 for cur in self._cursors.values() if cur.words[0])
            if started >= n:
                return started
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{started} of {n} readers after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- back-pressure ---------------------------------------------------------

    def _blocker(self, s: int) -> _Cursor | None:
        """A known reader not done with the message that ``s`` overwrites."""
        limit = s + 1 - self.slots
        for cur in self._cursor_list:
            if cur.words[0] <= limit:  # 0, a reader about to start, holds every slot
                return cur
        return None

    def _make_room(self, s: int, timeout: float | None) -> None:
        blocker = self._blocker(s)
        if blocker is None:
            return
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_end = now + self.spin
        q = self._q
        # Asleep, wait until the reader has freed about half the ring, so that a
        # reader that keeps up wakes the writer once per half ring, not per message.
        need = s + 2 - self.slots + max(0, self.slots // 2 - 1)
        try:
            while blocker is not None:
                now = time.monotonic()
                if now - self._refreshed >= self.refresh:
                    self._refresh_quietly()  # a dead reader's cursor is gone by now
                elif deadline is not None and now >= deadline:
                    raise TimeoutError(f"a reader held up message {s} for {timeout} s")
                elif now < spin_end:
                    os.sched_yield()
                else:
                    q[_WAITING] = need
                    p = blocker.words[0]
                    if p <= s + 1 - self.slots:  # checked after the flag: no lost wake
                        wait = self._refreshed + self.refresh - now
                        if deadline is not None:
                            wait = min(wait, deadline - now)
                        _futex_wait(blocker.addr, p, wait)
                blocker = self._blocker(s)
        finally:
            if q[_WAITING]:
                q[_WAITING] = 0

    def _refresh(self) -> None:
        """Match the known cursors with the cursor segments that exist now."""
        self._refreshed = time.monotonic()
        present = {info.name: info.id for info in self._broker.list(self._cursor_prefix())}
        try:
            for name, cur in list(self._cursors.items()):
                if present.get(name) != cur.segment.id:
                    del self._cursors[name]
                    cur.close()
            for name in present.keys() - self._cursors.keys():
                try:
                    seg = self._broker.open(name, "ro")
                except (FileNotFoundError, PermissionError):
                    continue  # gone meanwhile, or not ours to read
                if seg.size < 16:
                    seg.close()
                    continue
                self._cursors[name] = _Cursor(seg)
        finally:
            self._cursor_list = list(self._cursors.values())

    def _refresh_quietly(self) -> None:
        """A periodic refresh: a broker hiccup keeps the readers we know."""
        try:
            self._refresh()
        except OSError:  # ConnectionError, or the daemon refused
            self._refreshed = time.monotonic()

    def close(self) -> None:
        """Mark the ring closed (readers drain it, then get :class:`RingClosedError`),
        stop tracking readers, release the lease."""
        if self.closed:
            return
        self._q[_STATE] = (self.seq << 1) | 1
        _futex_wake(self._state_addr)
        for cur in self._cursor_list:
            with contextlib.suppress(OSError):
                cur.close()
        self._cursors.clear()
        self._cursor_list = []
        self._release_views()
        self.segment.close()

    def __enter__(self) -> RingWriter:
        return self

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"seq={self.seq}"
        return f"<RingWriter {self.name!r} {self.slots}x{self.slot_size} {state}>"


class Message:
    """One message, seen in place through a read-only view; a context manager.

    ``with reader.next() as view:`` gives ``view`` (a ``memoryview`` of the
    message's bytes in the slot); leaving the block releases it and checks
    that the writer did not overwrite the slot meanwhile, raising
    :class:`RingOverrunError` if it did (unless the block raised).  Until
    then the reader does not move on, and on a back-pressure ring the writer
    does not reuse the slot.  Whatever was made from the view and outlives
    the block (a numpy array over it, say) still reads the live slot: the
    check covers what was read before the release, no more.
    """

    __slots__ = ("_reader", "seq", "view")

    def __init__(self, reader: RingReader, seq: int, view: memoryview) -> None:
        self._reader = reader
        #: the message's sequence number
        self.seq = seq
        self.view = view

    def release(self) -> None:
        """Release the view and move the reader on; ``RingOverrunError`` if torn."""
        self._reader._finish(self)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if e is None:
            self.release()
        else:
            with contextlib.suppress(RingOverrunError):
                self.release()

    def __len__(self) -> int:
        return self.view.nbytes


class RingReader(Ring):
    """One reader of a ring.  Use as a context manager, or call :meth:`close`.

    ``seq`` is the sequence number it reads next, ``lost`` how many messages
    it lost to overruns so far.
    """

    def __init__(
        self,
        broker: Broker,
        segment: Segment,
        *,
        start: Literal["latest", "oldest"],
        cursor_mode: int,
        spin: float,
    ) -> None:
        super().__init__(segment)
        self.spin = spin
        self.lost = 0
        self.seq = 0
        # since when no message came, for the writer check (across calls)
        self._quiet_seq = -1
        self._quiet_since = 0.0
        self._current: Message | None = None
        self._cursor: Segment | None = None
        self._cursor_words: memoryview | None = None
        self._cursor_addr = 0
        try:
            self._wait_magic()
            self._bind()
            if self._backpressure:  # the cursor first: from when the writer sees it, it waits
                token = secrets.token_hex(8)
                self._cursor = broker.create(
                    self._cursor_prefix() + token, CURSOR_SIZE, lifetime="owner", mode=cursor_mode
                )
                self._cursor_words = self._cursor.buf[:16].cast("Q")
                self._cursor_addr = _address(self._cursor.buf[:8])
            published = self._q[_STATE] >> 1
            self.seq = published if start == "latest" else max(0, published - self.slots + 1)
            self._advance(self.seq)
        except BaseException:
            self._detach()
            self._release_views()
            raise

    def _wait_magic(self, timeout: float = 2.0) -> None:
        """The writer fills the header just after creating the segment: allow for it."""
        deadline = time.monotonic() + timeout
        q = self._q
        while q[_MAGIC] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        if self.segment.size < LINE or q[_MAGIC] != MAGIC or q[_VERSION] != VERSION:
            raise ValueError(f"segment {self.name!r} is not a version {VERSION} ring")
        slots, slot_size, stride = int(q[_SLOTS]), int(q[_SLOT_SIZE]), int(q[_STRIDE])
        data_offset = int(q[_DATA_OFFSET])
        if (
            slots < 1
            or slot_size < 1
            or stride < slot_size
            or data_offset < (3 + slots) * LINE
            or data_offset + slots * stride > self.segment.size
        ):
            raise ValueError(f"segment {self.name!r} has an inconsistent ring header")

    # -- reading -----------------------------------------------------------------

    def _wait(self, s: int, timeout: float | None) -> None:
        """Return once message ``s`` is complete in its slot.

        Raises ``RingOverrunError`` if the writer lapped it,
        ``RingClosedError`` if the ring is closed before it,
        ``RingWriterGoneError`` if the writer went without closing,
        ``TimeoutError``.
        """
        q = self._q
        i = _SLOT0 + (s % self.slots) * _SLOT_WORDS
        want = 2 * s + 2
        deadline: float | None = None
        spin_end = 0.0
        while True:
            v = q[i]
            if v == want:
                return
            if v > want:
                self._overrun(s)
            state = q[_STATE]
            if state >> 1 > s:  # published meanwhile: the slot was stored before the count
                if q[i] < want:  # only a broken writer gets here; do not spin on it
                    self._overrun(s)
                continue
            if state & 1:
                raise RingClosedError(f"ring {self.name!r} is closed")
            now = time.monotonic()
            if not spin_end:
                spin_end = now + self.spin
                deadline = None if timeout is None else now + timeout
                if s != self._quiet_seq:  # a message came since the last wait
                    self._quiet_seq, self._quiet_since = s, now
            elif now - self._quiet_since >= _READER_WAIT:  # a second without a message
                self._quiet_since = now  # (short reads in a loop add up to it too)
                if self._writer_gone() and self._q[_STATE] == state:  # nothing came meanwhile
                    raise RingWriterGoneError(f"the writer of {self.name!r} went without closing")
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no message on {self.name!r} within {timeout} s")
            if now < spin_end:
                os.sched_yield()
                continue
            wait = _READER_WAIT if deadline is None else min(deadline - now, _READER_WAIT)
            words = self._cursor_words
            if words is None:
                _futex_wait(self._state_addr, state, wait)
            else:  # a back-pressure writer rings only if a reader says it sleeps
                words[1] = 1
                if q[_STATE] == state:  # read after the flag: no lost wake
                    _futex_wait(self._state_addr, state, wait)
                words[1] = 0

    def _writer_gone(self) -> bool:
        """Has the writer's process ended?  (Asked once a second of waiting.)

        From the ring's header: its pid, start time and pid namespace.  A
        writer in another pid namespace, or of an older ring without them,
        cannot be checked: never reported gone.
        """
        pid = int(self._q[_WRITER_PID])
        if not pid:
            return False
        mine = _own_identity()
        if mine is None or mine[1] != self._q[_WRITER_PIDNS]:
            return False
        return _has_ended(pid, int(self._q[_WRITER_START]))

    def _overrun(self, s: int) -> None:
        """Skip to the oldest message that may be intact; raise ``RingOverrunError``."""
        published = self._q[_STATE] >> 1
        new = max(s + 1, published - self.slots)
        self.lost += new - s
        self._advance(new)
        raise RingOverrunError(new - s, new)

    def _advance(self, seq: int) -> None:
        self.seq = seq
        words = self._cursor_words
        if words is not None:
            before = words[0]
            words[0] = seq + 1
            need = self._q[_WAITING]
            if need and before < need <= seq + 1:  # the writer waits for this step
                _futex_wake(self._cursor_addr, 1)

    def _check_current(self) -> None:
        if self._current is not None:
            raise RuntimeError("release the previous message first")
        if self.closed:
            raise ValueError("ring reader is closed")

    def next(self, timeout: float | None = None) -> Message:
        """The next message, in place (no copy); see :class:`Message`.

        Waits up to ``timeout`` seconds (``None``: forever, ``0``: do not
        wait).  Raises :class:`RingOverrunError` if messages were lost,
        :class:`RingClosedError` once the writer closed and all is read
        (:class:`RingWriterGoneError`, a subclass, if it died without closing),
        ``TimeoutError``, and ``RuntimeError`` if the previous message is
        not released yet.
        """
        self._check_current()
        s = self.seq
        slot = s % self.slots
        i = _SLOT0 + slot * _SLOT_WORDS
        q = self._q
        if q[i] != 2 * s + 2:
            self._wait(s, timeout)
        n = min(q[i + 1], self.slot_size)  # a torn length is caught by the release
        off = self._data_offset + slot * self._stride
        msg = Message(self, s, self._buf[off : off + n])
        self._current = msg
        return msg

    def _finish(self, msg: Message) -> None:
        if self._current is not msg:
            return
        self._current = None
        with contextlib.suppress(BufferError):  # the caller still exports it: theirs now
            msg.view.release()
        s = msg.seq
        if self._q[_SLOT0 + (s % self.slots) * _SLOT_WORDS] != 2 * s + 2:
            self._overrun(s)
        self._advance(s + 1)

    def read_into(self, buffer: Buffer, timeout: float | None = None) -> int:
        """Copy the next message into ``buffer``; return its length.

        Raises ``ValueError`` (and reads nothing) if it does not fit; otherwise
        as :meth:`next`.
        """
        self._check_current()
        dst = memoryview(buffer)
        if dst.ndim != 1 or dst.format != "B":
            dst = dst.cast("B")
        s = self.seq
        slot = s % self.slots
        i = _SLOT0 + slot * _SLOT_WORDS
        want = 2 * s + 2
        q = self._q
        if q[i] != want:
            self._wait(s, timeout)
        n = q[i + 1]
        if n > dst.nbytes:
            if n > self.slot_size or q[i] != want:  # a length torn by an overwrite
                self._overrun(s)
            raise ValueError(f"message {s} has {n} bytes; the buffer holds {dst.nbytes}")
        off = self._data_offset + slot * self._stride
        dst[:n] = self._buf[off : off + n]
        if q[i] != want:
            self._overrun(s)
        self._advance(s + 1)
        return n

    def read(self, timeout: float | None = None) -> bytes:
        """The next message as ``bytes`` (a copy); raises as :meth:`next`."""
        with self.next(timeout) as view:
            return bytes(view)

    def close(self) -> None:
        """Release the lease; on a back-pressure ring, detach and delete the cursor."""
        if self.closed:
            return
        if self._current is not None:
            with contextlib.suppress(RingOverrunError):
                self._current.release()
        self._detach()
        self._release_views()
        self.segment.close()

    def _detach(self) -> None:
        """Tell the writer not to wait for us any more; delete the cursor."""
        if self._cursor_words is not None:
            self._cursor_words[0] = DETACHED
            _futex_wake(self._cursor_addr, 1)
            self._cursor_words.release()
            self._cursor_words = None
        if self._cursor is not None:
            with contextlib.suppress(OSError):
                self._cursor.close()
            self._cursor = None

    def __enter__(self) -> RingReader:
        return self

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"seq={self.seq} lost={self.lost}"
        return f"<RingReader {self.name!r} {state}>"
