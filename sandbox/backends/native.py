"""Native backend: a sandbox is a PID-1 reaper holding namespaces and a cgroup.

``Sandbox.start()`` creates PID 1 (corral-init) inside new namespaces; ``exec()`` joins
it, so many commands can run in one sandbox over time (runc's init/exec model).
``destroy()`` kills PID 1, which makes the kernel kill everything in the PID namespace,
then kills the cgroup for good measure and removes every directory the sandbox used.
Sandboxes left behind by a crashed caller are swept at the next start (``sweep()``).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import functools
import json
import os
import select
import selectors
import shutil
import signal as signal_mod
import stat as stat_mod
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import (
    cgroup_pool,
    cgroup_tuning,
    cgroups,
    contain,
    fstree,
    ids,
    namespace_pool,
    ptys,
    workspace_fs,
)
from ..errors import (
    CommandNotFound,
    CorralError,
    FailedPrecondition,
    InvalidSpec,
    NotFound,
    SandboxSetupError,
    UnsupportedHost,
)
from ..procinfo import live_start_time
from ..spec import SandboxSpec
from ..undertaker import undertaker
from ..workspace import CLONING, WRITE_CLONE
from .base import DEVNULL, PIPE, CommandClock, CompletedRun, ExitReason, SandboxLifecycle

__all__ = ["DEVNULL", "PIPE", "CompletedRun", "ExitReason", "Process", "Sandbox", "sweep",
           "sweep_for_this_process"]

#: How long a SIGKILLed command's exit waits for the cgroup to count an OOM kill.
OOM_COUNT_GRACE_S = 0.1


def runtime_base() -> str:
    """Where sandboxes keep their state files and journals (one tree per user; their shared
    root mount point and empty directory are beside it)."""
    return workspace_fs.runtime_path("sandboxes")


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether fd polls readable within timeout seconds (None: no limit). poll, not
    select: select refuses descriptors from 1024 on (FD_SETSIZE), and the ones a sandbox
    keeps are parked from 4096 on (_spawn.park_fd)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))


def _searchable(path: str) -> None:
    """Let every user search path (add x for group and others, nothing else): a sandbox's
    ids walk through it to their root mount point."""
    st = os.stat(path)
    if st.st_mode & 0o011 != 0o011:
        os.chmod(path, (st.st_mode & 0o7777) | 0o011)


def _read_small(path: str) -> bytes:
    """The whole of a small (/proc) file, without a file object's layers."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def empty_dir(base: str) -> str:
    """The empty directory every sandbox of the sandboxes directory `base` binds read-only
    over its masked /proc directories (mounts.plan's empty_dir): one beside `base`, made
    once per process (a directory per sandbox cost a mkdir on every start, 74 us on an
    ext4 /run, and a rmdir after).

    Raises:
        SandboxSetupError: it exists but is not an empty directory of this user's.
    """
    return _shared_directory(os.path.join(os.path.dirname(base), "empty"), 0o555)


def root_mount_point(base: str) -> str:
    """The directory every PID 1 of the sandboxes directory `base` mounts its root on, in
    its own mount namespace (private: no sandbox nor the host sees another's mount there):
    one beside `base`, made once per process, where a directory per sandbox cost a mkdir
    and a rmdir per start.

    Raises:
        SandboxSetupError: it exists but is not an empty directory of this user's.
    """
    return _shared_directory(os.path.join(os.path.dirname(base), "root"), 0o711)


def _shared_directory(path: str, mode: int) -> str:
    """An empty directory of this user's at path, with mode, made (or checked) once per
    process.

    Raises:
        SandboxSetupError: it exists but is not an empty directory of this user's.
    """
    if path in _SHARED_DIRS:
        return path
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if (not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or os.listdir(path)):
        raise SandboxSetupError("runtime directory", path, errno_mod.EPERM,
                                "it is not an empty directory of this user's; remove it")
    if st.st_mode & 0o7777 != mode:  # mkdir honours the umask; every sandbox reaches it
        os.chmod(path, mode)
    _SHARED_DIRS.add(path)
    return path


_SHARED_DIRS: set[str] = set()

#: Sandboxes directories this (root) process made reachable for sandboxes' ids.
_PREPARED_BASES: set[str] = set()


def _prepare_privileged_base(base: str) -> None:
    """Make the sandboxes directory `base` (mode 0711) and let every user search its
    parent (made under the daemon's umask, maybe 077): sandboxes' ids walk through both."""
    os.makedirs(base, mode=0o711, exist_ok=True)
    os.chmod(base, 0o711)
    _searchable(os.path.dirname(base))
    _PREPARED_BASES.add(base)


def _own_directory(path: str, mode: int) -> None:
    """Make path (and its parents) and check that it is a directory of ours, not a link or
    a directory someone else planted in a shared /tmp.

    Raises:
        SandboxSetupError: path exists but is not this user's directory.
    """
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SandboxSetupError("runtime directory", path, errno_mod.EPERM,
                                f"it is not a directory owned by uid {os.geteuid()}; "
                                f"remove it or set XDG_RUNTIME_DIR")
    if st.st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def _setup_error(exc: OSError, plan_ops=None, argv0: str | None = None,
                 helpers=None) -> CorralError:
    """Turn a child's report into the error a user can act on."""
    from corral.ext import _spawn

    if isinstance(exc, _spawn.SpawnError) and helpers and exc.step_name.startswith("write uid"):
        which, status = exc.detail >> 16, exc.detail & 0xFFFF
        helper = helpers[0 if which == 1 else 1]
        ran = (f"exit status {os.waitstatus_to_exitcode(status)}" if status != 0xFFFF
               else "could not be started")
        return SandboxSetupError(
            f"{os.path.basename(helper[0])} {' '.join(helper[2:])}", helper[0], exc.errno,
            f"{ran}; it printed why above. Check this user's lines in {ids.SUBUID} and "
            f"{ids.SUBGID}, or set CORRAL_ROOTLESS_IDS=single to map only your own uid")
    if isinstance(exc, _spawn.SpawnError):
        if exc.step_name == "execve" and argv0 is not None and exc.errno in (
            errno_mod.ENOENT, errno_mod.EACCES, errno_mod.ENOTDIR, errno_mod.ENOEXEC,
        ):
            return CommandNotFound(argv0, exc.errno)
        path = None
        if exc.step_name == "write /proc/sys/user limit":
            limits = contain.user_namespace_sysctls()
            path = limits[exc.detail][0] if 0 <= exc.detail < len(limits) else None
        elif plan_ops is not None and 0 <= exc.detail < len(plan_ops):
            path = plan_ops[exc.detail].target
        return SandboxSetupError(exc.step_name, path, exc.errno)
    return SandboxSetupError(exc.strerror or "spawn", getattr(exc, "filename", None),
                             exc.errno or errno_mod.EIO)


def _secret_set(spec: SandboxSpec, values):
    """The SecretSet of spec.secrets from their values, None when the spec binds none."""
    if not spec.secrets:
        return None
    from ..secrets import SecretSet

    return SecretSet(spec.secrets, values or {})


