"""``shmbrokerd``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .config import DEFAULT_CONFIG, ConfigError
from .daemon import Daemon, Options
from .systemd_glue import journal_handler

EX_CONFIG = 78


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="shmbrokerd", description="Broker of named shared memory.")
    p.add_argument(
        "--config", type=Path, help=f"TOML config file (default {DEFAULT_CONFIG} if it exists)"
    )
    p.add_argument("--socket", help="path of the request socket")
    p.add_argument("--state-dir", help="directory for the daemon's state")
    p.add_argument("--events", help="ZeroMQ endpoint of the event stream")
    p.add_argument(
        "--shm-prefix", help="prefix of the daemon's objects in /dev/shm (one daemon per prefix)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    config = a.config
    if config is None:
        env = os.environ.get("SHMBROKERD_CONFIG")
        config = Path(env) if env else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return Options(config, a.socket, a.state_dir, a.events, a.log_level, a.shm_prefix)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    level = (options.log_level or "info").upper()
    journal = journal_handler()
    if journal is not None:  # under systemd: structured fields (SEGMENT=, PEER_UID=, ...)
        logging.basicConfig(level=level, handlers=[journal])
    else:
        logging.basicConfig(
            level=level, format="shmbrokerd: %(levelname)s %(message)s", stream=sys.stderr
        )
    try:
        daemon = Daemon(options)
        logging.getLogger().setLevel(daemon.config.log_level.upper())
        return asyncio.run(daemon.run())
    except ConfigError as exc:
        print(f"shmbrokerd: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())
