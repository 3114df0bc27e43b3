"""The daemon's runner: set up, serve, clean up.

Strategy (as aiohttp's ``BaseRunner``): :meth:`Daemon.run` is
:meth:`~Daemon.setup` (take the prefix, make the edges, recover the last
run, listen, say ready), :meth:`~Daemon.serve` (until SIGTERM or SIGINT)
and :meth:`~Daemon.cleanup`, symmetric with setup.  The socket is
``listener.py``'s, the recovery ``recovery.py``'s; what stays here is the
order of the phases and the services the server calls back (config,
reload, ``hello`` and ``stats`` contents, who is an operator).  Signal
handlers are installed in one place and removed on the way out.  Cleanup
is sequential and bounded: stop accepting, flush replies already owed,
drop every peer (keeping every lease on a live segment for reclaim after
the restart, as a crash would: a stop is not the holders' doing), save the
state, close the edges.  One daemon runs per ``shm_prefix``
(``prefix_lock.py``), taken before anything under it is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmbroker import wire

from . import __version__
from .backing import Store
from .config import (
    Config,
    ConfigError,
    build_policy,
    default_runtime_dir,
    load,
    restart_needed,
)
from .events import EventPublisher, ipc_endpoint_for
from .ids import TokenSource, segment_ids
from .listener import UnixListener
from .metrics import registry_stats, shm_usage
from .prefix_lock import PrefixLock
from .recovery import recover
from .registry import Registry, RegistryLimits
from .server import Server, ServerLimits
from .state import StateFile
from .systemd_glue import Supervisor

__all__ = ["Daemon", "Options"]

log = logging.getLogger("shmbrokerd")
SHUTDOWN_GRACE = 3.0
#: How long journal records no reply waits for (``unlease``) may stay
#: unwritten: they go with the next record that must precede a reply, or
#: this much later, so a client's open+release costs one ``write``, not two.
JOURNAL_LAG = 0.05
STATUS_INTERVAL = 2.0


@dataclass(frozen=True)
class Options:
    """What the command line said; flags override the config file."""

    config: Path | None
    socket: str | None = None
    state_dir: str | None = None
    events: str | None = None
    log_level: str | None = None
    shm_prefix: str | None = None

    def overrides(self) -> dict[str, object]:
        return {
            "socket": self.socket,
            "state_dir": self.state_dir,
            "events": self.events,
            "log_level": self.log_level,
            "shm_prefix": self.shm_prefix,
        }


def _gid(group: str | int) -> int | None:
    if group == "":
        return None
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"no such group: {group!r}") from None


class Daemon:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.config = self._load()
        runtime = None
        if not self.config.socket or not self.config.state_dir:
            runtime = default_runtime_dir()
        self.socket_path = self.config.socket or str(runtime / "shmbroker.sock")  # type: ignore[operator]
        self.state_dir = Path(self.config.state_dir or runtime / "state")  # type: ignore[operator]
        self.events_endpoint = self.config.events or ipc_endpoint_for(self.socket_path)
        self.socket_gid = _gid(self.config.socket_group)
        self.admin_gid = _gid(self.config.admin_group)
        self.monitor_gid = _gid(self.config.monitor_group)
        self._stop = asyncio.Event()
        self.exit_code = 0
        self.supervisor = Supervisor()
        self._lag: asyncio.TimerHandle | None = None
        #: what the start-up took back from the last run (``stats``: ``recovery``)
        self.recovery: dict[str, Any] = {}

    def _load(self) -> Config:
        return load(self.options.config, self.options.overrides())

    # -- phases ----------------------------------------------------------------

    async def run(self) -> int:
        """Set up, serve until SIGTERM or SIGINT, clean up; the exit code."""
        loop = asyncio.get_running_loop()
        self.setup(loop)
        try:
            await self.serve()
        finally:
            await self.cleanup(loop)
        return self.exit_code

    def setup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the prefix, make the edges, recover the last run, listen, say ready."""
        handover = self.supervisor.take_fds()
        self._prepare()
        try:
            self.recovery = recover(
                self.state,
                self.store,
                self.registry,
                handover.memfds,
                drop_fd=self.supervisor.drop_fd,
                reclaim_window=self.config.reclaim_window,
            )
            listener = self.listener.start(handover.listener)
        except BaseException:  # not started: the prefix is free for another try
            self.prefix_lock.release()
            raise
        self._start(loop, listener)

    def _start(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        """Accept, publish, time the reclaim window; then READY=1 (the socket accepts)."""
        self.events = EventPublisher(
            self.events_endpoint, self.config.events_hwm, defer=loop.call_soon
        )
        gid = self.socket_gid if self.socket_gid is not None else os.getegid()
        self.events.set_access(os.geteuid(), gid, self.config.socket_mode)
        self.registry.wants_event = self.events.wanted
        self.server.start(listener)
        loop.add_reader(self.events.fileno(), self.events.readable)
        self.events.readable()
        self.registry.open_reclaim_window(time.time(), self.config.reclaim_window)
        loop.call_later(self.config.reclaim_window, self._end_reclaim)
        self.server.run_effects()
        self._install_signals(loop)
        self.supervisor.ready(self.status_line())
        self.supervisor.start_watchdog(loop)
        self._status_timer(loop)
        log.info(
            "shmbrokerd %s ready on %s (events %s)",
            __version__,
            self.socket_path + (" (from systemd)" if self.listener.from_systemd else ""),
            self.events_endpoint,
        )

    async def serve(self) -> None:
        """Serve (the server's callbacks do the work) until asked to stop."""
        await self._stop.wait()

    def _prepare(self) -> None:
        cfg = self.config
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.shm_prefix)
        # before anything under the prefix is looked at (recovery unlinks orphans)
        self.prefix_lock = PrefixLock(self.store.shm_dir, cfg.shm_prefix)
        self.prefix_lock.acquire()
        self.state = StateFile(self.state_dir, cfg.state_compact_after)
        self.listener = UnixListener(self.socket_path, cfg.socket_mode, self.socket_gid)
        self.registry = Registry(
            self._limits(cfg),
            new_token=TokenSource().next,
            new_segment_id=segment_ids(),
            journal=self.state.record,
            policy=build_policy(cfg),
            wants_event=lambda name: False,  # no subscriber before the events socket
        )
        self.server = Server(
            self.registry,
            self.store,
            self._server_limits(cfg),
            publish=lambda ev, ts: self.events.publish(ev, ts),
            hello_info=self.hello_info,
            reload=self.reload,
            is_operator=self.is_operator,
            is_monitor=self.is_monitor,
            journal=self.state,
            after_replies=self._after_replies,
            memfd_created=self._memfd_created,
            memfd_unlinked=self.supervisor.drop_fd,
            stats_extra=self.stats_extra,
        )

    def _limits(self, cfg: Config) -> RegistryLimits:
        total = cfg.max_total_bytes or _tmpfs_size(self.store.shm_dir)
        return RegistryLimits(
            max_segment_size=cfg.max_segment_size,
            max_segments=cfg.max_segments,
            max_total_bytes=total,
            max_wait=cfg.max_wait,
            memfd_persistent=cfg.memfd_fdstore,
            default_backing=cfg.default_backing,
        )

    @staticmethod
    def _server_limits(cfg: Config) -> ServerLimits:
        return ServerLimits(
            max_clients=cfg.max_clients,
            max_clients_per_uid=cfg.max_clients_per_uid,
            max_waiting_opens=cfg.max_waiting_opens,
            max_queued_replies=cfg.max_queued_replies,
        )

    def _after_replies(self) -> None:
        """What trails the replies (see ``JOURNAL_LAG``) is caught up with later."""
        if self._lag is None and self.state.trailing:
            self._lag = asyncio.get_running_loop().call_later(JOURNAL_LAG, self._catch_up)

    def _catch_up(self) -> None:
        self._lag = None
        try:
            self.state.catch_up()
        except OSError as exc:  # kept, written with the next change that must be
            log.error("journal not written: %s", exc)

    def _memfd_created(self, segment_id: str) -> None:
        fd = self.store.memfd(segment_id)
        if fd is not None and self.config.memfd_fdstore:
            self.supervisor.store_fd(segment_id, fd)

    def _end_reclaim(self) -> None:
        count = self.registry.unreclaimed()
        self.registry.end_reclaim_window(time.time())
        self.server.run_effects()
        if count:
            log.info("reclaim window over: released %d unreclaimed leases", count)

    def status_line(self) -> str:
        reg = self.registry
        return (
            f"{len(reg.segments)} segments, {reg.total_bytes / (1 << 20):.0f} MiB, "
            f"{len(self.server.conns)} clients"
        )

    def _status_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        last = ""

        def tick() -> None:
            nonlocal last
            line = self.status_line()
            if line != last:
                self.supervisor.status(line)
                last = line
            loop.call_later(STATUS_INTERVAL, tick)

        loop.call_later(STATUS_INTERVAL, tick)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    async def cleanup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop accepting, flush owed replies, keep the held leases, save state."""
        log.info("shutting down")
        self.supervisor.stopping()
        self.supervisor.stop_watchdog()
        self._remove_signals(loop)
        self.server.stop_accepting()
        self.listener.stop()
        await self.server.drain_and_close(time.monotonic() + SHUTDOWN_GRACE)
        if self._lag is not None:
            self._lag.cancel()
        try:
            if self.state.dirty:  # what is buffered counts: compact writes it first
                self.state.compact(self.registry.records())
        except OSError as exc:  # say so, and stop all the same
            log.error("state not saved at stop: %s", exc)
            self.exit_code = 1
        self.state.close()
        loop.remove_reader(self.events.fileno())
        self.events.close()
        self.store.close()
        self.prefix_lock.release()
        log.info("stopped")

    # -- services the server calls -------------------------------------------------

    def stats_extra(self) -> dict[str, Any]:
        """What ``stats`` adds to the server's counters: the edges' and the gauges."""
        counters = self.state.counters
        return {
            **registry_stats(self.registry),
            "shm": shm_usage(self.store.shm_dir),
            "journal": {
                "writes": counters.writes,
                "records": counters.records,
                "failures": counters.write_failures,
                "snapshots": counters.snapshots,
                "snapshot_failures": counters.snapshot_failures,
                "snapshot_seconds": counters.snapshot_seconds,
                "last_snapshot_seconds": counters.last_snapshot_seconds,
            },
            "events": {
                "published": self.events.published,
                "dropped": self.events.dropped + self.server.metrics.events_unsaved,
            },
            "recovery": self.recovery,
        }

    def is_operator(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        if uid in (0, os.geteuid()):
            return True
        return self.admin_gid is not None and (gid == self.admin_gid or self.admin_gid in groups)

    def is_monitor(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        """May read ``stats`` (and nothing more than anyone): the exporter's group."""
        mon = self.monitor_gid
        return mon is not None and (gid == mon or mon in groups)

    def hello_info(self) -> dict[str, Any]:
        cfg = self.config
        features = ["shm", "memfd", "seal", "wait", "reclaim", "events"]
        if cfg.memfd_fdstore:
            features.append("memfd-persistent")
        return {
            "server": f"shmbrokerd/{__version__}",
            "versions": [wire.PROTOCOL_VERSION],
            "features": features,
            "limits": {
                "max_message": wire.MAX_MESSAGE,
                "max_segment_size": cfg.max_segment_size,
                "max_wait": cfg.max_wait,
                "reclaim_window": cfg.reclaim_window,
                "max_segments": cfg.max_segments,
            },
            "events": self.events_endpoint,
        }

    def reload(self) -> list[str]:
        """Re-read the config; on error keep the old one and raise ConfigError.

        Returns the changed keys that take effect only on restart (the rest
        is applied).
        """
        try:
            cfg = self._load()
            admin_gid = _gid(cfg.admin_group)
            monitor_gid = _gid(cfg.monitor_group)
            policy = build_policy(cfg)
        except ConfigError as exc:
            log.error("reload refused, keeping the old config: %s", exc)
            raise
        fixed = (
            "socket",
            "socket_mode",
            "socket_group",
            "events",
            "state_dir",
            "state_compact_after",
            "shm_prefix",
        )
        changed = [k for k in fixed if getattr(cfg, k) != getattr(self.config, k)]
        if changed:
            log.warning("reload: %s", restart_needed(changed))
        self.config = cfg
        self.admin_gid = admin_gid
        self.monitor_gid = monitor_gid
        self.registry.limits = self._limits(cfg)
        self.registry.policy = policy
        self.server.limits = self._server_limits(cfg)
        logging.getLogger().setLevel(cfg.log_level.upper())
        log.info("configuration reloaded")
        return changed

    def _reload_from_signal(self) -> None:
        with contextlib.suppress(ConfigError):
            self.reload()


def _tmpfs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize
