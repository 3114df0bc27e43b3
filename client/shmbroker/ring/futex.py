"""The doorbell: ``FUTEX_WAIT``/``FUTEX_WAKE`` on a word of a shared mapping.

Shared (non-private) futexes on a ``MAP_SHARED`` file mapping are keyed by the
file's page and offset, so they work across processes whatever the mapping
addresses; ``FUTEX_WAIT`` only reads the word, so it works on a read-only
mapping.  Called through ``ctypes``: the word's address comes from the
buffer protocol (:func:`address`).  Without a known syscall number the wait
is a 1 ms poll.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import time

__all__ = ["HAVE_FUTEX", "address", "futex_wait", "futex_wake"]

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT = 0  # not FUTEX_PRIVATE_FLAG: waiters and wakers are other processes
_FUTEX_WAKE = 1
_WAKE_ALL = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _PyBuffer(ctypes.Structure):  # CPython's Py_buffer, stable since 3.0
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


if _SYS_FUTEX is not None and sys.platform == "linux":
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.POINTER(_Timespec),
        ctypes.c_void_p,
        ctypes.c_uint32,
    ]
    HAVE_FUTEX = True
else:  # pragma: no cover - no known futex number: poll
    HAVE_FUTEX = False


def futex_wait(addr: int, value: int, timeout: float) -> None:
    """Sleep while the 32-bit word at ``addr`` holds ``value``, at most ``timeout`` s.

    Returns early on a wake, a changed value, or a signal; callers re-check.
    """
    if not HAVE_FUTEX:  # pragma: no cover
        time.sleep(min(timeout, 0.001))
        return
    timeout = max(timeout, 0.0)
    sec = int(timeout)
    ts = _Timespec(sec, int((timeout - sec) * 1e9))
    _syscall(_SYS_FUTEX, addr, _FUTEX_WAIT, value & 0xFFFFFFFF, ts, None, 0)


def futex_wake(addr: int, n: int = _WAKE_ALL) -> None:
    if HAVE_FUTEX:
        _syscall(_SYS_FUTEX, addr, _FUTEX_WAKE, n, None, None, 0)


def address(view: memoryview) -> int:
    """The address of the first byte of ``view`` (read-only views too)."""
    pybuf = _PyBuffer()
    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    if get(ctypes.py_object(view), ctypes.byref(pybuf), 0) != 0:  # pragma: no cover
        raise BufferError("cannot get the buffer's address")
    try:
        return int(pybuf.buf)
    finally:
        release(ctypes.byref(pybuf))
