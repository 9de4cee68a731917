"""The overlay root of a sandbox on an image, made as a detached mount (new mount API).

The parent (root) builds it with fsopen/fsconfig/fsmount, so nothing is ever attached in
the host's mount table: a size-capped tmpfs holds the upper and work directories, the
image's layers are the read-only lowers (top first), and the finished overlay is idmapped
through the sandbox's user namespace (0..N-1 in the image = uid_base.. on the host) and
made nosuid,nodev. The sandbox's PID 1 attaches it (OP_ATTACH) as its root before
pivot_root. Closing the descriptors (and PID 1's death) frees everything.

The same pieces build the overlays of sandbox state (sandbox/state, docs/state.md): a
snapshot's root layers stacked over the image's, a workspace of a snapshot's layers under an
upper of its own (`layered_dir`), and a copy-on-write workspace over a host directory. Every
overlay here has redirect_dir, metacopy and index off, so its upper layer is a
self-contained delta that a snapshot can copy and a diff can read.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_AT_FDCWD, _MOVE_MOUNT_F_EMPTY_PATH = -100, 0x4
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x2, 0x4


class MountStepError(OSError):
    """A step of the new mount API failed; `step` names it (and the kernel's log line)."""

    def __init__(self, err: int, step: str, detail: str = ""):
        super().__init__(err, f"{step}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))
        self.step = step
        self.detail = detail


def _check(res: int, step: str, fs_fd: int = -1) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise MountStepError(err, step, _fs_log(fs_fd) if fs_fd >= 0 else "")
    return res


def _fs_log(fs_fd: int) -> str:
    """The messages the filesystem left on its context (why fsconfig refused)."""
    lines = []
    while True:
        try:
            data = os.read(fs_fd, 512)
        except OSError:
            break
        if not data:
            break
        lines.append(data.decode(errors="replace").strip())
    return "; ".join(lines)


def _fsopen(fstype: str) -> int:
    return _check(_libc.syscall(_SYS_FSOPEN, fstype.encode(), _FSOPEN_CLOEXEC),
                  f"fsopen({fstype})")


def _set(fs_fd: int, key: str, value: str | None, what: str) -> None:
    _check(_libc.syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, key.encode(),
                         None if value is None else value.encode(), 0),
           f"fsconfig({what} {key}={value})", fs_fd)


def _create_and_mount(fs_fd: int, what: str, attrs: int) -> int:
    _check(_libc.syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0),
           f"fsconfig({what} create)", fs_fd)
    return _check(_libc.syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, ctypes.c_uint(attrs)),
                  f"fsmount({what})", fs_fd)


