"""Speak the Corral agent protocol v1 from a Python agent: stdlib only, one file, copy anywhere.

    import corral_agent as agent          # this file, under whatever name it was copied as
    agent.token("Hello, world")           # stream text as it is produced
    agent.turn_end("completed")           # end the turn

The runtime passes two pipe ends to a protocol-aware agent: CORRAL_EVENTS_FD (agent -> runtime)
and CORRAL_CONTROL_FD (runtime -> agent). Each carries frames `u32 LE length | u8 type |
payload` (docs/agent-protocol.md). Without those variables the helper still works: tokens go
to stdout, everything else to stderr as one line each, and no control message ever arrives,
so the same agent runs by hand.

Steering: call `poll()` between tokens (it never blocks) or `wait(timeout)`; each returns a
`Control` ("input" with its text, "interrupt", "shutdown") or None. End of the control pipe
reads as one "shutdown".

Delegation (protocol v1.1): `delegate(argv, selector={"accelerator": "gpu"}, ...)` hands a
deep task to the runtime and returns a `Delegation` whose `updates()`, `result()`,
`cancel()` and `send_input()` follow and steer it while the agent keeps streaming.
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple, TextIO

# This file is the agent protocol's one home: the runtime (runtime/streams.py, sessions.py,
# tasks/runner.py) imports these names from corral.ext.agent, and sandboxes get this same
# file as /opt/corral/lib/corral_agent.py. tests/unit/test_agent_protocol.py fails when a
# second copy of a number below appears. The token core (ext/_stream.pyx, _stream_py.py)
# parses the same frames and imports nothing; that test holds its FrameType equal to these.
PROTOCOL_VERSION = 1
PROTOCOL_ENV = "CORRAL_PROTOCOL"
EVENTS_FD_ENV = "CORRAL_EVENTS_FD"
CONTROL_FD_ENV = "CORRAL_CONTROL_FD"
#: Where the runtime puts the agent's ends of the two pipes inside a sandbox.
EVENTS_FD = 3
CONTROL_FD = 4

# frame types (docs/agent-protocol.md): agent -> runtime
TOKEN, TURN_END, PROGRESS, CHECKPOINT, RESULT, LOG, TOOL_CALL = range(1, 8)
# runtime -> agent
INPUT, INTERRUPT, SHUTDOWN = 0x81, 0x82, 0x83
# runtime -> agent, protocol v1.1: what became of the deep tasks a session delegated
TASK_ACCEPTED, TASK_REFUSED, TASK_UPDATE, TASK_DONE = 0x84, 0x85, 0x86, 0x87
#: v1.1 requests to the runtime travel as TOOL_CALL frames naming the runtime's own tools:
#: a v1 token core and every v1 watcher already carry them (docs/agent-protocol.md).
DELEGATE = "corral.delegate"
CANCEL_TASK = "corral.cancel_task"
TASK_INPUT = "corral.task_input"
#: Where a delegated task's result files appear in the session's sandbox: DIR/<task id>/.
TASK_RESULTS_DIR = "/workspace/.corral/tasks"
#: One empty file per task whose TASK_DONE an agent of this workspace has taken: a TASK_DONE
#: told again (the daemon died between sending it and storing that it did) is dropped.
TASKS_TOLD_DIR = "/workspace/.corral/told"
MAX_CONTROL_PAYLOAD = 1 << 20  # bytes; the runtime never sends more in one frame

HEADER = struct.Struct("<IB")  # payload length, frame type
_CONTROL_KINDS = {INPUT: "input", INTERRUPT: "interrupt", SHUTDOWN: "shutdown"}
_TASK_KINDS = {TASK_ACCEPTED: "accepted", TASK_REFUSED: "refused", TASK_UPDATE: "update",
               TASK_DONE: "done"}


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """One frame: `u32 LE payload length | u8 type | payload`."""
    return HEADER.pack(len(payload), frame_type) + payload


class TaskMessage(NamedTuple):
    """What the runtime says of a delegated task (v1.1): kind "accepted", "refused",
    "update" or "done", with the frame's JSON object as fields."""

    kind: str
    fields: dict


