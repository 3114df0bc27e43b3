"""Who may do what, across real uids: mode bits against SO_PEERCRED and
SO_PEERGROUPS, read-only fds the kernel enforces, memfd seals the kernel
enforces, and operator-only operations.

The daemon runs as root; clients run as other uids in separate processes
(the test socket is mode 0666 in a 0755 dir, so any uid can connect).
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import stat
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from shmbroker import Broker, SegmentPermissionError, wire
from tests.support.helpers import DaemonProc, eventually, wait_line

NOBODY = 65534
F_SEAL_FUTURE_WRITE = 0x10  # not exported by Python's fcntl
SEAL_GROW_SHRINK = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK

# Tries ``ro`` and ``rw`` open of each name in NAMES; prints {name: [ro, rw]}
# where each outcome is "ok" or the errno name, and checks that a refusal is
# a PermissionError (so callers can ``except PermissionError``).
TRY_OPENS = """
import errno
out = {}
with Broker(SOCK) as b:
    for name in NAMES:
        row = []
        for access in ("ro", "rw"):
            try:
                b.open(name, access).close()
                row.append("ok")
            except PermissionError as e:
                row.append(errno.errorcode[e.errno])
        out[name] = row
print(json.dumps(out))
"""

# The kernel's side of a read-only grant, probed from inside the client.
PROBE_FD = """
import errno, fcntl, mmap
def attempt(f):
    try:
        r = f()
    except OSError as e:
        return errno.errorcode[e.errno]
    if isinstance(r, int):
        os.close(r)
    elif r is not None:
        r.close()
    return "ok"
def probe(seg):
    fd = seg.fd
    st = os.fstat(fd)
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    res = {
        "data": bytes(seg.buf[:6]).decode(),
        "size": st.st_size,
        "link": os.readlink(f"/proc/self/fd/{fd}"),
        "inode_mode": st.st_mode & 0o7777,
        "inode_uid": st.st_uid,
        "accmode": fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE,
        "mmap_rw": attempt(lambda: mmap.mmap(fd, seg.size, flags=mmap.MAP_SHARED, prot=rw)),
        "reopen_rw": attempt(lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR)),
    }
    try:
        res["seals"] = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        res["seals"] = errno.errorcode[e.errno]
    # last: if it succeeded, touching the mapping would be SIGBUS
    res["ftruncate"] = attempt(lambda: os.ftruncate(fd, 0))
    return res
