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

Files of any size move in chunks (`Upload`, `download`), with offsets to resume and a sha256
of the whole file at the end, and whole trees as tar streams (`put_archive`, `archive`;
sandbox/archive.py keeps the extraction rules). Memory is constant per stream: nothing is
held but the chunk in hand. A stream lives as long as its client, so it never keeps a write
descriptor, nor WRITE_CLONE, between chunks: it holds the file by an O_PATH descriptor
(which a concurrently cloned child may copy without making the file busy) and reopens it
for writing, under WRITE_CLONE, only while one chunk is written. Holes stay holes: a
download sends only data ranges (SEEK_DATA/SEEK_HOLE), an upload writes no all-zero chunk.
`stat`, `mkdir`, `remove` (fstree: iterative, never through a link) and `rename`
(renameat2, RENAME_NOREPLACE on request) resolve their parents the same way as every other
call. Watching a tree is sandbox/workspace_watch.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import hashlib
import os
import posixpath
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import (
    CorralError,
    InvalidSpec,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

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
#: Bytes of one chunk a download sends: 64 KiB under 4 MiB, so that the message fits the
#: 4 MiB a gRPC client receives by default.
CHUNK_BYTES = (4 << 20) - (64 << 10)
#: Bytes one upload chunk may carry at most.
MAX_CHUNK_BYTES = 4 << 20
_SYS_renameat2 = 316
RENAME_NOREPLACE = 1
_ZEROS = bytes(MAX_CHUNK_BYTES)

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


class DigestMismatch(CorralError):
    """What arrived is not what the client said it sent (sha256 differs)."""

    grpc_status = "DATA_LOSS"


class AlreadyExists(CorralError):
    grpc_status = "ALREADY_EXISTS"


@dataclass(frozen=True)
class FileStat:
    """What one file is: the answer of stat, and each entry of a directory's list."""

    path: str  # relative to /workspace
    kind: str  # file | dir | symlink | other
    size: int
    mode: int
    mtime: float
    link_target: str = ""
    allocated_bytes: int = 0

    @classmethod
    def of(cls, path: str, st: os.stat_result, link_target: str = "") -> FileStat:
        return cls(path, _kind(st.st_mode), st.st_size, stat.S_IMODE(st.st_mode),
                   st.st_mtime, link_target, st.st_blocks * 512)

    @property
    def name(self) -> str:
        """The last component of path (a directory listing's entry name)."""
        return posixpath.basename(self.path)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _hash_zeros(digest, count: int) -> None:
    while count > 0:
        n = min(count, CHUNK_BYTES)
        digest.update(_ZEROS[:n])
        count -= n


def _hash_prefix(digest, fd: int, end: int) -> None:
    """Feed bytes [0, end) of a file into digest, holes as zeros, a chunk at a time."""
    from . import fstree

    pos = 0
    for start, stop in fstree.data_ranges(fd, 0, end):
        _hash_zeros(digest, start - pos)
        pos = start
        while pos < stop:
            data = os.pread(fd, min(CHUNK_BYTES, stop - pos), pos)
            if not data:
                break
            digest.update(data)
            pos += len(data)
        pos = stop
    _hash_zeros(digest, end - pos)


def _is_zero(data) -> bool:
    return len(data) <= MAX_CHUNK_BYTES and data == _ZEROS[:len(data)]


class Upload:
    """One file written in chunks from a client; see the module docstring.

    Made by Workspace.upload. Chunks come in order (an offset past the end leaves a hole);
    finish() sets the size and returns it with the sha256 of the whole file.
    """

    def __init__(self, ws: Workspace, path: str, offset: int, mode: int):
        self.path = path
        if relative(path) == ".":
            raise InvalidSpec("path", "names the workspace itself, not a file")
        ws._check_kind(path, must_exist=offset > 0)
        with WRITE_CLONE.hold(WRITING):
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (0 if offset else os.O_CREAT)
            fd = ws._open(path, flags, 0 if offset else mode & 0o777)  # openat2: no mode
            # without O_CREAT
            try:
                _regular_reaching(fd, path, offset, "; resume at most there")
                os.ftruncate(fd, offset)
                os.fchown(fd, ws.owner_uid, ws.owner_gid)
                os.fchmod(fd, mode & 0o777)
                self._file = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            finally:
                os.close(fd)
        self.start = self.pos = offset
        self.received = 0
        self.max_size = ws.max_size
        # write/finish may run on a worker thread while close() comes from another (a
        # cancelled stream): close waits, so no descriptor number is reused under a write
        self._lock = threading.Lock()
        self._digest = hashlib.sha256()
        if offset:
            rfd = self._reopen(os.O_RDONLY)
            try:
                _hash_prefix(self._digest, rfd, offset)
            finally:
                os.close(rfd)

    def _reopen(self, flags: int) -> int:
        try:
            return os.open(f"/proc/self/fd/{self._file}", flags | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _translate(exc, self.path) from None

    def write(self, data: bytes, offset: int = 0) -> None:
        """Write one chunk at offset (0: right after the previous one)."""
        with self._lock:
            self._write(data, offset)

    def _write(self, data: bytes, offset: int) -> None:
        if self._file < 0:
            raise Unavailable(f"the upload of {self.path!r} is closed")
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidSpec("chunk.data", f"{len(data)} bytes is over the {MAX_CHUNK_BYTES} "
                                            f"byte limit of one chunk")
        at = offset or self.pos
        if at + len(data) > self.max_size:
            raise InvalidSpec("chunk.offset", f"the file would reach {at + len(data)} bytes, "
                                              f"over the workspace's cap of {self.max_size}")
        if at < self.pos:
            raise InvalidSpec("chunk.offset", f"{at} goes back before {self.pos}, where the "
                                              f"upload is; chunks come in order")
        _hash_zeros(self._digest, at - self.pos)
        self._digest.update(data)
        self.received += len(data)
        if data and not _is_zero(data):
            with WRITE_CLONE.hold(WRITING):
                fd = self._reopen(os.O_WRONLY)
                try:
                    view, pos = memoryview(data), at
                    while view:
                        n = os.pwrite(fd, view, pos)
                        view, pos = view[n:], pos + n
                finally:
                    os.close(fd)
        self.pos = at + len(data)

    def finish(self, size: int = 0) -> tuple[int, str]:
        """Extend the file to size (0: where the last chunk ended); (size, sha256 hex)."""
        with self._lock:
            return self._finish(size)

    def _finish(self, size: int) -> tuple[int, str]:
        if self._file < 0:
            raise Unavailable(f"the upload of {self.path!r} is closed")
        if size and size < self.pos:
            raise InvalidSpec("end.size", f"{size} is less than the {self.pos} bytes written")
        if size > self.max_size:
            raise InvalidSpec("end.size", f"{size} is over the workspace's cap of "
                                          f"{self.max_size} bytes")
        end = max(size, self.pos)
        _hash_zeros(self._digest, end - self.pos)
        with WRITE_CLONE.hold(WRITING):
            fd = self._reopen(os.O_WRONLY)
            try:
                os.ftruncate(fd, end)
            finally:
                os.close(fd)
        self.pos = end
        return end, self._digest.hexdigest()

    def close(self) -> None:
        with self._lock:
            if self._file >= 0:
                os.close(self._file)
                self._file = -1


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

    def __init__(self, root: str, owner_uid: int | None = None, owner_gid: int | None = None):
        """owner: the sandbox's root outside; None = whoever owns the workspace directory
        (the sandbox's root: it was given the directory when the sandbox started)."""
        self.root = root
        if owner_uid is None or owner_gid is None:
            st = os.stat(root)
            owner_uid = st.st_uid if owner_uid is None else owner_uid
            owner_gid = st.st_gid if owner_gid is None else owner_gid
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid

    @property
    def max_size(self) -> int:
        """The largest file (logical size, holes included) the streaming calls handle: the
        workspace's byte cap. Hashing a hole costs as much as hashing data, so a sparse
        file beyond it could keep a worker busy for hours."""
        from . import workspace_fs

        cap = workspace_fs.max_bytes()
        with contextlib.suppress(OSError):
            vfs = os.statvfs(self.root)
            cap = min(cap, vfs.f_blocks * vfs.f_frsize) if vfs.f_blocks else cap
        return cap

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

    def list(self, path: str = ".") -> list[FileStat]:
        """Entries of a directory (not recursive), sorted by name; a link is described, not
        followed.

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
            rel = relative(path)
            entries = []
            for name in sorted(names):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:  # removed while listed
                    continue
                target = ""
                if stat.S_ISLNK(st.st_mode):
                    with contextlib.suppress(OSError):
                        target = os.readlink(name, dir_fd=fd)
                entries.append(FileStat.of(name if rel == "." else f"{rel}/{name}", st,
                                           target))
            return entries
        finally:
            os.close(fd)


    # -- streams and tree operations ------------------------------------------------------

    def _open_dir(self, path: str) -> int:
        """A read descriptor of a directory beneath the workspace (never blocks)."""
        return self._open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)

    def _parent(self, path: str, field: str = "path") -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of a path that is not the
        workspace itself."""
        rel = relative(path)
        if rel == ".":
            raise InvalidSpec(field, "names the workspace itself")
        parent, _, name = rel.rpartition("/")
        return self._open_dir(parent or "."), name

    def stat(self, path: str) -> FileStat:
        """What path is (a link is described, not followed).

        Raises:
            NotFound: nothing is there.
        """
        fd = self._open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            target = ""
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    target = os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)
        return FileStat.of(relative(path), st, target)

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = True) -> int:
        """Make a directory (and its missing parents with parents=True); returns how many
        were made. An existing directory is fine with parents=True.

        Raises:
            InvalidSpec: a component exists and is not a directory; a parent is missing
                (parents=False).
            AlreadyExists: the directory exists (parents=False).
        """
        rel = relative(path)
        parts = [] if rel == "." else rel.split("/")
        made = 0
        for i in range(len(parts)):
            sub = "/".join(parts[:i + 1])
            last = i == len(parts) - 1
            try:
                os.close(self._open(sub, os.O_PATH | os.O_DIRECTORY))
                if last and not parents:
                    raise AlreadyExists(f"path: {path!r} exists")
                continue
            except NotFound:
                if not parents and not last:
                    raise NotFound(f"path: the parent {sub!r} of {path!r} does not exist; "
                                   f"set parents to make it") from None
            except InvalidSpec:
                raise InvalidSpec("path", f"{sub!r} exists and is not a directory") from None
            pfd = self._open_dir("/".join(parts[:i]) or ".")
            try:
                try:
                    os.mkdir(parts[i], 0o700, dir_fd=pfd)
                except FileExistsError:
                    if not parents:
                        raise AlreadyExists(f"path: {path!r} exists") from None
                    continue  # made meanwhile: checked on the next level's open
                made += 1
                dfd = _openat2(pfd, parts[i], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchown(dfd, self.owner_uid, self.owner_gid)
                    os.fchmod(dfd, mode & 0o1777 if mode else 0o755)
                finally:
                    os.close(dfd)
            finally:
                os.close(pfd)
        return made

    def remove(self, path: str, recursive: bool = False) -> str:
        """Remove a file, link or directory (a non-empty one with recursive); returns the
        kind removed. Links are removed, never followed.

        Raises:
            NotFound: nothing is there.
            InvalidSpec: a non-empty directory without recursive, or the workspace itself.
        """
        from . import fstree

        pfd, name = self._parent(path)
        try:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise NotFound(f"{path!r} does not exist in the workspace") from None
            kind = _kind(st.st_mode)
            try:
                if kind != "dir":
                    os.unlink(name, dir_fd=pfd)
                elif recursive:
                    fstree.remove_at(pfd, name)
                else:
                    os.rmdir(name, dir_fd=pfd)
            except OSError as exc:
                if exc.errno == errno_mod.ENOTEMPTY:
                    raise InvalidSpec("recursive", f"{path!r} is a directory that is not "
                                                   f"empty; set recursive to remove it") from None
                if exc.errno == errno_mod.ENOENT:
                    raise NotFound(f"{path!r} does not exist in the workspace") from None
                raise _translate(exc, path) from None
            return kind
        finally:
            os.close(pfd)

    def rename(self, src: str, dst: str, no_replace: bool = False) -> None:
        """Move src to dst within the workspace (renameat2; RENAME_NOREPLACE on request).

        Raises:
            NotFound: src does not exist, or dst's parent does not.
            AlreadyExists: dst exists and no_replace is set.
            InvalidSpec: a directory into itself, a directory over a file or the reverse.
        """
        sfd, sname = self._parent(src, "from_path")
        try:
            dfd, dname = self._parent(dst, "to_path")
        except BaseException:
            os.close(sfd)
            raise
        try:
            flags = RENAME_NOREPLACE if no_replace else 0
            rc = _libc.syscall(_SYS_renameat2, sfd, os.fsencode(sname), dfd,
                               os.fsencode(dname), flags)
            if rc < 0:
                err = ctypes.get_errno()
                if err == errno_mod.EEXIST and no_replace:
                    raise AlreadyExists(f"to_path: {dst!r} exists (no_replace)")
                if err == errno_mod.ENOENT:
                    raise NotFound(f"from_path: {src!r} does not exist in the workspace")
                if err in (errno_mod.EINVAL, errno_mod.EISDIR, errno_mod.ENOTDIR,
                           errno_mod.ENOTEMPTY, errno_mod.EEXIST):
                    raise InvalidSpec("to_path", f"cannot move {src!r} to {dst!r}: "
                                                 f"{os.strerror(err)}")
                raise _translate(OSError(err, os.strerror(err), src), src)
        finally:
            os.close(sfd)
            os.close(dfd)

    def upload(self, path: str, offset: int = 0, mode: int = 0o644) -> Upload:
        """Start writing path in chunks; offset 0 makes or truncates it, offset N resumes an
        existing file (it is cut to N first; N at most its size)."""
        return Upload(self, path, offset, mode or 0o644)

    def download(self, path: str, offset: int = 0, length: int = 0) -> Iterator[tuple]:
        """Yield ("stat", FileStat), then ("chunk", offset, bytes) for each piece of data
        (holes are skipped: zeros between chunks), then ("end", size, sha256 hex). The
        digest covers bytes 0 to size, also when offset > 0. length 0 = to the end.

        Raises:
            InvalidSpec: not a regular file; offset past the end.
        """
        from . import fstree

        self._check_kind(path, must_exist=True)
        fd = self._open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = _regular_reaching(fd, path, offset)
            end = min(st.st_size, offset + length) if length else st.st_size
            if end > self.max_size:  # only a sparse file can be: its holes would be hashed
                raise InvalidSpec("path", f"{path!r} is {st.st_size} bytes (sparse), over the "
                                          f"workspace's cap of {self.max_size}; download a "
                                          f"range that ends below it (length)")
            yield ("stat", FileStat.of(relative(path), st))
            digest = hashlib.sha256()
            _hash_prefix(digest, fd, offset)
            pos = offset
            for start, stop in fstree.data_ranges(fd, offset, end):
                _hash_zeros(digest, start - pos)
                pos = start
                while pos < stop:
                    data = os.pread(fd, min(CHUNK_BYTES, stop - pos), pos)
                    if not data:  # the file shrank meanwhile: it ends here
                        end = pos
                        break
                    digest.update(data)
                    yield ("chunk", pos, data)
                    pos += len(data)
                if pos < stop:
                    break
            _hash_zeros(digest, end - pos)
            yield ("end", end, digest.hexdigest())
        finally:
            os.close(fd)

    def put_archive(self, path: str, *, max_bytes: int, max_entries: int):
        """A TarExtractor (sandbox/archive.py) writing beneath the directory path; the
        caller feeds it, then calls finish() (or close() on failure)."""
        from .archive import TarExtractor

        fd = self._open_dir(path)
        return TarExtractor(fd, owner=(self.owner_uid, self.owner_gid), max_bytes=max_bytes,
                            max_entries=max_entries, owns_target=True)

    def archive(self, path: str) -> tuple[FileStat, Iterator[bytes]]:
        """(what path is, a tar stream of it): a directory with everything below it, or one
        file, named by its last component ("workspace" for the workspace itself)."""
        from .archive import tar_stream

        info = self.stat(path)
        if info.kind == "dir":
            fd = self._open_dir(path)
        elif info.kind == "file":
            self._check_kind(path, must_exist=True)
            fd = self._open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                _require_regular(os.fstat(fd).st_mode, path)
            except BaseException:
                os.close(fd)
                raise
        else:
            raise InvalidSpec("path", f"{path!r} is a {info.kind}; archive a file or a "
                                      f"directory")
        rel = relative(path)
        name = "workspace" if rel == "." else rel.rpartition("/")[2]

        def chunks() -> Iterator[bytes]:
            try:
                yield from tar_stream(fd, name)
            finally:
                os.close(fd)

        return info, chunks()


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _require_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise InvalidSpec("path", f"{path!r} is {what}, not a regular file")


def _regular_reaching(fd: int, path: str, offset: int, hint: str = "") -> os.stat_result:
    """fd's stat, once it is a regular file at least `offset` bytes long.

    Raises:
        InvalidSpec: not a regular file (path), or offset past its end.
    """
    st = os.fstat(fd)
    _require_regular(st.st_mode, path)
    if offset > st.st_size:
        raise InvalidSpec("offset", f"{offset} is past the end of {path!r} "
                                    f"({st.st_size} bytes){hint}")
    return st


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
    if exc.errno == errno_mod.ESTALE:  # fstree.TreeChanged
        return Unavailable(f"{path!r}: the sandbox moved directories while it was walked; "
                           f"try again")
    if exc.errno == errno_mod.EWOULDBLOCK:
        return Unavailable(f"{path!r} is held by a lease of a process in the sandbox; "
                           f"try again later")
    if exc.errno == errno_mod.ENXIO:
        return InvalidSpec("path", f"{path!r} is a FIFO or socket, not a regular file")
    if exc.errno == errno_mod.ENAMETOOLONG:
        return InvalidSpec("path", f"{path[:64]!r}... is longer than the kernel allows")
    if exc.errno == errno_mod.ETXTBSY:
        return Unavailable(f"{path!r} is a program running in the sandbox; "
                           f"it cannot be written now")
    return exc


def _shown(path: str, limit: int = 120) -> str:
    """repr() of a request path, cut so an error never echoes a huge one."""
    return repr(path if len(path) <= limit else path[:limit] + "...")
