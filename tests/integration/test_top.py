"""``shmbrokerctl top``: in a real terminal (tmux runs it, ``send-keys`` types,
``capture-pane`` reads the screen), and ``--once``/``--json`` for scripts, with a
real daemon under load from separate client processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmbrokerd.top import quantile
from tests.support.helpers import DaemonProc, spawn_client, wait_line

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

CTL = [str(Path(sys.executable).with_name("shmbrokerctl"))]
#: holds three segments of known sizes, and opens one in a loop until stdin closes
LOAD = """
import threading
b = Broker(SOCK)
segs = [b.create("top/big", 8 << 20, lifetime="refcount"),
        b.create("top/mid", 2 << 20, lifetime="refcount"),
        b.create("top/small", 4096, lifetime="refcount")]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("READY", flush=True)
while not stop.is_set():
    b.open("top/small").close()
    time.sleep(0.002)
for s in segs:
    s.close()
b.close()
"""


@contextlib.contextmanager
def load(daemon: DaemonProc) -> Iterator[int]:
    proc = spawn_client(LOAD, daemon.socket, stdin=subprocess.PIPE)
    try:
        wait_line(proc)
        yield proc.pid
    finally:
        _, err = proc.communicate("", timeout=30)
    assert proc.returncode == 0, err


class Tmux:
    """A private tmux server (its own socket) with one 120x40 window."""

    def __init__(self, command: str) -> None:
        self.name = f"sbt-top-{secrets.token_hex(4)}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", command)

    def tmux(self, *args: str) -> str:
        res = subprocess.run(
            ["tmux", "-L", self.name, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "TERM": "xterm"},
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while text not in (screen := self.screen()):
            assert time.monotonic() < deadline, f"{text!r} never on screen:\n{screen}"
            time.sleep(0.1)
        return screen

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=10)
        # the server leaves its socket file behind
        tmpdir = os.environ.get("TMUX_TMPDIR", "/tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tmpdir, f"tmux-{os.getuid()}", self.name))


@contextlib.contextmanager
def terminal(daemon: DaemonProc) -> Iterator[Tmux]:
    ctl = " ".join([*CTL, "--socket", daemon.socket, "top"])
    # after top: its exit status and the tty's mode (cooked again: icanon, echo)
    # sh traps SIGINT (its child gets the default), so Ctrl-C ends top and not sh
    modes = 'stty -a | tr " ;" "\\n\\n" | grep -x -e icanon -e echo'
    shell = f"sh -c 'trap : INT; {ctl}; echo EXIT=$?; {modes}; sleep 60'"
    tmux = Tmux(shell)
    try:
        yield tmux
    finally:
        tmux.kill()


def _row(screen: str, first: str) -> list[str]:
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{screen}")


def test_top_live_in_a_terminal_and_quit_with_q(daemon: DaemonProc) -> None:
    with load(daemon) as pid, terminal(daemon) as tmux:
        screen = tmux.wait_for("BUSIEST CLIENTS")
        screen = tmux.wait_for(str(pid))  # the busiest client, by pid
        assert "shmbrokerd up" in screen
        assert "segments 3" in screen
        open_row = _row(screen, "open")
        assert float(open_row[1]) > 10  # ops/s of open under the load
        assert open_row[3].endswith(("us", "ms"))  # p50
        assert open_row[4].endswith(("us", "ms"))  # p99
        # largest segments first, with size, leases, lifetime and owner
        lines = screen.splitlines()
        start = lines.index("LARGEST SEGMENTS")
        assert lines[start + 1].split() == ["NAME", "SIZE", "LEASES", "LIFETIME", "OWNER"]
        assert [ln.split()[0] for ln in lines[start + 2 : start + 5]] == [
            "top/big",
            "top/mid",
            "top/small",
        ]
        assert lines[start + 2].split()[1:] == ["8.0", "MiB", "1", "refcount", "0:0"]
        # it refreshes: the uptime line changes within a few seconds
        first = lines[0]
        deadline = time.monotonic() + 5
        while tmux.screen().splitlines()[0] == first:
            assert time.monotonic() < deadline, "top did not refresh"
            time.sleep(0.2)
        tmux.tmux("send-keys", "-t", "t", "q")
        after = tmux.wait_for("EXIT=0")
    assert "BUSIEST CLIENTS" not in after  # the alternate screen is gone
    assert "icanon" in after.split()
    assert "echo" in after.split()


def test_top_quits_on_ctrl_c_and_restores_the_terminal(daemon: DaemonProc) -> None:
    with terminal(daemon) as tmux:
        tmux.wait_for("OP")
        tmux.tmux("send-keys", "-t", "t", "C-c")
        after = tmux.wait_for("EXIT=")
    assert "EXIT=0" in after
    assert "icanon" in after.split()
    assert "OP" not in after.split()


def test_top_once_and_json_for_scripts(daemon: DaemonProc) -> None:
    with load(daemon) as pid:
        text = subprocess.run(
            [*CTL, "--socket", daemon.socket, "top", "--once"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        raw = subprocess.run(
            [*CTL, "--socket", daemon.socket, "top", "--once", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    assert "LARGEST SEGMENTS" in text
    assert "top/big" in text
    frame = json.loads(raw)
    assert set(frame) == {
        "time",
        "interval",
        "totals",
        "ops",
        "largest_segments",
        "busiest_clients",
    }
    assert frame["totals"]["segments"] == 3
    assert frame["totals"]["bytes"] == (8 << 20) + (2 << 20) + 4096
    ops = {r["op"]: r for r in frame["ops"]}
    assert ops["open"]["rate"] > 10
    assert 0 < ops["open"]["p50"] <= ops["open"]["p99"]
    assert [s["name"] for s in frame["largest_segments"]] == ["top/big", "top/mid", "top/small"]
    assert frame["busiest_clients"][0]["pid"] == pid
    assert frame["busiest_clients"][0]["rate"] > 10


def test_quantiles_interpolate_inside_a_bucket() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == 0.5
    assert quantile(bounds, [0, 10, 0, 0], 0.5) == 1.5
    assert quantile(bounds, [5, 0, 5, 0], 0.99) == pytest.approx(2.0 + 2.0 * 0.98)
    assert quantile(bounds, [1, 0, 0, 99], 0.5) == 4.0  # past the last bound: the bound