class Control(NamedTuple):
    """A message from the runtime: kind is "input", "interrupt", "shutdown", or "task" for
    news of a delegated task this agent holds no handle for (one delegated by an earlier
    agent of the session, told after it resumed): its text is the frame's JSON, with
    "event" naming the frame ("accepted", "refused", "update", "done")."""

    kind: str
    text: str = ""  # the steering text of an "input"; a "task" frame's JSON object


class DelegationRefused(Exception):
    """The runtime refused a delegation (TASK_REFUSED): code and message say why."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


class Delegation:
    """A deep task this agent delegated: its updates, its result, and steering it.

    Made by `Agent.delegate`; the runtime names the task in TASK_ACCEPTED (`task_id`), or
    refuses it (TASK_REFUSED). Reading updates reads the control pipe: input, interrupts
    and shutdowns met meanwhile are kept for the agent's next poll().
    """

    def __init__(self, agent: Agent, ref: str) -> None:
        self.agent = agent
        self.ref = ref
        self.task_id = ""
        self._messages: deque[TaskMessage] = deque()
        #: The TASK_DONE or TASK_REFUSED message, once it came.
        self.outcome: TaskMessage | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def _add(self, message: TaskMessage) -> None:
        if message.kind == "accepted":
            self.task_id = str(message.fields.get("task_id", ""))
        if message.kind in ("refused", "done"):
            self.outcome = message
        self._messages.append(message)

    def updates(self, timeout: float | None = None) -> Iterator[TaskMessage]:
        """The task's messages as they come, until its done (or refused) one; with a
        timeout, also stops once that many seconds pass with nothing new (0: only what is
        here already)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._messages:
                message = self.agent._took(self._messages.popleft())
                yield message
                if message.kind in ("refused", "done"):
                    return
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not self.agent._pump(left):
                return

    def result(self, timeout: float | None = None) -> dict:
        """Wait for the task to end; its TASK_DONE fields (state, result, out_dir).

        Raises:
            DelegationRefused: the runtime refused the delegation.
            TimeoutError: timeout seconds passed first, or the control pipe ended.
        """
        for _ in self.updates(timeout):
            pass
        if self.outcome is None:
            raise TimeoutError(f"delegation {self.ref!r} has not finished")
        if self.outcome.kind == "refused":
            raise DelegationRefused(str(self.outcome.fields.get("code", "")),
                                    str(self.outcome.fields.get("message", "")))
        return self.outcome.fields

    def cancel(self) -> None:
        """Ask the runtime to cancel the task (CANCEL_TASK); its TASK_DONE follows."""
        self.agent.tool_call(CANCEL_TASK, {"task_id": self.task_id, "ref": self.ref})

    def send_input(self, text: str) -> None:
        """Steer the running task: the runtime hands `text` to its agent as an INPUT."""
        self.agent.tool_call(TASK_INPUT, {"task_id": self.task_id, "ref": self.ref,
                                          "text": text})


class ProtocolError(Exception):
    """The control pipe carried bytes that are not protocol v1 frames."""


def _fd_from_env(env: Any, name: str) -> int | None:
    value = env.get(name, "")
    if value == "":
        return None
    try:
        fd = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a file descriptor number, got {value!r}") from None
    if fd < 0:
        raise ValueError(f"{name} must be a file descriptor number, got {value!r}")
    return fd


