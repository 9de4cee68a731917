"""corral.calls: each SDK operation as data, a `Call` (which RPC, what request, how to read
the answer), built once here and run by both `corral.Client` (grpc) and `corral.AsyncClient`
(grpc.aio). The friendly arguments ("256M", "30s", state names) are parsed here, so both
clients refuse the same bad input with the same InvalidArgument naming the argument.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO, Self

import grpc

from corral.v1 import sandbox_pb2, session_pb2, snapshot_pb2, task_pb2

from . import types
from .errors import InvalidArgument, error_for

#: SDK argument -> SandboxSpec field, for the arguments given as sizes ("256M", or bytes).
SIZE_ARGS = {"memory": "memory_bytes", "tmp": "tmp_bytes"}
#: SDK argument -> SandboxSpec's Duration field, for the arguments given as durations ("30s",
#: "2h", seconds or a timedelta).
DURATION_ARGS = {"ttl": "ttl", "command_timeout": "command_timeout"}
#: SandboxSpec fields taken as they are.
PLAIN_ARGS = ("profile", "pids_max", "cpus", "env", "hostname", "allow_net", "backend",
              "image", "snapshot", "workspace_dir", "workspace_cow", "secrets")


def invalid(argument: str, problem: str) -> InvalidArgument:
    """The error of a bad argument, shaped like the daemon's (`argument: problem`)."""
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{argument}: {problem}")


def size(value: str | int, argument: str) -> int:
    """Bytes of "256M", "2G", "64KiB" or a plain count.

    Raises:
        InvalidArgument: naming argument ("memory: '12Q' is not a size; use e.g. 512M or 2G").
    """
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import parse_size

    try:
        return parse_size(value, argument)
    except InvalidSpec as exc:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def duration(value: str | float | int | timedelta, argument: str) -> float:
    """Seconds of "30s", "5m", "1m30s", "500ms", a plain number or a timedelta.

    Raises:
        InvalidArgument: naming argument.
    """
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import parse_duration

    if isinstance(value, timedelta):
        value = value.total_seconds()
    try:
        return parse_duration(value, argument)
    except InvalidSpec as exc:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def sandbox_spec(settings: Mapping[str, Any]) -> sandbox_pb2.SandboxSpec:
    """A SandboxSpec of the SDK's sandbox arguments (memory="256M", ttl="30m", image=...).

    Raises:
        InvalidArgument: naming an unknown argument or a value that does not parse.
    """
    fields: dict[str, Any] = {}
    for name, value in settings.items():
        if value is None:
            continue
        if name in SIZE_ARGS:
            fields[SIZE_ARGS[name]] = size(value, name)
        elif name in DURATION_ARGS:
            seconds = duration(value, name)
            fields[DURATION_ARGS[name]] = timedelta(
                seconds=math.ceil(seconds) if name == "ttl" else seconds)
        elif name in PLAIN_ARGS:
            fields[name] = value
        else:
            known = ", ".join((*SIZE_ARGS, *DURATION_ARGS, *PLAIN_ARGS))
            raise invalid(name, f"not a sandbox setting (one of: {known})")
    try:
        return sandbox_pb2.SandboxSpec(**fields)
    except (TypeError, ValueError) as exc:
        raise invalid("sandbox", str(exc)) from None


def state_number(enum, prefix: str, state: str | None, argument: str = "state") -> int:
    """The enum number of a state name ("running" -> SANDBOX_STATE_RUNNING); None: 0."""
    if not state:
        return 0
    try:
        return enum.Value(prefix + state.upper())
    except ValueError:
        names = [n.removeprefix(prefix).lower() for n in enum.keys()][1:]
        raise invalid(argument, f"{state!r} is not one of {', '.join(names)}") from None


@dataclass(frozen=True)
class Call:
    """One RPC: the stub (`service`, an attribute of runtime.client.Client), its method,
    the request, and `convert`, which turns each answer into what the SDK returns (for a
    stream, None skips an answer)."""

    service: str
    method: str
    request: Any
    convert: Callable[[Any], Any]
    timeout: float | None = 60.0
    #: A stream whose convert returns a list per answer (a batch), each item yielded alone.
    many: bool = False


