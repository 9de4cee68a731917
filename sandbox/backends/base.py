"""The backend contract: what every backend's sandbox offers, its lifecycle table, and the
one place a spec's backend is chosen (``new_sandbox``).

A backend's sandbox is made unstarted (``new_sandbox``), started once, used (``exec``,
``signal``, ``pids``, ``stats``, ``collect_exits`` when ``status_fd`` is readable), perhaps
paused and resumed (frozen in place: no CPU, nothing runs, nothing starts), and destroyed
(idempotent).
Its state moves only along ``TRANSITIONS``. Callers never look inside a backend: what the
daemon records of one (``policy_digest()``) is part of the contract.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Self

from .. import workspace_fs
from ..errors import FailedPrecondition, InvalidTransition
from ..exit_status import shell_status
from ..spec import SandboxSpec

#: exec() stdio: a new pipe whose other end the Process holds (like subprocess.PIPE).
PIPE = -1
#: exec() stdio: /dev/null.
DEVNULL = -3

#: The lifecycle: from each state, the states a sandbox may move to. "starting" and
#: "destroying" are the (blocking) work between; a failed start cleans up to "destroyed",
#: and a destroy may come while another thread starts it (that start then fails).
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"starting", "destroyed"}),
    "starting": frozenset({"running", "destroying", "destroyed"}),
    "running": frozenset({"paused", "destroying"}),
    "paused": frozenset({"running", "destroying"}),
    "destroying": frozenset({"destroyed"}),
    "destroyed": frozenset(),
}


class ExitReason(enum.StrEnum):
    """Why a command ended."""

    EXITED = "exited"
    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    OOM = "oom"
    #: Its daemon stopped or died and took its stdio along (a docker sandbox's command
    #: across a live restore: sandbox/backends/docker/sandbox.py adopt_command).
    DAEMON_SHUTDOWN = "daemon-shutdown"


class CommandClock:
    """What every backend's Process keeps of its command's run: when it started, its
    deadline (moved on at a resume, SandboxLifecycle), and how it ended once it has."""

    def _start_clock(self, timeout_s: float | None) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s if timeout_s else None
        self.returncode: int | None = None
        self.reason: ExitReason | None = None
        #: Called (with this Process) once it has ended, from whichever thread noticed.
        self.on_exit = None


@dataclass(frozen=True)
class CompletedRun:
    """Outcome of ``run()``: like subprocess.CompletedProcess, plus why it ended."""

    argv: tuple[str, ...]
    returncode: int  # exit code, or -N when killed by signal N
    stdout: bytes
    stderr: bytes
    reason: ExitReason
    duration_s: float

    @property
    def exit_status(self) -> int:
        """Shell convention: the exit code, or 128+N when killed by signal N."""
        return shell_status(self.returncode)


#: Who hears of sandboxes a backend's sweep removed (their creator died): called as
#: fn(backend, sandbox_ids, where) from whatever thread swept. The daemon records each as
#: `sandbox.reaped`; a sweep with no listener (a `corral run` process) tells nobody.
SWEPT_LISTENERS: list = []


def report_swept(backend: str, sandbox_ids: list[str], where: str = "") -> None:
    """Tell SWEPT_LISTENERS that a sweep removed sandbox_ids (where: the engine's URL, or
    "" for the default one). A listener that fails is logged and the others still run: a
    sweep is cleanup and never fails over its report."""
    if not sandbox_ids:
        return
    for listener in list(SWEPT_LISTENERS):
        try:
            listener(backend, list(sandbox_ids), where)
        except Exception:  # noqa: BLE001 - see the docstring
            logging.getLogger("corral.sandbox").exception("reporting swept sandboxes")


def policy_digest(spec: SandboxSpec, seccomp_digest: str) -> str:
    """sha256 of the canonical policy a sandbox runs under (spec + seccomp profile)."""
    fields = {k: v for k, v in spec.__dict__.items() if k not in ("workspace", "labels")}
    if not spec.image:  # digests of sandboxes on the host's /usr stay what they were
        del fields["image"]
    if spec.cpu_weight is None:  # named only when set: older digests stay what they were
        del fields["cpu_weight"]
    for name in ("snapshot", "workspace_cow", "batch"):  # named only when used
        if not fields.get(name, True):
            del fields[name]
    fields["seccomp_digest"] = seccomp_digest
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class SandboxLifecycle:
    """What every backend's sandbox is: `create()` = construct + `start()`; `with` starts
    a new sandbox and destroys it on exit.

    Subclasses set ``spec``, ``id``, ``state`` ("new"), ``status_fd`` (-1 until started),
    ``init_pid`` and a ``_lock``, and provide the verbs below and ``_cleanup()`` (remove
    everything the sandbox used, whatever step its start reached, then
    ``_settle_destroyed()``).
    """

    spec: SandboxSpec
    id: str
    state: str
    #: The host directory at /workspace (set by _setup_workspace during start).
    workspace: str | None
    #: Readable when commands ended: call collect_exits() (-1: none, e.g. not started).
    status_fd: int
    init_pid: int | None
    #: time.monotonic() of the last pause (meaningful while state is "paused").
    _paused_at: float = 0.0

    @classmethod
    def create(cls, spec=None, **kwargs) -> Self:
        sandbox = cls(spec, **kwargs)
        sandbox.start()
        return sandbox

    def __enter__(self) -> Self:
        if self.state == "new":
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _move(self, to: str) -> None:
        """Take the next lifecycle step.

        Raises:
            InvalidTransition: TRANSITIONS has no move from the current state to `to`.
        """
        if to not in TRANSITIONS[self.state]:
            raise InvalidTransition(self.state, to)
        self.state = to

    def start(self) -> None:
        """Make the sandbox (blocking): new -> running, or destroyed and raising."""
        raise NotImplementedError

    def destroy(self, *, remove_later: bool = False) -> None:
        """End every process of the sandbox and remove what it used. Idempotent.

        remove_later: return once every process is dead, and leave the removal of what is
        then only directories (its cgroup, run directory, own workspace) to a background
        thread (sandbox/undertaker.py; the native backend's one-shot `run()` does)."""
        while True:
            with self._lock:
                if self.state == "destroyed":
                    return
                if self.state == "new":
                    self._move("destroyed")
                    return
                if self.state != "destroying":
                    self._move("destroying")
                # one clean-up at a time: two alongside closed the same descriptors and
                # disposed of the same cgroup and id range twice. A second caller waits for
                # the first's, and runs its own only when that one failed.
                running = getattr(self, "_cleaning", None)
                if running is None:
                    running = self._cleaning = threading.Event()
                    self._cleaner = threading.get_ident()
                    break
                if self._cleaner == threading.get_ident():
                    return  # called from its own clean-up (a callback): that one goes on
            running.wait()
        try:
            self._cleanup(remove_later=remove_later)
        finally:
            with self._lock:
                self._cleaning = None
            running.set()

    def _cleanup(self, *, remove_later: bool = False) -> None:
        raise NotImplementedError

    def pause(self) -> bool:
        """Freeze every process of the sandbox in place: running -> paused.

        Returns False when it was already paused (nothing done).

        Raises:
            InvalidTransition: it is not running (new, destroying or destroyed).
            UnsupportedHost: this sandbox cannot be frozen (rootless, with no cgroup).
            SandboxSetupError: the freeze failed or timed out (the sandbox is thawed and
                stays running).
        """
        with self._lock:
            if self.state == "paused":
                return False
            if "paused" not in TRANSITIONS[self.state]:
                raise InvalidTransition(self.state, "paused")
            self._freeze()
            self._paused_at = time.monotonic()
            self._move("paused")
        return True

    def resume(self) -> float:
        """Thaw a paused sandbox: paused -> running. Its commands' wall-clock limits are
        moved on by the time spent paused (a pause never times a command out).

        Returns the seconds it was paused (0.0 when it was running already).

        Raises:
            InvalidTransition: it is neither paused nor running.
            SandboxSetupError: the thaw failed (the sandbox stays paused).
        """
        with self._lock:
            if self.state == "running":
                return 0.0
            if self.state != "paused":
                raise InvalidTransition(self.state, "running")
            self._thaw()
            paused_for = time.monotonic() - self._paused_at
            self._move("running")
        for process in self._running_processes():
            if process.deadline is not None:
                process.deadline += paused_for
        return paused_for

    def set_cpu_weight(self, weight: int | None) -> bool:
        """Change the live sandbox's share of contended CPU (SandboxSpec.cpu_weight; None:
        the ordinary weight); its spec names the new weight from then on. False when this
        sandbox cannot (a backend or host with no cgroup of its own): nothing changed.

        Raises:
            InvalidTransition: it is not running or paused.
            InvalidSpec: a weight out of 1..10000.
            SandboxSetupError: the kernel refused the write.
        """
        with self._lock:
            if self.state not in ("running", "paused"):
                raise InvalidTransition(self.state, "running")
            if not self._apply_cpu_weight(weight):
                return False
            self.spec = dataclasses.replace(self.spec, cpu_weight=weight)
        return True

    def _apply_cpu_weight(self, weight: int | None) -> bool:
        return False

    def _freeze(self) -> None:
        raise NotImplementedError

    def _thaw(self) -> None:
        raise NotImplementedError

    def _running_processes(self) -> list:
        """The commands still running (their deadlines move on at resume)."""
        raise NotImplementedError

    def _setup_workspace(self) -> None:
        """The spec's workspace, or a capped tmpfs made for this sandbox (nosuid, nodev,
        under a 0700 parent), owned by its root inside (uid_base outside): see
        sandbox/workspace_fs.py. _cleanup removes one it made (_own_workspace)."""
        if self.spec.workspace:
            self.workspace = self.spec.workspace
            return
        self.workspace = workspace_fs.create(self.id, self.spec.uid_base, self.spec.uid_base)
        self._own_workspace = True

    def _settle_destroyed(self) -> None:
        """The last step of _cleanup (which a failed start and a destroy may both run)."""
        if self.state != "destroyed":
            self._move("destroyed")

    def snapshot(self, store, *, name: str = "", tenant: str = "",
                 max_bytes: int | None = None):
        """Capture the sandbox's writable filesystem state into a SnapshotStore
        (sandbox/state); returns the SnapshotRecord. The native backend's does.

        Raises:
            FailedPrecondition: this backend keeps no snapshots.
        """
        raise FailedPrecondition(f"the {self.spec.backend} backend cannot snapshot a sandbox; "
                                 f"use the native backend")

    def exec(self, argv: list[str], **options):
        """Start a command; returns its Process (the backend's)."""
        raise NotImplementedError

    def start_running(self, argv: list[str], *, scratch_workspace: bool = False, **options):
        """Start the sandbox with argv as its first command (exec()'s options); returns its
        Process. A backend may start both at once (the native one: PID 1 starts it), and
        with scratch_workspace give it a /workspace nobody outside sees (native only)."""
        self.start()
        return self.exec(argv, **options)

    def collect_exits(self) -> int:
        """Read the exits reported on status_fd without blocking; how many ended."""
        raise NotImplementedError

    def signal(self, sig: int) -> int:
        """Send sig to every process of the sandbox but PID 1; how many got it."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Host pids of the sandbox's processes (what this host can see of them)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Usage counters (cgroup keys: memory, cpu, pids, io, oom_kills); a key the
        backend cannot measure is absent."""
        raise NotImplementedError

    @property
    def seccomp_digest(self) -> str:
        """The digest of the seccomp profile the started sandbox runs under."""
        raise NotImplementedError

    def policy_digest(self) -> str:
        """sha256 of the policy the started sandbox runs under (spec + seccomp profile)."""
        return policy_digest(self.spec, self.seccomp_digest)


def new_sandbox(spec: SandboxSpec, *, runtime_dir: str | None = None, on_net_event=None,
                docker_host: str | None = None, secrets=None,
                tenant: str = "") -> SandboxLifecycle:
    """An unstarted sandbox on the backend the spec names (``spec.backend``).

    Args:
        runtime_dir: native only: the sandboxes directory its state file goes under.
        on_net_event: native only: called (on the proxy's thread) for each egress attempt.
        docker_host: docker only: the engine (default: $DOCKER_HOST, else the standard
            socket).
        secrets: native only: the values of spec.secrets by name (never part of the spec).
        tenant: native only: whose sandbox it is, recorded with a copy-on-write workspace's
            change set (which outlives the sandbox).
    """
    if spec.backend == "docker":
        from .docker import DockerSandbox

        return DockerSandbox(spec, docker_host=docker_host)
    from .native import Sandbox

    return Sandbox(spec, runtime_dir=runtime_dir, on_net_event=on_net_event, secrets=secrets,
                   tenant=tenant)


def open_sandbox(spec: SandboxSpec, *, docker_host: str | None = None) -> SandboxLifecycle:
    """A started sandbox on the backend the spec names.

    Raises:
        Unavailable: the docker backend was asked for and no engine answers.
    """
    sandbox = new_sandbox(spec, docker_host=docker_host)
    sandbox.start()
    return sandbox


def run(argv: list[str], spec: SandboxSpec | None = None, *, input: bytes | None = None,
        timeout_s: float | None = None, docker_host: str | None = None) -> CompletedRun:
    """Run one command in a fresh sandbox (on spec.backend) and destroy it: when this
    returns, no process of the sandbox is left; its directories are removed by a
    background thread (sandbox/undertaker.py; `undertaker.flush()` waits for that)."""
    started = time.monotonic()
    sandbox = new_sandbox(spec or SandboxSpec(), docker_host=docker_host)
    try:  # destroyed on every path: a failed start cleans up, a failed command does not
        proc = sandbox.start_running(argv, timeout_s=timeout_s, scratch_workspace=True)
        out, err = proc.communicate(input)
    finally:  # nothing of it runs once this returns; its directories go in the background
        sandbox.destroy(remove_later=True)
    return CompletedRun(tuple(argv), proc.returncode, out, err, proc.reason,
                        time.monotonic() - started)


def ids_before_workspace(spec: SandboxSpec) -> bool:
    """Whether whoever makes the sandbox's workspace must fix its host ids first: a
    native sandbox sees a directory of any owner through an idmapped mount, a container
    cannot be idmapped (its workspace must belong to its own ids)."""
    return spec.backend == "docker"
