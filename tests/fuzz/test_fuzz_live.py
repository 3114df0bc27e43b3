"""The live daemon under fuzz (the CI-sized run of ``tests/fuzz/fuzz_live.py``).

100,000 datagrams from several concurrent connections: random bytes, valid
requests for every op, mutations of them, stray fds; connections that close
abruptly, half-close, or stop reading until the daemon drops them.  Every
reply is checked against the request it answers (``fuzz_live`` says how);
afterwards the daemon must be whole: alive, answering a fresh connection,
back to its fds, within a memory bound, nothing left under its prefix in
``/dev/shm``, and no traceback in its log.

A failure prints the run's summary, with its seed:
``python -m tests.fuzz.fuzz_live --spawn --messages 100000 --seed SEED`` replays
the same messages (the interleaving of connections varies).
"""

from __future__ import annotations

import json

from shmbroker.wire import REQUESTS
from tests.fuzz.fuzz_live import (
    CODES,
    PARAMS,
    cleanup,
    daemon_fd_count,
    daemon_rss,
    fd_baseline,
    hello,
    run_fuzz,
)
from tests.support.helpers import DaemonProc, eventually

MESSAGES = 100_000
CONNECTIONS = 6
RSS_SLACK = 64 << 20


def test_generator_covers_every_op_and_parameter() -> None:
    """The fuzzer knows the contract as wire.py states it: a new op or
    parameter that it does not generate fails here, not silently."""
    assert set(PARAMS) == set(REQUESTS)
    for op, model in REQUESTS.items():
        assert PARAMS[op] == set(model.model_fields) - {"id", "op"}, op


def test_daemon_survives_fuzzing() -> None:
    d = DaemonProc()
    try:
        d.start()
        assert hello(d.socket)["ok"]  # serving: every edge is open, first reply sent
        fd_base, rss_base = fd_baseline(d.pid), daemon_rss(d.pid)

        result = run_fuzz(d.socket, MESSAGES, CONNECTIONS)
        summary = result.summary()
        report = json.dumps(summary, indent=1)
        counts = result.counts

        assert counts["sent"] >= MESSAGES, report
        assert summary["violations"] == 0, report
        # it reached what it is meant to reach
        for op in REQUESTS:
            assert counts[f"kind:valid:{op}"] > 0, (op, report)
        assert counts["leases"] > 500, report  # creates and opens granted, with fds
        assert counts["fds_received"] > 500, report
        assert counts["fds_sent"] > 100, report
        for code in ("EBADMSG", "EINVAL", "EOPNOTSUPP", "ENAMETOOLONG", "ENOENT", "EEXIST"):
            assert counts[f"code:{code}"] > 0, (code, report)
        assert not {c.removeprefix("code:") for c in counts if c.startswith("code:")} - CODES
        assert counts["abrupt_closes"] + counts["half_closes"] > 0, report
        assert counts["bursts"] > 0, report

        # the daemon is whole
        assert d.proc is not None
        assert d.proc.poll() is None, f"daemon died:\n{d.log()[-4000:]}"
        assert hello(d.socket)["ok"]
        cleanup(d.socket)
        eventually(lambda: not d.objects(), timeout=10)
        eventually(lambda: daemon_fd_count(d.pid) <= fd_base, timeout=10)
        rss = daemon_rss(d.pid)
        assert rss < rss_base + RSS_SLACK, (rss_base >> 20, rss >> 20)
        log = d.log()
        assert "Traceback" not in log, log[-4000:]
        assert "internal error" not in log, log[-4000:]
    finally:
        d.cleanup()
