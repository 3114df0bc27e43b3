"""``shmbroker.shared_memory`` with real separate processes: the resource
tracker's cases (creator exits, an unrelated process attaches, nobody's exit
unlinks anything, nothing is printed), ShareableList bytes shared with
CPython's own implementation both ways, and the keyword-only extras.

Child processes find the daemon through ``$SHMBROKER_SOCKET``, as a
migrated program would; each prints nothing on stderr, which is checked.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from shmbroker import Broker, shared_memory
from shmbroker._shm_names import broker_name, default_broker
from shmbroker.shared_memory import ShareableList, SharedMemory, SharedMemoryManager
from tests.support.helpers import eventually, run_client, spawn_client, wait_line
from tests.support.shm_daemon import shm_daemon  # noqa: F401 (used through pytestmark)

pytestmark = pytest.mark.usefixtures("shm_daemon")

NOBODY = 65534


def child(code: str, **kw: Any) -> str:
    """Run ``code`` in a new interpreter; return its stdout, fail on any stderr."""
    proc = run_client("from shmbroker import shared_memory\n" + code, "", **kw)
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def gone(name: str) -> bool:
    """Is ``name`` unlinked?  Asked without a lease (which would restart a ttl)."""
    try:
        default_broker().stat(broker_name(name))
    except FileNotFoundError:
        return True
    return False


# -- the resource tracker's cases --------------------------------------------

CREATOR = """
import os, signal, sys
from shmbroker import shared_memory
shm = shared_memory.SharedMemory(create=True, size=4096, {kw})
shm.buf[:5] = b"hello"
print(shm.name, flush=True)
how = {how!r}
if how == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "exception":
    raise SystemExit(3)
if how == "close":
    shm.close()
"""


@pytest.mark.parametrize("how", ["return", "close", "exception", "sigkill"])
@pytest.mark.parametrize("track", [True, False])
def test_segment_outlives_its_creator_and_attachers(how: str, track: bool) -> None:
    """gh-82300, gh-84140: the creator's exit unlinks nothing; gh-104291: nor an
    attacher's; gh-116849: no "leaked" warning at any exit.  With ``track=True``
    and ``track=False`` alike (CPython 3.13's test_shared_memory_tracking and
    _untracking, inverted: both keep the segment)."""
    proc = run_client(CREATOR.format(kw=f"track={track}", how=how), "", check=False)
    assert proc.returncode == {"sigkill": -signal.SIGKILL, "exception": 3}.get(how, 0)
    assert proc.stderr == ""
    name = proc.stdout.strip()
    try:
        for _ in range(2):  # two unrelated attachers in turn, each exiting
            out = child(
                f"shm = shared_memory.SharedMemory({name!r}, track={track})\n"
                "print(bytes(shm.buf[:5]).decode(), shm.size)\n"
            )
            assert out.split() == ["hello", "4096"]
    finally:
        shm = SharedMemory(name)
        shm.close()
        shm.unlink()
    assert gone(name)


def test_unrelated_process_unlinks_while_the_creator_maps_it() -> None:
    """``unlink()`` from any process the mode allows; the creator's mapping stays valid."""
    shm = SharedMemory(create=True, size=100)
    assert shm.buf is not None
    shm.buf[:3] = b"abc"
    child(f"shared_memory.SharedMemory({shm.name!r}).unlink()\n")
    assert gone(shm.name)
    shm.buf[3:6] = b"def"  # still mapped, still ours
    assert bytes(shm.buf[:6]) == b"abcdef"
    with pytest.raises(FileNotFoundError):
        shm.unlink()
    shm.close()


def test_no_tracker_is_involved() -> None:
    out = child(
        "import sys\n"
        "shm = shared_memory.SharedMemory(create=True, size=10)\n"
        "sl = shared_memory.ShareableList([1, 'two'])\n"
        "with shared_memory.SharedMemoryManager() as smm:\n"
        "    smm.SharedMemory(10)\n"
        "shm.unlink(); sl.shm.unlink()\n"
        "print('multiprocessing.resource_tracker' in sys.modules)\n"
    )
    assert out.strip() == "False"


def test_lifetime_owner_cleans_up_when_the_creator_dies() -> None:
    """The opt-in cleanup: ``lifetime="owner"`` ends with the creator's lease."""
    proc = spawn_client(
        "from shmbroker import shared_memory\n"
        "shm = shared_memory.SharedMemory(create=True, size=10, lifetime='owner')\n"
        "print('READY', shm.name, flush=True)\n"
        "import time; time.sleep(60)\n",
        "",
    )
    try:
        name = wait_line(proc).split()[1]
        attached = SharedMemory(name)
        assert attached.buf is not None
        attached.buf[0] = 7
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        assert proc.stdout is not None
        assert proc.stderr.read() == ""
        proc.stderr.close()
        proc.stdout.close()
    eventually(lambda: gone(name))
    assert attached.buf[0] == 7  # a mapping outlives the unlink
    attached.close()


