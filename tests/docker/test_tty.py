"""Terminals on the docker backend: a Tty exec on a real (private) engine, read and typed
at through the process's files as the daemon and `corral run -it` do; its size, resize
(SIGWINCH inside), ^C through the pty's line discipline, exit statuses, refusals; then the
same through the daemon (Sandboxes.Exec with tty, Resize) on a docker sandbox.
"""

from __future__ import annotations

import os
import re
import select
import signal

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.sandbox import CommandNotFound, CorralError, ExitReason, InvalidSpec, SandboxSpec
from corral.sandbox.backends.docker import DockerSandbox
from corral.v1 import sandbox_pb2 as pb

from ..integration.test_exec_tty import PROGRAM as NATIVE_PROGRAM
from ..integration.test_exec_tty import TtyExec
from ..integration.test_exec_tty import test_resize_and_tty_sizes_are_checked as check_sizes
from ..linux import test_tty as native_tty
from . import test_daemon

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

#: Fixtures of the native suites, reused: `corral run` on fresh host ptys, and a daemon
#: (on the private engine, by DOCKER_HOST).
screens = native_tty.screens
daemon = test_daemon.daemon

#: How long one expected output may take before the test fails (a hang guard only).
GUARD_S = 60

SIZES_OUT_OF_RANGE = ((0, 80), (24, 0), (10001, 80), (24, 10001))

#: The native daemon test's program (says what its terminal is, reports window changes,
#: echoes a line, spins until ^C, exits 4), saying "spinning" once inside its try: a ^C
#: typed after that is always caught, never one that lands before the loop.
PROGRAM = NATIVE_PROGRAM.replace("try:\n", "try:\n    print('spinning', flush=True)\n")
assert PROGRAM != NATIVE_PROGRAM

#: `stty size` (the base image has python3, not stty): "ROWS COLS" of the terminal on fd 0.
SIZE = "python3 -c 'import os; print(*reversed(os.get_terminal_size(0)))'"


def _spec(**fields) -> SandboxSpec:
    return SandboxSpec(backend="docker", **fields)


class Terminal:
    """The host's side of a tty command: what it printed (`screen`) and keys to type."""

    def __init__(self, proc):
        self.proc = proc
        self.screen = b""
        self.seen = 0

    def expect(self, pattern: bytes) -> re.Match:
        """Read until pattern matches what came after the last expect()'s match."""
        fd = self.proc.stdout.fileno()
        while not (m := re.compile(pattern).search(self.screen, self.seen)):
            ready, _, _ = select.select([fd], [], [], GUARD_S)
            assert ready, f"{pattern!r} never came; the screen holds {self.screen!r}"
            chunk = os.read(fd, 65536)
            assert chunk, f"{pattern!r} never came; the screen holds {self.screen!r}"
            self.screen += chunk
        self.seen = m.end()
        return m

    def type(self, keys: bytes) -> None:
        os.write(self.proc.stdin.fileno(), keys)

    def rest(self) -> bytes:
        """Everything up to the end of the stream (the command has ended)."""
        fd = self.proc.stdout.fileno()
        while select.select([fd], [], [], GUARD_S)[0] and (chunk := os.read(fd, 65536)):
            self.screen += chunk
        return self.screen[self.seen:]


def test_the_command_has_a_terminal_of_the_asked_size(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", f"{SIZE}; python3 -c 'import os; print(os.ttyname(0), "
                        "os.isatty(0), os.isatty(1), os.isatty(2), "
                        "os.tcgetpgrp(0) == os.getpgrp())'; echo to-err >&2"], tty=(31, 97))
        out, err = proc.communicate()
    assert re.fullmatch(rb"31 97\r\n/dev/pts/\d+ True True True True\r\nto-err\r\n", out), out
    assert (err, proc.stderr, proc.returncode, proc.reason) == (b"", None, 0, ExitReason.EXITED)


