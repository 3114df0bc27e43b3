"""`make demo` (examples/demo.py) as a newcomer runs it: whole lines, in order,
and the consumer reads what the producer wrote."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support.helpers import REPO


def test_demo_prints_whole_lines_in_order() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout
    wrote = re.fullmatch(r"producer: wrote '(hello from pid \d+)' to demo/greeting \(4096 bytes\)",
                         lines[0])  # fmt: skip
    assert wrote, lines
    assert lines[1] == f"consumer: read {wrote.group(1)!r} (read-only: True)"
    assert lines[2] == "consumer: writing is refused, as the mapping is read-only"
