"""Mounts made in a sandbox that already runs: a host directory shown at /workspace.

A warm pool's sandbox (runtime/pools.py) was started before the request that names its
workspace. The directory is cloned and idmapped here as a cold start does it
(native.Sandbox._detach_binds: open_tree(OPEN_TREE_CLONE), then mount_setattr with
MOUNT_ATTR_IDMAP through a user namespace that maps the directory's owner to the sandbox's
root), and then attached over the sandbox's /workspace inside its mount namespace.

That last step needs setns(CLONE_NEWNS), which the kernel refuses to a thread of a
multithreaded process (EINVAL: the threads share their filesystem context), and no Python
may run in a child forked from one. So it runs in a short helper process of its own: a new
interpreter (isolated, no site) that joins the namespace of the sandbox's PID 1 and calls
move_mount on the descriptor it inherited. Nothing else is mounted and nothing is left:
the mount lives and dies with the sandbox's mount namespace.
"""

from __future__ import annotations

import errno as errno_mod
import os
import subprocess
import sys

from . import workspace_fs
from .errors import SandboxSetupError

#: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, as on every directory a sandbox is shown.
ATTR_NOSUID_NODEV = 0x2 | 0x4
#: Seconds the helper may take (its interpreter's start dominates).
HELPER_TIMEOUT_S = 30.0

# Joins the mount namespace of argv[1]'s PID and attaches descriptor argv[2] at argv[3].
# Exit status 0, or "step:errno" on stderr and status 1.
_HELPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, fd, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
if libc.setns(ns, 0x00020000) != 0:
    sys.exit(f"setns(CLONE_NEWNS):{ctypes.get_errno()}")
if libc.syscall(429, fd, b"", -100, target, 4) != 0:
    sys.exit(f"move_mount:{ctypes.get_errno()}")
"""


def idmapped_clone(source: str, uid_base: int) -> int:
    """A detached clone of source whose owner is root (uid_base outside) in the sandbox,
    nosuid and nodev; the caller closes it.

    Raises:
        SandboxSetupError: open_tree, the id-map namespace or mount_setattr failed.
    """
    from corral.ext import _spawn

    try:
        fd = _spawn.open_tree_clone(source)
    except OSError as exc:
        raise SandboxSetupError("open_tree", source, exc.errno) from None
    try:
        st = os.stat(source)
        try:
            userns = _spawn.userns_with_maps(f"{st.st_uid} {uid_base} 1\n".encode(),
                                             f"{st.st_gid} {uid_base} 1\n".encode())
        except OSError as exc:
            raise SandboxSetupError("idmap user namespace", source, exc.errno) from None
        try:
            _spawn.idmap_tree(fd, userns, ATTR_NOSUID_NODEV)
        except OSError as exc:
            raise SandboxSetupError("mount_setattr(MOUNT_ATTR_IDMAP)", source,
                                    exc.errno) from None
        finally:
            os.close(userns)
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach_workspace(sandbox, source: str) -> None:
    """Show host directory source at /workspace of a running native sandbox, over the
    workspace it started with, owned as in a cold create; that workspace is then removed
    on the host and the sandbox's workspace is source (what a snapshot and the file API
    read, as for a sandbox started with it).

    Raises:
        SandboxSetupError: a step failed, named with the directory.
    """
    fd = idmapped_clone(source, sandbox.spec.uid_base)
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _HELPER, str(sandbox.init_pid), str(fd),
             "/workspace"],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, timeout=HELPER_TIMEOUT_S, check=False)
    finally:
        os.close(fd)
    if done.returncode != 0:
        report = done.stderr.decode(errors="replace").strip()
        step, _, number = report.rpartition(":")
        if not number.isdigit():  # the helper itself broke: say what it printed
            raise SandboxSetupError("attach /workspace", source, errno_mod.EIO, report[-300:])
        raise SandboxSetupError(step, source, int(number))
    if sandbox._own_workspace:  # hidden under source inside, which keeps its own copy
        workspace_fs.remove(sandbox.workspace)
        sandbox._own_workspace = False
    sandbox.workspace = source
