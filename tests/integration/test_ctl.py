"""``shmbrokerctl`` as an operator runs it: the installed console script, a
separate process, against a real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from shmbroker import Broker
from tests.support.helpers import DaemonProc, spawn_client, wait_line

CTL = str(Path(sys.executable).parent / "shmbrokerctl")
#: Another user, with a gid unlike its uid so that columns cannot be swapped unseen.
OTHER_UID, OTHER_GID = 65534, 65533
ME = f"{os.getuid()}:{os.getgid()}"
THEM = f"{OTHER_UID}:{OTHER_GID}"


# The interpreter may live where only root can search (a pyenv under /root),
# so a process of another uid cannot exec it: it starts as root, imports what
# it needs, then drops to the other user for good before it connects.
DROP_TO_OTHER = f"""
import os
os.setgroups([])
os.setresgid({OTHER_GID}, {OTHER_GID}, {OTHER_GID})
os.setresuid({OTHER_UID}, {OTHER_UID}, {OTHER_UID})
"""
#: Runs the console script (argv[1]) with the rest of argv, as the other user.
RUN_AS_OTHER = f"""
import sys, shmbrokerd.ctl
script = open(sys.argv[1]).read()
{DROP_TO_OTHER}
sys.argv = sys.argv[1:]
exec(compile(script, sys.argv[0], "exec"), {{"__name__": "__main__"}})
"""


def ctl(
    sock: str | None, *args: str, env: dict[str, str] | None = None, as_other: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = [CTL, *(["--socket", sock] if sock else []), *args]
    if as_other:
        argv = [sys.executable, "-c", RUN_AS_OTHER, *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}, cwd="/"
    )


def ok(sock: str, *args: str) -> str:
    """Run a command that must succeed silently on stderr; its stdout."""
    out = ctl(sock, *args)
    assert (out.returncode, out.stderr) == (0, ""), out
    return out.stdout


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of an aligned table, checking that every cell starts at its header's column."""
    header, *lines = text.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    rows = []
    for line in lines:
        for s in starts:
            assert line[s] != " ", f"misaligned: {line!r}"
            assert s == 0 or line[s - 1] == " ", f"misaligned: {line!r}"
        ends = [*starts[1:], None]
        cells = [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]
        rows.append(dict(zip(header.split(), cells, strict=True)))
    return rows


def parse_pairs(text: str) -> dict[str, str]:
    """``key:  value`` lines, values aligned in one column."""
    lines = text.splitlines()
    column = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(column) == 1, f"values not aligned:\n{text}"
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sbt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def foreign_client(daemon: DaemonProc) -> Iterator[subprocess.Popen[str]]:
    """A client of the other user holding two leases on ``c/held`` until killed."""
    code = """
        with Broker(SOCK) as b, b.create("c/held", 4096, mode=0o640), b.open("c/held"):
            print("READY")
            time.sleep(60)
        """
    yield from _other_user_client(daemon, code)


