"""The daemon holds 100,000 shm segments without an fd per segment."""

from __future__ import annotations

import array
import json
import os
import resource
import socket
from typing import Any

from shmbroker import Broker
from tests.support.helpers import DaemonProc

COUNT = 100_000
BATCH = 200


def _pipeline(sock: socket.socket, requests: list[dict[str, object]]) -> list[dict[str, Any]]:
    """Send a batch, read its replies, close every fd they carry."""
    for req in requests:
        sock.send(json.dumps(req).encode())
    replies = []
    for _ in requests:
        data, anc, _flags, _ = sock.recvmsg(70000, socket.CMSG_SPACE(16))
        for _level, _kind, raw in anc:
            fds = array.array("i")
            fds.frombytes(raw[: len(raw) - len(raw) % 4])
            for fd in fds:
                os.close(fd)
        replies.append(json.loads(data))
    return replies


def test_hundred_thousand_segments_without_an_fd_each() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft < COUNT  # otherwise this would prove nothing
    d = DaemonProc({"max_segments": COUNT, "log_level": "warning"})
    try:
        d.start()
        with Broker(d.socket) as b:  # once answered, start-up (events socket...) is done
            b.hello()
            base = d.fd_count()  # with this one connection, as during the run
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(d.socket)
            rid = 0
            for start in range(0, COUNT, BATCH):
                batch = []
                for i in range(start, start + BATCH):
                    rid += 1
                    batch.append(
                        {
                            "id": rid,
                            "op": "create",
                            "name": f"scale/{i:06d}",
                            "size": 1,
                            "lifetime": "persistent",
                        }
                    )
                for reply in _pipeline(sock, batch):
                    assert reply["ok"], reply
            assert len(d.objects()) == COUNT
            assert d.fd_count() <= base + 2  # our one connection, nothing per segment
            rid += 1
            (over,) = _pipeline(
                sock, [{"id": rid, "op": "create", "name": "scale/one-more", "size": 1}]
            )
            assert over["error"]["code"] == "ENOSPC"  # max_segments
            rid += 1
            (page,) = _pipeline(
                sock, [{"id": rid, "op": "list", "prefix": "scale/", "after": "scale/099950"}]
            )
            assert [s["name"] for s in page["segments"]][:2] == ["scale/099951", "scale/099952"]
            assert page["next"] is None
        assert d.stop() == 0
        assert len(d.objects()) == COUNT  # persistent segments outlive the daemon
    finally:
        d.cleanup()  # unlinks what is left under this daemon's prefix
