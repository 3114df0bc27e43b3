"""A granted segment: its lease, and a share of one mapping of its memory.

Strategy: the fd and the mapping live in :class:`Mapping`, which may be
shared by several :class:`Segment` objects of one broker connection: a
repeat ``open`` of a segment this process already maps asks the daemon with
``fd: false`` (the contract's cheap path), checks the segment ``id`` still
matches, and reuses the mapping, so it costs no fd and no ``mmap``.  Each
Segment holds its own lease; the mapping goes when its last Segment closes.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import wire

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["Mapping", "Segment"]


class Mapping:
    """One fd and one ``mmap`` of a segment, shared by reference count."""

    def __init__(
        self, info: wire.SegmentInfo, fd: int, writable: bool, on_last: Callable[[Mapping], None]
    ) -> None:
        self.id = info.id
        self.name = info.name
        self.size = info.size
        self.fd = fd
        self.writable = writable
        self.refs = 0
        self._on_last = on_last
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.mmap = mmap.mmap(fd, info.size, flags=mmap.MAP_SHARED, prot=prot)
        except BaseException:
            os.close(fd)
            raise

    def acquire(self) -> memoryview:
        self.refs += 1
        return memoryview(self.mmap)

    def release(self) -> None:
        self.refs -= 1
        if self.refs:
            return
        self._on_last(self)
        try:  # noqa: SIM105 (runs at every close: contextlib.suppress costs more)
            self.mmap.close()
        except BufferError:  # exported views keep it mapped until they die
            pass
        os.close(self.fd)


def _keep(lease: str) -> None:
    """The release of a disowned Segment: the lease is someone else's."""


class Segment:
    """A mapped segment holding one lease; a context manager.

    ``close()`` releases the lease and this segment's share of the mapping
    (unmapped, and its fd closed, once no other open of the same segment in
    this broker uses it); when it returns the daemon has released the lease
    (unless the broker was made with ``pipeline_release=True``).  If views of
    ``buf`` are still alive (a numpy array, a slice someone kept), the memory
    stays mapped until they are gone, as with :class:`mmap.mmap`; the lease is
    released regardless.

    ``sealed`` is as the daemon last described the segment to this broker
    (at the grant, or at this broker's own ``seal``); ``stat`` asks anew.
    ``lost`` turns True when, after a daemon restart, the broker could not
    reclaim this segment's lease (see ``Broker(on_lost=...)``): the mapping
    still works, but it is no longer the segment a new ``open`` of the name
    finds, if any.
    """

    def __init__(
        self,
        info: wire.SegmentInfo,
        lease: str,
        mapping: Mapping,
        release: Callable[[str], None],
    ) -> None:
        self.info = info
        self.lease = lease
        self._mapping: Mapping | None = mapping
        self._release = release
        self.readonly = not mapping.writable
        self.lost = False
        self.buf = mapping.acquire()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def sealed(self) -> bool:
        return self.info.sealed

    @property
    def fd(self) -> int:
        """The fd the daemon sent (``O_RDONLY`` for ``ro`` opens).

        Owned by the segment's mapping, shared with other opens of the same
        segment and access in this broker: do not close it.
        """
        if self._mapping is None:
            raise ValueError("segment is closed")
        return self._mapping.fd

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def disown(self) -> None:
        """Keep the mapping, give up the lease: ``close()`` will release nothing
        (a forked child's inherited Segments: the lease is the parent's)."""
        self._release = _keep

    def ndarray(self, dtype: Any = "uint8", shape: Any = None, offset: int = 0) -> npt.NDArray[Any]:
        """A numpy view of the mapping (read-only for ``ro`` segments)."""
        import numpy as np

        dt = np.dtype(dtype)
        if shape is None:
            shape = ((self.size - offset) // dt.itemsize,)
        arr: npt.NDArray[Any] = np.ndarray(shape, dtype=dt, buffer=self.buf, offset=offset)
        return arr

    def close(self) -> None:
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        try:  # noqa: SIM105 (as in Mapping.release)
            self.buf.release()
        except BufferError:  # views of buf (numpy arrays) are alive
            pass
        mapping.release()
        self._release(self.lease)

    def __enter__(self) -> Segment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("ro" if self.readonly else "rw")
        return f"<Segment {self.name!r} size={self.size} {state}>"