def test_resize_reaches_the_program_and_ctrl_c_interrupts_it(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["python3", "-c", PROGRAM], tty=(33, 91))
        term = Terminal(proc)
        term.expect(rb"tty True True True /dev/pts/\d+ 33 91 True\r\n")
        proc.resize(50, 120)
        term.expect(rb"winch 50 120\r\n")
        term.type(b"hello\r")
        term.expect(rb"line 'hello\\n'\r\nspinning\r\n")
        term.type(b"\x03")  # the pty's line discipline turns it into SIGINT
        assert proc.wait(GUARD_S) == 4
        assert term.rest().endswith(b"interrupted\r\n")
        assert proc.reason == ExitReason.EXITED
        with pytest.raises(CorralError, match=r"^python3 has ended; its terminal is gone$"):
            proc.resize(24, 80)


def test_a_shell_trap_sees_ctrl_c_and_the_exit_status_is_the_commands(docker_host):
    script = "trap 'echo trapped; exit 9' INT; echo ready; while :; do sleep 0.05; done"
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", script], tty=(24, 80))
        term = Terminal(proc)
        term.expect(rb"ready\r\n")
        term.type(b"\x03")
        assert proc.wait(GUARD_S) == 9
        assert term.rest().endswith(b"trapped\r\n")
        killed = sb.exec(["sh", "-c", "kill -TERM $$"], tty=(24, 80))
        assert killed.communicate() == (b"", b"")
    assert (killed.returncode, killed.reason) == (-signal.SIGTERM, ExitReason.SIGNALED)


def test_the_timeout_ends_a_tty_command(docker_host):
    with DockerSandbox.create(_spec(timeout_s=0.5)) as sb:
        proc = sb.exec(["sh", "-c", "echo up; exec sleep 60"], tty=(24, 80))
        out, _ = proc.communicate()
    assert out == b"up\r\n"
    assert (proc.returncode, proc.reason) == (-signal.SIGKILL, ExitReason.TIMEOUT)


def test_a_missing_program_is_command_not_found_on_a_tty_too(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        with pytest.raises(CommandNotFound) as exc:
            sb.exec(["no-such-program"], tty=(24, 80))
        assert exc.value.errno == 2
        proc = sb.exec(["sh", "-c", "echo fine"], tty=(24, 80))
        assert proc.communicate() == (b"fine\r\n", b"")


def test_passed_descriptors_still_work_on_a_tty(docker_host):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with DockerSandbox.create(_spec()) as sb:
            proc = sb.exec(["sh", "-c", f"{SIZE}; echo via-fd >&3"], tty=(12, 34),
                           pass_fds={3: w})
            os.close(w)
            w = -1
            out, _ = proc.communicate()
        assert (out, proc.returncode) == (b"12 34\r\n", 0)
        assert os.read(r, 100) == b"via-fd\n"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_a_program_cannot_push_input_with_tiocsti_into_its_terminal(docker_host):
    # harmless if it escaped: one byte typed into the program's own pty
    program = ("import errno, fcntl, termios\n"
               "try:\n"
               "    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
               "    print('pushed')\n"
               "except OSError as exc:\n"
               "    print(errno.errorcode[exc.errno])\n")
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["python3", "-c", program], tty=(24, 80))
        out, err = proc.communicate()
    assert (out, err, proc.returncode) == (b"EPERM\r\n", b"", 0)


