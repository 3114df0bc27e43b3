"""Errors raised by the client library.

Every error is an ``OSError`` carrying the errno the daemon named, so callers
write ``except FileNotFoundError`` as they would for a file.  Each class also
derives from :class:`BrokerError`, so ``except BrokerError`` catches anything
the daemon refused.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "BrokerError",
    "SegmentExistsError",
    "SegmentNotFoundError",
    "SegmentPermissionError",
    "SegmentTimeoutError",
    "errno_name",
    "error_from_code",
    "error_from_errno",
]


#: Where Linux has two names for one number, the contract uses these.
_CONTRACT_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP", errno.EAGAIN: "EAGAIN"}


def errno_name(num: int | None) -> str:
    """The errno name the contract uses for ``num`` (``EOPNOTSUPP``, not ``ENOTSUP``)."""
    if num is None:
        return "EIO"
    return _CONTRACT_NAMES.get(num) or errno.errorcode.get(num, "EIO")


class BrokerError(OSError):
    """The daemon refused a request; ``errno`` and ``code`` name why."""

    @property
    def code(self) -> str:
        return errno_name(self.errno)


class SegmentNotFoundError(BrokerError, FileNotFoundError):
    """``ENOENT``: no such segment or lease."""


class SegmentExistsError(BrokerError, FileExistsError):
    """``EEXIST``: the name is taken."""


class SegmentPermissionError(BrokerError, PermissionError):
    """``EACCES`` or ``EPERM``: mode, policy or seal forbids it."""


class SegmentTimeoutError(BrokerError, TimeoutError):
    """``ETIMEDOUT``: ``open`` with ``wait`` ran out."""


_CLASSES: dict[int, type[BrokerError]] = {
    errno.ENOENT: SegmentNotFoundError,
    errno.EEXIST: SegmentExistsError,
    errno.EACCES: SegmentPermissionError,
    errno.EPERM: SegmentPermissionError,
    errno.ETIMEDOUT: SegmentTimeoutError,
}


def error_from_errno(num: int, message: str = "") -> BrokerError:
    """Build the exception for an errno value, of the class the OS would use."""
    return _CLASSES.get(num, BrokerError)(num, message or os.strerror(num))


def error_from_code(code: str, message: str) -> BrokerError:
    """Build the exception for an errno name sent by the daemon.

    An unknown name (a newer daemon) becomes ``EIO`` rather than a crash.
    """
    num = getattr(errno, code, None) if code.isupper() and code.startswith("E") else None
    if not isinstance(num, int):
        return BrokerError(errno.EIO, f"{code}: {message}")
    return error_from_errno(num, message)
