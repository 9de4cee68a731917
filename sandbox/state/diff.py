"""What a copy-on-write workspace changed (diff), writing it into the host directory (apply).

The changes are the overlay's upper layer (sandbox/state/changes.py), compared with the
host directory as it is now: an entry of the upper that is the same as the host's (a
copy-up that changed nothing, or a change already applied) is no change, so after an apply
the diff is empty. Overlay semantics: a whiteout (character device 0:0) deletes the host
path, an opaque directory hides every host entry below it that the upper does not have.
Renames show as a deletion plus an addition (redirect_dir is off in these overlays).

The upper layer was written by the sandbox, so nothing in it is trusted:

* both trees are walked relative to directory descriptors, one component at a time with
  O_NOFOLLOW: a symlink on either side is never followed (a host symlink where the upper
  has a directory is a type change, and nothing below it is read on the host);
* apply never makes a device node, FIFO or socket (they are not even listed), never sets
  setuid or setgid (modes keep their permission bits only), gives everything the host
  directory's owner, and skips (reports) a symlink whose target would leave the directory:
  absolute, or climbing out with `..`;
* a path whose host copy changed since the sandbox started (the manifest taken then:
  type, mode, size, mtime, inode) is a conflict: apply refuses, naming them, unless forced.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import posixpath
import stat
from dataclasses import dataclass, field

from .. import fstree
from ..errors import FailedPrecondition, ResourceExhausted
from .changes import ChangeSet, ManifestEntry, kind_of
from .layers import MAX_DEPTH, is_opaque, is_whiteout, stored_mode

ADDED, MODIFIED, DELETED, MODE = "added", "modified", "deleted", "mode"
#: Default and largest patch of one file (bytes); larger text files get counts only.
DEFAULT_MAX_PATCH_BYTES = 1 << 20
#: Files larger than this are compared as binary (never read whole).
MAX_TEXT_BYTES = 8 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass
class Change:
    """One changed path, as proto corral.v1.Change has it (plus why apply skips it)."""

    path: str
    kind: str
    type: str
    old_mode: int = 0
    new_mode: int = 0
    size: int = 0
    binary: bool = False
    patch: str = ""
    lines_added: int = 0
    lines_removed: int = 0
    conflict: bool = False
    #: Why apply will not write it ("" when it will).
    refused: str = ""


@dataclass
class ApplyResult:
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: (path, why) of changes left out (a symlink leaving the directory).
    skipped: list[tuple[str, str]] = field(default_factory=list)


class ApplyConflict(FailedPrecondition):
    """Host copies changed since the sandbox started; `paths` names them."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        shown = ", ".join(repr(p) for p in paths[:20]) + (" ..." if len(paths) > 20 else "")
        super().__init__(f"the host copy of {len(paths)} path(s) changed since the sandbox "
                         f"started: {shown}; apply with force to overwrite them")


def diff(changes: ChangeSet, *, patch: bool = False,
         max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES, lines: bool = True) -> list[Change]:
    """The changes of a change set against its host directory, in walk order.

    Args:
        patch: include unified diffs of text files (each up to max_patch_bytes).
        lines: count added/removed lines of text files.
    """
    with changes.mounted():
        return list(_Differ(changes, patch, max_patch_bytes or DEFAULT_MAX_PATCH_BYTES,
                            lines).run())


