"""What the daemon can still afford: free bytes and inodes of its state (and workspace)
filesystems, descriptor headroom, a disk reserve for its own records, admission and health.

Two ways the daemon used to fail under exhaustion: every mutating call of every tenant
answered "database or disk is full" (INTERNAL) while health said SERVING, and the 1,997th
Create died at clone with EMFILE. `ResourceGuard` turns both into a clean refusal before the
kernel refuses:

* **Disk.** `<state>/.reserve` is a preallocated file of `reserve_bytes`. When the state
  filesystem has less than that free, the reserve is released (unlinked), so the audit log
  and the task store can still write the records of what is already running and of its
  end, and new work is refused (RESOURCE_EXHAUSTED) until at least twice the reserve is
  free again; then the reserve is taken back and the daemon serves. Inodes work the same
  way against `reserve_inodes` (nothing to release: inodes cannot be preallocated).
* **Descriptors.** Each Create, Exec and task costs a known number of descriptors here;
  admission refuses one that would leave fewer than `fd_reserve` free under RLIMIT_NOFILE
  (gRPC connections, SQLite and the daemon's own files need some).

`check()` (the daemon calls it every `interval_s` and after any exhaustion error) decides
`reason`, which health reports as NOT_SERVING and `statistics()` exposes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
from dataclasses import dataclass

from corral.sandbox.errors import ResourceExhausted

log = logging.getLogger("corral.resources")

#: Descriptors the daemon holds per idle sandbox (PID 1's pidfd and status pipe) plus what a
#: create opens for a moment (cgroup files, the init binary, open_tree clones, report pipe).
FDS_PER_SANDBOX = 12
#: Per command: stdin writer, stdout and stderr readers, pidfd, and transient pipe ends.
FDS_PER_EXEC = 8
#: Per deep task attempt followed by the daemon: the shim's pidfd and its notify FIFO.
FDS_PER_TASK = 4
RESERVE_NAME = ".reserve"
#: New work is refused below this much free space even without a reserve (--disk-reserve 0).
MIN_FREE_BYTES = 1 << 20


def open_fds() -> int:
    """Descriptors open in this process (one readdir of /proc/self/fd: ~1 us per entry)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:
        return 0


def fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass(frozen=True)
class FsFree:
    path: str
    free_bytes: int  # available to unprivileged writers (f_bavail), reserve file excluded
    free_inodes: int
    total_bytes: int


def fs_free(path: str) -> FsFree:
    st = os.statvfs(path)
    return FsFree(path, st.f_bavail * st.f_frsize, st.f_favail, st.f_blocks * st.f_frsize)


