"""Change sets of copy-on-write workspaces: a capped upper layer on disk that outlives its
sandbox, and the manifest of the host directory taken when the sandbox started.

Layout under the changes root (0700; the daemon passes `<state>/changes`), one directory
per sandbox id:

    SANDBOX/meta.json       host directory, its owner, the cap, when it was made
    SANDBOX/manifest.json   per path of the host directory at start: type, mode, size,
                            mtime_ns, inode (what a conflict is measured against)
    SANDBOX/upper.img       a sparse ext4 image of the cap's size: upper/ and work/
    SANDBOX/mnt/            where upper.img is mounted while it is used
    .tmp-SANDBOX.RANDOM/    a change set being made (renamed to SANDBOX when complete)

Why an ext4 image: the upper layer must be on disk (it survives a daemon restart) and
bounded (a sandbox must not fill the daemon's disk), and this host's ext4 has no project
quota. A sparse image loop-mounted caps bytes and inodes exactly, costs disk only for what
is written, and takes ~10 ms to make (mkfs) and ~10 ms to mount. The sandbox sees ENOSPC at
the cap, in its own workspace only.

The image is mounted at mnt/ (nosuid, nodev, under the 0700 root) while a sandbox runs on
it, and for the time of a diff or an apply after that; `sweep` unmounts what a crashed
daemon left mounted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import fcntl
import glob
import json
import logging
import os
import re
import secrets
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .. import fstree
from ..errors import FailedPrecondition, InvalidSpec, NotFound, SandboxSetupError
from ..locks import flock_held
from ..workspace import _kind as kind_of
from . import state_root

_log = logging.getLogger("corral.sandbox")

_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID, _MS_NODEV, _MS_RDONLY = 2, 4, 1
_MNT_DETACH = 2
_LOOP_CTL_GET_FREE, _LOOP_CONFIGURE = 0x4C82, 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: How long a mount of a change set waits for the mount of a sandbox that just ended to be
#: released (seconds).
RELEASE_WAIT_S = 5.0
#: Default cap of a change set's upper layer (bytes, inodes).
DEFAULT_BYTES = 1 << 30
DEFAULT_INODES = 65536
#: Most entries of a host directory a manifest records.
MAX_MANIFEST_ENTRIES = 1_000_000
#: A deep task's change set (named after the task) outlives its attempts: the runner of
#: the attempt that runs on it holds this file (flock) for the attempt's whole life, so a
#: daemon restarted meanwhile leaves it mounted, and apply and discard refuse it.
LOCK_FILE = "lock"


def default_root() -> str:
    """$CORRAL_CHANGES_ROOT, else /var/lib/corral/changes (root) or the user's state dir."""
    return state_root("CORRAL_CHANGES_ROOT", "changes")


class ChangesNotFound(NotFound):
    """No change set for that sandbox (never copy-on-write, or applied and discarded)."""


