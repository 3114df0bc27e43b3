"""A drop-in for :mod:`multiprocessing.shared_memory`, brokered by shmbrokerd.

``from shmbroker import shared_memory`` instead of ``from multiprocessing
import shared_memory``: the same classes, names, errors and bytes (a
:class:`ShareableList` is laid out exactly as CPython's), behaving as
CPython 3.13 documents on Linux, with the daemon in place of
``/dev/shm`` and of the resource tracker:

* a segment lives until :meth:`SharedMemory.unlink`, whoever made it and
  whenever they exit (the broker's ``persistent`` lifetime); no tracker
  process, nothing unlinked behind the user's back, no warning at exit;
* ``track`` is accepted and changes nothing: cleanup on exit is asked for
  by the creator with ``lifetime="owner"`` (or ``"refcount"``, ``"ttl"``);
* keyword-only extras, off by default: ``mode=``, ``readonly=``, ``wait=``,
  ``lifetime=``/``ttl=``, ``broker=``, and :meth:`SharedMemory.ndarray`.

See docs/migrating.md for what differs and why.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import secrets
from typing import TYPE_CHECKING, Any, Unpack

from ._params import Access
from ._shareable_list import ShareableList
from ._shm_names import Extras, broker_name, check_extras, default_broker, translate
from .errors import BrokerError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import numpy.typing as npt

    from ._sync import Broker
    from .segment import Segment

__all__ = ["ShareableList", "SharedMemory", "SharedMemoryManager"]

# CPython's private names, kept because code in the wild (and CPython's own
# tests) reads or patches them.
_USE_POSIX = True
_O_CREX = os.O_CREAT | os.O_EXCL
_SHM_SAFE_NAME_LENGTH = 14
_SHM_NAME_PREFIX = "/psm_"


def _make_filename() -> str:
    """A random name in CPython's style (``/psm_`` and 8 hex digits)."""
    nbytes = (_SHM_SAFE_NAME_LENGTH - len(_SHM_NAME_PREFIX)) // 2
    return _SHM_NAME_PREFIX + secrets.token_hex(nbytes)


