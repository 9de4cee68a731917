"""Trees a sandbox wrote, handled from outside: removed, walked and copied without recursion.

A sandboxed program controls every name, link, mode, type and depth below its workspace.
So nothing here recurses (a 1,500-level directory made `shutil.rmtree` and `os.walk` hit
RecursionError and leave the workspace on disk), every step is relative to a directory
descriptor and never follows a symbolic link, no more than `MAX_OPEN_DIRS` descriptors are
open however deep the tree (a descriptor per level ran into RLIMIT_NOFILE), and files are
opened with O_NONBLOCK and their type checked before use (opening a FIFO for reading or
writing blocks until the other end appears). An ancestor whose descriptor was closed is
reopened through ".." and must be the same directory (device and inode) as before.

Files are copied sparsely: only their data ranges (SEEK_DATA/SEEK_HOLE) are read and
written, and the copy is extended to the original size, so a 64 MiB file of holes costs
no bytes to copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from corral.ext.sparse import data_ranges

#: Directory descriptors one walk or removal keeps open at most.
MAX_OPEN_DIRS = 32
#: Names read from one directory at most by a walk (a removal reads them all, in batches).
MAX_DIR_NAMES = 100_000

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Flags to open a file of a sandbox-written tree for reading.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CHUNK = 1 << 20


class TreeChanged(OSError):
    """A directory was moved while it was walked: its ".." is no longer the one walked from."""

    def __init__(self, name: str):
        super().__init__(errno.ESTALE, "the directory tree changed while it was walked", name)


class _Frame:
    __slots__ = ("name", "dev", "ino", "fd", "pending")

    def __init__(self, name: str, st: os.stat_result, fd: int):
        self.name = name
        self.dev, self.ino = st.st_dev, st.st_ino
        self.fd: int | None = fd
        self.pending: list[str] | None = None  # names still to visit (walks), reversed


class _DirStack:
    """The directories from a top descriptor down to the current one.

    At most MAX_OPEN_DIRS of them hold a descriptor (the top one always, not owned); the
    others are reopened through ".." on the way back up, and must be the same directory.
    """

    def __init__(self, top_fd: int):
        self.frames = [_Frame("", os.fstat(top_fd), top_fd)]
        self._open = 0  # descriptors this stack owns

    @property
    def top(self) -> _Frame:
        return self.frames[-1]

    @property
    def depth(self) -> int:
        return len(self.frames) - 1

    def push(self, name: str) -> _Frame:
        fd = os.open(name, _DIR, dir_fd=self.top.fd)
        try:
            frame = _Frame(name, os.fstat(fd), fd)
        except BaseException:
            os.close(fd)
            raise
        self.frames.append(frame)
        self._open += 1
        if self._open > MAX_OPEN_DIRS:
            for old in self.frames[1:]:
                if old.fd is not None:
                    os.close(old.fd)
                    old.fd = None
                    self._open -= 1
                    break
        return frame

    def pop(self) -> _Frame:
        """Leave the current directory (its descriptor is closed); the parent is open after."""
        frame = self.frames.pop()
        parent = self.frames[-1]
        try:
            if parent.fd is None:
                fd = os.open("..", _DIR, dir_fd=frame.fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (parent.dev, parent.ino):
                    os.close(fd)
                    raise TreeChanged(parent.name)
                parent.fd = fd
                self._open += 1
        finally:
            os.close(frame.fd)
            self._open -= 1
        return frame

    def close(self) -> None:
        for frame in self.frames[1:]:
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None
        self.frames[1:] = []
        self._open = 0


# -- removal ----------------------------------------------------------------------------------


def remove_tree(path: str, *, ignore_errors: bool = False) -> None:
    """Remove path and everything below it; a missing path is fine.

    Never follows a symbolic link (a link is removed, not its target), makes read-only
    directories writable where a removal needs it, and keeps a bounded number of
    descriptors open at any depth.

    Raises:
        OSError: something could not be removed (not with ignore_errors).
    """
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        remove_at(pfd, name)
    except OSError:
        if not ignore_errors:
            raise
    finally:
        os.close(pfd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove dir_fd/name (a file, link or whole tree); see remove_tree."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(dir_fd, name, False)
        return
    stack = _DirStack(dir_fd)
    try:
        _push_writable(stack, name)
        while stack.depth:
            sub = _clear_files(stack.top.fd)
            if sub is not None:
                _push_writable(stack, sub)
                continue
            done = stack.pop()
            _unlink(stack.top.fd, done.name, True)
    finally:
        stack.close()


def _push_writable(stack: _DirStack, name: str) -> None:
    try:
        frame = stack.push(name)
    except PermissionError:  # a mode-000 directory, when we are not root
        # chmod through an O_PATH descriptor: there is no fchmodat(AT_SYMLINK_NOFOLLOW)
        pfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=stack.top.fd)
        try:
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        finally:
            os.close(pfd)
        frame = stack.push(name)
    st = os.fstat(frame.fd)
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700 and st.st_uid == os.geteuid() != 0:
        os.fchmod(frame.fd, 0o700)


def _unlink(dir_fd: int, name: str, is_dir: bool) -> None:
    try:
        if is_dir:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.fchmod(dir_fd, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if is_dir:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)


def _clear_files(fd: int) -> str | None:
    """Unlink every non-directory in fd; the name of a subdirectory left, if any."""
    os.lseek(fd, 0, os.SEEK_SET)
    with os.scandir(fd) as it:
        for entry in it:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                return entry.name
            try:
                _unlink(fd, entry.name, False)
            except IsADirectoryError:  # replaced by a directory meanwhile
                return entry.name
    return None


# -- walking ----------------------------------------------------------------------------------


def name_key(name: str) -> bytes:
    """Sort key of one path component: its bytes (the order walks visit names in)."""
    return os.fsencode(name)


def path_key(parts: tuple[str, ...] | list[str]) -> tuple[bytes, ...]:
    """Sort key of a relative path: the order of a walk (depth first, names by bytes)."""
    return tuple(os.fsencode(p) for p in parts)


class _Node:
    """A directory's place in the tree: its name and its parent's node (None: the top)."""

    __slots__ = ("name", "parent")

    def __init__(self, name: str, parent: _Node | None):
        self.name, self.parent = name, parent


def fsync_dir(path: str) -> None:
    """fsync a directory: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """Flush everything written to the filesystem that holds path (one syncfs(2) instead
    of an fsync per file of a tree just written, e.g. an unpacked layer)."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def write_synced(path: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write data to a file (mode 0600) and fsync it before returning. exclusive: the file
    must not exist yet (O_EXCL); otherwise it is truncated. The name itself is durable
    only once its directory is synced (fsync_dir), which the caller does after a rename."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)

@dataclass
class Entry:
    """One entry of a walk. dir_fd is the containing directory; valid until the next one.
    depth is 0 for an entry directly below the top. parts and path cost O(depth): a walk
    never builds them itself, so walking a deep chain stays linear."""

    name: str
    depth: int
    dir_fd: int
    st: os.stat_result
    parent: _Node | None

    @property
    def parts(self) -> tuple[str, ...]:
        names = [self.name]
        node = self.parent
        while node is not None:
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    @property
    def path(self) -> str:
        return "/".join(self.parts)


@dataclass
class WalkStats:
    """What a walk left out: directories not entered because of max_depth."""

    pruned: int = 0


def walk(top_fd: int, *, start: tuple[str, ...] = (), max_depth: int | None = None,
         stats: WalkStats | None = None) -> Iterator[Entry]:
    """Every entry below top_fd, depth first, names sorted by bytes, a directory before its
    contents; links are reported (lstat), never followed. Each entry costs O(1) (plus its
    directory's sort), whatever its depth.

    With `start`, entries before that path in this order are skipped (an ancestor of it is
    still reported, so a copy can make it). With `max_depth`, entries deeper than that many
    levels are left out (a directory at the last level is reported, not entered, and
    counted in stats.pruned). Reads at most MAX_DIR_NAMES names of one directory. top_fd
    stays open and owned by the caller.

    Raises:
        TreeChanged: a directory was moved away while it was walked.
    """
    start_keys = [name_key(p) for p in start]
    passed = not start_keys  # past start: every later entry comes after it, no comparing
    stack = _DirStack(top_fd)
    nodes: list[_Node | None] = [None]  # the node of each directory on the stack
    try:
        stack.top.pending = _sorted_names(top_fd)
        while True:
            frame = stack.top
            depth = stack.depth
            if not frame.pending:
                if not depth:
                    return
                stack.pop()
                nodes.pop()
                passed = True  # left the directory on start's path: the rest is after it
                continue
            name = frame.pending.pop()
            descend = True
            if not passed:  # this directory is start[:depth]; compare one name only
                key = name_key(name)
                if key < start_keys[depth]:
                    continue
                if key > start_keys[depth] or depth == len(start_keys) - 1:
                    passed = True
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if not passed and not is_dir:  # a file where start has a directory
                passed = True
            yield Entry(name, depth, frame.fd, st, nodes[-1])
            if not is_dir:
                continue
            if max_depth is not None and depth + 1 >= max_depth:
                if stats is not None:
                    stats.pruned += 1
                descend = False
            if not descend:
                continue
            try:
                sub = stack.push(name)
            except OSError:  # gone, replaced, or not ours to read: not part of the walk
                continue
            nodes.append(_Node(name, nodes[-1]))
            sub.pending = _sorted_names(sub.fd)
    finally:
        stack.close()


def _sorted_names(fd: int) -> list[str]:
    """Up to MAX_DIR_NAMES names of a directory, in reverse walk order (popped from the end)."""
    os.lseek(fd, 0, os.SEEK_SET)
    names = []
    with os.scandir(fd) as it:
        for entry in it:
            names.append(entry.name)
            if len(names) >= MAX_DIR_NAMES:
                break
    names.sort(key=name_key, reverse=True)
    return names


def open_file(dir_fd: int, name: str) -> int | None:
    """A read descriptor of a regular file dir_fd/name, or None for anything else (a FIFO,
    socket, device or link is never opened in a way that could block or follow it)."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


# -- sparse files -----------------------------------------------------------------------------


def copy_file(src_fd: int, dst_fd: int, budget: int) -> tuple[int, bool]:
    """Copy a regular file's data sparsely; (data bytes copied, complete).

    At most `budget` data bytes are copied; when the file has more, the copy ends at the
    last byte copied and complete is False. dst_fd must be an empty regular file.
    """
    size = os.fstat(src_fd).st_size
    copied = 0
    for start, stop in data_ranges(src_fd, 0, size):
        pos = start
        while pos < stop:
            if copied >= budget:
                os.ftruncate(dst_fd, pos)
                return copied, False
            want = min(_CHUNK, stop - pos, budget - copied)
            n = _copy_range(src_fd, dst_fd, pos, want)
            if not n:  # the file shrank meanwhile
                os.ftruncate(dst_fd, pos)
                return copied, True
            pos += n
            copied += n
    os.ftruncate(dst_fd, size)
    return copied, True


def _copy_range(src_fd: int, dst_fd: int, pos: int, count: int) -> int:
    try:
        return os.copy_file_range(src_fd, dst_fd, count, pos, pos)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                             errno.EPERM):
            raise
    data = os.pread(src_fd, count, pos)
    view = memoryview(data)
    at = pos
    while view:
        n = os.pwrite(dst_fd, view, at)
        view, at = view[n:], at + n
    return len(data)