def test_manager_segments_go_at_exit_and_with_a_dead_process() -> None:
    with SharedMemoryManager() as smm:
        shm = smm.SharedMemory(64)
        sl = smm.ShareableList([1, 2])
        names = [shm.name, sl.shm.name]
        assert child(f"print(shared_memory.ShareableList(name={names[1]!r})[1])").strip() == "2"
    assert all(gone(n) for n in names)
    proc = run_client(
        "from shmbroker import shared_memory\n"
        "import os, signal\n"
        "smm = shared_memory.SharedMemoryManager(); smm.start()\n"
        "print(smm.SharedMemory(64).name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n",
        "",
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    eventually(lambda: gone(proc.stdout.strip()))


# -- ShareableList: CPython's bytes -------------------------------------------

VALUES = [
    "howdy",
    b"HoWdY",
    -273.154,
    100,
    None,
    True,
    False,
    2**63 - 1,
    "encodés",
    "",
    b"",
    "a longer string than eight bytes",
    b"in\x00ner",
    0.0,
]
# CPython's ShareableList, running over memory that shmbroker.shared_memory maps
CPYTHON_OVER_BROKER = """
import multiprocessing.shared_memory as std
from shmbroker import shared_memory
std.SharedMemory = shared_memory.SharedMemory
"""


def test_cpython_writes_ours_reads() -> None:
    out = child(
        CPYTHON_OVER_BROKER + f"sl = std.ShareableList({VALUES!r})\n"
        "sl[3] = 'str in an int slot'[:8]\n"
        "print(sl.shm.name)\n"
    )
    sl = ShareableList(name=out.strip())
    try:
        want = list(VALUES)
        want[3] = "str in a"
        assert list(sl) == want
        assert sl.format == "8s8sd8sxxxxxx?xxxxxxxx?xxxxxxx?q8s8s8s40s8sd"
        assert len(sl) == len(VALUES)
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_ours_writes_cpython_reads() -> None:
    sl = ShareableList(VALUES)
    sl[0] = "HOWDY!"
    sl[4] = 12.5  # a type change in place
    try:
        out = child(
            CPYTHON_OVER_BROKER + "import json\n"
            f"sl = std.ShareableList(name={sl.shm.name!r})\n"
            "print(json.dumps([repr(v) for v in sl]), sl.format)\n"
            "sl[1] = b'cpython'\n"
        )
        reprs, fmt = out.rsplit(" ", 1)
        want = list(VALUES)
        want[0], want[4] = "HOWDY!", 12.5
        assert json.loads(reprs) == [repr(v) for v in want]
        assert fmt.strip() == sl.format
        assert sl[1] == b"cpython"
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_same_bytes_as_cpython_in_dev_shm() -> None:
    """Byte equality with CPython's own, unpatched, in its own /dev/shm segment."""
    ours = ShareableList(VALUES)
    try:
        out = child(
            "import multiprocessing.shared_memory as std\n"
            f"sl = std.ShareableList({VALUES!r})\n"
            "print(bytes(sl.shm.buf[:sl.shm.size]).hex())\n"
            "sl.shm.close(); sl.shm.unlink()\n"
        )
        assert ours.shm.buf is not None
        assert bytes(ours.shm.buf).hex() == out.strip()
    finally:
        ours.shm.close()
        ours.shm.unlink()


ERRORS = """
import multiprocessing.shared_memory as std
from shmbroker import shared_memory as ours
cases = [
    lambda sl: sl[3],
    lambda sl: sl.__setitem__(3, 1),
    lambda sl: sl.__setitem__(0, "x" * 9),
    lambda sl: sl.__setitem__(0, b"x" * 9),
    lambda sl: sl.__setitem__(1, [1]),
    lambda sl: sl[0:1],
    lambda sl: sl.index("zz"),
    lambda sl: type(sl)([object()]),
]
lists = [mod.ShareableList(["ab", 1, None]) for mod in (std, ours)]
for case in cases:
    got = []
    for sl in lists:
        try:
            case(sl)
            got.append(None)
        except Exception as exc:
            got.append((type(exc).__name__, str(exc)))
    print(got[0] == got[1] and got[0] is not None, got)
reprs = {repr(sl).replace(sl.shm.name, "N") for sl in lists}
print(len(reprs) == 1, reprs)
print(lists[0].count(None) == lists[1].count(None) == 1)
for sl in lists:
    sl.shm.close()
    sl.shm.unlink()
"""


def test_shareable_list_errors_match_cpython() -> None:
    lines = child(ERRORS).splitlines()
    assert len(lines) == 10
    for line in lines:
        assert line.startswith("True"), line


def test_shareable_list_refuses_negative_positions_past_the_start() -> None:
    """The one error that differs: CPython reads and writes out of bounds here
    (``sl[-4] = 1`` on three items overwrites the formats), ours refuses."""
    sl = ShareableList(["ab", 1, None])
    try:
        with pytest.raises(IndexError, match="index out of range"):
            sl[-4]
        with pytest.raises(IndexError, match="assignment index out of range"):
            sl[-4] = 1
        assert list(sl) == ["ab", 1, None]
        assert sl[-3] == "ab"
    finally:
        sl.shm.close()
        sl.shm.unlink()


# -- SharedMemory: CPython's behaviour ----------------------------------------


def test_names() -> None:
    shm = SharedMemory("/slashed", create=True, size=10)
    try:
        assert shm.name == "/slashed"  # as CPython reports it
        assert shm._name == "//slashed"
        plain = SharedMemory("slashed")  # glibc drops leading "/": the same object
        assert plain.name == "slashed"
        assert plain.buf is not None
        assert shm.buf is not None
        plain.buf[0] = 9
        assert shm.buf[0] == 9
        plain.close()
        with pytest.raises(FileExistsError) as info:
            SharedMemory("slashed", create=True, size=10)
        assert info.value.filename == "/slashed"
    finally:
        shm.close()
        shm.unlink()
    generated = SharedMemory(create=True, size=1)
    assert generated.name.startswith("psm_")
    assert len(generated.name) == 12
    generated.close()
    generated.unlink()


def test_names_outside_the_broker_alphabet() -> None:
    odd = SharedMemory("a:b été", create=True, size=10)
    try:
        assert odd.name == "a:b été"
        assert child("print(shared_memory.SharedMemory('a:b été').size)").strip() == "10"
        with Broker() as broker:
            assert [s.name for s in broker.list(".psm/")] == [".psm/" + "a:b été".encode().hex()]
    finally:
        odd.close()
        odd.unlink()
    with pytest.raises(ValueError, match="embedded null"):
        SharedMemory("a\0b", create=True, size=1)
    for bad in ("", "a/", "a:b/c"):
        with pytest.raises(OSError, match="Invalid argument") as info:
            SharedMemory(bad, create=True, size=1)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError, match="too long") as info:
        SharedMemory("x" * 256, create=True, size=1)
    assert info.value.errno == errno.ENAMETOOLONG


