"""Copying a sandbox's writable tree into a snapshot layer, and the layer's content digest.

The source is a tree a sandbox wrote (an overlay's upper layer, or a whole workspace), so it
is walked with fstree (no recursion, no link ever followed, files opened O_NONBLOCK and
type-checked). What a layer keeps:

* directories, regular files (sparsely: holes stay holes), symbolic links as they are;
* overlay whiteouts (a character device 0:0) and opaque directories (the xattr
  `trusted.overlay.opaque=y`), so the layer hides what the sandbox deleted when it becomes
  a lower layer;
* modes without setuid/setgid (a layer is data; nothing in it may grant an id), owners
  made relative to the sandbox (host id uid_base+N is stored as N, as image layers are, so
  a fork with another id range sees the same owners), file and link mtimes.

Left out: FIFOs, sockets, device nodes other than whiteouts, and overlayfs's own
bookkeeping xattrs (origin, impure), which only mean something in the upper layer they were
written in.

The digest is sha256 over a canonical record of every entry in walk order (path, kind,
mode, owner, mtime and content hash for files, target for links), so the same state gives
the same digest whatever the sandbox or its id range.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import os
import stat
from dataclasses import dataclass

from .. import fstree
from ..errors import ResourceExhausted

#: The xattr that makes an upper directory opaque (nothing below it shows through).
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Owner ids that are not the sandbox's are stored as nobody.
NOBODY = 65534
#: Deepest directory a layer may hold (each level holds one descriptor while copied).
MAX_DEPTH = 512
_CHUNK = 1 << 20


@dataclass(frozen=True)
class IdShift:
    """How host ids become ids inside: base..base+count-1 -> 0..count-1; `extra` maps
    single host ids (a host directory's owner, which an idmapped bind shows as root)."""

    base: int
    count: int
    extra: tuple[tuple[int, int], ...] = ()

    def inside(self, host_id: int) -> int:
        if self.base <= host_id < self.base + self.count:
            return host_id - self.base
        for outside, inner in self.extra:
            if host_id == outside:
                return inner
        return NOBODY


@dataclass
class LayerCopy:
    """What one copy produced: its digest, bytes of file data and number of entries."""

    digest: str
    data_bytes: int
    files: int


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a character device 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def copy_layer(src_fd: int, dst_fd: int, ids: IdShift, *, budget: int | None = None,
               skip: frozenset[str] = frozenset()) -> LayerCopy:
    """Copy the tree below src_fd into the empty directory dst_fd; returns its digest.

    Args:
        ids: how the source's host ids are stored (relative to the sandbox).
        budget: most bytes of file data to copy (a tenant's quota left), None for no cap.
        skip: paths (relative) of entries other than directories to leave out.

    Raises:
        ResourceExhausted: the tree holds more than budget bytes, or is deeper than
            MAX_DEPTH.
        OSError: reading or writing failed (the caller removes the half copy).
    """
    digest = hashlib.sha256()
    data_bytes = files = 0
    stack = [os.dup(dst_fd)]  # stack[d]: the copy's directory holding depth-d entries
    try:
        for entry in fstree.walk(src_fd):
            while len(stack) > entry.depth + 1:
                os.close(stack.pop())
            parent = stack[-1]
            st = entry.st
            if skip and not stat.S_ISDIR(st.st_mode) and entry.path in skip:
                continue
            record = _record(entry, st, ids)
            if stat.S_ISDIR(st.st_mode):
                if entry.depth + 1 >= MAX_DEPTH:
                    raise ResourceExhausted(f"snapshot: {entry.path!r} is deeper than "
                                            f"{MAX_DEPTH} directory levels")
                stack.append(_copy_dir(entry, parent, st, ids))
            elif stat.S_ISREG(st.st_mode):
                left = None if budget is None else budget - data_bytes
                copied, content = _copy_file(entry, parent, st, ids, left)
                if copied is None:
                    continue  # replaced by something else meanwhile: not part of the state
                data_bytes += copied
                record += b" " + content
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.name, dir_fd=entry.dir_fd)
                os.symlink(target, entry.name, dir_fd=parent)
                _own(parent, entry.name, st, ids)
                record += b" " + os.fsencode(target)
            elif is_whiteout(st):
                os.mknod(entry.name, stat.S_IFCHR | 0o000, 0, dir_fd=parent)
            else:
                continue  # FIFOs, sockets, devices: never part of a layer
            files += 1
            digest.update(record + b"\n")
    finally:
        for fd in stack:
            os.close(fd)
    return LayerCopy("sha256:" + digest.hexdigest(), data_bytes, files)


