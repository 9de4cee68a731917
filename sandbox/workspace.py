"""The workspace file API: read, write and list files under a sandbox's /workspace from outside.

Every path is resolved by the kernel with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS),
relative to a descriptor of the workspace directory, so no '..', absolute symlink or
/proc magic link planted by the sandboxed program can lead outside it. Files the runtime
creates belong to the sandbox's root (uid_base outside), so the sandbox can change them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InvalidSpec, NotFound, PermissionDenied

_SYS_openat2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

MAX_READ_BYTES = 4 << 20
MAX_WRITE_BYTES = 64 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

WRITING, CLONING = 0, 1


class _WriteCloneExclusion:
    """Keeps "a file is open for writing" and "a process is being cloned" apart in time.

    A child cloned while this process holds a descriptor open for writing gets a copy of it
    and keeps it until its own execve (O_CLOEXEC closes it only then), and sandbox children
    do a lot before exec. Meanwhile execve of that file, say an agent binary just uploaded
    to a workspace, fails with ETXTBSY in any sandbox. So writers of workspace files and
    the spawn calls take turns: any number of either may run together, never both kinds,
    and a group that is waiting gets in before more of the running group (no starvation).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = [0, 0]
        self._waiting = [0, 0]

    @contextlib.contextmanager
    def hold(self, group: int) -> Iterator[None]:
        other = 1 - group
        with self._cond:
            self._waiting[group] += 1
            try:
                while self._active[other] or (self._waiting[other] and self._active[group]):
                    self._cond.wait()
            finally:
                self._waiting[group] -= 1
            self._active[group] += 1
        try:
            yield
        finally:
            with self._cond:
                self._active[group] -= 1
                if not self._active[group]:
                    self._cond.notify_all()


#: `with WRITE_CLONE.hold(WRITING)` around a write descriptor's life, `hold(CLONING)` around
#: a clone of a sandbox process (sandbox/backends/native.py).
WRITE_CLONE = _WriteCloneExclusion()


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, _RESOLVE)
    fd = _libc.syscall(_SYS_openat2, dirfd, os.fsencode(path), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


@dataclass(frozen=True)
class FileEntry:
    name: str
    kind: str  # file | dir | symlink | other
    size: int
    mode: int
    mtime: float


def relative(path: str) -> str:
    """Normalize a request path to one relative to /workspace.

    Raises:
        InvalidSpec: the path is empty of meaning, outside /workspace, or has a NUL byte.
    """
    if "\0" in path:
        raise InvalidSpec("path", "contains a NUL byte")
    p = PurePosixPath(path)
    if p.is_absolute():
        try:
            p = p.relative_to("/workspace")
        except ValueError:
            raise InvalidSpec("path", f"{path!r} is outside /workspace") from None
    if ".." in p.parts:
        raise InvalidSpec("path", f"{path!r} must not contain '..'")
    return str(p) if str(p) not in ("", ".") else "."


class Workspace:
    """File access beneath one sandbox's workspace directory."""

    def __init__(self, root: str, owner_uid: int, owner_gid: int):
        self.root = root
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        rel = relative(path)
        dirfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _openat2(dirfd, rel, flags, mode)
        except OSError as exc:
            raise _translate(exc, path) from None
        finally:
            os.close(dirfd)

    def write(self, path: str, content: bytes, mode: int = 0o644) -> int:
        """Create or replace a file; returns its size. Parent directories must exist."""
        if len(content) > MAX_WRITE_BYTES:
            raise InvalidSpec("content",
                              f"{len(content)} bytes is over the {MAX_WRITE_BYTES} byte limit")
        if relative(path) == ".":
            raise InvalidSpec("path", "names the workspace itself, not a file")
        with WRITE_CLONE.hold(WRITING):
            fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                            mode & 0o777)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidSpec("path", f"{path!r} is not a regular file")
                os.fchown(fd, self.owner_uid, self.owner_gid)
                os.fchmod(fd, mode & 0o777)
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                return len(content)
            finally:
                os.close(fd)

    def read(self, path: str, max_bytes: int = MAX_READ_BYTES) -> tuple[bytes, bool]:
        """(content, truncated): at most max_bytes of a regular file."""
        max_bytes = min(max_bytes or MAX_READ_BYTES, MAX_READ_BYTES)
        fd = self._open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidSpec("path", f"{path!r} is not a regular file")
            chunks, size = [], 0
            while size <= max_bytes:
                chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
            return data[:max_bytes], len(data) > max_bytes
        finally:
            os.close(fd)

    def list(self, path: str = ".") -> list[FileEntry]:
        """Entries of a directory (not recursive), sorted by name."""
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            entries = []
            for name in sorted(os.listdir(fd)):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    kind = "file"
                elif stat.S_ISDIR(st.st_mode):
                    kind = "dir"
                elif stat.S_ISLNK(st.st_mode):
                    kind = "symlink"
                else:
                    kind = "other"
                entries.append(FileEntry(name, kind, st.st_size, stat.S_IMODE(st.st_mode),
                                         st.st_mtime))
            return entries
        finally:
            os.close(fd)


def _translate(exc: OSError, path: str) -> Exception:
    if exc.errno == errno_mod.ENOENT:
        return NotFound(f"{path!r} does not exist in the workspace")
    if exc.errno == errno_mod.EXDEV:
        return PermissionDenied(f"{path!r} resolves outside the workspace")
    if exc.errno == errno_mod.ELOOP:
        return PermissionDenied(f"{path!r} is or goes through a symlink that is not allowed")
    if exc.errno == errno_mod.ENOTDIR:
        return InvalidSpec("path", f"{path!r}: a parent is not a directory")
    if exc.errno == errno_mod.EISDIR:
        return InvalidSpec("path", f"{path!r} is a directory")
    if exc.errno in (errno_mod.EACCES, errno_mod.EPERM):
        return PermissionDenied(f"{path!r}: {exc.strerror}")
    return exc
