"""A private systemd, booted as PID 1 of fresh namespaces, for ops tests.

Follows ``/work/shared/notes/systemd-sandbox.md``: ``unshare`` gives the boot
script new pid, mount, net, uts and ipc namespaces; the script overlays
``/etc``, ``/usr`` and ``/var`` (upper layers on a private tmpfs), mounts fresh
tmpfs on ``/run``, ``/tmp``, ``/opt``, ``/dev/shm`` and
``/etc/systemd/system``, installs an empty default target, masks every unit
that would act on the host, and execs systemd.  Tests then drive it through
``nsenter`` (:meth:`SystemdSandbox.run`, :meth:`SystemdSandbox.systemctl`).

Besides the note's recipe the boot script also keeps the sandbox off these
host resources, each met in practice:

* ``/sys/fs/cgroup`` gets a private tmpfs with the host's hierarchies bound
  back into it.  systemd remounts that tmpfs read-only (and ``mkdir``s and
  symlinks in it) at boot; on the host's own tmpfs the remount changes the
  *superblock*, so the host's ``/sys/fs/cgroup`` turned read-only.
* systemd is moved into a cgroup of its own (``shmbroker-sandbox-*``) before
  it starts, so everything it creates in the shared cgroup hierarchies sits in
  one subtree, removed by :meth:`SystemdSandbox.stop`.
* ``/proc/sys`` is read-only (``/proc/sys/net`` stays writable: the network
  namespace is private): systemd raises ``fs.file-max`` at boot otherwise.
  ``/proc/sysrq-trigger`` is read-only too.
* ``/dev/console`` is a pty drained into ``WORKDIR/console.log``: PID 1
  reopens ``/dev/console`` itself, which otherwise is the host's console.
* ``/dev/kmsg`` is ``/dev/null`` and journald has ``ReadKMsg=no``: journald
  would otherwise copy the host's kernel log into the sandbox journal.
* ``/proc/cmdline`` is empty: systemd and its generators read the host's
  kernel command line (``systemd.unit=``, ``emergency``, ``systemd.run=``...).
* ``systemd-journald-dev-log.socket`` gets a drop-in with an empty
  ``Symlinks=``: its ``Symlinks=/dev/log`` would create ``/dev/log`` in the
  host's ``/dev`` (a dangling link to a socket that exists only inside).
* ``dev-hugepages.mount`` and ``dev-mqueue.mount`` are masked too (any unit
  with default dependencies pulls them in): their mount points would be
  created in the host's ``/dev``.
* systemd runs with ``container=shmbroker-sandbox``, so it takes its
  container code paths whatever the host (this one has ``/.dockerenv``,
  which systemd reads as docker); on bare metal it would also set the kernel
  timezone and load kernel modules.
* Before ``exec`` the script checks that every protected path is now on a
  different filesystem than the host's, and aborts otherwise.

Only one sandbox runs at a time on a host (the cgroup trees are shared): a
``flock`` on ``/run/lock/shmbroker-systemd-sandbox.lock`` serializes test
processes.  ``unshare`` runs under ``setpriv --pdeathsig KILL`` with
``--kill-child``, so if the test process dies (even by SIGKILL) the whole
namespace dies with it.

Usage::

    reason = sandbox_available()          # None, or why it cannot boot here
    with SystemdSandbox(tmp_path / "sbx", binds=[repo]) as sbx:
        sbx.write_file("/etc/systemd/system/x.service", UNIT)
        sbx.systemctl("daemon-reload")
        sbx.systemctl("start", "x.service")
        print(sbx.journal("x.service"))

Never run ``systemctl`` on the host for these tests, and never point it at
the host's PID 1: everything goes through :meth:`SystemdSandbox.run`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import select
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, overload

__all__ = [
    "MASKED_UNITS",
    "SKIP_ENV",
    "SandboxCommandError",
    "SandboxError",
    "SystemdSandbox",
    "host_dev_intruders",
    "sandbox_available",
]

#: Tests skip (instead of failing) the systemd tests when this is "1".
SKIP_ENV = "SHMBROKER_SKIP_SYSTEMD"

SYSTEMD = Path("/lib/systemd/systemd")

#: Units masked (symlinked to /dev/null) in the sandbox: each would act on the
#: host's kernel or shared filesystems (see the note, "Danger first").
MASKED_UNITS: tuple[str, ...] = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "modprobe@.service",
    "systemd-sysusers.service",
    "systemd-firstboot.service",
    "systemd-random-seed.service",
    "systemd-machine-id-commit.service",
    "systemd-remount-fs.service",
    "systemd-repart.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-update-utmp.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "ldconfig.service",
    "systemd-pstore.service",
    "systemd-timesyncd.service",
    "systemd-fsck-root.service",
    "systemd-fsck@.service",
    "systemd-quotacheck.service",
    "local-fs.target",
    "swap.target",
    # Not in the note: their mount points are created in the host's /dev.
    "dev-hugepages.mount",
    "dev-mqueue.mount",
)

_OVERLAID = ("/etc", "/usr", "/var")
# Fresh tmpfs mounts: path, mode, extra options.
_TMPFS: tuple[tuple[str, str, str], ...] = (
    ("/run", "0755", ",nosuid,nodev"),
    ("/tmp", "1777", ",nosuid,nodev"),
    ("/opt", "0755", ""),
    ("/dev/shm", "1777", ",nosuid,nodev"),
    ("/etc/systemd/system", "0755", ""),
)
# A bind may not be one of these nor an ancestor of one: it would bring the
# host's copy back over the private one.
_PROTECTED = (
    "/",
    *_OVERLAID,
    *(p for p, _, _ in _TMPFS),
    "/dev",
    "/proc",
    "/sys",
    "/sys/fs/cgroup",
)
_CGROUP_PREFIX = "shmbroker-sandbox-"
_LOCK_NAME = "shmbroker-systemd-sandbox.lock"
_NSENTER_NS = ("-m", "-p", "-n", "-u", "-i")
_TAIL = 4000
_REQUIRED_TOOLS = ("unshare", "nsenter", "setpriv", "mount", "umount", "mountpoint", "bash")
_CAP_SYS_ADMIN = 21


#: The host's /dev entries before this process booted its first sandbox: what
#: later boots are compared against, so a leak is seen even on the first run.
_host_dev_before: frozenset[str] | None = None


def _note_host_dev() -> None:
    global _host_dev_before
    if _host_dev_before is None:
        _host_dev_before = frozenset(os.listdir("/dev"))


def host_dev_intruders() -> list[str]:
    """What the sandboxes of this process left in the host's ``/dev``.

    Two views, because a leak made by an earlier run is invisible to a
    before/after comparison: entries added since before the first boot here,
    and a ``/dev/log`` that is not a live socket (a new machine without a
    real journald or syslog has none; one left by an old sandbox is a
    dangling link into ``/run/systemd/journal``, safe to remove).
    """
    now = set(os.listdir("/dev"))
    found = sorted(now - _host_dev_before) if _host_dev_before is not None else []
    log = Path("/dev/log")
    if log.is_symlink() or log.exists():
        try:
            live = stat.S_ISSOCK(log.stat().st_mode)
        except OSError:
            live = False
        if not live and "log" not in found:
            found.append("log")
    return found


class SandboxError(RuntimeError):
    """The sandbox could not boot, or was used wrongly."""


class SandboxCommandError(subprocess.CalledProcessError):
    """A command run inside the sandbox with ``check=True`` failed."""

    def __str__(self) -> str:
        text = super().__str__()
        for name, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text += f"\n--- {name} (tail) ---\n{str(data)[-_TAIL:]}"
        return text


def sandbox_available() -> str | None:
    """Return None if a sandbox can boot here, else the reason it cannot.

    Static checks only (root, CAP_SYS_ADMIN, tools, systemd, overlayfs,
    cgroups); a boot that still fails raises :class:`SandboxError` from
    :meth:`SystemdSandbox.start`.
    """
    if not Path("/proc/self/ns/pid").exists():
        return "not Linux with namespaces (/proc/self/ns/pid missing)"
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()})"
    cap_eff = _status_field(Path("/proc/self/status"), "CapEff")
    if cap_eff is None or not (int(cap_eff, 16) >> _CAP_SYS_ADMIN) & 1:
        return "no CAP_SYS_ADMIN (an unprivileged container?)"
    missing = [t for t in _REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return "missing tools: " + ", ".join(missing)
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} not found (systemd not installed)"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if not any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines()):
        return "overlay filesystem not available (modprobe overlay?)"
    if not _cgroup_mounts():
        return "no cgroup filesystem mounted"
    helptext = subprocess.run(
        ["unshare", "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--kill-child" not in helptext:
        return "unshare lacks --kill-child (util-linux too old)"
    return None


class SystemdSandbox:
    """A private systemd as PID 1 of fresh namespaces (a context manager).

    ``workdir`` (created if needed) receives the boot script, ``boot.log``
    (the script's own output) and ``console.log`` (systemd's console); the
    private tmpfs holding the overlay upper layers is mounted on
    ``workdir/ns`` inside the namespace only, and vanishes with it.

    ``binds`` are host paths (a checkout under ``/tmp``, a venv...) bound back,
    read-write, at the same path inside, over the private tmpfs mounts.

    Attributes set by :meth:`start`: ``pid1`` (host pid of the namespaced
    systemd), ``unshare_pid``, ``boot_seconds`` (spawn to "running", journald
    not included), ``cgroup_dirs`` (host paths of the sandbox's own cgroups).

    Start it from a thread that outlives it (the main thread, in pytest): the
    kernel's parent-death signal, which kills the namespace if this process
    dies, fires when the *thread* that started it exits.
    """

    def __init__(
        self,
        workdir: Path,
        binds: Sequence[Path] = (),
        *,
        boot_timeout: float = 30.0,
        lock_timeout: float = 300.0,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.binds: tuple[Path, ...] = tuple(_check_bind(Path(b)) for b in binds)
        self.boot_timeout = boot_timeout
        self.lock_timeout = lock_timeout
        self.pid1: int | None = None
        self.unshare_pid: int | None = None
        self.boot_seconds: float | None = None
        self.cgroup_dirs: tuple[Path, ...] = ()
        self.console_log = self.workdir / "console.log"
        self.boot_log = self.workdir / "boot.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._console: _ConsoleDrain | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Boot the sandbox; return once systemd is up and journald runs.

        Raises :class:`SandboxError` (with the boot log and console tail) if
        systemd does not reach "running" or "degraded" in ``boot_timeout``.
        The sandbox is stopped again before the exception propagates.
        """
        if self._started:
            raise SandboxError("sandbox already started")
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._lock()
        _note_host_dev()
        _remove_stale_cgroups()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "ns").mkdir(exist_ok=True)
        self._console = _ConsoleDrain(self.console_log)
        cg_name = f"{_CGROUP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        moves, self.cgroup_dirs = _cgroup_plan(cg_name)
        script = self.workdir / "boot.sh"
        script.write_text(_boot_script(self.workdir / "ns", self._console.tty, self.binds, moves))

        began = time.monotonic()
        with self.boot_log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    "setpriv",
                    "--pdeathsig",
                    "KILL",
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount",
                    "--net",
                    "--uts",
                    "--ipc",
                    "--mount-proc",
                    "bash",
                    str(script),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.unshare_pid = self._proc.pid
        deadline = began + self.boot_timeout
        self.pid1 = self._wait_pid1(deadline)
        self._wait_running(deadline)
        self.boot_seconds = time.monotonic() - began
        self.systemctl("start", "systemd-journald.socket", "systemd-journald.service")

    def stop(self) -> None:
        """Kill the sandbox (SIGKILL to its PID 1) and clean up; idempotent.

        Every process in the namespace dies with its PID 1; its mounts vanish
        with the mount namespace.  The sandbox's cgroups are removed from the
        host's hierarchies and the lock is released.  Units are not stopped
        first: a test that wants a clean ``systemctl stop`` does it itself.
        """
        atexit.unregister(self.stop)
        try:
            self._kill_namespace()
        finally:
            try:
                for d in self.cgroup_dirs:
                    _rmtree_cgroup(d)
            finally:
                if self._console is not None:
                    self._console.close()
                    self._console = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    def _kill_namespace(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            pid1 = self.pid1
            if pid1 is not None and _ppid(pid1) == proc.pid:
                # proc is our unreaped child, so pid1 (its child) is ours.
                _kill(pid1)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill(proc.pid)  # --kill-child takes the namespace down with it
                proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        """Whether the namespace's unshare process is still alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- commands inside ---------------------------------------------------

    def run(
        self,
        cmd: Sequence[str],
        net: bool = False,
        check: bool = True,
        timeout: float | None = 60.0,
        *,
        input: str | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the sandbox via nsenter; capture text output.

        ``net=True`` keeps the host's network namespace (pip, apt).  ``cwd``
        is a path inside the sandbox (default ``/``); ``env`` replaces the
        environment (default: inherited from this process).  On a timeout
        only nsenter is killed; the command dies when the sandbox stops.
        Raises :class:`SandboxCommandError` if ``check`` and it fails.
        """
        if self.pid1 is None or not self.running or _ppid(self.pid1) != self.unshare_pid:
            # The last check: never nsenter a recycled pid (the host's namespaces).
            raise SandboxError("sandbox is not running")
        args = ["nsenter", "-t", str(self.pid1)]
        args += [ns for ns in _NSENTER_NS if not (net and ns == "-n")]
        if cwd is not None:
            args.append(f"--wdns={cwd}")
        args += ["--", *cmd]
        result = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )
        if check and result.returncode != 0:
            raise SandboxCommandError(result.returncode, list(cmd), result.stdout, result.stderr)
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float | None = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl --no-pager ARGS`` inside the sandbox."""
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def write_file(self, path: str, content: str, mode: int = 0o644) -> None:
        """Write ``content`` to ``path`` inside the sandbox (parents created)."""
        quoted = shlex.quote(path)
        self.run(
            [
                "sh",
                "-c",
                f'mkdir -p -- "$(dirname -- {quoted})" && cat > {quoted}'
                f" && chmod {mode:o} -- {quoted}",
            ],
            input=content,
        )

    @overload
    def journal(self, unit: str, fields: Literal[False] = False) -> str: ...
    @overload
    def journal(self, unit: str, fields: Literal[True]) -> list[dict[str, Any]]: ...
    def journal(self, unit: str, fields: bool = False) -> str | list[dict[str, Any]]:
        """The unit's journal: messages as text, or ``-o json`` entries.

        ``fields=False`` returns ``journalctl -u UNIT -o cat`` (one message a
        line); ``fields=True`` one dict per entry (``MESSAGE`` is a list of
        byte values when it is not UTF-8).  Entries a service just wrote may
        take a moment to appear: see :meth:`wait_for_journal`.
        """
        out = self.run(
            ["journalctl", "--no-pager", "-u", unit, "-o", "json" if fields else "cat"]
        ).stdout
        if not fields:
            return out
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for_journal(self, unit: str, text: str, timeout: float = 10.0) -> str:
        """Poll the unit's journal until a message contains ``text``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.journal(unit).splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"{text!r} not in the journal of {unit} after {timeout} s:\n"
                    + self.journal(unit)[-_TAIL:]
                )
            time.sleep(0.1)

    def console_tail(self, size: int = _TAIL) -> str:
        """The last ``size`` characters of the boot log and systemd's console."""
        parts = []
        for path in (self.boot_log, self.console_log):
            with contextlib.suppress(OSError):
                data = path.read_bytes()[-size:].decode(errors="replace").replace("\r", "")
                parts.append(f"--- {path.name} ---\n{data}")
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------

    def _lock(self) -> None:
        lock_dir = Path("/run/lock")
        if not (lock_dir.is_dir() and os.access(lock_dir, os.W_OK)):
            lock_dir = Path(tempfile.gettempdir())
        fd = os.open(lock_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SandboxError(
                        f"another sandbox held {lock_dir / _LOCK_NAME} for {self.lock_timeout} s"
                    ) from None
                time.sleep(0.2)
        self._lock_fd = fd

    def _boot_failed(self, why: str) -> SandboxError:
        return SandboxError(f"systemd sandbox failed to boot: {why}\n{self.console_tail()}")

    def _wait_pid1(self, deadline: float) -> int:
        assert self._proc is not None
        while True:
            children = _children(self._proc.pid)
            if children:
                return children[0]
            if self._proc.poll() is not None:
                raise self._boot_failed(f"unshare exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise self._boot_failed("unshare started no child")
            time.sleep(0.01)

    def _wait_running(self, deadline: float) -> None:
        assert self._proc is not None
        state = "(not asked yet)"
        while True:
            if self._proc.poll() is not None:
                raise self._boot_failed(
                    f"namespace exited with status {self._proc.returncode} (last state {state!r})"
                )
            try:
                state = self.run(
                    ["systemctl", "is-system-running"], check=False, timeout=5
                ).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(systemctl timed out)"
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping"):
                raise self._boot_failed(f"systemd is {state!r}")
            if time.monotonic() > deadline:
                raise self._boot_failed(f"still {state!r} after {self.boot_timeout} s")
            time.sleep(0.05)


class _ConsoleDrain:
    """A pty for the sandbox's /dev/console, drained into a file by a thread.

    It must be drained: a full pty blocks systemd (PID 1) on its next log.
    """

    def __init__(self, path: Path) -> None:
        self._master, self._slave = os.openpty()
        self.tty = os.ttyname(self._slave)
        os.set_blocking(self._master, False)
        self._out = path.open("wb")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="sandbox-console", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], 0.1)
                if ready:
                    self._out.write(os.read(self._master, 65536))
                    self._out.flush()
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out.close()


