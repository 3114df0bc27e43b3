"""One daemon per ``shm_prefix``: an exclusive ``flock`` on ``/dev/shm/<prefix>lock``.

Strategy: at start a daemon unlinks every object under its prefix that its
state does not name (a crash's leftovers), so a second daemon on the same
prefix would delete the first one's segments.  The lock lives beside the
objects it guards, in the same directory and under the same prefix, so
every daemon that could touch them meets it, whatever its socket or state
directory.  The lock file is unlinked at stop; a daemon that locked a file
someone unlinked meanwhile would hold a lock nobody else can see, so after
locking it checks that the path still names the inode it locked, and starts
over if not.  The file stays empty (a small tmpfs counts every page, and
tests fill one to the byte): the refusal names the holder's pid as the
kernel reports it in ``/proc/locks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from .backing import LOCK_NAME
from .config import ConfigError

__all__ = ["PrefixLock"]

_ATTEMPTS = 10


class PrefixLock:
    """Held from :meth:`acquire` to :meth:`release`; refuses while another holds it."""

    def __init__(self, shm_dir: str, prefix: str) -> None:
        self.prefix = prefix
        self.path = os.path.join(shm_dir, prefix + LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; raise ``ConfigError`` naming the holder if another daemon has it."""
        for _ in range(_ATTEMPTS):
            fd = _open(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"shm_prefix {self.prefix!r} is in use by another shmbrokerd"
                    f" ({holder}, lock {self.path}); give this daemon its own"
                    " --shm-prefix (or shm_prefix in its config)"
                ) from None
            if _same_file(fd, self.path):
                self._fd = fd
                return
            os.close(fd)  # unlinked by its last holder as we locked it: again
        raise ConfigError(f"cannot lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Unlink the lock file, then drop the lock (in that order: see the top)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)


def _open(path: str) -> int:
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, os.O_RDWR | flags, 0o644)
    except PermissionError:  # another uid's lock file: flock needs no write access
        try:
            return os.open(path, os.O_RDONLY | flags, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open the prefix lock {path}: {exc.strerror}") from None
    except OSError as exc:
        raise ConfigError(f"cannot open the prefix lock {path}: {exc.strerror}") from None


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """``pid N`` of the lock's holder, from ``/proc/locks`` (``pid unknown`` if hidden)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key:
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return "pid unknown"
