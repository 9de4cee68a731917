"""Tar streams in and out of a directory, in pieces, in constant memory, never leaving it.

`TarReader` is a sans-IO parser: `feed(bytes)` in any split returns the entries and data
pieces found so far (ustar, GNU long names and links, pax `path`/`linkpath`/`size`/`mtime`);
it buffers at most one 512-byte header and one metadata entry (MAX_META_BYTES).

`TarExtractor` writes a fed tar stream beneath a directory descriptor. The rules it keeps:

* every name is relative: an absolute name or a '..' component is refused (the whole
  stream stops, INVALID_ARGUMENT naming the entry); every path is resolved by the kernel
  with openat2(RESOLVE_BENEATH), so a symlink planted in the tree cannot lead outside it;
* a symlink entry must point inside the target (no absolute target, no '..' above it); a
  hardlink entry must name a regular file of the target;
* no device node, FIFO or socket is created (those entries are skipped and counted), and
  no setuid or setgid bit is kept (modes are masked to 0o1777 for directories, 0o777 for
  the rest);
* total data bytes and entries are capped (the sandbox's workspace caps), checked from each
  header before anything of that entry is written;
* runs of zero bytes are not written (a sparse file stays sparse), the file is extended
  to its size when its data ends;
* a descriptor open for writing exists only inside one `feed` call, under
  `WRITE_CLONE.hold(WRITING)` (see workspace.py): between calls a file being written is
  held by an O_PATH descriptor, which a concurrently cloned child may copy harmlessly.

`tar_stream` is the other direction: a directory (or one file) as tar bytes, in pieces of
about CHUNK_BYTES, walked with fstree (no recursion, links never followed, FIFOs and devices
left out).
"""

from __future__ import annotations

import errno as errno_mod
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from . import fstree
from .errors import InvalidSpec, ResourceExhausted

BLOCK = 512
#: Bytes of one metadata entry (a pax header, a GNU long name) the reader accepts at most.
MAX_META_BYTES = 1 << 20
#: Bytes of one piece `tar_stream` yields (file data larger than this comes in pieces).
CHUNK_BYTES = 1 << 20
#: Names of skipped entries a report keeps (the count is exact).
MAX_SKIPPED_NAMES = 16
_ZERO_BLOCK = bytes(BLOCK)
_ZEROS = bytes(CHUNK_BYTES)
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
               tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_KIND = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
         tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink"}
_HEADER, _DATA, _SKIP, _META, _END = range(5)


@dataclass(frozen=True)
class Member:
    """One entry of a tar stream, as its headers describe it."""

    index: int
    name: str
    kind: str  # file | dir | symlink | hardlink | other
    size: int
    mode: int
    mtime: float
    linkname: str
    type: bytes


