"""The daemon's lifecycle: configure, bind, say ready, serve, shut down.

Strategy (as aiohttp's runner): each phase is one method, run in order by
:meth:`Daemon.run`.  Signal handlers are installed in one place and removed
on the way out.  Shutdown is sequential and bounded: stop accepting, flush
replies already owed, drop every peer (which releases their leases, so
``refcount`` and ``owner`` segments are unlinked), close the edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import secrets
import signal
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmbroker import wire

from . import __version__
from .backing import Store
from .config import Config, ConfigError, default_runtime_dir, load
from .events import EventPublisher, ipc_endpoint_for
from .registry import Limits, Registry
from .server import Server, ServerLimits

__all__ = ["Daemon", "Options"]

log = logging.getLogger("shmbrokerd")
SHUTDOWN_GRACE = 3.0


@dataclass(frozen=True)
class Options:
    """What the command line said; flags override the config file."""

    config: Path | None
    socket: str | None = None
    state_dir: str | None = None
    events: str | None = None
    log_level: str | None = None

    def overrides(self) -> dict[str, object]:
        return {
            "socket": self.socket,
            "state_dir": self.state_dir,
            "events": self.events,
            "log_level": self.log_level,
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
        self._stop = asyncio.Event()
        self.exit_code = 0

    def _load(self) -> Config:
        return load(self.options.config, self.options.overrides())

    # -- phases ----------------------------------------------------------------

    async def run(self) -> int:
        self._prepare()
        listener = self._bind()
        self.events = EventPublisher(self.events_endpoint, self.config.events_hwm)
        self.events.set_access(
            os.geteuid(),
            self.socket_gid if self.socket_gid is not None else os.getegid(),
            self.config.socket_mode,
        )
        self.server.start(listener)
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        log.info(
            "shmbrokerd %s ready on %s (events %s)",
            __version__,
            self.socket_path,
            self.events_endpoint,
        )
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(loop)
        return self.exit_code

    def _prepare(self) -> None:
        cfg = self.config
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(cfg.shm_prefix)
        self.registry = Registry(
            self._limits(cfg),
            new_token=lambda: secrets.token_urlsafe(24),
            new_segment_id=_segment_id_factory(),
        )
        self.server = Server(
            self.registry,
            self.store,
            ServerLimits(max_clients=cfg.max_clients),
            publish=lambda ev, ts: self.events.publish(ev, ts),
            hello_info=self.hello_info,
            reload=self.reload,
            is_operator=self.is_operator,
        )
        self._reconcile()

    def _limits(self, cfg: Config) -> Limits:
        total = cfg.max_total_bytes or _tmpfs_size(self.store.shm_dir)
        return Limits(
            max_segment_size=cfg.max_segment_size,
            max_segments=cfg.max_segments,
            max_total_bytes=total,
            max_wait=cfg.max_wait,
            memfd_persistent=cfg.memfd_fdstore,
        )

    def _reconcile(self) -> None:
        """Objects under our prefix that no state names are leftovers of a crash."""
        for seg_id in list(self.store.objects()):
            log.warning("removing orphaned object %s (no state entry)", self.store.path(seg_id))
            self.store.unlink(seg_id, "shm")

    def _bind(self) -> socket.socket:
        path = self.socket_path
        if len(path.encode()) >= 108:
            raise ConfigError(f"socket path is over 107 bytes: {path}")
        self._clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if self.socket_gid is not None:
            os.chown(path, -1, self.socket_gid)
        os.chmod(path, self.config.socket_mode)
        sock.listen(512)
        return sock

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover of a crash
        else:
            raise ConfigError(f"another daemon is serving {path}")
        finally:
            probe.close()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        log.info("shutting down")
        self._remove_signals(loop)
        self.server.stop_accepting()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        await self.server.drain_and_close(time.monotonic() + SHUTDOWN_GRACE)
        self.events.close()
        self.store.close()
        log.info("stopped")

    # -- services the server calls -------------------------------------------------

    def is_operator(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        if uid in (0, os.geteuid()):
            return True
        return self.admin_gid is not None and (gid == self.admin_gid or self.admin_gid in groups)

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

    def reload(self) -> None:
        """Re-read the config; on error keep the old one and raise ConfigError."""
        try:
            cfg = self._load()
            admin_gid = _gid(cfg.admin_group)
        except ConfigError as exc:
            log.error("reload refused, keeping the old config: %s", exc)
            raise
        fixed = ("socket", "socket_mode", "socket_group", "events", "state_dir", "shm_prefix")
        changed = [k for k in fixed if getattr(cfg, k) != getattr(self.config, k)]
        if changed:
            log.warning("reload: %s take effect only on restart", ", ".join(changed))
        self.config = cfg
        self.admin_gid = admin_gid
        self.registry.limits = self._limits(cfg)
        self.server.limits.max_clients = cfg.max_clients
        logging.getLogger().setLevel(cfg.log_level.upper())
        log.info("configuration reloaded")

    def _reload_from_signal(self) -> None:
        with contextlib.suppress(ConfigError):
            self.reload()


def _tmpfs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _segment_id_factory() -> Any:
    """Ids unique across restarts: start time in ns, then a counter, in hex."""
    epoch = time.time_ns()
    counter = 0

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"{epoch:x}-{counter:x}"

    return new_id


def _errno_exit(exc: OSError) -> int:
    return 75 if exc.errno in (errno.EADDRINUSE,) else 1
