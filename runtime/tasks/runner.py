"""One attempt of a deep task, start to end, on the machine that hosts its sandbox.

``AttemptRunner.run()`` blocks: it builds the attempt's workspace (the spec's files, the
last checkpoint restored), starts the sandbox and the agent with an events pipe, reads its
frames with the token core, and persists what matters into the task's directory as it
happens (see files.py): PROGRESS, CHECKPOINT frames and $CORRAL_CHECKPOINT_DIR snapshots,
RESULT, the log; at the end /workspace/out and exit.json. It enforces the attempt's
deadline and ends everything on cancel().

The local executor runs it in a shim process (shim.py) so that the sandbox outlives a
daemon restart; the Ray executor runs it inside the node's actor.

Inside the sandbox the agent finds:
  CORRAL_TASK_ID, CORRAL_ATTEMPT        which task and attempt (1, 2, ...)
  CORRAL_ATTEMPT_ID                     this run's own id, never given to another run:
                                        tasks are at-least-once, so a side effect keyed
                                        by CORRAL_TASK_ID is done once however many
                                        attempts run (docs/agent-protocol.md)
  CORRAL_CHECKPOINT_DIR                 a directory persisted with every checkpoint and
                                        restored on retry (/workspace/.corral/checkpoint)
  CORRAL_CHECKPOINT_FILE                the last CHECKPOINT frame's payload, restored
                                        (only set when there is one)
  CORRAL_EVENTS_FD                      the frames pipe (docs/agent-protocol.md)
  CORRAL_CONTROL_FD                     steering (protocol v1.1): INPUT frames posted
                                        through the task's inbox (TaskFiles.post_input),
                                        e.g. by the session that delegated it
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import secrets
import selectors
import threading
import time
from dataclasses import dataclass, field

from corral.ext import TokenStream
from corral.ext import agent as protocol
from corral.sandbox import SandboxSpec, fstree, ids, new_sandbox, workspace_fs
from corral.sandbox.backends.base import ExitReason, SandboxLifecycle, ids_before_workspace
from corral.sandbox.errors import CorralError, FailedPrecondition
from corral.sandbox.procinfo import live_start_time

from .files import (
    BELL_ANY,
    BELL_CHECKPOINT,
    BELL_NET,
    BELL_PROGRESS,
    BELL_RESULT,
    BELL_STARTED,
    TaskFiles,
    atomic_write,
    copy_tree,
    copy_tree_safe,
    replace_live,
    tree_signature,
)
from .images import pull_on_node

CHECKPOINT_DIR_INSIDE = "/workspace/.corral/checkpoint"
#: The checkpoint directory, relative to the workspace.
CHECKPOINT_REL = ".corral/checkpoint"
CHECKPOINT_FILE_INSIDE = "/workspace/.corral/last-checkpoint"
#: Largest log file of one attempt; what comes after is counted and dropped.
MAX_LOG_BYTES = 64 << 20
#: How often the checkpoint directory is looked at for files the agent wrote.
DIR_SCAN_S = 0.5
#: Checkpoints of one attempt are paced: the next one is taken no sooner than this many
#: seconds after the last, no sooner than the last one's bytes take to write at
#: CHECKPOINT_BYTES_PER_S, and no sooner than four times as long as taking it took.
#: CHECKPOINT frames and directory changes in between are not lost: the newest frame (and
#: the directory as it is then) makes the next checkpoint, and one still waiting when the
#: attempt ends is taken then.
CHECKPOINT_MIN_INTERVAL_S = 0.2
CHECKPOINT_BYTES_PER_S = 4 << 20
#: The attempt's egress records (one JSON object a line, net.connect, net.secret, ...):
#: the daemon audits them as they come (local.py; ray_executor.py copies them from the
#: actor first), as it does a sandbox's.
NET_EVENTS_FILE = "net.jsonl"
#: In a copy-on-write task's change set: the spec's files were written into it (by the
#: attempt that made it); later attempts leave them as the agent left them.
SPEC_FILES_WRITTEN = "spec-files-written"


@dataclass
class AttemptPlan:
    """Everything a runner needs; JSON-able (the shim reads it from attempt.json)."""

    task_id: str
    attempt: int
    argv: list[str]
    #: The task's sandbox with its held limits; the runner adds workspace, devices, ids.
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    files: dict[str, str] = field(default_factory=dict)  # path -> latin-1 text of the bytes
    devices: list[str] = field(default_factory=list)
    deadline: float = 0.0  # Unix time; 0 = none
    tasks_root: str = ""
    #: Unique per run of an attempt (CORRAL_ATTEMPT_ID): attempt numbers say which try it
    #: is; this says which process tree, should one number ever run twice.
    attempt_id: str = ""
    #: Where the values of sandbox.secrets live, by name (SecretStore.locate: a file, or
    #: an inline value's config file), never the values: the runner reads them at the
    #: attempt's start, so they never enter plan.json, the task store or a log.
    secret_sources: dict[str, dict] = field(default_factory=dict)
    #: Whose task it is (recorded with a copy-on-write workspace's change set).
    tenant: str = ""
    #: Local executor: the cgroup directories its shim relays from while the agent runs,
    #: and those it came from (shim_cgroup.Moves); empty: it stays where it is.
    relay_cgroup: list[str] = field(default_factory=list)
    home_cgroup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.attempt_id:
            self.attempt_id = f"{self.task_id}.{self.attempt}.{secrets.token_hex(4)}"

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "sandbox": self.sandbox.to_fields()})

    @classmethod
    def from_json(cls, text: str) -> AttemptPlan:
        d = json.loads(text)
        d["sandbox"] = SandboxSpec.from_fields(d.get("sandbox", {}))
        return cls(**d)


class CheckpointPacer:
    """When the next checkpoint may be taken (see CHECKPOINT_MIN_INTERVAL_S)."""

    def __init__(self, min_interval_s: float = CHECKPOINT_MIN_INTERVAL_S,
                 bytes_per_s: float = CHECKPOINT_BYTES_PER_S):
        self.min_interval_s = min_interval_s
        self.bytes_per_s = bytes_per_s
        self.pending = False
        self.not_before = 0.0
        self.taken = 0
        self.deferred = 0  # requests folded into a later checkpoint

    def request(self) -> None:
        if self.pending:
            self.deferred += 1
        self.pending = True

    def due(self, now: float) -> bool:
        return self.pending and now >= self.not_before

    def wait_s(self, now: float) -> float | None:
        """Seconds until a pending checkpoint is due; None when none is pending."""
        return max(0.0, self.not_before - now) if self.pending else None

    def taken_at(self, now: float, bytes_written: int, took_s: float = 0.0) -> None:
        """A checkpoint was taken at `now`: it wrote that many bytes in took_s seconds (a
        slow one, many small files each fsynced, waits 4x its own time before the next)."""
        self.pending = False
        self.taken += 1
        self.not_before = now + max(self.min_interval_s, bytes_written / self.bytes_per_s,
                                    4 * took_s)


class AttemptRunner:
    """Runs one attempt; thread-safe cancel()."""

    def __init__(self, plan: AttemptPlan, on_change=None, on_phase=None):
        """on_change: called after each persist (the Ray actor). on_phase: called with
        "relay" once the agent runs and "home" once it and its sandbox are done (the shim
        moves between its cgroups)."""
        self.plan = plan
        self._on_phase = on_phase
        self.files = TaskFiles(plan.tasks_root, plan.task_id)
        self.dir = self.files.attempt_dir(plan.attempt)
        # The sandbox's /workspace: a capped tmpfs off the state filesystem (workspace_fs),
        # named after the task and attempt; attempt-<n>/workspace links to it.
        self.workspace = os.path.join(workspace_fs.root(), f"{plan.task_id}-{plan.attempt}")
        self._workspace_link = os.path.join(self.dir, "workspace")
        self._cancel = threading.Event()
        self._bell = -1
        self._on_change = on_change  # extra callback (the Ray actor) after each persist
        self.sandbox: SandboxLifecycle | None = None
        self._control: _InputWriter | None = None  # the agent's control pipe, once it runs
        #: The workspace is the runner's tmpfs (False: the sandbox's, from a snapshot).
        self._own_workspace = True
        #: A copy-on-write task's change set, the lock held on it and the link that
        #: hands it to this attempt's sandbox (_carry_changes).
        self._changes = None
        self._changes_lock = -1
        self._changes_link = ""

    def cancel(self) -> None:
        self._cancel.set()

    def _changed(self, what: bytes = BELL_ANY) -> None:
        """What was persisted (a BELL_* byte) is rung to the daemon, then on_change."""
        self.files.ring(self._bell, what)
        if self._on_change is not None:
            self._on_change()

    # -- the attempt -------------------------------------------------------------------------

    def run(self) -> dict:
        """Run to the end; returns (and writes) the exit record."""
        self.files.create()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._bell = self.files.open_bell_writer()
        try:
            outcome = self._run()
        except CorralError as exc:
            outcome = {"outcome": "error", "returncode": -1, "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - recorded for the daemon, then re-raised
            outcome = {"outcome": "error", "returncode": -1, "reason": f"runner failed: {exc!r}"}
            self._finish(outcome)
            raise
        self._finish(outcome)
        return outcome

    def _finish(self, outcome: dict) -> None:
        if self.sandbox is not None:
            try:
                self.sandbox.destroy()
            except Exception:  # noqa: BLE001 - the exit record matters more
                pass
        if getattr(self, "_ids", None) is not None:
            self._ids.release()
        outcome["finished_at"] = time.time()
        atomic_write(os.path.join(self.dir, "exit.json"), json.dumps(outcome).encode())
        if self._own_workspace:
            workspace_fs.remove(self.workspace)
        self._release_changes()
        with contextlib.suppress(OSError):
            os.unlink(self._workspace_link)
        self._changed()
        if self._bell >= 0:
            os.close(self._bell)
            self._bell = -1

    def _make_workspace(self, uid: int) -> None:
        """The attempt's own /workspace: a capped tmpfs (an attempt from a snapshot gets its
        sandbox's layered workspace instead: _use_sandbox_workspace)."""
        workspace_fs.remove(self.workspace)  # an earlier try of this very attempt
        workspace_fs.create(os.path.basename(self.workspace), uid, uid)
        self._link_workspace()

    def _link_workspace(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._workspace_link)
        os.symlink(self.workspace, self._workspace_link)

    def _carry_changes(self, host_dir: str) -> None:
        """Before a copy-on-write task's sandbox starts: hand it the task's change set.

        The change set is named after the task (under the changes root, where the
        Sandboxes calls Diff, Apply and Discard find it by the task id), made by the first
        attempt and handed to each attempt's sandbox by a link named after the sandbox
        (ChangeSet.hand_to), which the backend adopts (its upper layer moved to the new
        sandbox's ids): every attempt sees the changes of those before it, across daemon
        restarts. Held (LOCK_FILE) while this attempt runs: a diff reads it meanwhile;
        apply and discard refuse it.
        """
        import fcntl

        from corral.sandbox.state.changes import (
            LOCK_FILE,
            ChangeSet,
            ChangesNotFound,
            default_root,
        )

        task_id, root = self.plan.task_id, default_root()
        try:
            changes = ChangeSet.open(root, task_id)
        except ChangesNotFound:
            changes = ChangeSet.create(root, task_id, host_dir, upper_uid=0,
                                       size_bytes=workspace_fs.max_bytes(),
                                       inodes=workspace_fs.max_inodes(),
                                       tenant=self.plan.tenant, hidden=(".corral",))
        self._changes_lock = os.open(os.path.join(changes.path, LOCK_FILE),
                                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._changes_lock, fcntl.LOCK_EX)
        self._changes = changes
        # held now: what an earlier attempt left (it died with its shim) goes first, its
        # workspace overlay before the image under it, so the image is mounted once only
        for name in os.listdir(root):
            link = os.path.join(root, name)
            if os.path.islink(link) and os.readlink(link) == task_id:
                workspace_fs.remove(os.path.join(workspace_fs.root(), name))
                os.unlink(link)
        changes.unmount()
        self._changes_link = changes.hand_to(self.sandbox.id)

    def _release_changes(self) -> None:
        """Let a copy-on-write task's change set go (its sandbox, destroyed, unmounted
        it): the link to it, then the lock."""
        if self._changes_link:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._changes_link)
            self._changes_link = ""
        if self._changes is not None:
            self._changes.unmount()
            self._changes = None
        if self._changes_lock >= 0:
            os.close(self._changes_lock)
            self._changes_lock = -1

    def _use_sandbox_workspace(self) -> None:
        """An attempt from a snapshot or on a copy-on-write workspace: /workspace is the
        sandbox's (an overlay, removed with the sandbox); the runner's files go there."""
        workspace_fs.remove(self.workspace)  # a tmpfs an earlier try of it may have left
        self.workspace = self.sandbox.workspace
        self._own_workspace = False
        self._link_workspace()

    def _write_spec_files(self, uid: int) -> None:
        """Put the spec's files into the workspace, owned by the agent.

        A copy-on-write task's retry resumes its workspace as the attempts before it left
        it: the spec's files go into its change set once (SPEC_FILES_WRITTEN, kept in the
        change set, says they are there), so an agent's edits to them, and its deletions
        of them, survive a retry. A change set discarded between attempts starts over,
        files included. Any other attempt's workspace is fresh: it gets them each time.
        """
        marker = (os.path.join(self._changes.path, SPEC_FILES_WRITTEN)
                  if self._changes is not None else "")
        if marker and os.path.exists(marker):
            return
        for rel, text in self.plan.files.items():
            path = os.path.join(self.workspace, os.path.normpath(rel))
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            while parent != self.workspace:  # the agent owns the directories it was given
                os.chown(parent, uid, uid)
                parent = os.path.dirname(parent)
            with open(path, "wb") as f:
                f.write(text.encode("latin-1"))
                if marker:  # on disk before the mark that says so
                    os.fsync(f.fileno())
            os.chown(path, uid, uid)
        if marker:  # after the files: a try that died before this writes them again
            atomic_write(marker, b"")

    def _prepare_workspace(self, uid: int) -> dict[str, str]:
        """Put the spec's files (_write_spec_files) and the last checkpoint into the
        workspace; returns the agent's environment (CORRAL_*)."""
        self._write_spec_files(uid)
        corral_dir = os.path.join(self.workspace, ".corral")
        os.makedirs(corral_dir, exist_ok=True)
        os.chown(corral_dir, uid, uid)
        env = {"CORRAL_TASK_ID": self.plan.task_id, "CORRAL_ATTEMPT": str(self.plan.attempt),
               "CORRAL_ATTEMPT_ID": self.plan.attempt_id,
               "CORRAL_CHECKPOINT_DIR": CHECKPOINT_DIR_INSIDE,
               protocol.PROTOCOL_ENV: str(protocol.PROTOCOL_VERSION),
               protocol.EVENTS_FD_ENV: str(protocol.EVENTS_FD),
               protocol.CONTROL_FD_ENV: str(protocol.CONTROL_FD)}
        seq = self.files.latest_checkpoint()
        ckpt_dir = os.path.join(self.workspace, ".corral", "checkpoint")
        if seq:
            copy_tree_safe(os.path.join(self.files.checkpoint_dir(seq), "files"), ckpt_dir,
                           uid=uid)
            frame = self.files.checkpoint_frame(seq)
            if frame is not None:
                path = os.path.join(self.workspace, ".corral", "last-checkpoint")
                with open(path, "wb") as f:
                    f.write(frame)
                os.chown(path, uid, uid)
                env["CORRAL_CHECKPOINT_FILE"] = CHECKPOINT_FILE_INSIDE
        os.makedirs(ckpt_dir, exist_ok=True)
        os.chown(ckpt_dir, uid, uid)
        return env

    def _run(self) -> dict:
        plan = self.plan
        spec = plan.sandbox
        # The workspace belongs to this runtime's user (or the plan's fixed ids): a native
        # sandbox sees it through an idmapped mount, its root as the owner, whichever id
        # range the attempt's sandbox takes. A container cannot be idmapped: its range is
        # taken here, before the workspace is made for it, and given back in _finish.
        if ids_before_workspace(spec) and spec.uid_base is None and os.geteuid() == 0:
            self._ids = ids.allocate(f"{plan.task_id}-{plan.attempt}")
            spec = dataclasses.replace(spec, uid_base=self._ids.base)
        # a snapshot's or copy-on-write workspace is made with the sandbox (_run_sandbox)
        if spec.snapshot or spec.workspace_cow:
            spec = dataclasses.replace(spec, devices=tuple(plan.devices))
        else:
            self._make_workspace(spec.uid_base or os.geteuid())
            env = self._prepare_workspace(spec.uid_base or os.geteuid())
            spec = dataclasses.replace(spec, workspace=self.workspace,
                                       devices=tuple(plan.devices))
        log = _CappedLog(os.path.join(self.dir, "log"))
        try:
            if self._cancel.is_set():
                return {"outcome": "cancelled", "returncode": -9, "reason": "cancelled"}
            if spec.image:  # pulled on this node, into its own store (the task is PULLING)
                failed = pull_on_node(spec.image, self.dir,
                                      functools.partial(self._changed, BELL_STARTED))
                if failed is not None:
                    return failed
                if self._cancel.is_set():
                    return {"outcome": "cancelled", "returncode": -9, "reason": "cancelled"}
            self.sandbox = self._new_sandbox(spec)
            if spec.workspace_cow:
                self._carry_changes(spec.workspace)
            self.sandbox.start()
            if spec.snapshot or spec.workspace_cow:
                self._use_sandbox_workspace()
                env = self._prepare_workspace(self.sandbox.spec.uid_base)
            replace_live(os.path.join(self.dir, "runner.json"), json.dumps({
                "pid": os.getpid(), "start": live_start_time(os.getpid()),
                "sandbox_id": self.sandbox.id, "started_at": time.time(),
                "attempt_id": plan.attempt_id}).encode())
            # running: told now, the agent's start overlaps the daemon's RUNNING commit
            self._changed(BELL_STARTED)
            proc, outputs, events_r, control_w = self._start_agent(env)
            self._control = _InputWriter(control_w)
            self._phase("relay")
            return self._pump(proc, outputs, events_r, log)
        finally:
            self._phase("home")
            log.close()
            if self._control is not None:
                self._control.close()

    def _phase(self, where: str) -> None:
        if self._on_phase is not None:
            self._on_phase(where)

    def _new_sandbox(self, spec: SandboxSpec) -> SandboxLifecycle:
        """The attempt's sandbox, unstarted. Its secrets' values are read here, at each
        attempt, from where the plan says they live (secret_sources: never the values),
        and handed to the sandbox only: each attempt gets fresh placeholders. Its egress
        records go to NET_EVENTS_FILE for the daemon's audit log."""
        values = _secret_values(spec, self.plan.secret_sources) if spec.secrets else None
        try:
            return new_sandbox(spec, secrets=values, on_net_event=self._net_event)
        finally:
            del values

    def _net_event(self, event: dict) -> None:
        """An egress record of the proxy (on its thread): appended to NET_EVENTS_FILE, one
        line, and the daemon told. Records name a secret, never its value."""
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        fd = os.open(os.path.join(self.dir, NET_EVENTS_FILE),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self.files.ring(self._bell, BELL_NET)

    def _start_agent(self, env: dict[str, str]):
        """Run the task's command with the events pipe at fd 3 and the control pipe at 4;
        returns the Process, its stdout and stderr (file objects), the events pipe's read
        end and the control pipe's write end.

        The pipes are made here, not by the backend (PIPE): an engine takes descriptors,
        and one way for every backend keeps the runner free of backend cases.
        """
        events_r, events_w = os.pipe2(os.O_CLOEXEC)
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        outputs = (os.fdopen(out_r, "rb", buffering=0), os.fdopen(err_r, "rb", buffering=0))
        try:
            proc = self.sandbox.exec(self.plan.argv, env=env, stdin=None, stdout=out_w,
                                     stderr=err_w, pass_fds={protocol.EVENTS_FD: events_w,
                                                             protocol.CONTROL_FD: control_r})
        except BaseException:
            os.close(events_r)
            os.close(control_w)
            for f in outputs:
                f.close()
            raise
        finally:
            for fd in (events_w, control_r, out_w, err_w):  # the command's ends
                os.close(fd)
        return proc, outputs, events_r, control_w

    def _pump(self, proc, outputs, events_r: int, log) -> dict:
        """Read the agent's output and frames until it and its sandbox are done, or the
        attempt is cancelled or out of time; persist what comes as it comes. Returns the
        exit record."""
        # TOKEN frames are not kept (a deep task reports through PROGRESS/RESULT/LOG).
        stream = TokenStream("frames", log_bytes=1 << 20)
        sel, open_fds = self._watch(outputs, events_r)
        # The agent owns the workspace: every path into it is walked without following links.
        self._dir_sig = tree_signature(CHECKPOINT_REL, self.workspace)
        self._next_scan = time.monotonic() + DIR_SCAN_S
        self._last_frame = self.files.checkpoint_frame()
        self._pacer = CheckpointPacer()
        ending = None
        expired = False  # the command's own timeout (spec.timeout_s) was enforced
        try:
            while True:
                ending = ending or self._ending()
                if proc.poll() is not None and not open_fds:
                    break
                if proc.returncode is not None and self.sandbox.state == "destroyed":
                    break
                left = None if expired else proc.remaining()
                if left == 0:
                    proc.expire()
                    expired, left = True, None
                for key, _ in sel.select(self._select_timeout(left)):
                    self._on_readable(key.fd, key.data, sel, open_fds, stream, log)
                self._control.forward(self.files.take_inputs())
                self._scan_checkpoint_dir()
                if self._pacer.due(time.monotonic()):
                    self._take_checkpoint()
        finally:
            sel.close()
            for close in open_fds.values():
                close()
        # A checkpoint still waiting for its turn is taken now, whatever the ending: the
        # agent sent it before the end, and pacing must never lose the newest one.
        if ending is None and tree_signature(CHECKPOINT_REL, self.workspace) != self._dir_sig:
            self._pacer.request()
        if self._pacer.pending:
            self._take_checkpoint()
        if ending is None and proc.returncode == 0:
            self._keep_out(log)
        return _exit_record(proc, ending)

    def _watch(self, outputs, events_r: int):
        """A selector over stdout, stderr, the events pipe and the sandbox's exit reports;
        returns it with {descriptor: its close} of the pipes still open."""
        sel = selectors.DefaultSelector()
        open_fds = {}
        for f, name in zip(outputs, ("stdout", "stderr"), strict=True):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ, name)
            open_fds[f.fileno()] = f.close
        os.set_blocking(events_r, False)
        sel.register(events_r, selectors.EVENT_READ, "events")
        open_fds[events_r] = functools.partial(os.close, events_r)
        if self.sandbox.status_fd >= 0:
            sel.register(self.sandbox.status_fd, selectors.EVENT_READ, "status")
        return sel, open_fds

    def _ending(self) -> str | None:
        """"cancelled" or "timeout" once the attempt must end; its sandbox is destroyed
        then (PID 1 and the cgroup: the whole tree)."""
        if self._cancel.is_set():
            why = "cancelled"
        elif self.plan.deadline and time.time() >= self.plan.deadline:
            why = "timeout"
        else:
            return None
        self.sandbox.destroy()
        return why

    def _select_timeout(self, command_left: float | None) -> float:
        """How long to wait for output: until the next directory scan, pending
        checkpoint, the command's timeout or the attempt's deadline, whichever is first."""
        timeout = DIR_SCAN_S if command_left is None else min(DIR_SCAN_S, command_left)
        wait = self._pacer.wait_s(time.monotonic())
        if wait is not None:
            timeout = min(timeout, wait)
        if self.plan.deadline:
            timeout = max(0.0, min(timeout, self.plan.deadline - time.time()))
        return timeout

    def _on_readable(self, fd: int, what: str, sel, open_fds: dict, stream, log) -> None:
        """One ready descriptor: exit reports, or a pipe's bytes (frames or the log)."""
        if what == "status":
            self.sandbox.collect_exits()
            if self.sandbox.status_fd != fd:
                sel.unregister(fd)
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            sel.unregister(fd)
            open_fds.pop(fd)()
        elif what == "events":
            stream.feed(chunk)
            self._drain(stream, log)
        else:
            log.write(chunk)

    def _scan_checkpoint_dir(self) -> None:
        """When due, look for files the agent wrote to its checkpoint directory; a
        change asks the pacer for a checkpoint."""
        if time.monotonic() < self._next_scan:
            return
        began = time.monotonic()
        sig = tree_signature(CHECKPOINT_REL, self.workspace)
        # a huge directory is looked at less often: scanning is at most ~1/5 of the
        # runner's time
        self._next_scan = time.monotonic() + max(DIR_SCAN_S, 4 * (time.monotonic() - began))
        if sig != self._dir_sig:
            self._dir_sig = sig
            self._pacer.request()

    def _keep_out(self, log) -> None:
        """Copy /workspace/out of a success into the task's directory (what Result reads);
        what the copy left out is said in the log."""
        out_tmp = self.files.out + ".tmp"
        fstree.remove_tree(out_tmp, ignore_errors=True)
        report = copy_tree("out", out_tmp, fsync=True, beneath=self.workspace)
        if not report.complete or report.skipped:
            log.write(f"corral: out/ copied {report.entries} entries, {report.bytes} "
                      f"bytes; {report.skipped} left out (links, FIFOs, devices)"
                      f"{'' if report.complete else '; stopped at the copy limit'}\n"
                      .encode())
        os.makedirs(out_tmp, exist_ok=True)
        fstree.remove_tree(self.files.out, ignore_errors=True)
        os.rename(out_tmp, self.files.out)

    def _take_checkpoint(self) -> None:
        # what is copied is at least as new as this signature: no change is missed
        began = time.monotonic()
        self._dir_sig = tree_signature(CHECKPOINT_REL, self.workspace)
        self.files.save_checkpoint(self._last_frame, CHECKPOINT_REL, beneath=self.workspace)
        now = time.monotonic()
        self._pacer.taken_at(now, self.files.last_checkpoint_bytes, now - began)
        self._changed(BELL_CHECKPOINT)

    def _drain(self, stream, log) -> None:
        # Of the PROGRESS frames read at once only the newest is written (and rung): an
        # agent that floods them costs one file write per read, not one per frame.
        progress = None
        while True:
            ev = stream.next_event()
            kind = -1 if ev is None else int(ev.kind)
            if progress is not None and kind != protocol.PROGRESS:
                replace_live(os.path.join(self.dir, "progress.json"), progress)
                self._changed(BELL_PROGRESS)
                progress = None
            if ev is None:
                return
            if kind == protocol.PROGRESS:
                progress = bytes(ev.payload)
            elif kind == protocol.CHECKPOINT:  # taken when the pacer allows (the newest frame wins)
                self._last_frame = bytes(ev.payload)
                self._pacer.request()
            elif kind == protocol.RESULT:
                atomic_write(os.path.join(self.dir, "result.json"), bytes(ev.payload))
                self._changed(BELL_RESULT)
            elif kind == protocol.LOG:
                log.write(bytes(ev.payload) + b"\n")
            elif kind == 64:  # malformed input: say so in the log
                log.write(f"corral: bad frame from the agent: {ev.message}\n".encode())


