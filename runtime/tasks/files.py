"""A task's directory: checkpoints, progress, result, output files, one attempt's log.

Layout under ``<state>/tasks/<task id>/`` (the local executor's shim writes it directly; the
Ray executor receives the same data from its actor and writes it here itself)::

    checkpoints/LATEST          seq of the newest complete checkpoint
    checkpoints/<seq>/frame     the last CHECKPOINT frame payload (absent: none sent)
    checkpoints/<seq>/files/    what the agent left in $CORRAL_CHECKPOINT_DIR
    attempt-<n>/runner.json     who runs the attempt (shim pid and start time, sandbox id)
    attempt-<n>/progress.json   last PROGRESS payload
    attempt-<n>/result.json     RESULT payload
    attempt-<n>/exit.json       how the attempt ended (written last)
    attempt-<n>/log             stdout, stderr and LOG frames, as they came
    attempt-<n>/workspace/      the sandbox's /workspace
    out/                        /workspace/out of the attempt that succeeded
    notify                      FIFO: one byte per change, the daemon's doorbell

Every file is replaced atomically (write, fsync, rename, fsync the directory): a reader or
a crash never sees half of one. Copies out of a workspace never follow a symbolic link,
take only regular files and directories, never open anything that could block (a FIFO),
walk without recursion at any depth, keep holes as holes, and stop at MAX_COPY_BYTES data
bytes and MAX_COPY_ENTRIES entries: the agent controls those trees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass

from corral.sandbox import fstree
from corral.sandbox.fstree import fsync_dir

#: Data bytes one copy out of a workspace takes at most (holes of sparse files are free).
MAX_COPY_BYTES = 256 << 20
#: Files and directories one copy out of a workspace takes at most.
MAX_COPY_ENTRIES = 100_000
#: Directory levels one copy out of a workspace takes at most (deeper ones are left out and
#: counted): every later reader of the copy then pays at most this much per path.
MAX_COPY_DEPTH = 2048


def atomic_write(path: str, data: bytes) -> None:
    """Replace path with data, durably: a synced temporary file renamed over it, then the
    directory synced (a crash leaves the old content or the new, never a torn file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fstree.write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def replace_live(path: str, data: bytes) -> None:
    """Replace path with data atomically (a reader sees the old content or the new), with
    no fsync: for files that describe a running attempt and matter only while it runs (a
    shim's pid, a runner's start, its latest progress). A daemon restart, the case they
    serve, finds them in the page cache; an OS crash ends the attempt with them, and what
    the daemon took from them is already in its own store. What outlives the attempt (its
    exit record, result, checkpoints, steering input) goes through atomic_write."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def open_beneath(base: str, rel: str = "") -> int:
    """A directory descriptor of base/rel, opened one component at a time without following
    a symbolic link anywhere below base (an agent may have replaced any of them)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in rel.split("/") if p and p != "."]:
            if part == "..":
                raise OSError(errno.EPERM, "'..' in a path beneath a workspace", rel)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                          | os.O_NONBLOCK, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class CopyReport:
    """What copy_tree() did: data bytes written, entries made, and what it left out."""

    bytes: int = 0
    entries: int = 0
    skipped: int = 0  # links, FIFOs, sockets, devices, unreadable entries
    complete: bool = True  # False: a limit stopped it


def copy_tree(src: str, dst: str, limit: int = MAX_COPY_BYTES, *, uid: int | None = None,
              fsync: bool = False, beneath: str | None = None,
              max_entries: int = MAX_COPY_ENTRIES) -> CopyReport:
    """Copy regular files and directories of src into dst (created), never following links.

    The walk is iterative and descriptor-relative (sandbox/fstree.py), so any depth works;
    files are opened with O_NONBLOCK and type-checked (a FIFO is skipped, never waited on)
    and copied sparsely (holes stay holes). At most `limit` data bytes, `max_entries`
    entries and MAX_COPY_DEPTH levels are copied; the report says whether a limit was
    reached. With `beneath`, src
    is relative to that directory and no component of it may be a link. Files are chowned
    to uid when given. A missing or non-directory src copies nothing.
    """
    report = CopyReport()
    try:
        if beneath is not None:
            top = open_beneath(beneath, src)
        else:
            top = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                          | os.O_NONBLOCK)
    except OSError:
        return report
    try:
        _copy_walk(top, dst, limit, uid, fsync, max_entries, report)
    except fstree.TreeChanged:
        report.complete = False
    finally:
        os.close(top)
    return report


