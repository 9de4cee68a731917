"""corral.types: what the SDK returns, as plain dataclasses made from the daemon's answers.

No protobuf message leaves the SDK: each `from_proto` below copies the fields a platform
reads into a frozen dataclass (states as lower-case names, None for "not set"), so callers
never depend on the generated code.

Times are timezone-aware `datetime` (UTC) and lengths of time `timedelta`, read from the
API's typed google.protobuf.Timestamp / Duration fields: what Python code compares,
formats and adds without a unit to remember (the deprecated float seconds beside them on
the wire are not read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from corral.runtime.client import decode_batch
from corral.sandbox.exit_status import shell_status
from corral.v1 import sandbox_pb2, session_pb2, stream_pb2, task_pb2


def _when(msg, name: str) -> datetime | None:
    """The typed time `name` of msg as an aware UTC datetime; None where it is unset."""
    if not msg.HasField(name):
        return None
    return getattr(msg, name).ToDatetime(tzinfo=UTC)


def _state_name(enum, value: int, prefix: str) -> str:
    """SANDBOX_STATE_RUNNING -> "running"; an unknown number -> "unknown"."""
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return "unknown"


@dataclass(frozen=True)
class Sandbox:
    """A sandbox as the daemon reports it."""

    id: str
    state: str  # "running", "paused" or "destroyed"
    tenant: str
    labels: dict[str, str]
    memory_bytes: int
    cpus: float
    image: str
    snapshot: str  # the snapshot it started from ("" = none)
    created_at: datetime | None
    expires_at: datetime | None  # when its TTL destroys it (None: no TTL)

    @classmethod
    def from_proto(cls, sb: sandbox_pb2.Sandbox) -> Sandbox:
        return cls(id=sb.id, state=_state_name(sandbox_pb2.SandboxState, sb.state,
                                               "SANDBOX_STATE_"),
                   tenant=sb.tenant, labels=dict(sb.labels), memory_bytes=sb.spec.memory_bytes,
                   cpus=sb.spec.cpus, image=sb.spec.image, snapshot=sb.spec.snapshot,
                   created_at=_when(sb, "create_time"), expires_at=_when(sb, "expire_time"))


@dataclass(frozen=True)
class ExecStarted:
    """The command runs: the id to attach, signal or send input to, and its pid."""

    exec_id: str
    pid: int  # on the host (0 where a Docker engine does not say)


@dataclass(frozen=True)
class ExecOutput:
    """Bytes the command wrote, exactly as written, on "stdout" or "stderr"; lost counts
    entries dropped before this (only with allow_loss=True)."""

    stream: str
    data: bytes
    lost: int = 0


@dataclass(frozen=True)
class ExecExited:
    """How the command ended: returncode (-N when signal N ended it, as subprocess has it),
    the reason ("exited", "signaled", "timeout", "oom") and signal (N, or 0 for none; a
    timeout or OOM kill has its signal too). The shell's status is `exit_status`."""

    returncode: int
    reason: str
    duration: timedelta
    signal: int = 0

    @property
    def exit_status(self) -> int:
        """The exit code, or 128+N for signal N: what `corral exec` exits with."""
        return shell_status(self.returncode)


ExecEvent = ExecStarted | ExecOutput | ExecExited


def exec_event(ev: sandbox_pb2.ExecEvent) -> ExecEvent | None:
    """The typed form of one Exec/Attach answer (None for a kind this SDK does not know)."""
    kind = ev.WhichOneof("event")
    if kind == "started":
        return ExecStarted(ev.started.exec_id, ev.started.pid)
    if kind == "output":
        stream = "stderr" if ev.output.stream == sandbox_pb2.OUTPUT_STREAM_STDERR else "stdout"
        return ExecOutput(stream, ev.output.batch.text, ev.output.batch.lost.count)
    if kind == "exited":
        return ExecExited(ev.exited.returncode, ev.exited.reason,
                          ev.exited.duration.ToTimedelta(),
                          ev.exited.signal)
    return None


