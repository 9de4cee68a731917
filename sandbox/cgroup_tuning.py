"""Make moving a process into a cgroup cheap: the cgroup2 `favordynmods` flag.

Why. Every sandbox start moves its PID 1 into the sandbox's cgroup, and every exec moves its
process (cgroup.procs writes). A move takes the kernel's `cgroup_threadgroup_rwsem` for
writing. That lock is a per-CPU rwsem kept in its fast (reader) mode while no move happens,
so the first writer after a quiet spell waits out a whole RCU grace period: measured here
14.5 ms p50 for an attach after 0.1 s idle against 0.3 ms back to back (bench/spawn.py's
`cgroup_attach`). Sporadic use, the common case of an interactive runtime, pays it on
nearly every spawn, and it swings with how idle the host is. v2's CLONE_INTO_CGROUP does not
help on a v1 host (it is v2 only), and the v1 hierarchies themselves refuse to change the
flag on remount.

What. `favordynmods` (Linux 6.0) is a flag of the cgroup2 (default) hierarchy's root, and
the lock it changes is shared by every hierarchy, v1 included: with it the lock stays in its
slow mode (and, from Linux 6.18, moves take a per-threadgroup lock instead), so a move never
waits for a grace period. The price, as the kernel documents it: forks and exits take that
slower path. Measured here: an attach after idle drops to about 0.45 ms. From Linux 6.18 the
flag cannot be turned off again until reboot (the kernel logs "can't be disabled"); before
that a remount without it turns it off.

How. `ensure()` remounts the first cgroup2 mount it finds with its own superblock options
plus `favordynmods`, keeping its per-mount flags (a cgroup2 reconfigure applies exactly the
options it is given, so leaving out e.g. `nsdelegate` would turn that off for the whole
host). With no cgroup2 mounted at all it does nothing rather than mount one: a fresh mount
would reset the root's other flags the same way. It runs once per process, as root only,
unless turned off: `CORRAL_CGROUP_FAVORDYNMODS=0` in the environment, or `configure(False)`
(the daemon's `cgroup_favordynmods = false`). `outcome()` says what happened; the daemon
puts it in its `daemon.start` audit record and `corral doctor` reports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from dataclasses import dataclass

FLAG = "favordynmods"
ENV = "CORRAL_CGROUP_FAVORDYNMODS"

_MS_REMOUNT = 0x20
#: Per-mount options of /proc/self/mountinfo and their mount(2) bits: a remount replaces a
#: mount's flags with exactly those it is given, so each one the mount has is passed again.
_PER_MOUNT_FLAGS = {
    "ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x400,
    "nodiratime": 0x800, "relatime": 1 << 21, "strictatime": 1 << 24,
}


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup2 line of /proc/self/mountinfo."""

    point: str
    source: str
    #: Options of this mount (rw, nosuid, relatime...).
    mount_options: tuple[str, ...]
    #: Options of the hierarchy itself (rw, nsdelegate, favordynmods...).
    super_options: tuple[str, ...]

    def remount_args(self) -> tuple[int, str]:
        """The flags and data of a remount that keeps everything and adds the flag."""
        flags = _MS_REMOUNT
        for opt in self.mount_options:
            flags |= _PER_MOUNT_FLAGS.get(opt, 0)
        kept = [o for o in self.super_options if o not in ("rw", "ro", FLAG)]
        return flags, ",".join([*kept, FLAG])


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def cgroup2_mounts(mountinfo: str) -> list[CgroupMount]:
    """The cgroup2 mounts of a /proc/PID/mountinfo text, in order."""
    found = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 3 or rest[0] != "cgroup2":
            continue
        found.append(CgroupMount(point=_unescape(fields[4]), source=_unescape(rest[1]),
                                 mount_options=tuple(fields[5].split(",")),
                                 super_options=tuple(rest[2].split(","))))
    return found


def is_on(mountinfo: str) -> bool:
    """Whether the cgroup2 root carries the flag (every cgroup2 mount shows the root's)."""
    return any(FLAG in m.super_options for m in cgroup2_mounts(mountinfo))


def _read_mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def _remount(mount: CgroupMount) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    flags, data = mount.remount_args()
    if libc.mount(mount.source.encode(), mount.point.encode(), b"cgroup2",
                  ctypes.c_ulong(flags), data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), mount.point)


def enable(mountinfo: str | None = None) -> str:
    """Turn the flag on now. Returns the outcome: "on" (done now), "already", or a
    sentence starting "off: " that says why it is not on. Never raises."""
    text = _read_mountinfo() if mountinfo is None else mountinfo
    if is_on(text):
        return "already"
    mounts = cgroup2_mounts(text)
    if not mounts:
        return ("off: no cgroup2 hierarchy is mounted here (a new mount would reset its "
                "other flags); boot with cgroup_favordynmods=true instead")
    if os.geteuid() != 0:
        return "off: only root may remount the cgroup2 hierarchy"
    try:
        _remount(mounts[0])
    except OSError as exc:
        why = ("this kernel has no favordynmods (Linux 6.0 brought it)"
               if exc.errno == errno.EINVAL else f"remount of {mounts[0].point}: {exc.strerror}")
        return f"off: {why}"
    return "on" if is_on(_read_mountinfo()) else "off: the remount did not keep the flag"


_lock = threading.Lock()
_wanted: bool | None = None
_outcome: str | None = None


def configure(wanted: bool) -> None:
    """Say whether `ensure()` may turn the flag on (the daemon's config); before ensure."""
    global _wanted
    _wanted = wanted


def ensure() -> str:
    """Once per process: turn the flag on unless turned off (configure, or the environment
    variable CORRAL_CGROUP_FAVORDYNMODS=0). Returns the outcome (see `enable`)."""
    global _outcome
    with _lock:
        if _outcome is None:
            wanted = (_wanted if _wanted is not None
                      else os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "no",
                                                                           "false"))
            if wanted:
                _outcome = enable()
            else:
                _outcome = ("already" if is_on(_read_mountinfo())
                            else "off: turned off by configuration")
        return _outcome


def outcome() -> str | None:
    """What `ensure()` did in this process, or None before it ran."""
    return _outcome
