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

Layout (all fields ``uint64``, little-endian; lines are 64 bytes; the
offsets and the seqlock arithmetic are in :mod:`shmbroker.ring.layout`):

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

The package, one job per module: ``layout`` (the bytes and the seqlock
arithmetic, pure), ``futex`` (the doorbell), ``liveness`` (is the writer
still running), ``base`` (:class:`Ring`), ``writer``, ``reader``, ``errors``.
"""

from __future__ import annotations

from .base import Ring
from .errors import RingClosedError, RingOverrunError, RingWriterGoneError
from .reader import Message, RingReader
from .writer import RingWriter

__all__ = [
    "Message",
    "Ring",
    "RingClosedError",
    "RingOverrunError",
    "RingReader",
    "RingWriter",
    "RingWriterGoneError",
]
