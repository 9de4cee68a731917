"""A command running in a container (an exec): its multiplexed output stream, stdin,
exit code and why it ended; relayed onto descriptors when the caller gives some; or, run
with a tty, its raw terminal stream, window and exit watcher.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import select as select_mod
import selectors
import signal as signal_mod
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

from ...errors import CorralError, InvalidSpec
from ...exit_status import signal_of
from ...ptys import check_window
from ..base import CommandClock, ExitReason
from ..native import PIDFD_SIGNAL_PROCESS_GROUP
from .engine import _sdk
from .fds import write_all

if TYPE_CHECKING:  # (annotations only: the sandbox module imports this one)
    from .sandbox import DockerSandbox


def _is_fd(how) -> bool:
    """An open descriptor given for stdin/stdout/stderr (not PIPE, DEVNULL or None)."""
    return isinstance(how, int) and how >= 0


class _Stdin:
    """The write side of a command's stdin: the exec connection's sending half."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.closed = False

    def write(self, data: bytes) -> int:
        """Send all of data (waiting for room: pump() may have made the socket
        non-blocking from another thread)."""
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except (BlockingIOError, InterruptedError):
                select_mod.select([], [self._sock], [], 1.0)
        return len(data)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)


class DockerProcess(CommandClock):
    """A command running in a Docker sandbox (an exec instance).

    Output arrives multiplexed on the exec's hijacked connection; ``pump()`` splits it
    into stdout and stderr as it comes. Exit codes come from the engine, which reports a
    command killed by signal N as 128+N: ``returncode`` turns that into -N, as native does.

    Run with a tty (``has_tty``), the connection carries the terminal's bytes raw, both
    ways, as a native pty master does: ``stdout`` and ``stdin`` are files over it (the
    daemon and ``corral run -it`` read and write those), ``stderr`` is None,
    ``resize()`` is the engine's exec resize, and a watcher thread records the exit
    (on_exit, the sandbox's status_fd) without reading the output.
    """

    def __init__(self, sandbox: DockerSandbox, exec_id: str, sock: socket.socket,
                 leftover: bytes, argv: list[str], timeout_s: float | None, oom_before: int,
                 want_stdin: bool, keep: tuple[bool, bool], tty: bool = False):
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.argv = tuple(argv)
        self._sock = sock
        self._buf = bytearray(leftover)
        self._eof = False
        self.has_tty = tty
        self.stdin = _Stdin(sock) if want_stdin else None
        self.stdout = self.stderr = None
        if tty:  # two files of the connection, as native's are two of the pty master;
            # never a half-close: the engine then stops sending a tty's output
            self.stdin = os.fdopen(os.dup(sock.fileno()), "wb", buffering=0)
            self.stdout = os.fdopen(os.dup(sock.fileno()), "rb", buffering=0)
        self._keep = keep
        self._start_clock(timeout_s)
        self._oom_before = oom_before
        self._timed_out = False
        self._pid = 0
        self._pumping = False
        self._finish_lock = threading.Lock()
        #: Called once when the command has ended (the descriptor relays stop then).
        self._on_finish: list = []
        if not want_stdin:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    @property
    def pid(self) -> int:
        """Host pid of the command (0 when the engine does not say, or it ended)."""
        if not self._pid:
            with contextlib.suppress(Exception):
                self._pid = int(self.sandbox.api.exec_inspect(self.exec_id).get("Pid") or 0)
        return self._pid

    def send_signal(self, sig: int) -> None:
        """Signal the command (a local engine only: the engine has no exec-signal call)."""
        if self.returncode is None and self.pid and self.sandbox.local:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> bool:
        """Send sig to the command's process group (the engine starts every exec as a
        session leader, as native commands are); True if sent. Through a pidfd of the
        command, never by a number that may name another process by now; a kernel
        without group pidfd signals (before 6.9) gets the command alone. A remote
        engine's processes are out of reach: False."""
        if self.returncode is not None or not self.pid or not self.sandbox.local:
            return False
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            signal_mod.pidfd_send_signal(pidfd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno != errno_mod.EINVAL:
                raise
            signal_mod.pidfd_send_signal(pidfd, sig)
        finally:
            os.close(pidfd)
        return True

    def kill(self) -> None:
        if self.returncode is not None:
            return
        if self.pid and self.sandbox.local:
            self.send_signal(signal_mod.SIGKILL)
        else:  # nothing else reaches an exec's process: end the whole sandbox
            self.sandbox.destroy()

    def expire(self) -> None:
        self._timed_out = True
        self.kill()

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    # -- terminal -------------------------------------------------------------------------

    def resize(self, rows: int, cols: int) -> None:
        """Set the window of the command's terminal (the engine's exec resize: TIOCSWINSZ
        on its pty, so the foreground group inside gets SIGWINCH).

        Raises:
            InvalidSpec: the command has no tty, or rows/cols out of range.
            CorralError: the command has ended, or the engine refused.
        """
        check_window(rows, cols)
        if not self.has_tty:
            raise InvalidSpec("tty", "the command was not started with a tty")
        if self.returncode is not None:
            raise CorralError(f"{self.argv[0]} has ended; its terminal is gone")
        try:
            self.sandbox.api.exec_resize(self.exec_id, height=rows, width=cols)
        except _sdk().errors.APIError as exc:
            raise CorralError(f"docker: resizing the terminal of {self.argv[0]}: "
                              f"{exc.explanation or exc}") from None

    @staticmethod
    def _drain(fd: int, sink) -> bool:
        """Read what a non-blocking terminal stream holds into sink (the loop of
        `corral run -it`, as for a native pty master); False at its end."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                sink(chunk)
            return False
        return True

    def watch_exit(self) -> None:
        """Record the exit of a tty command on a thread of its own: whoever holds the
        terminal reads its output, so no pump() will see the end (on_exit then runs and
        the sandbox's status_fd wakes, as for a relayed command). Its deadline stays with
        whoever waits for it (the daemon, `corral run`, pump, wait): a pause moves it."""
        threading.Thread(target=self._watch, name=f"corral-docker-tty-{self.exec_id[:8]}",
                         daemon=True).start()

    def _watch(self) -> None:
        try:
            pidfd = -1
            if self._pid and self.sandbox.local:  # sleep until it exits, not poll the engine
                with contextlib.suppress(OSError):
                    pidfd = os.pidfd_open(self._pid)
            if pidfd >= 0:
                try:
                    if self.poll() is None:
                        select_mod.select([pidfd], [], [])
                finally:
                    os.close(pidfd)
            delay = 0.002  # the engine records the exit just after it (or, remote: all along)
            while self.poll() is None:
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        except Exception:  # the sandbox went away under us
            self._finish(None)
        finally:
            self.sandbox._notify_exit()

    # -- output ---------------------------------------------------------------------------

    def _frames(self, on_stdout, on_stderr) -> None:
        """Hand every complete frame in the buffer to its sink."""
        buf = self._buf
        if self.has_tty:  # a terminal's stream is raw: no frames
            if buf and on_stdout is not None:
                on_stdout(bytes(buf))
            buf.clear()
            return
        while len(buf) >= 8:
            kind, size = buf[0], struct.unpack_from(">I", buf, 4)[0]
            if len(buf) < 8 + size:
                break
            payload = bytes(buf[8:8 + size])
            del buf[:8 + size]
            if kind == 2:
                if on_stderr is not None:
                    on_stderr(payload)
            elif on_stdout is not None:
                on_stdout(payload)

    def pump(self, on_stdout, on_stderr, input: bytes | None = None, *,
             close_stdin: bool = True) -> int:
        """Copy output to the callbacks as it comes, feed stdin; returns the exit code.

        The spec's timeout is enforced meanwhile (the command is killed when it passes).
        """
        on_stdout = on_stdout if self._keep[0] else None
        on_stderr = on_stderr if self._keep[1] else None
        if self._sock is None:  # already drained and closed
            self._frames(on_stdout, on_stderr)
            return self.wait()
        self._pumping = True
        self._frames(on_stdout, on_stderr)
        pending = memoryview(input or b"")
        if self.stdin is not None and not pending and close_stdin:
            self.stdin.close()
        sel = selectors.DefaultSelector()
        self._sock.setblocking(False)
        events = selectors.EVENT_READ
        if pending and self.stdin is not None:
            events |= selectors.EVENT_WRITE
        sel.register(self._sock, events)
        expired = False
        try:
            while not self._eof:
                remaining = None if expired else self.remaining()
                if remaining == 0:
                    self.expire()
                    expired, remaining = True, 5.0
                for _key, mask in sel.select(remaining):
                    if mask & selectors.EVENT_WRITE:
                        try:
                            n = self._sock.send(pending[:65536])
                            pending = pending[n:]
                        except (BlockingIOError, InterruptedError):
                            n = 0
                        except OSError:
                            pending = pending[:0]
                        if not pending:
                            self.stdin.close()
                            sel.modify(self._sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        self._read(on_stdout, on_stderr)
                if expired and self.sandbox.state != "running":
                    break
        finally:
            sel.close()
            self._close()
        return self.wait()

    def _relay(self, stdin_fd: int | None, stdout_fd: int | None, stderr_fd: int | None,
               on_end) -> None:
        """Copy between the caller's descriptors and the exec's connection on threads of
        our own (the caller may close its descriptors as soon as exec() returns)."""
        ins = os.dup(stdin_fd) if stdin_fd is not None else None
        outs = [os.dup(fd) if fd is not None else None for fd in (stdout_fd, stderr_fd)]
        self.stdin = None if ins is not None else self.stdin

        def sink(fd):
            if fd is None:
                return lambda _chunk: None

            def write(chunk: bytes) -> None:
                with contextlib.suppress(OSError):  # the reader went away: drop the rest
                    write_all(fd, chunk)
            return write

        sock = self._sock  # pump() drops its reference when the command has ended

        def feed() -> None:
            try:
                writer = _Stdin(sock)
                while True:
                    chunk = os.read(ins, 65536)
                    if not chunk:
                        break
                    writer.write(chunk)
            except OSError:
                pass
            finally:
                os.close(ins)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

        def copy_out() -> None:
            try:
                self.pump(sink(outs[0]), sink(outs[1]), close_stdin=False)
            except Exception:  # the sandbox went away under us
                self._finish(None)
            finally:
                for fd in outs:
                    if fd is not None:
                        os.close(fd)
                on_end()

        if ins is not None:
            threading.Thread(target=feed, name=f"corral-docker-in-{self.exec_id[:8]}",
                             daemon=True).start()
        threading.Thread(target=copy_out, name=f"corral-docker-out-{self.exec_id[:8]}",
                         daemon=True).start()

    def _read(self, on_stdout, on_stderr) -> None:
        while True:
            try:
                chunk = self._sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                self._frames(on_stdout, on_stderr)
                return
            self._buf += chunk
            self._frames(on_stdout, on_stderr)

    def _read_to_eof(self, timeout_s: float = 5.0) -> bytes:
        """Read everything left on the connection into the buffer (a command that has
        already ended); returns the buffer's raw bytes."""
        self._sock.settimeout(timeout_s)
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(65536):
                self._buf += chunk
        self._eof = True
        return bytes(self._buf)

    def _absorb(self) -> None:
        """Take what the connection holds, without blocking, so that output nobody reads
        cannot stall the command: frames of streams asked for stay buffered for a later
        pump(), the rest is dropped."""
        if self._sock is None or self._eof or self._pumping or self.has_tty:
            return  # (a tty's output is its reader's, as a pty master's is)
        with contextlib.suppress(OSError):
            self._sock.setblocking(False)
            while True:
                try:
                    chunk = self._sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    self._eof = True
                    break
                self._buf += chunk
        if not any(self._keep):
            self._frames(None, None)

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self.has_tty and self.stdout is not None:
            self.stdout.close()

    def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        self.pump(out.extend, err.extend, input)
        return bytes(out), bytes(err)

    # -- exit -----------------------------------------------------------------------------

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.sandbox.state != "running":
                self._finish(None)
            else:
                try:
                    info = self.sandbox.api.exec_inspect(self.exec_id)
                except Exception:
                    self._finish(None)
                else:
                    if not info.get("Running") and info.get("ExitCode") is not None:
                        self._finish(int(info["ExitCode"]))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; the spec's timeout kills the command when it passes.

        Raises:
            TimeoutError: ``timeout`` (the caller's, not the spec's) passed first.
        """
        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while self.poll() is None:
            self._absorb()
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline and not self._timed_out:
                self.expire()
            if end is not None and now >= end:
                raise TimeoutError(f"{self.argv[0]} still running after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode

    def _finish(self, code: int | None) -> None:
        with self._finish_lock:  # a tty's watcher and a pump may both see the end
            if self.returncode is not None:
                return
            self._record_exit(code)
        if self._eof or not any(self._keep):
            self._close()  # else output may still be on its way: pump() reads it, then closes
        for hook in self._on_finish:
            with contextlib.suppress(Exception):
                hook()
        if self.on_exit is not None:
            self.on_exit(self)

    def _record_exit(self, code: int | None) -> None:
        """returncode and reason from the engine's exit code (None: the sandbox is gone);
        the reason is set first, so whoever sees a returncode sees its reason too."""
        if code is None:  # the sandbox went away first
            returncode = -signal_mod.SIGKILL
            reason = ExitReason.TIMEOUT if self._timed_out else ExitReason.SIGNALED
        elif (sig := signal_of(code)) is not None:
            returncode = -sig
            if self._timed_out:
                reason = ExitReason.TIMEOUT
            elif sig == signal_mod.SIGKILL and self.sandbox._oom_kills() > self._oom_before:
                reason = ExitReason.OOM
            else:
                reason = ExitReason.SIGNALED
        else:
            returncode = code
            reason = ExitReason.TIMEOUT if self._timed_out else ExitReason.EXITED
        self.reason = reason
        self.returncode = returncode
