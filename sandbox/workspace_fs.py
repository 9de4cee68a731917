"""Where workspaces live: one size- and inode-capped tmpfs each, under a root-only parent.

A workspace used to be a plain directory (a temporary one in /tmp, 0755, or a task's under
the daemon's --state) with no quota: one agent writing until ENOSPC filled the daemon's own
disk, every tenant's next call failed, and a setuid file left there could be run by any
host user. Now every workspace Corral makes is:

* a tmpfs mounted `nosuid,nodev` with `size=` and `nr_inodes=` (a byte and an inode cap:
  the agent gets ENOSPC in its own workspace, nothing else fills), never on the state
  database's filesystem;
* under `root()` (mode 0700, owned by the daemon's user), so no other host user can
  reach a file a sandbox left there, whatever its mode;
* owned: `<root>/<name>.owner` names the process that made it (pid and start time), so
  `sweep()` unmounts and removes the workspaces of dead owners (a killed daemon's
  sandboxes, a lost task attempt) at the next start.

Why tmpfs: mounting one costs ~0.3 ms here, against ~24 ms for a loop-mounted ext4 image
(truncate + mkfs + mount), and this host's ext4 has no project quota enabled. Its pages are
memory: written by a sandbox they are charged to that sandbox's memory cgroup, and the cap
is an upper bound, not a reservation. Without the privilege to mount (not root), or with
`CORRAL_WORKSPACE_FS=dir`, workspaces are plain directories under the same 0700 parent,
without caps.

Settings come from the environment, so a deep task's shim (another process) uses the
daemon's: CORRAL_WORKSPACE_ROOT, CORRAL_WORKSPACE_BYTES, CORRAL_WORKSPACE_INODES,
CORRAL_WORKSPACE_FS (tmpfs | dir). The daemon sets them from its flags.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import json
import logging
import os
import stat
import tempfile
import time

from . import fstree
from .errors import SandboxSetupError
from .procinfo import live_start_time, sweep_dead_owners

DEFAULT_BYTES = 1 << 30
DEFAULT_INODES = 65536
_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def root() -> str:
    """The 0700 directory every workspace sits in."""
    configured = os.environ.get("CORRAL_WORKSPACE_ROOT")
    if configured:
        return configured
    return runtime_path("workspaces")


def runtime_path(leaf: str) -> str:
    """`leaf` in Corral's runtime tree: /run/corral as root, else the user's
    $XDG_RUNTIME_DIR/corral, else /tmp/corral-UID (one tree per user: a shared /tmp/corral
    would be the first user's, 0700)."""
    if os.geteuid() == 0:
        return os.path.join("/run/corral", leaf)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "corral", leaf)
    return os.path.join(tempfile.gettempdir(), f"corral-{os.geteuid()}", leaf)


def max_bytes() -> int:
    return int(os.environ.get("CORRAL_WORKSPACE_BYTES") or DEFAULT_BYTES)


def max_inodes() -> int:
    return int(os.environ.get("CORRAL_WORKSPACE_INODES") or DEFAULT_INODES)


def kind() -> str:
    """tmpfs (capped) or dir (plain directory, no caps)."""
    wanted = os.environ.get("CORRAL_WORKSPACE_FS") or ("tmpfs" if os.geteuid() == 0 else "dir")
    return wanted if wanted in ("tmpfs", "dir") else "tmpfs"


def configure(*, root_dir: str | None = None, size_bytes: int | None = None,
              inodes: int | None = None, fs: str | None = None) -> None:
    """Set this process's (and its children's) workspace settings."""
    for key, value in (("CORRAL_WORKSPACE_ROOT", root_dir), ("CORRAL_WORKSPACE_BYTES", size_bytes),
                       ("CORRAL_WORKSPACE_INODES", inodes), ("CORRAL_WORKSPACE_FS", fs)):
        if value is not None:
            os.environ[key] = str(value)


def ensure_root() -> str:
    base = root()
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        # someone else's directory (or a link) planted where ours goes, e.g. in /tmp
        raise SandboxSetupError("workspace root", base, errno_mod.EPERM,
                                f"it is not a directory owned by uid {os.geteuid()}; remove "
                                f"it or set CORRAL_WORKSPACE_ROOT")
    if st.st_mode & 0o777 != 0o700:
        os.chmod(base, 0o700)  # a parent made by an older version, or by someone's umask
    return base


