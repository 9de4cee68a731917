"""Unpacks one layer tar beneath a directory descriptor, never writing outside it.

The rules it keeps (docs/images.md, "Safety"):

* every parent directory is opened by the kernel with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS) from the layer's root descriptor, and every entry is made with the
  *at() calls relative to that parent, never through a path string; so an entry under a
  symlink (a link through a link) is refused, not followed, whatever the lexical checks say;
* a name that is absolute or has a '..' component is refused before anything is resolved;
* symlinks are written as they are (their target is data for the sandbox, resolved inside
  its root later), never followed here;
* a hard link must name an entry this same tar made earlier, by a relative name;
* device nodes are refused; whiteouts are written as overlayfs reads them: `.wh.NAME`
  becomes a character device 0:0 named NAME, `.wh..wh..opq` the `trusted.overlay.opaque=y`
  xattr on its directory (`user.overlay.opaque` when not root, for a userxattr mount); a
  layer's own `trusted.overlay.*` and `user.overlay.*` xattrs are refused, they would steer
  overlayfs;
* modes (setuid/setgid included, as data: the sandbox mounts it nosuid), numeric owners,
  xattrs (pax `SCHILY.xattr.*`) and mtimes are kept; runs of zeros are not written, so a
  sparse file stays sparse.

Any refusal raises UnsafeLayer naming the entry; the caller removes the whole directory.
A descriptor open for writing lives under `WRITE_CLONE.hold(WRITING)` (see workspace.py).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import stat
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ..archive import ExtractReport
from ..workspace import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
    WRITE_CLONE,
    WRITING,
)
from .errors import UnsafeLayer

_SYS_openat2 = 437
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
BLOCK = 64 << 10
_ZEROS = bytes(BLOCK)
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_XATTR_PREFIX = "SCHILY.xattr."
#: overlayfs's own xattrs (opaque, redirect, metacopy, origin...): a layer that carried them
#: would steer the overlay mount, so they are refused (trusted.* for root, user.* with
#: userxattr)
_OVERLAY_XATTRS = (_XATTR_PREFIX + "trusted.overlay.", _XATTR_PREFIX + "user.overlay.")


@dataclass
class UnpackReport(ExtractReport):
    """What unpacking a layer wrote: an extraction's counts by kind (a layer skips nothing:
    each entry is written or the layer refused), the entries read, and the overlay's marks."""

    entries: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, 0, _RESOLVE)
    fd = _libc.syscall(_SYS_openat2, dirfd, os.fsencode(path), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _parts(name: str, layer: str, entry: str) -> tuple[str, ...]:
    if name.startswith("/"):
        raise UnsafeLayer(layer, entry, "absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(layer, entry, "'..' component")
    return parts


class LayerUnpacker:
    """Writes the entries of one layer tar beneath `root_fd`; `run(stream)` does it all."""

    def __init__(self, root_fd: int, layer: str, *,
                 on_entry: Callable[[int], None] | None = None):
        self.root_fd = root_fd
        self.layer = layer
        self.on_entry = on_entry
        self.report = UnpackReport()
        self._privileged = os.geteuid() == 0
        self._opaque_key = "trusted.overlay.opaque" if self._privileged else "user.overlay.opaque"
        self._made: set[tuple[str, ...]] = set()   # non-directories this tar made
        # a directory's mode and mtime are set last (its entries would change the mtime, a
        # read-only mode would stop an unprivileged unpack writing into it); the last wins
        self._dir_meta: dict[tuple[str, ...], tuple[int, int]] = {}
        self._cache: tuple[tuple[str, ...], int] | None = None

    def run(self, stream: BinaryIO) -> UnpackReport:
        try:
            with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tf:
                for member in tf:
                    self._entry(tf, member)
                    self.report.entries += 1
                    if self.on_entry is not None:
                        self.on_entry(self.report.entries)
            self._finish_dirs()
        except tarfile.TarError as exc:
            raise UnsafeLayer(self.layer, "<tar>", f"not a valid tar stream ({exc})") from None
        finally:
            self._drop_cache()
        return self.report

    # -- one entry --------------------------------------------------------------------------

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        entry = m.name
        parts = _parts(m.name, self.layer, entry)
        if not parts:  # the layer root itself ('./')
            if m.isdir():
                self._own(self.root_fd, m, entry, is_dir=True)
                self._dir_meta[()] = (m.mode & 0o7777, int(m.mtime))
            return
        for key in m.pax_headers:
            if key.startswith(_OVERLAY_XATTRS):
                raise UnsafeLayer(self.layer, entry, f"it carries the overlayfs xattr "
                                                     f"{key[len(_XATTR_PREFIX):]}")
        name = parts[-1]
        pfd = self._parent(parts[:-1], entry)
        if name == OPAQUE:
            self._call(entry, os.setxattr, pfd, self._opaque_key, b"y")
            self.report.opaque_dirs += 1
            return
        if name.startswith(WHITEOUT):
            target = name[len(WHITEOUT):]
            if target.startswith(WHITEOUT):  # aufs bookkeeping (.wh..wh.plnk ...): no meaning
                return
            if target in ("", ".", ".."):
                raise UnsafeLayer(self.layer, entry, "whiteout of no name")
            self._clear(pfd, target, parts[:-1] + (target,), entry)
            self._call(entry, os.mknod, target, stat.S_IFCHR | 0o000, os.makedev(0, 0),
                       dir_fd=pfd)
            self.report.whiteouts += 1
            return
        if m.isdir():
            self._dir(pfd, name, parts, m, entry)
            self.report.dirs += 1
        elif m.isreg():
            self._clear(pfd, name, parts, entry)
            self._file(tf, pfd, name, m, entry)
            self._made.add(parts)
            self.report.files += 1
        elif m.issym():
            self._clear(pfd, name, parts, entry)
            self._call(entry, os.symlink, m.linkname, name, dir_fd=pfd)
            self._meta_nofollow(pfd, name, m, entry)
            self._made.add(parts)
            self.report.symlinks += 1
        elif m.islnk():
            self._hardlink(pfd, name, parts, m, entry)
            self.report.hardlinks += 1
        elif m.isfifo():
            self._clear(pfd, name, parts, entry)
            self._call(entry, os.mknod, name, stat.S_IFIFO | 0o600, dir_fd=pfd)
            self._meta_nofollow(pfd, name, m, entry)
            self._made.add(parts)
        elif m.ischr() or m.isblk():
            raise UnsafeLayer(self.layer, entry, f"device node {m.devmajor}:{m.devminor} "
                                                 f"(only whiteouts may be devices)")
        else:
            raise UnsafeLayer(self.layer, entry, f"unknown tar entry type {m.type!r}")

    def _dir(self, pfd: int, name: str, parts, m: tarfile.TarInfo, entry: str) -> None:
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._clear(pfd, name, parts, entry)
            st = None
        if st is None:
            self._call(entry, os.mkdir, name, 0o700, dir_fd=pfd)
        fd = self._call(entry, os.open, name, _DIR_FLAGS | os.O_CLOEXEC, dir_fd=pfd)
        try:
            self._own(fd, m, entry, is_dir=True)
        finally:
            os.close(fd)
        self._dir_meta[parts] = (m.mode & 0o7777, int(m.mtime))

    def _file(self, tf, pfd: int, name: str, m: tarfile.TarInfo, entry: str) -> None:
        src = tf.extractfile(m)
        with WRITE_CLONE.hold(WRITING):
            fd = self._call(entry, os.open, name,
                            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                            0o600, dir_fd=pfd)
            try:
                pos = 0
                while True:
                    piece = src.read(BLOCK)
                    if not piece:
                        break
                    if piece != (_ZEROS if len(piece) == BLOCK else bytes(len(piece))):
                        view = memoryview(piece)
                        at = pos
                        while view:
                            n = os.pwrite(fd, view, at)
                            view, at = view[n:], at + n
                    pos += len(piece)
                os.ftruncate(fd, pos)
                self.report.bytes += pos
                self._own(fd, m, entry, is_dir=False)
                os.utime(fd, ns=(int(m.mtime * 1e9),) * 2)
            finally:
                os.close(fd)

    def _hardlink(self, pfd: int, name: str, parts, m: tarfile.TarInfo, entry: str) -> None:
        tparts = _parts(m.linkname, self.layer, entry)
        if tparts not in self._made:
            raise UnsafeLayer(self.layer, entry,
                              f"hard link to {m.linkname!r}, which is not a file this layer "
                              f"made before it")
        self._clear(pfd, name, parts, entry)
        tpfd = self._open_dir(tparts[:-1], entry, create=False)
        try:
            self._call(entry, os.link, tparts[-1], name, src_dir_fd=tpfd, dst_dir_fd=pfd,
                       follow_symlinks=False)
        finally:
            os.close(tpfd)
        self._made.add(parts)

    # -- metadata ----------------------------------------------------------------------------

    def _own(self, fd: int, m: tarfile.TarInfo, entry: str, *, is_dir: bool) -> None:
        # chown first: it clears setuid/setgid and security.capability, set after it
        if self._privileged:
            self._call(entry, os.fchown, fd, m.uid, m.gid)
        if not is_dir:
            self._call(entry, os.fchmod, fd, m.mode & 0o7777)
        for key, value in m.pax_headers.items():
            if key.startswith(_XATTR_PREFIX):
                xname = key[len(_XATTR_PREFIX):]
                try:
                    os.setxattr(fd, xname, value.encode("utf-8", "surrogateescape"))
                except OSError as exc:
                    if exc.errno not in (errno_mod.EPERM, errno_mod.ENOTSUP):
                        raise UnsafeLayer(self.layer, entry,
                                          f"xattr {xname}: {os.strerror(exc.errno)}") from None

    def _meta_nofollow(self, pfd: int, name: str, m: tarfile.TarInfo, entry: str) -> None:
        if self._privileged:
            self._call(entry, os.chown, name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if not m.issym():
            self._call(entry, os.chmod, name, m.mode & 0o7777, dir_fd=pfd,
                       follow_symlinks=False)
        os.utime(name, ns=(int(m.mtime * 1e9),) * 2, dir_fd=pfd, follow_symlinks=False)

    def _finish_dirs(self) -> None:
        for parts, (mode, mtime) in self._dir_meta.items():
            try:
                fd = _openat2(self.root_fd, "/".join(parts) or ".", _DIR_FLAGS)
            except OSError:
                continue  # a later entry replaced it (never followed: RESOLVE_NO_SYMLINKS)
            try:
                self._call("/".join(parts) or ".", os.fchmod, fd, mode)
                os.utime(fd, ns=(mtime * 1_000_000_000,) * 2)
            finally:
                os.close(fd)

    # -- resolution --------------------------------------------------------------------------

    def _parent(self, parts: tuple[str, ...], entry: str) -> int:
        """The directory of an entry, opened beneath the root; cached for the next entry."""
        if self._cache is not None and self._cache[0] == parts:
            return self._cache[1]
        self._drop_cache()
        fd = self._open_dir(parts, entry, create=True)
        self._cache = (parts, fd)
        return fd

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def _open_dir(self, parts: tuple[str, ...], entry: str, *, create: bool) -> int:
        if not parts:
            return os.dup(self.root_fd)
        try:
            return _openat2(self.root_fd, "/".join(parts), _DIR_FLAGS)
        except OSError as exc:
            if exc.errno != errno_mod.ENOENT or not create:
                raise self._refusal(exc, parts, entry) from None
        # a parent the tar did not list: made one component at a time, as tar does
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = _openat2(fd, part, _DIR_FLAGS)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = _openat2(fd, part, _DIR_FLAGS)
                except OSError as exc:
                    raise self._refusal(exc, parts[:i + 1], entry) from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _refusal(self, exc: OSError, parts: tuple[str, ...], entry: str) -> Exception:
        if exc.errno in (errno_mod.ENOTDIR, errno_mod.ELOOP):
            # name the first component that is not a directory; the ones before it are
            # real directories (checked in turn), so this lstat walk stays beneath the root
            for i in range(len(parts)):
                try:
                    st = os.lstat("/".join(parts[:i + 1]), dir_fd=self.root_fd)
                except OSError:
                    break
                if not stat.S_ISDIR(st.st_mode):
                    parts = parts[:i + 1]
                    if stat.S_ISLNK(st.st_mode):
                        exc = OSError(errno_mod.ELOOP, "")
                    break
        where = "/".join(parts)
        if exc.errno in (errno_mod.ELOOP, errno_mod.EXDEV):
            return UnsafeLayer(self.layer, entry, f"it lies under the symlink on {where!r}")
        if exc.errno == errno_mod.ENOTDIR:
            return UnsafeLayer(self.layer, entry, f"{where!r} is not a directory")
        return UnsafeLayer(self.layer, entry, f"{where!r}: {os.strerror(exc.errno)}")

    def _clear(self, pfd: int, name: str, parts: tuple[str, ...], entry: str) -> None:
        """Removes what a later entry of the same name replaces (the last one wins)."""
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            from .. import fstree

            if self._cache is not None and self._cache[0][:len(parts)] == parts:
                self._drop_cache()
            fstree.remove_at(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)
        self._made.discard(parts)

    def _call(self, entry: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT, errno_mod.ENOMEM):
                raise
            raise UnsafeLayer(self.layer, entry, f"{fn.__name__}: {os.strerror(exc.errno)}") \
                from None


def unpack_layer(stream: BinaryIO, root_fd: int, layer: str, *,
                 on_entry: Callable[[int], None] | None = None) -> UnpackReport:
    """Unpacks the uncompressed tar `stream` beneath `root_fd` (see the module's rules).

    Raises:
        UnsafeLayer: an entry is refused; what was written is left for the caller to remove.
    """
    return LayerUnpacker(root_fd, layer, on_entry=on_entry).run(stream)