def copy_tree_safe(src: str, dst: str, limit: int = MAX_COPY_BYTES, *, uid: int | None = None,
                   fsync: bool = False, beneath: str | None = None) -> int:
    """copy_tree(), returning only the data bytes copied."""
    return copy_tree(src, dst, limit, uid=uid, fsync=fsync, beneath=beneath).bytes


def _copy_walk(top: int, dst: str, limit: int, uid: int | None, fsync: bool,
               max_entries: int, report: CopyReport) -> None:
    os.makedirs(dst, mode=0o755, exist_ok=True)
    if uid is not None:
        os.chown(dst, uid, uid)
    # The destination is ours: its directory at each depth of the current path (-1: one
    # that could not be made, whose entries are left out; None: closed, at most
    # MAX_OPEN_DIRS stay open, reopened by ".."). The walk is depth first, so an entry's
    # directory is always the last one made one level up.
    dst_fds: list[int | None] = [os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]

    def leave() -> None:
        fd = dst_fds.pop()
        if fd is None or fd < 0:
            return
        try:
            if dst_fds[-1] is None:
                dst_fds[-1] = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                      dir_fd=fd)
        finally:
            os.close(fd)

    stats = fstree.WalkStats()
    try:
        for entry in fstree.walk(top, max_depth=MAX_COPY_DEPTH, stats=stats):
            if report.entries >= max_entries or report.bytes >= limit:
                report.complete = False
                return
            while len(dst_fds) > entry.depth + 1:
                leave()
            parent = dst_fds[-1]
            is_dir = stat.S_ISDIR(entry.st.st_mode)
            if parent is None or parent < 0 or not (is_dir or stat.S_ISREG(entry.st.st_mode)):
                report.skipped += 1  # its directory was not made; a link, FIFO, device
                if is_dir:
                    dst_fds.append(-1)
                continue
            try:
                if is_dir:
                    dst_fds.append(_copy_dir_entry(entry, parent, uid))
                    report.entries += 1
                    old = len(dst_fds) - 1 - fstree.MAX_OPEN_DIRS
                    if old >= 1 and dst_fds[old] is not None and dst_fds[old] >= 0:
                        os.close(dst_fds[old])
                        dst_fds[old] = None
                    continue
                copied, whole = _copy_file_entry(entry, parent, limit - report.bytes, uid,
                                                 fsync)
            except OSError:
                report.skipped += 1
                if is_dir:
                    dst_fds.append(-1)
                continue
            if copied is None:
                report.skipped += 1
                continue
            report.bytes += copied
            report.entries += 1
            if not whole:
                report.complete = False
                return
    finally:
        for fd in dst_fds:
            if fd is not None and fd >= 0:
                os.close(fd)
        if stats.pruned:
            report.skipped += stats.pruned
            report.complete = False


def _copy_dir_entry(entry: fstree.Entry, parent: int, uid: int | None) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(entry.name, 0o755, dir_fd=parent)
    sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=parent)
    try:
        if uid is not None:
            os.fchown(sub, uid, uid)
    except BaseException:
        os.close(sub)
        raise
    return sub


def _copy_file_entry(entry: fstree.Entry, parent: int, budget: int, uid: int | None,
                     fsync: bool) -> tuple[int | None, bool]:
    fd = fstree.open_file(entry.dir_fd, entry.name)
    if fd is None:  # not a regular file (any more): never opened in a blocking way
        return None, True
    try:
        out = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o644, dir_fd=parent)
        try:
            copied, whole = fstree.copy_file(fd, out, budget)
            if fsync:
                os.fsync(out)
            if uid is not None:
                os.fchown(out, uid, uid)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return copied, whole


def tree_signature(rel: str, beneath: str) -> tuple:
    """A cheap fingerprint (names, sizes, mtimes) of beneath/rel, to notice that it changed;
    no link is followed, so an agent cannot point it elsewhere. Walked iteratively, at most
    MAX_COPY_ENTRIES entries (what a checkpoint would copy)."""
    try:
        top = open_beneath(beneath, rel)
    except OSError:
        return ()
    sig: list = []
    try:
        for entry in fstree.walk(top, max_depth=MAX_COPY_DEPTH):
            st = entry.st  # depth first: (depth, name) in order pins every path down
            sig.append((entry.depth, entry.name, st.st_mode, st.st_size, st.st_mtime_ns))
            if len(sig) > MAX_COPY_ENTRIES:
                break
    except fstree.TreeChanged:
        sig.append("changing")
    finally:
        os.close(top)
    return tuple(sig)



