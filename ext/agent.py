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
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
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
MAX_CONTROL_PAYLOAD = 1 << 20  # bytes; the runtime never sends more in one frame

HEADER = struct.Struct("<IB")  # payload length, frame type
_CONTROL_KINDS = {INPUT: "input", INTERRUPT: "interrupt", SHUTDOWN: "shutdown"}


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """One frame: `u32 LE payload length | u8 type | payload`."""
    return HEADER.pack(len(payload), frame_type) + payload


class Control(NamedTuple):
    """A message from the runtime: kind is "input", "interrupt" or "shutdown"."""

    kind: str
    text: str = ""  # the steering text of an "input"


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
    """

    def __init__(self, events_fd: int | None = None, control_fd: int | None = None, *,
                 env: Any = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        env = os.environ if env is None else env
        self.events_fd = _fd_from_env(env, EVENTS_FD_ENV) if events_fd is None else events_fd
        self.control_fd = (_fd_from_env(env, CONTROL_FD_ENV) if control_fd is None
                           else control_fd)
        self._stdout = stdout
        self._stderr = stderr
        self._inbox = bytearray()
        self._control_open = self.control_fd is not None
        self._shutdown_owed = False  # the control pipe ended: say "shutdown" once
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
        readable, _, _ = select.select([self.control_fd], [], [], timeout)
        return self.poll() if readable else None

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
            if kind is None:
                continue  # a type from a newer protocol revision: ignore it
            text = payload.decode("utf-8", "replace") if frame_type == INPUT else ""
            return Control(kind, text)
        return None


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


def poll() -> Control | None:
    return default_agent().poll()


def wait(timeout: float | None = None) -> Control | None:
    return default_agent().wait(timeout)
