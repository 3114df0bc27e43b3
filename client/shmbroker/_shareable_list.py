"""``ShareableList``: CPython's fixed-length list in shared memory, byte for byte.

The layout is CPython's, so that either implementation reads what the
other wrote (tests/integration/test_shared_memory.py checks it on the same bytes):

* ``q``: the number of items N;
* N + 1 ``q``: each item's offset into the data area, then the area's end;
* the data area: ``q``, ``d``, ``xxxxxxx?`` (bool), ``xxxxxx?x`` (None),
  or ``<k>s`` for str (UTF-8) and bytes, k a multiple of 8 above the
  item's length in characters (so a str of multibyte characters can be cut
  short, as in CPython), padded with NULs;
* N ``8s``: each item's ``struct`` format;
* N ``b``: each item's back transform (0 as is, 1 str, 2 bytes, 3 None).

Trailing NULs of str and bytes items are lost (CPython gh-106939, kept for
compatibility).  CPython's private helpers (``_get_packing_format`` and the
offsets) keep their names: code in the wild uses them.
"""

from __future__ import annotations

import functools
import struct
import types
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Unpack

if TYPE_CHECKING:
    from ._shm_names import Extras
    from .shared_memory import SharedMemory

__all__ = ["ShareableList"]

_ENCODING = "utf8"
_ALIGNMENT = 8
_TYPES: dict[type[Any], str] = {
    int: "q",
    float: "d",
    bool: "xxxxxxx?",
    str: "%ds",
    bytes: "%ds",
    type(None): "xxxxxx?x",
}