class _Differ:
    """One walk of the upper layer beside the host directory."""

    def __init__(self, changes: ChangeSet, patch: bool, max_patch: int, lines: bool):
        self.changes = changes
        self.patch = patch
        self.max_patch = max_patch
        self.lines = lines or patch
        self.manifest = changes.manifest()

    def run(self):
        upper = os.open(self.changes.upper, _DIR)
        host_top = os.open(self.changes.host_dir, _DIR)
        hosts: list[int | None] = [host_top]  # hosts[d]: the host dir of depth-d entries
        try:
            for entry in fstree.walk(upper):
                while len(hosts) > entry.depth + 1:
                    _close(hosts.pop())
                if self.changes.hidden and entry.parts[0] in self.changes.hidden:
                    continue
                yield from self._entry(entry, hosts)
        finally:
            for fd in hosts:
                _close(fd)
            os.close(upper)

    def _entry(self, entry: fstree.Entry, hosts: list[int | None]):
        parent = hosts[-1]
        host_st = _lstat(parent, entry.name)
        st = entry.st
        path = entry.path
        if stat.S_ISDIR(st.st_mode):
            if entry.depth + 1 >= MAX_DEPTH:
                raise ResourceExhausted(f"diff: {path!r} is deeper than {MAX_DEPTH} levels")
            host_dir = _open_dir(parent, entry.name) if host_st is not None and \
                stat.S_ISDIR(host_st.st_mode) else None
            hosts.append(host_dir)
            yield from self._dir(entry, host_st, host_dir)
        elif is_whiteout(st):
            if host_st is not None:
                yield self._deleted(path, host_st, parent, entry.name)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            change = self._leaf(entry, host_st, parent)
            if change is not None:
                yield change

    def _dir(self, entry: fstree.Entry, host_st, host_dir: int | None):
        path, mode = entry.path, stored_mode(entry.st.st_mode)
        if host_st is None:
            yield Change(path, ADDED, "dir", 0, mode, conflict=self._conflict(path, None))
        elif not stat.S_ISDIR(host_st.st_mode):
            yield Change(path, MODIFIED, "dir", stored_mode(host_st.st_mode), mode,
                         conflict=self._conflict(path, host_st))
        elif stored_mode(host_st.st_mode) != mode:
            yield Change(path, MODE, "dir", stored_mode(host_st.st_mode), mode,
                         conflict=self._conflict(path, host_st))
        if host_dir is not None and is_opaque(entry.dir_fd, entry.name):
            fd = os.open(entry.name, _DIR, dir_fd=entry.dir_fd)
            try:
                ours = set(os.listdir(fd))
            finally:
                os.close(fd)
            for name in sorted(set(os.listdir(host_dir)) - ours):
                st = _lstat(host_dir, name)
                if st is not None:
                    yield self._deleted(f"{path}/{name}", st, host_dir, name)

    def _deleted(self, path: str, host_st: os.stat_result, parent: int, name: str) -> Change:
        conflict = self._conflict(path, host_st)
        if not conflict and stat.S_ISDIR(host_st.st_mode):
            conflict = self._subtree_changed(path, parent, name)
        return Change(path, DELETED, kind_of(host_st.st_mode), stored_mode(host_st.st_mode), 0,
                      conflict=conflict)

    def _leaf(self, entry: fstree.Entry, host_st, parent: int | None) -> Change | None:
        """A file or symlink of the upper against the host's entry of that name."""
        st, path = entry.st, entry.path
        kind = kind_of(st.st_mode)
        mode = stored_mode(st.st_mode) if kind == "file" else 0o777
        change = Change(path, ADDED, kind, 0, mode, size=st.st_size)
        if kind == "symlink":
            target = os.readlink(entry.name, dir_fd=entry.dir_fd)
            change.refused = _link_escapes(path, target)
            if host_st is not None and stat.S_ISLNK(host_st.st_mode):
                if os.readlink(entry.name, dir_fd=parent) == target:
                    return None
        both_files = kind == "file" and host_st is not None and stat.S_ISREG(host_st.st_mode)
        # small files are read once, for the comparison and the description both
        new = _read_small(entry.dir_fd, entry.name) if kind == "file" else None
        old = _read_small(parent, entry.name) if both_files else b""
        if host_st is not None:
            change.kind = MODIFIED
            change.old_mode = stored_mode(host_st.st_mode)
            change.conflict = self._conflict(path, host_st)
            if both_files and (new == old if new is not None and old is not None
                               else _same_content(entry, parent)):
                if change.old_mode == mode:
                    return None
                change.kind = MODE
                return change
        if kind == "file":
            self._describe(change, new, old)
        return change

    def _describe(self, change: Change, new: bytes | None, old: bytes | None) -> None:
        """Binary flag, line counts and patch of a changed file (new, old: its contents,
        None when too large to read whole)."""
        if new is None or old is None or not _is_text(new) or not _is_text(old):
            change.binary = True
            return
        if not self.lines:
            return
        old_lines = old.decode().splitlines(keepends=True)
        new_lines = new.decode().splitlines(keepends=True)
        text = []
        for line in difflib.unified_diff(old_lines, new_lines, f"a/{change.path}",
                                         f"b/{change.path}"):
            if line.startswith("+") and not line.startswith("+++"):
                change.lines_added += 1
            elif line.startswith("-") and not line.startswith("---"):
                change.lines_removed += 1
            if self.patch:
                text.append(line if line.endswith("\n") else line + "\n\\ No newline at end "
                                                                   "of file\n")
        if self.patch:
            joined = "".join(text)
            change.patch = joined if len(joined.encode()) <= self.max_patch else ""

    def _conflict(self, path: str, host_st: os.stat_result | None) -> bool:
        """Did the host's path change since the manifest was taken?"""
        before = self.manifest.get(path)
        if host_st is None or before is None:
            return (host_st is None) != (before is None)
        now = ManifestEntry.of(host_st)
        if now.type == "dir":  # a directory's size and mtime follow its entries
            return (before.type, before.mode) != (now.type, now.mode)
        return before != now

    def _subtree_changed(self, path: str, parent: int, name: str) -> bool:
        """Any change below a host directory that is to be deleted (new, changed or gone)."""
        top = _open_dir(parent, name)
        if top is None:
            return True
        seen = 0
        try:
            for entry in fstree.walk(top):
                seen += 1
                if self._conflict(f"{path}/{entry.path}", entry.st):
                    return True
        finally:
            os.close(top)
        below = sum(1 for p in self.manifest if p.startswith(path + "/"))
        return below != seen