#: Doorbell bytes: what the shim persisted (one byte per change; the daemon looks at what
#: the bytes it reads name, and at everything for BELL_ANY or a byte it does not know, as
#: an older shim's "!").
BELL_STARTED = b"s"  # runner.json or pulling.json
BELL_PROGRESS = b"p"  # progress.json
BELL_RESULT = b"r"  # result.json
BELL_CHECKPOINT = b"c"  # a new checkpoint (checkpoints/LATEST)
BELL_NET = b"n"  # egress records appended to the attempt's net events file
BELL_ANY = b"!"  # anything (the attempt's end)
BELLS = frozenset(BELL_STARTED + BELL_PROGRESS + BELL_RESULT + BELL_CHECKPOINT + BELL_NET)


class TaskFiles:
    """Paths and atomic updates of one task's directory."""

    def __init__(self, root: str, task_id: str):
        self.dir = os.path.join(root, task_id)
        self.checkpoints = os.path.join(self.dir, "checkpoints")
        self.out = os.path.join(self.dir, "out")
        self.notify_path = os.path.join(self.dir, "notify")
        #: Steering for the running attempt, one file per input, taken in name order.
        self.inbox = os.path.join(self.dir, "inbox")
        #: Data bytes the last save_checkpoint() wrote (frame and files; holes are free).
        self.last_checkpoint_bytes = 0

    def create(self) -> None:
        os.makedirs(self.checkpoints, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkfifo(self.notify_path, 0o600)

    def attempt_dir(self, attempt: int) -> str:
        return os.path.join(self.dir, f"attempt-{attempt}")

    # -- checkpoints --------------------------------------------------------------------------

    def latest_checkpoint(self) -> int:
        try:
            with open(os.path.join(self.checkpoints, "LATEST")) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def checkpoint_dir(self, seq: int) -> str:
        return os.path.join(self.checkpoints, str(seq))

    def checkpoint_frame(self, seq: int | None = None) -> bytes | None:
        seq = self.latest_checkpoint() if seq is None else seq
        if not seq:
            return None
        try:
            with open(os.path.join(self.checkpoint_dir(seq), "frame"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def save_checkpoint(self, frame: bytes | None, files_src: str | None,
                        beneath: str | None = None) -> int:
        """Persist a new checkpoint (frame bytes and/or a copy of a directory); its seq.

        With `beneath`, files_src is relative to it and is opened without following links.
        """
        seq = self.latest_checkpoint() + 1
        final = self.checkpoint_dir(seq)
        tmp = final + ".tmp"
        fstree.remove_tree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o700)
        if frame is not None:
            atomic_write(os.path.join(tmp, "frame"), frame)
        written = len(frame or b"")
        if files_src is not None:
            report = copy_tree(files_src, os.path.join(tmp, "files"), fsync=True,
                               beneath=beneath)
            written += report.bytes
        self.last_checkpoint_bytes = written
        fsync_dir(tmp)
        fstree.remove_tree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(self.checkpoints)
        atomic_write(os.path.join(self.checkpoints, "LATEST"), str(seq).encode())
        for name in os.listdir(self.checkpoints):  # keep only the newest
            if name.isdigit() and int(name) < seq:
                fstree.remove_tree(os.path.join(self.checkpoints, name), ignore_errors=True)
        return seq

    # -- steering -------------------------------------------------------------------------------

    def post_input(self, text: str) -> None:
        """Queue steering text for the running attempt (durably: it survives a restart)."""
        os.makedirs(self.inbox, mode=0o700, exist_ok=True)
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        atomic_write(os.path.join(self.inbox, name), text.encode("utf-8"))

    def take_inputs(self) -> list[bytes]:
        """The queued steering texts, oldest first, each removed as it is taken."""
        try:
            names = sorted(n for n in os.listdir(self.inbox) if ".tmp-" not in n)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            path = os.path.join(self.inbox, name)
            with contextlib.suppress(FileNotFoundError):
                with open(path, "rb") as f:
                    out.append(f.read())
                os.unlink(path)
        return out

    # -- doorbell -------------------------------------------------------------------------------

    def ring(self, fd: int, what: bytes = BELL_ANY) -> None:
        """One byte into the notify FIFO, saying what changed (BELL_*); a full FIFO (no
        daemon reading) is fine."""
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(fd, what)

    def open_bell_writer(self) -> int:
        # O_RDWR: never blocks and never fails for want of a reader (the daemon may be down).
        try:
            return os.open(self.notify_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return -1