class Agent:
    """One agent's end of the protocol.

    Args:
        events_fd: where frames go; None reads CORRAL_EVENTS_FD (absent: stdout fallback).
        control_fd: where control frames come from; None reads CORRAL_CONTROL_FD.
        env: the environment to read those variables from.
        stdout, stderr: the fallback streams when there is no events fd.
        told_dir: where TASK_DONEs handed over are marked (TASKS_TOLD_DIR inside a sandbox).
    """

    def __init__(self, events_fd: int | None = None, control_fd: int | None = None, *,
                 env: Any = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, told_dir: str | None = None) -> None:
        env = os.environ if env is None else env
        self.events_fd = _fd_from_env(env, EVENTS_FD_ENV) if events_fd is None else events_fd
        self.control_fd = (_fd_from_env(env, CONTROL_FD_ENV) if control_fd is None
                           else control_fd)
        self._stdout = stdout
        self._stderr = stderr
        self._inbox = bytearray()
        self._control_open = self.control_fd is not None
        self._shutdown_owed = False  # the control pipe ended: say "shutdown" once
        self._held: deque[Control] = deque()  # read while pumping for a Delegation
        self._delegations: dict[str, Delegation] = {}  # by ref
        self._following: list[Delegation] = []  # whose messages news() has not all given
        self._by_task: dict[str, Delegation] = {}
        self._refs = 0
        self._routed = 0  # task frames handed to a Delegation, ever
        #: Where TASK_DONEs taken are marked (kept across agent restarts); None outside a
        #: sandbox (no /workspace), where only this process remembers them.
        self.told_dir = told_dir if told_dir is not None else (
            TASKS_TOLD_DIR if os.path.isdir("/workspace") else None)
        self._told_done: set[str] = set()
        if self.control_fd is not None:
            os.set_blocking(self.control_fd, False)

    @property
    def connected(self) -> bool:
        """True when frames go to the runtime, False in the stdout fallback."""
        return self.events_fd is not None

    # --- agent -> runtime ----------------------------------------------------------------

    def token(self, text: str) -> None:
        """Stream one piece of output text."""
        if self.events_fd is None:
            out = self._stdout or sys.stdout
            out.write(text)
            out.flush()
            return
        self._send(TOKEN, text.encode("utf-8"))

    def turn_end(self, status: str = "completed", **fields: Any) -> None:
        """End the current turn: status "completed", "interrupted", "failed", or your own."""
        if self.events_fd is None:
            out = self._stdout or sys.stdout
            out.write("\n")
            out.flush()
            self._note("turn_end", {"status": status, **fields})
            return
        self._send(TURN_END, _json({"status": status, **fields}))

    def progress(self, fields: dict | None = None, /, **more: Any) -> None:
        """Report progress, e.g. progress(done=3, total=10, message="parsing")."""
        self._event(PROGRESS, "progress", {**(fields or {}), **more})

    def checkpoint(self, data: bytes) -> None:
        """Hand the runtime state to resume from (opaque bytes, at most 1 MiB by default)."""
        if self.events_fd is None:
            self._note("checkpoint", {"bytes": len(data)})
            return
        self._send(CHECKPOINT, bytes(data))

    def result(self, value: dict | None = None, /, **more: Any) -> None:
        """Report the task's final result (a JSON object)."""
        self._event(RESULT, "result", {**(value or {}), **more})

    def log(self, message: str) -> None:
        """A diagnostic line: recorded, not shown as part of the answer."""
        if self.events_fd is None:
            self._note("log", message)
            return
        self._send(LOG, message.encode("utf-8"))

    def tool_call(self, name: str, arguments: Any = None, **fields: Any) -> None:
        """Announce a tool call the agent is making (for the audit trail and for watchers)."""
        self._event(TOOL_CALL, "tool_call", {"name": name, "arguments": arguments, **fields})

    def delegate(self, argv: list[str], *, image: str = "", selector: dict | None = None,
                 resources: dict | None = None, priority: int = 0, max_runtime_s: float = 0,
                 retries: int = 0, files: list[str] | tuple = (), labels: dict | None = None,
                 ref: str = "") -> Delegation:
        """Hand a deep task to the runtime (DELEGATE); it runs as this session's tenant.

        Args:
            argv: the task's command; image: its root filesystem (empty: the host's /usr).
            selector: node labels it needs, e.g. {"accelerator": "gpu"}.
            resources: amounts it holds, e.g. {"cpu": 2}; priority 0-1000.
            max_runtime_s: seconds before it is stopped (0: no limit).
            files: paths in this session's /workspace copied into the task's /workspace.
            ref: this agent's name for it (default d1, d2, ...), echoed in TASK_ACCEPTED.
        """
        self._refs += 1
        ref = ref or f"d{self._refs}"
        handle = Delegation(self, ref)
        spec = {"argv": list(argv), "image": image, "selector": selector or {},
                "resources": resources or {}, "priority": priority,
                "max_runtime_s": max_runtime_s, "retries": retries, "files": list(files),
                "labels": labels or {}}
        if self.events_fd is None:  # run by hand: nobody to run it
            self._note("delegate", spec)
            handle._add(TaskMessage("refused", {"ref": ref, "code": "UNAVAILABLE",
                                                "message": "no Corral runtime is connected"}))
            return handle
        self._delegations[ref] = handle
        self._following.append(handle)
        self.tool_call(DELEGATE, spec, id=ref)
        return handle

    def news(self) -> Iterator[tuple[Delegation, TaskMessage]]:
        """Every task message of this agent's delegations not taken yet, as (handle,
        message), oldest delegation first; reads what the control pipe holds, never
        blocks. What an agent looks at between its own tokens."""
        self._pump(0)
        for handle in list(self._following):
            while handle._messages:
                yield handle, self._took(handle._messages.popleft())
            if handle.done:
                self._following.remove(handle)

    def _event(self, frame_type: int, label: str, obj: dict) -> None:
        if self.events_fd is None:
            self._note(label, obj)
            return
        self._send(frame_type, _json(obj))

    def _note(self, label: str, what: Any) -> None:
        err = self._stderr or sys.stderr
        text = what if isinstance(what, str) else json.dumps(what, sort_keys=True)
        err.write(f"corral {label}: {text}\n")
        err.flush()

    def _send(self, frame_type: int, payload: bytes) -> None:
        data = memoryview(encode_frame(frame_type, payload))
        while data:
            written = os.write(self.events_fd, data)
            data = data[written:]

    # --- runtime -> agent ----------------------------------------------------------------

    def poll(self) -> Control | None:
        """The next control message if one has arrived, else None; never blocks.

        Raises:
            ProtocolError: the control pipe does not carry protocol v1 frames.
        """
        if self._held:
            return self._held.popleft()
        return self._read_control()

    def _pump(self, timeout: float | None) -> bool:
        """Read control frames for a Delegation (up to timeout seconds, None: until one
        comes); other messages are held for poll(). False once the pipe has ended."""
        routed = self._routed
        message = self._read_control()
        if message is None and self._routed == routed and self._control_open:
            readable, _, _ = select.select([self.control_fd], [], [], timeout)
            message = self._read_control() if readable else None
        if message is not None:
            self._held.append(message)
        return self._control_open or message is not None

    def _read_control(self) -> Control | None:
        message = self._next_message()
        if message is not None or self.control_fd is None:
            return message
        while self._control_open:
            try:
                chunk = os.read(self.control_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self._control_open = False
                self._shutdown_owed = True
                break
            self._inbox += chunk
        message = self._next_message()
        if message is None and self._shutdown_owed:
            self._shutdown_owed = False
            return Control("shutdown")
        return message

    def wait(self, timeout: float | None = None) -> Control | None:
        """Block until a control message arrives or `timeout` seconds pass (None: forever)."""
        message = self.poll()
        if message is not None or not self._control_open:
            return message
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # task frames for a handle are no message: wait on past them
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.control_fd], [], [], left)
            message = self.poll() if readable else None
            if message is not None or not readable or not self._control_open:
                return message

    def _next_message(self) -> Control | None:
        inbox = self._inbox
        while len(inbox) >= HEADER.size:
            length, frame_type = HEADER.unpack_from(inbox)
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError(
                    f"control frame of {length} bytes exceeds {MAX_CONTROL_PAYLOAD}; "
                    f"the control pipe is not speaking protocol v{PROTOCOL_VERSION}")
            end = HEADER.size + length
            if len(inbox) < end:
                return None
            payload = bytes(inbox[HEADER.size:end])
            del inbox[:end]
            kind = _CONTROL_KINDS.get(frame_type)
            if kind is not None:
                text = payload.decode("utf-8", "replace") if frame_type == INPUT else ""
                return Control(kind, text)
            if frame_type not in _TASK_KINDS:
                continue  # a type from a newer protocol revision: ignore it
            text = payload.decode("utf-8", "replace")
            try:
                fields = json.loads(text)
            except ValueError:
                fields = None
            if not isinstance(fields, dict):
                continue  # not what v1.1 sends: ignore it like an unknown type
            if frame_type == TASK_DONE and self._repeat(fields):
                continue  # this workspace's agents were told already: once only
            message = TaskMessage(_TASK_KINDS[frame_type], fields)
            if not self._route(message):
                self._took(message)
                return Control("task", json.dumps({"event": message.kind, **fields}))
        return None

    def _repeat(self, fields: dict) -> bool:
        """True for a TASK_DONE of a task whose end an agent of this workspace was handed
        already (its marker is in told_dir) or that this agent read before.

        The runtime sends TASK_DONE and then stores that it did; a daemon killed between
        the two sends it again after its restart, and the repeat is dropped here, so the
        agent hears each task's end once."""
        task_id = str(fields.get("task_id", ""))
        if task_id in self._told_done:
            return True
        self._told_done.add(task_id)
        path = self._told_path(task_id)
        return path is not None and os.path.exists(path)

    def _took(self, message: TaskMessage) -> TaskMessage:
        """Mark a TASK_DONE in told_dir as it is handed to the agent's code (not when read:
        an agent that dies before taking it is told again)."""
        path = self._told_path(str(message.fields.get("task_id", "")))
        if message.kind == "done" and path is not None:
            try:
                os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            except OSError:
                pass  # no marker can be kept (e.g. a read-only workspace): this process knows
        return message

    def _told_path(self, task_id: str) -> str | None:
        if self.told_dir is None or not task_id or "/" in task_id or task_id in (".", ".."):
            return None
        return os.path.join(self.told_dir, task_id)

    def _route(self, message: TaskMessage) -> bool:
        """Hand a task message to its Delegation; False when this agent holds none."""
        fields = message.fields
        if message.kind in ("accepted", "refused"):
            handle = self._delegations.get(str(fields.get("ref", "")))
        else:
            handle = self._by_task.get(str(fields.get("task_id", "")))
        if handle is None:
            return False
        handle._add(message)
        self._routed += 1
        if message.kind == "accepted":
            self._by_task[handle.task_id] = handle
        if message.kind in ("refused", "done"):
            self._delegations.pop(handle.ref, None)
            self._by_task.pop(handle.task_id, None)
        return True


def _json(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


_default: Agent | None = None


def default_agent() -> Agent:
    """The process-wide Agent the module-level functions use, made on first use."""
    global _default
    if _default is None:
        _default = Agent()
    return _default


def token(text: str) -> None:
    default_agent().token(text)


def turn_end(status: str = "completed", **fields: Any) -> None:
    default_agent().turn_end(status, **fields)


def progress(fields: dict | None = None, /, **more: Any) -> None:
    default_agent().progress(fields, **more)


def checkpoint(data: bytes) -> None:
    default_agent().checkpoint(data)


def result(value: dict | None = None, /, **more: Any) -> None:
    default_agent().result(value, **more)


def log(message: str) -> None:
    default_agent().log(message)


def tool_call(name: str, arguments: Any = None, **fields: Any) -> None:
    default_agent().tool_call(name, arguments, **fields)


def delegate(argv: list[str], **spec: Any) -> Delegation:
    return default_agent().delegate(argv, **spec)


def news() -> Iterator[tuple[Delegation, TaskMessage]]:
    return default_agent().news()


def poll() -> Control | None:
    return default_agent().poll()


def wait(timeout: float | None = None) -> Control | None:
    return default_agent().wait(timeout)