@dataclass(frozen=True)
class ExecResult:
    """A finished command: everything it wrote, and how it ended."""

    exec_id: str
    returncode: int
    reason: str
    stdout: bytes
    stderr: bytes
    duration: timedelta
    lost: int = 0  # output entries dropped (only with allow_loss=True)
    signal: int = 0  # the signal that ended the command (0: none)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class ExecCollector:
    """Folds a command's events into an ExecResult (shared by Client and AsyncClient)."""

    exec_id: str = ""
    out: dict[str, list[bytes]] = field(default_factory=lambda: {"stdout": [], "stderr": []})
    lost: int = 0
    exited: ExecExited | None = None

    def add(self, event: ExecEvent | None) -> None:
        if isinstance(event, ExecStarted):
            self.exec_id = event.exec_id
        elif isinstance(event, ExecOutput):
            self.out[event.stream].append(event.data)
            self.lost += event.lost
        elif isinstance(event, ExecExited):
            self.exited = event

    def result(self) -> ExecResult:
        ended = self.exited or ExecExited(-1, "the stream ended before the command",
                                          timedelta(0))
        return ExecResult(self.exec_id, ended.returncode, ended.reason,
                          b"".join(self.out["stdout"]), b"".join(self.out["stderr"]),
                          ended.duration, self.lost, ended.signal)


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory listing."""

    name: str
    kind: str  # "file", "dir", "link", ...
    size: int
    mode: int
    mtime: datetime | None

    @classmethod
    def from_proto(cls, e: sandbox_pb2.FileEntry) -> FileEntry:
        return cls(e.name, e.kind, e.size, e.mode, _when(e, "modify_time"))


@dataclass(frozen=True)
class Snapshot:
    """A captured sandbox state; `Client.fork(snapshot)` starts sandboxes from it."""

    id: str
    name: str
    source_sandbox: str
    parent: str
    image: str
    created_at: datetime | None
    size_bytes: int
    files: int

    @classmethod
    def from_proto(cls, s) -> Snapshot:
        return cls(s.id, s.name, s.source_sandbox, s.parent, s.image, _when(s, "create_time"),
                   s.size_bytes, s.files)


# -- sessions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    sandbox_id: str


@dataclass(frozen=True)
class Tokens:
    """Tokens the agent emitted; first_seq/last_seq number them (resume after last_seq)."""

    texts: list[str]
    first_seq: int
    last_seq: int
    lost: int = 0  # entries this watcher missed while it was behind

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass(frozen=True)
class TurnStarted:
    turn: int


@dataclass(frozen=True)
class TurnEnded:
    turn: int
    status: str  # "done", "interrupted", ...


@dataclass(frozen=True)
class SessionExited:
    """The agent ended: returncode (-N for signal N), reason ("exited", "signaled",
    "timeout", "oom", "closed", "idle", "daemon-shutdown") and signal (0: none)."""

    returncode: int
    reason: str
    signal: int = 0


@dataclass(frozen=True)
class SessionLagged:
    """This watcher fell behind the replay window: entries before first_available_seq
    are gone."""

    first_available_seq: int


@dataclass(frozen=True)
class SessionTaskNews:
    """News of a deep task the session delegated ("accepted", "update", "done", ...)."""

    event: str
    task_id: str
    ref: str
    state: str
    result_json: str


@dataclass(frozen=True)
class SessionRefused:
    """The daemon refused a request sent on the stream (the session goes on): the gRPC
    status name, its message, and the request field at fault."""

    code: str
    message: str
    field: str


SessionEvent = (SessionOpened | Tokens | TurnStarted | TurnEnded | SessionExited
                | SessionLagged | SessionTaskNews | SessionRefused)


def session_event(ev: session_pb2.SessionEvent) -> SessionEvent | None:
    """The typed form of one SessionEvent (None for a kind this SDK does not show)."""
    kind = ev.WhichOneof("event")
    if kind == "batch":  # a batch of only turn markers says nothing the turn events don't
        return _tokens(ev.batch) if ev.batch.lengths or ev.batch.lost.count else None
    if kind == "opened":
        return SessionOpened(ev.opened.session_id, ev.opened.sandbox_id)
    if kind == "turn_started":
        return TurnStarted(ev.turn_started.turn)
    if kind == "turn_ended":
        return TurnEnded(ev.turn_ended.turn, ev.turn_ended.status)
    if kind == "exited":
        return SessionExited(ev.exited.returncode, ev.exited.reason, ev.exited.signal)
    if kind == "lagged":
        return SessionLagged(ev.lagged.first_available_seq)
    if kind == "task":
        t = ev.task
        return SessionTaskNews(t.event, t.task_id, t.ref, t.state, t.result_json)
    if kind == "error":
        return SessionRefused(ev.error.code, ev.error.message, ev.error.field)
    return None


def batch_last_seq(batch) -> int:
    """The seq of a StreamBatch's last entry (tokens and events)."""
    return batch.first_seq + len(batch.lengths) + len(batch.events) - 1


def _tokens(batch) -> Tokens:
    decoded = decode_batch(batch)
    return Tokens(decoded.texts, decoded.first_seq, decoded.last_seq, decoded.lost)


@dataclass(frozen=True)
class SessionInfo:
    """A session as Sessions.Get/List report it."""

    id: str
    sandbox_id: str
    state: str  # "running" or "exited"
    labels: dict[str, str]
    turn: int
    last_seq: int
    watchers: int
    returncode: int
    reason: str

    @classmethod
    def from_proto(cls, s: session_pb2.SessionInfo) -> SessionInfo:
        return cls(s.session_id, s.sandbox_id,
                   _state_name(session_pb2.SessionState, s.state, "SESSION_STATE_"),
                   dict(s.labels), s.turn, s.last_seq, s.watchers, s.returncode, s.reason)


