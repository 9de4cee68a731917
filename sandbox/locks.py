"""Holds kept by open descriptors, and whether a live process holds a file's flock.

A holder (a task's shim, a reader of a snapshot) keeps an exclusive or shared flock on its
lock file for its whole life, and the kernel drops it when the holder dies however it dies,
so an flock that can be taken means nobody is left. Standard library only: runtime/tasks
and sandbox/state both ask.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


def flock_held(path: str) -> bool:
    """True when some open file description holds an flock on path; False when the file
    is absent or the lock could be taken (it is released again at once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the only descriptor of our description releases our lock
    return False


class Held:
    """Something kept in a store (its layers, a snapshot) for as long as descriptors are
    open: flocked hold files, or directories a remove must not take. `close()` releases it:
    the hold files are unlinked first (an unlocked one is a dead holder's), then the
    descriptors closed. Idempotent; a context manager."""

    def __init__(self, fds: list[int], paths: list[str] = ()):
        self._fds = list(fds)
        self._paths = list(paths)

    def descriptors(self) -> list[int]:
        """The descriptors that keep it (live restore's holder keeps copies of them)."""
        return list(self._fds)

    def paths(self) -> list[str]:
        """The hold files close() unlinks."""
        return list(self._paths)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        paths, self._paths = self._paths, []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for fd in fds:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
