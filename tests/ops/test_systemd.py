"""Operations under a real, private systemd: the shipped units, installed by `make install`.

One sandbox (``tests/support/systemd_sandbox.py``) is booted for the module; inside it
the repo is installed the way an operator does (``make install``, with the
host's network for pip), a client user in group ``shmbroker`` is added, and
``shmbrokerd.socket`` is started.  Before each test the service is stopped,
its drop-ins, config, state and /dev/shm objects are reset, so every test
begins with only the socket listening.

Clients run inside the namespace with the installed client library
(``/opt/shmbroker/bin/python``); each is one process that prints its findings
as a ``RESULT {json}`` line, and some drive ``systemctl`` themselves so that
they can hold a connection across a reload, a restart or a stop.

systemd (PID 1 of the sandbox) logs to the console, not to the journal: its
own messages ("Watchdog timeout") are read from the sandbox's console log.

Set SHMBROKER_SKIP_SYSTEMD=1 to skip; otherwise a sandbox that cannot boot
fails the tests with the reason.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.systemd_sandbox import SKIP_ENV, SystemdSandbox, sandbox_available

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SERVICE = "shmbrokerd.service"
SOCKET_UNIT = "shmbrokerd.socket"
EXPORTER = "shmbroker-exporter.service"
EXPORTER_SOCKET = "shmbroker-exporter.socket"
SCRAPE = "http://127.0.0.1:9839/metrics"
SOCK = "/run/shmbroker/shmbroker.sock"
PY = "/opt/shmbroker/bin/python"
CONFIG = "/etc/shmbroker/shmbrokerd.toml"
DROPIN_DIR = "/etc/systemd/system/shmbrokerd.service.d"
STATE_DIR = "/var/lib/shmbroker"
SHM_PREFIX = "/dev/shm/shmbroker."
CLIENT_USER = "sbxclient"
CLIENT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
STATUS_RE = re.compile(r"^\d+ segments, \d+ MiB, \d+ clients$")
# Directories pip would leave in the checkout if it built there.
BUILD_DIRS = (REPO / "build", REPO / "client" / "build")

# Every client script starts with this; it fills ``out`` and the epilogue prints it.
PRELUDE = """\
import errno, hashlib, json, os, signal, subprocess, sys, time
signal.alarm(ALARM)  # no client outlives its bound, even inside the sandbox
from shmbroker import Broker, BrokerError
SOCK = "SOCKPATH"
out = {}

def systemctl(*args):
    r = subprocess.run(["systemctl", "--no-pager", *args], capture_output=True, text=True,
                       timeout=30)
    return r.returncode, r.stdout + r.stderr

