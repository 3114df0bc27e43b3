"""The chaos driver: many client processes doing random work against one real
daemon while random clients, and then the daemon itself, are SIGKILLed.

Processes
---------
driver (the test process)
    starts a real daemon (:class:`DaemonProc`) and the zygote; SIGKILLs the
    daemon under load and restarts it on the same state dir, socket and shm
    prefix; freezes every client once to hold the daemon's books against
    what the clients really hold; after the run checks that nothing is left
    (leases, segments, /dev/shm objects, daemon fds) and reads every
    persistent segment back through a fresh client.
zygote (``python -m tests.stress.chaos zygote SPEC``)
    imports the client library once, then forks the clients (so 200 of them
    cost no interpreter start-ups), SIGKILLs random ones and forks a new
    incarnation into the dead one's slot.  It runs in a session of its own,
    so the driver can end it and every client with one ``killpg``.
client (a forked child of the zygote)
    one real broker connection doing random create/open/write/release of
    shared "ephemeral" names (refcount, owner or ttl; shm or memfd), and
    writes, reads and deletes of its slot's own persistent names.

Persistent journal, one file per slot, written by the slot's incarnations in
turn: ``begin`` before a write; ``done`` with the segment id and sha256 once
the bytes are in the mapping and a ``stat`` reply confirmed the segment;
``delbegin``/``gone`` around a delete.  A client killed between the two
leaves the name pending, and the next incarnation of its slot redoes that
write (or delete) before anything else, so at the end every persistent name
has one known expected state: absent, or exactly the bytes journaled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from shmbroker import Broker, BrokerError, Segment
from tests.support.helpers import REPO, DaemonProc

T = TypeVar("T")

#: refusals a client expects in this workload; any other error fails the run
EXPECTED_CODES = frozenset({"ENOENT", "EEXIST", "ETIMEDOUT"})
P_PREFIX = "chaos/p/"
E_PREFIX = "chaos/e/"
REPORT = REPO / "docs" / "reliability.md"


@dataclass(frozen=True)
class ChaosConfig:
    clients: int
    #: seconds of load, from the moment the clients are forked
    duration: float
    #: when to SIGKILL and restart the daemon, as fractions of ``duration``
    daemon_kills_at: tuple[float, ...]
    #: when to freeze the clients and check the books (fraction of ``duration``)
    freeze_at: float = 0.8
    client_kills_per_s: float = 3.0
    #: mean pause of a client between two operations, seconds
    think: float = 0.002
    persistent_per_client: int = 2
    max_held: int = 6
    reclaim_window: float = 2.0
    seed: int = 0
    reconnect_timeout: float = 60.0
    #: the daemon's ``state_compact_after``: low, snapshots are written under load
    state_compact_after: int = 5000


def p_name(slot: int, k: int) -> str:
    return f"{P_PREFIX}{slot}/{k}"


def p_size(slot: int, k: int) -> int:
    """Sizes fixed per name (so ``exist_ok`` always fits), not page multiples."""
    return 1000 + ((slot * 7 + k * 3) % 16) * 4093


def e_size(i: int) -> int:
    return 512 * (1 + i % 13) + i


# -- journal ------------------------------------------------------------------------


class Journal:
    """Append-only JSON lines; one small ``write`` per record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, rec: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())


