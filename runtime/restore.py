"""Live restore (config live_restore, `corral daemon --live-restore`): the daemon's
sandboxes outlive a daemon restart (SIGKILL, crash, stop, binary upgrade), as containers
outlive dockerd with its --live-restore.

Two things outlive the daemon:

- the holder (runtime/holder.py), a process of its own that keeps each kept sandbox's
  PID 1 pidfd and corral-init's exit-status pipe (key: the sandbox id) and, under
  "<id>/state:NAME", what its image, snapshot and upper layers hold (flocked hold files,
  detached tmpfs mounts: sandbox/images/kept.py) and, under "<id>/egress", its egress
  link (allow_net, secrets: the proxy's sockets, egress namespace, BPF steering, its DNS
  pins and secrets' placeholders and CA; sandbox/net.py kept_descriptors), which the next
  daemon serves again (SandboxManager._relink_egress; the secret values are read again
  from the store); a warm pool's ready sandbox is held transient (it dies when the
  daemon's connection ends) until it is acquired;
- a SQLite file, <state>/restore.db (WAL, synchronous=FULL: a commit is on disk when it
  returns), with one row per kept sandbox: what the daemon knew of it beyond the kernel
  (its spec, tenant, labels, wall-clock TTL deadline, pause time).

A sandbox is written to both right after its spawn, updated at pause, resume and
SetTimeout, and removed at destroy. The writes run on one thread of their own, in order,
off the create's path: a Create answers without waiting for the holder or the fsync (a
daemon killed in that window loses that one sandbox: recover() finds a row with nothing
held, or held descriptors with no row, and kills it).

A daemon that starts with live restore on calls recover() before any sweep: each row is
adopted (sandbox/backends/native.py Sandbox.adopt) with the descriptors the holder kept;
one that cannot be (its PID 1 died meanwhile, a spec that is no longer adoptable) is
killed and reported with the reason. A daemon that starts with live restore off calls
discard(): what a previous daemon left held is killed, as if it had died with it.

A docker sandbox's container outlives its daemon by itself: the holder keeps nothing of
it, its row's backend_state names the engine, container id and creation time, and a
`kept` file in its runtime directory names this store, so that no process's docker sweep
removes it while the row exists. recover() adopts it (DockerSandbox.adopt) and then
sweeps each such engine of the containers no store keeps; discard() sweeps them too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from corral.ext._spawn import park_fd
from corral.sandbox import SandboxSpec, cgroups
from corral.sandbox.errors import CorralError
from corral.sandbox.procinfo import live_start_time

from .command_journal import STDIN_SUFFIX
from .holder import SOCKET_NAME, HolderClient, HolderError, start_or_connect

log = logging.getLogger("corral.restore")

#: The store's file in the state directory.
DB_NAME = "restore.db"
#: Positions in a sandbox's held group: PID 1's pidfd (killed by an orphaned holder) and
#: the read end of corral-init's exit-status pipe.
PIDFD, STATUS = 0, 1
#: How long a killed PID 1 may take to be reaped (by init or a subreaper) before the sweep.
REAP_WAIT_S = 5.0
#: Backends whose sandboxes a restarted daemon can adopt (a container outlives its client).
ADOPTABLE_BACKENDS = ("native", "docker")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    spec TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    paused_at REAL NOT NULL,
    owner_session TEXT NOT NULL DEFAULT '',
    backend_state TEXT NOT NULL DEFAULT '{}'
)
"""


def unadoptable(spec: SandboxSpec) -> list[str]:
    """The fields of spec that keep its sandbox from surviving a restart: none of a native
    or docker sandbox's (what lived only in the daemon's process, its egress, layers,
    snapshot and change set, is now held or recorded), only another backend."""
    return [] if spec.backend in ADOPTABLE_BACKENDS else ["backend"]