def scratch_tmpfs(size_bytes: int, inodes: int | None = None) -> int:
    """A detached, size-capped tmpfs (its root 0755 root:root); returns its mount fd."""
    fs_fd = _fsopen("tmpfs")
    try:
        _set(fs_fd, "size", str(size_bytes), "tmpfs")
        if inodes is not None:
            _set(fs_fd, "nr_inodes", str(inodes), "tmpfs")
        _set(fs_fd, "mode", "0755", "tmpfs")
        return _create_and_mount(fs_fd, "tmpfs", MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    finally:
        os.close(fs_fd)


#: Overlay features that would make an upper layer depend on the lowers' inodes or paths
#: (a redirected directory, a metadata-only copy, an index): off, so an upper layer is a
#: self-contained delta a snapshot can copy and a diff can read (sandbox/state).
_PLAIN_UPPER = (("redirect_dir", "off"), ("metacopy", "off"), ("index", "off"))


def overlay(lowers_top_first: list[str], upper: str, work: str,
            source: str = "corral-image") -> int:
    """A detached overlay mount (nosuid,nodev) of these lowers; returns its mount fd."""
    fs_fd = _fsopen("overlay")
    try:
        _set(fs_fd, "source", source, "overlay")
        for key, value in _PLAIN_UPPER:
            _set(fs_fd, key, value, "overlay")
        for lower in lowers_top_first:
            _set(fs_fd, "lowerdir+", lower, "overlay")
        _set(fs_fd, "upperdir", upper, "overlay")
        _set(fs_fd, "workdir", work, "overlay")
        return _create_and_mount(fs_fd, "overlay", MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    finally:
        os.close(fs_fd)


def idmapped_lowers(layers_top_first, userns_fd: int, fds: list[int]) -> list[str]:
    """Clone each layer directory (open_tree) and idmap it through userns_fd; returns the
    /proc/self/fd paths overlayfs takes as lowers (their descriptors are added to fds,
    which the caller closes once the overlay exists: it keeps its own references).

    Raises:
        MountStepError: naming the layer and the step.
    """
    from corral.ext import _spawn

    lowers = []
    for layer in layers_top_first:
        try:
            fd = _spawn.open_tree_clone(layer)
        except OSError as exc:
            raise MountStepError(exc.errno, f"open_tree({layer})") from None
        fds.append(fd)
        try:
            _spawn.idmap_tree(fd, userns_fd, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                              recursive=False)
        except OSError as exc:
            raise MountStepError(exc.errno, f"mount_setattr(MOUNT_ATTR_IDMAP) on layer "
                                            f"{layer}") from None
        lowers.append(f"/proc/self/fd/{fd}")
    return lowers


def attach(mount_fd: int, path: str) -> None:
    """Attach a detached mount at a host path (move_mount)."""
    res = _libc.syscall(_SYS_MOVE_MOUNT, mount_fd, b"", _AT_FDCWD, os.fsencode(path),
                        _MOVE_MOUNT_F_EMPTY_PATH)
    _check(res, f"move_mount(to {path})")


def _upper_tmpfs(size_bytes: int, inodes: int | None, root_id: int) -> int:
    """A capped tmpfs holding an empty upper/ (owned by root_id) and work/; its fd."""
    scratch = scratch_tmpfs(size_bytes, inodes)
    try:
        os.mkdir("upper", 0o755, dir_fd=scratch)
        os.chown("upper", root_id, root_id, dir_fd=scratch)
        os.mkdir("work", 0o700, dir_fd=scratch)
    except BaseException:
        os.close(scratch)
        raise
    return scratch


def layered_dir(layers_top_first, userns_fd: int, upper_bytes: int, inodes: int,
                root_id: int, source: str) -> tuple[int, int]:
    """A detached overlay of layer directories (idmapped through userns_fd) under an
    upper layer of its own on a capped tmpfs; returns (overlay fd, tmpfs fd). The tmpfs
    holds upper/ (owned by root_id, the merged directory's owner) and work/; whoever
    keeps its descriptor can read the upper layer (a snapshot of the state on top).

    Raises:
        OSError: a step failed (MountStepError names it).
    """
    fds: list[int] = []
    scratch = _upper_tmpfs(upper_bytes, inodes, root_id)
    try:
        lowers = idmapped_lowers(layers_top_first, userns_fd, fds)
        merged = overlay(lowers, f"/proc/self/fd/{scratch}/upper",
                         f"/proc/self/fd/{scratch}/work", source)
    except BaseException:
        os.close(scratch)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return merged, scratch


#: Mount points the sandbox's setup needs in its root, made in the upper layer up front.
_MOUNT_POINTS = (("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("workspace", 0o755),
                 ("etc", 0o755))


def image_root(layers_bottom_first: tuple[str, ...], upper_bytes: int, userns_fd: int,
               root_id: int, etc_files: dict[str, str],
               above_top_first: tuple[str, ...] = ()) -> tuple[int, int]:
    """The overlay root of a sandbox on an image, detached; returns (its mount descriptor,
    the descriptor of the tmpfs holding its upper/ and work/ directories).

    Each layer directory is cloned (open_tree) and idmapped through userns_fd (the
    sandbox's own id map: 0 in the image is root inside). The upper and work directories
    live on a tmpfs of upper_bytes, not idmapped (overlayfs works in its upper layer with
    the mounter's credentials, host root, which an idmapped upper could not represent:
    EOVERFLOW): what it copies up keeps the ids the idmapped lowers show, the sandbox's
    host ids. The upper already holds the mount points and the generated /etc files
    (etc_files: name -> content), owned by root_id (root inside); the image's other /etc
    files, passwd and group among them, show through. above_top_first: a snapshot's root
    layers (sandbox/state), stacked over the image's. The caller keeps the tmpfs
    descriptor for as long as it may read the upper layer (a snapshot), then closes it.

    Raises:
        OSError: a step failed (MountStepError names it, with the kernel's message).
    """
    fds: list[int] = []
    scratch = _upper_tmpfs(upper_bytes, None, root_id)
    try:
        upper = os.open("upper", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=scratch)
        fds.append(upper)
        for name, mode in _MOUNT_POINTS:
            os.mkdir(name, dir_fd=upper)
            os.chmod(name, mode, dir_fd=upper)
            os.chown(name, root_id, root_id, dir_fd=upper)
        for name, content in etc_files.items():
            fd = os.open(f"etc/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=upper)
            os.fchown(fd, root_id, root_id)
            with os.fdopen(fd, "w") as f:
                f.write(content)
        layers = (*above_top_first, *reversed(layers_bottom_first))  # overlay: top first
        lowers = idmapped_lowers(layers, userns_fd, fds)
        merged = overlay(lowers, f"/proc/self/fd/{scratch}/upper",
                         f"/proc/self/fd/{scratch}/work")
    except BaseException:
        os.close(scratch)
        raise
    finally:
        for fd in fds:  # the overlay keeps its own references to its layers
            os.close(fd)
    return merged, scratch