"""


# ``run_client(uid=...)`` execs the interpreter as that uid, which fails when
# the interpreter lives under a directory only root may search (a pyenv under
# /root).  So each client here starts as root, imports everything it needs,
# then drops to the wanted uid, gid and supplementary groups for good before
# it connects: the daemon sees exactly that identity (SO_PEERCRED and
# SO_PEERGROUPS are taken at connect) and the kernel checks every fd
# operation against it.
AS_UID = """
import ctypes, errno, fcntl, json, mmap, os, sys, time
from shmbroker import *
SOCK = sys.argv[1]
_uid, _gid, _groups = json.loads(sys.argv[2])
os.setgroups(_groups)
os.setresgid(_gid, _gid, _gid)
os.setresuid(_uid, _uid, _uid)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as a process exec'd as _uid
assert os.getresuid() == (_uid,) * 3 and os.getresgid() == (_gid,) * 3
assert sorted(os.getgroups()) == sorted(_groups)
"""


def _argv(code: str, sock: str, uid: int, gid: int, groups: tuple[int, ...]) -> list[str]:
    ident = json.dumps([uid, gid, list(groups)])
    return [sys.executable, "-u", "-c", AS_UID + textwrap.dedent(code), sock, ident]


def client_json(
    code: str, sock: str, *, uid: int, gid: int, groups: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Run ``code`` in a client process as ``uid:gid`` (+``groups``); its last line, as JSON."""
    proc = subprocess.run(
        _argv(code, sock, uid, gid, groups), capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, f"client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def spawn_as(code: str, sock: str, *, uid: int, gid: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _argv(code, sock, uid, gid, ()),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def errno_of(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(exc.value, OSError)
    return errno.errorcode[exc.value.errno or 0]


# -- mode bits against another uid ------------------------------------------------


def test_other_uid_gets_exactly_what_the_other_bits_grant(daemon: DaemonProc) -> None:
    with (
        Broker(daemon.socket) as b,
        b.create("acc/m644", 4096, mode=0o644) as m644,
        b.create("acc/m600", 4096, mode=0o600),
        b.create("acc/m666", 4096, mode=0o666) as m666,
    ):
        m644.buf[:6] = b"rootw1"
        code = f"NAMES = {['acc/m644', 'acc/m600', 'acc/m666']!r}\n" + TRY_OPENS
        got = client_json(code, daemon.socket, uid=NOBODY, gid=NOBODY)
        assert got == {
            "acc/m644": ["ok", "EACCES"],
            "acc/m600": ["EACCES", "EACCES"],
            "acc/m666": ["ok", "ok"],
        }
        # the grants are real: nobody reads what root wrote, root sees what nobody wrote
        out = client_json(
            """
            with Broker(SOCK) as b:
                with b.open("acc/m644") as seg:
                    seen = bytes(seg.buf[:6]).decode()
                with b.open("acc/m666", "rw") as seg:
                    seg.buf[:6] = b"nobody"
            print(json.dumps({"seen": seen}))
            """,
            daemon.socket,
            uid=NOBODY,
            gid=NOBODY,
        )
        assert out == {"seen": "rootw1"}
        assert bytes(m666.buf[:6]) == b"nobody"
        # refused opens left no lease behind
        assert b.stat("acc/m600").leases == 1
        assert b.stat("acc/m644").leases == 1


def test_group_bits_apply_by_primary_or_supplementary_gid(daemon: DaemonProc) -> None:
    modes = {"grp/m640": 0o640, "grp/m660": 0o660, "grp/m604": 0o604, "grp/m060": 0o060}
    names = list(modes)
    client_json(
        f"""
        with Broker(SOCK) as b:
            for name, mode in {modes!r}.items():
                b.create(name, 4096, lifetime="persistent", mode=mode).close()
        print("{{}}")
        """,
        daemon.socket,
        uid=1000,
        gid=1000,
    )
    try:
        with Broker(daemon.socket) as b:
            for name in names:
                info = b.stat(name)
                assert (info.owner_uid, info.owner_gid, info.mode) == (1000, 1000, modes[name])
        code = f"NAMES = {names!r}\n" + TRY_OPENS
        group_class = {
            "grp/m640": ["ok", "EACCES"],
            "grp/m660": ["ok", "ok"],
            "grp/m604": ["EACCES", "EACCES"],  # group bits win over a more generous other
            "grp/m060": ["ok", "ok"],
        }
        # primary gid is the owner's gid
        assert client_json(code, daemon.socket, uid=1001, gid=1000) == group_class
        # only a supplementary group is the owner's gid (the daemon reads SO_PEERGROUPS)
        sup = client_json(code, daemon.socket, uid=1001, gid=1001, groups=(1000,))
        assert sup == group_class
        # neither: the other bits
        assert client_json(code, daemon.socket, uid=1001, gid=1001) == {
            "grp/m640": ["EACCES", "EACCES"],
            "grp/m660": ["EACCES", "EACCES"],
            "grp/m604": ["ok", "EACCES"],
            "grp/m060": ["EACCES", "EACCES"],
        }
        # the owner: owner bits, even when the group bits would grant more
        assert client_json(code, daemon.socket, uid=1000, gid=1000) == {
            "grp/m640": ["ok", "ok"],
            "grp/m660": ["ok", "ok"],
            "grp/m604": ["ok", "ok"],
            "grp/m060": ["EACCES", "EACCES"],
        }
    finally:
        with Broker(daemon.socket) as b:
            for name in names:
                b.delete(name)
    eventually(lambda: daemon.objects() == [])  # the unlink may follow the reply


# -- the kernel enforces read-only grants ---------------------------------------


def test_ro_grant_is_an_O_RDONLY_fd_the_kernel_enforces(daemon: DaemonProc) -> None:
    with Broker(daemon.socket) as b, b.create("secret/name-xyz", 8192, mode=0o644) as seg:
        seg.buf[:6] = b"shared"
        objects = daemon.objects()
        assert len(objects) == 1
        obj = objects[0]
        st = os.stat(os.path.join("/dev/shm", obj))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0  # the daemon's
        # the file name is derived by the daemon, not from the client's string
        assert "name-xyz" not in obj
        assert "secret" not in obj
        got = client_json(
            PROBE_FD
            + """
with Broker(SOCK) as b, b.open("secret/name-xyz") as seg:
    print(json.dumps(probe(seg)))
""",
            daemon.socket,
            uid=NOBODY,
            gid=NOBODY,
        )
        assert got["accmode"] == os.O_RDONLY
        assert got["mmap_rw"] == "EACCES"
        assert got["ftruncate"] == "EINVAL"
        assert got["reopen_rw"] == "EACCES"
        assert got["inode_mode"] == 0o600
        assert got["inode_uid"] == 0
        assert got["link"] == os.path.join("/dev/shm", obj)
        assert got["data"] == "shared"
        assert got["size"] == 8192
        # nothing the client tried changed the segment
        assert os.fstat(seg.fd).st_size == 8192
        assert bytes(seg.buf[:6]) == b"shared"


def test_memfd_seals_are_applied_in_the_kernel(daemon: DaemonProc) -> None:
    probe_open = (
        PROBE_FD
        + """
with Broker(SOCK) as b, b.open("mfd/seg") as seg:
    print(json.dumps(probe(seg)))
"""
    )
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    with Broker(daemon.socket) as b, b.create("mfd/seg", 8192, mode=0o666, backing="memfd") as seg:
        assert seg.info.backing == "memfd"
        assert daemon.objects() == []  # nothing under /dev/shm for a memfd
        seg.buf[:6] = b"memfd!"
        st = os.fstat(seg.fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
        seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
        assert seals & SEAL_GROW_SHRINK == SEAL_GROW_SHRINK  # from creation
        assert not seals & (F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_WRITE)
        # the creator's read-write fd cannot shrink (SIGBUS for readers) nor grow it
        with pytest.raises(PermissionError) as exc:
            os.ftruncate(seg.fd, 0)
        assert errno_of(exc) == "EPERM"
        with pytest.raises(PermissionError) as exc:
            os.ftruncate(seg.fd, 16384)
        assert errno_of(exc) == "EPERM"

        before = client_json(probe_open, daemon.socket, uid=NOBODY, gid=NOBODY)
        assert before["accmode"] == os.O_RDONLY
        assert before["mmap_rw"] == "EACCES"
        assert before["ftruncate"] == "EINVAL"
        assert before["reopen_rw"] == "EACCES"
        assert (before["inode_mode"], before["inode_uid"]) == (0o600, 0)
        assert before["data"] == "memfd!"
        assert before["seals"] & SEAL_GROW_SHRINK == SEAL_GROW_SHRINK
        assert not before["seals"] & F_SEAL_FUTURE_WRITE
        # before the seal, a rw open is granted by mode 0666
        got = client_json(
            'NAMES = ["mfd/seg"]\n' + TRY_OPENS, daemon.socket, uid=NOBODY, gid=NOBODY
        )
        assert got == {"mfd/seg": ["ok", "ok"]}

        assert b.seal("mfd/seg").sealed is True
        # (that the seal is in place as soon as the reply arrives is the next test's)
        eventually(lambda: fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS) & F_SEAL_FUTURE_WRITE)
        seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
        assert seals & SEAL_GROW_SHRINK == SEAL_GROW_SHRINK
        # the kernel now refuses new writable mappings even on the creator's rw fd
        with pytest.raises(PermissionError) as exc:
            mmap.mmap(seg.fd, 8192, flags=mmap.MAP_SHARED, prot=rw)
        assert errno_of(exc) == "EPERM"
        with pytest.raises(PermissionError) as exc:
            os.pwrite(seg.fd, b"x", 0)
        assert errno_of(exc) == "EPERM"

        # the daemon refuses rw opens: EPERM for a mode that grants w, even to root
        got = client_json(
            'NAMES = ["mfd/seg"]\n' + TRY_OPENS, daemon.socket, uid=NOBODY, gid=NOBODY
        )
        assert got == {"mfd/seg": ["ok", "EPERM"]}
        with pytest.raises(SegmentPermissionError) as exc:
            b.open("mfd/seg", "rw")
        assert errno_of(exc) == "EPERM"

        after = client_json(probe_open, daemon.socket, uid=NOBODY, gid=NOBODY)
        assert after["accmode"] == os.O_RDONLY
        assert after["mmap_rw"] == "EACCES"
        assert after["reopen_rw"] == "EACCES"
        assert after["seals"] & (F_SEAL_FUTURE_WRITE | SEAL_GROW_SHRINK) == (
            F_SEAL_FUTURE_WRITE | SEAL_GROW_SHRINK
        )
        assert after["data"] == "memfd!"


def test_memfd_seal_is_in_the_kernel_when_the_reply_arrives(daemon: DaemonProc) -> None:
    """A client told "sealed" may rely on it at once: no writable mapping after.

    The daemon and this test share one CPU, so the client woken by the reply
    runs before the daemon's next step: a seal applied after the reply is
    sent shows nearly every time instead of by chance.
    """
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    late = []
    saved = os.sched_getaffinity(0)
    cpu = {min(saved)}
    os.sched_setaffinity(daemon.pid, cpu)
    os.sched_setaffinity(0, cpu)
    try:
        with Broker(daemon.socket) as b:
            for i in range(50):
                with b.create(f"mfd/now{i}", 4096, mode=0o600, backing="memfd") as seg:
                    b.seal(seg.name)
                    if not fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS) & F_SEAL_FUTURE_WRITE:
                        late.append(seg.name)
                        eventually(
                            lambda s=seg: fcntl.fcntl(s.fd, fcntl.F_GET_SEALS) & F_SEAL_FUTURE_WRITE
                        )
                    with pytest.raises(PermissionError):
                        mmap.mmap(seg.fd, 4096, flags=mmap.MAP_SHARED, prot=rw)
    finally:
        os.sched_setaffinity(0, saved)
    assert late == [], f"seal replied before F_SEAL_FUTURE_WRITE was applied: {late}"


