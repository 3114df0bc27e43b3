"""Rows of the result table, percentiles and formatting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Unit = Literal["us", "ops/s"]


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, the broker's value and its floor's.

    ``unit`` is ``us`` (a latency: lower is better) or ``ops/s`` (a rate:
    higher is better).  ``ratio`` is always "how many times the floor's cost
    the broker pays", so above 1 means slower than the floor.
    """

    figure: str
    broker: float | None
    floor: float | None
    unit: Unit
    floor_label: str = "floor"

    @property
    def ratio(self) -> float | None:
        if self.broker is None or self.floor is None or self.broker <= 0 or self.floor <= 0:
            return None
        if self.unit == "us":
            return self.broker / self.floor
        return self.floor / self.broker


def percentile(samples_ns: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of ``samples_ns``, in microseconds."""
    if not samples_ns:
        raise ValueError("no samples")
    ordered = sorted(samples_ns)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1] / 1000


def latency_rows(
    label: str,
    broker: Sequence[int] | None,
    floor: Sequence[int] | None,
    floor_label: str = "floor",
) -> list[Row]:
    rows = []
    for pct in (50, 99):
        rows.append(
            Row(
                f"{label} p{pct}",
                percentile(broker, pct) if broker is not None else None,
                percentile(floor, pct) if floor is not None else None,
                "us",
                floor_label,
            )
        )
    return rows


def _value(v: float | None, unit: Unit) -> str:
    if v is None:
        return "-"
    if unit == "us":
        return f"{v:,.1f} us"
    return f"{v:,.0f} ops/s"


def table(rows: Sequence[Row]) -> str:
    """One aligned table: figure | broker | floor | ratio."""
    header = ("figure", "broker", "floor", "ratio")
    body = []
    for r in rows:
        figure = r.figure if r.floor_label == "floor" else f"{r.figure} [floor = {r.floor_label}]"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        body.append((figure, _value(r.broker, r.unit), _value(r.floor, r.unit), ratio))
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(4)]
    out = []
    for n, line in enumerate((header, *body)):
        rest = [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        cells = [line[0].ljust(widths[0]), *rest]
        out.append(" | ".join(cells).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


class IdleSamples(Protocol):
    """What ``_env.Sampled`` offers the rows below."""

    def __getitem__(self, key: str) -> list[int]: ...
    def client_us(self, key: str) -> float: ...
    def server_us(self, key: str) -> float: ...


def idle_rows(label: str, s: IdleSamples, idles: Sequence[str]) -> list[Row]:
    """A figure's lines per client idle strategy, from variants keyed ``lib@IDLE``,
    ``raw@IDLE`` and ``floor@IDLE`` (the floor's client waiting the same way):
    latency against the floor, the same client against itself blocking, the
    client's CPU per cycle against itself blocking, and the server's CPU per
    cycle against the floor server's."""
    rows: list[Row] = []
    for idle in idles:
        floor = s[f"floor@{idle}"]
        rows += latency_rows(f"{label}, client library, {idle}", s[f"lib@{idle}"], floor)
        rows += latency_rows(f"{label}, minimal client, {idle}", s[f"raw@{idle}"], floor)
    if "block" in idles:
        for idle in (i for i in idles if i != "block"):
            for who in ("lib", "raw"):
                rows += latency_rows(
                    f"{label}, {_WHO[who]}, {idle}",
                    s[f"{who}@{idle}"],
                    s[f"{who}@block"],
                    floor_label="same client, block",
                )[:1]
        for idle in idles:
            rows.append(
                Row(
                    f"{label}, client library CPU per cycle, {idle}",
                    s.client_us(f"lib@{idle}"),
                    s.client_us("lib@block"),
                    "us",
                    "same client, block",
                )
            )
    for idle in idles:
        rows.append(
            Row(
                f"{label}, daemon CPU per cycle, minimal client {idle}",
                s.server_us(f"raw@{idle}"),
                s.server_us(f"floor@{idle}"),
                "us",
                "floor server CPU",
            )
        )
    return rows


_WHO = {"lib": "client library", "raw": "minimal client"}