# -- deep tasks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A deep task as the daemon reports it."""

    id: str
    state: str  # "queued", "placed", "running", "retrying", "succeeded", "failed", "cancelled"
    argv: list[str]
    node: str
    attempt: int
    labels: dict[str, str]
    progress_json: str
    result_json: str
    reason: str
    exit_code: int
    parent_session: str
    submitted_at: datetime | None
    finished_at: datetime | None  # None until it finished
    #: Once finished, why its last command ended: "exited", "signaled", "timeout", "oom",
    #: "cancelled", or "unspecified" when no command's end decided it (pull failed, node
    #: lost); "" until it finished.
    exit_reason: str = ""
    signal: int = 0  # the signal that ended its last attempt (0: none)

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @classmethod
    def from_proto(cls, t: task_pb2.Task) -> Task:
        return cls(t.id, _state_name(task_pb2.TaskState, t.state, "TASK_STATE_"),
                   list(t.spec.argv), t.node, t.attempt, dict(t.spec.labels), t.progress_json,
                   t.result_json, t.reason, t.exit_code, t.parent_session,
                   _when(t, "submit_time"), _when(t, "finish_time"),
                   _state_name(stream_pb2.ExitReason, t.exit_reason, "EXIT_REASON_")
                   if t.HasField("finish_time") else "", t.signal)


@dataclass(frozen=True)
class TaskLog:
    """Lines of a task's log (Tasks.Watch interleaves them with Task updates)."""

    texts: list[str]


def task_update(update: task_pb2.TaskUpdate) -> Task | TaskLog | None:
    kind = update.WhichOneof("update")
    if kind == "task":
        return Task.from_proto(update.task)
    if kind == "log":
        return TaskLog(_tokens(update.log).texts)
    return None


@dataclass(frozen=True)
class TaskFile:
    path: str
    content: bytes
    truncated: bool


@dataclass(frozen=True)
class TaskResult:
    """A finished task's result: its JSON and its files (the first page of them)."""

    task: Task
    result_json: str
    files: list[TaskFile]

    @classmethod
    def from_proto(cls, r: task_pb2.TaskResult) -> TaskResult:
        return cls(Task.from_proto(r.task), r.result_json,
                   [TaskFile(f.path, f.content, f.truncated) for f in r.files])


# -- files at any size ----------------------------------------------------------------------

@dataclass(frozen=True)
class FileStat:
    """What the daemon knows of one path of the workspace (a link is never followed)."""

    path: str  # relative to /workspace ("." for the workspace itself)
    kind: str  # "file", "dir", "symlink" or "other"
    size: int
    mode: int
    mtime: datetime | None
    link_target: str  # "" unless kind == "symlink"
    allocated_bytes: int  # storage really used: less than size for a sparse file

    @classmethod
    def from_proto(cls, s: sandbox_pb2.FileStat) -> FileStat:
        return cls(s.path, s.kind, s.size, s.mode, _when(s, "modify_time"), s.link_target,
                   s.allocated_bytes)


@dataclass(frozen=True)
class Transfer:
    """The end of an upload or a download: the file's size there, the sha256 (hex) of its
    bytes 0 to size, which the SDK checked against its own count, and the data bytes this
    call moved (a resumed transfer moves less than size; holes are not moved)."""

    size: int
    sha256: str
    moved: int


@dataclass(frozen=True)
class ArchiveResult:
    """What a tar archive put into a sandbox made; skipped: devices, FIFOs and sockets left
    out (the first 16 of their names in skipped_names)."""

    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes: int
    skipped: int
    skipped_names: list[str]

    @classmethod
    def from_proto(cls, r: sandbox_pb2.PutArchiveResponse) -> ArchiveResult:
        return cls(r.files, r.dirs, r.symlinks, r.hardlinks, r.bytes, r.skipped,
                   list(r.skipped_names))


@dataclass(frozen=True)
class FileEvent:
    """One change under a watched directory. kind: "watching" (first, once: from here on
    nothing is missed; dropped = directories watched), "created", "modified", "attrib",
    "closed_write", "deleted", "moved_from", "moved_to" (a pair shares cookie), "overflow"
    (dropped events were lost: look again) or "limit" (dropped directories not watched)."""

    path: str  # relative to /workspace
    kind: str
    is_dir: bool
    cookie: int
    dropped: int

    @classmethod
    def from_proto(cls, e: sandbox_pb2.FileEvent) -> FileEvent:
        return cls(e.path, _state_name(sandbox_pb2.FileEventKind, e.kind, "FILE_EVENT_KIND_"),
                   e.is_dir, e.cookie, e.dropped)


def file_events(answer: sandbox_pb2.WatchFilesResponse) -> list[FileEvent]:
    """The typed events of one WatchFiles answer (a batch), in order."""
    return [FileEvent.from_proto(e) for e in answer.events]
