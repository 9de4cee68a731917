"""`corral run -it` on a real pty, typed at as a person would: the test holds the master of
a pty whose slave is corral's stdin, stdout, stderr and controlling terminal, writes keys,
resizes it (the kernel sends corral SIGWINCH), and reads what reaches the "screen".

Each test also checks that the terminal's termios after corral exits are what they were
before, however the run ended.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

#: How long one expected output may take before the test fails (a hang guard, not a
#: timing assertion: every run here finishes in well under a second when it works).
GUARD_S = 60


def _corral() -> list[str]:
    script = Path(sys.executable).with_name("corral")
    return [str(script)] if script.exists() else [sys.executable, "-m", "corral.runtime.cli"]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_ctty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Screen:
    """corral running on a fresh pty of the host; `screen` is everything it printed."""

    def __init__(self, *args: str, rows: int = 24, cols: int = 80):
        self.master, self.slave = os.openpty()
        _set_size(self.slave, rows, cols)
        # a terminal a person left in a non-default but ordinary state: no echo of ^C etc.
        attrs = termios.tcgetattr(self.slave)
        attrs[3] &= ~termios.ECHOCTL
        termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
        self.before = termios.tcgetattr(self.slave)
        env = dict(os.environ, TERM="xterm-256color")
        self.proc = subprocess.Popen(
            [*_corral(), "run", *args], stdin=self.slave, stdout=self.slave,
            stderr=self.slave, start_new_session=True, preexec_fn=_take_ctty, env=env)
        self.screen = b""
        self.seen = 0  # where the last expected output ended

    def expect(self, pattern: bytes) -> re.Match:
        """Read until pattern matches what was printed after the last expect()'s match."""
        end = time.monotonic() + GUARD_S
        while True:
            m = re.compile(pattern).search(self.screen, self.seen)
            if m:
                self.seen = m.end()
                return m
            left = end - time.monotonic()
            assert left > 0, f"{pattern!r} never came; the screen holds {self.screen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: corral and everything holding the slave are gone
                    chunk = b""
                assert chunk, f"{pattern!r} never came; the screen holds {self.screen!r}"
                self.screen += chunk

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, rows: int, cols: int) -> None:
        _set_size(self.master, rows, cols)  # the kernel sends SIGWINCH to corral

    def finish(self) -> int:
        """corral's exit status; asserts the terminal's mode is back to what it was."""
        status = self.proc.wait(timeout=GUARD_S)
        with_reads = self.screen
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            with_reads += chunk
        self.screen = with_reads
        assert termios.tcgetattr(self.slave) == self.before
        return status

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed test: let corral clean its sandbox up
            self.proc.terminate()
            try:
                self.proc.wait(timeout=GUARD_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def screens():
    made: list[Screen] = []

    def make(*args, **kw) -> Screen:
        made.append(Screen(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_the_program_has_a_pty_of_its_own_sized_like_the_terminal(screens):
    s = screens("-it", "--", "sh", "-c", "tty; stty size; "
                "python3 -c 'import os; print(os.ttyname(0), os.isatty(1), os.isatty(2))'",
                rows=31, cols=97)
    s.expect(rb"/dev/pts/\d+\r\n31 97\r\n/dev/pts/\d+ True True\r\n")
    assert s.finish() == 0


def test_a_resized_terminal_resizes_the_program(screens):
    program = ("import os, signal, sys\n"
               "def winch(*_):\n"
               "    size = os.get_terminal_size()\n"
               "    os.write(1, f'winch {size.lines} {size.columns}\\n'.encode())\n"
               "signal.signal(signal.SIGWINCH, winch)\n"
               "print('ready', flush=True)\n"
               "sys.stdin.readline()\n"
               "os.execvp('stty', ['stty', 'size'])\n")
    s = screens("-it", "--", "python3", "-c", program, rows=30, cols=100)
    s.expect(rb"ready\r\n")
    s.resize(50, 120)
    s.expect(rb"winch 50 120\r\n")
    s.type(b"\r")
    s.expect(rb"\r\n50 120\r\n")
    assert s.finish() == 0


def test_interactive_python_takes_a_line_is_interrupted_by_ctrl_c_and_exits(screens):
    s = screens("-it", "--", "python3", "-q")
    s.expect(rb">>> ")
    s.type(b"print(6 * 7)\r")
    s.expect(rb"\r\n42\r\n>>> ")
    s.type(b"print('sp' + 'in'); exec('while True: pass')\r")
    s.expect(rb"\r\nspin\r\n")  # the loop runs now
    s.type(b"\x03")
    s.expect(rb"KeyboardInterrupt\r\n>>> ")
    s.type(b"exit(3)\r")
    assert s.finish() == 3


def _host_pid(cmdline: bytes) -> int | None:
    """The host pid of the process whose /proc cmdline is exactly cmdline."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == cmdline:
                        return int(entry)
            except OSError:
                continue
    return None


def _state(pid: int) -> str | None:
    """The state letter of a host process (None once it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state in "ZX" else state


def _wait_for_pid(cmdline: bytes) -> int:
    end = time.monotonic() + GUARD_S
    while (pid := _host_pid(cmdline)) is None:
        assert time.monotonic() < end, f"{cmdline!r} never ran"
        time.sleep(0.01)
    return pid


def test_ctrl_z_stops_the_foreground_job_of_a_shell_inside(screens):
    s = screens("-it", "--", "sh", "-i")
    s.expect(rb"# ")
    s.type(b"sleep 7772\r")
    pid = _wait_for_pid(b"sleep\x007772\x00")  # exec'd: the shell made it the foreground
    s.type(b"\x1a")
    s.expect(rb"Stopped[^\n]*\n# ")
    assert _state(pid) == "T"
    s.type(b"fg\r")
    s.expect(rb"fg\r\nsleep 7772\r\n")  # the shell gives it the terminal back, then SIGCONT
    end = time.monotonic() + GUARD_S
    while _state(pid) == "T":
        assert time.monotonic() < end, "fg never continued the job"
        time.sleep(0.01)
    s.type(b"\x03")
    s.expect(rb"# ")
    assert _state(pid) is None
    s.type(b"exit 5\r")
    assert s.finish() == 5


def test_the_terminal_is_restored_when_the_program_is_killed_from_outside(screens):
    marker = "7771"
    s = screens("-it", "--", "sh", "-c", f"echo up; exec sleep {marker}")
    s.expect(rb"up\r\n")
    os.kill(_wait_for_pid(f"sleep\0{marker}\0".encode()), signal.SIGKILL)
    assert s.finish() == 128 + signal.SIGKILL


def test_the_terminal_is_restored_when_corral_itself_is_terminated(screens):
    s = screens("-it", "--", "sh", "-c", "echo up; sleep 1000")
    s.expect(rb"up\r\n")
    s.proc.send_signal(signal.SIGTERM)
    assert s.finish() == 128 + signal.SIGTERM


def test_tty_without_i_leaves_the_terminal_cooked_and_ctrl_c_interrupts_the_program(screens):
    # "ready" comes from the shell itself once stty is reaped: a ^C that reaches a shell
    # waiting for a child that then exits normally (stty, just done) lets the shell go on,
    # as shells do (bash and dash both), and sleep 1000 would then wait for a second ^C
    s = screens("-t", "--", "sh", "-c", "tty; stty size; echo ready; exec sleep 1000",
                rows=20, cols=60)
    s.expect(rb"/dev/pts/\d+\r\n20 60\r\nready\r\n")
    s.type(b"\x03")  # our terminal's own line discipline: SIGINT to corral, which passes it on
    assert s.finish() == 128 + signal.SIGINT


def test_the_timeout_ends_a_tty_run_with_124_and_the_terminal_restored(screens):
    s = screens("-it", "--timeout", "1s", "--", "sh", "-c", "echo up; sleep 1000")
    s.expect(rb"up\r\n")
    assert s.finish() == 124
    assert b"timeout" in s.screen


def test_queries_and_clipboard_writes_do_not_reach_the_terminal_but_drawing_does(screens):
    s = screens("-it", "--", "printf",
                r"A\033[6nB\033]52;c;aGVsbG8=\007C\033[cD\033[2J\033[5;7HE\033[?1049hF")
    s.expect(rb"F")
    assert s.finish() == 0
    shown = s.screen
    assert b"\x1b[6n" not in shown and b"52;" not in shown and b"\x1b[c" not in shown
    assert b"A" in shown and b"B" in shown and b"\x1b[2J" in shown and b"\x1b[5;7H" in shown
    assert b"\x1b[?1049h" in shown
    # the alternate screen the program left on is switched off again at its end
    assert shown.rindex(b"\x1b[?1049l") > shown.index(b"\x1b[?1049h")


def test_tty_without_a_terminal_on_stdin_is_a_usage_error():
    done = subprocess.run([*_corral(), "run", "-t", "--", "true"], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=GUARD_S)
    assert done.returncode == 2
    assert done.stderr == (b"corral: run: -t needs a terminal on stdin (it is a pipe or a "
                           b"file); drop -t to stream stdin to the command\n")


# -- under tmux: what a person sees ---------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) running one window of the given size."""

    def __init__(self, tmp_path: Path, rows: int, cols: int, command: list[str]):
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
        self.status = tmp_path / "status"
        shell_line = " ".join(f"'{a}'" for a in command)
        subprocess.run([*self.base, "new-session", "-d", "-x", str(cols), "-y", str(rows),
                        f"{shell_line}; echo $? > {self.status}; sleep 1000"],
                       check=True, env=dict(os.environ, TERM="xterm-256color"))
        subprocess.run([*self.base, "set-option", "-g", "status", "off"], check=True)

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", *keys], check=True)

    def pane(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p"], check=True,
                              capture_output=True, text=True).stdout

    def wait_for(self, pattern: str) -> str:
        """The pane once pattern (re.M; tmux strips trailing blanks) matches it."""
        end = time.monotonic() + GUARD_S
        while not re.search(pattern, pane := self.pane(), re.M):
            assert time.monotonic() < end, f"{pattern!r} never showed; the pane:\n{pane}"
            time.sleep(0.05)
        return pane

    def resize(self, rows: int, cols: int) -> None:
        subprocess.run([*self.base, "resize-window", "-x", str(cols), "-y", str(rows)],
                       check=True)

    def exit_status(self) -> int:
        end = time.monotonic() + GUARD_S
        while not self.status.exists() or not self.status.read_text().strip():
            assert time.monotonic() < end, f"corral never exited; the pane:\n{self.pane()}"
            time.sleep(0.05)
        return int(self.status.read_text())

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def test_under_tmux_python_takes_a_line_follows_a_resize_and_is_interrupted(tmp_path):
    tmux = Tmux(tmp_path, 30, 100, [*_corral(), "run", "-it", "--", "python3", "-q"])
    try:
        tmux.wait_for(r"^>>>$")
        tmux.keys("import os; print('size', *os.get_terminal_size())", "Enter")
        tmux.wait_for(r"^size 100 30\n>>>$")
        tmux.resize(40, 120)
        tmux.keys("print('now', *os.get_terminal_size())", "Enter")
        tmux.wait_for(r"^now 120 40\n>>>$")
        tmux.keys("print('sp' + 'in'); exec('while True: pass')", "Enter")
        tmux.wait_for(r"^spin$")
        tmux.keys("C-c")
        tmux.wait_for(r"^KeyboardInterrupt\n>>>$")
        tmux.keys("exit(9)", "Enter")
        assert tmux.exit_status() == 9
    finally:
        tmux.kill()


# -- the API underneath: Sandbox.exec(tty=...) ------------------------------------------------


def test_a_program_cannot_push_input_with_tiocsti_even_into_its_own_pty():
    from corral.sandbox import Sandbox

    program = ("import errno, fcntl, termios\n"
               "try:\n"
               "    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
               "    print('pushed')\n"
               "except OSError as exc:\n"
               "    print(errno.errorcode[exc.errno])\n")
    with Sandbox.create() as sb:
        proc = sb.exec(["python3", "-c", program], tty=(24, 80))
        out, err = proc.communicate()
    assert (out, err, proc.returncode) == (b"EPERM\r\n", b"", 0)


def test_window_sizes_out_of_range_are_refused():
    from corral.sandbox import InvalidSpec, Sandbox

    with Sandbox.create() as sb:
        for rows, cols in ((0, 80), (24, 0), (10001, 80), (24, 10001)):
            with pytest.raises(InvalidSpec, match=r"^(rows|cols): \d+ is not a terminal size; "
                                                  r"use 1 to 10000$"):
                sb.exec(["true"], tty=(rows, cols))
        proc = sb.exec(["sh", "-c", "read x"], tty=(24, 80))
        with pytest.raises(InvalidSpec, match=r"^rows: 0 is not a terminal size"):
            proc.resize(0, 80)
        proc.resize(10000, 10000)
        out, _ = proc.communicate(b"\r")
        plain = sb.exec(["true"])
        with pytest.raises(InvalidSpec, match=r"^tty: the command was not started with a tty$"):
            plain.resize(24, 80)
        plain.communicate()
    assert proc.returncode == 0