@dataclass(frozen=True)
class Paged:
    """A List RPC read page by page: `first` is the call of the first page, `items` the
    field of the answer holding the items, converted one by one with `convert`."""

    first: Call
    items: str
    convert: Callable[[Any], Any]

    def next_call(self, answer) -> Call | None:
        """The call of the page after `answer`; None after the last."""
        if not answer.next_page_token:
            return None
        request = type(self.first.request)()
        request.CopyFrom(self.first.request)
        request.page_token = answer.next_page_token
        return Call(self.first.service, self.first.method, request, self.first.convert,
                    self.first.timeout)


def _same(answer):
    return answer


# -- sandboxes ------------------------------------------------------------------------------

def create_sandbox(labels: Mapping[str, str] | None, request_id: str,
                   settings: Mapping[str, Any]) -> Call:
    return Call("sandboxes", "Create", sandbox_pb2.CreateSandboxRequest(
        spec=sandbox_spec(settings), labels=labels or {}, request_id=request_id),
        types.Sandbox.from_proto)


def get_sandbox(sandbox_id: str) -> Call:
    return Call("sandboxes", "Get", sandbox_pb2.GetSandboxRequest(sandbox_id=sandbox_id),
                types.Sandbox.from_proto)


def _listing(service: str, request_type, enum, prefix: str, convert, selector: str,
             state: str | None) -> Paged:
    """A List of `service` by label selector and state name, read page by page from the
    answer's field named like the service, each item made by `convert`."""
    number = state_number(enum, prefix, state)
    return Paged(Call(service, "List", request_type(selector=selector, state=number), _same),
                 service, convert)


def list_sandboxes(selector: str, state: str | None) -> Paged:
    return _listing("sandboxes", sandbox_pb2.ListSandboxesRequest, sandbox_pb2.SandboxState,
                    "SANDBOX_STATE_", types.Sandbox.from_proto, selector, state)


def destroy_sandbox(sandbox_id: str) -> Call:
    return Call("sandboxes", "Destroy", sandbox_pb2.DestroySandboxRequest(
        sandbox_id=sandbox_id), lambda answer: answer.already_destroyed)


def pause(sandbox_id: str) -> Call:
    return Call("sandboxes", "Pause", sandbox_pb2.PauseSandboxRequest(sandbox_id=sandbox_id),
                types.Sandbox.from_proto)


def resume(sandbox_id: str) -> Call:
    return Call("sandboxes", "Resume", sandbox_pb2.ResumeSandboxRequest(
        sandbox_id=sandbox_id), types.Sandbox.from_proto)


def set_timeout(sandbox_id: str, ttl: str | float) -> Call:
    return Call("sandboxes", "SetTimeout", sandbox_pb2.SetTimeoutRequest(
        sandbox_id=sandbox_id, ttl=timedelta(seconds=math.ceil(duration(ttl, "ttl")))),
        types.Sandbox.from_proto)


def exec_command(sandbox_id: str, argv: list[str], env: Mapping[str, str] | None, cwd: str,
                 stdin: bytes, timeout: str | float | None, allow_loss: bool) -> Call:
    """Exec as a stream of typed events (ExecStarted, ExecOutput..., ExecExited)."""
    if isinstance(argv, str) or not argv:
        raise invalid("argv", "must be a non-empty list of strings, e.g. ['echo', 'hi']")
    request = sandbox_pb2.ExecRequest(sandbox_id=sandbox_id, argv=argv, env=env or {},
                                      cwd=cwd, stdin=stdin, allow_loss=allow_loss)
    if timeout is not None:
        request.timeout.FromTimedelta(timedelta(seconds=duration(timeout, "timeout")))
    return Call("sandboxes", "Exec", request, types.exec_event, None)


def read_file(sandbox_id: str, path: str, max_bytes: str | int | None) -> Call:
    limit = size(max_bytes, "max_bytes") if max_bytes is not None else 0
    return Call("sandboxes", "ReadFile", sandbox_pb2.ReadFileRequest(
        sandbox_id=sandbox_id, path=path, max_bytes=limit), lambda answer: answer.content)