def apply(changes: ChangeSet, *, force: bool = False) -> ApplyResult:
    """Write the changes into the host directory.

    Raises:
        ApplyConflict: host copies changed since the start (and not force); nothing is
            written then.
        FailedPrecondition: the sandbox still runs on the changes (the host directory is
            its overlay's lower layer, which overlayfs does not allow to change under it).
    """
    if changes.in_use():
        raise FailedPrecondition(f"sandbox {changes.meta['sandbox']} still runs on these "
                                 f"changes; destroy it before applying them (the host "
                                 f"directory is its overlay's lower layer)")
    result = ApplyResult()
    with changes.mounted():
        found = list(_Differ(changes, False, 0, False).run())
        conflicts = [c.path for c in found if c.conflict]
        if conflicts and not force:
            raise ApplyConflict(conflicts)
        writer = _HostWriter(changes)
        try:
            for change in found:
                if change.refused:
                    result.skipped.append((change.path, change.refused))
                    continue
                writer.apply(change, result)
        finally:
            writer.close()
            changes.note_host(result.written + result.removed)
    return result


class _HostWriter:
    """Writes changes below the host directory, never through a symlink."""

    def __init__(self, changes: ChangeSet):
        self.changes = changes
        self.host = os.open(changes.host_dir, _DIR)
        self.upper = os.open(changes.upper, _DIR)
        self.uid, self.gid = changes.owner

    def close(self) -> None:
        os.close(self.host)
        os.close(self.upper)

    def apply(self, change: Change, result: ApplyResult) -> None:
        head, name = posixpath.split(change.path)
        parent = _walk_down(self.host, head)
        try:
            if change.kind == DELETED:
                fstree.remove_at(parent, name)
                result.removed.append(change.path)
                return
            source_parent = _walk_down(self.upper, head)
            try:
                self._write(change, parent, source_parent, name)
            finally:
                os.close(source_parent)
            result.written.append(change.path)
        finally:
            os.close(parent)

    def _write(self, change: Change, parent: int, source_parent: int, name: str) -> None:
        host_st = _lstat(parent, name)
        if change.type == "dir":
            if host_st is not None and not stat.S_ISDIR(host_st.st_mode):
                fstree.remove_at(parent, name)
                host_st = None
            if host_st is None:
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR, dir_fd=parent)
            try:
                os.fchown(fd, self.uid, self.gid)
                os.fchmod(fd, change.new_mode)
            finally:
                os.close(fd)
            return
        if host_st is not None and stat.S_ISDIR(host_st.st_mode):
            fstree.remove_at(parent, name)
        temp = f".corral-apply.{os.getpid()}.{name}"[:255]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=parent)
        if change.type == "symlink":
            os.symlink(os.readlink(name, dir_fd=source_parent), temp, dir_fd=parent)
            os.chown(temp, self.uid, self.gid, dir_fd=parent, follow_symlinks=False)
        else:
            self._copy_file(change, parent, source_parent, name, temp)
        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)

    def _copy_file(self, change: Change, parent: int, source_parent: int, name: str,
                   temp: str) -> None:
        src = fstree.open_file(source_parent, name)
        if src is None:
            raise FailedPrecondition(f"apply: {change.path!r} is no longer a regular file "
                                     f"in the changes")
        try:
            dst = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                fstree.copy_file(src, dst, 1 << 62)
                os.fchown(dst, self.uid, self.gid)
                os.fchmod(dst, change.new_mode)
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _walk_down(top: int, relative: str) -> int:
    """A new descriptor of the directory `relative` below top, each component opened with
    O_NOFOLLOW (a symlink on the way is ELOOP/ENOTDIR, never followed)."""
    fd = os.dup(top)
    for part in [p for p in relative.split("/") if p]:
        try:
            nxt = os.open(part, _DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _lstat(parent: int | None, name: str) -> os.stat_result | None:
    if parent is None:
        return None
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _open_dir(parent: int | None, name: str) -> int | None:
    if parent is None:
        return None
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except OSError:
        return None


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _same_content(entry: fstree.Entry, host_parent: int) -> bool:
    """Do the upper's file and the host's (both regular) hold the same bytes?"""
    a = fstree.open_file(entry.dir_fd, entry.name)
    b = fstree.open_file(host_parent, entry.name)
    try:
        if a is None or b is None or os.fstat(a).st_size != os.fstat(b).st_size:
            return False
        pos = 0
        while True:
            x, y = os.pread(a, 1 << 20, pos), os.pread(b, 1 << 20, pos)
            if x != y:
                return False
            if not x:
                return True
            pos += len(x)
    finally:
        _close(a)
        _close(b)


def _read_small(parent: int, name: str) -> bytes | None:
    """A regular file's bytes when it is at most MAX_TEXT_BYTES, else None."""
    fd = fstree.open_file(parent, name)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_TEXT_BYTES:
            return None
        chunks, got = [], 0
        while got < size:  # one read for a small file (never a second one for its end)
            chunk = os.read(fd, size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _link_escapes(path: str, target: str) -> str:
    """Why a symlink at path with this target may not be written on the host ("": it may)."""
    if target.startswith("/"):
        return f"symlink target {target!r} is absolute (it would point outside the directory)"
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../"):
        return f"symlink target {target!r} leaves the directory"
    return ""
