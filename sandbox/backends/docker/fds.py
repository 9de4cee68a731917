"""Descriptors passed into an exec (an engine takes none): FIFOs in a shared directory,
copied from and to the caller's descriptors by a relay, and the wrapper that opens them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select as select_mod
import struct
import threading
from typing import TYPE_CHECKING

from ...errors import InvalidSpec

if TYPE_CHECKING:  # (annotations only: the sandbox module imports this one)
    from .sandbox import DockerSandbox


#: Where a sandbox's descriptor FIFOs appear inside its container (read-only bind).
FDS_INSIDE = "/run/corral-fds"


def _frame_payloads(raw: bytes) -> bytes:
    """The payloads of the complete stream frames (8-byte header: kind, 0, 0, 0, size) at
    the start of raw, joined in order; stops at the first thing that is not a frame."""
    out = bytearray()
    at = 0
    while at + 8 <= len(raw) and raw[at] in (0, 1, 2) and raw[at + 1:at + 4] == b"\0\0\0":
        size = struct.unpack_from(">I", raw, at + 4)[0]
        if at + 8 + size > len(raw):
            break
        out += raw[at + 8:at + 8 + size]
        at += 8 + size
    return bytes(out)


def _wrapper_state(pid: int) -> str:
    """"starting" while pid is still the OCI runtime's init (the engine reports the pid
    before runc has executed anything), "wrapper" while it runs wrap()'s shell, "exec'd"
    once it runs the command, "gone" when it has exited (read from /proc: the engine is
    local)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read()
    except OSError:
        return "gone"
    if comm.startswith(b"runc"):  # runc init names itself runc:[2:INIT] until it execs
        return "starting"
    if not parts or parts == [b""]:
        return "gone"  # a zombie has no command line
    if parts[:2] == [b"/bin/sh", b"-c"] and parts[3:4] == [b"corral-exec"]:
        return "wrapper"
    return "exec'd"


def wrap(argv: list[str], steps: list[str]) -> list[str]:
    """argv started through a shell that runs steps first, then execs argv (same pid);
    _wrapper_state tells the two apart by the "corral-exec" name."""
    return ["/bin/sh", "-c", "; ".join([*steps, 'exec "$@"']), "corral-exec", *argv]


def _host_fifo(sandbox: DockerSandbox, name: str) -> tuple[str, int]:
    """A FIFO in the sandbox's fds directory, owned by the sandbox's uid, held open
    read-write here (so no open of it, on either side, ever blocks): (path, fd)."""
    path = os.path.join(sandbox._fds_dir, name)
    os.mkfifo(path, 0o600)
    try:
        if os.geteuid() == 0:
            os.chown(path, sandbox.spec.uid_base, sandbox.spec.uid_base)
        return path, os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.unlink(path)
        raise


class _StartGate:
    """Holds a tty command back until its window is set, on engines that cannot size an
    exec's terminal at its start (API < 1.42: the pty starts at 0x0, and a program that
    asks at once, `stty size`, would see that).

    The wrapper's first step reads one line from a FIFO of the fds directory; the host
    writes it after the exec resize. Closing the gate without opening it (the start
    failed) gives the read its end of file, so the command never waits for nothing.
    """

    def __init__(self, sandbox: DockerSandbox):
        self.name = f"{os.urandom(4).hex()}-gate"
        self.path, self._fd = _host_fifo(sandbox, self.name)

    def step(self) -> str:
        return f"read -r _ < {FDS_INSIDE}/{self.name}"

    def open(self) -> None:
        """Let the command start (its window is set)."""
        if self._fd >= 0:
            os.write(self._fd, b"go\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class _PassedFds:
    """Descriptors handed to a command (``pass_fds``) across the engine, through FIFOs.

    Nothing but bytes crosses into a container, so each {fd inside: fd here} becomes a FIFO
    in the sandbox's host-side fds directory, bound read-only at FDS_INSIDE (a FIFO stays
    writable on a read-only mount). The command is started through ``sh -c 'exec 3>FIFO
    4<FIFO; exec "$@"'``, and a relay thread per descriptor copies between the FIFO and the
    caller's descriptor: out of the sandbox when the caller passed a write end (the agent
    protocol's events fd), into it for a read end (the control fd). The host side holds each
    FIFO open read-write, so no open ever blocks; relays stop when the command ends.
    """

    def __init__(self, sandbox: DockerSandbox, pass_fds: dict[int, int]):
        self.links: list[tuple[str, int, int, str]] = []  # (direction, fifo fd, dup, path)
        self.redirections: list[str] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._lock = threading.Lock()
        tag = os.urandom(4).hex()
        try:
            for inside, here in sorted(pass_fds.items()):
                if not 3 <= inside <= 9:
                    raise InvalidSpec("pass_fds", f"descriptor {inside}: the docker backend "
                                                  "passes descriptors 3 to 9")
                access = fcntl.fcntl(here, fcntl.F_GETFL) & os.O_ACCMODE
                if access not in (os.O_WRONLY, os.O_RDONLY):
                    raise InvalidSpec("pass_fds", f"descriptor {inside}: pass one end of a "
                                                  "pipe (read or write), not a read-write one")
                name = f"{tag}-{inside}"
                path, fifo = _host_fifo(sandbox, name)
                direction = "out" if access == os.O_WRONLY else "in"
                self.links.append((direction, fifo, os.dup(here), path))
                arrow = ">" if direction == "out" else "<"
                self.redirections.append(f"{inside}{arrow}{FDS_INSIDE}/{name}")
        except BaseException:
            self.close()
            raise

    def step(self) -> str:
        """The wrapper's line that opens the FIFOs as the command's descriptors."""
        return f"exec {' '.join(self.redirections)}"

    def start(self) -> None:
        self._running = len(self.links)
        for link in self.links:
            t = threading.Thread(target=self._copy, args=link, daemon=True,
                                 name=f"corral-docker-fd-{link[0]}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """The command ended: relays drain what is left and close (from _finish)."""
        with contextlib.suppress(OSError):
            os.close(self._stop_w)
        self._stop_w = -1

    def close(self) -> None:
        self.stop()
        for _direction, fifo, here, path in self.links:
            for fd in (fifo, here):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.links = []
        with contextlib.suppress(OSError):
            os.close(self._stop_r)

    def _copy(self, direction: str, fifo: int, here: int, path: str) -> None:
        src, dst = (fifo, here) if direction == "out" else (here, fifo)
        try:
            while True:
                ready, _, _ = select_mod.select([src, self._stop_r], [], [])
                if src in ready:
                    try:
                        chunk = os.read(src, 65536)
                    except BlockingIOError:
                        chunk = None
                    if chunk == b"":
                        break  # the caller closed its end (control) or no writer left
                    if chunk:
                        write_all(dst, chunk)
                        continue
                if self._stop_r in ready:
                    if direction == "out":  # what the command wrote before it ended
                        with contextlib.suppress(BlockingIOError, OSError):
                            while chunk := os.read(fifo, 65536):
                                write_all(here, chunk)
                    break
        except OSError:
            pass
        finally:
            for fd in (fifo, here):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                with contextlib.suppress(OSError):
                    os.close(self._stop_r)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, waiting while a non-blocking `fd` is full; OSError
    (the reader went away) propagates."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select_mod.select([], [fd], [], 1.0)
