"""Sandboxes.Exec with tty through the real daemon: a pty inside, its size, Resize, ^C.

The Exec stream is read on a thread into `TtyExec.screen` (everything comes on stdout);
the test types with SendInput and resizes with Resize while the command runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2 as pb

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

#: How long one expected output may take before the test fails (a hang guard only).
GUARD_S = 60

PROGRAM = """\
import os, signal, sys
def winch(*_):
    size = os.get_terminal_size()  # os.write: the signal may come in the middle of a print
    os.write(1, f'winch {size.lines} {size.columns}\\n'.encode())
signal.signal(signal.SIGWINCH, winch)
size = os.get_terminal_size()
print('tty', os.isatty(0), os.isatty(1), os.isatty(2), os.ttyname(0), size.lines,
      size.columns, os.tcgetpgrp(0) == os.getpgrp(), flush=True)
line = sys.stdin.readline()
print('line', repr(line), flush=True)
try:
    while True:
        pass
except KeyboardInterrupt:
    print('interrupted', flush=True)
sys.exit(4)
"""


class TtyExec:
    """One Exec stream drained on a thread."""

    def __init__(self, client, sandbox_id: str, argv: list[str], **kw):
        self.screen = b""
        self.streams: set[int] = set()
        self.exited = None
        self.exec_id = None
        self.error: Exception | None = None
        self._cond = threading.Condition()
        self._events = client.exec(sandbox_id, argv, **kw)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            for event in self._events:
                kind = event.WhichOneof("event")
                with self._cond:
                    if kind == "started":
                        self.exec_id = event.started.exec_id
                    elif kind == "output":
                        self.streams.add(event.output.stream)
                        self.screen += event.output.batch.text
                    elif kind == "exited":
                        self.exited = event.exited
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 (handed to the test)
            with self._cond:
                self.error = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, what) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: what() or self.error or not self._thread.is_alive(),
                                       GUARD_S), f"never came; the screen holds {self.screen!r}"
            if self.error is not None:
                raise self.error
            assert what(), f"never came; the screen holds {self.screen!r}"

    def expect(self, pattern: bytes) -> re.Match:
        self.wait_for(lambda: re.search(pattern, self.screen))
        return re.search(pattern, self.screen)

    def end(self):
        self._thread.join(GUARD_S)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.exited


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code


def test_a_tty_exec_gets_a_pty_of_the_sandbox_that_follows_resize_and_ctrl_c(client, sandbox):
    run = TtyExec(client, sandbox.id, ["python3", "-c", PROGRAM], tty=True, rows=33, cols=91,
                  keep_stdin_open=True)
    run.expect(rb"tty True True True /dev/pts/\d+ 33 91 True\r\n")
    client.resize(sandbox.id, run.exec_id, 50, 120)
    run.expect(rb"winch 50 120\r\n")
    client.send_input(sandbox.id, run.exec_id, b"hello\r")
    run.expect(rb"line 'hello\\n'\r\n")
    client.send_input(sandbox.id, run.exec_id, b"\x03")  # the pty's line discipline: SIGINT
    exited = run.end()
    assert b"interrupted\r\n" in run.screen
    assert exited.returncode == 4 and exited.reason == "exited"
    assert run.streams == {pb.OUTPUT_STREAM_STDOUT}  # one stream: stderr is the pty too
    # the command has ended: its terminal is gone
    assert _code(lambda: client.resize(sandbox.id, run.exec_id, 10, 10)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    # who got a terminal is in the audit log, with its first size
    starts = [json.loads(r.detail_json) for r in client.audit_query(sandbox_id=sandbox.id,
                                                                     limit=1000)
              if r.kind == "exec.start"]
    assert [d["tty"] for d in starts if d["exec_id"] == run.exec_id] == [[33, 91]]


def test_resize_and_tty_sizes_are_checked(client, sandbox):
    assert _code(lambda: client.resize(sandbox.id, "exe-000000000000", 24, 80)) \
        == grpc.StatusCode.NOT_FOUND
    for rows, cols in ((0, 80), (24, 0), (10001, 80), (24, 10001)):
        assert _code(lambda r=rows, c=cols: list(client.exec(
            sandbox.id, ["true"], tty=True, rows=r, cols=c))) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: list(client.exec(sandbox.id, ["true"], rows=24, cols=80))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    run = TtyExec(client, sandbox.id, ["sh", "-c", "echo up; read x"], tty=True, rows=24,
                  cols=80, keep_stdin_open=True)
    run.expect(rb"up\r\n")
    for rows, cols in ((0, 80), (24, 0), (10001, 80), (24, 10001)):
        assert _code(lambda r=rows, c=cols: client.resize(sandbox.id, run.exec_id, r, c)) \
            == grpc.StatusCode.INVALID_ARGUMENT
    client.resize(sandbox.id, run.exec_id, 10000, 10000)
    client.send_input(sandbox.id, run.exec_id, b"\r")
    assert run.end().returncode == 0
    plain = TtyExec(client, sandbox.id, ["sh", "-c", "echo up; read x"], keep_stdin_open=True)
    plain.expect(rb"up\n")
    assert _code(lambda: client.resize(sandbox.id, plain.exec_id, 24, 80)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    client.send_input(sandbox.id, plain.exec_id, b"\n", close=True)
    assert plain.end().returncode == 0



class CliScreen:
    """`corral exec ARGS` on a fresh pty of the host (its stdin, stdout, stderr and
    controlling terminal); `screen` is what it printed."""

    def __init__(self, daemon, *args: str, rows: int = 24, cols: int = 80):
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.before = termios.tcgetattr(self.slave)
        env = dict(os.environ, CORRAL_SOCKET=daemon.socket, TERM="xterm-256color")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.runtime.cli", "exec", *args], stdin=self.slave,
            stdout=self.slave, stderr=self.slave, env=env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        self.screen = b""
        self.seen = 0  # where the last expected output ended

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, pattern: bytes) -> None:
        while not (m := re.compile(pattern).search(self.screen, self.seen)):
            ready, _, _ = select.select([self.master], [], [], GUARD_S)
            assert ready, f"{pattern!r} never came; the screen holds {self.screen!r}"
            self.screen += os.read(self.master, 65536)
        self.seen = m.end()

    def finish(self) -> int:
        """corral's exit status; asserts the terminal's mode is what it was before."""
        status = self.proc.wait(timeout=GUARD_S)
        assert termios.tcgetattr(self.slave) == self.before
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_corral_exec_it_on_a_real_terminal(daemon, sandbox):
    """`corral exec -it SB -- python3` typed at through a pty."""
    s = CliScreen(daemon, "-it", sandbox.id, "--", "python3", "-q", rows=27, cols=83)
    try:
        s.expect(rb">>> ")
        s.type(b"import os; print(os.ttyname(0), *os.get_terminal_size())\r")
        s.expect(rb"/dev/pts/\d+ 83 27\r\n>>> ")
        # SIGWINCH is ignored by default, so one that came before sigwaitinfo started would
        # be lost: block it first (the prompt after it says it ran), then resize
        s.type(b"import signal; _ = signal.pthread_sigmask(signal.SIG_BLOCK, "
               b"{signal.SIGWINCH})\r")
        s.expect(rb"SIGWINCH\}\)\r\n>>> ")
        s.resize(40, 100)
        s.type(b"signal.sigwaitinfo({signal.SIGWINCH}) and None; "
               b"print(*os.get_terminal_size())\r")
        s.expect(rb"\r\n100 40\r\n>>> ")
        s.type(b"exit(6)\r")
        assert s.finish() == 6
    finally:
        s.close()


def test_corral_exec_it_restores_the_terminal_when_the_daemon_goes_away(make_daemon):
    d = make_daemon("gone").start()
    client = d.client()
    sb = client.create_sandbox(memory_bytes=128 << 20)
    s = CliScreen(d, "-it", sb.id, "--", "sh", "-c", "echo up; sleep 1000")
    try:
        s.expect(rb"up\r\n")
        assert d.stop() == 0  # the daemon ends the sandbox (and so the command) and exits
        assert s.finish() == 128 + 9
    finally:
        s.close()


def test_corral_exec_it_restores_the_terminal_when_the_daemon_is_killed(make_daemon):
    d = make_daemon("killed").start()
    sb = d.client().create_sandbox(memory_bytes=128 << 20)
    s = CliScreen(d, "-it", sb.id, "--", "sh", "-c", "echo up; sleep 1000")
    try:
        s.expect(rb"up\r\n")
        d.kill()  # the stream breaks off: one line, exit 1, the terminal itself again
        assert s.finish() == 1
        s.expect(rb"corral: exec: UNAVAILABLE: [^\n]*\n")
        # one line, no traceback, written after the terminal left raw mode (its \n became
        # \r\n again); before it, the colour reset of the output filter
        assert re.fullmatch(rb"up\r\n\x1b\[0mcorral: exec: UNAVAILABLE: [^\r\n]+\r\n", s.screen)
    finally:
        s.close()
        d.start()  # its first start sweeps what the killed daemon left
        assert d.stop() == 0