def test_broker_names_attach() -> None:
    """A hierarchical name made by a native broker client attaches as is."""
    with Broker() as broker, broker.create("camera/front", 16, lifetime="persistent") as seg:
        seg.buf[:2] = b"ok"
        shm = SharedMemory("camera/front")
        assert shm.buf is not None
        assert bytes(shm.buf[:2]) == b"ok"
        shm.close()
        shm.unlink()


def test_after_close() -> None:
    shm = SharedMemory(create=True, size=10)
    shm.close()
    shm.close()
    assert shm.buf is None
    assert shm._fd == -1
    assert repr(shm) == f"SharedMemory({shm.name!r}, size=10)"
    with pytest.raises(ValueError, match="closed"):
        shm.ndarray()
    shm.unlink()


def test_pickle_attaches_in_another_process() -> None:
    shm = SharedMemory(create=True, size=10)
    try:
        data = pickle.dumps(shm).hex()
        child(f"import pickle\nshm = pickle.loads(bytes.fromhex({data!r}))\nshm.buf[:2] = b'pk'\n")
        assert shm.buf is not None
        assert bytes(shm.buf[:2]) == b"pk"
    finally:
        shm.close()
        shm.unlink()


def test_fork_child_uses_its_own_connection() -> None:
    shm = SharedMemory(create=True, size=10)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                inherited = shm  # the parent's object and lease
                own = SharedMemory(shm.name)  # over a new connection, this child's
                assert own.buf is not None
                own.buf[0] = 42
                own.close()
                assert inherited.buf is not None
                inherited.buf[1] = 43
                inherited.close()  # leaves the parent's lease alone
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert shm.buf is not None
        assert bytes(shm.buf[:2]) == bytes([42, 43])
        again = SharedMemory(shm.name)  # the parent's connection still answers
        again.close()
    finally:
        shm.close()
        shm.unlink()


