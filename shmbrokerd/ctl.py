"""``shmbrokerctl``: the operator's tool over the daemon's request socket.

Every command is a generator of output chunks that talks to the daemon
through the sync client :class:`shmbroker.Broker`; :func:`main` writes the
chunks and turns failures into one line on stderr and an exit status.  This
keeps "the daemon refused" (a :class:`~shmbroker.BrokerError`), "nobody
listens there" (an ``OSError`` from connecting) and "our reader went away"
(``EPIPE`` on stdout) apart, and no command prints or exits on its own.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

from pydantic import BaseModel

from shmbroker import Broker, ClientInfo, Event, Holder, SegmentInfo, socket_path

from .config import restart_needed

__all__ = ["build_parser", "format_table", "main"]

PROG = "shmbrokerctl"
#: ``reload`` applied, but some changed keys wait for a restart
EXIT_NEEDS_RESTART = 3

Handler = Callable[[Broker, argparse.Namespace], Iterator[str]]

EPILOG = """\
output:
  Aligned tables by default. With --json (before or after the command):
  list and clients print a JSON array, stat and stats one JSON object, and
  watch one JSON object per line (JSON Lines), flushed per event. stat
  adds the holders for operators. delete, drop and reload print nothing on
  stdout in either form: the exit status says how it went.

exit status:
  0  success (watch: stopped by SIGINT or SIGTERM)
  1  the daemon refused (its errno name and message go to stderr),
     or no daemon listens on the socket
  2  usage error
  3  reload: the config was reloaded, but some changed keys take effect only
     when the daemon restarts (named on stderr)

socket, first that applies:
  --socket PATH; $SHMBROKER_SOCKET; /run/shmbroker/shmbroker.sock if it
  exists; $XDG_RUNTIME_DIR/shmbroker/shmbroker.sock
"""


class CtlError(Exception):
    """A failure already phrased for the operator."""


class _NeedsRestart(Exception):
    """``reload`` applied what it could; these keys wait for a restart."""


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived while watching."""


class _OutputClosed(Exception):
    """Whoever reads our stdout went away."""


# -- formatting ----------------------------------------------------------------