class Process(CommandClock):
    """A command running in a sandbox.

    Its parent is the sandbox's PID 1, which reaps it and reports its wait status on the
    sandbox's status pipe; `wait()` and `poll()` read that pipe (Sandbox.collect_exits).
    """

    def __init__(self, sandbox: Sandbox, pid: int, ns_pid: int, argv: list[str], stdin,
                 stdout, stderr, timeout_s: float | None, oom_before: int = 0):
        self.sandbox = sandbox
        self.pid = pid  # host pid
        self.ns_pid = ns_pid  # pid inside the sandbox
        self.argv = tuple(argv)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._start_clock(timeout_s)
        try:
            self.pidfd = os.pidfd_open(pid) if pid else -1
        except ProcessLookupError:  # it already ended; its status is on the way
            self.pidfd = -1
        # read by exec() before the command started: it may be OOM-killed at once
        self._oom_before = oom_before
        self._timed_out = False
        #: The pty master of a command run with a tty (stdin and stdout are dups of it),
        #: kept for resize() until the command ends; -1 otherwise.
        self.pty_fd = -1
        self.has_tty = False
        self._pty_lock = threading.Lock()

    def resize(self, rows: int, cols: int) -> None:
        """Set the window of the command's pty (its foreground group gets SIGWINCH).

        Raises:
            InvalidSpec: the command has no tty, or rows/cols out of range.
            CorralError: the command has ended.
        """
        ptys.check_window(rows, cols)
        with self._pty_lock:
            if not self.has_tty:
                raise InvalidSpec("tty", "the command was not started with a tty")
            if self.pty_fd < 0:
                raise CorralError(f"{self.argv[0]} has ended; its terminal is gone")
            ptys.set_window(self.pty_fd, rows, cols)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal_mod.pidfd_send_signal(self.pidfd, sig)

    def signal_group(self, sig: int) -> bool:
        """Send sig to the command's process group (it is a session leader); True if sent.

        Only through the pidfd held since the command started, never by number: once the
        command is reaped its number (and so its group id, when the group is empty) may
        name another process, anywhere on the host. PIDFD_SIGNAL_PROCESS_GROUP (Linux 6.9)
        reaches the group of the pidfd's own process, whose number cannot be reused while
        any member remains. Older kernels: the sandbox's processes of that group, each
        through its own pidfd (Sandbox.signal_where).
        """
        if self.returncode is not None or self.pidfd < 0:
            return False
        try:
            signal_mod.pidfd_send_signal(self.pidfd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
            return True
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno != errno_mod.EINVAL:
                raise
        leader = self.pid
        return self.sandbox.signal_where(sig, lambda stat: stat.pgid == leader) > 0

    def kill(self) -> None:
        """SIGKILL the command and its process group."""
        if self.returncode is None:
            with contextlib.suppress(PermissionError):
                self.signal_group(signal_mod.SIGKILL)
            self.send_signal(signal_mod.SIGKILL)

    def _finish(self, status: int | None) -> None:
        """Record how the command ended (status None: its sandbox was destroyed first)."""
        if self.returncode is not None:
            return
        if status is None:
            self.returncode = -signal_mod.SIGKILL
            self.reason = ExitReason.TIMEOUT if self._timed_out else ExitReason.SIGNALED
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            self.returncode = -sig
            if self._timed_out:
                self.reason = ExitReason.TIMEOUT
            elif sig == signal_mod.SIGKILL and self._oom_killed():
                self.reason = ExitReason.OOM
            else:
                self.reason = ExitReason.SIGNALED
        else:
            self.returncode = os.WEXITSTATUS(status)
            self.reason = ExitReason.TIMEOUT if self._timed_out else ExitReason.EXITED
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1
        with self._pty_lock:
            if self.pty_fd >= 0:
                os.close(self.pty_fd)
                self.pty_fd = -1
        if self.on_exit is not None:
            self.on_exit(self)

    def _oom_killed(self) -> bool:
        """Did the memory cgroup's OOM killer send the SIGKILL that ended us?

        The kernel signals the victim before it counts the kill, so a victim that dies and
        is reaped at once can be seen before the counter moves: give it a moment.
        """
        deadline = time.monotonic() + OOM_COUNT_GRACE_S
        while True:
            if self.sandbox._oom_kills() > self._oom_before:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.sandbox.collect_exits()
            if self.returncode is None and self.sandbox.status_fd < 0:
                self._finish(None)  # the sandbox is gone, and with it this command
        return self.returncode

    def expire(self) -> None:
        """Enforce the wall-clock limit now (the deadline has passed)."""
        self._timed_out = True
        self.kill()

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; the spec's timeout kills the command when it passes.

        Raises:
            TimeoutError: ``timeout`` (the caller's, not the spec's) passed first.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            limits = [t for t in (self.remaining(), None if end is None else end - time.monotonic())
                      if t is not None]
            if not self.sandbox.wait_exits(min(limits) if limits else None):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.expire()
                elif end is not None and time.monotonic() >= end:
                    raise TimeoutError(f"{self.argv[0]} still running after {timeout}s")
        return self.returncode

    def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        """Feed stdin, collect stdout/stderr until exit (the spec's timeout applies)."""
        out, err = bytearray(), bytearray()
        self.pump(out.extend, err.extend, input)
        return bytes(out), bytes(err)

    def pump(self, on_stdout, on_stderr, input: bytes | None = None) -> int:
        """Copy output to the callbacks as it comes, feed stdin; returns the exit code.

        Ends when the command has exited and its pipes are drained, even if a process it
        left behind still holds them open; the spec's timeout is enforced meanwhile.
        """
        sel = selectors.DefaultSelector()
        sinks = {}
        for f, sink in ((self.stdout, on_stdout), (self.stderr, on_stderr)):
            if f is not None:
                os.set_blocking(f.fileno(), False)
                sel.register(f, selectors.EVENT_READ)
                sinks[f.fileno()] = sink
        pending = memoryview(input or b"")
        if self.stdin is not None:
            if pending:
                os.set_blocking(self.stdin.fileno(), False)
                sel.register(self.stdin, selectors.EVENT_WRITE)
            else:
                self.stdin.close()
        status_fd = self.sandbox.status_fd
        if status_fd >= 0:
            sel.register(status_fd, selectors.EVENT_READ)
        expired = False
        try:
            while any(key.fileobj is not status_fd for key in sel.get_map().values()):
                if self.poll() is not None:
                    break
                remaining = None if expired else self.remaining()
                if remaining == 0:
                    self.expire()
                    expired, remaining = True, None
                for key, _ in sel.select(remaining):
                    if key.fileobj is status_fd:
                        continue  # poll() at the top of the loop reads it
                    if key.fileobj is self.stdin:
                        try:
                            n = os.write(key.fd, pending[:65536])
                            pending = pending[n:]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(self.stdin)
                            self.stdin.close()
                        continue
                    if not self._drain(key.fd, sinks[key.fd]):
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
            # exited: what is still in the pipes belongs to the output too
            for fd, sink in sinks.items():
                with contextlib.suppress(OSError, ValueError):
                    self._drain(fd, sink)
        finally:
            sel.close()
        return self.wait()

    @staticmethod
    def _drain(fd: int, sink) -> bool:
        """Read what a non-blocking pipe (or pty master) holds into sink; False at end of
        file (EIO on a pty master: every slave descriptor is closed)."""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno_mod.EIO:
                    return False
                raise
            if not chunk:
                return False
            sink(chunk)


class Sandbox(SandboxLifecycle):
    """A native Linux sandbox: create / exec / signal / destroy (also a context manager)."""

    _swept = False
    #: The live-restore state directory that is to hold this adoptable sandbox (set by the
    #: daemon before start; in state.json): a daemon that died before handing it to its
    #: holder left its PID 1 running unheld, and the next start there kills it.
    kept_by = ""

    def __init__(self, spec: SandboxSpec | None = None, *, runtime_dir: str | None = None,
                 name: str | None = None, on_net_event=None, secrets=None,
                 snapshot_store=None, changes_root: str | None = None, tenant: str = ""):
        """Args:
            secrets: values of spec.secrets by name (str or bytes), kept in memory only:
                the sandbox sees placeholders, the egress proxy puts values in
                (sandbox/secrets.py). Names the spec does not bind are ignored.
            snapshot_store: the SnapshotStore spec.snapshot is taken from (default: the
                store at sandbox/state/snapshots.default_root()).
            changes_root: where a copy-on-write workspace keeps its change set (default:
                sandbox/state/changes.default_root()).
            tenant: whose sandbox it is, recorded with its change set (the daemon's check
                when the change set outlives the sandbox).

        Raises:
            InvalidSpec: a secret the spec binds has no value (field "secrets").
        """
        self.spec = spec or SandboxSpec()
        self.id = name or "sbx-" + os.urandom(6).hex()
        cgroups.check_name(self.id)
        self.runtime_dir = os.path.join(runtime_dir or runtime_base(), self.id)
        self.state = "new"
        self.init_pid: int | None = None
        self.workspace: str | None = None
        self._own_workspace = False
        self._init_pidfd = -1
        self._cgroup: cgroups.Cgroup | None = None
        self._pooled_as: cgroups.CgroupLimits | None = None  # a pooled cgroup's class
        self._cgroup_fds: tuple[int, ...] = ()
        self._state_written = False
        # True while every process ever put in the cgroup was born in PID 1's PID namespace
        # (start()'s PID 1 and its descendants; no join since): once PID 1 is reaped
        # nothing of the sandbox is left, and destroy need not read the cgroup for
        # stragglers. A join helper is in the cgroup before it enters the namespace.
        self._born_inside = False
        self._prepared: contain.Prepared | None = None
        self._lock = threading.Lock()
        # PID 1 reports {ns pid, wait status} for every process it reaps on this pipe.
        self.status_fd = -1
        self._status_buf = b""
        self._status_lock = threading.Lock()
        self._processes: dict[int, Process] = {}  # ns pid -> running command
        self._frozen = False  # paused: its cgroup frozen (pause/resume)
        # exits reported before their Process existed: ns pid -> (report number, status)
        self._unclaimed: dict[int, tuple[int, int]] = {}
        self._reports = 0  # exit reports read so far
        #: Egress (spec.allow_net): the link and proxy registration (sandbox/net.py), and
        #: who hears of every connection attempt (a dict per attempt, proxy thread).
        self.egress = None
        self.on_net_event = on_net_event
        self.secrets = _secret_set(self.spec, secrets)
        #: This sandbox's host ids, taken from Corral's pool at start (released at destroy).
        self._ids: ids.IdRange | None = None
        # a (user, network) namespace pair made ahead, for PID 1 to join (namespace_pool)
        self._namespaces: namespace_pool.ReadyNamespaces | None = None
        #: How ids map, in words (`corral inspect`, `corral doctor`).
        self.id_mapping: str = ""
        #: What this sandbox runs without that a default one has, one line each (e.g. no
        #: cgroup limits for an unprivileged caller on a host without delegation).
        self.notes: list[str] = []
        self._rootless: ids.Rootless | None = None
        #: The image's layers, held in the store while this sandbox runs (spec.image).
        self._image = None
        #: The snapshot this sandbox starts from (spec.snapshot), held while it runs.
        self._snapshot = None
        self._snapshot_store = snapshot_store
        #: The tmpfs descriptors holding the root's and the workspace's upper layers (a
        #: snapshot copies them), -1 when there is none.
        self._root_upper_fd = -1
        self._workspace_upper_fd = -1
        self._setup_files: frozenset[str] = frozenset()
        #: The change set of a copy-on-write workspace (spec.workspace_cow).
        self.changes = None
        self._changes_root = changes_root
        self._tenant = tenant

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, first: _FirstCommand | None = None) -> None:
        """Create PID 1 with its namespaces, cgroup and filesystem view (first: the command
        PID 1 starts itself, start_running).

        Raises:
            InvalidSpec: the spec's profile or paths are unusable.
            SandboxSetupError: a kernel step failed (step, path and errno named).
        """
        if self.state != "new":
            raise CorralError(f"sandbox {self.id} is {self.state}, not new")
        if not Sandbox._swept:  # what a crashed caller left, once per process
            Sandbox._swept = True
            sweep(os.path.dirname(self.runtime_dir))
            if os.geteuid() == 0:
                ids.sweep()
        privileged = os.geteuid() == 0
        self._move("starting")
        opened: list[int] = []
        mapping = None
        try:
            id_maps = self._resolve_ids(privileged)
            # rootless: the setuid id-map helpers run while the rest is prepared
            mapping = ids.map_in_background(id_maps[2])
            if self.spec.snapshot:
                self._hold_snapshot(privileged)
            layout = _cgroup_layout().in_group(self._cgroup_group)
            missing = cgroups.delegation_problem(layout)
            if missing is not None:
                self.notes.append(cgroups.NO_DELEGATION)
            self._prepared = contain.prepare(self.spec, cgroup=missing is None)
            root = self._make_runtime_dir(privileged)
            if self.secrets is not None:
                self._prepared = self._with_secret_trust(self._prepared)
            if first is None or not first.scratch:  # a scratch one is PID 1's (mounts.plan)
                self._setup_workspace()
            if self.spec.image:
                self._hold_image(privileged)
            if missing is None:  # before the state says which cgroup is the sandbox's
                self._take_pooled_cgroup(layout)
            self._write_state()
            cgroup_fds = self._create_cgroup(layout, opened) if missing is None else ()
            detached = self._detach_binds(opened) if privileged else {}
            image_fd = self._image_root() if self._image is not None else None
            if image_fd is not None:
                opened.append(image_fd)
            self._spawn_init(root, id_maps, cgroup_fds, detached, image_fd, opened, mapping,
                             first)
            if not self.spec.die_with_parent:  # PID 1 may outlive us: say which it is
                self._write_state()
                if self._own_workspace and workspace_fs.is_managed(self.workspace):
                    workspace_fs.hand_to_init(self.id, self.init_pid)  # swept once it ends
            if self.spec.allow_net:  # before any command runs
                self._open_egress(privileged)
            self._move("running")
        except BaseException:
            self._cleanup()
            raise
        finally:
            for fd in opened:
                os.close(fd)
            if mapping is not None:
                mapping.close()

    def _make_runtime_dir(self, privileged: bool) -> str:
        """This sandbox's runtime directory; returns its root mount point (root_mount_point,
        one for every sandbox). Root's tree is traversable by the sandbox's ids, a user's is
        private."""
        base = os.path.dirname(self.runtime_dir)
        if privileged:
            if base not in _PREPARED_BASES:
                _prepare_privileged_base(base)
            try:
                os.mkdir(self.runtime_dir)
            except FileNotFoundError:  # removed since this process prepared it
                _prepare_privileged_base(base)
                os.mkdir(self.runtime_dir)
        else:
            _own_directory(os.path.dirname(base), 0o700)
            _own_directory(base, 0o700)
            os.mkdir(self.runtime_dir)
        # mode set after mkdir, which honours the umask
        os.chmod(self.runtime_dir, 0o711)
        return root_mount_point(base)

    @property
    def _cgroup_group(self) -> str:
        """Where the sandbox's cgroup is made: batch work beside corral/ (cgroups.py)."""
        return cgroups.BATCH_DIR if self.spec.batch else cgroups.CORRAL_DIR

    def _cgroup_limits(self) -> cgroups.CgroupLimits:
        return cgroups.CgroupLimits(memory_bytes=self.spec.memory_bytes,
                                    pids_max=self.spec.pids_max, cpu_quota=self.spec.cpus,
                                    cpu_weight=self.spec.cpu_weight)

    def _take_pooled_cgroup(self, layout: cgroups.CgroupLayout) -> None:
        """The sandbox's cgroup from the process's pool, if it keeps a ready one with the
        spec's limits (sandbox/cgroup_pool.py)."""
        pool = cgroup_pool.current()
        if pool is not None and pool.layout == layout:
            limits = self._cgroup_limits()
            self._cgroup = pool.take(limits)
            if self._cgroup is not None:  # its class, for giving it back (weights change)
                self._pooled_as = limits

    def _create_cgroup(self, layout: cgroups.CgroupLayout, opened: list[int]) -> tuple[int, ...]:
        """The sandbox's cgroup with the spec's limits (made now unless one was taken from
        the pool); returns the cgroup.procs descriptors PID 1 attaches itself through (also
        added to `opened`)."""
        if self._cgroup is None:
            self._cgroup = cgroups.Cgroup.create(layout, self.id, self._cgroup_limits())
        cgroup_fds = self._open_cgroup_procs()
        opened.extend(cgroup_fds)
        return cgroup_fds

    def _spawn_init(self, root: str, id_maps, cgroup_fds: tuple[int, ...],
                    detached: dict[str, int], image_fd: int | None, opened: list[int],
                    mapping=None, first: _FirstCommand | None = None) -> None:
        """Clone PID 1 into its namespaces (corral-init, run from a descriptor), with the
        status pipe it reports every exit on; mapping: the user namespace whose id-map
        helpers were started earlier (ids.map_in_background), PID 1's; first: the command
        PID 1 starts itself (its outcome goes to first.started)."""
        from corral.ext import _spawn

        uid_map, gid_map, helpers = id_maps
        init_fd = os.open(contain.init_binary(), os.O_RDONLY | os.O_CLOEXEC)
        if init_fd <= contain.INIT_STATUS_FD:
            # PID 1 installs its status pipe as descriptor 3 before it execs corral-init
            # from this one: keep them apart (a caller with only stdio open, and no
            # cgroup or bind descriptors before this, gets 3 here).
            low, init_fd = init_fd, fcntl.fcntl(init_fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(low)
        opened.append(init_fd)
        self.status_fd, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.status_fd = _spawn.park_fd(self.status_fd)  # kept: out of every spawn's cut
        opened.append(status_w)
        os.set_blocking(status_w, True)
        plan, made = contain.init_plan(
            self._prepared, root=root, workspace=self.workspace, init_fd=init_fd,
            cgroup_fds=cgroup_fds, status_fd=status_w, detached=detached,
            image_root=image_fd, empty_dir=empty_dir(os.path.dirname(self.runtime_dir)),
        )
        # what the setup makes in the root (bind-mount points, generated files), which a
        # snapshot of the root's upper layer leaves out: a fork's setup makes them again
        self._setup_files = made.setup_files
        command = self._first_plan(first) if first is not None else None
        # made ahead (namespace_pool): spawn_init closes them, whatever the outcome
        namespaces = self._namespaces.hand_over() if self._namespaces is not None else None
        try:
            with WRITE_CLONE.hold(CLONING):
                spawned = _spawn.spawn_init(
                    plan, uid_map, gid_map, contain.namespace_owner(self.spec),
                    map_helpers=helpers if mapping is None else None, user_namespace=mapping,
                    mount_ns_fd=contain.base_mount_namespace(os.path.dirname(root)),
                    command=command,
                    namespaces=namespaces)
        except OSError as exc:
            raise _setup_error(exc, made.ops(), helpers=helpers) from None
        self.init_pid, self._init_pidfd = spawned[:2]
        self._born_inside = True
        if first is not None:
            first.started = spawned[2]
        if self._ids is not None:
            self._ids.note_init(self.init_pid, self.id if self._namespaces is not None else None)

    def _first_plan(self, first: _FirstCommand):
        """The ChildPlan of the command PID 1 starts itself; no cgroup descriptors: it is
        born in PID 1's cgroup."""
        # its cgroup was made by this start, or taken from the pool, which keeps none with
        # an OOM kill on record (cgroup_pool): none has been counted in it yet
        first.oom_before = 0
        return contain.exec_plan(self._prepared, first.argv, env=first.environment,
                                 cwd=first.cwd, fds=first.fds, cgroup_fds=(), user=first.user,
                                 by_init=True)

    def _open_egress(self, privileged: bool) -> None:
        """The egress link and proxy of spec.allow_net (sandbox/net.py); an unprivileged
        caller gets the explicit proxy only, inside the sandbox's own namespace."""
        from .. import net

        self.egress = net.open_egress(self.id, self.init_pid, self.spec.allow_net,
                                      self.on_net_event, secrets=self.secrets,
                                      rootless=not privileged)
        if not privileged:
            self.notes.append(net.ROOTLESS_NOTE)

    def _with_secret_trust(self, prepared: contain.Prepared) -> contain.Prepared:
        """prepared with the sandbox's trust directory (the host's /etc/ssl/certs plus its
        CA, written in the runtime directory) bound read-only over /etc/ssl/certs.

        The bind is added past the spec's checks (/etc is Corral's to build): the spec a
        caller sees and inspects is unchanged.
        """
        import copy
        import dataclasses

        from .. import secrets as secrets_mod
        from ..spec import BindMount

        trust = os.path.join(self.runtime_dir, "trust")
        # the links' template sits above the sandboxes' directories, out of sweep()'s way
        secrets_mod.write_trust_dir(trust, self.secrets.ca.cert_pem, links_parent=(
            os.path.dirname(os.path.dirname(self.runtime_dir))))
        spec = copy.copy(prepared.spec)
        object.__setattr__(spec, "binds", (*spec.binds, BindMount(
            trust, secrets_mod.TRUST_DIR, False)))
        return dataclasses.replace(prepared, spec=spec)

    def _hold_image(self, privileged: bool) -> None:
        """Hold spec.image's layers in the store (released in _cleanup, on every path)."""
        from ..images.store import ImageStore

        if not privileged:
            raise InvalidSpec("image", "running on an image needs root for now (the layers "
                                       "are idmapped into the sandbox's id range)")
        self._image = ImageStore().hold(self.spec.image)

    @property
    def image_config(self) -> dict:
        """The image's config (its `config` object: Env, Cmd, WorkingDir...), {} without."""
        if self._image is None:
            return {}
        return self._image.rootfs.config.get("config") or {}

    def image_command(self, args: list[str]):
        """The command `docker run` would run on this sandbox's image with these args
        (sandbox/images/runconfig.py: Entrypoint/Cmd, Env, WorkingDir, User)."""
        from ..images import runconfig

        return runconfig.resolve_in(self.image_config, args, self.spec.env, self.init_pid)

    def _image_root(self) -> int:
        """The detached overlay root of spec.image (sandbox/images/overlay.py), over the
        snapshot's root layers when it starts from one; its upper's tmpfs is kept."""
        from .. import mounts
        from ..images import overlay

        line = f"0 {self.spec.uid_base} {self.spec.uid_count}\n".encode()
        userns = _userns(line, line)
        try:
            etc = {name: content for name, content in mounts.etc_files(self.spec).items()
                   if name in mounts.IMAGE_ETC_FILES}
            above = self._snapshot.root_layers if self._snapshot is not None else ()
            merged, self._root_upper_fd = overlay.image_root(
                self._image.rootfs.layers, self.spec.tmp_bytes, userns, self.spec.uid_base,
                etc, above)
            return merged
        except OSError as exc:
            raise SandboxSetupError(getattr(exc, "step", "image overlay"), self.spec.image,
                                    exc.errno, getattr(exc, "detail", "")) from None
        finally:
            os.close(userns)

    # -- filesystem state: snapshots, forks, copy-on-write workspaces (sandbox/state) -------

    def _hold_snapshot(self, privileged: bool) -> None:
        """Hold spec.snapshot (released in _cleanup); its image becomes the spec's.

        Raises:
            InvalidSpec: not root, or spec.image names another image than the snapshot's.
            SnapshotNotFound: no such snapshot in the store.
        """
        import dataclasses

        from ..state.snapshots import SnapshotStore

        if not privileged:
            raise InvalidSpec("snapshot", "starting from a snapshot needs root for now (its "
                                          "layers are idmapped into the sandbox's id range)")
        store = self._snapshot_store or SnapshotStore()
        self._snapshot = store.hold(self.spec.snapshot, self.id)
        image = self._snapshot.record.image
        if self.spec.image and self.spec.image != image:
            raise InvalidSpec("image", f"snapshot {self.spec.snapshot} is on image "
                                       f"{image or '(none: the host /usr)'!r}, not "
                                       f"{self.spec.image!r}")
        if image != self.spec.image:
            self.spec = dataclasses.replace(self.spec, image=image)

    def _setup_workspace(self) -> None:
        """/workspace: a snapshot's workspace layers under an upper layer of this
        sandbox's own, a copy-on-write overlay of the host directory, or as before (the
        spec's directory, or a capped tmpfs)."""
        if self._snapshot is not None:
            self._layered_workspace()
        elif self.spec.workspace_cow:
            self._cow_workspace()
        else:
            super()._setup_workspace()

    def _layered_workspace(self) -> None:
        """The snapshot's workspace layers (idmapped: 0 = this sandbox's root) under an
        upper layer on a capped tmpfs, attached as a Corral workspace: no copy."""
        from ..images import overlay

        line = f"0 {self.spec.uid_base} {self.spec.uid_count}\n".encode()
        userns = _userns(line, line)
        try:
            merged, self._workspace_upper_fd = overlay.layered_dir(
                self._snapshot.workspace_layers, userns, workspace_fs.max_bytes(),
                workspace_fs.max_inodes(), self.spec.uid_base, "corral-snapshot")
        except OSError as exc:
            raise SandboxSetupError(getattr(exc, "step", "workspace overlay"),
                                    self.spec.snapshot, exc.errno,
                                    getattr(exc, "detail", "")) from None
        finally:
            os.close(userns)
        self._attach_workspace(merged)

    def _attach_workspace(self, merged: int) -> None:
        """Attach a detached workspace overlay at its place (workspace_fs.create_mounted):
        a workspace of this sandbox's own, removed at destroy and by sweeps."""
        try:
            self.workspace = workspace_fs.create_mounted(self.id, merged)
        finally:
            os.close(merged)
        self._own_workspace = True

    def _cow_workspace(self) -> None:
        """The host directory (idmapped: its owner = root inside) as the lower layer of an
        overlay whose upper is this sandbox's change set, on disk, capped."""
        from ..images import overlay
        from ..state.changes import ChangeSet, default_root

        host = self.spec.workspace
        if os.geteuid() != 0:
            raise InvalidSpec("workspace_cow", "a copy-on-write workspace needs root for now")
        self.changes = ChangeSet.create(self._changes_root or default_root(), self.id, host,
                                        upper_uid=self.spec.uid_base,
                                        size_bytes=workspace_fs.max_bytes(),
                                        inodes=workspace_fs.max_inodes(), tenant=self._tenant)
        self.changes.mount()
        owner_uid, owner_gid = self.changes.owner
        userns = _userns(f"{owner_uid} {self.spec.uid_base} 1\n".encode(),
                         f"{owner_gid} {self.spec.uid_base} 1\n".encode())
        fds: list[int] = []
        try:
            lowers = overlay.idmapped_lowers([host], userns, fds)
            merged = overlay.overlay(lowers, self.changes.upper, self.changes.work,
                                     "corral-cow")
        except OSError as exc:
            raise SandboxSetupError(getattr(exc, "step", "copy-on-write overlay"), host,
                                    exc.errno, getattr(exc, "detail", "")) from None
        finally:
            os.close(userns)
            for fd in fds:
                os.close(fd)
        self._attach_workspace(merged)

    def snapshot(self, store, *, name: str = "", tenant: str = "",
                 max_bytes: int | None = None):
        """Capture this sandbox's root changes (on an image) and /workspace into store
        (sandbox/state/capture.py): frozen for the copy, running again after it (a paused
        sandbox stays paused). Returns the SnapshotRecord.

        Raises:
            CorralError: the sandbox is not running or paused.
            FailedPrecondition: it has no cgroup to freeze.
            ResourceExhausted: the state holds more than max_bytes.
        """
        from ..state.capture import StateSources, capture
        from ..state.layers import IdShift

        # under the lifecycle lock: no pause, resume or destroy while it is frozen and
        # copied (a destroy closes the upper layers' descriptors read here)
        with self._lock:
            if self.state not in ("running", "paused"):
                raise CorralError(f"sandbox {self.id} is {self.state}; cannot snapshot it")
            extra = ()
            if not self._own_workspace:  # the caller's directory: its owner is root inside
                st = os.stat(self.workspace)
                extra = ((st.st_uid, 0),)
            uppers = (self._root_upper_fd, self._workspace_upper_fd)
            sources = StateSources(
                sandbox_id=self.id, cgroup=self._cgroup, frozen_already=self._frozen,
                workspace=(f"/proc/self/fd/{uppers[1]}/upper" if uppers[1] >= 0
                           else self.workspace),
                root_upper=f"/proc/self/fd/{uppers[0]}/upper" if uppers[0] >= 0 else None,
                root_skip=self._setup_files,
                ids=IdShift(self.spec.uid_base, self.spec.uid_count, extra),
                parent=self.spec.snapshot, image=self.spec.image)
            return capture(store, sources, name=name, tenant=tenant, max_bytes=max_bytes)

    def _release_state(self) -> None:
        """Close the upper layers' descriptors, release the snapshot, and unmount the
        change set (kept for diff/apply; dropped when the start failed: nothing ran)."""
        with self._lock:  # snapshot() reads them under it
            for attr in ("_root_upper_fd", "_workspace_upper_fd"):
                fd = getattr(self, attr)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, attr, -1)
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        if self.changes is not None:
            # the start failed before anything ran: drop the change set, unless a deep
            # task's attempt holds it (it outlives this sandbox: earlier attempts' work)
            if self.init_pid is None and not self.changes.held():
                self.changes.discard()
                self.changes = None
            else:
                self.changes.unmount()

    def _resolve_ids(self, privileged: bool):
        """Fix this sandbox's host ids in its spec; returns (uid_map, gid_map, helpers).

        Root: a range of Corral's pool of its own (unless the spec names one). Anyone else:
        root inside is the caller, ids 1..N its subordinate range when it has one.
        """
        if privileged:
            if self.spec.uid_base is None:
                pool = namespace_pool.current()
                self._namespaces = pool.take() if pool is not None else None
                # the pair's range: its user namespace maps it already
                self._ids = (self._namespaces.ids if self._namespaces is not None
                             else ids.allocate(self.id))
                self.spec = self.spec.with_ids(self._ids.base, self._ids.count)
            id_map = contain.id_map(self.spec)
            self.id_mapping = (f"root inside = uid {self.spec.uid_base}, ids 0..."
                               f"{self.spec.uid_count - 1} = {self.spec.uid_base}..."
                               f"{self.spec.uid_base + self.spec.uid_count - 1} (this "
                               f"sandbox's own range)")
            return id_map, id_map, None
        mapping = ids.rootless()
        self.spec = self.spec.with_ids(mapping.uid, mapping.count)
        self.id_mapping = mapping.describe()
        self._rootless = mapping
        return mapping.uid_map(), mapping.gid_map(), mapping.helpers()

    def id_map_lines(self) -> dict[str, list[list[str]]]:
        """uid_map and gid_map as /proc shows them for this sandbox's processes."""
        if self._rootless is not None:
            return {"uid": self._rootless.lines("uid"), "gid": self._rootless.lines("gid")}
        line = [["0", str(self.spec.uid_base), str(self.spec.uid_count)]]
        return {"uid": line, "gid": line}

    def _detach_binds(self, opened: list[int]) -> dict[str, int]:
        """Clone the workspace and the user's binds here, where they can be reached, for
        the child to attach (its ids may not traverse the host directories above them).

        A directory the caller brought (--workspace, --ro, --rw, a task's workspace) is
        idmapped: the directory's owner on the host is root inside, so what the sandbox
        writes there belongs to that owner, not to an id nobody has. Only that one id is
        mapped: a file of any other host user shows as nobody and cannot be made.
        """
        from corral.ext import _spawn

        detached: dict[str, int] = {}
        namespaces: dict[tuple[int, int], int] = {}
        try:
            for source in [self.workspace, *(b.source for b in self.spec.binds)]:
                if source is None or source in detached:  # None: a scratch workspace
                    continue
                try:
                    fd = _spawn.open_tree_clone(source)
                except OSError as exc:
                    raise SandboxSetupError("open_tree", source, exc.errno) from None
                opened.append(fd)
                detached[source] = fd
                if source == self.workspace and self._own_workspace:
                    continue  # made for this sandbox, already owned by its root
                st = os.stat(source)
                owner = (st.st_uid, st.st_gid)
                writable = source == self.workspace or any(
                    b.writable for b in self.spec.binds if b.source == source)
                if (writable and self._prepared.seccomp_profile.unconfined
                        and not workspace_fs.is_managed(source)):
                    # seccomp's mode rules are what keep setuid/setgid files out (a task's
                    # workspace sits under Corral's 0700 root: no other user reaches it)
                    raise InvalidSpec("profile", (
                        f"'unconfined' has no seccomp filter, so nothing would stop the "
                        f"sandbox leaving a setuid file in {source}, owned by uid {owner[0]} "
                        f"on the host; keep the default profile (or one with its chmod, "
                        f"open and mknod mode rules) for a writable directory of yours"))
                if owner not in namespaces:
                    try:
                        namespaces[owner] = _spawn.userns_with_maps(
                            f"{owner[0]} {self.spec.uid_base} 1\n".encode(),
                            f"{owner[1]} {self.spec.uid_base} 1\n".encode())
                    except OSError as exc:
                        raise SandboxSetupError("idmap user namespace", exc.filename,
                                                exc.errno) from None
                try:
                    try:
                        _spawn.idmap_tree(fd, namespaces[owner], ATTR_NOSUID_NODEV)
                    except OSError as exc:
                        if exc.errno != errno_mod.EINVAL:
                            raise
                        # a mount inside it cannot be idmapped (a proc, a FUSE mount):
                        # the directory itself is, and what is mounted below keeps its own
                        # ids (unmapped inside: nobody's, not writable)
                        _spawn.idmap_tree(fd, namespaces[owner], ATTR_NOSUID_NODEV,
                                          recursive=False)
                except OSError as exc:
                    hint = ("its filesystem cannot be idmapped (Linux >= 5.12; tmpfs >= 6.3, "
                            "overlayfs >= 5.19; not NFS or FUSE): use a directory on ext4, "
                            "xfs, btrfs or tmpfs" if exc.errno == errno_mod.EINVAL else "")
                    raise SandboxSetupError("mount_setattr(MOUNT_ATTR_IDMAP)", source,
                                            exc.errno, hint) from None
        finally:
            for fd in namespaces.values():
                os.close(fd)
        return detached

    def _open_cgroup_procs(self) -> tuple[int, ...]:
        """The cgroup.procs files a new process attaches itself through, opened for one
        spawn: an idle sandbox holds only PID 1's pidfd and status pipe (one descriptor per
        controller, five on cgroup v1, would be held for nothing between commands)."""
        fds: list[int] = []
        if self._cgroup is None:
            return ()
        try:
            for path in self._cgroup.procs_files:
                try:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
                except OSError as exc:
                    raise SandboxSetupError("cgroup open", path, exc.errno) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return tuple(fds)

    def _write_state(self) -> None:
        state = {
            "id": self.id,
            "creator": os.getpid(),
            "init_pid": self.init_pid,
            "init_start": live_start_time(self.init_pid) if self.init_pid else None,
            # its own name, or a pooled one's (sandbox/cgroup_pool.py): what sweeps remove
            "cgroup": self._cgroup.name if self._cgroup is not None else self.id,
            # named only for batch work: a state without it is corral/'s (cgroups.recorded)
            **({"cgroup_group": self._cgroup_group}
               if self._cgroup_group != cgroups.CORRAL_DIR else {}),
            "workspace": self.workspace if self._own_workspace else None,
            # PID 1 does not die with its creator: live restore re-adopts it (adopt())
            "adoptable": not self.spec.die_with_parent,
            **({"kept_by": self.kept_by} if self.kept_by else {}),
        }
        if not self.spec.die_with_parent:  # its layers' holds, as adopt() takes them back
            from ..images import kept

            state.update(kept.state_fields(self))
        path = os.path.join(self.runtime_dir, "state.json")
        # The first state is written in place (a rename costs as much as the write on an
        # ext4 /run): a sweep that reads it half written takes the directory for one being
        # made, as it does one with no state yet. Every later one replaces it whole.
        first = self.state == "starting" and not self._state_written
        target = path if first else path + ".tmp"
        data = json.dumps(state).encode()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            if os.write(fd, data) != len(data):  # a small file: one write, or a full disk
                raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC), target)
        finally:
            os.close(fd)
        if not first:
            os.replace(target, path)
        self._state_written = True

    @classmethod
    def adopt(cls, spec: SandboxSpec, name: str, *, init_pidfd: int, status_fd: int,
              tenant: str = "", held: dict[str, list[int]] | None = None) -> Sandbox:
        """A running sandbox that a process now gone started with spec (its host ids
        fixed) and die_with_parent=False, taken over by this one (live restore: the
        descriptors come from runtime/holder.py). This object owns init_pidfd and
        status_fd from here on; new commands, signals, pause and destroy work as for a
        sandbox this process started. Commands the old process ran are not Processes
        here: their exit reports arrive as unclaimed ones (collect_exits). held: its
        layered filesystem's descriptors by group (sandbox/images/kept.py; copies are
        kept, the caller closes these).

        Raises:
            FailedPrecondition: PID 1 has ended, the runtime directory is not this
                sandbox's, or what its image, snapshot or change set needs was not kept.
        """
        import dataclasses

        # its egress and secrets are linked again by the adopter (sandbox/net.py
        # reopen_egress, secrets.SecretSet.restored): no values are had here
        sb = cls(dataclasses.replace(spec, secrets=()), name=name, tenant=tenant)
        sb.spec = spec
        try:
            with open(os.path.join(sb.runtime_dir, "state.json")) as f:
                state = json.load(f)
            with open(f"/proc/self/fdinfo/{init_pidfd}") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
        except (OSError, ValueError, StopIteration) as exc:
            raise FailedPrecondition(f"sandbox {name}: no runtime state ({exc})") from None
        if pid <= 0 or pid != state.get("init_pid") or _readable(init_pidfd, 0):
            raise FailedPrecondition(f"sandbox {name}: its PID 1 has ended")
        sb.init_pid, sb._init_pidfd, sb.status_fd = pid, init_pidfd, status_fd
        layout = _cgroup_layout()
        delegated = cgroups.delegation_problem(layout) is None
        sb._prepared = contain.prepare(spec, cgroup=delegated)
        if delegated:
            sb._cgroup = cgroups.recorded(layout, state, name)
        if os.geteuid() == 0:  # its range of the pool, released at destroy
            slot = os.path.join(ids.state_dir(), str(spec.uid_base))
            if os.path.exists(slot):
                sb._ids = ids.IdRange(spec.uid_base, spec.uid_count, slot)
        sb.kept_by = str(state.get("kept_by") or "")
        sb.workspace = state.get("workspace") or spec.workspace
        sb._own_workspace = bool(state.get("workspace"))
        if sb._own_workspace and workspace_fs.is_managed(sb.workspace):
            workspace_fs.hand_to_init(name, pid)  # sweeps keep it while PID 1 runs
        from ..images import kept

        kept.readopt(sb, state, held or {})
        sb.state = "running"
        sb._write_state()  # this process is its creator now (sweep leaves it alone)
        return sb

    def adopt_command(self, pid: int, ns_pid: int, argv: list[str],
                      timeout_s: float | None = None, pty_fd: int = -1) -> Process:
        """A command that the process that started this sandbox ran, as a Process of this
        one (live restore): its exit report, read already or still to come, ends it.

        Args:
            pid: its host pid, 0 when it is gone or its number may name another process.
            timeout_s: what is left of its wall-clock limit; None: none.
            pty_fd: its pty master, owned by the Process from here on (resize()); -1: none.
        """
        proc = Process(self, pid, ns_pid, list(argv), None, None, None, timeout_s=timeout_s)
        proc.pty_fd, proc.has_tty = pty_fd, pty_fd >= 0
        self._track(proc, 0)  # every report this object read came after its start
        return proc

    @property
    def seccomp_digest(self) -> str:
        return self._prepared.seccomp_profile.digest

    def _cleanup(self, *, remove_later: bool = False) -> None:
        """Kill every process of the sandbox and remove everything it used (its empty
        cgroup, run directory, own workspace and id range in the background with
        remove_later, once no process of it is left)."""
        if self._frozen:
            # a paused sandbox: SIGKILL every process while frozen, then thaw (what
            # Cgroup.kill does), so none runs another instruction; PID 1 frozen would
            # never die of the SIGKILL below, nor be reaped
            with contextlib.suppress(SandboxSetupError):
                self._cgroup.kill()
            self._frozen = False
        # SIGKILL to PID 1 makes the kernel kill every process of the PID namespace (PID 1
        # reaps them), and PID 1's exit completes only after they are all gone: once it is
        # reaped, the cgroup normally holds nothing and its kill below is a cheap check.
        if self._init_pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal_mod.pidfd_send_signal(self._init_pidfd, signal_mod.SIGKILL)
        reaped = False
        if self.init_pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, 0)
                reaped = True
        # every process born in its PID namespace is gone with a reaped PID 1
        nothing_left = reaped and self._born_inside
        if self.status_fd >= 0:
            self.collect_exits()  # what PID 1 reported before it died
            with self._status_lock:
                if self.status_fd >= 0:
                    os.close(self.status_fd)
                    self.status_fd = -1
        for proc in list(self._processes.values()):
            proc._finish(None)
        self._processes.clear()
        if self.egress is not None:  # its connections are reported, then the link goes
            self.egress.close()
            self.egress = None
        if self._init_pidfd >= 0:
            os.close(self._init_pidfd)
            self._init_pidfd = -1
        if self._namespaces is not None:  # a start that failed before PID 1's clone
            self._namespaces.close()
            self._namespaces = None
        for fd in self._cgroup_fds:
            os.close(fd)
        self._cgroup_fds = ()
        # What is removed is claimed by one caller: a second destroy cleans up alongside
        # (base.destroy), and two removals of one pooled cgroup would give it back twice
        # (two sandboxes in one cgroup, the second's processes killed by the first's next
        # removal) and release the id range twice (two sandboxes with one range).
        with self._lock:
            claim = (self._cgroup, self._ids, self._pooled_as, self._own_workspace)
            self._cgroup = self._ids = self._pooled_as = None
            self._own_workspace = False
        cgroup, ids_range, pooled_as, own_workspace = claim
        # in the background only what is directories by now: a process left in the cgroup
        # (one outside the PID namespace) is killed by Cgroup.destroy before this returns.
        # Not a copy-on-write workspace: its overlay holds the change set's image mounted,
        # and a diff or the next sandbox on it mounts that image as soon as this returns
        later = (remove_later and (cgroup is None or nothing_left or not cgroup.pids())
                 and self.changes is None)
        removal = self._removal(cgroup, pooled_as, own_workspace)
        if not later:
            try:
                removal()
            except BaseException:  # given back, so that a second destroy tries again
                with self._lock:
                    (self._cgroup, self._ids, self._pooled_as,
                     self._own_workspace) = claim
                raise
        if self._image is not None:  # after PID 1 (and with it the overlay) is gone
            self._image.close()
            self._image = None
        self._release_state()
        if later:
            undertaker.bury(lambda: (removal(), ids_range and ids_range.release()))
        elif ids_range is not None:  # nothing of the sandbox is left to own these ids
            ids_range.release()
        self._settle_destroyed()

    def _removal(self, cgroup: cgroups.Cgroup | None, limits: cgroups.CgroupLimits | None,
                 own_workspace: bool) -> Callable[[], None]:
        """Removes what is left of a sandbox whose PID 1 is reaped: its cgroup (killing
        anything still in it; one of this process's pool, `limits` its class, goes back
        to it), own workspace and run directory."""
        runtime_dir = self.runtime_dir
        workspace = self.workspace if own_workspace else None
        pool = cgroup_pool.current()

        def remove() -> None:
            # one of this process's pool goes back to it (sandbox/cgroup_pool.py) once
            # nothing is left in it, after the files whose pages it was charged for
            reuse = (cgroup is not None and limits is not None and pool is not None
                     and pool.owns(cgroup.name) and not cgroup.pids())
            if cgroup is not None and not reuse:
                cgroup.destroy()
            if workspace:
                workspace_fs.remove(workspace)
            _remove_tree(runtime_dir)
            if reuse:  # its renewal is the undertaker's, off a Destroy's path too
                undertaker.bury(lambda: pool.give_back(cgroup, limits))

        return remove

    # -- exits reported by PID 1 ----------------------------------------------------------

    def collect_exits(self) -> int:
        """Read PID 1's exit reports without blocking; returns how many commands ended."""
        ended = []
        with self._status_lock:
            if self.status_fd < 0:
                return 0
            data = self._status_buf
            init_gone = False
            while True:
                try:
                    chunk = os.read(self.status_fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    init_gone = True  # PID 1 died: nothing will ever be reported again
                    break
                data += chunk
            whole = len(data) - len(data) % 8
            self._status_buf = data[whole:]
            for off in range(0, whole, 8):
                ns_pid, status = struct.unpack_from("=ii", data, off)
                self._reports += 1
                proc = self._processes.pop(ns_pid, None)
                if proc is not None:
                    ended.append((proc, status))
                else:
                    self._unclaimed[ns_pid] = (self._reports, status)
                    if len(self._unclaimed) > 65536:  # orphans nobody asks about
                        self._unclaimed.pop(next(iter(self._unclaimed)))
            if init_gone:
                ended += [(proc, None) for proc in self._processes.values()]
                self._processes.clear()
                os.close(self.status_fd)
                self.status_fd = -1
        for proc, status in ended:
            proc._finish(status)
        return len(ended)

    def wait_exits(self, timeout: float | None) -> bool:
        """Block until PID 1 reports something (or timeout); True when a report arrived."""
        fd = self.status_fd
        if fd < 0:
            return True  # nothing more will come: poll() settles every process now
        return _readable(fd, timeout)

    def _host_pid(self, ns_pid: int) -> int:
        """The host pid of PID 1's child ns_pid, 0 when it already ended."""
        try:
            children = _read_small(
                f"/proc/{self.init_pid}/task/{self.init_pid}/children").split()
        except OSError:
            return 0
        for pid in children:
            try:
                status = _read_small(f"/proc/{int(pid)}/status")
                for line in status.split(b"\n"):
                    if line.startswith(b"NSpid:"):
                        if int(line.split()[-1]) == ns_pid:
                            return int(pid)
                        break
            except (OSError, ValueError):
                continue
        return 0

    def _track(self, proc: Process, after_report: int) -> None:
        """Start watching for proc's exit report.

        A report for its pid that was read before the command started belongs to an
        earlier process with the same pid (an orphan PID 1 reaped), never to this one.
        """
        with self._status_lock:
            status = None
            early = self._unclaimed.pop(proc.ns_pid, None)
            if early is not None and early[0] > after_report:
                status = early[1]
            if status is None:
                self._processes[proc.ns_pid] = proc
        if status is not None:
            proc._finish(status)

    # -- commands -------------------------------------------------------------------------

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str = "/workspace", stdin: int | None = PIPE, stdout: int | None = PIPE,
             stderr: int | None = PIPE, pass_fds: dict[int, int] | None = None,
             timeout_s: float | None = None, tty: tuple[int, int] | None = None,
             user: tuple[int, int] | None = None) -> Process:
        """Run argv inside the sandbox; returns the running Process.

        Args:
            env: extra variables on top of the spec's environment.
            stdin, stdout, stderr: PIPE, DEVNULL, an open descriptor, or None (DEVNULL).
            tty: (rows, cols): run the command on a new pty of the sandbox's own devpts
                (its stdin, stdout, stderr and controlling terminal; stdin/stdout/stderr
                are ignored). Process.stdin and .stdout are the master, .stderr is None,
                and Process.resize() changes the window.
            pass_fds: {descriptor number inside: open descriptor here}, e.g. the
                protocol's CORRAL_EVENTS_FD.
            timeout_s: wall-clock limit, defaults to the spec's.
            user: (uid, gid) inside to run as (no supplementary groups); None: root.

        Raises:
            CommandNotFound: argv[0] does not exist or cannot be executed in the sandbox.
            SandboxSetupError: joining the sandbox failed.
        """
        if self.state != "running":
            raise CorralError(f"sandbox {self.id} is {self.state}; cannot exec")
        return self._command(
            argv, (stdin, stdout, stderr), tty, pass_fds, timeout_s,
            lambda fds, ours: self._join(argv, self._command_environment(env), cwd, fds, tty,
                                         user, ours))

    def start_running(self, argv: list[str], *, env: dict[str, str] | None = None,
                      cwd: str = "/workspace", stdin: int | None = PIPE,
                      stdout: int | None = PIPE, stderr: int | None = PIPE,
                      pass_fds: dict[int, int] | None = None, timeout_s: float | None = None,
                      tty: tuple[int, int] | None = None,
                      user: tuple[int, int] | None = None,
                      scratch_workspace: bool = False) -> Process:
        """Start the sandbox with argv as its first command (exec()'s arguments), which
        PID 1 starts itself: no join helper, setns or relay (contain.py). Returns the
        running Process; exec() runs more commands in the sandbox as usual.

        With egress (spec.allow_net: its proxy is up before any command runs) or a tty (a
        pty of the running sandbox's devpts) the sandbox starts, then the command joins.

        scratch_workspace: when the spec names no workspace (nor a snapshot or a
        copy-on-write one) and workspaces are tmpfs, /workspace is a tmpfs of the same caps
        that PID 1 mounts itself: nothing of it exists on the host (self.workspace stays
        None: no file API), and it is gone with the sandbox. For run(), whose workspace
        nobody else sees.

        Raises:
            as start() and exec(). A command that could not be started (CommandNotFound)
            leaves the sandbox running, as a failed exec() does: destroy it.
        """
        if self.spec.allow_net or tty is not None:
            self.start()
            return self.exec(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                             stderr=stderr, pass_fds=pass_fds, timeout_s=timeout_s, tty=tty,
                             user=user)
        scratch = scratch_workspace and not (
            self.spec.workspace or self.spec.snapshot or self.spec.workspace_cow
        ) and workspace_fs.kind() == "tmpfs"
        return self._command(
            argv, (stdin, stdout, stderr), None, pass_fds, timeout_s,
            lambda fds, ours: self._start_first(argv, env, cwd, fds, user, scratch))

    def _start_first(self, argv: list[str], env: dict[str, str] | None, cwd: str,
                     fds: list[tuple[int, int]], user: tuple[int, int] | None,
                     scratch: bool) -> tuple[int, int, int]:
        """start() with argv as the command PID 1 starts itself; returns what _join does.

        Raises:
            CommandNotFound, SandboxSetupError: the command failed a step (the sandbox
                stays running).
        """
        first = _FirstCommand(list(argv), self._command_environment(env), cwd, fds, user,
                              scratch)
        self.start(first=first)
        if isinstance(first.started, OSError):
            raise _setup_error(first.started, argv0=argv[0])
        return first.started, 0, first.oom_before

    def _command(self, argv: list[str], how: tuple, tty: tuple[int, int] | None,
                 pass_fds: dict[int, int] | None, timeout_s: float | None, spawn) -> Process:
        """The Process of argv with the stdio `how` asks for, started by spawn(fds, ours)
        -> (its pid inside, exit reports read before it started, OOM kills counted then).
        """
        if not argv:
            raise InvalidSpec("argv", "the command is empty")
        # descriptors this call opened and must close; the parent's ends of stdin, stdout,
        # stderr and the pty master, closed too unless the command starts
        ours: list[int] = []
        parent_ends: list[int | None] = [None, None, None, None]
        try:
            fds = self._command_stdio(how, tty, ours, parent_ends)
            fds += [(parent_fd, child_fd) for child_fd, parent_fd in (pass_fds or {}).items()]
            ns_pid, after_report, oom_before = spawn(fds, ours)
        except BaseException:
            for fd in parent_ends:
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in ours:
                os.close(fd)
        files = [
            os.fdopen(fd, "wb" if i == 0 else "rb", buffering=0) if fd is not None else None
            for i, fd in enumerate(parent_ends[:3])
        ]
        proc = Process(self, self._host_pid(ns_pid), ns_pid, list(argv), *files,
                       timeout_s=timeout_s if timeout_s is not None else self.spec.timeout_s,
                       oom_before=oom_before)
        master = parent_ends[3]
        proc.pty_fd, proc.has_tty = (master, True) if master is not None else (-1, False)
        self._track(proc, after_report)
        return proc

    def _command_environment(self, env: dict[str, str] | None) -> list[str]:
        """The spec's environment with the command's own variables over it."""
        environment = self.spec.environment()
        if self.secrets is not None:  # placeholders and the CA's trust, never values
            environment += [f"{k}={v}" for k, v in self.secrets.environment().items()]
        if env:
            for key, value in env.items():
                environment = [e for e in environment if not e.startswith(key + "=")]
                environment.append(f"{key}={value}")
        return environment

    def _command_stdio(self, how: tuple, tty: tuple[int, int] | None, ours: list[int],
                       parent_ends: list[int | None]) -> list[tuple[int, int]]:
        """The command's descriptors 0-2 as (descriptor here, number inside) pairs: pipes
        (PIPE), /dev/null (None, DEVNULL), the caller's, or a new pty's slave (tty).
        Fills parent_ends (stdin, stdout, stderr, pty master) with the ends kept here."""
        if tty is not None:
            master, slave = ptys.open_in_root(
                f"/proc/{self.init_pid}/root", *tty,
                owner=self.spec.uid_base if os.geteuid() == 0 else None)
            parent_ends[3] = master
            ours.append(slave)
            parent_ends[0] = os.dup(master)  # (os.dup: close-on-exec)
            parent_ends[1] = os.dup(master)
            how = (slave, slave, slave)
        fds = []
        for child_fd, what in enumerate(how):
            if what == PIPE:
                r, w = os.pipe2(os.O_CLOEXEC)
                mine, theirs = (w, r) if child_fd == 0 else (r, w)
                parent_ends[child_fd] = mine
                ours.append(theirs)
                fds.append((theirs, child_fd))
            elif what is None or what == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                ours.append(fd)
                fds.append((fd, child_fd))
            else:
                fds.append((what, child_fd))
        return fds

    def _join(self, argv: list[str], environment: list[str], cwd: str,
              fds: list[tuple[int, int]], tty: tuple[int, int] | None,
              user: tuple[int, int] | None, ours: list[int]) -> tuple[int, int, int]:
        """Spawn the command into the sandbox's namespaces and cgroup; returns its pid
        inside, the exit reports read before it started, and the OOM kills counted then.

        Raises:
            CommandNotFound, SandboxSetupError: the spawn failed (_setup_error).
        """
        from corral.ext import _spawn

        self._born_inside = False  # its helper joins the cgroup from outside the namespace
        cgroup_fds = self._open_cgroup_procs()
        ours.extend(cgroup_fds)
        plan = contain.exec_plan(
            self._prepared, list(argv), env=environment, cwd=cwd, fds=fds,
            cgroup_fds=cgroup_fds, ctty=tty is not None, user=user,
        )
        self.collect_exits()  # every report read from here on came after the start
        with self._status_lock:
            after_report = self._reports
        oom_before = self._oom_kills()
        try:
            with WRITE_CLONE.hold(CLONING):
                ns_pid = _spawn.spawn_join(plan, self._init_pidfd)
        except OSError as exc:
            raise _setup_error(exc, argv0=argv[0]) from None
        return ns_pid, after_report, oom_before

    def signal(self, sig: int) -> int:
        """Send sig to every process of the sandbox but PID 1; returns how many got it."""
        return self.signal_where(sig, lambda stat: True)

    def signal_where(self, sig: int, select) -> int:
        """Send sig to each process of the sandbox but PID 1 whose `_ProcStat` passes
        select; returns how many got it.

        Never by number: each pid listed in the cgroup is opened as a pidfd first, then
        checked to be in this sandbox's cgroup (its /proc cgroup line is PID 1's) and still
        alive, so a number reused by a process elsewhere between the listing and the
        signal is never hit. One descriptor at a time.
        """
        if self.init_pid is None:
            return 0
        # Membership test: the sandbox's cgroup, or without one (an unprivileged caller
        # on a host with no delegation) its PID namespace.
        probe = "cgroup" if self._cgroup is not None else "ns/pid"
        try:
            ours = _membership(self.init_pid, probe)
        except OSError:
            return 0
        sent = 0
        for pid in self.pids():
            if pid == self.init_pid:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already
                continue
            try:
                same = _membership(pid, probe) == ours
                stat = _ProcStat.read(pid)
                # alive now => the /proc files read above were this pidfd's process
                signal_mod.pidfd_send_signal(fd, 0)
                if same and select(stat):
                    signal_mod.pidfd_send_signal(fd, sig)
                    sent += 1
            except (OSError, ValueError):
                pass
            finally:
                os.close(fd)
        return sent

    def init_exited(self) -> bool:
        """Whether PID 1 has ended (its pidfd polls readable), e.g. killed from outside
        while the sandbox sat idle; a sandbox not started yet has not."""
        if self._init_pidfd < 0:
            return False
        return _readable(self._init_pidfd, 0)

    def pids(self) -> list[int]:
        """Host pids of every process in the sandbox's cgroup (without a cgroup: in its
        PID namespace)."""
        if self._cgroup is not None:
            return self._cgroup.pids()
        if self.init_pid is None:
            return []
        try:
            ours = _membership(self.init_pid, "ns/pid")
        except OSError:
            return []
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if _membership(int(name), "ns/pid") == ours:
                        found.append(int(name))
        return found

    def stats(self) -> dict:
        return self._cgroup.stats() if self._cgroup is not None else {}

    def _freeze(self) -> None:
        """The cgroup freezer (v1 freezer.state, v2 cgroup.freeze); thawed again when the
        kernel does not report it frozen in time, so a failed pause leaves it running."""
        if self._cgroup is None:
            raise UnsupportedHost(
                "pause needs the sandbox's own cgroup (its freezer), and this sandbox has "
                "none: an unprivileged caller on a host with no delegated cgroup v2 subtree")
        try:
            self._cgroup.freeze()
        except BaseException:
            with contextlib.suppress(Exception):
                self._cgroup.thaw()
            raise
        self._frozen = True

    def _thaw(self) -> None:
        self._cgroup.thaw()
        self._frozen = False

    def _apply_cpu_weight(self, weight: int | None) -> bool:
        if self._cgroup is None:
            return False
        self._cgroup.set_cpu_weight(weight)
        return True

    def _running_processes(self) -> list[Process]:
        with self._status_lock:
            return list(self._processes.values())

    def _oom_kills(self) -> int:
        if self._cgroup is None:
            return 0
        with contextlib.suppress(OSError):
            return self._cgroup.oom_kills()
        return 0


