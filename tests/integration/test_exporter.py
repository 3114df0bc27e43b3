"""The daemon's counters seen the way Prometheus sees them: a real daemon, a real
``shmbroker-exporter`` process, real HTTP scrapes parsed by prometheus_client's
own parser, and load applied by separate client processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shmbroker import Broker
from tests.support.helpers import DaemonProc, run_client, running_daemon, spawn_client

EXPORTER = [sys.executable, "-m", "shmbrokerd.exporter"]
OTHER_UID, OTHER_GID = 1000, 1000
MONITOR_GID = 4242
MiB = 1 << 20

#: every family the exporter serves, with its type (a held-out scrape checks these)
FAMILIES = {
    "shmbroker_up": "gauge",
    "shmbroker_start_time_seconds": "gauge",
    "shmbroker_requests": "counter",
    "shmbroker_request_errors": "counter",
    "shmbroker_request_duration_seconds": "histogram",
    "shmbroker_segments": "gauge",
    "shmbroker_segments_bytes": "gauge",
    "shmbroker_leases": "gauge",
    "shmbroker_clients": "gauge",
    "shmbroker_waiting_opens": "gauge",
    "shmbroker_uid_bytes": "gauge",
    "shmbroker_uid_segments": "gauge",
    "shmbroker_uid_quota_bytes": "gauge",
    "shmbroker_uid_quota_segments": "gauge",
    "shmbroker_shm_size_bytes": "gauge",
    "shmbroker_shm_used_bytes": "gauge",
    "shmbroker_shm_free_bytes": "gauge",
    "shmbroker_journal_writes": "counter",
    "shmbroker_journal_records": "counter",
    "shmbroker_journal_write_failures": "counter",
    "shmbroker_snapshot_duration_seconds": "summary",
    "shmbroker_last_snapshot_duration_seconds": "gauge",
    "shmbroker_snapshot_failures": "counter",
    "shmbroker_events_published": "counter",
    "shmbroker_events_dropped": "counter",
    "shmbroker_ttl_expiries": "counter",
    "shmbroker_reclaims": "counter",
    "shmbroker_reclaims_lapsed": "counter",
    "shmbroker_restarts_recovered": "counter",
    "shmbroker_recovered_segments": "gauge",
    "shmbroker_recovered_leases": "gauge",
    "shmbroker_recovery_duration_seconds": "gauge",
}


class Exporter:
    """``shmbroker-exporter`` on an ephemeral loopback port, its stderr in a file."""

    def __init__(self, socket_path: str, root: Path) -> None:
        self.log_path = root / "exporter.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*EXPORTER, "--listen", "127.0.0.1:0", "--socket", socket_path],
                stderr=log,
                cwd="/",
            )
        deadline = time.monotonic() + 15
        while not (m := re.search(r"serving /metrics on ([\d.]+:\d+)", self.log())):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        self.url = f"http://{m.group(1)}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape_text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode())

    def families(self) -> dict[str, str]:
        return {f.name: f.type for f in text_string_to_metric_families(self.scrape_text())}

    def scrape(self) -> dict[str, float]:
        """Sample name and sorted labels -> value, e.g. ``shmbroker_leases`` or
        ``shmbroker_segments{backing=shm,lifetime=ttl}``."""
        out = {}
        for fam in text_string_to_metric_families(self.scrape_text()):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def exporting(d: DaemonProc) -> Iterator[Exporter]:
    exp = Exporter(d.socket, d.root)
    try:
        yield exp
    finally:
        exp.stop()


def kind(backing: str, lifetime: str) -> str:
    return f"{{backing={backing},lifetime={lifetime}}}"


def test_every_metric_is_served_with_its_type(daemon: DaemonProc) -> None:
    with exporting(daemon) as exp:
        run_client('b = Broker(SOCK); b.create("x", 4096).close(); b.close()', daemon.socket)
        assert exp.families() == FAMILIES
        text = exp.scrape_text()
    assert "# TYPE shmbroker_requests_total counter" in text
    assert "shmbroker_up 1.0" in text
    assert exp.proc.returncode == 0  # stopped by SIGTERM, cleanly


def test_values_move_as_segments_are_created_and_deleted() -> None:
    config = {"default_quota_bytes": 1 << 30, "memfd_fdstore": False}
    with running_daemon(config) as d, exporting(d) as exp:
        before = exp.scrape()
        holder = spawn_client(
            """
            b = Broker(SOCK)
            segs = [b.create("m/shm", 64 << 20, lifetime="persistent", backing="shm"),
                    b.create("m/memfd", 3 << 20, lifetime="refcount", backing="memfd")]
            print("ready", flush=True)
            sys.stdin.readline()
            for s in segs:
                s.close()
            b.delete("m/shm")
            b.close()
            """,
            d.socket,
            stdin=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "ready"
            during = exp.scrape()
        finally:
            _, err = holder.communicate("\n", timeout=30)
        assert holder.returncode == 0, err
        after = exp.scrape()

    assert before["shmbroker_segments" + kind("shm", "persistent")] == 0
    assert during["shmbroker_segments" + kind("shm", "persistent")] == 1
    assert during["shmbroker_segments_bytes" + kind("shm", "persistent")] == 64 * MiB
    assert during["shmbroker_segments" + kind("memfd", "refcount")] == 1
    assert during["shmbroker_segments_bytes" + kind("memfd", "refcount")] == 3 * MiB
    assert during["shmbroker_leases"] == 2
    assert during["shmbroker_clients"] == before["shmbroker_clients"] + 1
    assert during["shmbroker_uid_bytes{uid=0}"] == 67 * MiB
    assert during["shmbroker_uid_segments{uid=0}"] == 2
    assert during["shmbroker_uid_quota_bytes{uid=0}"] == 1 << 30
    # the daemon's statvfs sees the 64 MiB reserved (others may use /dev/shm too)
    grown = during["shmbroker_shm_used_bytes{path=/dev/shm}"]
    assert grown - before["shmbroker_shm_used_bytes{path=/dev/shm}"] >= 32 * MiB
    assert during["shmbroker_shm_free_bytes{path=/dev/shm}"] > 0
    assert during["shmbroker_journal_writes_total"] > before["shmbroker_journal_writes_total"]
    assert during["shmbroker_journal_records_total"] >= 4  # two segs, two leases
    for name in ("shm", "memfd"):
        assert after["shmbroker_segments" + kind(name, "persistent")] == 0
        assert after["shmbroker_segments" + kind(name, "refcount")] == 0
    assert after["shmbroker_leases"] == 0
    assert "shmbroker_uid_bytes{uid=0}" not in after
    assert after["shmbroker_journal_write_failures_total"] == 0


def test_histogram_counts_the_requests_made_and_errors_by_errno(daemon: DaemonProc) -> None:
    with exporting(daemon) as exp:
        before = exp.scrape()
        run_client(
            """
            b = Broker(SOCK)
            seg = b.create("h/x", 4096, lifetime="refcount")
            for _ in range(25):
                b.open("h/x").close()
            for _ in range(3):
                try:
                    b.open("h/none")
                except FileNotFoundError:
                    pass
            seg.close()
            b.close()
            """,
            daemon.socket,
        )
        after = exp.scrape()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("shmbroker_requests_total{op=open}") == 28
    assert delta("shmbroker_request_duration_seconds_count{op=open}") == 28
    assert delta("shmbroker_request_duration_seconds_count{op=release}") == 26
    assert delta("shmbroker_request_duration_seconds_count{op=create}") == 1
    assert delta("shmbroker_request_errors_total{errno=ENOENT,op=open}") == 3
    assert after["shmbroker_request_duration_seconds_sum{op=open}"] > 0
    # cumulative buckets up to +Inf, which equals the count
    les = sorted(
        (float(k.split("le=")[1].split(",")[0].rstrip("}")), v)
        for k, v in after.items()
        if k.startswith("shmbroker_request_duration_seconds_bucket{") and "op=open" in k
    )
    assert les[0][0] == 1e-5
    assert 0.1 in [le for le, _ in les]
    assert [v for _, v in les] == sorted(v for _, v in les)
    assert les[-1] == (float("inf"), after["shmbroker_request_duration_seconds_count{op=open}"])


def test_waiting_opens_and_ttl_expiries_are_counted(daemon: DaemonProc) -> None:
    with exporting(daemon) as exp:
        waiter = spawn_client(
            'b = Broker(SOCK)\nb.open("w/late", wait=30).close()\nb.close()\nprint("got")',
            daemon.socket,
        )
        try:
            deadline = time.monotonic() + 10
            while exp.scrape()["shmbroker_waiting_opens"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            run_client(
                'b = Broker(SOCK)\nb.create("w/late", 4096, lifetime="ttl", ttl=0.2).close()',
                daemon.socket,
            )
            assert waiter.stdout is not None
            assert waiter.stdout.readline().strip() == "got"
        finally:
            _, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, err
        deadline = time.monotonic() + 10
        while (now := exp.scrape())["shmbroker_ttl_expiries_total"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert now["shmbroker_waiting_opens"] == 0
    assert now["shmbroker_segments" + kind("shm", "ttl")] == 0
    # the waiting open counted once, when it was answered (after its wait)
    assert now["shmbroker_request_duration_seconds_count{op=open}"] == 1
    assert now["shmbroker_request_duration_seconds_sum{op=open}"] > 0


def test_events_published_are_counted(daemon: DaemonProc) -> None:
    with exporting(daemon) as exp, Broker(daemon.socket) as b, b.watch("ev/") as watcher:
        deadline = time.monotonic() + 10
        while True:  # a subscription takes effect a moment after it is made
            b.create("ev/x", 4096, lifetime="refcount").close()
            if exp.scrape()["shmbroker_events_published_total"] > 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = next(iter(watcher))
        assert first.name == "ev/x"
        assert exp.scrape()["shmbroker_events_dropped_total"] == 0


def test_restart_recovery_reclaims_and_lapses_are_counted() -> None:
    with running_daemon({"reclaim_window": 1.5}) as d, exporting(d) as exp:
        assert exp.scrape()["shmbroker_restarts_recovered_total"] == 0
        holder = spawn_client(
            """
            b = Broker(SOCK)
            a = b.create("r/kept", 4096, lifetime="persistent")
            c = b.create("r/lapse", 4096, lifetime="persistent")
            print("ready", flush=True)
            sys.stdin.readline()  # the daemon is killed and back
            b.stat("r/kept")      # reconnects and reclaims both leases
            print("reclaimed", flush=True)
            sys.stdin.readline()
            """,
            d.socket,
            stdin=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "ready"
            run_client(
                'b = Broker(SOCK)\nb.create("r/orphan", 4096, lifetime="persistent")\n'
                "os._exit(0)",  # its lease dies with the daemon below, never reclaimed
                d.socket,
            )
            d.kill()
            d.start()
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "reclaimed"
            up = exp.scrape()
            time.sleep(2)  # past the reclaim window
            later = exp.scrape()
        finally:
            holder.communicate("\n", timeout=30)
    assert up["shmbroker_restarts_recovered_total"] == 1
    assert up["shmbroker_recovered_segments"] == 3
    assert up["shmbroker_recovered_leases"] >= 2
    assert up["shmbroker_recovery_duration_seconds"] > 0
    assert up["shmbroker_reclaims_total"] == 2
    assert later["shmbroker_reclaims_lapsed_total"] >= 1
    assert later["shmbroker_snapshot_duration_seconds_count"] >= 1
    assert later["shmbroker_start_time_seconds"] > time.time() - 60


def test_daemon_down_gives_up_0_and_a_log_line() -> None:
    d = DaemonProc()
    exp = Exporter(d.socket, d.root)  # no daemon yet
    try:
        assert exp.scrape() == {"shmbroker_up": 0}
        assert re.search(r"WARNING shmbrokerd at \S+ does not answer: .*no shmbrokerd", exp.log())
        d.start()
        assert exp.scrape()["shmbroker_up"] == 1
        assert "answers again" in exp.log()
        d.stop()
        assert exp.scrape() == {"shmbroker_up": 0}
        assert exp.log().count("does not answer") == 2
    finally:
        exp.stop()
        d.cleanup()


def test_stats_needs_an_operator_or_the_monitor_group() -> None:
    code = """
    b = Broker(SOCK)
    for op in (b.stats, lambda: list(b.clients())):
        try:
            op()
            print("ok")
        except PermissionError:
            print("EACCES")
    """
    with running_daemon({"monitor_group": MONITOR_GID}) as d:
        monitor = run_client(code, d.socket, uid=OTHER_UID, gid=OTHER_GID, groups=(MONITOR_GID,))
        other = run_client(code, d.socket, uid=OTHER_UID, gid=OTHER_GID)
    assert monitor.stdout.split() == ["ok", "EACCES"]
    assert other.stdout.split() == ["EACCES", "EACCES"]


def test_a_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "exporter.toml"
    cfg.write_text("timeout = -1\n")
    res = subprocess.run(
        [*EXPORTER, "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 78
    assert "timeout" in res.stderr
    assert os.path.exists(cfg)
