"""What a ring's writer and readers share: :class:`Ring`, the segment and its layout."""

from __future__ import annotations

import secrets
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from .._params import Backing, Lifetime
from ..segment import Segment
from .futex import address
from .layout import LINE, MAX_NAME, W_STATE, header_words, layout, read_header, write_header
from .liveness import writer_identity

if TYPE_CHECKING:
    from .._sync import Broker
    from .reader import RingReader
    from .writer import RingWriter

__all__ = ["Ring"]


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
        h = read_header(q)
        self.slots, self.slot_size = h.slots, h.slot_size
        self._stride, self._data_offset = h.stride, h.data_offset
        self._nonce, self._backpressure = h.nonce, h.backpressure
        q.release()
        self._q = header_words(self._buf, self.slots)
        self._state_addr = address(self._buf[W_STATE * 8 : W_STATE * 8 + 8])

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
        the writer waits for the readers it knows (see the package
        docstring); ``refresh`` is how often, in seconds, it looks for
        readers that came or went.  ``spin`` is how long a blocked writer
        polls before it sleeps.

        Raises ``ValueError`` for a bad shape, and what :meth:`Broker.create`
        raises (``FileExistsError`` if the name is taken, ...).
        """
        if slots < 1 or slot_size < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        if backpressure and len(name.encode()) > MAX_NAME:
            raise ValueError(f"a back-pressure ring's name must be at most {MAX_NAME} bytes")
        if sys.byteorder != "little":  # pragma: no cover
            raise OSError("shmbroker rings need a little-endian machine")
        size = layout(slots, slot_size)[2]
        seg = broker.create(
            name, size, lifetime=lifetime, ttl=ttl, mode=mode, backing=backing, exist_ok=False
        )
        try:
            write_header(
                seg.buf,
                slots,
                slot_size,
                backpressure=backpressure,
                nonce=secrets.randbits(64),
                writer=writer_identity(),  # None: readers will not tell whether it runs
            )
            from .writer import RingWriter  # a subclass: imported when first needed

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
            from .reader import RingReader  # a subclass: imported when first needed

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