# -- operators and list ------------------------------------------------------------


def test_operator_only_ops_refused_to_others_allowed_to_root(daemon: DaemonProc) -> None:
    operator_ops = [spec.op for spec in wire.OPS if spec.operator]
    assert {"stats", "clients", "reload", "drop"} <= set(operator_ops)
    got = client_json(
        """
        import errno
        from shmbroker import wire
        out = {}
        with Broker(SOCK) as b:
            for spec in wire.OPS:
                if not spec.operator:
                    continue
                try:
                    # drop: of a client id, refused before it is looked up
                    r = getattr(b, spec.methods[0])(*([1] if spec.op == "drop" else []))
                    if spec.op == "clients":
                        list(r)
                    out[spec.op] = "ok"
                except PermissionError as e:
                    out[spec.op] = errno.errorcode[e.errno]
            out["hello"] = b.hello().versions  # the connection still serves
        print(json.dumps(out))
        """,
        daemon.socket,
        uid=NOBODY,
        gid=NOBODY,
    )
    assert got == {**dict.fromkeys(operator_ops, "EACCES"), "hello": [1]}

    # a client of another uid, still connected, as root sees it (SO_PEERCRED)
    other = spawn_as(
        """
        b = Broker(SOCK)
        b.hello()
        print("READY")
        sys.stdin.readline()
        """,
        daemon.socket,
        uid=NOBODY,
        gid=NOBODY,
    )
    try:
        wait_line(other)
        with Broker(daemon.socket) as b:
            eventually(lambda: b.stats().clients == 2)  # this and the other
            peers = {(c.pid, c.uid, c.gid) for c in b.clients()}
            assert (other.pid, NOBODY, NOBODY) in peers
            assert (os.getpid(), 0, 0) in peers
            b.reload()
    finally:
        other.communicate("\n", timeout=10)
    assert other.returncode == 0


