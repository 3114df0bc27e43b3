"""The ring's layout and seqlock arithmetic, on a ``bytearray``: no mmap, no daemon.

The last tests run the real :class:`RingWriter` and :class:`RingReader` over a
``bytearray`` standing in for the segment's mapping (a lossy ring never asks
the broker anything), so that the hot paths, which inline the arithmetic, are
checked against it too.  ``tests/integration/test_ring.py`` does the same across
processes, through a real daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest

from shmbroker import RingClosedError, RingOverrunError, RingReader, RingWriter
from shmbroker._sync import Broker
from shmbroker.ring import layout as L
from shmbroker.segment import Segment


def fresh(slots: int, slot_size: int, *, backpressure: bool = False) -> bytearray:
    """A zeroed ring of that shape with its header written."""
    buf = bytearray(L.layout(slots, slot_size)[2])
    L.write_header(
        memoryview(buf),
        slots,
        slot_size,
        backpressure=backpressure,
        nonce=0x1234,
        writer=(42, 7, 99),
    )
    return buf


def words(buf: bytearray) -> memoryview:
    return memoryview(buf).cast("Q")


@pytest.mark.parametrize(
    ("slots", "slot_size", "stride", "data_offset"),
    [
        (1, 1, 64, 4096),
        (8, 64, 64, 4096),
        (8, 65, 128, 4096),
        (61, 1000, 1024, 4096),  # 3 + 61 lines fill the first page exactly
        (62, 1000, 1024, 8192),  # one more line: the data moves to the next page
    ],
)
def test_layout_aligns_slots_to_lines_and_data_to_a_page(
    slots: int, slot_size: int, stride: int, data_offset: int
) -> None:
    assert L.layout(slots, slot_size) == (stride, data_offset, data_offset + slots * stride)


def test_header_round_trips_and_the_magic_is_what_makes_a_ring() -> None:
    buf = fresh(8, 100, backpressure=True)
    q = words(buf)
    assert L.read_header(q) == L.Header(8, 100, 128, 4096, 0x1234, True)
    assert L.is_ring(q, len(buf))
    assert L.is_consistent(L.read_header(q), len(buf))
    assert (q[L.W_WRITER_PID], q[L.W_WRITER_START], q[L.W_WRITER_PIDNS]) == (42, 7, 99)
    assert q[L.W_STATE] == 0  # nothing published, not closed
    assert not L.read_header(words(fresh(1, 1))).backpressure
    q[L.W_VERSION] = L.VERSION + 1
    assert not L.is_ring(q, len(buf))
    q[L.W_VERSION] = L.VERSION
    q[L.W_MAGIC] = 0
    assert not L.is_ring(q, len(buf))


def test_no_writer_identity_leaves_the_words_zero() -> None:
    buf = bytearray(L.layout(2, 8)[2])
    L.write_header(memoryview(buf), 2, 8, backpressure=False, nonce=1, writer=None)
    q = words(buf)
    assert (q[L.W_WRITER_PID], q[L.W_WRITER_START], q[L.W_WRITER_PIDNS]) == (0, 0, 0)
    assert L.is_ring(q, len(buf))


BREAKAGES: list[Callable[[L.Header], L.Header]] = [
    lambda h: h._replace(slots=0),
    lambda h: h._replace(slot_size=0),
    lambda h: h._replace(stride=32),  # below slot_size 100
    lambda h: h._replace(data_offset=3 * L.LINE),  # over the slot headers
    lambda h: h._replace(data_offset=8192),  # runs past the segment
]


@pytest.mark.parametrize("broken", BREAKAGES)
def test_an_inconsistent_header_is_told(broken: Callable[[L.Header], L.Header]) -> None:
    buf = fresh(8, 100)
    h = L.read_header(words(buf))
    assert L.is_consistent(h, len(buf))
    assert not L.is_consistent(broken(h), len(buf))
    assert not L.is_consistent(h, len(buf) - 1)


def test_control_words_sit_on_their_own_lines() -> None:
    assert L.W_STATE * 8 == L.LINE
    assert L.W_WAITING * 8 == 2 * L.LINE
    assert L.seq_word(0, 8) * 8 == 3 * L.LINE
    assert L.seq_word(9, 8) == L.seq_word(1, 8) == L.W_SLOT0 + L.SLOT_WORDS
    assert L.W_WRITER_PIDNS < L.W_WAITING  # the writer's identity fits line 1
    h = L.read_header(words(fresh(4, 10)))
    assert [L.data_offset_of(s, h) for s in range(6)] == [4096, 4160, 4224, 4288, 4096, 4160]
    assert len(L.header_words(memoryview(fresh(4, 10)), 4)) == (3 + 4) * L.SLOT_WORDS


def test_sequence_words_say_being_written_complete_or_lapped() -> None:
    for s in range(5):
        assert L.writing(s) % 2 == 1
        assert L.complete(s) % 2 == 0
        assert L.writing(s) == L.complete(s - 1) + 1  # overwriting s - slots starts here
        assert L.slot_status(L.complete(s), s) == "ready"
        assert L.slot_status(L.writing(s), s) == "pending"
        assert L.slot_status(0, s) == "pending"  # a slot never written
        assert L.slot_status(L.writing(s + 1), s) == "lapped"
        assert L.slot_status(L.complete(s + 8), s) == "lapped"


def test_the_state_word_carries_the_count_and_the_closed_bit() -> None:
    for n in (0, 1, 2**40):
        for c in (False, True):
            w = L.state(n, c)
            assert (L.published(w), L.closed(w)) == (n, c)
    assert L.state(3, False) & 0xFFFFFFFF != L.state(3, True) & 0xFFFFFFFF  # the futex sees it


def test_overrun_resumes_at_the_oldest_slot_that_may_be_intact() -> None:
    # 8 slots, 20 published: 12..19 are in the ring, 12 may be being overwritten
    assert L.resume_after_overrun(3, 20, 8) == 12
    assert L.resume_after_overrun(12, 20, 8) == 13  # always forward
    assert L.start_seq(20, 8, "latest") == 20
    assert L.start_seq(20, 8, "oldest") == 13
    assert L.start_seq(3, 8, "oldest") == 0


def test_a_cursor_holds_the_slot_it_has_not_read() -> None:
    # writing s = 8 on 8 slots overwrites message 0: a reader still needing it
    # has next seq 0 (cursor word 1), or has not chosen its start (word 0)
    assert L.holds(0, 8, 8)
    assert L.holds(1, 8, 8)
    assert not L.holds(2, 8, 8)
    assert not L.holds(L.DETACHED, 8, 8)
    # a blocked writer sleeps until about half the ring is free
    assert L.wake_target(8, 8) == 5  # the reader at message 4 of 0..7
    assert L.wake_target(1, 1) == 2  # one slot: the very next step


# -- the real reader and writer over a bytearray --------------------------------------


class BytesSegment:
    """A :class:`Segment`'s surface that the ring uses, over a ``bytearray``."""

    def __init__(self, buf: bytearray, name: str = "mem/ring") -> None:
        self.buf = memoryview(buf)
        self.size = len(buf)
        self.name = name
        self.id = 1
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def pair(slots: int, slot_size: int) -> tuple[RingWriter, RingReader, bytearray]:
    buf = fresh(slots, slot_size)
    nobroker = cast(Broker, None)  # a lossy ring never asks the broker
    w = RingWriter(nobroker, cast(Segment, BytesSegment(buf)), refresh=0.1, spin=0.0)
    r = RingReader(
        nobroker, cast(Segment, BytesSegment(buf)), start="oldest", cursor_mode=0o644, spin=0.0
    )
    return w, r, buf


