"""`make demo`: a private daemon and two unrelated processes sharing a region.

The consumer runs as the unprivileged user ``nobody`` when started as root,
so the segment's mode (0644) is what lets it read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="shmbroker-demo-"))
    root.chmod(0o755)
    sock = root / "shmbroker.sock"
    env = {**os.environ, "SHMBROKER_SOCKET": str(sock)}
    # A prefix of its own: a daemon removes the objects under its prefix that
    # it has no record of, and a real shmbrokerd may use the default one.
    config = root / "demo.toml"
    config.write_text(f'shm_prefix = "shmbroker-demo-{os.getpid()}."\n')
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shmbrokerd",
            "--config",
            str(config),
            "--socket",
            str(sock),
            "--state-dir",
            str(root / "state"),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        while not sock.exists():
            if daemon.poll() is not None:
                return 1
            time.sleep(0.05)
        os.chmod(sock, 0o666)  # let `nobody` connect in this demo
        producer = subprocess.Popen(
            [sys.executable, str(HERE / "producer.py")],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert producer.stdout is not None
        # The consumer starts once the producer has written and said so: its
        # line is whole before the consumer's, and the consumer reads the data.
        print(producer.stdout.readline(), end="", flush=True)
        as_nobody = (
            {"user": "nobody", "group": "nogroup", "extra_groups": []} if os.geteuid() == 0 else {}
        )
        consumer = subprocess.run(
            [sys.executable, str(HERE / "consumer.py")], env=env, cwd="/", **as_nobody
        )
        assert producer.stdin is not None
        producer.stdin.write("\n")
        producer.stdin.close()
        sys.stdout.write(producer.stdout.read())
        producer.wait()
        return consumer.returncode or producer.returncode
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
