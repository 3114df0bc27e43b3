#!/usr/bin/env python3
"""Generate the sync client (``_sync.py``) from the async one (``_async.py``).

As httpcore's ``scripts/unasync.py``: each line of the async source goes
through the token substitutions below, in order, and nothing else changes,
so the two clients cannot drift apart.  What really differs is hand-written
in ``_transport_sync.py`` and ``_transport_async.py``.

    python scripts/unasync.py           # rewrite _sync.py
    python scripts/unasync.py --check   # exit 1 (with a diff) if it is stale

``make lint`` runs ``--check``.  A substitution that no longer matches
anything is an error too: the table stays as small as the source needs.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "client" / "shmbroker"
FILES = [("_async.py", "_sync.py")]

SUBS = [
    ("_transport_async", "_transport_sync"),
    ("AsyncTransport", "SyncTransport"),
    ("AsyncIterator", "Iterator"),
    ("Async([A-Z][A-Za-z0-9_]*)", r"\2"),
    ("async def", "def"),
    ("await ", ""),
]
COMPILED_SUBS = [(re.compile(r"(^|\b)" + regex + r"($|\b)"), repl) for regex, repl in SUBS]

HEADER = (
    "# Generated from {src} by scripts/unasync.py: do not edit.  Edit {src}, then run\n"
    "# `python scripts/unasync.py` (`make lint` checks that this file is current).\n"
)


def unasync_line(line: str, used: set[int]) -> str:
    for index, (regex, repl) in enumerate(COMPILED_SUBS):
        new = regex.sub(repl, line)
        if new != line:
            used.add(index)
            line = new
    return line


def unasync(source: str, src_name: str, used: set[int]) -> str:
    lines = source.splitlines(keepends=True)
    return HEADER.format(src=src_name) + "".join(unasync_line(line, used) for line in lines)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    used: set[int] = set()
    stale = []
    for src_name, out_name in FILES:
        src, out = PACKAGE / src_name, PACKAGE / out_name
        want = unasync(src.read_text(), src_name, used)
        have = out.read_text() if out.exists() else ""
        if want == have:
            continue
        if check:
            stale.append(out)
            sys.stdout.writelines(
                difflib.unified_diff(
                    have.splitlines(keepends=True),
                    want.splitlines(keepends=True),
                    str(out),
                    f"{out} (generated from {src_name})",
                )
            )
        else:
            out.write_text(want)
            print(f"{src} -> {out}")
    unused = [SUBS[i] for i in range(len(SUBS)) if i not in used]
    if unused:
        print(f"unasync: substitutions that matched nothing: {unused}", file=sys.stderr)
        return 1
    if stale:
        names = ", ".join(str(p) for p in stale)
        print(f"unasync: {names} stale: run `python scripts/unasync.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