class ResourceGuard:
    """Admission and health from free disk, inodes and descriptors; thread-safe."""

    def __init__(self, state_dir: str, *, extra_paths: tuple[str, ...] = (),
                 reserve_bytes: int | None = None, reserve_inodes: int = 256,
                 fd_reserve: int | None = None):
        self.state_dir = state_dir
        self.extra_paths = tuple(p for p in extra_paths if p)
        total = fs_free(state_dir).total_bytes
        # 64 MiB, or a twentieth of a small filesystem (a test's tmpfs)
        self.reserve_bytes = (reserve_bytes if reserve_bytes is not None
                              else min(64 << 20, total // 20))
        self.reserve_inodes = reserve_inodes
        self._fd_reserve = fd_reserve
        self.reserve_path = os.path.join(state_dir, RESERVE_NAME)
        self.reason = ""  # why health says NOT_SERVING; "" while serving
        self.disk_reason = ""  # the part of it that refuses every new sandbox, exec, task
        self.reserve_released = 0  # times the reserve was given up
        self._lock = threading.Lock()
        self._fds_at_check = open_fds()
        self._fds_admitted = 0  # descriptors admitted since the last count
        self._last: dict = {}

    # -- descriptors ---------------------------------------------------------------------------

    @property
    def fd_reserve(self) -> int:
        """Descriptors kept for the daemon itself: 256, or a quarter of a low limit."""
        if self._fd_reserve is not None:
            return self._fd_reserve
        return min(256, fd_limit() // 4)

    def admit(self, kind: str) -> None:
        """Refuse new work (kind: sandbox, exec, task) the daemon cannot afford.

        Raises:
            ResourceExhausted: the state disk is full, or the descriptors it needs would eat
                into the daemon's own reserve.
        """
        if self.disk_reason:
            raise ResourceExhausted(f"cannot start a new {kind}: {self.disk_reason}")
        cost = {"sandbox": FDS_PER_SANDBOX, "exec": FDS_PER_EXEC}.get(kind, FDS_PER_TASK)
        limit = fd_limit()
        with self._lock:
            estimate = self._fds_at_check + self._fds_admitted
            if estimate + cost + self.fd_reserve > limit:
                # near the limit the estimate is not good enough: count (a few ms)
                self._fds_at_check, self._fds_admitted = open_fds(), 0
                estimate = self._fds_at_check
            if estimate + cost + self.fd_reserve > limit:
                raise ResourceExhausted(
                    f"cannot start a new {kind}: the daemon has {estimate} of its "
                    f"{limit} descriptors open (RLIMIT_NOFILE) and keeps {self.fd_reserve} "
                    "for itself; end idle sandboxes or sessions, or raise the daemon's "
                    "descriptor limit (LimitNOFILE=, prlimit)")
            self._fds_admitted += cost

    # -- disk ----------------------------------------------------------------------------------

    def take_reserve(self) -> None:
        """Preallocate the reserve file (on start and when space came back)."""
        if self.reserve_bytes <= 0 or os.path.exists(self.reserve_path):
            return
        tmp = self.reserve_path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning("cannot preallocate the disk reserve %s (%d bytes): %s",
                        self.reserve_path, self.reserve_bytes, exc.strerror)

    def release_reserve(self) -> bool:
        """Give the reserve's space to the audit log and task store; True if it was held."""
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        self.reserve_released += 1
        log.warning("released the disk reserve %s (%d bytes) so the daemon's records can "
                    "still be written", self.reserve_path, self.reserve_bytes)
        return True

    # -- the periodic check ----------------------------------------------------------------------

    def check(self) -> str:
        """Look at disk, inodes and descriptors now; returns (and sets) the refusal reason."""
        reasons = []
        fses = []
        seen = set()
        for path in (self.state_dir, *self.extra_paths):
            try:
                free = fs_free(path)
                dev = os.stat(path).st_dev
            except OSError:
                continue
            if dev in seen:
                continue
            seen.add(dev)
            fses.append(free)
        held = os.path.exists(self.reserve_path)
        for i, free in enumerate(fses):
            state_fs = i == 0
            # refused below the reserve; back only with twice the reserve (hysteresis)
            # without its reserve (released, or never taken) the daemon needs room for it
            # twice over before it serves: the reserve is taken back first
            recovering = self.disk_reason or (state_fs and self.reserve_bytes > 0 and not held)
            need = max(self.reserve_bytes, MIN_FREE_BYTES) * (2 if recovering else 1)
            need_inodes = self.reserve_inodes * (2 if self.disk_reason else 1)
            if free.free_bytes < need:
                if state_fs and held and self.release_reserve():
                    held = False
                reasons.append(f"filesystem of {free.path} has {free.free_bytes} bytes free, "
                               f"less than the {need} the daemon keeps free (--disk-reserve); "
                               "free space there")
            elif free.free_inodes < need_inodes:
                reasons.append(f"filesystem of {free.path} has {free.free_inodes} inodes free, "
                               f"below {need_inodes}; remove files there")
        disk_reason = "; ".join(reasons)
        with self._lock:
            self._fds_at_check, self._fds_admitted = open_fds(), 0
            fds = self._fds_at_check
        limit = fd_limit()
        # not serving once a new sandbox would be refused (commands may still fit)
        if fds + FDS_PER_SANDBOX + self.fd_reserve > limit:
            reasons.append(f"{fds} of {limit} descriptors open (RLIMIT_NOFILE), too few left "
                           f"beside the {self.fd_reserve} kept for the daemon for a new "
                           "sandbox; end idle sandboxes or raise the limit")
        reason = "; ".join(reasons)
        # retaken only with room for it twice over, or it would be released at once
        if not disk_reason and not held and fses and fses[0].free_bytes >= 2 * self.reserve_bytes:
            self.take_reserve()
        # logged when the state changes, not each time the figures in the reason move
        if (bool(reason), bool(disk_reason)) != (bool(self.reason), bool(self.disk_reason)):
            if disk_reason:
                log.error("refusing new sandboxes, commands and tasks: %s", reason)
            elif reason:
                log.error("refusing new sandboxes: %s", reason)
            else:
                log.warning("serving again: %s recovered", self.reason)
        self.reason, self.disk_reason = reason, disk_reason
        self._last = {"fses": fses, "fds": fds, "fd_limit": limit}
        return reason

    def statistics(self) -> dict:
        """Figures for metrics: the reason (empty while serving), free space, descriptors."""
        last = self._last
        stats = {
            "serving": not self.reason,
            "reason": self.reason,
            "fds_open": last.get("fds", 0),
            "fd_limit": last.get("fd_limit", fd_limit()),
            "fd_reserve": self.fd_reserve,
            "disk_reserve_bytes": self.reserve_bytes,
            "disk_reserve_held": os.path.exists(self.reserve_path),
            "disk_reserve_released": self.reserve_released,
        }
        for free in last.get("fses", ()):
            key = "state" if free.path == self.state_dir else free.path
            stats[f"{key}_free_bytes"] = free.free_bytes
            stats[f"{key}_free_inodes"] = free.free_inodes
        return stats