def create(name: str, uid: int, gid: int, *, size_bytes: int | None = None,
           owner_pid: int | None = None) -> str:
    """Make the workspace `name` for a sandbox whose root is uid:gid outside; returns its path.

    Raises:
        SandboxSetupError: the mount failed (ENOSPC/ENOMEM: RESOURCE_EXHAUSTED).
    """
    path = _claim(name, owner_pid)
    try:
        os.mkdir(path, 0o700)
        if kind() == "tmpfs":
            size = size_bytes or max_bytes()
            data = f"size={size},nr_inodes={max_inodes()},mode=0755,uid={uid},gid={gid}"
            if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                           data.encode()) != 0:
                err = ctypes.get_errno()
                if err != errno_mod.EPERM:
                    raise SandboxSetupError("workspace mount", path, err, "tmpfs " + data)
                _warn_no_mount(path)
                _give_away(path, uid, gid)
        else:
            _give_away(path, uid, gid)
    except BaseException:
        remove(path)
        raise
    return path


def _claim(name: str, owner_pid: int | None) -> str:
    """Write the owner file of workspace `name` (before anything exists to sweep); its path."""
    base = ensure_root()
    path = os.path.join(base, name)
    pid = owner_pid or os.getpid()
    owner = {"pid": pid, "start": live_start_time(pid), "created_at": time.time()}
    tmp = os.path.join(base, f".{name}.owner.tmp")
    with open(tmp, "w") as f:
        json.dump(owner, f)
    os.replace(tmp, path + ".owner")
    return path


def hand_to_init(name: str, init_pid: int) -> None:
    """The workspace `name` of a sandbox that outlives its creator (live restore) belongs
    to its PID 1 from now on: a sweep by any process (another daemon, `corral run`) keeps
    it while that PID 1 runs, also while no daemon does (as ids.IdRange.note_init keeps
    the sandbox's id range)."""
    _claim(name, init_pid)


def create_mounted(name: str, mount_fd: int, *, owner_pid: int | None = None) -> str:
    """Make the workspace `name` out of a detached mount the caller built (an overlay of a
    snapshot's layers, or of a host directory with its changes: sandbox/state), attached
    at its place under root(); returns its path. remove() and sweep() take it off like a
    tmpfs workspace (the caller keeps its own descriptors of what is under it).

    Raises:
        SandboxSetupError: the attach failed.
    """
    from .images import overlay

    path = _claim(name, owner_pid)
    try:
        os.mkdir(path, 0o700)
        try:
            overlay.attach(mount_fd, path)
        except OSError as exc:
            raise SandboxSetupError("workspace attach", path, exc.errno) from None
    except BaseException:
        remove(path)
        raise
    return path


_warned = False


def _warn_no_mount(path: str) -> None:
    """Root without CAP_SYS_ADMIN (a container): plain directories, said once."""
    global _warned
    if not _warned:
        _warned = True
        logging.getLogger("corral.workspaces").warning(
            "cannot mount a tmpfs at %s (EPERM): workspaces are plain directories without "
            "byte or inode caps; give the daemon CAP_SYS_ADMIN to cap them", path)


def _give_away(path: str, uid: int, gid: int) -> None:
    """A plain-directory workspace owned by the sandbox's root."""
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
        os.chmod(path, 0o755)
    else:  # cannot give it away: let the sandbox's ids write (the parent is still 0700)
        os.chmod(path, 0o777)


def is_managed(path: str | None) -> bool:
    """Was path made by create() (a workspace this module must remove)? Its owner file says
    so, whatever root the process that made it was configured with."""
    return bool(path) and os.path.exists(path + ".owner")


def remove(path: str) -> None:
    """Unmount and remove a workspace create() made; idempotent."""
    encoded = os.fsencode(path)
    # detach: a process still inside (a lingering helper) cannot keep it mounted here
    while _libc.umount2(encoded, _MNT_DETACH) == 0:
        pass  # mounted twice (a retry after a crash): take every layer off
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:  # a plain-directory workspace (kind dir) with files in it
        fstree.remove_tree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".owner")


def sweep() -> list[str]:
    """Remove the workspaces whose owner process is gone; returns their names."""
    base = root()

    def workspace(entry: str) -> str | None:
        if not entry.endswith(".owner") or entry.startswith("."):
            return None
        return entry[: -len(".owner")]

    def gone(name: str) -> str:
        remove(os.path.join(base, name))
        return name

    return sweep_dead_owners(base, workspace, _owner_alive, gone)


def _owner_alive(path: str) -> bool:
    """Does the process a workspace's .owner file names still run (an unreadable record:
    no)? OSError propagates (sweep_dead_owners tells a record gone from one unreadable)."""
    with open(path) as f:
        try:
            owner = json.load(f)
        except ValueError:
            return False
    try:
        start = live_start_time(int(owner["pid"]))
    except (ValueError, KeyError, TypeError):
        return False
    return start is not None and start == owner.get("start")


def usage(path: str) -> dict:
    """Bytes and inodes a workspace uses and may use (statvfs of its own tmpfs)."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        if exc.errno == errno_mod.ENOENT:
            return {}
        raise
    return {"bytes_used": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "bytes_max": st.f_blocks * st.f_frsize,
            "inodes_used": st.f_files - st.f_ffree, "inodes_max": st.f_files}