#: pidfd_send_signal flag: signal the process group of the pidfd's process (Linux 6.9).
PIDFD_SIGNAL_PROCESS_GROUP = 4
#: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, set together with an idmap.
ATTR_NOSUID_NODEV = 0x2 | 0x4


@dataclass
class _FirstCommand:
    """The one command a sandbox's PID 1 starts itself (Sandbox.start_running)."""

    argv: list[str]
    environment: list[str]
    cwd: str
    fds: list[tuple[int, int]]
    user: tuple[int, int] | None
    #: /workspace is a tmpfs PID 1 mounts (start_running scratch_workspace)
    scratch: bool = False
    #: after the start: its pid inside the sandbox, or the OSError its spawn failed with
    started: int | OSError | None = None
    #: the cgroup's OOM kills counted before it ran
    oom_before: int = 0


@dataclass(frozen=True)
class _ProcStat:
    """The fields of /proc/PID/stat a signal selection needs."""

    pgid: int

    @classmethod
    def read(cls, pid: int) -> _ProcStat:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "
        return cls(pgid=int(fields[2]))


def _membership(pid: int, what: str) -> bytes:
    """What makes pid part of a sandbox: its /proc cgroup file, or its PID namespace."""
    if what == "ns/pid":
        return os.readlink(f"/proc/{pid}/ns/pid").encode()
    with open(f"/proc/{pid}/cgroup", "rb") as f:
        return f.read()


