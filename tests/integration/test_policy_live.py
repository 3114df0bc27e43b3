"""The worked example of docs/security.md, against a real daemon and real
client processes running as the uids and groups it names.

- uid 1001 (the ``camera`` role) may create, open (ro and rw), seal and
  delete ``camera/*``, within a quota of 2 segments and 1 MiB;
- members of group 3000 (``video``) may only open ``camera/*`` read-only;
- anyone else may do nothing under ``camera/*``;
- elsewhere the defaults apply (anything, and the mode decides).

The camera's segments get mode ``0o666``, so that the mode grants everyone
everything and every refusal seen here is the policy's (its message says so).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from shmbroker import Broker, BrokerError
from tests.support.helpers import DaemonProc, spawn_client, wait_line

CAMERA, VIEWER, STRANGER = 1001, 1002, 1003
VIDEO = 3000
MiB = 1 << 20

POLICY = f"""
[[policy]]
names = ["camera/*"]
users = [{CAMERA}]
allow = ["create", "open_rw", "open_ro", "seal", "delete"]

[[policy]]
names = ["camera/*"]
groups = [{VIDEO}]
allow = ["open_ro"]

[[policy]]
names = ["camera/*"]
allow = []

[[quota]]
users = [{CAMERA}]
bytes = {MiB}
segments = 2
"""

# After the reload: video loses its read access, everyone else gains it
# (first match wins: video members still hit their own rule first).
POLICY_RELOADED = POLICY.replace(
    'groups = [3000]\nallow = ["open_ro"]', "groups = [3000]\nallow = []"
).replace('names = ["camera/*"]\nallow = []', 'names = ["camera/*"]\nallow = ["open_ro"]')


class PolicyDaemon(DaemonProc):
    """A DaemonProc whose config ends with ``tables`` (``[[policy]]``, ``[[quota]]``),
    which the flat writer cannot express."""

    def __init__(self, tables: str, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.tables = tables

    def write_config(self, **changes: Any) -> None:
        super().write_config(**changes)
        with open(self.config_path, "a") as f:
            f.write(self.tables)


# A client process that runs one request per stdin line and prints the outcome
# as JSON; the segments it creates stay mapped (their leases held) until it
# releases them or exits.
AGENT = """
from shmbroker.errors import errno_name
held = {}
b = Broker(SOCK)
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, args = cmd.pop("op"), cmd
    try:
        if op == "create":
            data = args.pop("data", "").encode()
            seg = b.create(**args)
            seg.buf[: len(data)] = data
            held[args["name"]] = seg
            info = b.stat(args["name"])
            res = {"owner_uid": info.owner_uid, "owner_gid": info.owner_gid, "mode": info.mode}
        elif op == "open":
            with b.open(args["name"], args.get("access", "ro")) as seg:
                res = {"readonly": seg.readonly, "data": bytes(seg.buf[:5]).decode()}
        elif op == "release":
            held.pop(args["name"]).close()
            res = {}
        elif op == "seal":
            res = {"sealed": b.seal(args["name"]).sealed}
        elif op == "delete":
            b.delete(args["name"])
            res = {}
        else:
            raise SystemExit(f"unknown op {op}")
        res["ok"] = True
    except OSError as e:
        res = {
            "ok": False,
            "code": errno_name(e.errno),
            "message": e.strerror,
            "permission_error": isinstance(e, PermissionError),
        }
    print(json.dumps(res), flush=True)
