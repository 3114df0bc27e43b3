"""A granted segment: its lease, its fd and its mapping, as one object."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import wire

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Segment"]


class Segment:
    """A mapped segment holding one lease; a context manager.

    ``close()`` unmaps, closes the fd and releases the lease.  If views of
    ``buf`` are still alive (a numpy array, a slice someone kept), the
    mapping stays until they are gone, as with :class:`mmap.mmap`; the lease
    is released regardless.
    """

    def __init__(
        self,
        info: wire.Segment,
        lease: str,
        fd: int,
        access: str,
        release: Callable[[str], None],
    ) -> None:
        self.info = info
        self.lease = lease
        self._fd = fd
        self._release = release
        self.readonly = access != "rw"
        prot = mmap.PROT_READ if self.readonly else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(
                fd, info.size, flags=mmap.MAP_SHARED, prot=prot
            )
        except BaseException:
            os.close(fd)
            release(lease)
            raise
        self.buf = memoryview(self._mmap)

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
        """The fd the daemon sent (read-only for ``ro`` opens); owned by this object."""
        if self._fd < 0:
            raise ValueError("segment is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ndarray(self, dtype: Any = "uint8", shape: Any = None, offset: int = 0) -> npt.NDArray[Any]:
        """A numpy view of the mapping (read-only for ``ro`` segments)."""
        import numpy as np

        dt = np.dtype(dtype)
        if shape is None:
            shape = ((self.size - offset) // dt.itemsize,)
        arr: np.ndarray[Any, Any] = np.ndarray(shape, dtype=dt, buffer=self.buf, offset=offset)
        return arr

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        with contextlib.suppress(BufferError):  # views of buf (numpy arrays) are alive
            self.buf.release()
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # exported views keep it mapped
                self._mmap.close()
            self._mmap = None
        os.close(fd)
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
