"""corral.calls: each SDK operation as data, a `Call` (which RPC, what request, how to read
the answer), built once here and run by both `corral.Client` (grpc) and `corral.AsyncClient`
(grpc.aio). The friendly arguments ("256M", "30s", state names) are parsed here, so both
clients refuse the same bad input with the same InvalidArgument naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from corral.v1 import sandbox_pb2, session_pb2, snapshot_pb2, task_pb2

from . import types
from .errors import InvalidArgument

#: SDK argument -> SandboxSpec field, for the arguments given as sizes ("256M", or bytes).
SIZE_ARGS = {"memory": "memory_bytes", "tmp": "tmp_bytes"}
#: SDK argument -> SandboxSpec field, for the arguments given as durations ("30s", "2h").
DURATION_ARGS = {"ttl": "ttl_s", "command_timeout": "command_timeout_s"}
#: SandboxSpec fields taken as they are.
PLAIN_ARGS = ("profile", "pids_max", "cpus", "env", "hostname", "allow_net", "backend",
              "image", "snapshot", "workspace_dir", "workspace_cow")


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


def duration(value: str | float | int, argument: str) -> float:
    """Seconds of "30s", "5m", "1m30s", "500ms" or a plain number.

    Raises:
        InvalidArgument: naming argument.
    """
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import parse_duration

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
            fields[DURATION_ARGS[name]] = math.ceil(seconds) if name == "ttl" else seconds
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


def list_sandboxes(selector: str, state: str | None) -> Paged:
    number = state_number(sandbox_pb2.SandboxState, "SANDBOX_STATE_", state)
    return Paged(Call("sandboxes", "List", sandbox_pb2.ListSandboxesRequest(
        selector=selector, state=number), _same), "sandboxes", types.Sandbox.from_proto)


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
        sandbox_id=sandbox_id, ttl_s=math.ceil(duration(ttl, "ttl"))), types.Sandbox.from_proto)


def exec_command(sandbox_id: str, argv: list[str], env: Mapping[str, str] | None, cwd: str,
                 stdin: bytes, timeout: str | float | None, allow_loss: bool) -> Call:
    """Exec as a stream of typed events (ExecStarted, ExecOutput..., ExecExited)."""
    if isinstance(argv, str) or not argv:
        raise invalid("argv", "must be a non-empty list of strings, e.g. ['echo', 'hi']")
    seconds = duration(timeout, "timeout") if timeout is not None else 0.0
    return Call("sandboxes", "Exec", sandbox_pb2.ExecRequest(
        sandbox_id=sandbox_id, argv=argv, env=env or {}, cwd=cwd, stdin=stdin,
        timeout_s=seconds, allow_loss=allow_loss), types.exec_event, None)


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
    number = state_number(session_pb2.SessionState, "SESSION_STATE_", state)
    return Paged(Call("sessions", "List", session_pb2.ListSessionsRequest(
        selector=selector, state=number), _same), "sessions", types.SessionInfo.from_proto)


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
        retries=own.get("retries", 0), files=files, labels=own.get("labels") or {},
        max_runtime_s=duration(runtime, "max_runtime") if runtime is not None else 0.0)
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
