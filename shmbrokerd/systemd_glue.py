"""Everything the daemon says to or takes from systemd, in one thin module.

When systemd did not start us (no ``NOTIFY_SOCKET``, no ``LISTEN_FDS``)
every call here is a no-op, so the daemon runs the same by hand.  Watchdog
pings are scheduled on the event loop itself: if the loop is stuck, pings
stop and systemd kills and restarts the daemon.  memfd segments are parked
in systemd's fd store under ``seg-<id>`` so they survive a restart or crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field

__all__ = ["FDNAME_PREFIX", "Handover", "Supervisor", "journal_handler"]

FDNAME_PREFIX = "seg-"
log = logging.getLogger("shmbrokerd.systemd")


@dataclass
class Handover:
    """What systemd passed at start: the listening socket and stored memfds."""

    listener: socket.socket | None = None
    memfds: dict[str, int] = field(default_factory=dict)


class Supervisor:
    def __init__(self) -> None:
        self.notifying = bool(os.environ.get("NOTIFY_SOCKET"))
        self._watchdog: asyncio.TimerHandle | None = None

    def _notify(self, state: str, fds: list[int] | None = None) -> None:
        if not self.notifying:
            return
        from systemd import daemon

        daemon.notify(state, fds=fds) if fds else daemon.notify(state)

    def take_fds(self) -> Handover:
        """Adopt ``LISTEN_FDS``: the socket unit's socket and fd-store memfds."""
        handover = Handover()
        if not os.environ.get("LISTEN_FDS"):
            return handover
        from systemd import daemon

        named: dict[int, str] = daemon.listen_fds_with_names(unset_environment=True)
        for fd, name in named.items():
            if name.startswith(FDNAME_PREFIX):
                os.set_inheritable(fd, False)
                handover.memfds[name[len(FDNAME_PREFIX) :]] = fd
            elif handover.listener is None and daemon.is_socket_unix(fd, socket.SOCK_SEQPACKET):
                handover.listener = socket.socket(fileno=fd)
                handover.listener.set_inheritable(False)
            else:
                log.warning("closing unexpected fd %d (%s) passed by systemd", fd, name)
                os.close(fd)
        return handover

    def ready(self, status: str) -> None:
        self._notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self._notify(f"STATUS={status}")

    def reloading(self) -> None:
        self._notify("RELOADING=1")

    def stopping(self) -> None:
        self._notify("STOPPING=1\nSTATUS=stopping")

    def store_fd(self, segment_id: str, fd: int) -> None:
        self._notify(f"FDSTORE=1\nFDNAME={FDNAME_PREFIX}{segment_id}", fds=[fd])

    def drop_fd(self, segment_id: str) -> None:
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={FDNAME_PREFIX}{segment_id}")

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping at half the interval systemd asks for, from the loop itself."""
        usec = os.environ.get("WATCHDOG_USEC")
        wpid = os.environ.get("WATCHDOG_PID")
        if not self.notifying or not usec or (wpid and int(wpid) != os.getpid()):
            return
        interval = int(usec) / 1e6 / 2

        def ping() -> None:
            self._notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        ping()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def journal_handler() -> logging.Handler | None:
    """A journald handler when stderr goes to the journal, else None.

    ``JOURNAL_STREAM`` (``DEV:INODE`` of the stream systemd connected) is
    inherited by children whose stderr may be redirected elsewhere, so it only
    counts when it names our stderr, as sd_journal_stream_fd(3) advises.
    """
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return None
    try:
        st = os.fstat(2)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != (int(dev), int(ino)):
        return None
    from systemd import journal

    handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER="shmbrokerd")
    return handler