def _boot_script(
    ns: Path, console: str, binds: Sequence[Path], cgroup_moves: Sequence[Path]
) -> str:
    """The script unshare runs as PID 1 of the new namespaces (it execs systemd).

    One command a line: ``set -e`` does not stop at a failure inside ``a && b``.
    """
    q = shlex.quote
    lines = [
        "# Generated by tests/support/systemd_sandbox.py; runs as PID 1 of fresh namespaces.",
        "set -euo pipefail",
        'die() { echo "sandbox boot: $*" >&2; exit 97; }',
        # Nothing below may propagate to the host.
        "mount --make-rprivate /",
        f"mount -t tmpfs -o mode=0700 sbx-private {q(str(ns))}",
        # Paths below are relative to this tmpfs (mount -c passes them as
        # given), so they keep working once /var or /tmp hide the workdir.
        f"cd {q(str(ns))}",
        "mkdir binds cg",
    ]
    # 1. Stage the binds while the host's paths are still visible.
    for i, path in enumerate(binds):
        lines.append(f"{'mkdir' if path.is_dir() else 'touch'} binds/{i}")
        lines.append(f"mount -c --bind {q(str(path))} binds/{i}")
    # 2. A private /sys/fs/cgroup: systemd remounts it read-only, which on the
    #    host's tmpfs changes the host's superblock.
    lines += [
        'if [ "$(stat -fc %T /sys/fs/cgroup)" = tmpfs ]; then',
        "  mount -c --rbind /sys/fs/cgroup cg",
        "  mount -t tmpfs -o mode=0755,nosuid,nodev,noexec sbx-cgroup /sys/fs/cgroup",
        "  for e in cg/*; do",
        '    n="${e#cg/}"',
        '    if [ -L "$e" ]; then',
        '      ln -s "$(readlink "$e")" "/sys/fs/cgroup/$n"',
        '    elif mountpoint -q "$e"; then',
        '      mkdir "/sys/fs/cgroup/$n"',
        '      mount -c --bind "$e" "/sys/fs/cgroup/$n"',
        "    fi",
        "  done",
        "  umount -c -R cg",
        "fi",
    ]
    # 3. Our own cgroup subtree, so systemd's cgroups can be found and removed.
    for d in cgroup_moves:
        lines.append(f"mkdir -p {q(str(d))}")
        lines.append(f"echo 0 > {q(str(d / 'cgroup.procs'))}")
    # 4. Overlays on /etc /usr /var; fresh tmpfs mounts.
    for top in _OVERLAID:
        n = top.strip("/")
        lines += [
            f"mkdir {n}.up {n}.wk",
            f"mount -c -t overlay sbx-{n}"
            f" -o lowerdir={top},upperdir=./{n}.up,workdir=./{n}.wk {top}",
        ]
    # /etc/resolv.conf may link into /run (systemd-resolved), about to be
    # hidden: keep a copy so that run(net=True) still resolves names.
    lines += [
        "if [ -L /etc/resolv.conf ] && [ -e /etc/resolv.conf ]; then",
        "  cp -L /etc/resolv.conf resolv.conf",
        "  rm /etc/resolv.conf",
        "  cp resolv.conf /etc/resolv.conf",
        "fi",
    ]
    for mnt, mode, opts in _TMPFS:
        name = "sbx-" + mnt.strip("/").replace("/", "-")
        lines.append(f"mount -t tmpfs -o mode={mode}{opts} {name} {mnt}")
    lines += [
        "mkdir -m 1777 /run/lock",
        # 5. Kernel-facing files.
        f"mount -c --bind {q(console)} /dev/console",
        "mount -c --bind /dev/null /dev/kmsg",
        ": > cmdline",
        "mount -c --bind cmdline /proc/cmdline",
        "mount -c --bind /proc/sys /proc/sys",
        "mount -c -o remount,bind,ro /proc/sys",
        "mount -c --bind /proc/sys/net /proc/sys/net",
        "mount -c -o remount,bind,rw /proc/sys/net",
        "if [ -e /proc/sysrq-trigger ]; then",
        "  mount -c --bind /proc/sysrq-trigger /proc/sysrq-trigger",
        "  mount -c -o remount,bind,ro /proc/sysrq-trigger",
        "fi",
        # 6. Units: an empty default target, the masks, a volatile journal.
        "S=/etc/systemd/system",
        "printf '[Unit]\\nDescription=shmbroker test sandbox\\n' > $S/sandbox.target",
        "ln -s sandbox.target $S/default.target",
        "for u in " + " ".join(MASKED_UNITS) + '; do ln -s /dev/null "$S/$u"; done',
        "mkdir -p /etc/systemd/journald.conf.d",
        "printf '[Journal]\\nStorage=volatile\\nReadKMsg=no\\n'"
        " > /etc/systemd/journald.conf.d/sandbox.conf",
        # An empty Symlinks= resets the list: /dev/log would land in the host's /dev.
        "mkdir -p $S/systemd-journald-dev-log.socket.d",
        "printf '[Socket]\\nSymlinks=\\n' > $S/systemd-journald-dev-log.socket.d/sandbox.conf",
    ]
    # 7. The binds, back at their own paths.
    for i, path in enumerate(binds):
        if path.is_dir():
            lines.append(f"mkdir -p {q(str(path))}")
        else:
            lines.append(f"mkdir -p {q(str(path.parent))}")
            lines.append(f"touch {q(str(path))}")
        # --move, not bind + umount: umount cannot find binds/N by a path
        # relative to a directory that is hidden by now.
        lines.append(f"mount -c --move binds/{i} {q(str(path))}")
    # 8. Refuse to start systemd unless the host's filesystems are out of reach
    #    (plain assignments, so that a failing stat stops the script).
    for mnt in (*_OVERLAID, *(t for t, _, _ in _TMPFS)):
        lines.append(f"dev=$(stat -c %d {mnt})")
        lines.append(f'[ "$dev" != {os.stat(mnt).st_dev} ] || die "{mnt} is the host\'s"')
    lines += [
        "fstype=$(stat -fc %T /sys/fs/cgroup)",
        "dev=$(stat -c %d /sys/fs/cgroup)",
        f'[ "$fstype" != tmpfs ] || [ "$dev" != {os.stat("/sys/fs/cgroup").st_dev} ]'
        ' || die "/sys/fs/cgroup is the host\'s"',
        '[ ! -w /proc/sys/fs/file-max ] || die "/proc/sys is writable"',
        # container=: the same (container) code paths whether or not the host
        # has /.dockerenv; without it systemd also sets the clock's timezone
        # and loads kernel modules.
        "exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_COLORS=0"
        f" container=shmbroker-sandbox {SYSTEMD} --system --log-target=console --show-status=no",
    ]
    return "\n".join(lines) + "\n"


