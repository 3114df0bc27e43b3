"""``shmbrokerctl top``: a live view of the daemon, refreshed every second.

Strategy: a frame is computed from two ``stats`` replies (:func:`frame`, no
I/O): rates and latency quantiles are over the interval between them, from
the differences of the counters and of the daemon's latency histograms.
The same frame is printed as text (``--once``), as JSON (``--json``) or
drawn with curses.  curses, not rich's ``Live``: it is in the standard
library (no dependency for an operator's tool), it reads single keys
without a line discipline (``q``) and ``curses.wrapper`` restores the
terminal on every way out, Ctrl-C and exceptions included.
"""

from __future__ import annotations

import contextlib
import curses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .ctl import format_table, human_duration, human_size

__all__ = ["as_json", "frame", "quantile", "render", "run_curses", "stream"]

Stats = dict[str, Any]
Fetch = Callable[[], Stats]

OPS_HEADER = ("OP", "OPS/S", "ERR/S", "P50", "P99")
SEGMENTS_HEADER = ("NAME", "SIZE", "LEASES", "LIFETIME", "OWNER")
CLIENTS_HEADER = ("ID", "PID", "UID", "REQ/S", "REQUESTS", "LEASES")


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of a histogram (per-bucket counts, the last past every
    bound), interpolated inside its bucket; None when it is empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):  # past the last bound: all we know is "over it"
                return float(bounds[-1])
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / n
        seen += n
    return float(bounds[-1])


def _ops(prev: Stats, cur: Stats, dt: float) -> list[dict[str, Any]]:
    bounds = cur["latency"]["bounds"]
    old_hist, new_hist = prev["latency"]["ops"], cur["latency"]["ops"]
    rows = []
    for op in sorted(cur["requests"]):
        count = cur["requests"][op] - prev["requests"].get(op, 0)
        errors = cur["errors"].get(op, 0) - prev["errors"].get(op, 0)
        new = new_hist.get(op, {}).get("buckets", [])
        old = old_hist.get(op, {}).get("buckets", [0] * len(new))
        delta = [a - b for a, b in zip(new, old, strict=True)]
        rows.append(
            {
                "op": op,
                "rate": count / dt,
                "errors_rate": errors / dt,
                "p50": quantile(bounds, delta, 0.5),
                "p99": quantile(bounds, delta, 0.99),
            }
        )
    return rows


def _clients(prev: Stats, cur: Stats, dt: float) -> list[dict[str, Any]]:
    before = {c["id"]: c["requests"] for c in prev["busiest_clients"]}
    now = time.time()
    out = []
    for c in cur["busiest_clients"]:
        if c["id"] in before:
            rate = (c["requests"] - before[c["id"]]) / dt
        else:  # not in the last list: its mean since it connected
            rate = c["requests"] / max(now - c["connected"], dt)
        out.append({**c, "rate": rate})
    out.sort(key=lambda c: (-c["rate"], -c["requests"]))
    return out


def frame(prev: Stats, cur: Stats, dt: float) -> dict[str, Any]:
    """What one refresh shows: totals, then per op, segments and clients."""
    dt = max(dt, 1e-6)
    shm = cur["shm"]
    ops = _ops(prev, cur, dt)
    return {
        "time": time.time(),
        "interval": dt,
        "totals": {
            "uptime": cur["uptime"],
            "segments": cur["segments"],
            "bytes": cur["bytes"],
            "leases": cur["leases"],
            "clients": cur["clients"],
            "waiting_opens": cur["waiting_opens"],
            "shm_used": shm["used"],
            "shm_size": shm["size"],
            "ops_rate": sum(r["rate"] for r in ops),
        },
        "ops": ops,
        "largest_segments": cur["largest_segments"],
        "busiest_clients": _clients(prev, cur, dt),
    }


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    return f"{seconds * 1e3:.1f}ms"


def render(f: dict[str, Any], hint: str = "") -> list[str]:
    """A frame as lines of text (the screen, with a ``hint`` of keys, or ``--once``)."""
    t = f["totals"]
    pct = 100 * t["shm_used"] / t["shm_size"] if t["shm_size"] else 0.0
    lines = [
        f"shmbrokerd up {human_duration(t['uptime'])}  {t['ops_rate']:.0f} ops/s  {hint}".rstrip(),
        f"segments {t['segments']}  bytes {human_size(t['bytes'])}  leases {t['leases']}  "
        f"clients {t['clients']}  waiting opens {t['waiting_opens']}",
        f"/dev/shm {human_size(t['shm_used'])} used of {human_size(t['shm_size'])} ({pct:.1f}%)",
        "",
    ]
    ops = [
        (r["op"], f"{r['rate']:.1f}", f"{r['errors_rate']:.1f}", _ms(r["p50"]), _ms(r["p99"]))
        for r in f["ops"]
    ]
    lines += [*format_table(ops, OPS_HEADER).splitlines(), "", "LARGEST SEGMENTS"]
    segs = [
        (
            s["name"],
            human_size(s["size"]),
            str(s["leases"]),
            s["lifetime"],
            f"{s['owner_uid']}:{s['owner_gid']}",
        )
        for s in f["largest_segments"]
    ]
    lines += [*format_table(segs, SEGMENTS_HEADER).splitlines(), "", "BUSIEST CLIENTS"]
    clients = [
        (
            str(c["id"]),
            str(c["pid"]),
            str(c["uid"]),
            f"{c['rate']:.1f}",
            str(c["requests"]),
            str(c["leases"]),
        )
        for c in f["busiest_clients"]
    ]
    return lines + format_table(clients, CLIENTS_HEADER).splitlines()


def stream(fetch: Fetch, interval: float, once: bool) -> Iterator[dict[str, Any]]:
    """Frames, one per ``interval`` (the first after one interval: rates need two looks)."""
    prev, at = fetch(), time.monotonic()
    while True:
        time.sleep(max(0.0, at + interval - time.monotonic()))
        cur, now = fetch(), time.monotonic()
        yield frame(prev, cur, now - at)
        if once:
            return
        prev, at = cur, now


def as_json(f: dict[str, Any]) -> str:
    return json.dumps(f) + "\n"


def run_curses(fetch: Fetch, interval: float) -> None:
    """The live screen until ``q`` (or Ctrl-C, which the caller treats as a quit)."""
    curses.wrapper(_screen, fetch, interval)


def _screen(win: curses.window, fetch: Fetch, interval: float) -> None:
    with contextlib.suppress(curses.error):  # a terminal without an invisible cursor
        curses.curs_set(0)
    lines = ["shmbrokerd: first refresh in a moment...  q: quit"]
    prev, at = fetch(), time.monotonic()
    while True:
        _draw(win, lines)
        win.timeout(max(1, int((at + interval - time.monotonic()) * 1000)))
        key = win.getch()
        if key in (ord("q"), ord("Q")):
            return
        if time.monotonic() >= at + interval:
            cur, now = fetch(), time.monotonic()
            lines = render(frame(prev, cur, now - at), "q: quit")
            prev, at = cur, now


def _draw(win: curses.window, lines: list[str]) -> None:
    height, width = win.getmaxyx()
    win.erase()
    for y, line in enumerate(lines[:height]):
        with contextlib.suppress(curses.error):  # the bottom-right cell cannot be written
            win.addnstr(y, 0, line, max(width - 1, 0))
    win.refresh()