class SharedMemory:
    """Create a shared memory segment, or attach to one, by name.

    As CPython's: ``ValueError`` for a negative size, for ``create=True``
    with size 0, and for no name without ``create``; ``FileExistsError``
    when creating a name in use; ``FileNotFoundError`` when attaching to a
    name that does not exist; ``PermissionError`` when the segment's mode
    or the daemon's policy forbids it.  Without a daemon to talk to,
    ``FileNotFoundError``/``ConnectionRefusedError`` name its socket.

    Extras (keyword-only): ``mode`` (permission bits of a new segment,
    default 0o600), ``lifetime`` and ``ttl`` (when the daemon unlinks it by
    itself; default ``"persistent"``: only :meth:`unlink`), ``readonly``
    (attach with a read-only ``buf``, enforced by the kernel), ``wait``
    (seconds to wait for the segment to be created; ``TimeoutError``),
    ``broker`` (a :class:`~shmbroker.Broker` to use instead of the
    process's default one).
    """

    # Defaults, as CPython's: close() and unlink() work on a half-made object.
    _name: str | None = None
    _segment: Segment | None = None
    _via: Broker | None = None
    _buf: memoryview | None = None
    _flags = os.O_RDWR
    _mode = 0o600
    _prepend_leading_slash = True
    _track = True

    def __init__(
        self,
        name: str | None = None,
        create: bool = False,
        size: int = 0,
        *,
        track: bool = True,
        **extras: Unpack[Extras],
    ) -> None:
        if not size >= 0:
            raise ValueError("'size' must be a positive integer")
        if create:
            self._flags = _O_CREX | os.O_RDWR
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero")
        if name is None and not self._flags & os.O_EXCL:
            raise ValueError("'name' can only be None if create=True")
        check_extras(extras)
        mode, wait, ttl = extras.get("mode"), extras.get("wait"), extras.get("ttl")
        lifetime, broker = extras.get("lifetime", "persistent"), extras.get("broker")
        readonly = extras.get("readonly", False)
        creating = bool(self._flags & os.O_CREAT)
        readonly = readonly or self._flags & os.O_ACCMODE == os.O_RDONLY
        if creating and (readonly or wait is not None):
            raise ValueError("'readonly' and 'wait' apply to attaching, not to create=True")
        if not creating and (mode is not None or lifetime != "persistent" or ttl is not None):
            raise ValueError("'mode', 'lifetime' and 'ttl' apply to create=True")
        self._track = track
        self._broker = broker
        self._pid = os.getpid()
        self._create_args = (size, lifetime, ttl, self._mode if mode is None else mode)
        if name is None:
            while True:
                candidate = _make_filename()
                try:
                    self._segment = self._get(candidate, readonly, wait)
                except FileExistsError:
                    continue
                break
            name = candidate
        else:
            name = "/" + name if self._prepend_leading_slash else name
            self._segment = self._get(name, readonly, wait)
        self._name = name
        self._size = self._segment.size
        self._buf = self._segment.buf

    def _conn(self) -> Broker:
        return self._broker or default_broker()

    def _get(self, name: str, readonly: bool, wait: float | None) -> Segment:
        """Create or open ``name`` as ``_flags`` say, with CPython's errors."""
        bname = broker_name(name)
        size, lifetime, ttl, mode = self._create_args
        broker = self._via = self._conn()
        try:
            if self._flags & os.O_EXCL:
                return broker.create(bname, size, lifetime, ttl, mode)
            access: Access = "ro" if readonly else "rw"
            if not self._flags & os.O_CREAT:
                return broker.open(bname, access, wait)
            try:  # O_CREAT alone (a subclass's _flags): attach, else create
                return broker.open(bname, access)
            except FileNotFoundError:
                if not size:
                    raise ValueError("cannot mmap an empty file") from None
                return broker.create(bname, size, lifetime, ttl, mode, exist_ok=True)
        except BrokerError as exc:
            raise translate(exc, name) from None

    def __del__(self) -> None:
        if self._via is not None and self._via._lock.locked():
            # Collected during a call of our connection, maybe in this thread:
            # a release now could deadlock.  The lease ends with the connection.
            self._drop()
            return
        with contextlib.suppress(Exception):  # a finalizer, maybe at interpreter exit
            self.close()

    def _drop(self) -> None:
        """Let go of the view but not of the lease."""
        buf, self._buf, self._segment = self._buf, None, None
        if buf is not None:
            try:  # noqa: SIM105 (as in Segment.close)
                buf.release()
            except BufferError:  # views of it are alive: they keep the mapping
                pass

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        cls: Callable[..., SharedMemory] = self.__class__
        if self.readonly:
            cls = functools.partial(cls, readonly=True)
        return (cls, (self.name, False, self.size))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.name!r}, size={self.size})"

    @property
    def buf(self) -> memoryview | None:
        """A memoryview of the segment's ``size`` bytes; None once closed."""
        return self._buf

    @property
    def name(self) -> str:
        """The name that identifies the segment (as given, or generated)."""
        assert self._name is not None
        if self._prepend_leading_slash and self._name.startswith("/"):
            return self._name[1:]
        return self._name

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._size

    @property
    def readonly(self) -> bool:
        return self._segment is not None and self._segment.readonly

    @property
    def _fd(self) -> int:
        """The mapped fd (-1 once closed), as CPython's private attribute."""
        return -1 if self._segment is None else self._segment.fd

    def ndarray(self, dtype: Any = "uint8", shape: Any = None, offset: int = 0) -> npt.NDArray[Any]:
        """A numpy view of the segment (read-only with ``readonly=True``).

        Raises ``ValueError`` once closed.  Keep the array no longer than the
        segment is needed: the memory stays mapped while the array lives.
        """
        if self._segment is None:
            raise ValueError("shared memory is closed")
        return self._segment.ndarray(dtype, shape, offset)

    def close(self) -> None:
        """Close this process's access; the segment itself stays.

        Unlike CPython's, never raises ``BufferError``: memory still viewed
        (a numpy array, a slice kept) stays mapped until those views go.
        In a forked child the parent's lease is left alone.
        """
        segment = self._segment
        if segment is None or os.getpid() != self._pid:  # inherited: the lease is the parent's
            self._drop()
            return
        self._segment = self._buf = None
        segment.close()

    def unlink(self) -> None:
        """Delete the segment: its name is free at once, mappings stay valid.

        Any process the segment's mode lets write may unlink it.  Raises
        ``FileNotFoundError`` if it is already gone, ``PermissionError`` if
        the mode or policy forbids it.
        """
        if self._name:
            try:
                self._conn().delete(broker_name(self._name))
            except BrokerError as exc:
                raise translate(exc, self._name) from None


