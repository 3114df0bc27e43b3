"""The ring's bytes: where every word lives, and the seqlock arithmetic on them.

Pure: nothing here maps, sleeps or talks to the daemon, so it all runs on a
``bytearray`` (``tests/unit/test_ring_layout.py``).  The writer's and reader's hot
paths inline the same expressions (``2 * s + 2`` rather than
``complete(s)``) to spare a call per message; the names here say what those
expressions mean.  The format itself is in the package docstring.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from .. import wire

MAGIC = int.from_bytes(b"shmring\x01", "little")
VERSION = 1
LINE = 64
PAGE = 4096
FLAG_BACKPRESSURE = 1
CURSOR_SIZE = LINE
DETACHED = 2**64 - 1

# word indexes (uint64) in the header
W_MAGIC, W_VERSION, W_FLAGS, W_SLOTS, W_SLOT_SIZE, W_STRIDE, W_DATA_OFFSET, W_NONCE = range(8)
W_STATE = LINE // 8  # published << 1 | closed
# the writer, for readers to tell whether it still runs: pid, its start time
# (clock ticks after boot, so a reused pid is told apart), its pid namespace
# (a pid means nothing in another one); 0: unknown
W_WRITER_PID, W_WRITER_START, W_WRITER_PIDNS = W_STATE + 1, W_STATE + 2, W_STATE + 3
W_WAITING = 2 * LINE // 8  # the cursor value a sleeping writer waits for (0: none)
W_SLOT0 = 3 * LINE // 8  # slot i: seq at W_SLOT0 + 8 i, length right after
SLOT_WORDS = LINE // 8

# a cursor's name is <ring>/readers/<16 hex nonce>/<16 hex token>
MAX_NAME = wire.MAX_NAME - len("/readers/") - 16 - 1 - 16


class Header(NamedTuple):
    """The layout fields of line 0."""

    slots: int
    slot_size: int
    stride: int
    data_offset: int
    nonce: int
    backpressure: bool


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def layout(slots: int, slot_size: int) -> tuple[int, int, int]:
    """``(stride, data_offset, total size)`` of a ring."""
    stride = round_up(slot_size, LINE)
    data_offset = round_up((3 + slots) * LINE, PAGE)
    return stride, data_offset, data_offset + slots * stride


def header_words(buf: memoryview, slots: int) -> memoryview:
    """The control words (lines 0 to the last slot's header) as ``uint64``."""
    return buf[: (3 + slots) * LINE].cast("Q")


def write_header(
    buf: memoryview,
    slots: int,
    slot_size: int,
    *,
    backpressure: bool,
    nonce: int,
    writer: tuple[int, int, int] | None,
) -> None:
    """Fill a fresh (zeroed) ring's header; the magic last, so that a reader
    that sees it sees the rest.  ``writer``: ``(pid, start time, pid
    namespace)``, or None to leave them 0 (readers then never call it gone)."""
    stride, data_offset, _ = layout(slots, slot_size)
    q = buf[:LINE].cast("Q")
    try:
        q[W_VERSION] = VERSION
        q[W_FLAGS] = FLAG_BACKPRESSURE if backpressure else 0
        q[W_SLOTS] = slots
        q[W_SLOT_SIZE] = slot_size
        q[W_STRIDE] = stride
        q[W_DATA_OFFSET] = data_offset
        q[W_NONCE] = nonce
        if writer is not None:
            state = buf[LINE : 2 * LINE].cast("Q")
            pid, start, pidns = writer
            state[W_WRITER_PID - W_STATE] = pid
            state[W_WRITER_START - W_STATE] = start
            state[W_WRITER_PIDNS - W_STATE] = pidns
            state.release()
        q[W_MAGIC] = MAGIC
    finally:
        q.release()


def read_header(q: memoryview) -> Header:
    """The layout fields, from line 0 as ``uint64`` words."""
    return Header(
        slots=int(q[W_SLOTS]),
        slot_size=int(q[W_SLOT_SIZE]),
        stride=int(q[W_STRIDE]),
        data_offset=int(q[W_DATA_OFFSET]),
        nonce=int(q[W_NONCE]),
        backpressure=bool(q[W_FLAGS] & FLAG_BACKPRESSURE),
    )


def is_ring(q: memoryview, size: int) -> bool:
    """Does line 0 (as ``uint64`` words, of a segment of ``size`` bytes) carry
    this version's magic?"""
    return size >= LINE and q[W_MAGIC] == MAGIC and q[W_VERSION] == VERSION


def is_consistent(h: Header, size: int) -> bool:
    """Does the layout ``h`` fit a segment of ``size`` bytes, without overlaps?"""
    return (
        h.slots >= 1
        and h.slot_size >= 1
        and h.stride >= h.slot_size
        and h.data_offset >= (3 + h.slots) * LINE
        and h.data_offset + h.slots * h.stride <= size
    )


# -- the seqlock -------------------------------------------------------------------


def seq_word(s: int, slots: int) -> int:
    """The index of message ``s``'s sequence word; its length is the next word."""
    return W_SLOT0 + (s % slots) * SLOT_WORDS


def data_offset_of(s: int, h: Header) -> int:
    """Where message ``s``'s bytes start."""
    return h.data_offset + (s % h.slots) * h.stride


def writing(s: int) -> int:
    """The sequence word while message ``s`` is being written (odd)."""
    return 2 * s + 1


def complete(s: int) -> int:
    """The sequence word once message ``s`` is in place (even)."""
    return 2 * s + 2


def state(published: int, closed: bool) -> int:
    """The doorbell word: the published count, and the closed bit."""
    return (published << 1) | closed


def published(state_word: int) -> int:
    return state_word >> 1


def closed(state_word: int) -> bool:
    return bool(state_word & 1)


def slot_status(v: int, s: int) -> Literal["ready", "pending", "lapped"]:
    """What a reader expecting message ``s`` makes of sequence word ``v``."""
    want = complete(s)
    return "ready" if v == want else "pending" if v < want else "lapped"


def resume_after_overrun(s: int, published_count: int, slots: int) -> int:
    """Where a reader lapped at ``s`` goes on: the oldest message that may be intact
    (the writer may be overwriting the oldest slot as we speak)."""
    return max(s + 1, published_count - slots)


def start_seq(published_count: int, slots: int, start: Literal["latest", "oldest"]) -> int:
    """A new reader's first message: the next one, or the oldest still in the ring."""
    return published_count if start == "latest" else max(0, published_count - slots + 1)


def holds(cursor: int, s: int, slots: int) -> bool:
    """Does a reader whose cursor word is ``cursor`` (next seq + 1; 0: starting,
    holds every slot) still need the message that ``s`` overwrites?"""
    return cursor <= s + 1 - slots


def wake_target(s: int, slots: int) -> int:
    """The cursor value a writer blocked at ``s`` sleeps until: about half the ring
    free, so that a reader that keeps up wakes it once per half ring."""
    return s + 2 - slots + max(0, slots // 2 - 1)