"""


class Agent:
    """A client process as ``uid`` that does what it is told, one request at a time."""

    def __init__(self, d: DaemonProc, uid: int, gid: int, groups: tuple[int, ...] = ()) -> None:
        self.uid = uid
        self.proc = spawn_client(
            AGENT, d.socket, uid=uid, gid=gid, groups=groups, stdin=subprocess.PIPE
        )
        wait_line(self.proc)

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(wait_line(self.proc, "{"))
        return reply

    def close(self) -> int:
        """End of input: the agent exits, releasing what it holds; its exit status."""
        try:
            self.proc.communicate(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode


class Denials:
    """What the test expects in the daemon's 'denied' log lines, one per refusal."""

    def __init__(self) -> None:
        self.expected: Counter[tuple[str, str, int]] = Counter()

    def check(self, reply: dict[str, Any], code: str, op: str, name: str, uid: int) -> None:
        """``reply`` is a refusal with ``code``; the daemon owes a 'denied' line for it."""
        assert reply["ok"] is False, reply
        assert reply["code"] == code, reply
        if code == "EACCES":
            assert reply["permission_error"], reply
            assert "policy denies" in reply["message"], reply
        else:
            assert "quota" in reply["message"], reply
        self.expect(op, name, uid)

    def expect(self, op: str, name: str, uid: int) -> None:
        self.expected[(op, name, uid)] += 1

    def assert_logged(self, log: str) -> None:
        lines = [line for line in log.splitlines() if " denied " in line]
        seen: Counter[tuple[str, str, int]] = Counter()
        for line in lines:
            m = re.search(r"denied (\w+) (\S*) ?to pid=\d+ uid=(\d+): ", line)
            assert m, line
            seen[(m[1], m[2], int(m[3]))] += 1
        assert seen == self.expected


@pytest.fixture
def camera_daemon() -> Iterator[PolicyDaemon]:
    d = PolicyDaemon(POLICY)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def agents(camera_daemon: PolicyDaemon) -> Iterator[dict[str, Agent]]:
    started: dict[str, Agent] = {}
    try:
        started["camera"] = Agent(camera_daemon, CAMERA, CAMERA)
        started["viewer"] = Agent(camera_daemon, VIEWER, VIEWER, (VIDEO,))
        started["stranger"] = Agent(camera_daemon, STRANGER, STRANGER)
        yield started
    finally:
        statuses = [agent.close() for agent in started.values()]
    assert statuses == [0] * len(started)


def test_camera_viewer_stranger_and_operator(
    camera_daemon: PolicyDaemon, agents: dict[str, Agent]
) -> None:
    d, denied = camera_daemon, Denials()
    camera, viewer, stranger = agents["camera"], agents["viewer"], agents["stranger"]

    # the camera: creates within its quota (bytes, then segments)
    r = camera("create", name="camera/huge", size=MiB + 1, mode=0o666)
    denied.check(r, "EDQUOT", "create", "camera/huge", CAMERA)
    r = camera("create", name="camera/front", size=4096, mode=0o666, data="frame")
    assert r == {"ok": True, "owner_uid": CAMERA, "owner_gid": CAMERA, "mode": 0o666}
    assert camera("create", name="camera/back", size=4096, mode=0o666)["ok"]
    r = camera("create", name="camera/third", size=4096, mode=0o666)
    denied.check(r, "EDQUOT", "create", "camera/third", CAMERA)
    # the quota is per uid, not per pattern
    r = camera("create", name="misc/cam", size=1, mode=0o666)
    denied.check(r, "EDQUOT", "create", "misc/cam", CAMERA)
    assert camera("open", name="camera/front", access="rw") == {
        "ok": True,
        "readonly": False,
        "data": "frame",
    }
    assert camera("seal", name="camera/back") == {"ok": True, "sealed": True}
    assert camera("delete", name="camera/back")["ok"]
    assert camera("release", name="camera/back")["ok"]
    # deleting gave the quota back (bytes are counted too: 4096 + 1 MiB - 4096 fits)
    r = camera("create", name="camera/big", size=MiB - 4096 + 1, mode=0o666)
    denied.check(r, "EDQUOT", "create", "camera/big", CAMERA)
    assert camera("create", name="camera/big", size=MiB - 4096, mode=0o666)["ok"]

    # the video viewer: read-only, nothing else, although the mode allows it all
    assert viewer("open", name="camera/front") == {"ok": True, "readonly": True, "data": "frame"}
    for op, args in [
        ("open", {"access": "rw"}),
        ("seal", {}),
        ("delete", {}),
    ]:
        denied.check(viewer(op, name="camera/front", **args), "EACCES", op, "camera/front", VIEWER)
    r = viewer("create", name="camera/viewer", size=4096)
    denied.check(r, "EACCES", "create", "camera/viewer", VIEWER)
    # elsewhere the defaults apply
    assert viewer("create", name="misc/viewer", size=4096, mode=0o644)["ok"]

    # a stranger: not even a read-only open, though mode 0o666 grants it
    denied.check(stranger("open", name="camera/front"), "EACCES", "open", "camera/front", STRANGER)
    r = stranger("create", name="camera/stranger", size=4096)
    denied.check(r, "EACCES", "create", "camera/stranger", STRANGER)
    assert stranger("open", name="misc/viewer") == {"ok": True, "readonly": True, "data": "\0" * 5}
    assert stranger("create", name="misc/stranger", size=4096)["ok"]

    # root is an operator: the policy does not apply to it (no quota configured)
    with Broker(d.socket) as op_b:
        with op_b.open("camera/front", "rw") as seg:
            assert bytes(seg.buf[:5]) == b"frame"
        with op_b.create("camera/root", 4096):
            op_b.delete("camera/root")
        op_b.delete("misc/viewer")

    denied.assert_logged(d.log())


