"""A small tmpfs to run a daemon's state on, and a filler that runs it out of space."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, inodes: int = 4096):
    """Mount a tmpfs of `size` (e.g. "32M") at path for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0,
                   f"size={size},nr_inodes={inodes},mode=0700".encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs", str(path))
    try:
        yield path
    finally:
        _libc.umount2(os.fsencode(path), _MNT_DETACH)


def fill(path: Path) -> int:
    """Write path until the filesystem says ENOSPC; returns the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                n = os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 2]  # the last bytes too: really full
                continue
            written += n
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