def show(prop):
    return subprocess.run(["systemctl", "show", "-P", prop, "shmbrokerd.service"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()

def code(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"

def sha(buf):
    return hashlib.sha256(bytes(buf)).hexdigest()

def me(b):
    mine = [c for c in b.clients() if c.pid == os.getpid()]
    return [{"id": c.id, "leases": c.leases, "connected": c.connected} for c in mine]
"""
EPILOGUE = "\nprint('RESULT ' + json.dumps(out), flush=True)\n"


# -- sandbox plumbing -----------------------------------------------------------------


class Box:
    """The module's sandbox with shmbroker installed, and helpers to drive it."""

    def __init__(self, sbx: SystemdSandbox, pristine_config: str, new_dirs: list[Path]) -> None:
        self.sbx = sbx
        self.pristine_config = pristine_config
        self.new_dirs = new_dirs  # made in the checkout by `make install`
        self._journal_mark = 0  # lines of the unit's journal before this test
        self._console_mark = 0  # bytes of systemd's console log before this test

    def client(self, code: str, *, user: str | None = None, alarm: int = 30) -> dict[str, Any]:
        """Run a client script inside the sandbox; return its ``out`` dict."""
        script = PRELUDE.replace("ALARM", str(alarm)).replace("SOCKPATH", SOCK)
        script += textwrap.dedent(code) + EPILOGUE
        cmd = [PY, "-c", script]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
        res = self.sbx.run(cmd, check=False, timeout=alarm + 15, env=CLIENT_ENV)
        for line in reversed(res.stdout.splitlines()):
            if line.startswith("RESULT "):
                result: dict[str, Any] = json.loads(line[len("RESULT ") :])
                return result
        pytest.fail(
            f"client script failed (status {res.returncode}):\n{res.stderr[-3000:]}\n"
            f"stdout: {res.stdout[-1000:]}\njournal:\n{self.journal()[-2000:]}"
        )

    def show(self, *props: str, unit: str = SERVICE) -> dict[str, str]:
        args = [a for p in props for a in ("-p", p)]
        text = self.sbx.systemctl("show", *args, unit).stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def is_active(self, unit: str) -> str:
        return self.sbx.systemctl("is-active", unit, check=False).stdout.strip()

    def journal(self) -> str:
        """The service's journal since this test began (``-o cat``)."""
        return "".join(self.sbx.journal(SERVICE).splitlines(True)[self._journal_mark :])

    def wait_journal(self, text: str, timeout: float = 10.0) -> str:
        """The first line of this test's journal containing ``text`` (bounded poll)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.journal().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not in the journal after {timeout} s:\n{self.journal()}")
            time.sleep(0.1)

    def manager_log(self) -> str:
        """What systemd itself said in this test (it logs to the sandbox console)."""
        data = self.sbx.console_log.read_bytes()[self._console_mark :]
        return data.decode(errors="replace").replace("\r", "")

    def write_config(self, text: str) -> None:
        self.sbx.write_file(CONFIG, text, mode=0o644)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                state = self.show("ActiveState", "SubState", "MainPID", "NRestarts", "Result")
                pytest.fail(
                    f"{what}: not after {timeout} s (service {state})\n"
                    f"journal:\n{self.journal()[-2000:]}\nsystemd:\n{self.manager_log()[-2000:]}"
                )
            time.sleep(0.1)

    def reset(self) -> None:
        """Back to: units as installed, pristine config, no state, only the socket listening."""
        sbx = self.sbx
        sbx.run(["rm", "-rf", DROPIN_DIR])
        self.write_config(self.pristine_config)
        sbx.systemctl("daemon-reload")
        sbx.systemctl("stop", SERVICE)
        sbx.run(["sh", "-c", f"rm -f {SHM_PREFIX}* {STATE_DIR}/*"])
        # Also resets the start rate limit, which a test's restarts may have used up.
        sbx.systemctl("reset-failed", SERVICE, SOCKET_UNIT, check=False)
        sbx.systemctl("start", SOCKET_UNIT)
        assert self.is_active(SERVICE) == "inactive"
        assert self.is_active(SOCKET_UNIT) == "active"
        self._journal_mark = len(self.sbx.journal(SERVICE).splitlines(True))
        self._console_mark = self.sbx.console_log.stat().st_size


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    reason = sandbox_available()
    if reason is not None:
        pytest.fail(f"systemd sandbox cannot boot here: {reason} (set {SKIP_ENV}=1 to skip)")
    build_dirs_before = [d for d in BUILD_DIRS if d.exists()]
    sbx = SystemdSandbox(tmp_path_factory.mktemp("systemd") / "sbx", binds=[REPO])
    sbx.start()  # a SandboxError here fails every test of the module, with the reason
    try:
        sbx.run(["make", "-C", str(REPO), "install"], net=True, timeout=240)
        sbx.run(["useradd", "--system", "--no-create-home", "-G", "shmbroker", CLIENT_USER])
        new_dirs = [d for d in BUILD_DIRS if d.exists() and d not in build_dirs_before]
        yield Box(sbx, sbx.run(["cat", CONFIG]).stdout, new_dirs)
    finally:
        try:
            if sbx.running:  # stop the units before the namespace dies (shared cgroups)
                sbx.systemctl("stop", SERVICE, SOCKET_UNIT, check=False, timeout=30)
        finally:
            sbx.stop()


@pytest.fixture
def box(installed: Box) -> Box:
    installed.reset()
    return installed


# -- tests ------------------------------------------------------------------------------


def test_make_install_leaves_the_checkout_clean(box: Box) -> None:
    """pip builds in the source tree; `make install` must build from a copy."""
    assert box.new_dirs == []
    assert box.sbx.run(["test", "-x", "/opt/shmbroker/bin/shmbrokerd"]).returncode == 0
    installed_unit = box.sbx.run(["cat", f"/etc/systemd/system/{SERVICE}"]).stdout
    assert installed_unit == (REPO / "systemd" / SERVICE).read_text()
    config = box.pristine_config
    assert re.search(r"^memfd_fdstore = true$", config, re.M), "installed config lacks the fd store"


def test_socket_activation_answers_the_first_client(box: Box) -> None:
    """(a) Only the socket listens; a group member's first request starts the daemon."""
    mode = box.sbx.run(["stat", "-c", "%a %U %G %F", SOCK]).stdout.split()
    assert mode == ["660", "shmbroker", "shmbroker", "socket"]
    assert box.is_active(SERVICE) == "inactive"

    out = box.client(
        """
        b = Broker(SOCK)
        out["server"] = b.hello("activation").server
        seg = b.create("act/first", 4096)
        seg.buf[:5] = b"first"
        out["uid"] = os.getuid()
        out["owner"] = b.stat("act/first").owner_uid
        out["read"] = bytes(seg.buf[:5]).decode()
        b.close()
        """,
        user=CLIENT_USER,
    )
    assert out["server"].startswith("shmbrokerd/")
    assert out["owner"] == out["uid"] != 0
    assert out["read"] == "first"
    state = box.show("ActiveState", "SubState", "MainPID", "NRestarts")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert int(state["MainPID"]) > 0
    assert "(from systemd)" in box.wait_journal("ready on")


def test_ready_and_status_text(box: Box) -> None:
    """(b) `systemctl start` returns at READY, the socket answers then, STATUS is shown."""
    box.sbx.systemctl("start", SERVICE, timeout=40)  # Type=notify: returns once READY=1 came
    state = box.show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess")
    assert state["Type"] == "notify"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert STATUS_RE.match(state["StatusText"]), state["StatusText"]

    out = box.client(
        """
        t = time.monotonic()
        b = Broker(SOCK)
        b.hello()
        out["hello_s"] = time.monotonic() - t
        seg = b.create("status/three", 3 << 20, lifetime="persistent")
        deadline = time.monotonic() + 8
        while show("StatusText") != "1 segments, 3 MiB, 1 clients" and time.monotonic() < deadline:
            time.sleep(0.1)
        out["status_text"] = show("StatusText")
        out["status"] = systemctl("status", "shmbrokerd")[1]
        b.close()
        """,
        alarm=20,
    )
    # Served at once: READY came after the listener was being served (bound, not timing).
    assert out["hello_s"] < 5
    assert out["status_text"] == "1 segments, 3 MiB, 1 clients"
    assert 'Status: "1 segments, 3 MiB, 1 clients"' in out["status"]


def test_start_with_a_bad_config_fails_visibly(box: Box) -> None:
    """(b) No READY before the config is good: `systemctl start` fails, status 78."""
    box.write_config(box.pristine_config + "\nno_such_key = 1\n")
    res = box.sbx.systemctl("start", SERVICE, check=False, timeout=40)
    assert res.returncode != 0
    state = box.show("ActiveState", "Result", "ExecMainStatus")
    assert state["ActiveState"] == "failed", "a bad config is restarted in a loop"
    assert state["ExecMainStatus"] == "78"
    assert "no_such_key" in box.wait_journal("configuration error")
    # The socket still listens: once the config is fixed, the next client starts it.
    assert box.is_active(SOCKET_UNIT) == "active"
    box.write_config(box.pristine_config)
    out = box.client("b = Broker(SOCK)\nout['server'] = b.hello().server\nb.close()")
    assert out["server"].startswith("shmbrokerd/")
    assert box.is_active(SERVICE) == "active"


def test_reload_changes_a_limit_live_and_refuses_a_bad_config(box: Box) -> None:
    """(c) `systemctl reload` applies a smaller max_segment_size to the same connection;
    an invalid config fails the reload, names the key, and the old limit stays."""
    small = re.sub(
        r"^max_segment_size = .*$", "max_segment_size = 65536", box.pristine_config, flags=re.M
    )
    bad = re.sub(r"^max_segment_size = .*$", "max_segment_size = -5", small, flags=re.M)
    assert "max_segment_size = 65536" in small
    assert "max_segment_size = -5" in bad
    out = box.client(
        f"""
        b = Broker(SOCK)
        keep = b.create("reload/keep", 4096)  # refcount: would vanish with the connection
        out["big_before"] = code(lambda: b.create("reload/big0", 128 << 10).close())
        out["me_before"] = me(b)
        open("{CONFIG}", "w").write({small!r})
        out["reload"] = systemctl("reload", "shmbrokerd")
        out["big_after"] = code(lambda: b.create("reload/big1", 128 << 10).close())
        out["small_after"] = code(lambda: b.create("reload/small1", 32 << 10).close())
        out["me_after"] = me(b)
        open("{CONFIG}", "w").write({bad!r})
        out["bad_reload"] = systemctl("reload", "shmbrokerd")
        out["big_bad"] = code(lambda: b.create("reload/big2", 128 << 10).close())
        out["small_bad"] = code(lambda: b.create("reload/small2", 32 << 10).close())
        out["keep_leases"] = b.stat("reload/keep").leases
        out["me_end"] = me(b)
        out["active"] = show("ActiveState")
        b.close()
        """
    )
    assert out["big_before"] == "ok"
    assert out["reload"][0] == 0, out["reload"][1]
    assert out["big_after"] == "EINVAL"
    assert out["small_after"] == "ok"
    assert out["bad_reload"][0] != 0, "an invalid config did not fail `systemctl reload`"
    assert out["big_bad"] == "EINVAL", "the old limit (65536) did not stay"
    assert out["small_bad"] == "ok", "the invalid config was applied"
    # The same connection all along: one client entry, same id, its refcount lease alive.
    assert len(out["me_before"]) == 1
    assert out["me_before"][0]["leases"] == 1
    assert out["me_after"] == out["me_before"]
    assert out["me_end"] == out["me_before"]
    assert out["keep_leases"] == 1
    assert out["active"] == "active"
    line = box.wait_journal("reload refused")
    assert "max_segment_size" in line


def test_restart_and_crash_keep_persistent_bytes_and_ttl(box: Box) -> None:
    """(d) restart, then SIGKILL + Restart=on-failure: a persistent segment keeps its
    bytes and id; a released ttl segment keeps its countdown (not restarted, not lost)."""
    ttl = 8.0
    made = box.client(
        f"""
        b = Broker(SOCK)
        p = b.create("keep/shm", 1 << 20, lifetime="persistent")
        p.buf[:] = os.urandom(1 << 20)
        out["sha"], out["id"] = sha(p.buf), p.id
        t = b.create("keep/ttl", 4096, lifetime="ttl", ttl={ttl})
        out["ttl_id"] = t.id
        p.close()
        t.close()  # last lease released: the countdown starts now
        out["t0"] = time.time()
        b.close()
        """
    )
    t0 = made["t0"]
    read = """
        b = Broker(SOCK)
        p = b.open("keep/shm")
        out["sha"], out["id"] = sha(p.buf), p.id
        out["ttl"] = code(lambda: b.stat("keep/ttl"))
        out["now"] = time.time()
        p.close()
        b.close()
        """
    # Restart late in the countdown, so that a countdown started over would show.
    time.sleep(max(0.0, t0 + ttl / 2 - time.time()))
    box.sbx.systemctl("restart", SERVICE, timeout=40)
    after_restart = box.client(read)
    assert (after_restart["sha"], after_restart["id"]) == (made["sha"], made["id"])
    assert after_restart["ttl"] == "ok", "the ttl segment did not survive the restart"

    before = box.show("MainPID", "NRestarts")
    box.sbx.systemctl("kill", "-s", "KILL", SERVICE)

    def restarted() -> bool:
        now = box.show("MainPID", "NRestarts", "ActiveState")
        return (
            now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", before["MainPID"])
            and int(now["NRestarts"]) == int(before["NRestarts"]) + 1
        )

    box.wait_for("auto-restart after SIGKILL", restarted, timeout=15)
    assert "status=9/KILL" in box.manager_log()
    after_kill = box.client(read)
    assert (after_kill["sha"], after_kill["id"]) == (made["sha"], made["id"])
    if after_kill["now"] < t0 + ttl - 0.5:
        assert after_kill["ttl"] == "ok", "the ttl segment did not survive the crash"

    gone = box.client(
        """
        b = Broker(SOCK)
        while code(lambda: b.stat("keep/ttl")) == "ok":
            time.sleep(0.05)
        out["gone"] = time.time()
        out["code"] = code(lambda: b.stat("keep/ttl"))
        b.close()
        """,
        alarm=20,
    )
    assert gone["code"] == "ENOENT"
    # Expired on its original deadline; a countdown started over at either restart
    # would end at >= t0 + 1.5 * ttl.  Bounds, generous for a loaded machine.
    assert t0 + ttl - 1.0 <= gone["gone"] <= t0 + ttl + 2.5, gone["gone"] - t0


def test_memfd_segment_survives_restart_and_crash_through_the_fd_store(box: Box) -> None:
    """(e) backing memfd + persistent lives only in systemd's fd store across restarts."""
    made = box.client(
        """
        b = Broker(SOCK)
        out["features"] = b.hello().features
        m = b.create("keep/memfd", 1 << 20, lifetime="persistent", backing="memfd")
        m.buf[:] = os.urandom(1 << 20)
        out["sha"], out["id"] = sha(m.buf), m.id
        out["shm_files"] = sorted(os.listdir("/dev/shm"))
        m.close()
        b.close()
        """
    )
    assert "memfd-persistent" in made["features"]
    # only the daemon's prefix lock: a memfd segment has no /dev/shm file
    assert made["shm_files"] == ["shmbroker.lock"], "a memfd segment has no /dev/shm file"
    assert box.show("NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    read = """
        b = Broker(SOCK)
        m = b.open("keep/memfd")
        out["sha"], out["id"], out["backing"] = sha(m.buf), m.id, b.stat("keep/memfd").backing
        m.close()
        b.close()
        """
    box.sbx.systemctl("restart", SERVICE, timeout=40)
    assert box.show("NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    after = box.client(read)
    assert (after["sha"], after["id"], after["backing"]) == (made["sha"], made["id"], "memfd")

    pid = box.show("MainPID")["MainPID"]
    box.sbx.systemctl("kill", "-s", "KILL", SERVICE)
    box.wait_for(
        "auto-restart after SIGKILL",
        lambda: (
            box.show("MainPID")["MainPID"] not in ("0", pid) and box.is_active(SERVICE) == "active"
        ),
        timeout=15,
    )
    after = box.client(read)
    assert (after["sha"], after["id"], after["backing"]) == (made["sha"], made["id"], "memfd")
    assert "not in the fd store" not in box.journal()


def test_client_reclaims_its_lease_across_a_restart(box: Box) -> None:
    """(f) A client holding a persistent and a refcount segment keeps running through
    `systemctl restart`; both stay (a stop keeps what clients hold), and its next call
    reconnects and re-attaches the leases to its new connection."""
    out = box.client(
        """
        b = Broker(SOCK)
        seg = b.create("reclaim/p", 4096, lifetime="persistent")
        seg.buf[:4] = b"abcd"
        rc = b.create("reclaim/rc", 4096)  # refcount, the default lifetime
        rc.buf[:4] = b"kept"
        out["me_before"] = me(b)
        out["restart"] = systemctl("restart", "shmbrokerd")
        info = b.stat("reclaim/p")  # reconnects, reclaims, then asks
        out["leases"] = info.leases
        out["me_after"] = me(b)
        seg.buf[:4] = b"wxyz"  # the old mapping is still the segment
        with Broker(SOCK) as other, other.open("reclaim/p") as view:
            out["other_sees"] = bytes(view.buf[:4]).decode()
            with other.open("reclaim/rc") as rc_view:
                out["other_sees_rc"] = bytes(rc_view.buf[:4]).decode()
        out["rc_lost"] = rc.lost
        rc.close()
        seg.close()
        out["leases_released"] = b.stat("reclaim/p").leases
        b.close()
        """
    )
    assert out["restart"][0] == 0, out["restart"][1]
    assert out["me_before"][0]["leases"] == 2
    assert len(out["me_after"]) == 1
    # A new connection (peer ids restart with the daemon: compare connect times).
    assert out["me_after"][0]["connected"] > out["me_before"][0]["connected"]
    assert out["me_after"][0]["leases"] == 2, "the leases were not reclaimed by the client"
    assert out["leases"] == 1
    assert out["other_sees"] == "wxyz"
    assert (out["other_sees_rc"], out["rc_lost"]) == ("kept", False)
    assert out["leases_released"] == 0
    assert "2 leases may be reclaimed" in box.wait_journal("recovered")


def test_watchdog_kills_a_stuck_loop_and_restarts_it(box: Box) -> None:
    """(g) WatchdogSec=2s: a healthy loop keeps pinging; a SIGSTOPped one is killed and
    restarted, and the socket answers again."""
    box.sbx.write_file(f"{DROPIN_DIR}/wd.conf", "[Service]\nWatchdogSec=2s\n")
    box.sbx.systemctl("daemon-reload")
    box.sbx.systemctl("start", SERVICE, timeout=40)
    start = box.show("MainPID", "NRestarts", "WatchdogUSec")
    assert start["WatchdogUSec"] == "2s"
    time.sleep(3.5)  # longer than WatchdogSec: a daemon that does not ping dies here
    healthy = box.show("MainPID", "NRestarts", "ActiveState")
    assert (healthy["MainPID"], healthy["NRestarts"]) == (start["MainPID"], start["NRestarts"])
    assert "Watchdog timeout" not in box.manager_log()

    box.sbx.run(["kill", "-STOP", start["MainPID"]])

    def restarted() -> bool:
        now = box.show("MainPID", "NRestarts", "ActiveState")
        return (
            now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", start["MainPID"])
            and int(now["NRestarts"]) == int(start["NRestarts"]) + 1
        )

    box.wait_for("watchdog restart", restarted, timeout=25)
    log = box.manager_log()
    assert "shmbrokerd.service: Watchdog timeout" in log
    assert "Failed with result 'watchdog'" in log
    out = box.client("b = Broker(SOCK)\nout['server'] = b.hello().server\nb.close()")
    assert out["server"].startswith("shmbrokerd/")


def test_stop_is_clean_and_keeps_held_segments(box: Box) -> None:
    """(h) `systemctl stop` with a client connected: exit 0, the held refcount and
    persistent objects kept (for reclaim, as after a crash), a released refcount one
    unlinked, socket still listening."""
    out = box.client(
        """
        b = Broker(SOCK)
        rc = b.create("stop/rc", 4096)
        p = b.create("stop/p", 4096, lifetime="persistent")
        done = b.create("stop/released", 4096)
        done.close()
        out["rc_before"] = os.path.exists("/dev/shm/shmbroker." + rc.id)
        out["stop"] = systemctl("stop", "shmbrokerd")
        out["rc_after"] = os.path.exists("/dev/shm/shmbroker." + rc.id)
        out["p_after"] = os.path.exists("/dev/shm/shmbroker." + p.id)
        out["released_after"] = os.path.exists("/dev/shm/shmbroker." + done.id)
        b.close()  # no release: it would start the daemon again
        """
    )
    assert out["rc_before"] is True
    assert out["stop"][0] == 0, out["stop"][1]
    assert out["rc_after"] is True, "a stop ended a refcount segment a client holds"
    assert out["p_after"] is True, "persistent segment lost at stop"
    assert out["released_after"] is False, "a released refcount segment outlived the stop"
    state = box.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED
        "ExecMainStatus": "0",
    }
    assert box.is_active(SOCKET_UNIT) == "active"
    box.wait_journal("shutting down")  # the daemon's own orderly shutdown, to the end
    box.wait_journal("stopped")


@pytest.mark.parametrize("service", [SERVICE, EXPORTER])
def test_units_verify_and_score_safe(box: Box, service: str) -> None:
    """(j) `systemd-analyze security` <= 1.0 and `systemd-analyze verify` clean,
    for the daemon's units and the exporter's."""
    sec = box.sbx.run(
        ["systemd-analyze", "security", "--offline=yes", str(REPO / "systemd" / service)],
        check=False,
    )
    name = re.escape(service)
    match = re.search(rf"Overall exposure level for {name}: (\d+\.\d+)", sec.stdout)
    assert match, sec.stdout[-2000:] + sec.stderr
    assert float(match.group(1)) <= 1.0, sec.stdout
    socket_unit = service.replace(".service", ".socket")
    ver = box.sbx.run(
        [
            "systemd-analyze",
            "verify",
            f"/etc/systemd/system/{service}",
            f"/etc/systemd/system/{socket_unit}",
        ],
        check=False,
    )
    assert (ver.returncode, ver.stdout + ver.stderr) == (0, "")


def test_journal_carries_the_structured_fields_of_a_denial(box: Box) -> None:
    """(i) A peer of another uid opening a 0600 segment gets EACCES, and the journal
    entry has SEGMENT, PEER_PID, PEER_UID, OP and ERRNO."""
    box.client('b = Broker(SOCK)\nb.create("deny/x", 4096, lifetime="persistent")\nb.close()')
    out = box.client(
        """
        b = Broker(SOCK)
        out["code"] = code(lambda: b.open("deny/x"))
        out["pid"], out["uid"] = os.getpid(), os.getuid()
        b.close()
        """,
        user=CLIENT_USER,
    )
    assert out["code"] == "EACCES"
    box.wait_journal("denied open deny/x")
    entries = [
        e
        for e in box.sbx.journal(SERVICE, fields=True)
        if "denied open deny/x" in str(e.get("MESSAGE"))
    ]
    assert entries
    fields = {k: entries[-1].get(k) for k in ("SEGMENT", "PEER_PID", "PEER_UID", "OP", "ERRNO")}
    assert fields == {
        "SEGMENT": "deny/x",
        "PEER_PID": str(out["pid"]),
        "PEER_UID": str(out["uid"]),
        "OP": "open",
        "ERRNO": "EACCES",
    }, f"journal entry lacks the structured fields: {entries[-1]}"


SCRAPE_CODE = """
import urllib.request
from prometheus_client.parser import text_string_to_metric_families

def scrape():
    body = urllib.request.urlopen(SCRAPE, timeout=10).read().decode()
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}
"""


def test_exporter_is_socket_activated_and_scrapes_the_daemon(box: Box) -> None:
    """The exporter's socket unit listens on 127.0.0.1:9839; the first scrape starts
    the service (its own user, the daemon's monitor_group), which asks the daemon;
    with the daemon stopped it answers shmbroker_up 0 and logs why."""
    sbx = box.sbx
    sbx.run(["ip", "link", "set", "lo", "up"])  # the sandbox's net namespace: lo only
    sbx.systemctl("start", EXPORTER_SOCKET)
    try:
        assert box.is_active(EXPORTER) == "inactive"
        assert box.is_active(SERVICE) == "inactive"
        out = box.client(
            SCRAPE_CODE.replace("SCRAPE", repr(SCRAPE))
            + """
b = Broker(SOCK)
seg = b.create("metrics/x", 1 << 20, lifetime="refcount")
out["during"] = scrape()
seg.close()
b.close()
out["after"] = scrape()
"""
        )
        assert box.is_active(EXPORTER) == "active"
        during, after = out["during"], out["after"]
        kind = '{"backing": "shm", "lifetime": "refcount"}'
        assert during["shmbroker_up{}"] == 1
        assert during["shmbroker_segments" + kind] == 1
        assert during["shmbroker_segments_bytes" + kind] == 1 << 20
        assert after["shmbroker_segments" + kind] == 0
        assert after['shmbroker_requests_total{"op": "create"}'] == 1
        assert after['shmbroker_request_duration_seconds_count{"op": "create"}'] == 1
        user = box.show("User", "MainPID", unit=EXPORTER)
        assert user["User"] == "shmbroker-exporter"
        status = sbx.run(["cat", f"/proc/{user['MainPID']}/status"]).stdout
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        assert uid
        assert int(uid.group(1)) != 0

        sbx.systemctl("stop", SERVICE, SOCKET_UNIT)
        down = box.client(SCRAPE_CODE.replace("SCRAPE", repr(SCRAPE)) + 'out["down"] = scrape()\n')
        assert down["down"] == {"shmbroker_up{}": 0}
        deadline = time.monotonic() + 10
        while "does not answer" not in sbx.journal(EXPORTER):
            assert time.monotonic() < deadline, sbx.journal(EXPORTER)
            time.sleep(0.1)
    finally:
        sbx.systemctl("stop", EXPORTER, EXPORTER_SOCKET, check=False)


def test_uninstall_reverses_install(box: Box) -> None:
    """`make uninstall` stops the units and removes what `make install` put in place,
    keeping the config, the state and the user (runs last: the module's install is gone)."""
    box.client("b = Broker(SOCK)\nb.hello()\nb.close()")  # the service is running
    box.sbx.run(["make", "-C", str(REPO), "uninstall"], timeout=120)
    gone = [
        f"/etc/systemd/system/{SERVICE}",
        f"/etc/systemd/system/{SOCKET_UNIT}",
        f"/etc/systemd/system/{EXPORTER}",
        f"/etc/systemd/system/{EXPORTER_SOCKET}",
        "/usr/lib/sysusers.d/shmbroker.conf",
        "/usr/lib/tmpfiles.d/shmbroker.conf",
        "/opt/shmbroker",
    ]
    left = box.sbx.run(["sh", "-c", f"ls -d {' '.join(gone)} 2>/dev/null || true"]).stdout
    assert left.strip() == ""
    assert box.is_active(SERVICE) in ("inactive", "unknown")
    assert box.is_active(SOCKET_UNIT) in ("inactive", "unknown")
    box.sbx.run(["test", "-f", CONFIG])  # kept
    box.sbx.run(["getent", "passwd", "shmbroker"])  # kept
