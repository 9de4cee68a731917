"""The agent-side helper (ext/agent.py) against the token core, over real pipes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.ext import _stream_py as core
from corral.ext import agent as helper

AGENT_FILE = Path(helper.__file__)


class Pipes:
    """Both pipes of one agent; closes whatever the test left open."""

    def __init__(self) -> None:
        self.events_r, self.events_w = os.pipe()
        self.control_r, self.control_w = os.pipe()
        self.open = {self.events_r, self.events_w, self.control_r, self.control_w}
        self.agent = helper.Agent(self.events_w, self.control_r, env={})

    def close(self, fd: int) -> None:
        self.open.remove(fd)
        os.close(fd)


@pytest.fixture
def pipes():
    p = Pipes()
    yield p.agent, p.events_r, p.control_w, p
    for fd in list(p.open):
        p.close(fd)


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_every_event_reaches_the_core(pipes):
    agent, events_r, _, _ = pipes
    assert agent.connected
    agent.token("Hel")
    agent.token("lo ✓")
    agent.progress(done=1, total=2)
    agent.checkpoint(b"\x00state")
    agent.tool_call("grep", {"pattern": "x"}, id="t1")
    agent.log("warming up")
    agent.result({"answer": 42})
    agent.turn_end("completed", tokens=2)
    stream = core.TokenStream()
    stream.feed(_drain(events_r))
    stream.close()
    entries = [stream.get(s) for s in range(1, stream.next_seq)]
    assert [(e.kind.name, e.payload) for e in entries] == [
        ("TOKEN", b"Hel"),
        ("TOKEN", "lo ✓".encode()),
        ("PROGRESS", b'{"done":1,"total":2}'),
        ("CHECKPOINT", b"\x00state"),
        ("TOOL_CALL", b'{"name":"grep","arguments":{"pattern":"x"},"id":"t1"}'),
        ("LOG", b"warming up"),
        ("RESULT", b'{"answer":42}'),
        ("TURN_END", b'{"status":"completed","tokens":2}'),
    ]
    assert stream.statistics().errors == 0


def test_poll_never_blocks_and_reassembles_split_frames(pipes):
    agent, _, control_w, _ = pipes
    assert agent.poll() is None
    data = (core.encode_frame(core.FrameType.INPUT, "shorter, please ✂".encode())
            + core.encode_frame(core.FrameType.INTERRUPT)
            + core.encode_frame(0x9F, b"from a newer revision")
            + core.encode_frame(core.FrameType.SHUTDOWN))
    os.write(control_w, data[:3])
    assert agent.poll() is None
    os.write(control_w, data[3:20])
    assert agent.poll() is None
    os.write(control_w, data[20:])
    assert agent.poll() == helper.Control("input", "shorter, please ✂")
    assert agent.poll() == helper.Control("interrupt")
    assert agent.poll() == helper.Control("shutdown")
    assert agent.poll() is None


def test_wait_times_out_then_returns_a_message(pipes):
    agent, _, control_w, _ = pipes
    assert agent.wait(0.01) is None
    os.write(control_w, core.encode_frame(core.FrameType.INTERRUPT))
    assert agent.wait(5) == helper.Control("interrupt")


def test_end_of_the_control_pipe_reads_as_one_shutdown(pipes):
    agent, _, control_w, p = pipes
    os.write(control_w, core.encode_frame(core.FrameType.INPUT, b"last words"))
    p.close(control_w)
    assert agent.poll() == helper.Control("input", "last words")
    assert agent.poll() == helper.Control("shutdown")
    assert agent.poll() is None
    assert agent.wait(None) is None


def test_oversize_control_frame(pipes):
    agent, _, control_w, _ = pipes
    os.write(control_w, b"\xff\xff\xff\x7f\x81")
    with pytest.raises(helper.ProtocolError,
                       match=r"^control frame of 2147483647 bytes exceeds 1048576; "
                             r"the control pipe is not speaking protocol v1$"):
        agent.poll()


def test_fallback_without_fds_prints():
    out, err = io.StringIO(), io.StringIO()
    agent = helper.Agent(env={}, stdout=out, stderr=err)
    assert not agent.connected
    agent.token("Hello")
    agent.token(", world")
    agent.progress(done=1)
    agent.checkpoint(b"abc")
    agent.log("note")
    agent.turn_end("completed")
    assert out.getvalue() == "Hello, world\n"
    assert err.getvalue().splitlines() == [
        'corral progress: {"done": 1}',
        'corral checkpoint: {"bytes": 3}',
        "corral log: note",
        'corral turn_end: {"status": "completed"}',
    ]
    assert agent.poll() is None and agent.wait(0) is None


def test_bad_fd_variable():
    with pytest.raises(ValueError,
                       match=r"^CORRAL_EVENTS_FD must be a file descriptor number, got 'x'$"):
        helper.Agent(env={"CORRAL_EVENTS_FD": "x"})


def test_three_line_agent_runs_standalone(tmp_path):
    """The file works copied alone, with no site-packages at all, driven by the env vars."""
    shutil.copy(AGENT_FILE, tmp_path / "corral_agent.py")
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import corral_agent as agent\n"
              "agent.token('Hi')\n"
              "agent.turn_end('completed')\n"
              "print(agent.wait(5))\n")
    events_r, events_w = os.pipe()
    control_r, control_w = os.pipe()
    os.write(control_w, core.encode_frame(core.FrameType.INPUT, b"more"))
    env = {"CORRAL_EVENTS_FD": str(events_w), "CORRAL_CONTROL_FD": str(control_r)}
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(tmp_path)],
                              env=env, pass_fds=(events_w, control_r), capture_output=True,
                              text=True, timeout=30, check=False)
        os.close(events_w)
        events = _drain(events_r)
    finally:
        for fd in (events_r, control_r, control_w):
            os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Control(kind='input', text='more')\n"
    stream = core.TokenStream()
    stream.feed(events)
    assert [stream.get(1).payload, json.loads(stream.get(2).payload)] == [
        b"Hi", {"status": "completed"}]
