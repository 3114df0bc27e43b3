"""The ring's one writer: :class:`RingWriter`, and the readers' cursors as it sees them."""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

from ..segment import Segment
from .base import Ring
from .futex import address, futex_wait, futex_wake
from .layout import SLOT_WORDS, W_SLOT0, W_STATE, W_WAITING, holds, state, wake_target

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .._sync import Broker

__all__ = ["RingWriter"]


class _Cursor:
    """A reader's cursor segment as the writer sees it (read-only)."""

    __slots__ = ("addr", "segment", "words")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.words = segment.buf[:16].cast("Q")  # next seq + 1, sleeping
        self.addr = address(segment.buf[:8])

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
            self._q[W_SLOT0 + slot * SLOT_WORDS] = 2 * s + 1  # writing(s), inlined
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
        i = W_SLOT0 + (s % self.slots) * SLOT_WORDS
        q[i + 1] = length
        q[i] = 2 * s + 2  # complete(s), then state(s + 1, False): inlined
        self.seq = s + 1
        self._reserved = False
        q[W_STATE] = (s + 1) << 1
        if not self._backpressure:
            futex_wake(self._state_addr)  # readers cannot say whether they sleep
            return s
        if time.monotonic() - self._refreshed >= self.refresh:
            self._refresh_quietly()  # first, so that a new reader's sleep is seen
        for cur in self._cursor_list:
            if cur.words[1]:
                futex_wake(self._state_addr)
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
            if cur.words[0] <= limit:  # holds(), inlined; 0 (a reader starting) holds all
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
        need = wake_target(s, self.slots)  # asleep, wait for about half the ring
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
                    q[W_WAITING] = need
                    p = blocker.words[0]
                    if holds(p, s, self.slots):  # checked after the flag: no lost wake
                        wait = self._refreshed + self.refresh - now
                        if deadline is not None:
                            wait = min(wait, deadline - now)
                        futex_wait(blocker.addr, p, wait)
                blocker = self._blocker(s)
        finally:
            if q[W_WAITING]:
                q[W_WAITING] = 0

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
        self._q[W_STATE] = state(self.seq, closed=True)
        futex_wake(self._state_addr)
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