@dataclass
class KeptSandbox:
    """One row of restore.db: what a restarted daemon needs beyond the kernel's objects."""

    id: str
    tenant: str
    spec: dict  # SandboxSpec.to_fields()
    labels: dict
    created_at: float
    expires_at: float  # Unix seconds
    paused_at: float  # Unix seconds of the pause, 0 while running
    #: The session that made it and ends with it ("" for a Create's sandbox).
    owner_session: str = ""
    #: What its backend checks it against at adoption (docker: the engine, container id
    #: and creation time: DockerSandbox.kept_record); {} for a native sandbox.
    backend_state: dict = field(default_factory=dict)


@dataclass
class Recovered:
    """A kept sandbox after recover(): adopted (sandbox set) or lost (reason set)."""

    row: KeptSandbox
    sandbox: object | None = None  # a native Sandbox
    reason: str = ""
    #: Holder key -> output read ends of each command that ran at the restart.
    commands: dict[str, list[int]] = field(default_factory=dict)
    #: Session id -> [events read end, control write end] of each session it ran.
    sessions: dict[str, list[int]] = field(default_factory=dict)
    #: Its egress as kept (sandbox/net.py kept_descriptors), [] when it has none.
    egress: list[int] = field(default_factory=list)


def command_key(sandbox_id: str, exec_id: str) -> str:
    """The holder's key of a running command's output pipes."""
    return f"{sandbox_id}/{exec_id}"


def session_key(sandbox_id: str, session_id: str) -> str:
    """The holder's key of a session's protocol pipes (events read end, control write end)."""
    return f"{sandbox_id}/{SESSION_PREFIX}{session_id}"


#: What follows "<sandbox id>/" in a session's holder key.
SESSION_PREFIX = "session:"
#: What follows "<sandbox id>/" in the holder key of a group of its filesystem state
#: (image layer holds, a snapshot's hold, upper layers: sandbox/images/kept.py).
STATE_PREFIX = "state:"
#: What follows "<sandbox id>/" in the holder key of its egress (allow_net, secrets).
EGRESS_NAME = "egress"


