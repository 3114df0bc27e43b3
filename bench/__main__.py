"""``python -m bench [--quick] [--only NAME]``: run the figures, print one table."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
from collections.abc import Callable

from . import create_rt, mmap_floor, open_rt, plasma, reopen, scale, throughput
from ._env import IDLES, Env, Settings, log
from ._machine import busy_seconds, own_seconds, terminate
from ._stats import Row, table

FIGURES: dict[str, Callable[[Env], list[Row]]] = {
    "open": open_rt.run,
    "create": create_rt.run,
    "reopen": reopen.run,
    "throughput": throughput.run,
    "mmap": mmap_floor.run,
}
# Longer runs (scale: about two minutes) or a separate venv (plasma): only on
# request, with --only NAME or --all (``make bench-scale`` runs both).
EXTRA: dict[str, Callable[[Env], list[Row]]] = {
    "scale": scale.run,
    "plasma": plasma.run,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="shmbroker benchmarks: each figure next to its floor, measured in one run.",
    )
    p.add_argument("--quick", action="store_true", help="few samples, short runs (a smoke run)")
    p.add_argument("--only", choices=sorted({**FIGURES, **EXTRA}), help="run one figure")
    p.add_argument("--all", action="store_true", help=f"also run {' and '.join(EXTRA)}")
    p.add_argument(
        "--idle",
        default=",".join(IDLES),
        help=f"client idle strategies to measure, comma-separated (default {','.join(IDLES)})",
    )
    a = p.parse_args(argv)
    idles = tuple(a.idle.split(","))
    settings = Settings.quick(idles=idles) if a.quick else Settings(idles=idles)
    figures = {**FIGURES, **EXTRA}
    names = [a.only] if a.only else list(figures if a.all else FIGURES)

    signal.signal(signal.SIGTERM, terminate)
    load_before = os.getloadavg()[0]
    busy_before, own_before = busy_seconds(), own_seconds()
    started = time.monotonic()
    env = Env(settings)
    rows: list[Row] = []
    try:
        for name in names:
            t0 = time.monotonic()
            log(f"{name}...")
            rows.extend(figures[name](env))
            log(f"{name} done in {time.monotonic() - t0:.1f} s")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (RuntimeError, TimeoutError) as exc:  # a worker or a server failed: said above
        log(f"failed: {exc}")
        return 1
    finally:
        env.close()
    elapsed = time.monotonic() - started
    # Every process the bench started has been waited for by now, so what the
    # machine did besides is the busy time it is not accounted for.
    others = (busy_seconds() - busy_before) - (own_seconds() - own_before)
    share = max(0.0, others) / (elapsed * (os.cpu_count() or 1))

    print(
        f"shmbroker benchmarks: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    print(
        f"{settings.samples} samples per latency (after {settings.warmup} warm-up), "
        f"{settings.ops_seconds:g} s per ops/s run; took {elapsed:.0f} s"
    )
    print(
        f"other work on the machine during the run: {max(0.0, others):.1f} CPU-seconds "
        f"({share:.0%} of its capacity); load average before {load_before:.2f}"
    )
    print()
    print(table(rows))
    print()
    print("ratio: broker cost / floor cost (latency broker/floor, ops/s floor/broker);")
    print("above 1 means slower than the floor.")
    for problem in env.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
