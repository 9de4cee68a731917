"""The workspace file API: read, write and list files under a sandbox's /workspace from outside.

Every path is resolved by the kernel with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS),
relative to a descriptor of the workspace directory, so no '..', absolute symlink or
/proc magic link planted by the sandboxed program can lead outside it. Files the runtime
creates belong to the sandbox's root (uid_base outside), so the sandbox can change them.

No call here may block on something the sandbox controls: a FIFO (its open waits for the
other end), a socket or device node, a file under a lease (an open for writing waits for
the lease holder). The target is first opened with O_PATH (which opens nothing) and its
type checked, then opened for real with O_NONBLOCK | O_NOFOLLOW and checked again with
fstat, so a swap in between is caught too. Anything but a regular file is InvalidSpec;
a lease is Unavailable. WRITE_CLONE is therefore only ever held across calls that finish
by themselves.
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

from .errors import InvalidSpec, NotFound, PermissionDenied, ResourceExhausted, Unavailable

_SYS_openat2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

#: The kernel's PATH_MAX: a longer path could never be opened (ENAMETOOLONG).
MAX_PATH_BYTES = 4096
MAX_READ_BYTES = 4 << 20
MAX_WRITE_BYTES = 64 << 20
#: Entries one ListFiles returns at most; a larger directory is refused, not cut.
MAX_LIST_ENTRIES = 10_000

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
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise InvalidSpec("path", f"{len(os.fsencode(path))} bytes is over the "
                                  f"{MAX_PATH_BYTES} byte limit of a path")
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

    def _check_kind(self, path: str, must_exist: bool) -> None:
        """Refuse anything but a regular file before opening it (O_PATH opens nothing)."""
        try:
            fd = self._open(path, os.O_PATH | os.O_NOFOLLOW)
        except NotFound:
            if must_exist:
                raise
            return
        try:
            kind = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if not stat.S_ISLNK(kind):  # a link: the real open refuses it (ELOOP)
            _require_regular(kind, path)

    def write(self, path: str, content: bytes, mode: int = 0o644) -> int:
        """Create or replace a file; returns its size. Parent directories must exist.

        Raises:
            InvalidSpec: the path names something that is not a regular file (a FIFO,
                socket, device, directory) or content is too large.
            Unavailable: another process holds a lease on the file.
        """
        if len(content) > MAX_WRITE_BYTES:
            raise InvalidSpec("content",
                              f"{len(content)} bytes is over the {MAX_WRITE_BYTES} byte limit")
        if relative(path) == ".":
            raise InvalidSpec("path", "names the workspace itself, not a file")
        self._check_kind(path, must_exist=False)
        # Every call under WRITE_CLONE returns by itself: O_NONBLOCK makes the open of a
        # FIFO (swapped in since the check) or of a leased file fail instead of waiting.
        with WRITE_CLONE.hold(WRITING):
            fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                            mode & 0o777)
            try:
                _require_regular(os.fstat(fd).st_mode, path)
                os.ftruncate(fd, 0)
                os.fchown(fd, self.owner_uid, self.owner_gid)
                os.fchmod(fd, mode & 0o777)
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                return len(content)
            finally:
                os.close(fd)

    def read(self, path: str, max_bytes: int = MAX_READ_BYTES) -> tuple[bytes, bool]:
        """(content, truncated): at most max_bytes of a regular file.

        Raises:
            InvalidSpec: the path names something that is not a regular file.
        """
        max_bytes = min(max_bytes or MAX_READ_BYTES, MAX_READ_BYTES)
        self._check_kind(path, must_exist=True)
        fd = self._open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            _require_regular(os.fstat(fd).st_mode, path)
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
        """Entries of a directory (not recursive), sorted by name.

        Raises:
            ResourceExhausted: the directory has more than MAX_LIST_ENTRIES entries (it is
                read no further than that).
        """
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
        try:
            names = []
            with os.scandir(fd) as it:
                for entry in it:
                    if len(names) == MAX_LIST_ENTRIES:
                        raise ResourceExhausted(
                            f"{path!r} has more than {MAX_LIST_ENTRIES} entries; list one "
                            f"of its subdirectories or read files by name")
                    names.append(entry.name)
            entries = []
            for name in sorted(names):
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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _require_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise InvalidSpec("path", f"{path!r} is {what}, not a regular file")


def _translate(exc: OSError, path: str) -> Exception:
    if exc.errno == errno_mod.ENOENT:
        return NotFound(f"{path!r} does not exist in the workspace")
    if exc.errno == errno_mod.EXDEV:
        return PermissionDenied(f"{path!r} resolves outside the workspace")
    if exc.errno == errno_mod.ELOOP:
        return PermissionDenied(f"{path!r} is or goes through a symlink that is not allowed")
    if exc.errno == errno_mod.ENAMETOOLONG:
        return InvalidSpec("path", f"{_shown(path)}: a name in it is over 255 bytes")
    if exc.errno == errno_mod.ENOTDIR:
        return InvalidSpec("path", f"{path!r}: a parent is not a directory")
    if exc.errno == errno_mod.EISDIR:
        return InvalidSpec("path", f"{path!r} is a directory")
    if exc.errno in (errno_mod.EACCES, errno_mod.EPERM):
        return PermissionDenied(f"{path!r}: {exc.strerror}")
    if exc.errno == errno_mod.EWOULDBLOCK:
        return Unavailable(f"{path!r} is held by a lease of a process in the sandbox; "
                           f"try again later")
    if exc.errno == errno_mod.ENXIO:
        return InvalidSpec("path", f"{path!r} is a FIFO or socket, not a regular file")
    if exc.errno == errno_mod.ETXTBSY:
        return Unavailable(f"{path!r} is a program running in the sandbox; "
                           f"it cannot be written now")
    return exc


def _shown(path: str, limit: int = 120) -> str:
    """repr() of a request path, cut so an error never echoes a huge one."""
    return repr(path if len(path) <= limit else path[:limit] + "...")
