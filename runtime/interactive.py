"""The user's terminal while a sandboxed program has a tty (`run -it`, `exec -it`).

`RawTerminal` puts the terminal on stdin in raw mode for the program's lifetime and puts
back exactly the termios it found on every way out Python sees: the program ending, being
killed, its timeout or OOM, Ctrl-C or SIGTERM/SIGHUP/SIGQUIT sent to corral itself (turned
into `TerminalLost`, so every `finally` runs), the daemon going away (an exception from
the stream). Only a SIGKILL of corral itself leaves the terminal raw (`reset` or
`stty sane` repairs it). In raw mode the keys go to the program as bytes: ^C, ^Z and ^\\
become signals by the line discipline of the program's own pty, inside the sandbox.

Window changes (SIGWINCH) are not handled in a signal handler: the C-level wakeup fd
writes a byte to `RawTerminal.wake_fd`, which the I/O loop (or the input thread) selects
on and answers with `window()` and a resize of the program's pty.
"""

from __future__ import annotations

import contextlib
import os
import signal
import termios
import threading
import tty
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from corral.sandbox import ptys

from .cli.exits import exec_ending, killed_by


class TerminalLost(Exception):
    """corral itself was asked to stop (SIGTERM, SIGHUP, SIGQUIT) while in raw mode."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"corral received {signal.Signals(signum).name}")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class RawTerminal:
    """Raw mode on `fd` (a terminal) and a wakeup pipe for SIGWINCH; restores on exit.

    `raw=False` (a tty without -i: corral reads no keys) keeps the keys cooked, so ^C is
    corral's SIGINT, and turns off only output processing (OPOST): the program's pty has
    already made its newlines \r\n.
    """

    def __init__(self, fd: int = 0, *, raw: bool = True):
        self.fd = fd
        self.raw = raw
        self.saved: list | None = None
        self.wake_fd = -1
        self._wake_w = -1
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup = -1

    def window(self) -> tuple[int, int]:
        """(rows, cols) of the user's terminal (24x80 when it reports nothing)."""
        with contextlib.suppress(OSError):
            rows, cols = ptys.get_window(self.fd)
            if rows and cols:
                return min(rows, ptys.MAX_WINDOW), min(cols, ptys.MAX_WINDOW)
        return 24, 80

    def __enter__(self) -> RawTerminal:
        self.wake_fd, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            self._old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH,
                                                                lambda *_: None)
            for sig in _STOP_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, self._stop)
            self.saved = termios.tcgetattr(self.fd)
            if self.raw:
                tty.setraw(self.fd, termios.TCSANOW)
            else:
                attrs = termios.tcgetattr(self.fd)
                attrs[1] &= ~termios.OPOST
                termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @staticmethod
    def _stop(signum, _frame):
        raise TerminalLost(signum)

    def _restore(self) -> None:
        if self.saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        if self.wake_fd >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self.wake_fd)
            os.close(self._wake_w)
            self.wake_fd = self._wake_w = -1

    def window_changed(self) -> bool:
        """Read the wakeup pipe; True when a SIGWINCH was among what it held."""
        changed = False
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.wake_fd, 512):
                changed = changed or signal.SIGWINCH in data
        return changed


def run_on_terminal(proc, *, interactive: bool, raw: bool) -> int | None:
    """Copy a local Process's pty to the user's terminal (and, interactive, the user's keys
    to it) until it ends; returns None, or the signal that told corral to stop (the
    program is then killed).

    SIGINT sent to corral (a ^C typed while the terminal is not raw, i.e. without -i, or a
    `kill -INT`) interrupts the program's group; a second one kills it.
    """
    import selectors

    from corral.runtime.terminal import TerminalWriter
    from corral.sandbox import CorralError

    out = TerminalWriter(os.fdopen(os.dup(1), "wb", buffering=0), raw=raw, program_tty=True)
    interrupts = []

    def on_sigint(_signum, _frame):
        interrupts.append(1)
        if len(interrupts) == 1:
            proc.signal_group(signal.SIGINT)
        else:
            proc.kill()

    old_sigint = signal.signal(signal.SIGINT, on_sigint)
    os.set_blocking(proc.stdout.fileno(), False)  # one open file: stdin's dup is too
    sel = selectors.DefaultSelector()
    try:
        with RawTerminal(0, raw=interactive) as term:
            with contextlib.suppress(CorralError, OSError):  # the window may have changed
                proc.resize(*term.window())
            for fd in (proc.stdout.fileno(), term.wake_fd, proc.sandbox.status_fd,
                       term.fd if interactive else -1):
                if fd >= 0:
                    sel.register(fd, selectors.EVENT_READ)
            try:
                _copy_until_exit(proc, term, sel, out)
            except TerminalLost as exc:
                proc.kill()
                proc.wait()
                return exc.signum
            finally:
                out.close()
    finally:
        sel.close()
        signal.signal(signal.SIGINT, old_sigint)
        with contextlib.suppress(OSError):
            out.stream.close()
    return None