class TarReader:
    """Parse a tar stream fed in any pieces; see the module docstring.

    `feed` returns a list of events: ("member", Member), ("data", memoryview) for a piece of
    the current file's content, ("member_end", None), and ("end", None) at the end-of-archive
    blocks (anything after them is ignored).

    Raises (feed, close):
        InvalidSpec: a malformed header, a sparse member, an oversized metadata entry, or
            (close) a stream that stops inside an entry.
    """

    def __init__(self) -> None:
        self._state = _HEADER
        self._buf = bytearray()
        self._remaining = 0  # bytes of data, metadata or padding left in this state
        self._pad = 0  # padding after the current data or metadata
        self._meta_type = b""
        self._meta: dict[str, str] = {}
        self._zeros = 0
        self.index = -1  # of the last member reported
        self.ended = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            state = self._state
            if state == _END:
                break
            if state == _DATA:
                take = min(self._remaining, n - pos)
                if take:
                    events.append(("data", view[pos:pos + take]))
                    pos += take
                    self._remaining -= take
                if not self._remaining:
                    events.append(("member_end", None))
                    self._skip(self._pad)
                continue
            if state == _SKIP:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _HEADER
                continue
            if state == _META:
                take = min(self._remaining, n - pos)
                self._buf += view[pos:pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._take_meta(bytes(self._buf))
                    self._buf.clear()
                    self._skip(self._pad)
                continue
            take = min(BLOCK - len(self._buf), n - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if len(self._buf) == BLOCK:
                block = bytes(self._buf)
                self._buf.clear()
                self._header(block, events)
        return events

    def close(self) -> None:
        """The stream ended: fine at the end blocks or between entries, else InvalidSpec."""
        if self.ended or (self._state == _HEADER and not self._buf and not self._meta
                          and not self._meta_type):
            return
        if self._state == _SKIP and not self._meta and not self._meta_type:
            return  # only padding is missing
        raise InvalidSpec(f"archive.entries[{self.index + 1}]",
                          "the stream ends inside this entry")

    def _skip(self, count: int) -> None:
        self._remaining = count
        self._state = _SKIP if count else _HEADER

    def _header(self, block: bytes, events: list) -> None:
        where = f"archive.entries[{self.index + 1}]"
        if block == _ZERO_BLOCK:
            self._zeros += 1
            if self._zeros == 2:
                self._state = _END
                self.ended = True
                events.append(("end", None))
            return
        if self._zeros:
            raise InvalidSpec(where, "a zero block in the middle of the archive")
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise InvalidSpec(where, f"not a tar header ({exc})") from None
        if info.type in _META_TYPES:
            if info.size > MAX_META_BYTES:
                raise InvalidSpec(where, f"a metadata entry of {info.size} bytes (at most "
                                         f"{MAX_META_BYTES})")
            self._meta_type = info.type
            self._remaining = info.size
            self._pad = -info.size % BLOCK
            self._state = _META if info.size else _HEADER
            if not info.size:
                self._take_meta(b"")
            return
        if info.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse")
                                                      for k in self._meta):
            raise InvalidSpec(where, f"{info.name!r} is a sparse member, which is not "
                                     f"supported; archive it without --sparse")
        meta, self._meta = self._meta, {}
        name = meta.get("path", info.name)
        linkname = meta.get("linkpath", info.linkname)
        size = int(meta["size"]) if "size" in meta else info.size
        mtime = float(meta["mtime"]) if "mtime" in meta else float(info.mtime)
        kind = _KIND.get(info.type, "other")
        if kind == "file" and name.endswith("/"):
            kind = "dir"
        self.index += 1
        member = Member(self.index, name, kind, size if kind == "file" else 0, info.mode,
                        mtime, linkname, info.type)
        events.append(("member", member))
        pad = -size % BLOCK
        if kind == "file" and size:
            self._state, self._remaining, self._pad = _DATA, size, pad
            return
        events.append(("member_end", None))
        self._skip(size + pad)  # a link or special entry with data: not ours to read

    def _take_meta(self, raw: bytes) -> None:
        kind, self._meta_type = self._meta_type, b""
        if kind == tarfile.GNUTYPE_LONGNAME:
            self._meta["path"] = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == tarfile.GNUTYPE_LONGLINK:
            self._meta["linkpath"] = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            self._meta.update(_pax_records(raw, f"archive.entries[{self.index + 1}]"))
        # XGLTYPE (global pax header): nothing in it changes what is extracted


def _pax_records(raw: bytes, where: str) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(raw):
        space = raw.find(b" ", pos)
        try:
            length = int(raw[pos:space])
        except ValueError:
            raise InvalidSpec(where, "a malformed pax header") from None
        record = raw[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise InvalidSpec(where, "a malformed pax header")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    if "size" in out or "mtime" in out:
        try:
            if int(out.get("size", "0")) < 0:
                raise ValueError
            float(out.get("mtime", "0"))
        except ValueError:
            raise InvalidSpec(where, "a malformed pax size or mtime") from None
    return out


# -- extraction ---------------------------------------------------------------------------------


@dataclass
class ExtractReport:
    """What an extraction wrote, by kind; `skipped` entries (devices, FIFOs) were left out
    and the first MAX_SKIPPED_NAMES of them are named."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_names: list[str] = field(default_factory=list)


def _entry_parts(name: str, where: str, what: str = "name") -> tuple[str, ...]:
    """The components of an archive path, refusing anything that could leave the target."""
    if "\0" in name:
        raise InvalidSpec(where, f"{what} contains a NUL byte")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise InvalidSpec(where, f"{what} {name!r} is absolute; archive paths are relative")
    parts = tuple(x for x in p.parts if x != ".")
    if ".." in parts:
        raise InvalidSpec(where, f"{what} {name!r} leaves the target directory ('..')")
    return parts


class TarExtractor:
    """Write a fed tar stream beneath target_fd (a directory descriptor the caller owns).

    Args:
        owner: (uid, gid) every created entry is given, or None to keep the caller's.
        owns_target: close target_fd in close() (else it stays the caller's).
        strip: leading components dropped from every name (and hardlink target); an entry
            with no more than that is skipped (as `tar --strip-components`).
        max_bytes, max_entries: caps on the archive's data bytes and entries.
    """

    def __init__(self, target_fd: int, *, owner: tuple[int, int] | None = None,
                 max_bytes: int, max_entries: int, owns_target: bool = False,
                 strip: int = 0):
        self._strip = strip
        self._target = target_fd
        self._owns_target = owns_target
        self._owner = owner
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._reader = TarReader()
        self.report = ExtractReport()
        self._parent: tuple[tuple[str, ...], int] | None = None  # last parent dir, its fd
        self._file: int | None = None  # O_PATH descriptor of the file being written
        self._wfd: int | None = None  # its write descriptor, inside one feed only
        self._member: Member | None = None
        self._written = 0
        self._total = 0
        self._lock = threading.Lock()
        self._closed = False

    def feed(self, data: bytes) -> None:
        with self._lock:  # close() from another thread waits: no descriptor is reused
            if self._closed:
                raise InvalidSpec("archive", "the extraction is closed")
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        from .workspace import WRITE_CLONE, WRITING

        events = self._reader.feed(data)
        if not events:
            return
        with WRITE_CLONE.hold(WRITING):
            try:
                for kind, value in events:
                    if kind == "data":
                        self._write(value)
                    elif kind == "member":
                        self._begin(value)
                    elif kind == "member_end":
                        self._end_member()
            finally:
                if self._wfd is not None:
                    os.close(self._wfd)
                    self._wfd = None

    def finish(self) -> ExtractReport:
        """The stream ended: check it ended cleanly; close everything."""
        try:
            self._reader.close()
        finally:
            self.close()
        return self.report

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in (self._wfd, self._file, self._parent[1] if self._parent else None):
                if fd is not None:
                    os.close(fd)
            self._wfd = self._file = self._parent = None
            if self._owns_target and self._target >= 0:
                os.close(self._target)
                self._target = -1

    # -- one entry -----------------------------------------------------------------------

    def _begin(self, m: Member) -> None:
        where = f"archive.entries[{m.index}]"
        if m.index >= self._max_entries:
            raise ResourceExhausted(f"{where}: the archive has more than {self._max_entries} "
                                    f"entries, the workspace's inode cap")
        self._total += m.size
        if self._total > self._max_bytes:
            raise ResourceExhausted(f"{where}: the archive holds more than {self._max_bytes} "
                                    f"bytes, the workspace's size cap")
        parts = _entry_parts(m.name, where)
        self._member = m
        if self._strip:
            if len(parts) <= self._strip:
                return
            parts = parts[self._strip:]
        if not parts:  # the target itself ("./")
            if m.kind != "dir":
                raise InvalidSpec(where, f"{m.name!r} names the target directory itself")
            return
        if m.kind == "other":
            self.report.skipped += 1
            if len(self.report.skipped_names) < MAX_SKIPPED_NAMES:
                self.report.skipped_names.append(m.name)
            return
        if m.kind == "symlink":  # checked before anything of the entry is made
            depth = len(parts) - 1
            link = PurePosixPath(m.linkname)
            for part in link.parts:  # lexically: never above the target directory
                depth = depth - 1 if part == ".." else depth + (part != ".")
                if depth < 0:
                    break
            if not m.linkname or "\0" in m.linkname or link.is_absolute() or depth < 0:
                raise InvalidSpec(where, f"symlink {m.name!r} -> {m.linkname!r} points "
                                         f"outside the target directory")
        elif m.kind == "hardlink":
            src_parts = _entry_parts(m.linkname, where, "link target")[self._strip:]
        pfd = self._parent_fd(parts[:-1], where)
        name = parts[-1]
        if m.kind == "dir":
            self._make_dir(pfd, name, m, where)
            self.report.dirs += 1
            return
        self._clear(pfd, name, where)
        if m.kind == "symlink":
            os.symlink(m.linkname, name, dir_fd=pfd)
            if self._owner:
                os.chown(name, *self._owner, dir_fd=pfd, follow_symlinks=False)
            self.report.symlinks += 1
        elif m.kind == "hardlink":
            src = self._open_beneath("/".join(src_parts) or ".", os.O_PATH | os.O_NOFOLLOW,
                                     where)
            try:
                if not stat.S_ISREG(os.fstat(src).st_mode):
                    raise InvalidSpec(where, f"hardlink {m.name!r} -> {m.linkname!r} does not "
                                             f"name a regular file of the archive")
                os.link(f"/proc/self/fd/{src}", name, dst_dir_fd=pfd, follow_symlinks=True)
            finally:
                os.close(src)
            self.report.hardlinks += 1
        else:
            from .workspace import _openat2

            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
            try:
                fd = _openat2(pfd, name, flags, m.mode & 0o777)
            except OSError as exc:
                raise _refusal(exc, where, m.name) from None
            try:
                self._chown_chmod(fd, m.mode & 0o777)
                self._file = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            except BaseException:
                os.close(fd)
                raise
            self._wfd = fd
            self._written = 0
            self.report.files += 1

    def _write(self, piece: memoryview) -> None:
        m = self._member
        if self._file is None or m is None:
            return
        if self._wfd is None:
            self._wfd = os.open(f"/proc/self/fd/{self._file}",
                                os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        at = self._written
        self._written += len(piece)
        self.report.bytes += len(piece)
        pos = 0
        while pos < len(piece):  # zero runs of a whole block are left as holes
            end = min(pos + CHUNK_BYTES, len(piece))
            part = piece[pos:end]
            if part != _ZEROS[:len(part)]:
                _pwrite_all(self._wfd, part, at + pos)
            pos = end

    def _end_member(self) -> None:
        m, self._member = self._member, None
        if self._file is None or m is None:
            return
        try:
            if self._wfd is None:
                self._wfd = os.open(f"/proc/self/fd/{self._file}",
                                    os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.ftruncate(self._wfd, self._written)
            os.utime(self._wfd, (m.mtime, m.mtime))
        finally:
            os.close(self._file)
            self._file = None
            os.close(self._wfd)
            self._wfd = None

    # -- helpers -------------------------------------------------------------------------

    def _open_beneath(self, rel: str, flags: int, where: str) -> int:
        from .workspace import _openat2

        try:
            return _openat2(self._target, rel, flags)
        except OSError as exc:
            raise _refusal(exc, where, rel) from None

    def _parent_fd(self, parts: tuple[str, ...], where: str) -> int:
        if self._parent and self._parent[0] == parts:
            return self._parent[1]
        from .workspace import _openat2

        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK
        fd = os.dup(self._target)
        try:
            for part in parts:  # mkdir -p, one level at a time, each beneath the last
                try:
                    sub = _openat2(fd, part, flags | os.O_NOFOLLOW)
                except FileNotFoundError:
                    with _suppress_exists():
                        os.mkdir(part, 0o755, dir_fd=fd)
                        if self._owner:
                            os.chown(part, *self._owner, dir_fd=fd, follow_symlinks=False)
                    try:
                        sub = _openat2(fd, part, flags | os.O_NOFOLLOW)
                    except OSError as exc:
                        raise _refusal(exc, where, "/".join(parts)) from None
                except OSError as exc:
                    raise _refusal(exc, where, "/".join(parts)) from None
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        if self._parent:
            os.close(self._parent[1])
        self._parent = (parts, fd)
        return fd

    def _make_dir(self, pfd: int, name: str, m: Member, where: str) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=pfd)
            st = None
        if st is None:
            with _suppress_exists():
                os.mkdir(name, 0o700, dir_fd=pfd)
        from .workspace import _openat2

        try:
            fd = _openat2(pfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise _refusal(exc, where, m.name) from None
        try:
            self._chown_chmod(fd, (m.mode & 0o1777) | 0o700)
        finally:
            os.close(fd)

    def _clear(self, pfd: int, name: str, where: str) -> None:
        """Make room for a non-directory: an existing file or link is replaced (as tar does);
        a directory is not."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise InvalidSpec(where, f"{name!r} exists as a directory")
        os.unlink(name, dir_fd=pfd)

    def _chown_chmod(self, fd: int, mode: int) -> None:
        if self._owner:
            os.fchown(fd, *self._owner)
        os.fchmod(fd, mode)


class _suppress_exists:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return isinstance(exc, FileExistsError)


def _refusal(exc: OSError, where: str, name: str) -> Exception:
    if exc.errno == errno_mod.EXDEV:
        return InvalidSpec(where, f"{name!r} resolves outside the target directory")
    if exc.errno == errno_mod.ELOOP:
        return InvalidSpec(where, f"{name!r} goes through a symlink, which extraction never "
                                  f"follows")
    if exc.errno == errno_mod.EEXIST:
        return InvalidSpec(where, f"{name!r} appeared while it was extracted")
    if exc.errno == errno_mod.ENOTDIR:
        return InvalidSpec(where, f"{name!r}: a parent is not a directory (or is a symlink, "
                                  f"which extraction never follows)")
    if exc.errno == errno_mod.ENOENT:
        return InvalidSpec(where, f"{name!r} does not exist in the target directory")
    return exc


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data:
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


# -- archiving ----------------------------------------------------------------------------------


def _info(name: str, st: os.stat_result, kind: bytes, size: int = 0,
          linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & 0o1777
    info.mtime = int(st.st_mtime)
    info.size = size
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_stream(fd: int, name: str) -> Iterator[bytes]:
    """A tar stream of what fd is (a directory: it and everything below, under `name/`; a
    regular file: one entry `name`), in pieces of about CHUNK_BYTES.

    fd stays the caller's. Symlinks are archived as links; FIFOs, sockets and devices are
    left out; a file that shrinks while read is padded with zeros to the size its header
    announced, one that grows is cut there.
    """
    out = bytearray()
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        yield from _file_entry(out, name, os.dup(fd))
    else:
        out += _header(_info(name, st, tarfile.DIRTYPE))
        for entry in fstree.walk(fd):
            path = f"{name}/{entry.path}"
            mode = entry.st.st_mode
            if stat.S_ISDIR(mode):
                out += _header(_info(path, entry.st, tarfile.DIRTYPE))
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(entry.name, dir_fd=entry.dir_fd)
                except OSError:
                    continue
                out += _header(_info(path, entry.st, tarfile.SYMTYPE, linkname=target))
            elif stat.S_ISREG(mode):
                ffd = fstree.open_file(entry.dir_fd, entry.name)
                if ffd is not None:
                    yield from _file_entry(out, path, ffd)
            if len(out) >= CHUNK_BYTES:
                yield bytes(out)
                out.clear()
    out += bytes(2 * BLOCK)
    yield bytes(out)


def _file_entry(out: bytearray, name: str, ffd: int) -> Iterator[bytes]:
    """Append one regular file (header, data, padding) to out, yielding full pieces; closes
    ffd."""
    try:
        st = os.fstat(ffd)
        size = st.st_size
        out += _header(_info(name, st, tarfile.REGTYPE, size=size))
        pos = 0
        for start, stop in fstree.data_ranges(ffd, 0, size):
            if pos < start:  # a hole
                yield from _append_zeros(out, start - pos)
                pos = start
            while pos < stop:
                data = os.pread(ffd, min(CHUNK_BYTES, stop - pos), pos)
                if not data:
                    break
                if out:
                    out += data
                    if len(out) >= CHUNK_BYTES:
                        yield bytes(out)
                        out.clear()
                else:
                    yield data
                pos += len(data)
            if pos < stop:  # shrank
                break
        # a trailing hole, or the bytes of a file that shrank: its header promised `size`
        yield from _append_zeros(out, size - pos)
        out += bytes(-size % BLOCK)
    finally:
        os.close(ffd)


def _append_zeros(out: bytearray, count: int) -> Iterator[bytes]:
    """Append `count` zero bytes to out a piece at a time, yielding full pieces (a hole
    never sits in memory whole)."""
    while count > 0:
        n = min(count, CHUNK_BYTES)
        out += _ZEROS[:n]
        count -= n
        if len(out) >= CHUNK_BYTES:
            yield bytes(out)
            out.clear()
