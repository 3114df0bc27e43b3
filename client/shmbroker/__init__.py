"""Client library for shmbrokerd: ask for a shared memory region by name, get
it mapped.

>>> from shmbroker import Broker
>>> with Broker() as broker, broker.create("camera/frames", 1 << 20) as seg:
...     seg.buf[:5] = b"hello"
"""

from __future__ import annotations

from ._async import AsyncBroker
from ._paths import socket_path
from ._sync import Broker
from .errors import (
    BrokerError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentPermissionError,
    SegmentTimeoutError,
)
from .ring import (
    Message,
    Ring,
    RingClosedError,
    RingOverrunError,
    RingReader,
    RingWriter,
    RingWriterGoneError,
)
from .segment import Segment
from .wire import ClientInfo, Event, HelloResult, Holder, SegmentInfo, StatsResult

__all__ = [
    "AsyncBroker",
    "Broker",
    "BrokerError",
    "ClientInfo",
    "Event",
    "HelloResult",
    "Holder",
    "Message",
    "Ring",
    "RingClosedError",
    "RingOverrunError",
    "RingReader",
    "RingWriter",
    "RingWriterGoneError",
    "Segment",
    "SegmentExistsError",
    "SegmentInfo",
    "SegmentNotFoundError",
    "SegmentPermissionError",
    "SegmentTimeoutError",
    "StatsResult",
    "socket_path",
]
__version__ = "0.1.0"