def _copy_until_exit(proc, term: RawTerminal, sel, out) -> None:
    """The I/O loop of run_on_terminal: the pty's output to `out`, the user's keys to the
    pty (held in `pending` while the program does not read them), window changes to a
    resize; the program's timeout is kept here, as its own wait would."""
    from corral.sandbox import CorralError

    master, keys = proc.stdout.fileno(), proc.stdin.fileno()
    pending = bytearray()
    expired = False
    while proc.poll() is None:
        remaining = None if expired else proc.remaining()
        if remaining == 0:
            proc.expire()
            expired, remaining = True, None
        if pending:  # the program is not reading its keys: retry soon
            remaining = 0.05 if remaining is None else min(remaining, 0.05)
            _send_keys(keys, pending)
        for key, _ in sel.select(remaining):
            if key.fd == master:
                if not proc._drain(master, out.write):
                    sel.unregister(master)  # every slave closed; exit follows
            elif key.fd == term.wake_fd:
                if term.window_changed():
                    with contextlib.suppress(CorralError, OSError):
                        proc.resize(*term.window())
            elif key.fd == term.fd:
                data = os.read(term.fd, 65536)
                if not data:
                    sel.unregister(term.fd)
                elif len(pending) < (1 << 20):
                    pending += data
                    _send_keys(keys, pending)
    with contextlib.suppress(OSError):  # what the program wrote last
        proc._drain(master, out.write)


def _send_keys(fd: int, pending: bytearray) -> None:
    """Write what the pty takes of `pending` now, keeping the rest; a pty that is gone
    drops them all."""
    try:
        del pending[:os.write(fd, pending)]
    except BlockingIOError:
        pass
    except OSError:
        pending.clear()


def exec_on_terminal(client, sandbox_id: str, argv: list[str], kw: dict, *,
                     interactive: bool, raw: bool) -> int:
    """`corral exec -t`: run argv with tty through the daemon, the user's terminal raw
    (interactive) while it runs; returns the exit status (as RUN_EPILOG documents).

    The main thread writes the Exec stream to the terminal; an input thread sends the
    user's keys (SendInput) and window changes (Resize). SIGINT to corral signals the
    command; SIGTERM/SIGHUP/SIGQUIT hang it up (SIGHUP, as a closed terminal would) and
    corral exits 128+N; a daemon that goes away raises from the stream. Every way out
    restores the terminal first.
    """
    import sys

    from corral.runtime.terminal import TerminalWriter

    out = TerminalWriter(os.fdopen(os.dup(1), "wb", buffering=0), raw=raw, program_tty=True)
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    exec_ids: list[str] = []  # the command's id, once the daemon has started it

    def on_sigint(_signum, _frame):
        if exec_ids:
            with contextlib.suppress(Exception):
                client.signal(sandbox_id, signal.SIGINT, exec_ids[0])

    old_sigint = signal.signal(signal.SIGINT, on_sigint)
    try:
        with RawTerminal(0, raw=interactive) as term:
            keys = _KeyPump(client, sandbox_id, term, stop_r, interactive=interactive)
            try:
                status, message = _follow_exec(client, sandbox_id, argv, kw, term, out,
                                               keys, exec_ids, interactive=interactive)
            except TerminalLost as exc:
                if exec_ids:
                    with contextlib.suppress(Exception):
                        client.signal(sandbox_id, signal.SIGHUP, exec_ids[0])
                return killed_by(exc.signum)
            finally:
                out.close()
                os.write(stop_w, b"x")
                keys.join()
        # the terminal is itself again: messages end lines with \n
        if message:
            print(f"corral: {message}", file=sys.stderr)
        return status
    finally:
        signal.signal(signal.SIGINT, old_sigint)
        os.close(stop_r)
        os.close(stop_w)
        with contextlib.suppress(OSError):
            out.stream.close()


def _follow_exec(client, sandbox_id: str, argv: list[str], kw: dict, term: RawTerminal, out,
                 keys: _KeyPump, exec_ids: list[str], *, interactive: bool) -> tuple[int, str]:
    """Write the Exec stream to the terminal until the command exits: its status and the
    line to print; the key pump starts once the daemon names the command."""
    rows, cols = term.window()
    env = dict(kw.pop("env", None) or {})
    if os.environ.get("TERM"):
        env.setdefault("TERM", os.environ["TERM"])
    for event in client.exec(sandbox_id, argv, tty=True, rows=rows, cols=cols,
                             keep_stdin_open=interactive, env=env, **kw):
        kind = event.WhichOneof("event")
        if kind == "started":
            exec_ids.append(event.started.exec_id)
            keys.start(event.started.exec_id)
        elif kind == "output":
            out.write(event.output.batch.text)
        elif kind == "exited":
            return exec_ending(argv[0], event.exited)
    return 1, "exec: the stream ended without an exit status"


@dataclass
class _KeyPump:
    """The input thread of exec_on_terminal: the user's keys (SendInput) and window
    changes (Resize) to the command, until a byte on `stop_fd`."""

    client: Any
    sandbox_id: str
    term: RawTerminal
    stop_fd: int
    _: KW_ONLY
    interactive: bool
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self, exec_id: str) -> None:
        self._thread = threading.Thread(target=self._pump, args=(exec_id,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(5)

    def _pump(self, exec_id: str) -> None:
        import selectors

        term = self.term
        sel = selectors.DefaultSelector()
        sel.register(self.stop_fd, selectors.EVENT_READ)
        sel.register(term.wake_fd, selectors.EVENT_READ)
        if self.interactive:
            sel.register(term.fd, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fd == self.stop_fd:
                        return
                    if key.fd == term.wake_fd:
                        if term.window_changed():
                            self.client.resize(self.sandbox_id, exec_id, *term.window())
                    else:
                        data = os.read(term.fd, 65536)
                        if not data:
                            sel.unregister(term.fd)
                        else:
                            self.client.send_input(self.sandbox_id, exec_id, data)
        except Exception:  # noqa: BLE001 (the command ended or the daemon went: the
            return  # stream says which)
        finally:
            sel.close()