def write_file(sandbox_id: str, path: str, content: bytes | str, mode: int) -> Call:
    data = content.encode() if isinstance(content, str) else bytes(content)
    return Call("sandboxes", "WriteFile", sandbox_pb2.WriteFileRequest(
        sandbox_id=sandbox_id, path=path, content=data, mode=mode), lambda answer: answer.size)


def list_files(sandbox_id: str, path: str) -> Call:
    return Call("sandboxes", "ListFiles", sandbox_pb2.ListFilesRequest(
        sandbox_id=sandbox_id, path=path),
        lambda answer: [types.FileEntry.from_proto(e) for e in answer.entries])


# -- files at any size ----------------------------------------------------------------------

#: Bytes per upload chunk and per tar piece sent: a quarter of the 4 MiB a chunk may hold.
PIECE = 1 << 20

#: What an upload or an archive reads: bytes, a local path, or a binary file object (read
#: from where it stands; never closed by the SDK).
Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO
#: Where a download or an archive goes: a local path (created or, for a resumed download,
#: continued) or a writable binary file object (written from where it stands).
Dest = str | os.PathLike | BinaryIO


def _is_path(value) -> bool:
    return isinstance(value, str | os.PathLike)


def _open_source(source: Source, argument: str) -> tuple[BinaryIO, bool]:
    """The source as a binary file object, and whether the SDK opened it (and closes it)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), True
    if _is_path(source):
        try:
            return open(source, "rb"), True  # noqa: SIM115 - closed by the transfer
        except OSError as exc:
            raise invalid(argument, f"cannot read {os.fspath(source)!r}: "
                                    f"{exc.strerror}") from None
    if callable(getattr(source, "read", None)):
        return source, False
    raise invalid(argument, f"must be bytes, a local path or a binary file object, "
                            f"not {type(source).__name__}")


def _zeros(count: int) -> Iterator[bytes]:
    """count zero bytes in pieces of at most PIECE (a hole, without holding it whole)."""
    while count > 0:
        piece = min(count, PIECE)
        yield bytes(piece)
        count -= piece


def _checked(size: int, sha256: str, digest, what: str) -> None:
    """Refuse (DATA_LOSS) a transfer whose daemon-side digest is not the SDK's count."""
    if sha256 != digest.hexdigest():
        raise error_for(grpc.StatusCode.DATA_LOSS,
                        f"{what}: sha256 of bytes 0 to {size} is {sha256} at the daemon "
                        f"but {digest.hexdigest()} here")


def _open_dest(where, mode: str) -> BinaryIO:
    """The local file a transfer writes, opened; the transfer closes it."""
    try:
        return open(where, mode)  # noqa: SIM115 - closed by the transfer's __exit__
    except OSError as exc:
        raise invalid("dest", f"cannot write {os.fspath(where)!r}: {exc.strerror}") from None


class _Sending:
    """The source of a call that streams it to the daemon, used as a context: the file the
    SDK opened for bytes or a path is closed on every path; a file object of the caller's
    is left open."""

    def __init__(self, source: Source, argument: str):
        self.file, self.owned = _open_source(source, argument)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.owned:
            self.file.close()


class _Receiving:
    """The destination of a call that streams to the SDK, used as a context: a path is
    opened by __enter__ (`_open`) and closed on every path; a file object of the caller's is
    written to and left open."""

    def __init__(self, dest: Dest):
        self.dest, self.owned = dest, _is_path(dest)

    def __enter__(self) -> Self:
        if self.owned:
            self.dest = self._open(self.dest)
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.dest.close()

    def _open(self, where) -> BinaryIO:
        return _open_dest(where, "wb")