class RestoreStore:
    """restore.db: the rows of kept sandboxes (used by one thread at a time)."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # fsync at each commit, WAL included
        self.db.execute(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(sandboxes)")}
        if "owner_session" not in columns:  # a store an older daemon wrote
            self.db.execute("ALTER TABLE sandboxes ADD COLUMN owner_session TEXT NOT NULL "
                            "DEFAULT ''")
        if "backend_state" not in columns:
            self.db.execute("ALTER TABLE sandboxes ADD COLUMN backend_state TEXT NOT NULL "
                            "DEFAULT '{}'")
        os.chmod(path, 0o600)

    def put(self, row: KeptSandbox) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO sandboxes (id, tenant, spec, labels, created_at, "
            "expires_at, paused_at, owner_session, backend_state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.tenant, json.dumps(row.spec), json.dumps(row.labels),
             row.created_at, row.expires_at, row.paused_at, row.owner_session,
             json.dumps(row.backend_state)))

    def update(self, sandbox_id: str, expires_at: float, paused_at: float) -> None:
        self.db.execute("UPDATE sandboxes SET expires_at = ?, paused_at = ? WHERE id = ?",
                        (expires_at, paused_at, sandbox_id))

    def delete(self, sandbox_id: str) -> None:
        self.db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def rows(self) -> list[KeptSandbox]:
        return [KeptSandbox(i, t, json.loads(s), json.loads(lb), c, e, p, o, json.loads(b))
                for i, t, s, lb, c, e, p, o, b in self.db.execute(
                    "SELECT id, tenant, spec, labels, created_at, expires_at, paused_at, "
                    "owner_session, backend_state FROM sandboxes ORDER BY created_at")]

    def close(self) -> None:
        self.db.close()


class LiveRestore:
    """The daemon's side of live restore: the holder connection, the store and the one
    thread that writes both (module docstring)."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.holder = start_or_connect(state_dir)
        self.store = RestoreStore(os.path.join(state_dir, DB_NAME))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-restore")
        self._last: Future | None = None

    # -- at start ----------------------------------------------------------------------------

    def recover(self) -> list[Recovered]:
        """Adopt every kept sandbox (blocking; before any sweep); each lost one is killed,
        forgotten and reported with its reason. Held descriptors with no row are killed."""
        from corral.sandbox.backends.native import Sandbox

        held = set(self.holder.keys())
        rows = self.store.rows()
        results = self._recover_containers([r for r in rows if r.spec.get("backend") == "docker"])
        for row in rows:
            if row.spec.get("backend") == "docker":
                continue
            result = Recovered(row)
            fds: list[int] = []
            state: dict[str, list[int]] = {}  # adopt keeps copies of what it uses
            try:
                if row.id not in held:
                    raise CorralError("the holder kept nothing of it")
                held.discard(row.id)
                # parked high, as a start parks them: spawns then copy none of them
                fds = [park_fd(fd) for fd in self.holder.get(row.id)]
                if len(fds) != 2:
                    raise CorralError(f"the holder kept {len(fds)} descriptors, not 2")
                spec = SandboxSpec.from_fields(row.spec)
                state = self._take_state(row.id, held)
                result.sandbox = Sandbox.adopt(spec, row.id, init_pidfd=fds[PIDFD],
                                               status_fd=fds[STATUS], tenant=row.tenant,
                                               held=state)
            except (CorralError, HolderError, OSError, TypeError, ValueError) as exc:
                result.reason = str(exc) or type(exc).__name__
                _kill_and_close(row.id, fds)
                self._drop(row.id)
            finally:
                for group in state.values():
                    _kill_and_close(None, group)
            results.append(result)
            for key in [k for k in held if k.startswith(row.id + "/")]:
                held.discard(key)
                if result.sandbox is None:
                    continue
                name = key[len(row.id) + 1:]
                if name == EGRESS_NAME:
                    result.egress = self.holder.get(key)
                elif name.startswith(SESSION_PREFIX):
                    result.sessions[name[len(SESSION_PREFIX):]] = self.holder.get(key)
                else:
                    result.commands[key] = self.holder.get(key)
        for key in held:  # put, but its row never written (or its sandbox's is gone)
            _kill_and_close(None if "/" in key else key, self.holder.get(key))
            self.holder.forget(key)
        for name in _unheld(self.state_dir, {row.id for row in rows}):  # no tenant known
            results.append(Recovered(KeptSandbox(name, "", {}, {}, 0.0, 0.0, 0.0),
                                     reason=UNHELD_REASON))
        return results

    def _recover_containers(self, rows: list[KeptSandbox]) -> list[Recovered]:
        """Adopt kept docker sandboxes: their containers outlived the daemon by themselves
        (the holder keeps nothing of them; their commands' descriptors, if any, are let go
        with the rest). A lost one's row goes, and the sweep of each engine that follows
        removes its container, with every other one no store keeps."""
        if not rows:
            return []
        from corral.sandbox.backends.docker import DockerSandbox

        results = []
        for row in rows:
            result = Recovered(row)
            try:
                result.sandbox = DockerSandbox.adopt(
                    SandboxSpec.from_fields(row.spec), row.id, row.backend_state,
                    paused=bool(row.paused_at))
            except (CorralError, OSError, TypeError, ValueError, KeyError) as exc:
                result.reason = str(exc) or type(exc).__name__
                self._drop(row.id)
            results.append(result)
        for url in sorted({str(r.backend_state.get("url") or "") for r in rows}):
            DockerSandbox.sweep_engine(url or None)
        return results

    def _take_state(self, sandbox_id: str, held: set[str]) -> dict[str, list[int]]:
        """Copies of sandbox_id's filesystem state groups (name -> descriptors), taken out
        of held (the caller closes them; Sandbox.adopt keeps copies of what it uses)."""
        prefix = f"{sandbox_id}/{STATE_PREFIX}"
        state: dict[str, list[int]] = {}
        try:
            for key in sorted(k for k in held if k.startswith(prefix)):
                held.discard(key)
                state[key[len(prefix):]] = self.holder.get(key)
        except HolderError:
            for fds in state.values():
                _kill_and_close(None, fds)
            raise
        return state

    def _drop(self, sandbox_id: str) -> None:
        """Forget a sandbox: its descriptors, its commands' and its row."""
        with contextlib.suppress(HolderError):
            for key in self.holder.keys():
                if key == sandbox_id or key.startswith(sandbox_id + "/"):
                    self.holder.forget(key)
        self.store.delete(sandbox_id)

    # -- while serving: writes in order on the writer thread ---------------------------------

    def keep(self, sandbox, row: KeptSandbox) -> None:
        """Hold sandbox's descriptors and write its row (in the background: copies of the
        descriptors are taken now, so a destroy meanwhile cannot close them under us)."""
        from corral.sandbox.images import kept

        if row.spec.get("backend") == "docker":  # its container outlives us: only the row
            row.backend_state = sandbox.kept_record(os.path.join(self.state_dir, DB_NAME))
            self._submit(lambda: self.store.put(row), row.id)
            return
        fds = [os.dup(sandbox._init_pidfd), os.dup(sandbox.status_fd)]
        egress = _egress_descriptors(sandbox)
        state = {name: [os.dup(fd) for fd in group]
                 for name, group in kept.descriptors(sandbox).items()}

        def write() -> None:
            try:
                self.holder.put(row.id, fds, kill=(PIDFD,))
                if egress:  # before the row: a row means all of it is held
                    self.holder.put(f"{row.id}/{EGRESS_NAME}", egress)
                for name, group in state.items():
                    self.holder.put(f"{row.id}/{STATE_PREFIX}{name}", group)
            finally:
                for fd in fds + egress + [fd for group in state.values() for fd in group]:
                    os.close(fd)
            self.store.put(row)

        self._submit(write, row.id)

    def hold_ready(self, sandbox) -> None:
        """Hold a warm pool's ready sandbox (spawned to outlive the daemon) as transient:
        the holder kills it when this daemon's connection ends, so it dies with the
        daemon; keep() at acquire makes it an ordinary kept sandbox."""
        fds = [os.dup(sandbox._init_pidfd), os.dup(sandbox.status_fd)]

        def write() -> None:
            try:
                self.holder.put(sandbox.id, fds, kill=(PIDFD,), transient=True)
            finally:
                for fd in fds:
                    os.close(fd)

        self._submit(write, sandbox.id)

    def keep_command(self, sandbox_id: str, exec_id: str, outputs: list[int], stdin: int,
                     journal, record) -> None:
        """Hold a command's output read ends and stdin's write end (stdin -1: closed
        already; copies taken now) and write its command.json (runtime/command_journal.py):
        with the daemon gone, a write of the command's fills the pipe instead of raising
        SIGPIPE, and the next daemon replays its output from the journal and reads on."""
        fds = [os.dup(fd) for fd in outputs]
        stdin_fd = os.dup(stdin) if stdin >= 0 else -1
        key = command_key(sandbox_id, exec_id)

        def write() -> None:
            try:
                record.start_time = live_start_time(record.pid) or 0 if record.pid else 0
                journal.write_record(record)
                self.holder.put(key, fds)
                if stdin_fd >= 0:
                    self.holder.put(key + STDIN_SUFFIX, [stdin_fd])
            finally:
                for fd in fds + ([stdin_fd] if stdin_fd >= 0 else []):
                    os.close(fd)

        self._submit(write, sandbox_id)

    def keep_session(self, sandbox_id: str, session_id: str, pipes: list[int],
                     journal, record: dict) -> None:
        """Hold a session's events read end and control write end (copies taken now) and
        write its session.json (runtime/session_journal.py)."""
        fds = [os.dup(fd) for fd in pipes]
        key = session_key(sandbox_id, session_id)

        def write() -> None:
            try:
                journal.write_record(record)
                self.holder.put(key, fds)
            finally:
                for fd in fds:
                    os.close(fd)

        self._submit(write, sandbox_id)

    def forget_session(self, sandbox_id: str, session_id: str, journal) -> None:
        """A session ended: the holder lets its pipes go and its journal goes."""
        key = session_key(sandbox_id, session_id)

        def write() -> None:
            self.holder.forget(key)
            journal.remove()

        self._submit(write, sandbox_id)

    def forget_stdin(self, sandbox_id: str, exec_id: str) -> None:
        """The daemon closed a command's stdin: the holder's copy goes too (EOF)."""
        key = command_key(sandbox_id, exec_id) + STDIN_SUFFIX
        self._submit(lambda: self.holder.forget(key), sandbox_id)

    def forget_command(self, sandbox_id: str, exec_id: str, journal=None,
                       exit_: tuple[int, str, float] | None = None) -> None:
        """A command ended: its exit goes to its journal (for a restart before it is
        collected), then the holder lets its descriptors go."""
        key = command_key(sandbox_id, exec_id)

        def write() -> None:
            if journal is not None and exit_ is not None:
                journal.write_exit(*exit_)
            self.holder.forget(key)
            self.holder.forget(key + STDIN_SUFFIX)

        self._submit(write, sandbox_id)

    def drop_journal(self, journal) -> None:
        """A finished command was collected: its journal's files go (in order, after its
        exit was written)."""
        self._submit(journal.remove, "")

    def update(self, sandbox_id: str, expires_at: float, paused_at: float) -> None:
        self._submit(lambda: self.store.update(sandbox_id, expires_at, paused_at), sandbox_id)

    def forget(self, sandbox_id: str) -> None:
        self._submit(lambda: self._drop(sandbox_id), sandbox_id)

    def _submit(self, fn, sandbox_id: str) -> None:
        future = self._writer.submit(fn)
        future.add_done_callback(lambda f: f.exception() and log.error(
            "live restore: sandbox %s not recorded: %s", sandbox_id, f.exception()))
        self._last = future

    def flush(self) -> None:
        """Wait until every write queued so far is done (tests, and close)."""
        if self._last is not None:
            with contextlib.suppress(Exception):
                self._last.result()

    def close(self) -> None:
        """Finish the queued writes and let go: the holder keeps what it holds for the
        next daemon (it ends by itself when it holds nothing)."""
        self._writer.shutdown(wait=True)
        self.store.close()
        self.holder.close()