def _userns(uid_map: bytes, gid_map: bytes) -> int:
    """A user namespace with these maps, for an idmapped mount; its descriptor.

    Raises:
        SandboxSetupError: it could not be made.
    """
    from corral.ext import _spawn

    try:
        return _spawn.userns_with_maps(uid_map, gid_map)
    except OSError as exc:
        raise SandboxSetupError("idmap user namespace", exc.filename, exc.errno) from None


def _remove_tree(path: str) -> None:
    """Remove a directory we created; the common cases (empty, or our own state file and
    the two directories _make_runtime_dir makes) fast, without a tree walk."""
    for name in ("state.json", "root", "empty"):  # "empty": made per sandbox before
        with contextlib.suppress(OSError):
            target = os.path.join(path, name)
            os.unlink(target) if name == "state.json" else os.rmdir(target)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


@functools.cache
def _cgroup_layout() -> cgroups.CgroupLayout:
    """The host's cgroup layout, detected once per process; cgroup moves made cheap first
    (sandbox/cgroup_tuning.py: no RCU grace period per attach)."""
    cgroup_tuning.ensure()
    return cgroups.detect()


def _thaw_abandoned(state: dict, name: str) -> None:
    """Thaw the cgroup of a sandbox whose creator died while it was frozen (a pause, a
    snapshot's capture): PID 1's PR_SET_PDEATHSIG SIGKILL waits for the thaw, and a frozen
    sandbox would otherwise outlive its creator for good. The next sweep removes it."""
    with contextlib.suppress(CorralError, OSError):
        cgroups.recorded(_cgroup_layout(), state, name).thaw()


