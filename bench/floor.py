"""The floor server: the least a Python broker could do per request.

It listens on an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket like the daemon and,
in one thread on a bare ``selectors`` loop, answers every request datagram
without reading it: a canned grant reply (the size and shape of a real
``open`` reply) with one pre-made fd in ``SCM_RIGHTS``, or a canned empty
success when the datagram mentions ``"release"``.  No JSON decoding, no
registry, no ``open(2)`` per grant, no events.  The bench clients talk to it
with exactly the code they use against the daemon (they send real requests,
decode the replies, mmap and munmap the fd, send the release), so the gap
between a broker figure and its floor is what the daemon adds.

Run as ``python -m bench.floor --socket PATH [--size N]``: it prints
``READY`` once it accepts and exits on SIGTERM or SIGINT, removing its socket.  Its fd
is a memfd (the same shmem object as a ``/dev/shm`` file, but nothing to
clean up).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from types import FrameType

from tests.support.launcher import stop

from . import REPO

__all__ = ["FloorServer", "serve"]

_GRANT_TEMPLATE = {
    "id": 1,
    "ok": True,
    "segment": {
        "id": "0000000000000001-floor",
        "name": "bench/open",
        "size": 0,
        "lifetime": "refcount",
        "ttl": None,
        "sealed": False,
        "backing": "shm",
        "mode": 384,
        "created": 1700000000.0,
        "owner_uid": 0,
        "owner_gid": 0,
        "leases": 2,
    },
    "lease": "floor-lease-token-of-32-chars-xx",
}


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(path: str, size: int) -> None:
    fd = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    grant_body = dict(_GRANT_TEMPLATE)
    grant_body["segment"] = {**_GRANT_TEMPLATE["segment"], "size": size}  # type: ignore[dict-item]
    grant = json.dumps(grant_body, separators=(",", ":")).encode()
    done = b'{"id":1,"ok":true}'
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.bind(path)
    listener.listen(256)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print("READY", flush=True)
    try:
        while True:
            for key, _events in sel.select():
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            peer, _ = listener.accept()
                            peer.setblocking(False)
                            sel.register(peer, selectors.EVENT_READ, True)
                    continue
                try:
                    data = conn.recv(65537)
                    if not data:
                        raise ConnectionResetError
                    if b'"release"' in data:
                        conn.send(done)
                    else:
                        conn.sendmsg([grant], anc)
                except OSError:  # the peer went, or cannot take a reply: drop it
                    sel.unregister(conn)
                    conn.close()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


class FloorServer:
    """The floor server as a subprocess (the bench's side)."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", "--socket", path, "--size", str(size)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.stop()
            raise RuntimeError(f"floor server did not start (said {line!r})")

    def stop(self) -> None:
        stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--socket", required=True)
    p.add_argument("--size", type=int, default=4096)
    a = p.parse_args()
    serve(a.socket, a.size)


if __name__ == "__main__":
    main()
