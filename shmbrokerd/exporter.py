"""``shmbroker-exporter``: the daemon's ``stats`` as Prometheus metrics over HTTP.

Strategy: a process of its own, so the daemon keeps its sandbox (no network
at all); this one holds only an HTTP listener (normally handed over by its
systemd socket unit) and a connection to the daemon's socket made at each
scrape.  Nothing is cached: every scrape asks the daemon, and a daemon that
does not answer gives ``shmbroker_up 0`` (and a log line saying why) rather
than an error page, as postgres_exporter reports ``pg_up``.  The text format
is ``prometheus_client``'s, from a custom collector (:class:`BrokerCollector`)
that turns one ``stats`` reply into metric families.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shmbroker import Broker, socket_path

__all__ = ["BrokerCollector", "ExporterConfig", "load_config", "main"]

PROG = "shmbroker-exporter"
DEFAULT_CONFIG = Path("/etc/shmbroker/exporter.toml")
EX_CONFIG = 78
P = "shmbroker_"

log = logging.getLogger(PROG)


class ExporterConfig(BaseModel):
    """``config/shmbroker-exporter.toml`` documents each key."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    listen: str = "127.0.0.1:9839"
    socket: str = ""
    timeout: float = Field(default=2.0, gt=0, le=60)
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")


def load_config(path: Path | None) -> ExporterConfig:
    """Raises ValueError naming the file and the key."""
    if path is None:
        return ExporterConfig()
    try:
        with open(path, "rb") as f:
            return ExporterConfig.model_validate(tomllib.load(f))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {key}: {first['msg']}") from None


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(P + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


def _histograms(latency: dict[str, Any]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(
        P + "request_duration_seconds",
        "Time from a request's receipt to its reply, inside the daemon.",
        labels=["op"],
    )
    bounds = latency["bounds"]
    for op, h in sorted(latency["ops"].items()):
        running, buckets = 0, []
        for bound, n in zip(bounds, h["buckets"], strict=False):
            running += n
            buckets.append((repr(float(bound)), float(running)))
        buckets.append(("+Inf", float(h["count"])))
        fam.add_metric([op], buckets, h["sum"])
    return fam


def metric_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """One ``stats`` reply as metric families (see docs/operations.md for the list)."""
    yield _gauge("start_time_seconds", "When the daemon started (unix time).", stats["started"])
    requests = CounterMetricFamily(P + "requests", "Requests received, by op.", labels=["op"])
    for op, n in sorted(stats["requests"].items()):
        requests.add_metric([op], n)
    yield requests
    errors = CounterMetricFamily(
        P + "request_errors", "Requests refused, by op and errno.", labels=["op", "errno"]
    )
    for op, codes in sorted(stats["errors_by_errno"].items()):
        for code, n in sorted(codes.items()):
            errors.add_metric([op, code], n)
    yield errors
    yield _histograms(stats["latency"])
    segments = GaugeMetricFamily(P + "segments", "Live segments.", labels=["backing", "lifetime"])
    size = GaugeMetricFamily(
        P + "segments_bytes", "Bytes of live segments.", labels=["backing", "lifetime"]
    )
    for row in stats["by_kind"]:
        segments.add_metric([row["backing"], row["lifetime"]], row["segments"])
        size.add_metric([row["backing"], row["lifetime"]], row["bytes"])
    yield segments
    yield size
    yield _gauge("leases", "Leases held (and awaiting reclaim).", stats["leases"])
    yield _gauge("clients", "Connected clients.", stats["clients"])
    yield _gauge("waiting_opens", "Opens waiting for their name.", stats["waiting_opens"])
    yield from _per_uid(stats["uids"])
    shm = stats["shm"]
    for key, doc in (
        ("size", "Size of the backing tmpfs."),
        ("used", "Bytes used on the backing tmpfs (by anyone)."),
        ("free", "Bytes free on the backing tmpfs (for unprivileged users)."),
    ):
        fam = GaugeMetricFamily(P + f"shm_{key}_bytes", doc + " (statvfs)", labels=["path"])
        fam.add_metric([shm["path"]], shm[key])
        yield fam
    journal = stats["journal"]
    yield _counter("journal_writes", "Successful journal writes.", journal["writes"])
    yield _counter("journal_records", "Records written to the journal.", journal["records"])
    yield _counter("journal_write_failures", "Journal writes that failed.", journal["failures"])
    yield SummaryMetricFamily(
        P + "snapshot_duration_seconds",
        "Time to write a state snapshot.",
        count_value=journal["snapshots"],
        sum_value=journal["snapshot_seconds"],
    )
    yield _gauge(
        "last_snapshot_duration_seconds",
        "Time the last state snapshot took.",
        journal["last_snapshot_seconds"],
    )
    yield _counter(
        "snapshot_failures", "State snapshots that failed.", journal["snapshot_failures"]
    )
    events = stats["events"]
    yield _counter("events_published", "Events handed to subscribers.", events["published"])
    yield _counter("events_dropped", "Events the daemon could not publish.", events["dropped"])
    yield _counter("ttl_expiries", "ttl countdowns that ran out.", stats["ttl_expiries"])
    yield _counter("reclaims", "Leases reclaimed after a restart.", stats["reclaims"]["done"])
    yield _counter(
        "reclaims_lapsed",
        "Leases released because the reclaim window ended first.",
        stats["reclaims"]["lapsed"],
    )
    recovery = stats["recovery"]
    yield _counter(
        "restarts_recovered",
        "Starts that took back a previous run's state (kept in the state directory).",
        recovery["restarts"],
    )
    yield _gauge("recovered_segments", "Segments taken back at start.", recovery["segments"])
    yield _gauge("recovered_leases", "Leases restored at start.", recovery["leases"])
    yield _gauge(
        "recovery_duration_seconds", "Time the start-up recovery took.", recovery["seconds"]
    )


def _per_uid(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    fams = {
        key: GaugeMetricFamily(P + f"uid_{key}", doc, labels=["uid"])
        for key, doc in (
            ("bytes", "Bytes of the live segments a uid created."),
            ("segments", "Live segments a uid created."),
            ("quota_bytes", "The uid's byte quota (0: none)."),
            ("quota_segments", "The uid's segment quota (0: none)."),
        )
    }
    for row in rows:
        for key, fam in fams.items():
            fam.add_metric([str(row["uid"])], row[key])
    yield from fams.values()


class BrokerCollector:
    """Asks the daemon at each collection; ``shmbroker_up 0`` when it cannot."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: "up", why the last scrape failed, or "" before the first: logged on change
        self._state = ""

    def stats(self) -> dict[str, Any]:
        """Raises OSError when the daemon cannot be asked (or refuses).

        Waits are bounded by the process's default socket timeout (``main``).
        """
        with Broker(self.path, reconnect_timeout=0) as broker:
            return broker.stats().model_dump(mode="json")

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats()
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if reason != self._state:
                log.warning("shmbrokerd at %s does not answer: %s", self.path, reason)
            self._state = reason
            yield _gauge("up", "1 if the daemon answered this scrape.", 0)
            return
        if self._state not in ("", "up"):
            log.info("shmbrokerd at %s answers again", self.path)
        self._state = "up"
        yield _gauge("up", "1 if the daemon answered this scrape.", 1)
        yield from metric_families(stats)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news."""


def _listener(listen: str) -> socket.socket:
    """The socket systemd handed over, else one bound to ``listen`` (HOST:PORT)."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        sock = socket.socket(fileno=3)
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("the socket systemd passed is not a stream socket")
        sock.set_inheritable(False)
        return sock
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen: {listen!r} is not HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family)


class _AdoptingServer(ThreadingWSGIServer):
    """Serves on a socket it is given (socketserver always makes one of its own:
    AF_UNIX, the one family the unit lets this process create; closed at once)."""

    address_family = socket.AF_UNIX


def serve(sock: socket.socket, registry: CollectorRegistry) -> NoReturn:
    server = _AdoptingServer(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name, server.server_port = str(sock.getsockname()[0]), sock.getsockname()[1]
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    log.info("serving /metrics on %s:%d", server.server_name, server.server_port)
    server.serve_forever()
    raise SystemExit(0)


def _stop(signum: int, frame: object) -> NoReturn:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Prometheus metrics of shmbrokerd.")
    p.add_argument("--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--listen", help="HOST:PORT when systemd passes no socket")
    p.add_argument("--socket", help="the daemon's socket")
    a = p.parse_args(argv)
    path = a.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    logging.basicConfig(format=f"{PROG}: %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(path)
        logging.getLogger().setLevel(cfg.log_level.upper())
        sock = _listener(a.listen or cfg.listen)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_CONFIG
    # bounds every wait: on the daemon (a stuck one is "down"), and on HTTP peers
    socket.setdefaulttimeout(cfg.timeout)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(socket_path(a.socket or cfg.socket or None)))
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve(sock, registry)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
