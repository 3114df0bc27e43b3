"""What ring readers and writers raise."""

from __future__ import annotations

__all__ = ["RingClosedError", "RingOverrunError", "RingWriterGoneError"]


class RingOverrunError(Exception):
    """The writer lapped this reader: ``lost`` messages are gone.

    The reader has already moved past them: the next read returns the oldest
    message that may still be intact (or reports a further overrun).  When
    raised by a zero-copy :class:`Message` release, the bytes seen through
    its view may have been torn: discard whatever was read from them.
    """

    def __init__(self, lost: int, seq: int) -> None:
        super().__init__(f"reader overrun: {lost} message(s) lost, next is {seq}")
        self.lost = lost
        #: the sequence number the reader will read next
        self.seq = seq


class RingClosedError(EOFError):
    """The writer closed the ring and every message it published was read."""


class RingWriterGoneError(RingClosedError):
    """The writer went without closing (it died), and every message it published was read.

    Seen by a reader that finds nothing to read, in the writer's pid
    namespace (the ring's header names the writer's process).
    """