class Upload(_Sending):
    """One Sandboxes.Upload, used as a context (the source is closed on every path).

    The bytes of source from `offset` go in PIECE chunks; the SDK hashes bytes 0 to the
    end as it reads them (for a resumed upload it reads the first `offset` bytes of the
    source too) and refuses an answer whose sha256 differs, so a resume that continued the
    wrong file is caught rather than trusted."""

    def __init__(self, sandbox_id: str, path: str, source: Source, mode: int, offset: int):
        if offset < 0:
            raise invalid("offset", f"{offset} is negative")
        super().__init__(source, "source")
        self.start = sandbox_pb2.UploadStart(sandbox_id=sandbox_id, path=path, mode=mode,
                                             offset=offset)
        self.digest = hashlib.sha256()
        self.sent = offset

    def __enter__(self) -> Upload:
        # contextlib's recipe for an __enter__ that cleans up after itself when it fails
        with contextlib.ExitStack() as on_failure:
            on_failure.callback(self.close)
            self._hash_prefix()
            on_failure.pop_all()
        return self

    def _hash_prefix(self) -> None:
        left = self.start.offset
        while left:
            piece = self.file.read(min(left, PIECE))
            if not piece:
                raise invalid("offset", f"{self.start.offset} is beyond the end of source "
                                        f"({self.start.offset - left} bytes)")
            self.digest.update(piece)
            left -= len(piece)

    def requests(self) -> Iterator[sandbox_pb2.UploadRequest]:
        yield sandbox_pb2.UploadRequest(start=self.start)
        while piece := self.file.read(PIECE):
            self.digest.update(piece)
            yield sandbox_pb2.UploadRequest(chunk=sandbox_pb2.FileChunk(offset=self.sent,
                                                                        data=piece))
            self.sent += len(piece)
        yield sandbox_pb2.UploadRequest(end=sandbox_pb2.UploadEnd(size=self.sent))

    def finish(self, answer: sandbox_pb2.UploadResponse) -> types.Transfer:
        _checked(answer.size, answer.sha256, self.digest, f"upload of {self.start.path}")
        return types.Transfer(answer.size, answer.sha256, answer.bytes_received)

    def call(self) -> Call:
        return Call("sandboxes", "Upload", self.requests(), self.finish, None)


class Download(_Receiving):
    """One Sandboxes.Download, used as a context (a file it opened is closed on every path).

    To a path: the file holds the sandbox file's bytes at their own offsets (holes stay
    holes); offset > 0 continues that local file, whose first `offset` bytes are hashed so
    the whole result is checked. To a file object: the bytes from offset on, written in
    order (holes as zeros); only offset 0, so the check covers the whole file."""

    def __init__(self, sandbox_id: str, path: str, dest: Dest, offset: int, length: int):
        if offset < 0 or length < 0:
            raise invalid("offset" if offset < 0 else "length", "must not be negative")
        if offset and not _is_path(dest):
            raise invalid("offset", "a resumed download continues a local file: give dest "
                                    "as its path")
        super().__init__(dest)
        self.request = sandbox_pb2.DownloadRequest(sandbox_id=sandbox_id, path=path,
                                                   offset=offset, length=length)
        self.digest = hashlib.sha256()
        self.position = offset
        self.moved = 0
        self.end: sandbox_pb2.DownloadEnd | None = None

    def _open(self, where) -> BinaryIO:
        """The local file; a resumed download's first `offset` bytes of it hashed."""
        offset = self.request.offset
        file = _open_dest(where, "r+b" if offset else "wb")
        with contextlib.ExitStack() as on_failure:  # closed if reading or truncating fails
            on_failure.callback(file.close)
            held = 0
            while held < offset and (piece := file.read(min(offset - held, PIECE))):
                self.digest.update(piece)
                held += len(piece)
            if held < offset:
                raise invalid("offset", f"{offset} is beyond the end of "
                                        f"{os.fspath(where)!r} ({held} bytes)")
            file.truncate(offset)
            on_failure.pop_all()
        return file

    def _hole(self, upto: int) -> None:
        """Bytes position..upto are zeros: hashed, and skipped (own file) or written."""
        for piece in _zeros(upto - self.position):
            self.digest.update(piece)
            if not self.owned:
                self.dest.write(piece)
        if self.owned:
            self.dest.seek(upto)
        self.position = max(self.position, upto)

    def take(self, answer: sandbox_pb2.DownloadResponse) -> None:
        part = answer.WhichOneof("part")
        if part == "chunk":
            self._hole(answer.chunk.offset)
            self.digest.update(answer.chunk.data)
            self.dest.write(answer.chunk.data)
            self.position += len(answer.chunk.data)
            self.moved += len(answer.chunk.data)
        elif part == "end":
            self._hole(answer.end.size)
            if self.owned:
                self.dest.truncate(answer.end.size)
            self.end = answer.end

    def result(self) -> types.Transfer:
        if self.end is None:
            raise error_for(grpc.StatusCode.DATA_LOSS, f"download of {self.request.path}: "
                                                       f"the stream ended before its end")
        _checked(self.end.size, self.end.sha256, self.digest,
                 f"download of {self.request.path}")
        return types.Transfer(self.end.size, self.end.sha256, self.moved)

    def call(self) -> Call:
        return Call("sandboxes", "Download", self.request, _same, None)