class _InputWriter:
    """The runner's end of the agent's control pipe: INPUT frames written without ever
    blocking the runner (what the pipe cannot take now waits for the next round)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.pending = bytearray()

    def forward(self, texts: list[bytes]) -> None:
        if self.fd is None:
            return
        for text in texts:
            self.pending += protocol.encode_frame(protocol.INPUT,
                                                  text[:protocol.MAX_CONTROL_PAYLOAD])
        while self.pending:
            try:
                written = os.write(self.fd, self.pending)
            except BlockingIOError:
                return
            except OSError:  # the agent closed its end: it takes no steering
                self.close()
                return
            del self.pending[:written]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.pending.clear()


class _CappedLog:
    """The attempt's log file, at most MAX_LOG_BYTES (an agent must not fill the disk)."""

    def __init__(self, path: str):
        self._f = open(path, "ab", buffering=0)  # noqa: SIM115
        self.written = self._f.tell()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        room = MAX_LOG_BYTES - self.written
        if room <= 0:
            self.dropped += len(data)
            return
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._f.write(data)
        self.written += len(data)

    def close(self) -> None:
        if self.dropped:
            self._f.write(f"\ncorral: log limit reached; {self.dropped} bytes dropped\n".encode())
        self._f.close()


def locate_secrets(store, tenant: str, bindings) -> dict[str, dict]:
    """Where each bound secret of the tenant lives (SecretStore.locate), for a plan; store
    None is the empty store.

    Raises:
        NotFound, SecretUnavailable: naming the secret or its file, never a value.
    """
    from corral.runtime.secret_store import SecretStore

    store = store if store is not None else SecretStore()
    return {b.name: store.locate(tenant, b.name) for b in bindings}