def _record(entry: fstree.Entry, st: os.stat_result, ids: IdShift) -> bytes:
    """The canonical line of one entry (without its content part)."""
    kind = ("d" if stat.S_ISDIR(st.st_mode) else "f" if stat.S_ISREG(st.st_mode)
            else "l" if stat.S_ISLNK(st.st_mode) else "w")
    mtime = st.st_mtime_ns if kind in "fl" else 0
    return (os.fsencode(entry.path) + b"\0" + f"{kind} {stored_mode(st.st_mode):o} "
            f"{ids.inside(st.st_uid)} {ids.inside(st.st_gid)} {mtime}".encode())


def stored_mode(mode: int) -> int:
    """Permission bits a layer keeps: never setuid or setgid."""
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)


def _own(parent: int, name: str, st: os.stat_result, ids: IdShift) -> None:
    os.chown(name, ids.inside(st.st_uid), ids.inside(st.st_gid), dir_fd=parent,
             follow_symlinks=False)
    os.utime(name, ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=parent, follow_symlinks=False)


def _copy_dir(entry: fstree.Entry, parent: int, st: os.stat_result, ids: IdShift) -> int:
    """Make the directory (with its opaque mark) and return a descriptor of it."""
    os.mkdir(entry.name, 0o700, dir_fd=parent)
    fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent)
    try:
        os.fchown(fd, ids.inside(st.st_uid), ids.inside(st.st_gid))
        os.fchmod(fd, stored_mode(st.st_mode))
        if is_opaque(entry.dir_fd, entry.name):
            os.setxattr(fd, OPAQUE_XATTR, b"y")
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_opaque(dir_fd: int, name: str) -> bool:
    """Is dir_fd/name an opaque overlay directory (a directory that is not: False)?"""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError as exc:
        if exc.errno in (errno_mod.ENODATA, errno_mod.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)


def _copy_file(entry: fstree.Entry, parent: int, st: os.stat_result, ids: IdShift,
               budget: int | None) -> tuple[int | None, bytes]:
    """Copy one regular file sparsely, hashing its data ranges; (bytes, content record).
    (None, b"") when the name no longer holds a regular file."""
    src = fstree.open_file(entry.dir_fd, entry.name)
    if src is None:
        return None, b""
    try:
        dst = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            copied, content = _copy_hashed(src, dst, budget, entry.path)
            os.fchown(dst, ids.inside(st.st_uid), ids.inside(st.st_gid))
            os.fchmod(dst, stored_mode(st.st_mode))
            os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return copied, content


def _copy_hashed(src: int, dst: int, budget: int | None, path: str) -> tuple[int, bytes]:
    """Copy src's data ranges to dst and hash them with their offsets; (bytes, record)."""
    size = os.fstat(src).st_size
    h = hashlib.sha256()
    copied = 0
    for start, stop in fstree.data_ranges(src, 0, size):
        pos = start
        h.update(f"@{start}".encode())
        while pos < stop:
            data = os.pread(src, min(_CHUNK, stop - pos), pos)
            if not data:
                break
            copied += len(data)
            if budget is not None and copied > budget:
                raise ResourceExhausted(f"snapshot: the state is larger than the {budget} "
                                        f"bytes the quota leaves (at {path!r})")
            h.update(data)
            view, at = memoryview(data), pos
            while view:
                n = os.pwrite(dst, view, at)
                view, at = view[n:], at + n
            pos += len(data)
    os.ftruncate(dst, size)
    return copied, f"{size} {h.hexdigest()}".encode()