class PutArchive(_Sending):
    """One Sandboxes.PutArchive (a tar stream of source extracted beneath path), used as a
    context (the source is closed on every path)."""

    def __init__(self, sandbox_id: str, path: str, source: Source):
        super().__init__(source, "archive")
        self.start = sandbox_pb2.PutArchiveStart(sandbox_id=sandbox_id, path=path)

    def requests(self) -> Iterator[sandbox_pb2.PutArchiveRequest]:
        yield sandbox_pb2.PutArchiveRequest(start=self.start)
        while piece := self.file.read(PIECE):
            yield sandbox_pb2.PutArchiveRequest(data=piece)

    def call(self) -> Call:
        return Call("sandboxes", "PutArchive", self.requests(),
                    types.ArchiveResult.from_proto, None)


class GetArchive(_Receiving):
    """One Sandboxes.GetArchive: the tar stream of path written to dest, used as a context
    (a file it opened is closed on every path); the result is the stat of path."""

    def __init__(self, sandbox_id: str, path: str, dest: Dest):
        super().__init__(dest)
        self.request = sandbox_pb2.GetArchiveRequest(sandbox_id=sandbox_id, path=path)
        self.stat: types.FileStat | None = None

    def take(self, answer: sandbox_pb2.GetArchiveResponse) -> None:
        if answer.WhichOneof("part") == "stat":
            self.stat = types.FileStat.from_proto(answer.stat)
        else:
            self.dest.write(answer.data)

    def call(self) -> Call:
        return Call("sandboxes", "GetArchive", self.request, _same, None)


def stat_file(sandbox_id: str, path: str) -> Call:
    return Call("sandboxes", "StatFile", sandbox_pb2.StatFileRequest(
        sandbox_id=sandbox_id, path=path), types.FileStat.from_proto)


def watch_files(sandbox_id: str, path: str) -> Call:
    """Sandboxes.WatchFiles as one FileEvent at a time, until the caller stops."""
    return Call("sandboxes", "WatchFiles", sandbox_pb2.WatchFilesRequest(
        sandbox_id=sandbox_id, path=path), types.file_events, None, many=True)


# -- snapshots ------------------------------------------------------------------------------

def snapshot(sandbox_id: str, name: str) -> Call:
    return Call("snapshots", "Create", snapshot_pb2.CreateSnapshotRequest(
        sandbox_id=sandbox_id, name=name), types.Snapshot.from_proto, 3600.0)


def list_snapshots() -> Call:
    return Call("snapshots", "List", snapshot_pb2.ListSnapshotsRequest(),
                lambda answer: [types.Snapshot.from_proto(s) for s in answer.snapshots])


def remove_snapshot(snapshot_ref: str) -> Call:
    return Call("snapshots", "Remove", snapshot_pb2.RemoveSnapshotRequest(
        snapshot=snapshot_ref), lambda answer: None)


# -- sessions -------------------------------------------------------------------------------

