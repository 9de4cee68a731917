"""The MCP tools of `corral mcp`: each one is one or a few daemon RPCs through Client, so the
daemon checks, confines and audits every call exactly as it does for the CLI.

A failure (a bad argument, a refusal of the daemon) is raised; the SDK turns it into an MCP
tool error whose text is our message or the daemon's, never a traceback. Objects a tool
makes carry the labels mcp.corral.dev/client and mcp.corral.dev/client-version (the MCP
client's name and version from initialize), so their audit records say which agent asked.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from .live_sessions import LiveSession, LiveSessions

#: Bytes of stdout and of stderr an `exec` returns by default, and at most.
EXEC_OUTPUT_BYTES = 64 << 10
EXEC_OUTPUT_BYTES_MAX = 1 << 20
#: Bytes of a file `file_read` returns by default (the daemon's own cap is 4 MiB).
FILE_READ_BYTES = 256 << 10
#: Longest wait of session_read and task_status.
MAX_WAIT_S = 60.0
OPEN_TIMEOUT_S = 60.0
CLIENT_LABEL = "mcp.corral.dev/client"
CLIENT_VERSION_LABEL = "mcp.corral.dev/client-version"
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

INSTRUCTIONS = """\
Corral runs commands in isolated Linux sandboxes. Make one with sandbox_create, run commands
in it with exec, move files with file_write/file_read/file_list, and destroy it with
sandbox_destroy when done (it also expires after its ttl). Long-running agents go in
sessions (session_start, then session_read with the returned next_seq); long jobs go in
deep tasks (task_submit, task_status, task_result)."""

SandboxId = Annotated[str, Field(description="id of a sandbox, as sandbox_create returned it")]
Argv = Annotated[list[str], Field(min_length=1, description=(
    "the command and its arguments, e.g. [\"python3\", \"-c\", \"print(1)\"]; not a shell "
    "line: use [\"sh\", \"-c\", \"...\"] for pipes and redirections"))]
WaitS = Annotated[float, Field(ge=0, le=MAX_WAIT_S, description=(
    "seconds to wait for something new before answering (0: answer at once)"))]


def label_value(text: str) -> str:
    """text as a label value: runs of other characters become '-', at most 63, alphanumeric
    at both ends (runtime/labels.py's rule); '' when nothing is left."""
    return _LABEL_UNSAFE.sub("-", text)[:63].strip("._-")


def client_labels(ctx: Context | None) -> dict[str, str]:
    """The MCP client's name and version as labels, when it gave them."""
    params = ctx.session.client_params if ctx is not None else None
    info = params.client_info if params is not None else None
    if info is None:
        return {}
    found = {CLIENT_LABEL: label_value(info.name or ""),
             CLIENT_VERSION_LABEL: label_value(info.version or "")}
    return {k: v for k, v in found.items() if v}


def _spec(memory: str, cpus: float, pids: int, ttl: str, allow_net: list[str],
          image: str) -> dict[str, Any]:
    """SandboxSpec fields of the tools' policy arguments (unset ones left to the daemon).

    Raises:
        InvalidSpec: memory or ttl is not a size or a duration (the message names it).
    """
    from corral.sandbox.spec import parse_duration, parse_size

    spec: dict[str, Any] = {"allow_net": allow_net, "image": image, "cpus": cpus,
                            "pids_max": pids}
    if memory:
        spec["memory_bytes"] = parse_size(memory, "memory")
    if ttl:
        spec["ttl_s"] = max(1, round(parse_duration(ttl, "ttl")))
    return spec


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _sandbox(sb) -> dict[str, Any]:
    from corral.v1 import sandbox_pb2

    return {"sandbox_id": sb.id, "state": sandbox_pb2.SandboxState.Name(sb.state),
            "labels": dict(sb.labels)}


def _task(task) -> dict[str, Any]:
    from corral.v1 import task_pb2

    return {"task_id": task.id, "state": task_pb2.TaskState.Name(task.state)
            .removeprefix("TASK_STATE_"), "node": task.node, "attempt": task.attempt,
            "exit_code": task.exit_code, "reason": task.reason,
            "progress_json": task.progress_json}


class CorralTools:
    """The tools, bound to one daemon Client (shared: a grpc channel is thread-safe; the SDK
    runs each synchronous tool on a worker thread)."""

    def __init__(self, client) -> None:
        self.client = client
        self.sessions = LiveSessions()

    # -- sandboxes ---------------------------------------------------------------------------

    def sandbox_create(
        self,
        image: Annotated[str, Field(description=(
            "OCI image the daemon has pulled (`corral image pull`); empty: the daemon's "
            "default root filesystem"))] = "",
        memory: Annotated[str, Field(description="memory limit, e.g. 512M or 2G "
                                                 "(empty: the daemon's default)")] = "",
        cpus: Annotated[float, Field(ge=0, description="CPU limit in cores, e.g. 0.5 "
                                                       "(0: the daemon's default)")] = 0.0,
        pids: Annotated[int, Field(ge=0, description="most processes at once "
                                                     "(0: the daemon's default)")] = 0,
        ttl: Annotated[str, Field(description="destroy it after this long, e.g. 10m or 1h "
                                              "(empty: the daemon's default)")] = "",
        allow_net: Annotated[list[str], Field(description=(
            "egress allowed, e.g. [\"public\"] or host:port rules (empty: no network)"))] = [],  # noqa: B006
        labels: Annotated[dict[str, str], Field(description="labels to find it by")] = {},  # noqa: B006
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Create a sandbox under a policy; returns its sandbox_id for the other tools."""
        spec = _spec(memory, cpus, pids, ttl, list(allow_net), image)
        sb = self.client.create_sandbox(labels={**labels, **client_labels(ctx)}, **spec)
        return _sandbox(sb)

    def sandbox_destroy(self, sandbox_id: SandboxId) -> dict[str, Any]:
        """Destroy a sandbox: its processes are killed and its files are gone."""
        already = self.client.destroy_sandbox(sandbox_id)
        return {"sandbox_id": sandbox_id, "destroyed": True, "already_destroyed": already}

    def sandbox_list(
        self,
        selector: Annotated[str, Field(description="label selector, e.g. \"team=a,!tmp\" "
                                                   "(empty: all)")] = "",
    ) -> dict[str, Any]:
        """The running sandboxes of this caller."""
        return {"sandboxes": [_sandbox(sb) for sb in self.client.list_sandboxes(selector)]}

    # -- commands and files ------------------------------------------------------------------

    def exec(
        self,
        sandbox_id: SandboxId,
        argv: Argv,
        stdin: Annotated[str, Field(description="text given to the command's stdin")] = "",
        cwd: Annotated[str, Field(description="working directory (default /workspace)")] = "",
        timeout_s: Annotated[float, Field(ge=0, le=3600, description=(
            "kill the command after this many seconds (0: the daemon's default)"))] = 60.0,
        max_output_bytes: Annotated[int, Field(ge=1, le=EXEC_OUTPUT_BYTES_MAX, description=(
            "most bytes of stdout and of stderr returned; the rest is counted in "
            "stdout_truncated_bytes / stderr_truncated_bytes"))] = EXEC_OUTPUT_BYTES,
    ) -> dict[str, Any]:
        """Run a command to its end; returns exit_code, stdout, stderr and how it ended."""
        kept = {1: bytearray(), 2: bytearray()}
        dropped = {1: 0, 2: 0}
        exited = None
        for event in self.client.exec(sandbox_id, argv, stdin=stdin.encode(), cwd=cwd,
                                      timeout_s=timeout_s):
            kind = event.WhichOneof("event")
            if kind == "output":
                data, buf = event.output.batch.text, kept[event.output.stream]
                room = max(0, max_output_bytes - len(buf))
                buf += data[:room]
                dropped[event.output.stream] += len(data) - min(room, len(data))
            elif kind == "exited":
                exited = event.exited
        if exited is None:
            raise RuntimeError("the command's stream ended without an exit status")
        answer = {"exit_code": exited.returncode, "reason": exited.reason,
                  "duration_s": round(exited.duration_s, 3),
                  "stdout": _text(kept[1]), "stderr": _text(kept[2])}
        for stream, name in ((1, "stdout"), (2, "stderr")):
            if dropped[stream]:
                answer[f"{name}_truncated_bytes"] = dropped[stream]
                answer["note"] = (f"output over {max_output_bytes} bytes was cut; raise "
                                  "max_output_bytes or redirect it to a file and file_read it")
        return answer

    def file_write(
        self,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="path in the sandbox, relative to /workspace "
                                               "or absolute under it")],
        content: Annotated[str, Field(description="the file's whole text (UTF-8)")],
        mode: Annotated[int, Field(ge=0, le=0o7777, description="permission bits, "
                                                                 "e.g. 420 (0644)")] = 0o644,
    ) -> dict[str, Any]:
        """Create or replace a file in the sandbox."""
        size = self.client.write_file(sandbox_id, path, content.encode(), mode)
        return {"path": path, "size": size}

    def file_read(
        self,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="path in the sandbox")],
        max_bytes: Annotated[int, Field(ge=1, le=4 << 20, description=(
            "most bytes returned; truncated says whether the file is longer"))] = FILE_READ_BYTES,
    ) -> dict[str, Any]:
        """Read a file of the sandbox as text (invalid UTF-8 shows as U+FFFD)."""
        content = self.client.read_file(sandbox_id, path, max_bytes)
        return {"path": path, "content": _text(content), "size": len(content),
                "truncated": content.truncated}

    def file_list(
        self,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="directory in the sandbox "
                                               "(empty: /workspace)")] = "",
    ) -> dict[str, Any]:
        """List a directory of the sandbox: name, kind, size and mode of each entry."""
        entries = self.client.list_files(sandbox_id, path)
        return {"path": path, "entries": [
            {"name": e.name, "kind": e.kind, "size": e.size, "mode": e.mode}
            for e in entries]}

    # -- sessions ----------------------------------------------------------------------------

    def session_start(
        self,
        argv: Argv,
        sandbox_id: Annotated[str, Field(description=(
            "run the agent in this sandbox (kept after the session); empty: in a new "
            "sandbox of its own, destroyed when the session ends"))] = "",
        input: Annotated[str, Field(description="the agent's first input")] = "",
        memory: Annotated[str, Field(description="with a new sandbox: its memory limit, "
                                                 "e.g. 512M")] = "",
        labels: Annotated[dict[str, str], Field(description="labels to find it by")] = {},  # noqa: B006
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Start an agent command as a session; read what it says with session_read."""
        spec = _spec(memory, 0.0, 0, "", [], "") if not sandbox_id else {}
        stream = self.client.open_session(argv, sandbox_id=sandbox_id, input=input,
                                          labels={**labels, **client_labels(ctx)}, **spec)
        live = LiveSession(stream)
        try:
            view = live.wait_opened(OPEN_TIMEOUT_S)
        except RuntimeError:
            live.detach()
            raise
        self.sessions.add(live)
        return {"session_id": view.session_id, "sandbox_id": view.sandbox_id, "next_seq": 0}

    def session_read(
        self,
        session_id: Annotated[str, Field(description="id from session_start")],
        after_seq: Annotated[int, Field(ge=0, description=(
            "return tokens after this sequence number: 0 first, then the next_seq of "
            "the previous answer"))] = 0,
        wait_s: WaitS = 5.0,
        max_chars: Annotated[int, Field(ge=1, le=1 << 20, description=(
            "most characters of text returned (more: true says there is more)"))] = 16384,
    ) -> dict[str, Any]:
        """The agent's output since after_seq, its ended turns and, once it ended, its exit."""
        live = self.sessions.get_or_resume(self.client, session_id, OPEN_TIMEOUT_S)
        return live.read(after_seq, wait_s, max_chars)

    def session_steer(
        self,
        session_id: Annotated[str, Field(description="id from session_start")],
        text: Annotated[str, Field(description="input for the agent (one line or more)")],
    ) -> dict[str, Any]:
        """Send input to a running session's agent."""
        live = self.sessions.get_or_resume(self.client, session_id, OPEN_TIMEOUT_S)
        live.stream.send_input(text)
        return {"session_id": session_id, "sent_chars": len(text)}

    def session_interrupt(
        self,
        session_id: Annotated[str, Field(description="id from session_start")],
    ) -> dict[str, Any]:
        """Interrupt the agent's current turn (the session itself goes on)."""
        live = self.sessions.get_or_resume(self.client, session_id, OPEN_TIMEOUT_S)
        live.stream.interrupt()
        return {"session_id": session_id, "interrupted": True}

    # -- deep tasks --------------------------------------------------------------------------

    def task_submit(
        self,
        argv: Argv,
        image: Annotated[str, Field(description="OCI image to run it in (empty: the "
                                                "daemon's default root filesystem)")] = "",
        memory: Annotated[str, Field(description="memory limit, e.g. 1G")] = "",
        cpus: Annotated[float, Field(ge=0, description="CPU limit in cores")] = 0.0,
        max_runtime_s: Annotated[float, Field(ge=0, description=(
            "fail it after this many seconds of running (0: no limit)"))] = 0.0,
        files: Annotated[dict[str, str], Field(description=(
            "files put in its /workspace first: {relative path: text}"))] = {},  # noqa: B006
        labels: Annotated[dict[str, str], Field(description="labels to find it by")] = {},  # noqa: B006
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Submit a deep task: a command the daemon queues, places and runs to its end in a
        sandbox of its own. Files it leaves in /workspace/out are its result."""
        spec = _spec(memory, cpus, 0, "", [], image)
        task = self.client.submit_task(
            argv, max_runtime_s=max_runtime_s,
            files={path: text.encode() for path, text in files.items()},
            labels={**labels, **client_labels(ctx)}, **spec)
        return _task(task)

    def task_status(
        self,
        task_id: Annotated[str, Field(description="id from task_submit")],
        wait_s: WaitS = 0.0,
    ) -> dict[str, Any]:
        """A task's state; with wait_s, wait that long for the state to change first."""
        task = self.client.get_task(task_id)
        if wait_s > 0 and not _finished(task):
            task = self._next_state(task, wait_s)
        return _task(task)

    def _next_state(self, task, wait_s: float):
        """The task once its state differs from task's, or as it is after wait_s."""
        import grpc

        from corral.v1 import task_pb2

        call = self.client.tasks.Watch(task_pb2.WatchTaskRequest(task_id=task.id),
                                       metadata=self.client.metadata, timeout=wait_s)
        latest = task
        try:
            for update in call:
                if update.WhichOneof("update") == "task":
                    latest = update.task
                    if latest.state != task.state:
                        break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
        finally:
            call.cancel()
        return latest

    def task_result(
        self,
        task_id: Annotated[str, Field(description="id of a finished task")],
        max_bytes: Annotated[int, Field(ge=1, le=4 << 20, description=(
            "most bytes of result files returned"))] = FILE_READ_BYTES,
    ) -> dict[str, Any]:
        """A finished task's result: its RESULT object and the files it left in
        /workspace/out (text; next_path says more files are waiting)."""
        page = self.client.task_result(task_id, max_bytes)
        return {**_task(page.task), "result_json": page.result_json,
                "files": [{"path": f.path, "content": _text(f.content)} for f in page.files],
                "next_path": page.next_path}

    # -- the server --------------------------------------------------------------------------

    def register(self, server: MCPServer) -> None:
        """Add every tool to server under its method's name."""
        for name in TOOL_NAMES:
            method = getattr(self, name)
            server.add_tool(_told(method), name=name, description=_description(method),
                            structured_output=True)


def _told(method):
    """method, its expected failures raised as ToolError so that the client reads their
    message (the SDK shows any other exception as a bare 'Error executing tool')."""
    from corral.runtime.client import ClientError
    from corral.sandbox.errors import CorralError

    @functools.wraps(method)
    def tool(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (ClientError, CorralError, RuntimeError) as exc:
            raise ToolError(str(exc)) from None

    return tool


TOOL_NAMES = ("sandbox_create", "sandbox_destroy", "sandbox_list", "exec", "file_write",
              "file_read", "file_list", "session_start", "session_read", "session_steer",
              "session_interrupt", "task_submit", "task_status", "task_result")


def _description(method) -> str:
    return " ".join((method.__doc__ or "").split())


def _finished(task) -> bool:
    from corral.v1 import task_pb2

    return task.state in (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED,
                          task_pb2.TASK_STATE_CANCELLED)


def build_server(client) -> tuple[MCPServer, CorralTools]:
    """The MCP server of `corral mcp`, its tools calling the daemon client speaks to."""
    from corral.runtime import __version__

    server = MCPServer(name="corral", version=__version__, instructions=INSTRUCTIONS,
                       log_level="WARNING")
    tools = CorralTools(client)
    tools.register(server)
    return server, tools