def _secret_values(spec: SandboxSpec, sources: dict[str, dict]) -> dict[str, bytes]:
    """The values of spec.secrets, read where sources say (SecretStore.locate).

    Raises:
        FailedPrecondition: a secret has no source (an executor that gives none).
        NotFound, SecretUnavailable: as secret_store.value_at (names, never values).
    """
    from corral.runtime.secret_store import value_at

    values = {}
    for binding in spec.secrets:
        if binding.name not in sources:
            raise FailedPrecondition(f"spec.sandbox.secrets: {binding.name}: this attempt's "
                                     "executor gave it no source (only the local executor "
                                     "runs tasks with secrets)")
        values[binding.name] = value_at(sources[binding.name])
    return values


def _exit_record(proc, ending: str | None) -> dict:
    """The attempt's exit record: how it ended, its return code, why in words, and the
    ExitReason word of its command's end (`exit_reason`)."""
    rc = proc.returncode if proc.returncode is not None else -9
    if ending is not None:
        cancelled = ending == "cancelled"
        return {"outcome": ending, "returncode": rc,
                "reason": "cancelled" if cancelled else "max runtime reached",
                "exit_reason": "cancelled" if cancelled else "timeout"}
    if rc == 0:
        return {"outcome": "succeeded", "returncode": 0, "reason": "exited 0",
                "exit_reason": "exited"}
    why = f"exited {rc}" if rc > 0 else f"killed by signal {-rc}"
    word = "exited" if rc > 0 else "signaled"
    if proc.reason == ExitReason.OOM:
        why, word = "killed by the memory limit (OOM)", "oom"
    elif proc.reason == ExitReason.TIMEOUT:
        why, word = "killed by its command timeout", "timeout"
    return {"outcome": "failed", "returncode": rc, "reason": why, "exit_reason": word}


def process_alive(pid: int, start: int | None) -> bool:
    """pid is running (not a zombie) and is the same process (start time)."""
    now = live_start_time(pid)
    return now is not None and (start is None or now == start)