def test_writer_and_reader_follow_the_layout() -> None:
    w, r, buf = pair(4, 16)
    q = words(buf)
    assert w.write(b"hello") == 0
    i = L.seq_word(0, 4)
    assert (q[i], q[i + 1]) == (L.complete(0), 5)
    assert q[L.W_STATE] == L.state(1, False)
    off = L.data_offset_of(0, L.read_header(q))
    assert bytes(buf[off : off + 5]) == b"hello"
    view = w.reserve()
    assert q[L.seq_word(1, 4)] == L.writing(1)
    view[:3] = b"abc"
    view.release()
    w.publish(3)
    assert r.read(timeout=0) == b"hello"
    assert r.read(timeout=0) == b"abc"
    with pytest.raises(TimeoutError):
        r.read(timeout=0)
    w.close()
    assert L.closed(q[L.W_STATE])
    assert L.published(q[L.W_STATE]) == 2
    with pytest.raises(RingClosedError):
        r.read(timeout=0)
    r.close()


def test_a_lapped_reader_counts_what_it_lost() -> None:
    w, r, _ = pair(4, 8)
    for n in range(10):
        w.write(bytes([n]))
    with pytest.raises(RingOverrunError) as e:
        r.read(timeout=0)
    assert (e.value.lost, e.value.seq) == (L.resume_after_overrun(0, 10, 4), 6)
    assert [r.read(timeout=0) for _ in range(4)] == [b"\x06", b"\x07", b"\x08", b"\x09"]
    assert r.lost == 6
    w.close()
    r.close()


def test_a_slot_overwritten_under_a_zero_copy_view_is_an_overrun_not_data() -> None:
    w, r, buf = pair(2, 8)
    w.write(b"first")
    msg = r.next(timeout=0)
    assert bytes(msg.view) == b"first"
    w.write(b"second")
    w.reserve()  # slot 0 again: its sequence word goes odd under the reader's view
    assert words(buf)[L.seq_word(0, 2)] == L.writing(2)
    with pytest.raises(RingOverrunError):
        msg.release()
    assert r.seq == L.resume_after_overrun(0, 2, 2) == 1
    w.close()
    r.close()