def _other_user_client(daemon: DaemonProc, code: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``code`` as the other user until it prints READY; kill it afterwards."""
    with spawn_client(DROP_TO_OTHER + textwrap.dedent(code), daemon.socket) as proc:
        try:
            wait_line(proc)
            yield proc
        finally:
            proc.kill()
            proc.wait()


# -- list and stat ----------------------------------------------------------------


def test_list_prints_an_aligned_table_of_every_segment(
    daemon: DaemonProc, foreign_client: subprocess.Popen[str]
) -> None:
    with (
        Broker(daemon.socket) as b,
        b.create("t/a", 4096, mode=0o640),
        b.create("t/b", 3 << 20, lifetime="ttl", ttl=2.5, backing="memfd"),
        b.open("t/b"),
    ):
        b.seal("t/b")
        rows = parse_table(ok(daemon.socket, "list"))
        only_t = parse_table(ok(daemon.socket, "list", "t/"))
        empty = ok(daemon.socket, "list", "none/")
    head = ["NAME", "SIZE", "LIFETIME", "TTL", "MODE", "OWNER", "LEASES", "SEALED", "BACKING"]
    assert [list(r.values()) for r in rows] == [
        [
            "c/held",
            "4.0 KiB",
            "refcount",
            "-",
            "0640",
            f"{OTHER_UID}:{OTHER_GID}",
            "2",
            "no",
            "shm",
        ],
        ["t/a", "4.0 KiB", "refcount", "-", "0640", ME, "1", "no", "shm"],
        ["t/b", "3.0 MiB", "ttl", "2.5s", "0600", ME, "2", "yes", "memfd"],
    ]
    assert list(rows[0]) == head
    assert only_t == rows[1:]
    assert empty.split() == head


def test_list_json_is_the_array_of_segment_objects_wherever_json_is_given(
    daemon: DaemonProc,
) -> None:
    with Broker(daemon.socket) as b, b.create("j/a", 4096, mode=0o644), b.create("j/b", 100):
        expected = [s.model_dump(mode="json") for s in b.list()]
        before = json.loads(ok(daemon.socket, "--json", "list"))
        after = json.loads(ok(daemon.socket, "list", "--json"))
        filtered = json.loads(ok(daemon.socket, "list", "j/b", "--json"))
        empty = json.loads(ok(daemon.socket, "--json", "list", "none/"))
    assert before == after == expected
    assert [s["name"] for s in before] == ["j/a", "j/b"]
    assert before[0]["mode"] == 0o644
    assert filtered == expected[1:]
    assert empty == []


def test_stat_prints_one_segment_in_both_forms(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, b.create("s/x", 8192, lifetime="ttl", ttl=30) as seg:
        b.seal("s/x")
        pairs, holders = ok(daemon.socket, "stat", "s/x").split("\n\n")
        human = parse_pairs(pairs)
        as_json = json.loads(ok(daemon.socket, "stat", "s/x", "--json"))
        info = b.stat("s/x")
        client = next(c for c in b.clients() if c.pid == os.getpid())
    # an operator (as root) sees the holders too
    holder = {"client": client.id, "pid": os.getpid(), "uid": os.getuid(), "access": "rw"}
    assert as_json == {
        **info.model_dump(mode="json"),
        "holders": [{**holder, "name": None, "leases": 1}],
    }
    assert parse_table(holders) == [
        {"CLIENT": str(client.id), "PID": str(os.getpid()), "UID": str(os.getuid())}
        | {"ACCESS": "rw", "LEASES": "1", "NAME": "-"}
    ]
    created = datetime.fromisoformat(human.pop("created")).timestamp()
    assert abs(created - info.created) < 0.001
    assert human == {
        "name": "s/x",
        "id": seg.info.id,
        "size": "8.0 KiB (8192 bytes)",
        "lifetime": "ttl",
        "ttl": "30s",
        "mode": "0600",
        "owner": ME,
        "leases": "1",
        "sealed": "yes",
        "backing": "shm",
    }


# -- errors and exit status -------------------------------------------------------------


def test_a_daemon_error_exits_1_with_its_errno_name_and_message(daemon: DaemonProc) -> None:
    for argv in (["stat", "t/none"], ["delete", "t/none"], ["--json", "stat", "t/none"]):
        out = ctl(daemon.socket, *argv)
        assert (out.returncode, out.stdout) == (1, "")
        assert out.stderr == "shmbrokerctl: ENOENT: no such segment: t/none\n"
    out = ctl(daemon.socket, "stat", "bad//name")
    assert out.returncode == 1
    assert out.stderr.startswith("shmbrokerctl: EINVAL: ")
    assert out.stderr.count("\n") == 1


def test_operator_commands_refuse_other_users_with_eacces(daemon: DaemonProc) -> None:
    for command in ("clients", "stats", "reload"):
        out = ctl(daemon.socket, command, as_other=True)
        assert (out.returncode, out.stdout) == (1, "")
        assert out.stderr == f"shmbrokerctl: EACCES: {command} is for operators only\n"


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["stat"], ["stat", "a", "b"], ["list", "--bogus"]],
)
def test_usage_errors_exit_2_before_connecting(short_dir: str, argv: list[str]) -> None:
    out = ctl(os.path.join(short_dir, "s.sock"), *argv)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("usage: shmbrokerctl")
    assert "cannot connect" not in out.stderr


def test_help_documents_json_output_and_exit_status() -> None:
    out = ctl(None, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for command in ("list", "stat", "delete", "clients", "stats", "watch", "reload", "drop"):
        assert f"\n    {command} " in out.stdout
    assert "delete, drop and reload print nothing on stdout in either form" in text
    assert "3 reload: the config was reloaded, but some changed keys take effect only" in text
    assert "one JSON object per line (JSON Lines)" in text
    assert "2 usage error" in text


NOT_RUNNING = "no such socket (is the daemon running?)"


@pytest.mark.parametrize("argv", [["list"], ["watch", "--json"]])
def test_no_daemon_is_one_line_naming_the_socket(short_dir: str, argv: list[str]) -> None:
    path = os.path.join(short_dir, "s.sock")
    out = ctl(path, *argv)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == f"shmbrokerctl: cannot connect to shmbrokerd at {path}: {NOT_RUNNING}\n"


def test_a_stale_socket_file_is_connection_refused(short_dir: str) -> None:
    path = os.path.join(short_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(path)  # bound, never listening, then closed: the file stays
    out = ctl(path, "list")
    assert out.returncode == 1
    assert out.stderr == (
        f"shmbrokerctl: cannot connect to shmbrokerd at {path}: "
        "connection refused (is the daemon running?)\n"
    )


def test_socket_from_environment_and_a_stopped_daemon(daemon: DaemonProc) -> None:
    env = {"SHMBROKER_SOCKET": daemon.socket}
    with Broker(daemon.socket) as b, b.create("e/x", 4096):
        out = ctl(None, "list", env=env)
    assert out.returncode == 0
    assert [r["NAME"] for r in parse_table(out.stdout)] == ["e/x"]
    assert daemon.stop() == 0
    out = ctl(None, "list", env=env)
    assert out.returncode == 1
    assert out.stderr == (
        f"shmbrokerctl: cannot connect to shmbrokerd at {daemon.socket}: {NOT_RUNNING}\n"
    )
    assert "Traceback" not in out.stderr


# -- delete, reload -----------------------------------------------------------------


@pytest.mark.parametrize("form", [(), ("--json",)])
def test_delete_unlinks_and_prints_nothing(daemon: DaemonProc, form: tuple[str, ...]) -> None:
    with Broker(daemon.socket) as b:
        b.create("d/x", 4096, lifetime="persistent").close()
        assert len(daemon.objects()) == 1
        assert ok(daemon.socket, *form, "delete", "d/x") == ""
        assert daemon.objects() == []
        with pytest.raises(FileNotFoundError):
            b.stat("d/x")


def test_reload_as_root_applies_the_new_config(daemon: DaemonProc) -> None:
    daemon.write_config(max_segment_size=1 << 20)
    assert ok(daemon.socket, "reload") == ""
    with Broker(daemon.socket) as b:
        assert b.hello().limits.max_segment_size == 1 << 20
    daemon.write_config(max_segment_size=2 << 20)
    assert ok(daemon.socket, "reload", "--json") == ""
    with Broker(daemon.socket) as b:
        assert b.hello().limits.max_segment_size == 2 << 20


def test_reload_of_an_invalid_config_exits_1_naming_the_key(daemon: DaemonProc) -> None:
    daemon.write_config(max_clients=0)
    out = ctl(daemon.socket, "reload")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.startswith("shmbrokerctl: EINVAL: ")
    assert "max_clients" in out.stderr


# -- clients, stats --------------------------------------------------------------------


def test_clients_lists_each_connection_with_its_credentials(
    daemon: DaemonProc, foreign_client: subprocess.Popen[str]
) -> None:
    rows = parse_table(ok(daemon.socket, "clients"))
    entries = json.loads(ok(daemon.socket, "--json", "clients"))
    assert list(rows[0]) == ["ID", "PID", "UID", "GID", "LEASES", "CONNECTED", "NAME"]
    theirs = [r for r in rows if r["PID"] == str(foreign_client.pid)]
    assert len(rows) == 2  # that client and this shmbrokerctl
    assert len(theirs) == 1
    assert (theirs[0]["UID"], theirs[0]["GID"]) == (str(OTHER_UID), str(OTHER_GID))
    assert theirs[0]["LEASES"] == "2"
    assert re.fullmatch(r"\d+s|\d+m\d\ds", theirs[0]["CONNECTED"])
    ctl_row = next(r for r in rows if r is not theirs[0])
    assert (ctl_row["UID"], ctl_row["LEASES"]) == (str(os.getuid()), "0")
    by_pid = {e["pid"]: e for e in entries}
    assert by_pid[foreign_client.pid]["id"] == int(theirs[0]["ID"])
    assert by_pid[foreign_client.pid]["uid"] == OTHER_UID
    assert by_pid[foreign_client.pid]["gid"] == OTHER_GID
    assert by_pid[foreign_client.pid]["leases"] == 2
    assert by_pid[foreign_client.pid]["connected"] <= time.time()
    assert set(entries[0]) == {"id", "pid", "uid", "gid", "leases", "connected", "name"}


def test_stats_shows_counters_and_requests_by_op(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, b.create("n/a", 4096), b.create("n/b", 4096):
        with pytest.raises(FileNotFoundError):
            b.stat("n/none")
        human = ok(daemon.socket, "stats")
        as_json = json.loads(ok(daemon.socket, "stats", "--json"))
    counters, by_op = human.split("\n\n")
    pairs = parse_pairs(counters)
    assert re.fullmatch(r"\d+s", pairs["uptime"])
    assert (pairs["segments"], pairs["clients"]) == ("2", "2")
    assert pairs["bytes"] == "8.0 KiB (8192 bytes)"
    assert parse_table(by_op) == [
        {"OP": "create", "REQUESTS": "2", "ERRORS": "0"},
        {"OP": "stat", "REQUESTS": "1", "ERRORS": "1"},
        {"OP": "stats", "REQUESTS": "1", "ERRORS": "0"},
    ]
    assert as_json["requests"] == {"create": 2, "stat": 1, "stats": 2}
    assert as_json["errors"] == {"stat": 1}
    assert (as_json["segments"], as_json["bytes"], as_json["clients"]) == (2, 8192, 2)
    assert as_json["uptime"] > 0


# -- watch ---------------------------------------------------------------------------


class Watch:
    """``shmbrokerctl watch`` running, its stdout lines read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._pump)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def until(self, pred: Callable[[str], bool], timeout: float = 10) -> list[str]:
        """Lines read up to and including the first that satisfies ``pred``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while not seen or not pred(seen[-1]):
            try:
                seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no such line; got {seen}") from None
        return seen

    def subscribed(self, broker: Broker, prefix: str = "") -> None:
        """Create probe segments until one shows (ZeroMQ's slow joiner)."""
        for i in range(100):
            with broker.create(f"{prefix}probe-{i}", 4096):
                pass
            with contextlib.suppress(queue.Empty):
                self.lines.get(timeout=0.2)
                return
        raise AssertionError("watch never showed an event")

    def stop(self, sig: int) -> tuple[int, str]:
        os.kill(self.proc.pid, sig)
        rc = self.proc.wait(10)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()


@contextlib.contextmanager
def watching(daemon: DaemonProc, *args: str) -> Iterator[Watch]:
    argv = [CTL, "--socket", daemon.socket, "watch", *args]
    # Block-buffered stdout, as in production, so that a missing flush shows.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    pipe = subprocess.PIPE
    with subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True, env=env) as p:
        watch = Watch(p)
        try:
            yield watch
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            watch.thread.join(10)