@dataclass(frozen=True)
class ManifestEntry:
    """A host path as it was when the sandbox started."""

    type: str  # file dir symlink other
    mode: int
    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> ManifestEntry:
        return cls(kind_of(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                   st.st_ino)


def manifest_of(host_dir: str) -> dict[str, ManifestEntry]:
    """Every path below host_dir (relative) with its state now; "" is host_dir itself."""
    fd = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        out = {"": ManifestEntry.of(os.fstat(fd))}
        for entry in fstree.walk(fd):
            out[entry.path] = ManifestEntry.of(entry.st)
            if len(out) > MAX_MANIFEST_ENTRIES:
                raise InvalidSpec("workspace", f"{host_dir!r} holds more than "
                                               f"{MAX_MANIFEST_ENTRIES} entries")
    finally:
        os.close(fd)
    return out


class ChangeSet:
    """One sandbox's change set (a directory under the changes root)."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json"), "rb") as f:
            self.meta = json.load(f)
        self.host_dir: str = self.meta["host_dir"]
        self.owner: tuple[int, int] = tuple(self.meta["owner"])
        self.tenant: str = self.meta.get("tenant", "")
        #: Top-level names that are not the agent's changes (a deep task's .corral/):
        #: diff and apply leave them out.
        self.hidden: frozenset[str] = frozenset(self.meta.get("hidden", ()))

    @property
    def mnt(self) -> str:
        return os.path.join(self.path, "mnt")

    @property
    def upper(self) -> str:
        return os.path.join(self.mnt, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.mnt, "work")

    @classmethod
    def open(cls, root: str, sandbox_id: str) -> ChangeSet:
        """The change set of a sandbox.

        Raises:
            ChangesNotFound: there is none.
        """
        if not _ID.match(sandbox_id or ""):
            raise InvalidSpec("sandbox_id", f"{sandbox_id!r} is not a sandbox id")
        try:
            return cls(os.path.join(root, sandbox_id))
        except FileNotFoundError:
            raise ChangesNotFound(f"sandbox {sandbox_id} has no copy-on-write changes") from None

    @classmethod
    def create(cls, root: str, sandbox_id: str, host_dir: str, *, upper_uid: int,
               size_bytes: int = DEFAULT_BYTES, inodes: int = DEFAULT_INODES,
               tenant: str = "", hidden: tuple[str, ...] = ()) -> ChangeSet:
        """Take the host directory's manifest and make the capped upper image, in a temp
        directory renamed into place when complete.

        Args:
            upper_uid: owner of upper/ (the sandbox's root outside: /workspace's owner).
            tenant: whose changes these are (recorded; the daemon checks it).
            hidden: top-level names diff and apply leave out (ChangeSet.hidden).

        Raises:
            InvalidSpec: host_dir is not a directory (or too large to list).
            SandboxSetupError: making the image failed (mkfs's message in the detail).
        """
        if not _ID.match(sandbox_id or ""):
            raise InvalidSpec("sandbox_id", f"{sandbox_id!r} is not a sandbox id")
        os.makedirs(root, mode=0o700, exist_ok=True)
        final = os.path.join(root, sandbox_id)
        if os.path.islink(final):  # a deep task's change set, handed to its attempt
            return cls(final).adopt(host_dir, upper_uid)
        if os.path.lexists(final):
            raise InvalidSpec("sandbox_id", f"{sandbox_id} already has a change set")
        st = os.stat(host_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidSpec("workspace", f"{host_dir!r} is not a directory")
        tmp = os.path.join(root, f".tmp-{sandbox_id}.{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o700)
        try:
            manifest = manifest_of(host_dir)
            doc = {path: list(vars(e).values()) for path, e in manifest.items()}
            fstree.write_synced(os.path.join(tmp, "manifest.json"), json.dumps(doc).encode())
            meta = {"host_dir": host_dir, "owner": [st.st_uid, st.st_gid],
                    "upper_uid": upper_uid, "bytes": size_bytes, "inodes": inodes,
                    "created_at": time.time(), "sandbox": sandbox_id, "tenant": tenant,
                    **({"hidden": list(hidden)} if hidden else {})}
            fstree.write_synced(os.path.join(tmp, "meta.json"), json.dumps(meta).encode())
            _make_image(os.path.join(tmp, "upper.img"), size_bytes, inodes, upper_uid)
            os.mkdir(os.path.join(tmp, "mnt"), 0o700)
            fstree.fsync_dir(tmp)
            os.rename(tmp, final)
            fstree.fsync_dir(root)
        except BaseException:
            fstree.remove_tree(tmp, ignore_errors=True)
            raise
        return cls(final)

    def manifest(self) -> dict[str, ManifestEntry]:
        with open(os.path.join(self.path, "manifest.json"), "rb") as f:
            return {path: ManifestEntry(*values) for path, values in json.load(f).items()}

    def note_host(self, paths: list[str]) -> None:
        """Record these paths' host state now (after an apply wrote them)."""
        manifest = self.manifest()
        fd = os.open(self.host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path in paths:
                try:
                    manifest[path] = ManifestEntry.of(
                        os.stat(path, dir_fd=fd, follow_symlinks=False))
                except (FileNotFoundError, NotADirectoryError):
                    manifest.pop(path, None)
        finally:
            os.close(fd)
        doc = {path: list(vars(e).values()) for path, e in manifest.items()}
        tmp = os.path.join(self.path, "manifest.json.tmp")
        fstree.write_synced(tmp, json.dumps(doc).encode())
        os.replace(tmp, os.path.join(self.path, "manifest.json"))

    # -- mounting -----------------------------------------------------------------------------

    def is_mounted(self) -> bool:
        try:
            return os.stat(self.mnt).st_dev != os.stat(self.path).st_dev
        except FileNotFoundError:
            return False

    def hand_to(self, sandbox_id: str) -> str:
        """Name this change set (a deep task's) for the sandbox of its next attempt: a
        link ROOT/SANDBOX -> it, which create() adopts (adopt). Returns the link's path;
        the caller removes it when the attempt ends."""
        if not _ID.match(sandbox_id or ""):
            raise InvalidSpec("sandbox_id", f"{sandbox_id!r} is not a sandbox id")
        link = os.path.join(os.path.dirname(self.path), sandbox_id)
        os.symlink(os.path.basename(self.path), link)
        return link

    def adopt(self, host_dir: str, upper_uid: int) -> ChangeSet:
        """Take this change set (hand_to) for a sandbox of another id range: what the
        upper layer holds of the last one's range is moved to upper_uid's, so the new
        sandbox owns the changes of those before it.

        Raises:
            InvalidSpec: it was made for another host directory.
        """
        if os.path.realpath(host_dir) != self.host_dir:
            raise InvalidSpec("workspace", f"the change set {self.meta['sandbox']} is of "
                                           f"{self.host_dir!r}, not {host_dir!r}")
        old = self.meta["upper_uid"]
        if old != upper_uid:
            mine = self.mount()
            try:
                _shift_ids(self.upper, old, upper_uid)
            finally:
                if mine:
                    self.unmount()
            self.meta["upper_uid"] = upper_uid
            fstree.write_synced(os.path.join(self.path, "meta.json"),
                                json.dumps(self.meta).encode())
        return self

    def held(self) -> bool:
        """Does a deep task's attempt run on it now (LOCK_FILE held)?"""
        return flock_held(os.path.join(self.path, LOCK_FILE))

    def in_use(self) -> bool:
        """Is the image mounted writable (a sandbox's overlay runs on it), or a task's
        attempt on it? A diff mounts it read-only."""
        return self.held() or (self.is_mounted()
                               and not os.statvfs(self.mnt).f_flag & os.ST_RDONLY)

    def mount(self, *, read_only: bool = False) -> bool:
        """Mount the upper image at mnt/ unless it is; True when this call mounted it.

        Raises:
            SandboxSetupError: the loop device or the mount failed.
        """
        if self.is_mounted():
            return False
        image = os.path.join(self.path, "upper.img")
        # a sandbox that just ended may still hold its writable mount (a lazy unmount ends
        # with its last reference, a moment later): mounted again meanwhile, a read-only
        # mount fails (EROFS: the journal needs recovery) and a writable one would be a
        # second writer of the same filesystem
        deadline = time.monotonic() + RELEASE_WAIT_S
        while _attached(image):
            if time.monotonic() > deadline:
                raise SandboxSetupError("mount changes image", image, errno_mod.EBUSY,
                                        "a mount of it that ended is still held")
            time.sleep(0.02)
        try:
            self._mount_image(image, read_only)
        except SandboxSetupError as exc:
            if not read_only or exc.errno != errno_mod.EROFS:
                raise
            # A writable mount that never ended cleanly (the host went down under a
            # sandbox or task on it) left the journal in need of recovery, which a
            # read-only device cannot replay. Nothing else backs the image (waited for
            # above): replay it with a writable mount, as the next sandbox's would, then
            # mount it read-only.
            _log.warning("changes image %s: its journal needs recovery (a mount of it did "
                         "not end cleanly); replaying it", image)
            self._mount_image(image, False)
            if _libc.umount2(os.fsencode(self.mnt), 0) != 0:  # synchronous: journal done
                err = ctypes.get_errno()
                self.unmount()
                raise SandboxSetupError("unmount changes image", image, err,
                                        "after replaying its journal") from None
            self._mount_image(image, True)
        if not read_only:
            for name, mode in (("upper", 0o755), ("work", 0o700)):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(self.mnt, name), mode)
            os.chown(self.upper, self.meta["upper_uid"], self.meta["upper_uid"])
        return True

    def _mount_image(self, image: str, read_only: bool) -> None:
        loop = _attach_loop(image, read_only)
        try:
            flags = _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if read_only else 0)
            if _libc.mount(os.fsencode(loop[1]), os.fsencode(self.mnt), b"ext4", flags,
                           None) != 0:
                err = ctypes.get_errno()
                raise SandboxSetupError("mount changes image", image, err, f"on {loop[1]}")
        finally:
            os.close(loop[0])  # autoclear: the device goes with the last unmount

    def unmount(self) -> None:
        """Unmount mnt/ (lazily: a reader still inside keeps its view); idempotent."""
        while _libc.umount2(os.fsencode(self.mnt), _MNT_DETACH) == 0:
            pass

    @contextlib.contextmanager
    def mounted(self) -> Iterator[ChangeSet]:
        """The upper layer readable for the block (mounted read-only when nothing had it
        mounted, and unmounted after)."""
        mine = self.mount(read_only=True)
        try:
            yield self
        finally:
            if mine:
                self.unmount()

    def discard(self) -> int:
        """Drop the changes: unmount and remove the change set; returns how many changed
        paths were dropped (0 when the image could not be read)."""
        from .diff import diff

        if self.held():
            raise FailedPrecondition(f"{self.meta['sandbox']} still runs on these changes; "
                                     "cancel it (or let it end) before discarding them")
        try:
            count = len(diff(self, lines=False))
        except (OSError, SandboxSetupError):
            count = 0
        self.unmount()
        fstree.remove_tree(self.path)
        fstree.fsync_dir(os.path.dirname(self.path))
        return count


def sweep(root: str, in_use: set[str] = frozenset()) -> list[str]:
    """Remove half-made change sets and unmount images no live sandbox uses (a crashed
    daemon's); returns what it touched. Complete change sets stay: they outlive sandboxes
    until applied or discarded."""
    touched = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return touched
    for name in names:
        path = os.path.join(root, name)
        if name.startswith(".tmp-"):
            pid_free = name[len(".tmp-"):].rsplit(".", 1)[0]
            if pid_free not in in_use:
                fstree.remove_tree(path, ignore_errors=True)
                touched.append(name)
            continue
        if name in in_use:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            changes = ChangeSet(path)
            if changes.is_mounted() and not changes.held():  # a task's attempt: running
                changes.unmount()
                touched.append(name)
    return touched


#: The ids of one sandbox's range (sandbox/ids.py RANGE): what adopt moves.
_RANGE = 65536


def _shift_ids(top: str, old_base: int, new_base: int) -> None:
    """Move the owners and groups in [old_base, old_base + _RANGE) of everything under
    top (top included, links not followed) to the same offsets from new_base."""
    def moved(i: int) -> int:
        return new_base + i - old_base if old_base <= i < old_base + _RANGE else i

    def each():
        yield top
        for dirpath, dirnames, filenames in os.walk(top):
            yield from (os.path.join(dirpath, n) for n in dirnames + filenames)

    for name in each():
        st = os.lstat(name)
        if (moved(st.st_uid), moved(st.st_gid)) != (st.st_uid, st.st_gid):
            os.lchown(name, moved(st.st_uid), moved(st.st_gid))
            if not stat.S_ISLNK(st.st_mode):  # chown drops the mode's special bits
                os.chmod(name, stat.S_IMODE(st.st_mode))


def _make_image(path: str, size_bytes: int, inodes: int, owner: int) -> None:
    """A sparse ext4 image: size_bytes, at most `inodes` files (fewer on a small image: one
    per 8 KiB), its root owned by owner."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    inodes = min(inodes, max(1024, size_bytes // 8192))  # what the inode tables leave room for
    argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes), "-E",
            f"lazy_itable_init=1,lazy_journal_init=1,root_owner={owner}:{owner}", path]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SandboxSetupError("mkfs.ext4", path, errno_mod.ENOENT,
                                "install e2fsprogs for copy-on-write workspaces") from None
    if done.returncode != 0:
        raise SandboxSetupError("mkfs.ext4", path, errno_mod.EIO,
                                (done.stderr or done.stdout).strip()[:500])


def _attached(image: str) -> bool:
    """Does a loop device still back image (a mount of it, lazily unmounted, not yet
    released: the device is autoclear and goes with it)?"""
    wanted = os.path.realpath(image)
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().rstrip("\n")
        except OSError:  # detached meanwhile
            continue
        if name.removesuffix(" (deleted)") == wanted:
            return True
    return False


def _attach_loop(image: str, read_only: bool) -> tuple[int, str]:
    """A free loop device bound to image (autoclear); returns (its fd, its path)."""
    file_fd = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(16):  # another process may take the free device first
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                loop_fd = os.open(dev, (os.O_RDONLY if read_only else os.O_RDWR)
                                  | os.O_CLOEXEC)
                # struct loop_config: fd, block_size, loop_info64 (lo_flags at 52), reserved
                config = bytearray(304)
                struct.pack_into("=II", config, 0, file_fd, 0)
                flags = _LO_FLAGS_AUTOCLEAR | (1 if read_only else 0)  # LO_FLAGS_READ_ONLY
                struct.pack_into("=I", config, 8 + 52, flags)
                try:
                    fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, bytes(config))
                except OSError as exc:
                    os.close(loop_fd)
                    if exc.errno == errno_mod.EBUSY:
                        continue
                    raise SandboxSetupError("loop configure", image, exc.errno) from None
                return loop_fd, dev
        finally:
            os.close(ctl)
    finally:
        os.close(file_fd)
    raise SandboxSetupError("loop configure", image, errno_mod.EBUSY,
                            "no free loop device after 16 tries")
