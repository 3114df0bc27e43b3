"""Smoke test of the private-systemd sandbox (tests/support/systemd_sandbox.py).

Boots a sandbox, runs a Type=notify unit in it, and checks that nothing of
the host was touched: its /tmp (the note's worst danger), /etc/passwd (after
a useradd inside), /sys/fs/cgroup, fs.file-max and /dev (which systemd and
its units change when left to themselves), and that no process of the sandbox
survives it. /dev is compared both with itself before this test and with the
host before this process's first boot and as a new machine has it
(``host_dev_intruders``), so a leak is caught on the first run too.

Set SHMBROKER_SKIP_SYSTEMD=1 to skip; otherwise a sandbox that cannot boot
fails the test with the reason.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.systemd_sandbox import (
    SKIP_ENV,
    SystemdSandbox,
    host_dev_intruders,
    sandbox_available,
)

pytestmark = pytest.mark.systemd

UNIT = "sbx-smoke.service"

SERVICE = """\
import os, socket, time
print("sbx-smoke says {token}", flush=True)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\\0" + addr[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(addr)
    s.sendall(b"READY=1")
while True:
    time.sleep(3600)
"""

UNIT_FILE = """\
[Unit]
Description=sandbox smoke test

[Service]
Type=notify
ExecStart=/usr/bin/python3 -u /opt/sbx-smoke.py
"""


def _require_sandbox() -> None:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    reason = sandbox_available()
    if reason is not None:
        pytest.fail(f"systemd sandbox cannot boot here: {reason} (set {SKIP_ENV}=1 to skip)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time): tells a pid from its reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except OSError:
        return None


def _pids_in_pid_ns(ns: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == ns:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _cgroup_mount_line() -> str:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return "\n".join(line for line in lines if " /sys/fs/cgroup " in line)


def test_sandbox_boots_runs_a_unit_and_leaves_the_host_alone(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    _require_sandbox()
    token = secrets.token_hex(8)
    passwd = Path("/etc/passwd")
    passwd_hash = _sha256(passwd)
    file_max = Path("/proc/sys/fs/file-max").read_text()
    cgroup_mount = _cgroup_mount_line()
    dev_entries = set(os.listdir("/dev"))
    fd, sentinel_name = tempfile.mkstemp(prefix="shmbroker-sentinel-", dir="/tmp")
    sentinel = Path(sentinel_name)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    try:
        with SystemdSandbox(tmp_path / "sbx") as sbx:
            assert sbx.pid1 is not None
            assert sbx.unshare_pid is not None
            assert sbx.boot_seconds is not None
            record_property("boot_seconds", round(sbx.boot_seconds, 3))
            print(f"sandbox boot: {sbx.boot_seconds:.3f} s")
            pid1, unshare_pid = sbx.pid1, sbx.unshare_pid
            started = {pid1: _start_time(pid1), unshare_pid: _start_time(unshare_pid)}
            pid_ns = os.readlink(f"/proc/{pid1}/ns/pid")
            assert pid_ns != os.readlink("/proc/self/ns/pid")
            cgroup_dirs = sbx.cgroup_dirs
            assert cgroup_dirs

            # Private /tmp: the host's sentinel is not visible inside.
            assert sbx.run(["test", "-e", str(sentinel)], check=False).returncode == 1
            # useradd replaces /etc/passwd by rename(): only the overlay sees it.
            sbx.run(["useradd", "--system", "--no-create-home", "sbxsmoke"])
            assert "sbxsmoke:" in sbx.run(["cat", "/etc/passwd"]).stdout

            sbx.write_file("/opt/sbx-smoke.py", SERVICE.format(token=token))
            sbx.write_file(f"/etc/systemd/system/{UNIT}", UNIT_FILE)
            sbx.systemctl("daemon-reload")
            sbx.systemctl("start", UNIT)
            assert sbx.systemctl("is-active", UNIT, check=False).stdout.strip() == "active"
            main_pid = int(sbx.systemctl("show", "-P", "MainPID", UNIT).stdout)
            assert main_pid > 1

            line = sbx.wait_for_journal(UNIT, f"sbx-smoke says {token}")
            assert line == f"sbx-smoke says {token}"
            entries = sbx.journal(UNIT, fields=True)
            assert any(e.get("MESSAGE") == line and e.get("_PID") == str(main_pid) for e in entries)

            sbx.systemctl("stop", UNIT)
            assert sbx.systemctl("is-active", UNIT, check=False).stdout.strip() == "inactive"

        assert not sbx.running
        # No process of the sandbox survives it.
        for pid, start in started.items():
            assert _start_time(pid) != start, f"pid {pid} survived the sandbox"
        assert _pids_in_pid_ns(pid_ns) == []
        assert not any(d.exists() for d in cgroup_dirs)
        # The host is as it was.
        assert sentinel.read_text() == token
        assert _sha256(passwd) == passwd_hash
        assert not Path("/etc/passwd+").exists()
        assert Path("/proc/sys/fs/file-max").read_text() == file_max
        assert _cgroup_mount_line() == cgroup_mount
        assert set(os.listdir("/dev")) - dev_entries == set()
        # ... and as a new machine is: the line above misses what a first run
        # left behind (a /dev/log from an earlier boot is there before we look).
        assert host_dev_intruders() == []
    finally:
        sentinel.unlink(missing_ok=True)