def test_watch_json_prints_one_event_per_line_until_sigint(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, watching(daemon, "--json", "w/") as w:
        w.subscribed(b, "w/")
        with b.create("other/x", 4096):  # outside the prefix: never shown
            pass
        with b.create("w/seg", 8192, mode=0o644):
            with b.open("w/seg"):
                pass
            b.seal("w/seg")
            b.delete("w/seg")
        lines = w.until(lambda line: json.loads(line)["name"] == "w/seg" and "deleted" in line)
        lines += w.until(lambda line: json.loads(line)["name"] == "w/seg")
        rc, err = w.stop(signal.SIGINT)
    events = [json.loads(line) for line in lines]
    assert all(line.endswith("}\n") and line.count("\n") == 1 for line in lines)
    assert all(e["name"].startswith("w/") for e in events)
    mine = [e for e in events if e["name"] == "w/seg"]
    assert [e["event"] for e in mine] == [
        "created",
        "opened",
        "released",
        "sealed",
        "deleted",
        "released",
    ]
    assert mine[0] == {**mine[0], "size": 8192, "uid": os.getuid(), "pid": os.getpid()}
    assert set(mine[0]) == {"event", "name", "size", "uid", "pid", "ts"}
    assert (rc, err) == (0, "")


def test_watch_human_lines_until_sigterm(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, watching(daemon) as w:
        w.subscribed(b)
        with b.create("h/seg", 3 << 20):
            pass
        lines = w.until(lambda line: " h/seg " in line and " deleted " in line)
        rc, err = w.stop(signal.SIGTERM)
    mine = [line.split() for line in lines if " h/seg " in line]
    who = [f"uid={os.getuid()}", f"pid={os.getpid()}"]
    assert [fields[1:] for fields in mine] == [
        [event, "h/seg", "3.0", "MiB", *who] for event in ("created", "released", "deleted")
    ]
    datetime.fromisoformat(mine[0][0])
    assert (rc, err) == (0, "")


# -- who holds what; dropping a client ------------------------------------------------


@pytest.fixture
def named_holder(daemon: DaemonProc) -> Iterator[subprocess.Popen[str]]:
    """A client of the other user, named ``camera-writer``, holding rw and ro leases."""
    code = """
        with Broker(SOCK) as b:
            b.hello("camera-writer")
            w = b.create("h/held", 4096, mode=0o644)
            r = b.open("h/held")
            print("READY", flush=True)
            time.sleep(60)
        """
    yield from _other_user_client(daemon, code)


def test_clients_and_stat_name_the_holders(
    daemon: DaemonProc, named_holder: subprocess.Popen[str]
) -> None:
    clients = parse_table(ok(daemon.socket, "clients"))
    theirs = next(r for r in clients if r["PID"] == str(named_holder.pid))
    assert theirs["NAME"] == "camera-writer"
    pairs, holders = ok(daemon.socket, "stat", "h/held").split("\n\n")
    assert parse_pairs(pairs)["leases"] == "2"
    common = {"CLIENT": theirs["ID"], "PID": str(named_holder.pid), "UID": str(OTHER_UID)}
    assert parse_table(holders) == [
        {**common, "ACCESS": "ro", "LEASES": "1", "NAME": "camera-writer"},
        {**common, "ACCESS": "rw", "LEASES": "1", "NAME": "camera-writer"},
    ]
    # not an operator: the segment (mode 0644 lets it read), no holders
    out = ctl(daemon.socket, "stat", "h/held", as_other=True)
    assert out.returncode == 0, out.stderr
    assert "\n\n" not in out.stdout
    as_json = json.loads(ctl(daemon.socket, "--json", "stat", "h/held", as_other=True).stdout)
    assert "holders" not in as_json


def test_drop_ends_a_clients_leases_logged_and_evented(
    daemon: DaemonProc, named_holder: subprocess.Popen[str]
) -> None:
    with Broker(daemon.socket) as b:
        victim = next(c for c in b.clients() if c.pid == named_holder.pid)
        watcher = b.watch("")
        try:
            time.sleep(0.3)  # the subscription reaches the daemon
            assert ok(daemon.socket, "drop", str(victim.id)) == ""
            seen = []
            while "deleted" not in seen:
                seen.append(watcher.next(timeout=5).event)
        finally:
            watcher.close()
        assert seen[0] == "dropped"
        assert seen.count("released") == 2
        with pytest.raises(FileNotFoundError):
            b.stat("h/held")  # its refcount segment went with its leases
        assert named_holder.pid not in {c.pid for c in b.clients()}
    assert f"client {victim.id} (pid={named_holder.pid} uid={OTHER_UID}) dropped by" in daemon.log()
    out = ctl(daemon.socket, "drop", str(victim.id))
    assert (out.returncode, out.stderr) == (
        1,
        f"shmbrokerctl: ENOENT: no such client: {victim.id}\n",
    )


def test_drop_is_for_operators_only(
    daemon: DaemonProc, named_holder: subprocess.Popen[str]
) -> None:
    with Broker(daemon.socket) as b:
        victim = next(c for c in b.clients() if c.pid == named_holder.pid)
        out = ctl(daemon.socket, "drop", str(victim.id), as_other=True)
        assert (out.returncode, out.stdout) == (1, "")
        assert out.stderr == "shmbrokerctl: EACCES: drop is for operators only\n"
        assert b.stat("h/held").leases == 2


def test_reload_that_needs_a_restart_says_so_and_exits_3(daemon: DaemonProc) -> None:
    daemon.write_config(shm_prefix="sbtother.", max_segment_size=1 << 20)
    out = ctl(daemon.socket, "reload")
    assert (out.returncode, out.stdout) == (3, "")
    assert out.stderr == (
        "shmbrokerctl: reloaded, but shm_prefix takes effect only on restart; the rest is applied\n"
    )
    assert "reload: shm_prefix takes effect only on restart" in daemon.log()
    with Broker(daemon.socket) as b:
        assert b.hello().limits.max_segment_size == 1 << 20  # the rest was applied
