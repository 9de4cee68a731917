"""Terminals of a sandbox: ptys opened in the sandbox's own devpts, and their window size.

Every native sandbox mounts a private devpts instance at /dev/pts (mounts.py, step 5:
`newinstance,ptmxmode=0666`). A command run with a tty gets a pty of *that* instance, so
inside `tty` prints /dev/pts/N, ttyname() works, and the pty's numbers, owners and count
are the sandbox's own. The runtime opens the instance's ptmx from outside, through PID 1's
root (/proc/<init pid>/root, then dev/pts/ptmx with openat2(RESOLVE_IN_ROOT): a link
inside resolves inside), checks that what it opened is a pty multiplexer (character
device 5:2: a sandbox cannot plant something else there, its /dev is read-only, but a
check costs one fstat), unlocks it and takes the slave with
TIOCGPTPEER (no path lookup inside the sandbox at all). The master stays with the runtime
(the CLI copies it to the user's terminal, the daemon streams it as Exec's stdout, and
live restore's holder keeps a copy across a daemon restart: `master_copy`); the
slave becomes the command's stdin, stdout and stderr and, through _spawn's `ctty` step,
its controlling terminal, so the pty's line discipline turns ^C / ^Z into SIGINT /
SIGTSTP for the foreground group inside, as in a local shell.

The user's own terminal is never handed to the sandbox: nothing inside holds a descriptor
of it, and TIOCSTI (pushing input into a terminal) fails with EPERM under the default
seccomp profile in any case (profiles/default.json).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import stat
import struct
import termios

from .errors import InvalidSpec, SandboxSetupError

#: Largest window accepted, in rows and in columns (a terminal larger than this is a bug).
MAX_WINDOW = 10000

_PTMX_RDEV = os.makedev(5, 2)
_SYS_openat2 = 437
#: Symlinks resolve inside the sandbox's root (never the runtime's), no /proc magic links.
_RESOLVE_IN_ROOT_NO_MAGIC = 0x10 | 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
_TIOCGPTPEER = 0x5441  # _IO('T', 0x41), Linux >= 4.13


def check_window(rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) when both are 1..MAX_WINDOW.

    Raises:
        InvalidSpec: either is out of range (INVALID_ARGUMENT).
    """
    for name, value in (("rows", rows), ("cols", cols)):
        if not 1 <= value <= MAX_WINDOW:
            raise InvalidSpec(name, f"{value} is not a terminal size; use 1 to {MAX_WINDOW}")
    return rows, cols


def master_copy(fd: int) -> int:
    """A copy of fd (close-on-exec) when it is a pty master, else -1: a tty command's
    output that a restarted daemon took back from live restore's holder is its master,
    on which resize works again."""
    st = os.fstat(fd)
    if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == _PTMX_RDEV):
        return -1
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def set_window(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a pty (either side): the foreground group inside gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_window(fd: int) -> tuple[int, int]:
    """(rows, cols) of a terminal."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def open_path_in_root(root: str, path: str, flags: int) -> int:
    """openat2(RESOLVE_IN_ROOT) of path beneath root: a link inside the sandbox resolves
    inside it (through /proc/<pid>/root an absolute one would reach the runtime's root)."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = struct.pack("QQQ", flags, 0, _RESOLVE_IN_ROOT_NO_MAGIC)
        fd = _libc.syscall(_SYS_openat2, root_fd, os.fsencode(path), how, len(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd
    finally:
        os.close(root_fd)


def open_in_root(root: str, rows: int, cols: int, owner: int | None = None) -> tuple[int, int]:
    """(master, slave) of a new pty of the devpts mounted at ROOT/dev/pts, both
    close-on-exec, the window set to rows x cols, the slave owned by `owner` (a host uid,
    the sandbox's root) when given and this process may chown.

    Raises:
        InvalidSpec: rows or cols out of range.
        SandboxSetupError: the sandbox has no usable pty multiplexer (step, path, errno).
    """
    check_window(rows, cols)
    path = os.path.join(root, "dev/pts/ptmx")
    try:
        # O_NONBLOCK: a FIFO planted there would block the open; the flag is cleared below
        master = open_path_in_root(root, "dev/pts/ptmx",
                               os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SandboxSetupError("open ptmx", path, exc.errno) from None
    slave = -1
    step = "fstat ptmx"
    try:
        st = os.fstat(master)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _PTMX_RDEV:
            raise SandboxSetupError(step, path, 19)  # ENODEV: not a pty multiplexer
        os.set_blocking(master, True)
        step = "ioctl(TIOCSPTLCK)"
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        step = "ioctl(TIOCGPTPEER)"
        slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        step = "ioctl(TIOCSWINSZ)"
        set_window(master, rows, cols)
        if owner is not None:
            with contextlib.suppress(OSError):  # rootless: it stays the caller's
                os.fchown(slave, owner, owner)
    except OSError as exc:
        os.close(master)
        if slave >= 0:
            os.close(slave)
        raise SandboxSetupError(step, path, exc.errno) from None
    except BaseException:
        os.close(master)
        if slave >= 0:
            os.close(slave)
        raise
    return master, slave
