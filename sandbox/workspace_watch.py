"""Watching a workspace tree for changes: one inotify instance per watch, bounded.

The daemon's inotify instances and watches are charged to its own user (root's quota on
the host, shared with everything else root runs), so a watch here is one instance, at most
MAX_WATCHED_DIRS directory watches (deeper or wider trees are reported, not watched), and
its queue of undelivered events is bounded (MAX_PENDING_EVENTS; the kernel's own queue
overflowing, IN_Q_OVERFLOW, or ours, becomes one "overflow" event with the count dropped).
The daemon caps how many watches run at once (runtime/sandboxes.py).

Directories are added by descriptor: each is opened beneath the workspace with
openat2(RESOLVE_BENEATH) and watched through /proc/self/fd/N, so a symlink planted by the
sandbox never makes the daemon watch (or report on) anything outside it. Directories made
or moved in later are added as their events arrive, and what is already inside them is
reported as created (it may have been made before the watch was added: an entry can be
reported twice, never missed). Sans-IO apart from the inotify
descriptor: the caller polls `fileno()` and calls `read()`.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections import deque
from dataclasses import dataclass

from .errors import InvalidSpec

MAX_WATCHED_DIRS = 4096
MAX_PENDING_EVENTS = 4096

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
         | IN_DELETE | IN_DELETE_SELF)
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)

#: inotify bit -> the kind reported (the order decides for a mask with several bits).
KINDS = ((IN_CREATE, "created"), (IN_MOVED_TO, "moved_to"), (IN_MOVED_FROM, "moved_from"),
         (IN_DELETE, "deleted"), (IN_CLOSE_WRITE, "closed_write"), (IN_MODIFY, "modified"),
         (IN_ATTRIB, "attrib"))


@dataclass(frozen=True)
class WatchEvent:
    path: str  # relative to /workspace
    kind: str  # created | modified | attrib | closed_write | deleted | moved_from | moved_to
    #            | overflow | limit
    is_dir: bool = False
    cookie: int = 0  # pairs a moved_from with its moved_to
    dropped: int = 0  # overflow: events lost


class TreeWatch:
    """inotify on the directory `rel` of a workspace and every directory below it."""

    def __init__(self, workspace, rel: str, *, max_dirs: int = MAX_WATCHED_DIRS,
                 max_pending: int = MAX_PENDING_EVENTS):
        from .workspace import relative

        self._ws = workspace
        self.root = relative(rel)
        self._max_dirs = max_dirs
        self._max_pending = max_pending
        self._paths: dict[int, str] = {}  # wd -> directory path relative to /workspace
        self.pending: deque[WatchEvent] = deque()
        self.dropped = 0
        self.limited = 0  # directories not watched because of max_dirs
        self.ended = False  # the watched root itself went away
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        try:
            self._add_tree(self.root, root=True)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self._fd

    @property
    def watched_dirs(self) -> int:
        return len(self._paths)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def take(self, limit: int = 512) -> list[WatchEvent]:
        """Up to limit pending events, an overflow event first when some were dropped."""
        out = []
        if self.dropped:
            out.append(WatchEvent(self.root, "overflow", True, 0, self.dropped))
            self.dropped = 0
        while self.pending and len(out) < limit:
            out.append(self.pending.popleft())
        return out

    def read(self) -> int:
        """Drain the inotify descriptor into `pending`; returns the events added."""
        added = 0
        while self._fd >= 0:
            try:
                buf = os.read(self._fd, 64 << 10)
            except BlockingIOError:
                break
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                added += self._event(wd, mask, cookie, os.fsdecode(raw))
        return added

    # -- internals -----------------------------------------------------------------------

    def _push(self, event: WatchEvent) -> int:
        if len(self.pending) >= self._max_pending:
            self.dropped += 1
            return 0
        last = self.pending[-1] if self.pending else None
        if last is not None and event.kind == "modified" and last == event:
            return 0  # a burst of writes to one file: one event
        self.pending.append(event)
        return 1

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> int:
        if mask & IN_Q_OVERFLOW:
            self.dropped += 1
            return 0
        base = self._paths.get(wd)
        if base is None:
            return 0
        if mask & IN_IGNORED:  # the directory is gone (or its filesystem unmounted)
            del self._paths[wd]
            if base == self.root:
                self.ended = True
            return 0
        if mask & (IN_DELETE_SELF | IN_UNMOUNT) and not name:
            if base == self.root:
                self.ended = True
            return 0
        path = f"{base}/{name}" if base != "." else name
        is_dir = bool(mask & IN_ISDIR)
        kind = next((k for bit, k in KINDS if mask & bit), None)
        added = self._push(WatchEvent(path, kind, is_dir, cookie)) if kind else 0
        if is_dir and mask & (IN_CREATE | IN_MOVED_TO):  # its contents after it
            before = len(self.pending)
            self._add_tree(path)
            added += len(self.pending) - before
        return added

    def _add_tree(self, rel: str, root: bool = False) -> None:
        """Watch rel and the directories below it (iteratively, bounded)."""
        from . import fstree

        try:
            fd = self._ws._open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
        except InvalidSpec:
            if root:
                raise InvalidSpec("path", f"{rel!r} is not a directory; watch a "
                                          f"directory") from None
            return
        except Exception:
            if root:
                raise
            return  # gone already
        limited = self.limited
        try:
            self._add(fd, rel)
            for entry in fstree.walk(fd):
                if not stat.S_ISDIR(entry.st.st_mode):
                    continue
                if len(self._paths) >= self._max_dirs:
                    self.limited += 1  # at least this one; the walk stops here (bounded work)
                    break
                try:
                    sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.dir_fd)
                except OSError:
                    continue
                try:
                    self._add(sub, f"{rel}/{entry.path}" if rel != "." else entry.path)
                finally:
                    os.close(sub)
            if not root:  # made before its directory was watched: said as created
                room = self._max_pending
                for entry in fstree.walk(fd):
                    if not room:  # no more than the queue holds: the rest is an overflow
                        self.dropped += 1
                        break
                    room -= 1
                    path = f"{rel}/{entry.path}" if rel != "." else entry.path
                    self._push(WatchEvent(path, "created", stat.S_ISDIR(entry.st.st_mode)))
        finally:
            os.close(fd)
        if self.limited > limited:  # said once per tree added
            self._push(WatchEvent(rel, "limit", True, 0, self.limited - limited))

    def _add(self, fd: int, rel: str) -> None:
        if len(self._paths) >= self._max_dirs:
            self.limited += 1
            return
        wd = _libc.inotify_add_watch(self._fd, f"/proc/self/fd/{fd}".encode(),
                                     _MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}")
        self._paths[wd] = rel
