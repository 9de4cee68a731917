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
a crash never sees half of one. Copies out of a workspace never follow a symbolic link and
take only regular files and directories: the agent controls those trees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat

MAX_COPY_BYTES = 256 << 20


def atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_tree_safe(src: str, dst: str, limit: int = MAX_COPY_BYTES, *, uid: int | None = None,
                   fsync: bool = False, beneath: str | None = None) -> int:
    """Copy regular files and directories of src into dst (created), never following links.

    With `beneath`, src is relative to that directory and no component of it may be a link.
    Returns the bytes copied; stops quietly at `limit`. Files are chowned to uid when given.
    A missing or non-directory src copies nothing.
    """
    try:
        if beneath is not None:
            top = open_beneath(beneath, src)
        else:
            top = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return _copy_dir(top, dst, limit, uid, fsync)
    finally:
        os.close(top)


def _copy_dir(dir_fd: int, dst: str, budget: int, uid: int | None, fsync: bool) -> int:
    os.makedirs(dst, mode=0o755, exist_ok=True)
    if uid is not None:
        os.chown(dst, uid, uid)
    used = 0
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        if used >= budget:
            break
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        target = os.path.join(dst, entry.name)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(entry.name, flags | os.O_DIRECTORY, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                used += _copy_dir(sub, target, budget - used, uid, fsync)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(entry.name, flags, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                used += _copy_file(fd, target, budget - used, uid, fsync)
            finally:
                os.close(fd)
    return used


def _copy_file(fd: int, target: str, budget: int, uid: int | None, fsync: bool) -> int:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return 0
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    copied = 0
    try:
        while copied < budget:
            chunk = os.read(fd, min(1 << 20, budget - copied))
            if not chunk:
                break
            os.write(out, chunk)
            copied += len(chunk)
        if fsync:
            os.fsync(out)
        if uid is not None:
            os.fchown(out, uid, uid)
    finally:
        os.close(out)
    return copied


def tree_signature(rel: str, beneath: str) -> tuple:
    """A cheap fingerprint (names, sizes, mtimes) of beneath/rel, to notice that it changed;
    no link is followed, so an agent cannot point it elsewhere."""
    try:
        top = open_beneath(beneath, rel)
    except OSError:
        return ()
    sig: list = []
    try:
        for root, dirs, files, _fd in os.fwalk(dir_fd=top, follow_symlinks=False):
            dirs.sort()
            for name in sorted(files):
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=_fd, follow_symlinks=False)
                    sig.append((root, name, st.st_size, st.st_mtime_ns))
    finally:
        os.close(top)
    return tuple(sig)


class TaskFiles:
    """Paths and atomic updates of one task's directory."""

    def __init__(self, root: str, task_id: str):
        self.dir = os.path.join(root, task_id)
        self.checkpoints = os.path.join(self.dir, "checkpoints")
        self.out = os.path.join(self.dir, "out")
        self.notify_path = os.path.join(self.dir, "notify")

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
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o700)
        if frame is not None:
            atomic_write(os.path.join(tmp, "frame"), frame)
        if files_src is not None:
            copy_tree_safe(files_src, os.path.join(tmp, "files"), fsync=True, beneath=beneath)
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(self.checkpoints)
        atomic_write(os.path.join(self.checkpoints, "LATEST"), str(seq).encode())
        for name in os.listdir(self.checkpoints):  # keep only the newest
            if name.isdigit() and int(name) < seq:
                shutil.rmtree(os.path.join(self.checkpoints, name), ignore_errors=True)
        return seq

    # -- doorbell -------------------------------------------------------------------------------

    def ring(self, fd: int) -> None:
        """One byte into the notify FIFO; a full FIFO (no daemon reading) is fine."""
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(fd, b"!")

    def open_bell_writer(self) -> int:
        # O_RDWR: never blocks and never fails for want of a reader (the daemon may be down).
        try:
            return os.open(self.notify_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return -1
