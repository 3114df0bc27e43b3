"""A ring's readers: :class:`RingReader`, and :class:`Message`, a message seen in place."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from ..segment import Segment
from .base import Ring
from .errors import RingClosedError, RingOverrunError, RingWriterGoneError
from .futex import address, futex_wait, futex_wake
from .layout import (
    CURSOR_SIZE,
    DETACHED,
    SLOT_WORDS,
    VERSION,
    W_MAGIC,
    W_SLOT0,
    W_STATE,
    W_WAITING,
    W_WRITER_PID,
    W_WRITER_PIDNS,
    W_WRITER_START,
    is_consistent,
    is_ring,
    read_header,
    resume_after_overrun,
    start_seq,
)
from .liveness import writer_gone

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .._sync import Broker

__all__ = ["Message", "RingReader"]

_READER_WAIT = 1.0  # longest single futex sleep of a reader (a safety net)


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
                self._cursor_addr = address(self._cursor.buf[:8])
            self.seq = start_seq(self._q[W_STATE] >> 1, self.slots, start)
            self._advance(self.seq)
        except BaseException:
            self._detach()
            self._release_views()
            raise

    def _wait_magic(self, timeout: float = 2.0) -> None:
        """The writer fills the header just after creating the segment: allow for it."""
        deadline = time.monotonic() + timeout
        q = self._q
        while q[W_MAGIC] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        if not is_ring(q, self.segment.size):
            raise ValueError(f"segment {self.name!r} is not a version {VERSION} ring")
        if not is_consistent(read_header(q), self.segment.size):
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
        i = W_SLOT0 + (s % self.slots) * SLOT_WORDS
        want = 2 * s + 2
        deadline: float | None = None
        spin_end = 0.0
        while True:
            v = q[i]
            if v == want:
                return
            if v > want:
                self._overrun(s)
            state = q[W_STATE]
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
                if self._writer_gone() and self._q[W_STATE] == state:  # nothing came meanwhile
                    raise RingWriterGoneError(f"the writer of {self.name!r} went without closing")
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no message on {self.name!r} within {timeout} s")
            if now < spin_end:
                os.sched_yield()
                continue
            wait = _READER_WAIT if deadline is None else min(deadline - now, _READER_WAIT)
            words = self._cursor_words
            if words is None:
                futex_wait(self._state_addr, state, wait)
            else:  # a back-pressure writer rings only if a reader says it sleeps
                words[1] = 1
                if q[W_STATE] == state:  # read after the flag: no lost wake
                    futex_wait(self._state_addr, state, wait)
                words[1] = 0

    def _writer_gone(self) -> bool:
        """Has the writer's process ended?  (Asked once a second of waiting.)

        From the ring's header: its pid, start time and pid namespace.  A
        writer in another pid namespace, or of an older ring without them,
        cannot be checked: never reported gone.
        """
        q = self._q
        return writer_gone(int(q[W_WRITER_PID]), int(q[W_WRITER_START]), int(q[W_WRITER_PIDNS]))

    def _overrun(self, s: int) -> None:
        """Skip to the oldest message that may be intact; raise ``RingOverrunError``."""
        new = resume_after_overrun(s, self._q[W_STATE] >> 1, self.slots)
        self.lost += new - s
        self._advance(new)
        raise RingOverrunError(new - s, new)

    def _advance(self, seq: int) -> None:
        self.seq = seq
        words = self._cursor_words
        if words is not None:
            before = words[0]
            words[0] = seq + 1
            need = self._q[W_WAITING]
            if need and before < need <= seq + 1:  # the writer waits for this step
                futex_wake(self._cursor_addr, 1)

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
        i = W_SLOT0 + slot * SLOT_WORDS
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
        if self._q[W_SLOT0 + (s % self.slots) * SLOT_WORDS] != 2 * s + 2:
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
        i = W_SLOT0 + slot * SLOT_WORDS
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
            futex_wake(self._cursor_addr, 1)
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