def format_table(rows: Iterable[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Rows as left-aligned columns two spaces apart, with an optional header."""
    lines = [list(header)] if header else []
    lines += [list(row) for row in rows]
    if not lines:
        return ""
    widths = [max(len(cells[i]) for cells in lines) for i in range(len(lines[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip() + "\n"
        for cells in lines
    )


def human_size(n: int) -> str:
    """``512 B``, ``4.0 KiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    for unit in units[:-1]:
        value /= 1024
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} {units[-1]}"


def human_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``, ``4d01h``: the two largest units."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def _ttl(seg: SegmentInfo) -> str:
    return "-" if seg.ttl is None else f"{seg.ttl:g}s"


def _owner(seg: SegmentInfo) -> str:
    return f"{seg.owner_uid}:{seg.owner_gid}"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


# -- commands ------------------------------------------------------------------

LIST_HEADER = ("NAME", "SIZE", "LIFETIME", "TTL", "MODE", "OWNER", "LEASES", "SEALED", "BACKING")
CLIENTS_HEADER = ("ID", "PID", "UID", "GID", "LEASES", "CONNECTED", "NAME")
HOLDERS_HEADER = ("CLIENT", "PID", "UID", "ACCESS", "LEASES", "NAME")
OPS_HEADER = ("OP", "REQUESTS", "ERRORS")


def _segment_row(seg: SegmentInfo) -> tuple[str, ...]:
    return (
        seg.name,
        human_size(seg.size),
        seg.lifetime,
        _ttl(seg),
        f"{seg.mode:04o}",
        _owner(seg),
        str(seg.leases),
        _yes_no(seg.sealed),
        seg.backing,
    )


def cmd_list(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    segments = list(broker.list(args.prefix))
    if args.json:
        yield _json([_dump(s) for s in segments])
    else:
        yield format_table(map(_segment_row, segments), LIST_HEADER)


def _holders(broker: Broker, name: str) -> list[Holder] | None:
    """The holders, for an operator; None for anyone else."""
    try:
        return broker.holders(name)
    except PermissionError:
        return None


def _holder_row(h: Holder) -> tuple[str, ...]:
    client = "-" if h.client is None else str(h.client)  # awaiting reclaim
    return (client, _or_dash(h.pid), str(h.uid), h.access, str(h.leases), h.name or "-")


def cmd_stat(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    seg = broker.stat(args.name)
    holders = _holders(broker, args.name)
    if args.json:
        out = _dump(seg)
        if holders is not None:
            out["holders"] = [_dump(h) for h in holders]
        yield _json(out)
        return
    rows = [
        ("name:", seg.name),
        ("id:", seg.id),
        ("size:", f"{human_size(seg.size)} ({seg.size} bytes)"),
        ("lifetime:", seg.lifetime),
        ("ttl:", _ttl(seg)),
        ("mode:", f"{seg.mode:04o}"),
        ("owner:", _owner(seg)),
        ("leases:", str(seg.leases)),
        ("sealed:", _yes_no(seg.sealed)),
        ("backing:", seg.backing),
        ("created:", _timestamp(seg.created)),
    ]
    yield format_table(rows)
    if holders is not None:
        yield "\n" + format_table(map(_holder_row, holders), HOLDERS_HEADER)


def cmd_delete(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    broker.delete(args.name)
    yield from ()


def cmd_reload(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    restart = broker.reload()
    if restart:
        raise _NeedsRestart(restart_needed(restart))
    yield from ()


def cmd_drop(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    broker.drop(args.client)
    yield from ()


def _client_row(client: ClientInfo, now: float) -> tuple[str, ...]:
    numbers = (client.id, client.pid, client.uid, client.gid, client.leases)
    return (*map(str, numbers), human_duration(now - client.connected), client.name or "-")


def cmd_clients(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    clients = list(broker.clients())
    if args.json:
        yield _json([_dump(c) for c in clients])
    else:
        now = time.time()
        yield format_table((_client_row(c, now) for c in clients), CLIENTS_HEADER)


def _extra_rows(extra: dict[str, Any]) -> list[tuple[str, str]]:
    """The counters ``stats`` added over time: scalars as they are, an object of
    scalars one row per key; lists and histograms are for --json and ``top``."""
    rows = []
    for key, value in extra.items():
        if isinstance(value, dict):
            if all(not isinstance(v, dict | list) for v in value.values()):
                rows += [(f"{key}.{k}:", _scalar(v)) for k, v in value.items()]
        elif not isinstance(value, list):
            rows.append((f"{key}:", _scalar(value)))
    return rows


def cmd_stats(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    stats = broker.stats()
    if args.json:
        yield _json(_dump(stats))
        return
    counters = [
        ("uptime:", human_duration(stats.uptime)),
        ("segments:", str(stats.segments)),
        ("bytes:", f"{human_size(stats.bytes)} ({stats.bytes} bytes)"),
        ("clients:", str(stats.clients)),
    ]
    counters += _extra_rows(stats.model_extra or {})
    ops = sorted(stats.requests.keys() | stats.errors.keys())
    by_op = [(op, str(stats.requests.get(op, 0)), str(stats.errors.get(op, 0))) for op in ops]
    yield format_table(counters) + "\n" + format_table(by_op, OPS_HEADER)


def cmd_top(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    from . import top  # imports this module: not at the top

    def fetch() -> dict[str, Any]:
        return broker.stats().model_dump(mode="json")

    try:
        if args.once or args.json or not sys.stdout.isatty():
            for f in top.stream(fetch, args.interval, args.once):
                yield top.as_json(f) if args.json else "\n".join(top.render(f)) + "\n"
        else:
            top.run_curses(fetch, args.interval)
    except KeyboardInterrupt:  # Ctrl-C is how one leaves top, like q
        return


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _event_line(event: Event) -> str:
    who = f"uid={_or_dash(event.uid)} pid={_or_dash(event.pid)}"
    size = human_size(event.size)
    return f"{_timestamp(event.ts)}  {event.event:<8}  {event.name}  {size}  {who}\n"


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def cmd_watch(broker: Broker, args: argparse.Namespace) -> Iterator[str]:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    with broker.watch(args.prefix) as watcher:
        broker.close()  # the event stream needs no request connection
        for event in watcher:
            yield event.model_dump_json() + "\n" if args.json else _event_line(event)


# -- command line --------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, subcommand: bool) -> None:
    """--socket and --json, accepted before and after the command name.

    A subcommand's copies default to SUPPRESS so that an option given before
    the command is not overwritten by the subcommand's default.
    """
    socket_default = argparse.SUPPRESS if subcommand else None
    json_default = argparse.SUPPRESS if subcommand else False
    parser.add_argument("--socket", metavar="PATH", default=socket_default, help="daemon socket")
    parser.add_argument(
        "--json", action="store_true", default=json_default, help="JSON output (see below)"
    )


def _command(
    subs: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    text: str,
) -> argparse.ArgumentParser:
    parser = subs.add_parser(name, help=text, description=text)
    _add_common(parser, subcommand=True)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and manage a running shmbrokerd.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, subcommand=False)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(subs, "list", cmd_list, "list the segments you may read").add_argument(
        "prefix", nargs="?", metavar="PREFIX", help="only names starting with PREFIX"
    )
    _command(subs, "stat", cmd_stat, "describe one segment").add_argument("name", metavar="NAME")
    _command(subs, "delete", cmd_delete, "delete a segment (prints nothing)").add_argument(
        "name", metavar="NAME"
    )
    _command(subs, "clients", cmd_clients, "list connected clients (operators)")
    _command(subs, "stats", cmd_stats, "show the daemon's counters (operators)")
    _command(subs, "watch", cmd_watch, "print lifecycle events until interrupted").add_argument(
        "prefix", nargs="?", default="", metavar="PREFIX", help="only names starting with PREFIX"
    )
    top = _command(subs, "top", cmd_top, "live view: rates, latency, segments, clients (operators)")
    top.add_argument("--once", action="store_true", help="print one refresh and exit")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes"
    )
    _command(subs, "reload", cmd_reload, "re-read the daemon's config (operators; prints nothing)")
    _command(
        subs, "drop", cmd_drop, "end a client's connection; its leases end (operators)"
    ).add_argument("client", type=int, metavar="ID", help="the client's id, as clients shows")
    return parser


def _connect(path: str) -> Broker:
    try:
        return Broker(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            reason = "no such socket (is the daemon running?)"
        elif exc.errno == errno.ECONNREFUSED:
            reason = "connection refused (is the daemon running?)"
        else:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CtlError(f"cannot connect to shmbrokerd at {path}: {reason}") from None


def _write(chunk: str) -> None:
    try:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _OutputClosed from None


def _run(handler: Handler, args: argparse.Namespace, path: str) -> None:
    with _connect(path) as broker:
        try:
            for chunk in handler(broker, args):
                _write(chunk)
        except OSError as exc:  # a BrokerError from the daemon, or the connection failing
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            raise CtlError(f"{name}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = socket_path(args.socket)
    try:
        _run(args.handler, args, path)
    except CtlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except _NeedsRestart as exc:
        print(f"{PROG}: reloaded, but {exc}", file=sys.stderr)
        return EXIT_NEEDS_RESTART
    except _Stopped:
        return 0
    except _OutputClosed:
        # Python flushes stdout at exit once more: point it somewhere harmless.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
