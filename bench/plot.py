"""Draw ``docs/perf-open-latency.png`` from the scale run's results.

``python -m bench.plot [--results bench/out/scale.json] [--out docs/perf-open-latency.png]``
(after ``python -m bench --only scale``; ``make bench-scale`` does both).
Two panels: the open round trip's p50 and p99, minimal client and client
library, against live segments and against idle connected clients (log
scales), with the floor server's (measured in the same rounds at every
point, so that what the machine did shows).  Needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import REPO
from .scale import RESULTS

__all__ = ["plot"]

OUT = REPO / "docs" / "perf-open-latency.png"
TICKS = (10, 20, 30, 50, 100, 200, 300, 500, 1_000, 2_000, 3_000, 5_000, 10_000, 20_000, 50_000)
VARIANTS = (("raw", "minimal client", "tab:blue"), ("lib", "client library", "tab:orange"))


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    panels = (
        (left, results["segments"], "count", "live segments (persistent, 1 byte)"),
        (right, results["clients"], "idle", "idle connected clients (+2 measuring)"),
    )
    whole = FuncFormatter(lambda x, _pos: f"{x:,.0f}")
    for ax, points, key, xlabel in panels:
        xs = [p[key] for p in points]
        for variant, label, color in VARIANTS:
            ax.plot(
                xs, [p[variant]["p50"] for p in points], "o-", color=color, label=f"{label} p50"
            )
            ax.plot(
                xs, [p[variant]["p99"] for p in points], "s--", color=color, label=f"{label} p99"
            )
        for q, style in (("p50", "-"), ("p99", ":")):
            floor = [p["floor"][q] for p in points]
            ax.plot(xs, floor, style, color="grey", lw=1, label=f"floor server {q}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(whole)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda _x, _pos: ""))
        ax.set_xlabel(xlabel)
        ax.yaxis.set_major_formatter(whole)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda _y, _pos: ""))
        ax.grid(True, which="major", alpha=0.3)
    both = results.get("both")
    if both is not None:  # the most segments and the most idle clients at once
        for variant, label, color in VARIANTS:
            left.plot(
                [both["count"]],
                [both[variant]["p50"]],
                "*",
                ms=13,
                color=color,
                mec="black",
                label=f"{label} p50, +{both['idle']:,} idle clients",
            )
    keys = [v for v, _, _ in VARIANTS] + ["floor"]
    values = [p[k][q] for _, pts, *_ in panels for p in pts for k in keys for q in ("p50", "p99")]
    values += [both[k]["p50"] for k in keys] if both is not None else []
    left.set_yticks([t for t in TICKS if min(values) / 2 <= t <= max(values) * 2])
    left.set_ylim(min(values) / 1.3, max(values) * 1.3)
    left.set_ylabel("open round trip (us, log scale)")
    left.set_title("open latency vs live segments")
    right.set_title(
        f"open latency vs connected clients ({results['segments'][0]['count']:,} segments)"
    )
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize="small")
    m = results["machine"]
    fig.suptitle(
        "shmbrokerd: open + fd + mmap + munmap + release, from a separate process "
        f"({results['samples']:,} samples per point; {m['cpus']} CPUs, Linux {m['kernel']}, "
        f"Python {m['python']})",
        fontsize="medium",
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    try:
        results = json.loads(a.results.read_text())
    except FileNotFoundError:
        print(f"no {a.results}: run `python -m bench --only scale` first", file=sys.stderr)
        return 1
    plot(results, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