def _egress_descriptors(sandbox) -> list[int]:
    """Copies of what serves sandbox's egress (sandbox/net.py kept_descriptors), [] when
    it has none or they cannot be had (then the next daemon finds them missing, and
    kills and reports the sandbox)."""
    if getattr(sandbox, "egress", None) is None:
        return []
    from corral.sandbox.net import kept_descriptors

    try:
        return kept_descriptors(sandbox.egress, sandbox.secrets)
    except (OSError, CorralError) as exc:  # CorralError: its link is being removed
        log.error("live restore: the egress of %s is not kept: %s", sandbox.id, exc)
        return []


def discard(state_dir: str) -> int:
    """Live restore is off: kill what a previous daemon (with it on) left held and stop its
    holder, so that the sweep removes those sandboxes as it would after a crash. Returns
    how many were killed (blocking; before any sweep)."""
    containers = _kept_containers(state_dir)  # read before the store goes
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(state_dir, DB_NAME))
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(state_dir, DB_NAME + suffix))
    killed = _remove_containers(containers)
    killed += len(_unheld(state_dir, set()))
    try:
        holder = HolderClient.connect(os.path.join(state_dir, SOCKET_NAME))
    except HolderError:
        return killed
    with holder:
        for key in holder.keys():
            with contextlib.suppress(HolderError):  # forgotten meanwhile by its daemon
                killed += _kill_and_close(None if "/" in key else key, holder.get(key))
        holder.stop()
    return killed