def test_collected_during_a_call_of_its_connection() -> None:
    """A finalizer run inside the connection's lock must not wait for it."""
    shm = SharedMemory(create=True, size=8)
    name = shm.name
    cycle: list[Any] = [shm]
    cycle.append(cycle)
    del shm
    with default_broker()._lock:  # as if a call were in flight in this thread
        del cycle
        gc.collect()
    again = SharedMemory(name)
    again.unlink()
    again.close()


# -- the extras ---------------------------------------------------------------


def test_readonly_is_enforced_by_the_kernel() -> None:
    shm = SharedMemory(create=True, size=4096)
    try:
        proc = run_client(
            "import ctypes\nfrom shmbroker import shared_memory\n"
            f"ro = shared_memory.SharedMemory({shm.name!r}, readonly=True)\n"
            "assert ro.buf.readonly and ro.readonly\n"
            "try:\n    ro.buf[0] = 1\nexcept TypeError:\n    print('refused', flush=True)\n"
            "view = ro.ndarray()\n"
            "assert not view.flags.writeable\n"
            "ctypes.memset(view.ctypes.data, 1, 1)\n"  # past Python's checks: the MMU
            "print('wrote', flush=True)\n",
            "",
            check=False,
        )
        assert proc.stdout.split() == ["refused"]
        assert proc.returncode == -signal.SIGSEGV
        assert shm.buf is not None
        assert shm.buf[0] == 0
    finally:
        shm.close()
        shm.unlink()


def test_wait_for_creation() -> None:
    made: list[SharedMemory] = []
    with Broker() as other:  # the default connection is busy waiting
        timer = threading.Timer(
            0.3, lambda: made.append(SharedMemory("late", create=True, size=8, broker=other))
        )
        timer.start()
        try:
            shm = SharedMemory("late", wait=10)
            assert shm.size == 8
            shm.close()
        finally:
            timer.join()
            for m in made:
                m.close()
                m.unlink()
    with pytest.raises(TimeoutError):
        SharedMemory("never", wait=0)


def test_mode_lets_another_user_read() -> None:
    private = SharedMemory(create=True, size=8)
    shared = SharedMemory(create=True, size=8, mode=0o644)
    assert shared.buf is not None
    shared.buf[0] = 5
    code = """
from shmbroker import shared_memory
out = []
for name, kw in ({private!r}, {{}}), ({shared!r}, {{}}), ({shared!r}, {{'readonly': True}}):
    try:
        shm = shared_memory.SharedMemory(name, **kw)
        out.append(shm.buf[0])
        shm.close()
    except PermissionError:
        out.append('EACCES')
try:
    shared_memory.SharedMemory({shared!r}).unlink()
except PermissionError:
    out.append('EACCES')
print(out)
"""
    try:
        out = run_client(
            code.format(private=private.name, shared=shared.name), "", uid=NOBODY, gid=NOBODY
        )
        assert out.stdout.strip() == "['EACCES', 'EACCES', 5, 'EACCES']"
    finally:
        for m in (private, shared):
            m.close()
            m.unlink()


def test_numpy_view() -> None:
    np = pytest.importorskip("numpy")
    shm = SharedMemory(create=True, size=8 * 10)
    try:
        arr = shm.ndarray("int64")
        arr[:] = np.arange(10)
        other = SharedMemory(shm.name)
        assert list(other.ndarray("int64", (2, 5))[1]) == [5, 6, 7, 8, 9]
        del arr
        other.close()
    finally:
        shm.close()
        shm.unlink()


def test_extras_are_refused_where_they_mean_nothing() -> None:
    with pytest.raises(ValueError, match="attaching"):
        SharedMemory(create=True, size=1, readonly=True)
    with pytest.raises(ValueError, match="create=True"):
        SharedMemory("x", lifetime="owner")
    with pytest.raises(ValueError, match="positive"):
        SharedMemory(create=True, size=-1)
    with pytest.raises(TypeError, match="'redonly'"):
        SharedMemory("x", redonly=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'lifetim'"):
        ShareableList([1], lifetim="owner")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="attaching"):
        ShareableList([1], readonly=True)


def test_ttl_lifetime() -> None:
    shm = SharedMemory(create=True, size=8, lifetime="ttl", ttl=0.2)
    name = shm.name
    shm.close()
    eventually(lambda: gone(name))


def test_no_daemon_names_the_socket(tmp_path: Any) -> None:
    sock = str(tmp_path / "none.sock")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from shmbroker import shared_memory as s\n"
            "try:\n    s.SharedMemory('x')\nexcept FileNotFoundError as e:\n    print(e)",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SHMBROKER_SOCKET": sock},
        check=True,
    )
    assert sock in out.stdout
    assert out.stderr == ""
    assert shared_memory._USE_POSIX
