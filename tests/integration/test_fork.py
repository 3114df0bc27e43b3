"""A forked child never acts on its parent's connection or leases.

Each scenario runs in a real client process that forks a real child; the
daemon is asked afterwards what it saw.
"""

from __future__ import annotations

import json

from tests.support.helpers import DaemonProc, run_client


def test_child_close_of_an_inherited_segment_releases_nothing(daemon: DaemonProc) -> None:
    out = run_client(
        """
        b = Broker(SOCK)
        s = b.create("fork/y", 4096)
        s.buf[:6] = b"parent"
        if os.fork() == 0:
            ok = bytes(s.buf[:6]) == b"parent"  # still mapped in the child
            s.close()  # the parent's lease: not the child's to release
            os._exit(0 if ok else 3)
        _, status = os.wait()
        print(json.dumps({"child": os.waitstatus_to_exitcode(status),
                          "leases": b.stat("fork/y").leases}))
        s.close()
        b.close()
        """,
        daemon.socket,
    )
    assert json.loads(out.stdout) == {"child": 0, "leases": 1}


def test_child_calls_go_on_a_connection_of_its_own(daemon: DaemonProc) -> None:
    out = run_client(
        """
        b = Broker(SOCK)
        s = b.create("fork/own", 4096)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            mine = b.open("fork/own")  # a lease on the child's connection
            rows = {c.pid: c.leases for c in b.clients()}
            os.write(w, json.dumps({"rows": rows, "same": mine.id == s.id}).encode())
            os._exit(0)  # no close: the child's connection ends, and its lease
        os.close(w)
        seen = json.loads(os.read(r, 65536))
        os.waitpid(pid, 0)
        time.sleep(0.2)  # the daemon sees the child's connection end
        seen["after"] = b.stat("fork/own").leases
        seen["parent_pid"], seen["child_pid"] = os.getpid(), pid
        print(json.dumps(seen))
        s.close()
        b.close()
        """,
        daemon.socket,
    )
    seen = json.loads(out.stdout)
    rows = {int(k): v for k, v in seen["rows"].items()}
    assert seen["same"] is True
    assert rows[seen["parent_pid"]] == 1  # the parent's connection: its create only
    assert rows[seen["child_pid"]] == 1  # the child's own connection: its open
    assert seen["after"] == 1  # the child's lease ended with its connection


def test_async_child_close_of_an_inherited_segment_releases_nothing(daemon: DaemonProc) -> None:
    out = run_client(
        """
        import asyncio

        async def main():
            async with AsyncBroker.connect(SOCK) as b:
                s = await b.create("fork/a", 4096)
                pid = os.fork()
                if pid == 0:
                    s.close()
                    os._exit(0)
                os.waitpid(pid, 0)
                leases = (await b.stat("fork/a")).leases
                s.close()
                return leases

        print(asyncio.run(main()))
        """,
        daemon.socket,
    )
    assert out.stdout.strip() == "1"