def test_window_sizes_out_of_range_are_refused(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        for rows, cols in SIZES_OUT_OF_RANGE:
            with pytest.raises(InvalidSpec, match=r"^(rows|cols): \d+ is not a terminal size; "
                                                  r"use 1 to 10000$"):
                sb.exec(["true"], tty=(rows, cols))
        proc = sb.exec(["sh", "-c", f"read x; {SIZE}"], tty=(24, 80))
        for rows, cols in SIZES_OUT_OF_RANGE:
            with pytest.raises(InvalidSpec, match=r"^(rows|cols): \d+ is not a terminal size"):
                proc.resize(rows, cols)
        proc.resize(10000, 10000)
        out, _ = proc.communicate(b"\r")
        plain = sb.exec(["true"])
        with pytest.raises(InvalidSpec, match=r"^tty: the command was not started with a tty$"):
            plain.resize(24, 80)
        plain.communicate()
    assert (out, proc.returncode) == (b"\r\n10000 10000\r\n", 0)


# -- `corral run -it --backend docker` on a host pty, typed at as a person would ---------------


def test_corral_run_it_on_docker_sizes_resizes_interrupts_and_exits(docker_host, screens):
    s = screens("--backend", "docker", "-it", "--", "python3", "-c", PROGRAM, rows=27, cols=83)
    s.expect(rb"tty True True True /dev/pts/\d+ 27 83 True\r\n")
    s.resize(40, 100)  # the kernel tells corral (SIGWINCH), corral the engine
    s.expect(rb"winch 40 100\r\n")
    s.type(b"typed\r")
    s.expect(rb"line 'typed\\n'\r\nspinning\r\n")
    s.type(b"\x03")  # raw: the byte reaches the program's pty, whose line discipline signals
    s.expect(rb"interrupted\r\n")
    assert s.finish() == 4


def test_corral_run_t_on_docker_passes_its_own_ctrl_c_to_the_program(docker_host, screens):
    s = screens("--backend", "docker", "-t", "--", "sh", "-c",
                f"{SIZE}; echo ready; exec sleep 1000", rows=20, cols=60)
    s.expect(rb"20 60\r\nready\r\n")
    s.type(b"\x03")  # the host terminal's SIGINT to corral, which signals the program's group
    assert s.finish() == 128 + signal.SIGINT


# -- through the daemon ----------------------------------------------------------------------


@pytest.fixture
def docker_sandbox(daemon):
    """(client, sandbox) of a docker sandbox on the daemon; destroyed afterwards."""
    client = daemon.client()
    sb = client.create_sandbox(backend="docker", memory_bytes=256 << 20)
    try:
        yield client, sb
    finally:
        client.destroy_sandbox(sb.id)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code


def test_exec_with_tty_and_resize_on_a_docker_sandbox(docker_sandbox):
    client, sb = docker_sandbox
    run = TtyExec(client, sb.id, ["python3", "-c", PROGRAM], tty=True, rows=33, cols=91,
                  keep_stdin_open=True)
    run.expect(rb"tty True True True /dev/pts/\d+ 33 91 True\r\n")
    client.resize(sb.id, run.exec_id, 50, 120)
    run.expect(rb"winch 50 120\r\n")
    client.send_input(sb.id, run.exec_id, b"hello\r")
    run.expect(rb"line 'hello\\n'\r\nspinning\r\n")
    client.send_input(sb.id, run.exec_id, b"\x03")
    exited = run.end()
    assert run.screen.endswith(b"interrupted\r\n")
    assert (exited.returncode, exited.reason) == (4, "exited")
    assert run.streams == {pb.OUTPUT_STREAM_STDOUT}
    assert _code(lambda: client.resize(sb.id, run.exec_id, 10, 10)) \
        == grpc.StatusCode.FAILED_PRECONDITION


def test_daemon_checks_sizes_and_refuses_resize_without_a_tty_on_docker(docker_sandbox):
    client, sb = docker_sandbox
    check_sizes(client, sb)  # the native daemon's own checks, on a docker sandbox


def test_a_tty_exec_on_docker_ends_at_its_timeout(docker_sandbox):
    client, sb = docker_sandbox
    run = TtyExec(client, sb.id, ["sh", "-c", "echo up; exec sleep 60"], tty=True, rows=24,
                  cols=80, timeout_s=0.5)
    exited = run.end()
    assert (exited.returncode, exited.reason) == (-signal.SIGKILL, "timeout")
    assert run.screen == b"up\r\n"
