"""Chaos: client processes doing random work while clients, then the daemon,
are SIGKILLed; afterwards nothing is leaked and no acknowledged byte is lost.

The short round runs in every ``pytest``; the full one (200 clients, 60 s)
only under ``make stress``, which sets ``SHMBROKER_STRESS=1`` (and
``SHMBROKER_WRITE_REPORT=1``, so that run rewrites ``docs/reliability.md``).
What is checked is listed in :mod:`tests.stress.chaos` and in the report.
``SHMBROKER_CHAOS_SEED`` replays a round's random choices (not its timing).
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from .chaos import ChaosConfig, assert_clean, maybe_write_report, run_chaos, summary


def _seed() -> int:
    return int(os.environ.get("SHMBROKER_CHAOS_SEED") or random.randrange(2**32))


def _round(cfg: ChaosConfig, command: str) -> None:
    fig = run_chaos(cfg)
    print(summary(fig))
    maybe_write_report(fig, command)
    assert_clean(fig)
    _check_it_happened(fig, cfg)


def _check_it_happened(fig: dict[str, Any], cfg: ChaosConfig) -> None:
    """A round where nothing was killed or written would prove nothing."""
    assert fig["daemon_restarts"] == len(cfg.daemon_kills_at)
    assert fig["clients_killed"] > 0
    assert fig["clients_started"] == cfg.clients + fig["clients_killed"]
    assert fig["persistent_writes"] > 0
    assert fig["segments_verified"] > 0
    assert fig["bytes_verified"] > 0
    assert fig["requests"] > 1000


def test_chaos_short() -> None:
    """16 clients, 15 s, clients SIGKILLed throughout, one daemon SIGKILL + restart."""
    cfg = ChaosConfig(
        clients=16,
        duration=15.0,
        daemon_kills_at=(0.4,),
        freeze_at=0.8,
        client_kills_per_s=3.0,
        think=0.004,
        reclaim_window=2.0,
        seed=_seed(),
    )
    _round(cfg, "SHMBROKER_WRITE_REPORT=1 .venv/bin/python -m pytest tests/stress -k short")


@pytest.mark.stress
@pytest.mark.skipif(
    os.environ.get("SHMBROKER_STRESS") != "1", reason="long stress run: make stress"
)
@pytest.mark.timeout(900)
def test_chaos_full() -> None:
    """200 clients, 60 s, clients SIGKILLed throughout, two daemon SIGKILLs + restarts."""
    cfg = ChaosConfig(
        clients=200,
        duration=60.0,
        daemon_kills_at=(0.3, 0.55),
        freeze_at=0.85,
        client_kills_per_s=5.0,
        think=0.02,
        reclaim_window=2.0,
        seed=_seed(),
    )
    _round(
        cfg,
        "make stress (SHMBROKER_STRESS=1 SHMBROKER_WRITE_REPORT=1 "
        ".venv/bin/python -m pytest tests/stress -m stress)",
    )