def _format_of(item: Any) -> str:
    """The item's slot format; ``KeyError`` for a type CPython cannot store either."""
    fmt = _TYPES[type(item)]
    if isinstance(item, str | bytes):
        return fmt % (_ALIGNMENT * (len(item) // _ALIGNMENT + 1))
    return fmt


def _code_of(value: Any) -> int:
    if isinstance(value, str):
        return 1
    if isinstance(value, bytes):
        return 2
    return 3 if value is None else 0


def _back(code: int, value: Any) -> Any:
    if code == 1:
        return value.rstrip(b"\x00").decode(_ENCODING)
    if code == 2:
        return value.rstrip(b"\x00")
    return None if code == 3 else value


class ShareableList:
    """A fixed-length list of int, float, bool, str, bytes and None in a
    :class:`SharedMemory` segment (``shm``), as CPython's.

    Made from ``sequence`` (a new segment, named ``name`` or generated), or
    attached to the segment ``name``.  Raises ``IndexError`` out of range,
    ``ValueError`` for a str or bytes longer than its slot and from
    ``index`` when absent, ``KeyError`` for a value of another type, and
    what :class:`SharedMemory` raises.  The keyword-only extras go to it.
    """

    def __init__(
        self,
        sequence: Iterable[Any] | None = None,
        *,
        name: str | None = None,
        **extras: Unpack[Extras],
    ) -> None:
        from .shared_memory import SharedMemory

        if name is not None and sequence is None:
            self.shm: SharedMemory = SharedMemory(name, **extras)
            self._list_len = len(self)
            self._allocated_offsets: list[int] = list(
                struct.unpack_from(self._format_size_metainfo, self._mem, 8)
            )
            return
        items = list(sequence) if sequence is not None else []
        formats = [_format_of(item) for item in items]
        self._list_len = len(items)
        self._allocated_offsets = [0]
        for fmt in formats:
            step = _ALIGNMENT if fmt[-1] != "s" else int(fmt[:-1])
            self._allocated_offsets.append(self._allocated_offsets[-1] + step)
        size = struct.calcsize(
            "q"
            + self._format_size_metainfo
            + "".join(formats)
            + self._format_packing_metainfo
            + self._format_back_transform_codes
        )
        self.shm = SharedMemory(name, create=True, size=size, **extras)
        mem = self._mem
        struct.pack_into(
            "q" + self._format_size_metainfo, mem, 0, self._list_len, *self._allocated_offsets
        )
        struct.pack_into(
            "".join(formats),
            mem,
            self._offset_data_start,
            *(v.encode(_ENCODING) if isinstance(v, str) else v for v in items),
        )
        struct.pack_into(
            self._format_packing_metainfo,
            mem,
            self._offset_packing_formats,
            *(f.encode(_ENCODING) for f in formats),
        )
        struct.pack_into(
            self._format_back_transform_codes,
            mem,
            self._offset_back_transform_codes,
            *(_code_of(v) for v in items),
        )

    @property
    def _mem(self) -> memoryview:
        buf = self.shm.buf
        if buf is None:  # closed: CPython's struct call fails the same way
            raise TypeError("a bytes-like object is required, not 'NoneType'")
        return buf

    def _position(self, position: int) -> int:
        """``position`` from 0, or CPython's ``IndexError`` (also for one
        before the start, which CPython lets read and write out of bounds)."""
        position = position if position >= 0 else position + self._list_len
        if not 0 <= position < self._list_len:
            raise IndexError("Requested position out of range.")
        return position

    def _get_packing_format(self, position: int) -> str:
        """The ``struct`` format of the item at ``position``."""
        position = self._position(position)
        offset = self._offset_packing_formats + position * 8
        raw: bytes = struct.unpack_from("8s", self._mem, offset)[0]
        return raw.rstrip(b"\x00").decode(_ENCODING)

    def _get_back_transform_code(self, position: int) -> int:
        code: int = struct.unpack_from(
            "b", self._mem, self._offset_back_transform_codes + self._position(position)
        )[0]
        return code

    def _set_packing_format_and_transform(self, position: int, fmt: str, value: Any) -> None:
        position = self._position(position)
        mem = self._mem
        struct.pack_into("8s", mem, self._offset_packing_formats + position * 8, fmt.encode())
        struct.pack_into("b", mem, self._offset_back_transform_codes + position, _code_of(value))

    def __getitem__(self, position: int) -> Any:
        try:
            position = self._position(position)
            fmt = self._get_packing_format(position)
            offset = self._offset_data_start + self._allocated_offsets[position]
        except IndexError:
            raise IndexError("index out of range") from None
        (value,) = struct.unpack_from(fmt, self._mem, offset)
        return _back(self._get_back_transform_code(position), value)

    def __setitem__(self, position: int, value: Any) -> None:
        try:
            position = self._position(position)
            current = self._get_packing_format(position)
            start = self._allocated_offsets[position]
        except IndexError:
            raise IndexError("assignment index out of range") from None
        encoded = value
        if not isinstance(value, str | bytes):
            fmt = _TYPES[type(value)]
        else:
            room = self._allocated_offsets[position + 1] - start
            encoded = value.encode(_ENCODING) if isinstance(value, str) else value
            if len(encoded) > room:
                raise ValueError("bytes/str item exceeds available storage")
            fmt = current if current[-1] == "s" else f"{room}s"
        self._set_packing_format_and_transform(position, fmt, value)
        struct.pack_into(fmt, self._mem, self._offset_data_start + start, encoded)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self._list_len))

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return functools.partial(self.__class__, name=self.shm.name), ()

    def __len__(self) -> int:
        n: int = struct.unpack_from("q", self._mem, 0)[0]
        return n

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self) -> str:
        """The ``struct`` format of all the items, in order."""
        return "".join(self._get_packing_format(i) for i in range(self._list_len))

    @property
    def _format_size_metainfo(self) -> str:
        return "q" * (self._list_len + 1)

    @property
    def _format_packing_metainfo(self) -> str:
        return "8s" * self._list_len

    @property
    def _format_back_transform_codes(self) -> str:
        return "b" * self._list_len

    @property
    def _offset_data_start(self) -> int:
        return (self._list_len + 2) * 8

    @property
    def _offset_packing_formats(self) -> int:
        return self._offset_data_start + self._allocated_offsets[-1]

    @property
    def _offset_back_transform_codes(self) -> int:
        return self._offset_packing_formats + self._list_len * 8

    def count(self, value: Any) -> int:
        """The number of items equal to ``value``."""
        return sum(1 for entry in self if value == entry)

    def index(self, value: Any) -> int:
        """The first position of ``value``; ``ValueError`` if absent."""
        for position, entry in enumerate(self):
            if value == entry:
                return position
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__: classmethod[Any, Any, types.GenericAlias] = classmethod(types.GenericAlias)