#: Why a sandbox spawned to be kept, but never held, was killed at start.
UNHELD_REASON = "its daemon died before handing it to the holder: killed"


def _unheld(state_dir: str, known: set[str]) -> list[str]:
    """Kill the PID 1s of sandboxes a daemon of state_dir spawned to be kept (their state.json
    says kept_by it) and died before handing to the holder: no row, nothing held, a PID 1
    that does not die with its parent and that the sweep would keep forever. Returns the
    ids of those killed; the sweep that follows removes the rest."""
    from corral.sandbox.backends.native import runtime_base

    base, killed = runtime_base(), []
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return killed
    for name in names:
        if name in known:
            continue
        try:
            with open(os.path.join(base, name, "state.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict) or not state.get("adoptable") or (
                state.get("kept_by") != state_dir):
            continue
        if _kill_and_close(name, []):
            killed.append(name)
    return killed


def _kept_containers(state_dir: str) -> dict[str, set[str]]:
    """The kept docker sandboxes restore.db names, by engine URL ({} without a store)."""
    found: dict[str, set[str]] = {}
    try:
        db = sqlite3.connect(f"file:{os.path.join(state_dir, DB_NAME)}?mode=ro", uri=True)
    except sqlite3.Error:
        return found
    try:
        for sandbox_id, state in db.execute("SELECT id, backend_state FROM sandboxes"):
            url = json.loads(state).get("url")
            if url:
                found.setdefault(url, set()).add(sandbox_id)
    except (sqlite3.Error, ValueError, AttributeError):
        pass  # no store, or one written before docker sandboxes were kept
    finally:
        db.close()
    return found


def _remove_containers(containers: dict[str, set[str]]) -> int:
    """Sweep each engine of kept containers once their store is gone (no store keeps
    them now); returns how many of them were removed."""
    if not containers:
        return 0
    from corral.sandbox.backends.docker import DockerSandbox

    return sum(len(ids & set(DockerSandbox.sweep_engine(url)))
               for url, ids in containers.items())


def _kill_and_close(sandbox_id: str | None, fds: list[int]) -> int:
    """Kill sandbox_id's PID 1 (fds[0], its pidfd; with none held, the PID 1 its state.json
    names, if that process still runs) and wait (bounded) until it is reaped, so that the
    sweep that follows removes the rest; close fds. None: a command's pipes, only closed.
    Returns how many were killed."""
    killed = 0
    if sandbox_id is not None:
        pidfd = fds[0] if fds else _pidfd_from_state(sandbox_id)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            killed = 1
            # a paused sandbox's PID 1 dies only once thawed (sweep leaves kept ones frozen)
            with contextlib.suppress(CorralError, OSError):
                cgroups.recorded(cgroups.detect(), _state_of(sandbox_id), sandbox_id).thaw()
            # readable once it has exited; poll, not select: a parked pidfd is >= 1024
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)
            waiter.poll(REAP_WAIT_S * 1000)
            _wait_reaped(pidfd)
        except (OSError, TypeError):  # gone already, or none found (None)
            pass
        finally:
            if not fds and pidfd is not None:
                os.close(pidfd)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    return killed


def _state_of(sandbox_id: str) -> dict | None:
    """sandbox_id's state.json (sandbox/backends/native.py writes it), or None."""
    from corral.sandbox.backends.native import runtime_base

    try:
        with open(os.path.join(runtime_base(), sandbox_id, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _pidfd_from_state(sandbox_id: str) -> int | None:
    """A pidfd of the PID 1 that sandbox_id's state.json names, if that very process (its
    start time) still runs; None otherwise."""
    state = _state_of(sandbox_id)
    try:
        pidfd = os.pidfd_open(int(state["init_pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if live_start_time(int(state["init_pid"])) != state.get("init_start"):  # pid reused
        os.close(pidfd)
        return None
    return pidfd


def _wait_reaped(pidfd: int) -> None:
    """Until /proc no longer shows the pidfd's process (its parent, init or a subreaper,
    reaped it), at most REAP_WAIT_S."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
    except (OSError, ValueError, StopIteration):
        return
    end = time.monotonic() + REAP_WAIT_S
    while pid > 0 and os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        time.sleep(0.01)