def test_list_shows_others_only_what_they_may_read(daemon: DaemonProc) -> None:
    modes = {
        "vis/a600": 0o600,
        "vis/b604": 0o604,
        "vis/c640": 0o640,
        "vis/d644": 0o644,
        "vis/e660": 0o660,
        "vis/f666": 0o666,
        "vis/g602": 0o602,  # other may write but not read: not listed
    }
    with Broker(daemon.socket) as b:
        segs = [b.create(name, 4096, mode=mode) for name, mode in modes.items()]
        try:
            assert [s.name for s in b.list("vis/")] == list(modes)  # root sees all
            got = client_json(
                """
                import errno
                with Broker(SOCK) as b:
                    names = [s.name for s in b.list()]
                    try:
                        b.stat("vis/a600")
                        hidden = "ok"
                    except PermissionError as e:
                        hidden = errno.errorcode[e.errno]
                    shown = b.stat("vis/d644").mode
                print(json.dumps({"names": names, "stat600": hidden, "stat644": shown}))
                """,
                daemon.socket,
                uid=NOBODY,
                gid=NOBODY,
            )
            assert got == {
                "names": ["vis/b604", "vis/d644", "vis/f666"],
                "stat600": "EACCES",
                "stat644": 0o644,
            }
        finally:
            for s in segs:
                s.close()