def read_journal(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def last_states(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last persistent-name record per name."""
    last: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec["k"] in ("begin", "done", "delbegin", "gone"):
            last[rec["name"]] = rec
    return last


# -- the client process ---------------------------------------------------------------

_FREEZE = False
_FINISH = False


def _on_freeze(_signum: int, _frame: object) -> None:
    global _FREEZE
    _FREEZE = True


def _on_finish(_signum: int, _frame: object) -> None:
    global _FINISH
    _FINISH = True


class WorkerFailure(Exception):
    """Something the daemon must never do (a replaced segment, an odd reply)."""


class Worker:
    def __init__(
        self,
        cfg: ChaosConfig,
        slot: int,
        inc: int,
        rng: random.Random,
        broker: Broker,
        journal: Journal,
        workdir: Path,
        hard_deadline: float,
    ) -> None:
        self.cfg = cfg
        self.slot = slot
        self.inc = inc
        self.rng = rng
        self.broker = broker
        self.journal = journal
        self.workdir = workdir
        self.hard_deadline = hard_deadline
        self.e_names = max(8, cfg.clients // 2)
        self.held: list[tuple[str, Segment]] = []
        self.requests = 0
        self.reported = 0
        self.lost = 0

    # -- requests ---------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T | None:
        """One request: None for an expected refusal or a connection lost to a restart."""
        try:
            result = fn(*args, **kw)
        except BrokerError as exc:
            if exc.code not in EXPECTED_CODES:
                raise
            self.requests += 1
            return None
        except ConnectionError:
            self.lost += 1
            return None
        self.requests += 1
        return result

    def must(
        self, fn: Callable[..., T], *args: Any, ok: tuple[str, ...] = (), **kw: Any
    ) -> T | None:
        """A request that must be answered: sent again across daemon restarts."""
        while True:
            try:
                result = fn(*args, **kw)
            except ConnectionError:
                self.lost += 1
                if time.monotonic() > self.hard_deadline:
                    raise
                continue
            except BrokerError as exc:
                if exc.code not in ok:
                    raise
                self.requests += 1
                return None
            self.requests += 1
            return result

    def close(self, seg: Segment) -> None:
        seg.close()  # releases; a lease lost to a restart is not an error
        self.requests += 1

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.resolve()
        while not _FINISH:
            if time.monotonic() > self.hard_deadline:
                raise WorkerFailure("never told to finish")
            if _FREEZE:
                self.freeze()
            self.step()
            if self.requests - self.reported >= 100:
                self.report()
            if self.cfg.think:
                time.sleep(self.rng.expovariate(1 / self.cfg.think))
        for _kind, seg in self.held:
            self.close(seg)
        self.held.clear()
        self.report(final=True)
        self.broker.close()

    def report(self, final: bool = False) -> None:
        self.reported = self.requests
        self.journal.write(
            {"k": "count", "inc": self.inc, "n": self.requests, "lost": self.lost, "final": final}
        )

    def resolve(self) -> None:
        """Finish what a killed predecessor in this slot left pending."""
        for name, rec in last_states(read_journal(self.journal.path)).items():
            k = int(name.rsplit("/", 1)[1])
            if rec["k"] == "begin":
                self.journal.write({"k": "repair", "name": name})
                self.write_persistent(k)
            elif rec["k"] == "delbegin":
                self.journal.write({"k": "repair", "name": name})
                self.delete_persistent(k)

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.20:
            self.create_ephemeral()
        elif r < 0.40:
            self.open_ephemeral()
        elif r < 0.58:
            self.release_one()
        elif r < 0.68:
            self.write_persistent(self.rng.randrange(self.cfg.persistent_per_client))
        elif r < 0.70:
            self.delete_persistent(self.rng.randrange(self.cfg.persistent_per_client))
        elif r < 0.80:
            self.read_persistent()
        elif r < 0.92:
            self.scribble()
        else:
            self.look()
        while len(self.held) > self.cfg.max_held:
            self.close(self.held.pop(0)[1])

    # -- operations -----------------------------------------------------------------

    def create_ephemeral(self) -> None:
        i = self.rng.randrange(self.e_names)
        lifetime = self.rng.choice(("refcount", "owner", "ttl"))
        seg = self.call(
            self.broker.create,
            f"{E_PREFIX}{i}",
            e_size(i),
            lifetime=lifetime,
            ttl=self.rng.choice((0.0, 0.2, 0.5, 1.0)) if lifetime == "ttl" else None,
            backing="memfd" if self.rng.random() < 0.25 else "shm",
            exist_ok=self.rng.random() < 0.5,
        )
        if seg is not None:
            seg.buf[:8] = self.rng.randbytes(8)
            self.held.append(("e", seg))

    def open_ephemeral(self) -> None:
        i = self.rng.randrange(self.e_names)
        access = self.rng.choice(("ro", "rw"))
        wait = self.rng.choice((None, None, 0.0, 0.05))
        seg = self.call(self.broker.open, f"{E_PREFIX}{i}", access, wait)
        if seg is not None:
            bytes(seg.buf[:64])
            self.held.append(("e", seg))

    def release_one(self) -> None:
        if self.held:
            self.close(self.held.pop(self.rng.randrange(len(self.held)))[1])

    def scribble(self) -> None:
        rw = [seg for kind, seg in self.held if kind == "e" and not seg.readonly]
        if rw:
            seg = self.rng.choice(rw)
            off = self.rng.randrange(seg.size)
            n = min(self.rng.randrange(1, 512), seg.size - off)
            seg.buf[off : off + n] = self.rng.randbytes(n)

    def look(self) -> None:
        if self.rng.random() < 0.5:
            self.call(self.broker.stat, f"{E_PREFIX}{self.rng.randrange(self.e_names)}")
        else:
            self.call(lambda: list(self.broker.list(E_PREFIX)))

    def write_persistent(self, k: int) -> None:
        """Fill one of our persistent segments; journal its checksum once confirmed."""
        name, size = p_name(self.slot, k), p_size(self.slot, k)
        self.journal.write({"k": "begin", "name": name})
        seg = self.must(self.broker.create, name, size, lifetime="persistent", exist_ok=True)
        assert seg is not None
        seg.buf[:] = self.rng.randbytes(size)
        digest = hashlib.sha256(seg.buf).hexdigest()
        info = self.must(self.broker.stat, name)
        assert info is not None
        if info.id != seg.id or info.size != size:
            raise WorkerFailure(f"{name}: wrote into {seg.id} but the daemon says {info}")
        self.journal.write({"k": "done", "name": name, "id": seg.id, "sha": digest, "size": size})
        if self.rng.random() < 0.3:
            self.held.append(("p", seg))
        else:
            self.close(seg)

    def delete_persistent(self, k: int) -> None:
        name = p_name(self.slot, k)
        self.journal.write({"k": "delbegin", "name": name})
        self.must(self.broker.delete, name, ok=("ENOENT",))
        self.journal.write({"k": "gone", "name": name})

    def read_persistent(self) -> None:
        other = self.rng.randrange(self.cfg.clients)
        name = p_name(other, self.rng.randrange(self.cfg.persistent_per_client))
        seg = self.call(self.broker.open, name, "ro")
        if seg is not None:
            hashlib.sha256(seg.buf)
            if self.rng.random() < 0.3:
                self.held.append(("p", seg))
            else:
                self.close(seg)

    def freeze(self) -> None:
        """Say what we hold, then stop ourselves (between two requests, never in one)."""
        global _FREEZE
        self.must(self.broker.hello)  # connected, and our leases reclaimed if they could be
        # the broker's own view: a lease whose reclaim came too late is no longer ours
        leases = self.broker._leases
        held = [
            {"lease": seg.lease, "id": seg.id, "name": seg.name}
            for _kind, seg in self.held
            if seg.lease in leases
        ]
        out = self.workdir / "hold" / f"{os.getpid()}.json"
        out.write_text(json.dumps({"slot": self.slot, "held": held, "objects": len(self.held)}))
        _FREEZE = False
        os.kill(os.getpid(), signal.SIGSTOP)


def _connect(path: str, cfg: ChaosConfig, give_up: float) -> Broker:
    while True:
        try:
            return Broker(path, reconnect_timeout=cfg.reconnect_timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)


def _client(cfg: ChaosConfig, sock: str, workdir: Path, slot: int, inc: int, seed: int) -> int:
    devnull = os.open(os.devnull, os.O_RDWR)
    err = os.open(workdir / f"{slot}.{inc}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(err, 2)
    os.close(devnull)
    os.close(err)
    hard_deadline = time.monotonic() + cfg.duration + 300
    broker = _connect(sock, cfg, hard_deadline)
    journal = Journal(workdir / f"{slot}.jsonl")
    rng = random.Random(seed)
    Worker(cfg, slot, inc, rng, broker, journal, workdir, hard_deadline).run()
    return 0


# -- the zygote -------------------------------------------------------------------------


class Zygote:
    def __init__(self, cfg: ChaosConfig, sock: str, workdir: Path) -> None:
        self.cfg = cfg
        self.sock = sock
        self.workdir = workdir
        self.rng = random.Random(cfg.seed)
        self.live: dict[int, tuple[int, int]] = {}  # pid -> (slot, incarnation)
        self.incarnations: Counter[int] = Counter()
        self.started = 0
        self.killed = 0
        self.failures: list[dict[str, Any]] = []
        self.killing = True
        self.finishing = False
        self.stopped: list[int] = []
        self.t0 = time.monotonic()
        self.hard_deadline = self.t0 + cfg.duration + 300

    @staticmethod
    def emit(ev: str, **msg: Any) -> None:
        sys.stdout.write(json.dumps({"ev": ev, **msg}) + "\n")
        sys.stdout.flush()  # never leave a buffer for a forked child to inherit

    def spawn(self, slot: int) -> None:
        inc = self.incarnations[slot]
        self.incarnations[slot] += 1
        seed = self.rng.getrandbits(63)
        pid = os.fork()
        if pid == 0:  # the client: never return into the zygote's code
            code = 1
            try:
                code = _client(self.cfg, self.sock, self.workdir, slot, inc, seed)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        self.live[pid] = (slot, inc)
        self.started += 1

    def ended(self, pid: int, status: int, how: str) -> None:
        slot, inc = self.live.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if self.finishing and code == 0:
            return
        try:
            err = (self.workdir / f"{slot}.{inc}.err").read_text()[-4000:]
        except OSError:
            err = ""
        self.failures.append(
            {"slot": slot, "inc": inc, "pid": pid, "exit": code, "how": how, "stderr": err}
        )

    def reap(self) -> None:
        while self.live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.live:
                slot = self.live[pid][0]
                self.ended(pid, status, "exited on its own")
                if not self.finishing:  # a new incarnation finishes what it left pending
                    self.spawn(slot)

    def kill_one(self) -> None:
        pid = self.rng.choice(list(self.live))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            slot, _inc = self.live.pop(pid)
            self.killed += 1
        else:  # it had ended before our signal: that is a failure of its own
            slot = self.live[pid][0]
            self.ended(pid, status, "exited on its own")
        self.spawn(slot)

    def freeze(self) -> None:
        self.killing = False
        for pid in self.live:
            os.kill(pid, signal.SIGUSR1)
        pending = set(self.live)
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
                if got == 0:
                    continue
                pending.discard(pid)
                if os.WIFSTOPPED(status):
                    self.stopped.append(pid)
                else:
                    self.ended(pid, status, "died while freezing")
            time.sleep(0.01)
        workers = [{"pid": p, "slot": self.live[p][0]} for p in self.stopped]
        stacks = {pid: _stack_of(pid) for pid in sorted(pending)}
        self.emit(
            "frozen", workers=workers, stuck=sorted(pending), stacks=stacks, failures=self.failures
        )

    def thaw(self) -> None:
        for pid in self.stopped:
            os.kill(pid, signal.SIGCONT)
        self.stopped = []
        self.emit("thawed")

    def finish(self) -> None:
        self.finishing = True
        self.killing = False
        for pid in self.live:
            os.kill(pid, signal.SIGUSR2)
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 120
        while self.live and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.live):
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            self.ended(pid, status, "did not finish within 120 s")
        self.emit("done", started=self.started, killed=self.killed, failures=self.failures)

    def abort(self) -> None:
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.live.clear()

    def run(self) -> int:
        for slot in range(self.cfg.clients):
            self.spawn(slot)
        self.emit("ready", t0=self.t0, clients=self.cfg.clients)
        rate = self.cfg.client_kills_per_s
        next_kill = time.monotonic() + self.rng.expovariate(rate) if rate else float("inf")
        pending = b""
        while True:
            now = time.monotonic()
            if now > self.hard_deadline:
                self.abort()
                return 1
            timeout = 0.05
            if self.killing:
                timeout = max(0.0, min(timeout, next_kill - now))
            ready, _, _ = select.select([0], [], [], timeout)
            if ready:
                data = os.read(0, 4096)
                if not data:  # the driver is gone
                    self.abort()
                    return 1
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    cmd = line.decode().strip()
                    if cmd == "freeze":
                        self.freeze()
                    elif cmd == "thaw":
                        self.thaw()
                    elif cmd == "finish":
                        self.finish()
                        return 0
            self.reap()
            if self.killing and self.live and time.monotonic() >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.expovariate(rate)


def zygote_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    raw = spec["config"]
    cfg = ChaosConfig(**{**raw, "daemon_kills_at": tuple(raw["daemon_kills_at"])})
    # inherited by every forked client: a signal can never arrive before its handler
    signal.signal(signal.SIGUSR1, _on_freeze)
    signal.signal(signal.SIGUSR2, _on_finish)
    return Zygote(cfg, spec["socket"], Path(spec["workdir"])).run()


# -- the driver ---------------------------------------------------------------------------


class ZygoteProc:
    """The driver's handle on the zygote: commands in, JSON events out."""

    def __init__(self, cfg: ChaosConfig, sock: str, workdir: Path) -> None:
        self.err_path = workdir / "zygote.err"
        spec = {"config": asdict(cfg), "socket": sock, "workdir": str(workdir)}
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.stress.chaos", "zygote", json.dumps(spec)],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # its pgid is its pid: one killpg ends every client
            )
        self._buf = b""

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, ev: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                msg: dict[str, Any] = json.loads(line)
                if msg["ev"] == ev:
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"zygote: no {ev!r} within {timeout} s\n{self.errors()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise AssertionError(f"zygote exited before {ev!r}:\n{self.errors()}")
                self._buf += data

    def alive(self) -> bool:
        """Without reaping it: while unreaped, its pid (our killpg target) cannot be reused."""
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.proc.pid, flags) is None

    def errors(self) -> str:
        try:
            return self.err_path.read_text()[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """End the zygote and every client it forked (its process group), then reap it."""
        if self.proc.returncode is None:  # not reaped: the group id is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _settle(check: Callable[[], list[str]], timeout: float, what: str) -> None:
    """Poll ``check`` (a list of problems) until it is empty; fail with the last list."""
    deadline = time.monotonic() + timeout
    while True:
        problems = check()
        if not problems:
            return
        if time.monotonic() > deadline:
            shown = "\n  ".join(problems[:40])
            more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
            raise AssertionError(f"{what}, still after {timeout:.0f} s:\n  {shown}{more}")
        time.sleep(0.1)


def _requests_answered(d: DaemonProc) -> int:
    with Broker(d.socket) as b:
        return sum(b.stats().requests.values())


def _objects_problems(d: DaemonProc, segs: list[Any]) -> list[str]:
    objects = set(d.objects())
    backed = {d.prefix + s.id: s.name for s in segs if s.backing == "shm"}
    out = [f"/dev/shm/{o}: no listed segment" for o in sorted(objects - set(backed))]
    out += [
        f"{backed[o]}: its object /dev/shm/{o} is missing" for o in sorted(set(backed) - objects)
    ]
    return out


def _stack_of(pid: int) -> str:
    """Where a client that never froze is stuck (``py-spy dump``), for the report."""
    spy = Path(sys.executable).with_name("py-spy")
    try:
        out = subprocess.run(
            [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no stack: {exc})"
    return out.stdout + out.stderr


def _check_books(d: DaemonProc, workdir: Path, frozen: dict[str, Any]) -> dict[str, int]:
    """Clients frozen between requests: the daemon's leases are exactly theirs."""
    assert not frozen["stuck"], f"clients that never froze: {frozen['stuck']}\n" + "\n".join(
        f"{pid}:\n{stack}" for pid, stack in frozen.get("stacks", {}).items()
    )
    holds: dict[int, list[dict[str, Any]]] = {}
    for w in frozen["workers"]:
        holds[w["pid"]] = json.loads((workdir / "hold" / f"{w['pid']}.json").read_text())["held"]
    me = os.getpid()
    per_segment = Counter(h["id"] for held in holds.values() for h in held)
    figures: dict[str, int] = {}
    with Broker(d.socket) as b:

        def problems() -> list[str]:
            out = []
            clients = list(b.clients())
            count = Counter(c.pid for c in clients)
            out += [f"pid {p} has {n} connections listed" for p, n in count.items() if n > 1]
            want = set(holds) | {me}
            dead = sorted(set(count) - want)
            if dead:
                out.append(f"connections listed for processes that are not live clients: {dead}")
            missing = sorted(want - set(count))
            if missing:
                out.append(f"live clients not listed: {missing}")
            for c in clients:
                held = len(holds.get(c.pid, ()))
                if c.leases != held:
                    out.append(
                        f"client pid {c.pid}: daemon counts {c.leases} leases, it holds {held}"
                    )
            segs = list(b.list())
            for s in segs:
                if s.leases != per_segment.get(s.id, 0):
                    out.append(
                        f"{s.name} ({s.id}): stat leases {s.leases}, "
                        f"live clients hold {per_segment.get(s.id, 0)}"
                    )
            total = getattr(b.stats(), "leases", None)
            held_total = sum(c.leases for c in clients)
            if total is not None and total != held_total:
                out.append(f"daemon holds {total} leases, its clients {held_total}")
            out += _objects_problems(d, segs)
            figures.update(live_clients=len(holds), leases=held_total, segments=len(segs))
            return out

        _settle(problems, 15, "the daemon's books disagree with its frozen clients")
    return figures


def _failures_text(failures: list[dict[str, Any]]) -> str:
    last_lines = Counter(
        (f["stderr"].strip().splitlines() or [f"exit {f['exit']}, no output"])[-1] for f in failures
    )
    lines = [
        f"{len(failures)} client(s) failed: "
        + "; ".join(f"{n} x {line}" for line, n in last_lines.most_common())
    ]
    for f in failures[:3]:
        lines.append(
            f"- slot {f['slot']} incarnation {f['inc']} pid {f['pid']}: {f['how']}, "
            f"exit {f['exit']}\n{f['stderr']}"
        )
    return "\n".join(lines)


def _journals(workdir: Path, clients: int) -> dict[str, Any]:
    expected: dict[str, dict[str, Any] | None] = {}
    unresolved: list[str] = []
    counts: dict[tuple[int, int], dict[str, Any]] = {}
    writes = repaired = 0
    for slot in range(clients):
        records = read_journal(workdir / f"{slot}.jsonl")
        for rec in records:
            if rec["k"] == "done":
                writes += 1
            elif rec["k"] == "repair":
                repaired += 1
            elif rec["k"] == "count":
                key = (slot, rec["inc"])
                if key not in counts or rec["n"] >= counts[key]["n"]:
                    counts[key] = rec
        for name, rec in last_states(records).items():
            if rec["k"] == "done":
                expected[name] = rec
            elif rec["k"] == "gone":
                expected[name] = None
            else:
                unresolved.append(f"{name}: last record {rec}")
    return {
        "expected": expected,
        "unresolved": unresolved,
        "writes": writes,
        "repaired": repaired,
        "requests": sum(c["n"] for c in counts.values()),
        "lost": sum(c["lost"] for c in counts.values()),
    }


def _verify_after(d: DaemonProc, cfg: ChaosConfig, workdir: Path) -> dict[str, Any]:
    """Every client has exited: nothing held, nothing left, every byte there.

    Returns the figures, with ``problems`` (empty when all is well).
    """
    j = _journals(workdir, cfg.clients)
    problems: list[str] = []
    if j["unresolved"]:
        problems.append("persistent writes left pending:\n" + "\n".join(j["unresolved"]))
    pending = {u.split(":", 1)[0] for u in j["unresolved"]}
    me = os.getpid()
    with Broker(d.socket) as b:

        def leftovers() -> list[str]:
            out = []
            others = [c for c in b.clients() if c.pid != me]
            out += [f"connection of exited pid {c.pid} with {c.leases} leases" for c in others]
            segs = list(b.list())
            out += [
                f"{s.name}: {s.lifetime} segment left with {s.leases} leases"
                for s in segs
                if s.lifetime != "persistent" or s.leases
            ]
            total = getattr(b.stats(), "leases", None)
            if total:
                out.append(f"daemon still holds {total} leases")
            out += _objects_problems(d, segs)
            return out

        # unreclaimed leases go when the window ends; ttl segments within their ttl (<= 1 s)
        try:
            _settle(leftovers, cfg.reclaim_window + 15, "leftovers after every client exited")
        except AssertionError as exc:
            problems.append(str(exc))

        listed = {s.name: s for s in b.list() if s.name not in pending}
        want = {n: rec for n, rec in j["expected"].items() if rec is not None}
        lost = [f"{n}: persistent segment nobody wrote" for n in sorted(set(listed) - set(want))]
        lost += [f"{n}: acknowledged, now missing" for n in sorted(set(want) - set(listed))]
        verified = segments = 0
        with Broker(d.socket) as reader:  # a fresh client reads everything back
            for name in sorted(set(want) & set(listed)):
                rec = want[name]
                with reader.open(name, "ro") as seg:
                    digest = hashlib.sha256(seg.buf).hexdigest()
                    if seg.id != rec["id"]:
                        lost.append(f"{name}: id {seg.id}, written as {rec['id']}")
                    elif seg.size != rec["size"] or digest != rec["sha"]:
                        lost.append(f"{name} ({seg.id}): content differs from what was written")
                    else:
                        verified += seg.size
                        segments += 1
        if lost:
            problems.append("persistent segments lost bytes:\n" + "\n".join(lost))
        answered = sum(b.stats().requests.values())
        for s in b.list():
            b.delete(s.name)
        try:
            _settle(lambda: [f"/dev/shm/{o}" for o in d.objects()], 5, "objects left after delete")
        except AssertionError as exc:
            problems.append(str(exc))
    return {
        **j,
        "segments_verified": segments,
        "bytes_verified": verified,
        "answered": answered,
        "problems": problems,
    }


def _idle_fds(d: DaemonProc) -> int:
    """The daemon's fd count with no client: a connection just closed (the
    readiness probe's, ours) holds an fd until the daemon reads its end."""
    with Broker(d.socket) as b:
        b.hello()
    counts = []
    for _ in range(10):
        counts.append(d.fd_count())
        time.sleep(0.05)
    return min(counts)


def _fd_problems(d: DaemonProc, baseline: int) -> list[str]:
    now = d.fd_count()
    if now == baseline:
        return []
    fds = []
    for fd in sorted(os.listdir(f"/proc/{d.pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            fds.append(f"{fd}->{os.readlink(f'/proc/{d.pid}/fd/{fd}')}")
    return [f"daemon has {now} fds, {baseline} at its idle start: {' '.join(fds)}"]


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Run one chaos round and every check; return the figures.

    ``problems`` in the result lists what failed (see :func:`assert_clean`):
    a round goes on to its end, so one failure does not hide another.
    """
    print(f"chaos: {cfg}")  # shown with a failure: the seed to run it again
    started = datetime.now(UTC)
    m0 = time.monotonic()
    d = DaemonProc(
        {
            "reclaim_window": cfg.reclaim_window,
            "state_compact_after": cfg.state_compact_after,
            "log_level": "info",
            "max_clients": 4096,
            "max_clients_per_uid": 4096,
        }
    )
    zyg: ZygoteProc | None = None
    problems: list[str] = []
    try:
        d.start()
        baseline_fds = _idle_fds(d)
        workdir = d.root / "chaos"
        (workdir / "hold").mkdir(parents=True)
        zyg = ZygoteProc(cfg, d.socket, workdir)
        t0 = zyg.expect("ready", timeout=120)["t0"]
        answered = 0
        restarts = 0
        last_up = time.monotonic()
        for frac in cfg.daemon_kills_at:
            _sleep_until(t0 + frac * cfg.duration)
            answered += _requests_answered(d)
            d.kill()
            d.start(wait=False)
            d.wait_ready(timeout=60)
            restarts += 1
            last_up = time.monotonic()
            assert zyg.alive(), f"zygote died:\n{zyg.errors()}"
        # after the last reclaim window: a lease nobody reclaimed is gone by then
        _sleep_until(max(t0 + cfg.freeze_at * cfg.duration, last_up + cfg.reclaim_window + 1))
        zyg.send("freeze")
        frozen = zyg.expect("frozen", timeout=90)
        books: dict[str, int] = {}
        try:
            books = _check_books(d, workdir, frozen)
        except AssertionError as exc:
            problems.append(str(exc))
        zyg.send("thaw")
        zyg.expect("thawed", timeout=10)
        _sleep_until(t0 + cfg.duration)
        zyg.send("finish")
        done = zyg.expect("done", timeout=180)
        load = time.monotonic() - t0
        if done["failures"]:
            problems.append(_failures_text(done["failures"]))
        after = _verify_after(d, cfg, workdir)
        problems += after["problems"]
        try:
            _settle(lambda: _fd_problems(d, baseline_fds), 5, "daemon fds leaked")
        except AssertionError as exc:
            problems.append(str(exc))
        log = d.log()
        if "Traceback" in log:
            problems.append(f"the daemon logged an exception:\n{log[-6000:]}")
        return {
            "config": asdict(cfg),
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "clients": cfg.clients,
            "clients_started": done["started"],
            "clients_killed": done["killed"],
            "clients_failed": len(done["failures"]),
            "daemon_restarts": restarts,
            "requests": after["requests"],
            "answered": answered + after["answered"],
            "connections_lost": after["lost"],
            "persistent_writes": after["writes"],
            "repaired": after["repaired"],
            "segments_verified": after["segments_verified"],
            "bytes_verified": after["bytes_verified"],
            "frozen": books,
            "load_seconds": load,
            "wall_seconds": time.monotonic() - m0,
            "problems": problems,
        }
    finally:
        if zyg is not None:
            zyg.kill()
        d.cleanup()


def assert_clean(fig: dict[str, Any]) -> None:
    problems = fig["problems"]
    assert not problems, f"chaos seed {fig['config']['seed']}: {len(problems)} problem(s):\n\n" + (
        "\n\n".join(problems)
    )


# -- the report -----------------------------------------------------------------------------


FUZZ_PLACEHOLDER = """\
Not produced by this run. `make fuzz` (`python -m tests.fuzz.fuzz_live --messages
1000000 --spawn`) sends random and mutated datagrams, with stray fds attached,
from several connections to a live daemon and checks every reply against the
contract; it prints one JSON line of figures. Its last full run here (2026-11-26):
1,000,000 messages in 138 s, 0 contract violations, daemon fd count 15 before
and after, RSS 39 MiB before and 42 MiB after, nothing left in `/dev/shm`, no
traceback in the log. `make test` runs 100,000 of them (`tests/fuzz/test_fuzz_live.py`)."""


def write_report(fig: dict[str, Any], command: str, path: Path = REPORT) -> None:
    """Overwrite ``docs/reliability.md`` with the figures of this run."""
    cfg = fig["config"]
    kills = ", ".join(f"{f * cfg['duration']:.0f} s" for f in cfg["daemon_kills_at"])
    rate = fig["requests"] / fig["load_seconds"]
    frozen = fig["frozen"] or {"live_clients": "?", "leases": "?", "segments": "?"}
    problems = fig["problems"]
    if problems:
        result = f"**FAILED**: {len(problems)} problem(s), listed under Problems below."
        listed = "\n\n".join(problems)
        if len(listed) > 8000:
            listed = listed[:8000] + "\n[... cut]"
        failed = f"\n## Problems\n\n```text\n{listed}\n```\n"
    else:
        result = "passed: every check below held."
        failed = ""
    text = f"""# Reliability

This page is written by the chaos test itself (`tests/stress/chaos.py`) at the
end of each run, passed or failed (the Result line says which); do not edit it
by hand. `make stress` regenerates it: the test writes it only when
`SHMBROKER_WRITE_REPORT=1`, which that target sets, so CI runs leave the
checkout clean.

## Chaos run

- Result: {result}
- Date: {fig["date"]}
- Command: `{command}`
- Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}
- Shape: {cfg["clients"]} client processes for {cfg["duration"]:.0f} s, each with one
  connection doing random create/open/write/release (refcount, owner and ttl
  segments, shm and memfd backing) and writing its own persistent segments;
  random clients SIGKILLed (about {cfg["client_kills_per_s"]:g}/s) and respawned; the
  daemon SIGKILLed under load at {kills} and restarted on the same state
  directory, socket and shm prefix (reclaim window {cfg["reclaim_window"]:g} s; a state
  snapshot every {cfg["state_compact_after"]} journal records, so snapshots are written
  under load between the kills); seed {cfg["seed"]}.

| figure | value |
| --- | --- |
| client processes at once | {fig["clients"]} |
| client processes started | {fig["clients_started"]} |
| clients SIGKILLed | {fig["clients_killed"]} |
| clients that failed on their own (must be 0) | {fig["clients_failed"]} |
| daemon SIGKILLs survived (restarted on the same state) | {fig["daemon_restarts"]} |
| requests completed, counted by the clients | {fig["requests"]} ({rate:.0f}/s) |
| requests answered, the daemon's counters over its lives | {fig["answered"]} |
| requests cut off by a daemon kill (then retried or dropped) | {fig["connections_lost"]} |
| persistent writes acknowledged and journaled | {fig["persistent_writes"]} |
| torn writes redone by a respawned client | {fig["repaired"]} |
| persistent segments read back and verified (sha256) | {fig["segments_verified"]} |
| bytes verified | {fig["bytes_verified"]} |
| load phase | {fig["load_seconds"]:.1f} s |
| whole run, with start-up and checks | {fig["wall_seconds"]:.1f} s |

Checks (what "passed" means):

- Clients frozen between two requests ({frozen["live_clients"]} live clients,
  {frozen["leases"]} leases, {frozen["segments"]} segments at that moment): the `clients`
  op lists exactly the live client processes (no connection of a killed one);
  each client's lease count is what that client holds; each segment's
  `stat().leases` is the number of live clients' leases on it; the daemon's
  total lease count equals the sum; every object under the daemon's prefix in
  `/dev/shm` is a listed shm segment, and every listed shm segment has its
  object.
- After every client exited and the reclaim window closed: no connection but
  the checker's, no lease anywhere, no refcount, owner or ttl segment left,
  every persistent segment at 0 leases.
- Every persistent segment whose write was acknowledged reads back, through a
  fresh client, with the segment id and sha256 its writer journaled; none is
  missing and none is unexpected: zero bytes lost.
- `/dev/shm` holds nothing of the daemon's once the segments are deleted, and
  the daemon's fd count is back to the count it had idle at start.
- No client failed (any error but ENOENT, EEXIST and ETIMEDOUT, or any
  unexpected death, fails the run), and the daemon logged no traceback.
{failed}
## Fuzzing

{FUZZ_PLACEHOLDER}
"""
    path.write_text(text)


def summary(fig: dict[str, Any]) -> str:
    return (
        f"chaos seed {fig['config']['seed']}: {fig['clients']} clients, "
        f"{fig['clients_started']} started, {fig['clients_killed']} killed, "
        f"{fig['daemon_restarts']} daemon restarts, {fig['requests']} requests, "
        f"{fig['bytes_verified']} bytes verified in {fig['segments_verified']} segments, "
        f"{fig['load_seconds']:.1f} s of load"
    )


def maybe_write_report(fig: dict[str, Any], command: str) -> None:
    if os.environ.get("SHMBROKER_WRITE_REPORT") == "1":
        write_report(fig, command)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "zygote":
        sys.exit(zygote_main(sys.argv[2]))
    sys.exit("usage: python -m tests.stress.chaos zygote SPEC")
