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
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shmbrokerd",
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
            [sys.executable, str(HERE / "producer.py")], env=env, stdin=subprocess.PIPE, text=True
        )
        as_nobody = (
            {"user": "nobody", "group": "nogroup", "extra_groups": []} if os.geteuid() == 0 else {}
        )
        consumer = subprocess.run(
            [sys.executable, str(HERE / "consumer.py")], env=env, cwd="/", **as_nobody
        )
        assert producer.stdin is not None
        producer.stdin.write("\n")
        producer.stdin.close()
        producer.wait()
        return consumer.returncode or producer.returncode
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