def session_start(argv: list[str], sandbox_id: str, input: str,
                  env: Mapping[str, str] | None, labels: Mapping[str, str] | None,
                  request_id: str, delegations_from: str,
                  settings: Mapping[str, Any]) -> session_pb2.SessionRequest:
    """The first request of Sessions.Open: in sandbox_id, or in a new sandbox of settings."""
    if isinstance(argv, str) or not argv:
        raise invalid("argv", "must be a non-empty list of strings, e.g. ['python3', 'a.py']")
    if sandbox_id and settings:
        raise invalid(next(iter(settings)), "a session in an existing sandbox takes no "
                                            "sandbox settings")
    start = session_pb2.SessionStart(argv=argv, input=input, env=env or {},
                                     labels=labels or {}, request_id=request_id,
                                     delegations_from=delegations_from)
    if sandbox_id:
        start.sandbox_id = sandbox_id
    else:
        start.spec.CopyFrom(sandbox_spec(settings))
    return session_pb2.SessionRequest(start=start)


def session_resume(session_id: str, after_seq: int, watch_only: bool
                   ) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(resume=session_pb2.SessionResume(
        session_id=session_id, after_seq=after_seq, watch_only=watch_only))


def session_input(text: str) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(input=session_pb2.SessionInput(text=text))


def session_interrupt() -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(interrupt=session_pb2.SessionInterrupt())


def session_close(detach: bool) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(close=session_pb2.SessionClose(detach=detach))


def get_session(session_id: str) -> Call:
    return Call("sessions", "Get", session_pb2.GetSessionRequest(session_id=session_id),
                types.SessionInfo.from_proto)


def list_sessions(selector: str, state: str | None) -> Paged:
    return _listing("sessions", session_pb2.ListSessionsRequest, session_pb2.SessionState,
                    "SESSION_STATE_", types.SessionInfo.from_proto, selector, state)


# -- deep tasks -----------------------------------------------------------------------------

#: submit_task options that are the task's own; any other is a setting of its sandbox.
TASK_OPTIONS = ("resources", "selector", "priority", "retries", "max_runtime", "files",
                "labels", "request_id", "parent_session")


def submit_task(argv: list[str], options: Mapping[str, Any]) -> Call:
    """Tasks.Submit: TASK_OPTIONS for the task, the other options for its sandbox."""
    if isinstance(argv, str) or not argv:
        raise invalid("argv", "must be a non-empty list of strings")
    own = {k: v for k, v in options.items() if k in TASK_OPTIONS}
    settings = {k: v for k, v in options.items() if k not in TASK_OPTIONS}
    runtime = own.get("max_runtime")
    files = {name: data.encode() if isinstance(data, str) else data
             for name, data in (own.get("files") or {}).items()}
    spec = task_pb2.TaskSpec(
        argv=argv, sandbox=sandbox_spec(settings), selector=own.get("selector") or {},
        resources=own.get("resources") or {}, priority=own.get("priority", 0),
        retries=own.get("retries", 0), files=files, labels=own.get("labels") or {})
    if runtime is not None:
        spec.max_runtime.FromTimedelta(timedelta(seconds=duration(runtime, "max_runtime")))
    return Call("tasks", "Submit", task_pb2.SubmitTaskRequest(
        spec=spec, request_id=own.get("request_id", ""),
        parent_session=own.get("parent_session", "")), types.Task.from_proto)


def get_task(task_id: str) -> Call:
    return Call("tasks", "Get", task_pb2.GetTaskRequest(task_id=task_id), types.Task.from_proto)


def list_tasks(state: str | None, selector: str, parent_session: str, limit: int) -> Call:
    number = state_number(task_pb2.TaskState, "TASK_STATE_", state)
    return Call("tasks", "List", task_pb2.ListTasksRequest(
        state=number, selector=selector, parent_session=parent_session, limit=limit),
        lambda answer: [types.Task.from_proto(t) for t in answer.tasks])


def cancel_task(task_id: str) -> Call:
    return Call("tasks", "Cancel", task_pb2.CancelTaskRequest(task_id=task_id),
                types.Task.from_proto)


def watch_task(task_id: str) -> Call:
    """Tasks.Watch as a stream of Task (each change) and TaskLog (its log lines)."""
    return Call("tasks", "Watch", task_pb2.WatchTaskRequest(task_id=task_id),
                types.task_update, None)


def task_result(task_id: str) -> Call:
    return Call("tasks", "Result", task_pb2.TaskResultRequest(task_id=task_id),
                types.TaskResult.from_proto)
