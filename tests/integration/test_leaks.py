"""Sessions and commands leave nothing behind in the daemon: descriptors, memory, cycles.

Issue 20.1: every session's agent runs with its stdin kept open, and that pipe's write end
outlived the command, its session and its sandbox (one descriptor per session, for ever);
a finished session's replay log sat in reference cycles (hub <-> callback <-> session,
command handle <-> process.on_exit) until the cyclic GC ran.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import pytest

from corral.runtime.client import Client
from corral.runtime.config import DaemonConfig
from corral.runtime.daemon import Daemon
from corral.v1 import sandbox_pb2

from .daemon_harness import DaemonProcess, SessionRecorder

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

STDOUT = sandbox_pb2.OUTPUT_STREAM_STDOUT

#: A protocol agent: `tokens` tokens of 1000 bytes, its turn's end, then it waits for
#: SHUTDOWN (sent when the client closes the session) and exits 0.
AGENT = """
import corral_agent as a
for i in range({tokens}):
    a.token("x" * 1000)
a.turn_end("completed")
while True:
    m = a.wait(None)
    if m is None or m.kind == "shutdown":
        break
"""


def agent(tokens: int) -> list[str]:
    return ["python3", "-c", AGENT.format(tokens=tokens)]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            targets.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except FileNotFoundError:
            pass
    return targets


def quiet_fd_count(pid: int, timeout_s: float = 15.0) -> int:
    """The daemon's descriptor count once it holds still: a destroyed sandbox's cgroup is
    renewed by the undertaker after Destroy has answered (its pool), and that work holds
    descriptors for a moment. Same count over 5 looks 0.1 s apart, or the last seen."""
    deadline = time.monotonic() + timeout_s
    seen = [fd_count(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.1)
        seen.append(fd_count(pid))
        if len(seen) >= 5 and len(set(seen[-5:])) == 1:
            break
    return seen[-1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def session_cycle(client: Client, tokens: int) -> None:
    """Open a session in a sandbox of its own, read its turn, close it, see it exit."""
    stream = client.open_session(agent(tokens))
    rec = SessionRecorder(stream)
    rec.wait_for(lambda r: r.turn_ends(), timeout_s=60, what="the turn's end")
    stream.close_session()
    rec.join(60)
    assert rec.error is None, rec.error
    assert len(rec.tokens()) == tokens
    assert rec.first("exited").reason == "closed"


def mux_cycle(client: Client, tokens: int) -> None:
    """Two sessions on one OpenMany stream: each reads its turn and is closed."""
    mux = client.open_many()
    for ref in ("a", "b"):
        mux.start(ref, agent(tokens))
    ended: dict[str, str] = {}
    for ref, event in mux:
        kind = event.WhichOneof("event")
        if kind == "turn_ended":
            mux.close_session(ref)
        elif kind == "exited":
            ended[ref] = event.exited.reason
            if len(ended) == 2:
                mux.close()
        elif kind == "error":
            raise AssertionError(event.error)
    assert ended == {"a": "closed", "b": "closed"}


def exec_cycle(client: Client) -> None:
    """Two commands with stdin kept open in a new sandbox: one fed and closed by the
    client, one that exits with its stdin still open (as a session's agent does)."""
    sandbox = client.create_sandbox()
    events = client.exec(sandbox.id, ["cat"], keep_stdin_open=True)
    started = next(events)
    client.send_input(sandbox.id, started.started.exec_id, b"ping\n", close=True)
    assert stdout_of(events) == b"ping\n"
    events = client.exec(sandbox.id, ["echo", "pong"], keep_stdin_open=True)
    assert stdout_of(events) == b"pong\n"
    client.destroy_sandbox(sandbox.id)


def stdout_of(events) -> bytes:
    out = b""
    for event in events:
        if event.WhichOneof("event") == "output" and event.output.stream == STDOUT:
            out += event.output.batch.text
    return out


class GcOffDaemon(DaemonProcess):
    """A daemon whose cyclic garbage collector never runs: whatever sits in a reference
    cycle stays in memory, so memory that comes back was freed by reference counting."""

    def command(self) -> list[str]:
        cmd = super().command()
        assert cmd[1:4] == ["-m", "corral.runtime.cli", "daemon"], cmd
        boot = ("import gc, runpy, sys; gc.disable(); sys.argv[0] = 'corral'; "
                "runpy.run_module('corral.runtime.cli', run_name='__main__')")
        return [cmd[0], "-c", boot, *cmd[3:]]


def test_sessions_return_descriptors_and_memory(tmp_path):
    """30 sessions of 2 MB each (and commands), with the daemon's GC off: its descriptors
    are back to their count, and its RSS grows by far less than one session's log per
    session (it grew ~2.6 MB a session, freed only when the cyclic GC ran)."""
    daemon = GcOffDaemon(tmp_path / "d").start()
    try:
        client = daemon.client()
        for _ in range(3):  # warm-up: first sandbox, first session, gRPC buffers, the reactor
            session_cycle(client, 2000)
            exec_cycle(client)
        fds, rss = quiet_fd_count(daemon.pid), rss_kib(daemon.pid)
        for _ in range(30):
            session_cycle(client, 2000)
            exec_cycle(client)
        # one descriptor left per session or command would be 30 or 60 more
        assert quiet_fd_count(daemon.pid) == fds, fd_targets(daemon.pid)
        # 30 sessions x 2 MB of tokens, held twice before (session log + stdout log) until
        # the cyclic GC ran; 16 MiB of slack covers allocator and gRPC noise.
        grown = rss_kib(daemon.pid) - rss
        print(f"daemon RSS {rss} KiB -> +{grown} KiB after 30 sessions, GC off")
        assert grown < 16 << 10
    finally:
        daemon.ensure_stopped()
    assert daemon.proc.returncode == 0


class InProcessDaemon:
    """The real Daemon on a loop of its own thread, in this process (to look at its heap)."""

    def __init__(self, root: str):
        self.config = DaemonConfig(socket=os.path.join(root, "corral.sock"),
                                   state=os.path.join(root, "state")).validate()
        self.daemon = Daemon(self.config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-daemon", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                await self.daemon.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._ready.set()
            await self.daemon._stopped.wait()

        self.loop.run_until_complete(main())

    def __enter__(self) -> InProcessDaemon:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __exit__(self, *exc) -> None:
        self.call(self.daemon.stop(), 120)
        self._thread.join(60)
        self.loop.close()


def test_finished_sessions_and_commands_are_freed_without_the_cyclic_gc(tmp_path):
    """With the GC off, nothing of a finished session or command is left in a cycle."""
    interesting = {"StreamHub", "TokenStream", "Session", "ExecHandle", "Process",
                   "StdinWriter", "ControlWriter", "Watcher", "ManagedSandbox"}
    was_enabled = gc.isenabled()
    with InProcessDaemon(str(tmp_path)) as d:
        client = Client.connect(socket=d.config.socket)
        try:
            session_cycle(client, 10)  # warm-up, then start from a clean heap
            gc.collect()
            gc.disable()
            try:
                for _ in range(3):
                    session_cycle(client, 200)
                    mux_cycle(client, 200)
                    exec_cycle(client)
                    # a session whose agent exits on its own, reaped by the idle reaper
                    stream = client.open_session(["sh", "-c", "echo hi; echo err >&2"])
                    rec = SessionRecorder(stream)
                    rec.join(60)
                    assert rec.first("exited").returncode == 0

                async def reap_all() -> int:
                    manager = d.daemon.sessions
                    for session in list(manager._sessions.values()):
                        await manager._end(session, "idle")
                    return len(manager._sessions)

                assert d.call(reap_all()) == 0
                gc.set_debug(gc.DEBUG_SAVEALL)
                try:
                    gc.collect()
                    cyclic = sorted(type(o).__name__ for o in gc.garbage
                                    if type(o).__name__ in interesting)
                finally:
                    gc.set_debug(0)
                    gc.garbage.clear()
            finally:
                if was_enabled:
                    gc.enable()
        finally:
            client.close()
    assert cyclic == []
