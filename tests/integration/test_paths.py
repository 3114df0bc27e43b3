"""With no flags the daemon picks its paths from who runs it: /run/shmbroker as
root, $XDG_RUNTIME_DIR/shmbroker otherwise; clients find it the same way."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests.support.helpers import PREFIXES, eventually

UID = 65534


def _start(code: str, env: dict[str, str], prefix: str) -> subprocess.Popen[str]:
    PREFIXES.add(prefix)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env, "SHMBROKERD_CONFIG": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd="/",
    )


def test_non_root_daemon_lives_under_xdg_runtime_dir() -> None:
    xdg = Path(tempfile.mkdtemp(prefix="sbt-xdg-", dir="/tmp"))
    os.chown(xdg, UID, UID)
    prefix = "sbtxdg."
    cfg = xdg / "c.toml"
    cfg.write_text(f'shm_prefix = "{prefix}"\n')  # no socket, no state_dir
    daemon = _start(
        f"""
        import os
        os.setgroups([]); os.setgid({UID}); os.setuid({UID})
        from shmbrokerd.__main__ import main
        raise SystemExit(main(["--config", "{cfg}"]))
        """,
        {"XDG_RUNTIME_DIR": str(xdg)},
        prefix,
    )
    try:
        sock = xdg / "shmbroker" / "shmbroker.sock"
        eventually(sock.exists, timeout=15)
        client = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    f"""
                    import os
                    from shmbroker import Broker, socket_path
                    os.setgroups([]); os.setgid({UID}); os.setuid({UID})
                    print(socket_path())
                    with Broker() as b, b.create("p/x", 4096) as s:
                        print(b.hello().events, s.size)
                    """
                ),
            ],
            env={**os.environ, "XDG_RUNTIME_DIR": str(xdg), "SHMBROKER_SOCKET": ""},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert client.returncode == 0, client.stderr
        path, line = client.stdout.splitlines()
        assert path == str(sock)
        assert line == f"ipc://{xdg}/shmbroker/events.sock 4096"
        assert (xdg / "shmbroker" / "state" / "state.json").exists()
        assert (xdg / "shmbroker" / "state").stat().st_uid == UID
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=10)
        shutil.rmtree(xdg, ignore_errors=True)
    assert daemon.returncode == 0, out


def test_non_root_without_xdg_runtime_dir_says_what_to_do() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os; os.setgroups([]); os.setgid({UID}); os.setuid({UID})\n"
            "from shmbrokerd.__main__ import main; raise SystemExit(main([]))",
        ],
        env={k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert proc.returncode == 78
    assert "XDG_RUNTIME_DIR is not set" in proc.stderr


def test_root_daemon_lives_under_run_shmbroker() -> None:
    """In a private mount namespace, with a fresh tmpfs on /run."""
    prefix = "sbtroot."
    script = textwrap.dedent(
        f"""
        set -e
        mount -t tmpfs tmpfs /run
        printf 'shm_prefix = "{prefix}"\\n' > /run/c.toml
        SHMBROKERD_CONFIG=/run/c.toml {sys.executable} -m shmbrokerd &
        pid=$!
        for i in $(seq 150); do [ -S /run/shmbroker/shmbroker.sock ] && break; sleep 0.1; done
        env -u SHMBROKER_SOCKET {sys.executable} -c '
        from shmbroker import Broker, socket_path
        with Broker() as b: print(socket_path(), b.hello().events)'
        kill -TERM $pid; wait $pid
        ls /run/shmbroker/state
        """
    )
    PREFIXES.add(prefix)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split()
    assert lines[:2] == ["/run/shmbroker/shmbroker.sock", "ipc:///run/shmbroker/events.sock"]
    assert "state.json" in lines
    time.sleep(0)  # nothing of the namespace outlives it