def sweep_for_this_process() -> list[str]:
    """sweep() of the default base and the id pool's sweep, standing for those this
    process's first start would make (a daemon sweeps as it starts: a sweep inside a
    caller's Create could fail it for a sandbox that is not theirs)."""
    removed = sweep()
    if os.geteuid() == 0:  # the id ranges of dead owners (sandboxes, a namespace pool's)
        ids.sweep()
    Sandbox._swept = True
    return removed


def sweep(base: str | None = None) -> list[str]:
    """Remove what sandboxes of dead callers left behind; returns the ids removed.

    A sandbox whose creator crashed dies with it (PR_SET_PDEATHSIG on PID 1), but its
    directories, cgroup and temporary workspace stay until someone removes them. One made
    with die_with_parent=False ("adoptable", live restore) is kept while its PID 1 lives.
    """
    base = base or runtime_base()
    removed = []
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        names = []
    layout = None
    for name in names:
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, "state.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
        if state is not None:
            creator_alive = os.path.exists(f"/proc/{state.get('creator')}")
            # a zombie PID 1 (killed, its reaper not done yet) is dead: its sandbox is swept
            init_alive = state.get("init_pid") and live_start_time(state["init_pid"]) == state.get(
                "init_start")
            if init_alive and not creator_alive and not state.get("adoptable"):
                _thaw_abandoned(state, name)
            if creator_alive or init_alive:
                continue
        else:
            try:
                if time.time() - os.stat(path).st_mtime < 60:
                    continue  # being created right now
            except FileNotFoundError:
                continue  # someone else removed it meanwhile
        if layout is None:
            layout = _cgroup_layout()
        try:
            cgroups.recorded(layout, state, name).destroy()
        except NotFound:
            pass  # never made, or already gone
        except (CorralError, OSError):
            # still busy (a crash's many PID 1s are still dying): keep its state so the
            # next sweep finds it again, rather than leaving a cgroup no one can name
            continue
        if state and state.get("workspace"):
            if workspace_fs.is_managed(state["workspace"]):
                workspace_fs.remove(state["workspace"])
            else:  # a /tmp workspace of an older version
                fstree.remove_tree(state["workspace"], ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    # the idle pooled cgroups of gone processes (not sandboxes: not in what it returns)
    with contextlib.suppress(CorralError, OSError):
        cgroup_pool.sweep(layout or _cgroup_layout())
    return removed