def _check_bind(path: Path) -> Path:
    if not path.is_absolute():
        raise SandboxError(f"bind {path}: not an absolute path")
    resolved = path.resolve()
    if not resolved.exists():
        raise SandboxError(f"bind {path}: does not exist")
    for protected in _PROTECTED:
        if resolved == Path(protected) or Path(protected).is_relative_to(resolved):
            raise SandboxError(f"bind {path}: would expose the host's {protected}")
    return resolved


def _status_field(path: Path, key: str) -> str | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return value.strip()
    except OSError:
        pass
    return None


def _ppid(pid: int) -> int | None:
    """Parent pid of ``pid``, or None if it does not exist (any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(c) for c in text.split()]
    except OSError:
        pass
    found = []  # kernels without CONFIG_PROC_CHILDREN
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _ppid(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def _kill(pid: int) -> None:
    if pid <= 1:
        raise SandboxError(f"refusing to signal pid {pid}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _cgroup_mounts() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fstype, super options) of the host's cgroup mounts."""
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fields, after = pre.split(), post.split()
            if len(fields) >= 5 and len(after) >= 3 and after[0] in ("cgroup", "cgroup2"):
                mounts.append((_unescape(fields[3]), _unescape(fields[4]), after[0], after[2]))
    return mounts


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy key ("name=systemd", "" for v2...)."""
    paths = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            paths[controllers] = path
    return paths


def _host_dir(mount: tuple[str, str, str, str], cgpath: str) -> Path | None:
    root, point, _, _ = mount
    if not (cgpath == root or cgpath.startswith(root.rstrip("/") + "/")):
        return None
    return Path(point) / cgpath[len(root) :].lstrip("/")


def _cgroup_plan(name: str) -> tuple[list[Path], tuple[Path, ...]]:
    """Where to put systemd, and every host dir its cgroups may end up in.

    systemd takes its own name=systemd cgroup (v2: its unified one) as the
    root of its tree and uses that same path in every other hierarchy.
    """
    own = _own_cgroups()
    mounts = _cgroup_mounts()
    root = own.get("name=systemd", own.get("", "/"))
    moves: list[Path] = []
    for mount in mounts:
        if mount[2] == "cgroup2" or "name=systemd" in mount[3].split(","):
            key = "" if mount[2] == "cgroup2" else "name=systemd"
            base = _host_dir(mount, own.get(key, root))
            if base is not None:
                moves.append(base / name)
    everywhere = set(moves)
    for mount in mounts:
        base = _host_dir(mount, root)
        if base is not None:
            everywhere.add(base / name)
    return moves, tuple(sorted(everywhere))


def _rmtree_cgroup(top: Path, timeout: float = 5.0) -> None:
    """rmdir a cgroup subtree, deepest first (cgroupfs dirs hold no files)."""
    deadline = time.monotonic() + timeout
    while top.is_dir():
        dirs = sorted((p for p, _, _ in os.walk(top)), key=len, reverse=True)
        busy = False
        for d in dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                busy = True
        if not busy or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _remove_stale_cgroups() -> None:
    """Remove empty sandbox cgroups left by a test process that was killed."""
    own = _own_cgroups()
    root = own.get("name=systemd", own.get("", "/"))
    for mount in _cgroup_mounts():
        base = _host_dir(mount, root)
        if base is None or not base.is_dir():
            continue
        for stale in base.glob(_CGROUP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                _rmtree_cgroup(stale, timeout=0)
