"""Backing objects: POSIX shm files under a private prefix, and memfds.

Strategy: a shm segment costs the daemon no fd while it lives.  Its object
is ``/dev/shm/<prefix><segment id>`` (never derived from the client's name),
mode 0600 and owned by the daemon, and is reopened for each grant, read-only
grants with ``O_RDONLY`` so the kernel refuses writable mappings.  Memory is
reserved with ``posix_fallocate`` at create, so a full tmpfs answers
``ENOSPC`` now instead of ``SIGBUS`` in some client later.

A memfd has no name to reopen, so the daemon holds one fd per memfd segment
and reopens read-only through ``/proc/self/fd``.  Grow and shrink are sealed
from creation (a writer can then never truncate it under a reader, the
``SIGBUS`` attack on shm backing); ``seal`` adds the future-write seal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from shmbroker.errors import error_from_errno

__all__ = ["LOCK_NAME", "SHM_DIR", "Store"]

SHM_DIR = "/dev/shm"
#: the prefix lock's file is ``<prefix>lock`` (prefix_lock.py); never a segment
#: id, which is hex digits and '-'
LOCK_NAME = "lock"
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not exported by Python's fcntl
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class Store:
    """Creates, reopens, seals and unlinks the objects behind segments."""

    def __init__(self, prefix: str, shm_dir: str = SHM_DIR) -> None:
        self.prefix = prefix
        self.shm_dir = shm_dir
        self._base = os.path.join(shm_dir, prefix)
        self._memfds: dict[str, int] = {}
        self._lock = prefix + LOCK_NAME  # the prefix lock's file (prefix_lock.py)

    def path(self, segment_id: str) -> str:
        return f"{self._base}{segment_id}"

    def create(self, segment_id: str, size: int, backing: str) -> None:
        """Make and reserve the object; raise ``ENOSPC`` if memory is short."""
        if backing != "memfd":
            st = os.statvfs(self.shm_dir)
            if st.f_bavail * st.f_frsize < size:  # refuse before creating anything
                raise error_from_errno(errno.ENOSPC, f"{self.shm_dir} has no room for {size} bytes")
        if backing == "memfd":
            fd = os.memfd_create(f"shmbroker:{segment_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        else:
            fd = os.open(
                self.path(segment_id), os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600
            )
        try:
            os.fchmod(fd, 0o600)
            _reserve(fd, size)
            if backing == "memfd":
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        except BaseException:
            os.close(fd)
            if backing != "memfd":
                self._unlink_path(segment_id)
            raise
        if backing == "memfd":
            self._memfds[segment_id] = fd
        else:
            os.close(fd)

    def open_fd(self, segment_id: str, backing: str, access: str) -> int:
        """A new fd for a grant; the caller sends and closes it."""
        flags = (os.O_RDWR if access == "rw" else os.O_RDONLY) | _OPEN_FLAGS
        if backing == "memfd":
            held = self._memfds[segment_id]
            if access == "rw":
                return os.dup(held)
            return os.open(f"/proc/self/fd/{held}", os.O_RDONLY | os.O_CLOEXEC)
        return os.open(self._base + segment_id, flags)  # self.path(), a call less

    def seal(self, segment_id: str) -> None:
        fd = self._memfds.get(segment_id)
        if fd is not None:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)

    def unlink(self, segment_id: str, backing: str) -> None:
        """Remove the object; existing mappings stay valid (POSIX)."""
        if backing == "memfd":
            fd = self._memfds.pop(segment_id, None)
            if fd is not None:
                os.close(fd)
        else:
            self._unlink_path(segment_id)

    def _unlink_path(self, segment_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(segment_id))

    def memfd(self, segment_id: str) -> int | None:
        return self._memfds.get(segment_id)

    def adopt_memfd(self, segment_id: str, fd: int) -> None:
        """Take back a memfd handed over by systemd's fd store."""
        self._memfds[segment_id] = fd

    def objects(self) -> Iterator[str]:
        """Segment ids of the shm objects under our prefix (for reconciliation)."""
        with os.scandir(self.shm_dir) as it:
            for entry in it:
                if entry.name.startswith(self.prefix) and entry.name != self._lock:
                    yield entry.name[len(self.prefix) :]

    def object_size(self, segment_id: str) -> int:
        return os.stat(self.path(segment_id), follow_symlinks=False).st_size

    def close(self) -> None:
        for fd in self._memfds.values():
            os.close(fd)
        self._memfds.clear()


def _reserve(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise error_from_errno(
                errno.ENOSPC, f"cannot reserve {size} bytes: {exc.strerror}"
            ) from None
        raise