def test_quotas_apply_to_operators_too() -> None:
    d = PolicyDaemon(POLICY, {"default_quota_segments": 1})
    denied = Denials()
    try:
        d.start()
        with Broker(d.socket) as b:
            # the policy does not stop root under camera/*, the default quota does
            with b.create("camera/op1", 4096, mode=0o666):
                with pytest.raises(BrokerError) as info:
                    b.create("camera/op2", 4096).close()
                assert info.value.code == "EDQUOT"
                assert "quota of 1 segments" in str(info.value)
                denied.expect("create", "camera/op2", 0)
                # the camera's own [[quota]] (2 segments) matches first, not the default
                camera = Agent(d, CAMERA, CAMERA)
                try:
                    assert camera("create", name="camera/a", size=4096)["ok"]
                    assert camera("create", name="camera/b", size=4096)["ok"]
                    r = camera("create", name="camera/c", size=4096)
                    denied.check(r, "EDQUOT", "create", "camera/c", CAMERA)
                finally:
                    assert camera.close() == 0
            # root's segment is gone with its lease: room for one again
            with b.create("camera/op2", 4096):
                pass
        denied.assert_logged(d.log())
    finally:
        d.cleanup()


def test_reload_with_a_changed_policy_applies_to_new_requests(
    camera_daemon: PolicyDaemon, agents: dict[str, Agent]
) -> None:
    d, denied = camera_daemon, Denials()
    camera, viewer, stranger = agents["camera"], agents["viewer"], agents["stranger"]
    assert camera("create", name="camera/front", size=4096, mode=0o666, data="frame")["ok"]
    assert viewer("open", name="camera/front")["ok"]
    denied.check(stranger("open", name="camera/front"), "EACCES", "open", "camera/front", STRANGER)

    with Broker(d.socket) as b:
        # a policy naming an unknown user is refused, and the old one stays
        d.tables = POLICY.replace(f"users = [{CAMERA}]", 'users = ["no-such-user-sbt"]', 1)
        d.write_config()
        with pytest.raises(BrokerError) as info:
            b.reload()
        assert info.value.code == "EINVAL"
        assert "policy.0.users" in str(info.value)
        assert viewer("open", name="camera/front")["ok"]
        assert camera("create", name="camera/back", size=4096)["ok"]

        d.tables = POLICY_RELOADED
        d.write_config()
        b.reload()

    # the same connections, new decisions
    denied.check(viewer("open", name="camera/front"), "EACCES", "open", "camera/front", VIEWER)
    assert stranger("open", name="camera/front") == {"ok": True, "readonly": True, "data": "frame"}
    r = stranger("open", name="camera/front", access="rw")
    denied.check(r, "EACCES", "open", "camera/front", STRANGER)
    # the camera's rule and quota are unchanged
    r = camera("create", name="camera/third", size=4096)
    denied.check(r, "EDQUOT", "create", "camera/third", CAMERA)
    assert camera("delete", name="camera/back")["ok"]

    denied.assert_logged(d.log())