_SharedMemory = SharedMemory
_ShareableList = ShareableList


class SharedMemoryManager:
    """CPython's ``multiprocessing.managers.SharedMemoryManager`` without a
    manager process: the daemon already is one.

    ``SharedMemory(size)`` and ``ShareableList(sequence)`` create segments
    that :meth:`shutdown` (or leaving the ``with`` block) unlinks.  The
    manager holds a lease on each (lifetime ``refcount``), so they also go
    when this process dies and no other process maps them.  ``address``,
    ``authkey`` and the other ``BaseManager`` arguments are accepted and
    unused.  Calling those methods before :meth:`start` raises
    ``ValueError``, after :meth:`shutdown` ``multiprocessing.ProcessError``.
    """

    def __init__(self, *args: Any, broker: Broker | None = None, **kwargs: Any) -> None:
        self.address = None
        self._broker = broker
        self._state = "initial"
        self._held: list[_SharedMemory] = []

    def start(
        self, initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = ()
    ) -> None:
        """Start managing (there is no process to start).

        ``initializer`` ran in CPython's manager process; there is none, so
        it is checked and not called.
        """
        if self._state == "started":
            raise multiprocessing.ProcessError("Already started server")
        if self._state == "shutdown":
            raise multiprocessing.ProcessError("Manager has shut down")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._state = "started"

    def shutdown(self) -> None:
        """Unlink every segment this manager created (those already gone are skipped)."""
        held, self._held = self._held, []
        self._state = "shutdown" if self._state != "initial" else "initial"
        for shm in held:
            try:  # noqa: SIM105 (someone may have unlinked it already)
                shm.unlink()
            except FileNotFoundError:
                pass
            shm.close()

    def _hold(self, name: str) -> None:
        self._held.append(SharedMemory(name, broker=self._broker))

    def _check(self) -> None:
        if self._state == "initial":
            raise ValueError("SharedMemoryManager is not started")
        if self._state == "shutdown":
            raise multiprocessing.ProcessError("SharedMemoryManager has shut down")

    def SharedMemory(self, size: int) -> _SharedMemory:
        """A new segment of ``size`` bytes, unlinked at :meth:`shutdown`."""
        self._check()
        shm = SharedMemory(None, create=True, size=size, lifetime="refcount", broker=self._broker)
        self._hold(shm.name)
        return shm

    def ShareableList(self, sequence: Iterable[Any] | None) -> _ShareableList:
        """A new :class:`ShareableList`, unlinked at :meth:`shutdown`."""
        self._check()
        sl = ShareableList(sequence, lifetime="refcount", broker=self._broker)
        self._hold(sl.shm.name)
        return sl

    def __enter__(self) -> SharedMemoryManager:
        if self._state == "initial":
            self.start()
        if self._state != "started":
            raise multiprocessing.ProcessError("Unable to start server")
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
