"""Cgroup limits of a sandbox: detect v1 or unified v2, plan the writes, apply, kill, remove.

Shape (nsjail's cgroup.cc / cgroup2.cc, bubblewrap's plan-then-execute):

- `detect()` runs once at daemon start and returns a `CgroupLayout`. The parsing underneath
  (`layout_from_text`) takes text plus two probe callables, so v1, v2 and hybrid hosts are
  unit-tested without a kernel.
- `plan(layout, name, limits)` is pure: the ordered `Mkdir` / `Write` ops that make
  `<group>/<name>` (`corral/<name>` by default) for that cgroup version.
- `Cgroup.create()` applies the plan; `attach`, `freeze`, `kill`, `destroy` act on the result.
  In the sandbox's verbs: prepare = `plan`, setup_from_parent = `create` + `attach`,
  teardown = `destroy`.

Where the cgroups live
  v1: `<mount of each controller>/<group>/<name>`, one directory per hierarchy: memory, pids,
      cpu, freezer, and cpuacct when it is mounted apart from cpu (it only feeds `stats()`).
  v2: `<P>/<group>/<name>`, where P is the root of the unified mount when we may write its
      `cgroup.subtree_control` (a root daemon on a host: the root is exempt from v2's "no
      internal processes" rule, so enabling controllers there always works and nothing of
      systemd's is touched), otherwise the parent of the daemon's own cgroup (a delegated
      subtree, e.g. `user@1000.service/app.slice`). Never the daemon's own cgroup: it holds the
      daemon, and v2 refuses to enable controllers for the children of a cgroup that has
      processes (EBUSY). A group itself never holds processes; only its children do.
      Inside a container whose cgroup namespace root holds processes, enabling controllers
      there fails with EBUSY; the error says how to move them into a leaf first.
  The group is `corral/` for sandboxes and sessions, and `corral-batch/` beside it for batch
  work (deep tasks: `SandboxSpec.batch`). Being siblings at the top, each group competes for
  contended CPU as one entity with the host's other top-level groups and processes (the
  daemon, its clients): the batch group's weight (`make_group`, the daemon's
  task_cpu_weight) bounds all batch work together, however many tasks run. A weight inside
  `corral/` could not: it orders a cgroup only against its siblings there.

Cgroup namespace: the parent calls `attach(pid)` while the child still waits on its sync pipe,
before the child runs `unshare(CLONE_NEWCGROUP)`. A cgroup namespace is rooted at the cgroup
its creator is in at that moment, so the sandbox then sees its own cgroup as "/" and nothing of
the host's tree. Attaching after the unshare would root the namespace at the daemon's cgroup.

Every kernel failure raises `SandboxSetupError(step, path, errno)` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import math
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from corral.sandbox.errors import InvalidSpec, NotFound, SandboxSetupError, UnsupportedHost
from corral.sandbox.procinfo import read_or_none

#: Name of the directory, in each hierarchy, that holds the sandbox cgroups (the default group).
CORRAL_DIR = "corral"
#: The group beside it that holds batch work (deep tasks' sandboxes and their shims).
BATCH_DIR = "corral-batch"
GROUPS = (CORRAL_DIR, BATCH_DIR)
#: CFS period of every CPU quota, in microseconds: v1 leaves it at a new cgroup's default,
#: which is this; v2 writes it in cpu.max.
CFS_PERIOD_US = 100_000
#: Smallest memory limit accepted, in bytes.
MIN_MEMORY_BYTES = 1 << 20
#: Smallest CPU quota accepted, in CPUs: the kernel rejects a quota under 1 ms (EINVAL).
MIN_CPUS = 0.01

V1_REQUIRED = ("memory", "pids", "cpu", "freezer")
V1_OPTIONAL = ("cpuacct",)
#: Freezing and killing are core files (cgroup.freeze, cgroup.kill) in v2, not a controller.
V2_REQUIRED = ("memory", "pids", "cpu")
V2_ENABLE = " ".join(f"+{c}" for c in V2_REQUIRED)

#: Controllers a v1 `cgroup` mount may carry in its options (everything else is a mount flag).
_V1_KNOWN = frozenset(
    "cpuset cpu cpuacct blkio memory devices freezer net_cls perf_event net_prio hugetlb "
    "pids rdma misc".split()
)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

FREEZE_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 10.0
RMDIR_TIMEOUT_S = 2.0


# -- what the host offers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mounts."""

    source: str
    point: str
    fstype: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class CgroupLayout:
    """The host's cgroup hierarchy as Corral uses it; made by `detect()`."""

    #: 1 (one hierarchy per controller) or 2 (unified).
    version: int
    #: v1: controller -> its mount point (memory, pids, cpu, freezer; cpuacct if mounted).
    controllers: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: v2: mount point of the unified hierarchy.
    root: str | None = None
    #: v2: directory that holds `corral/` (the root, or the parent of the daemon's cgroup);
    #: defaults to the root.
    parent: str | None = None
    #: The daemon's own cgroup per controller, as /proc/self/cgroup says; v2's line is under "".
    own: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: v1: the memory controller has memory.memsw.* (swap accounting), so swap can be capped.
    has_memsw: bool = False
    #: The directory, at the top of each hierarchy (v2: in parent), that holds the cgroups
    #: made through this layout: one of GROUPS (`in_group`).
    group: str = CORRAL_DIR

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"a cgroup group is one of {GROUPS}, not {self.group!r}")
        if self.version == 2:
            if not self.root:
                raise ValueError("a v2 CgroupLayout needs the unified mount point as root")
            if self.parent is None:
                object.__setattr__(self, "parent", self.root)
        elif self.version == 1:
            missing = [c for c in V1_REQUIRED if c not in self.controllers]
            if missing:
                raise ValueError(f"a v1 CgroupLayout needs mount points for {missing}")
        else:
            raise ValueError(f"cgroup version must be 1 or 2, not {self.version!r}")

    def in_group(self, group: str) -> CgroupLayout:
        """The same hierarchies, making cgroups in `group` (one of GROUPS)."""
        return self if group == self.group else dataclasses.replace(self, group=group)

    def bases(self) -> dict[str, str]:
        """Controller -> the group's directory in its hierarchy (v2: one for all)."""
        if self.version == 2:
            base = os.path.join(self.parent, self.group)
            return {c: base for c in (*V2_REQUIRED, "freezer")}
        return {c: os.path.join(mnt, self.group) for c, mnt in self.controllers.items()}


def _unescape(field_: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/self/mounts text into `Mount`s, in order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mounts.append(
            Mount(
                _unescape(fields[0]), _unescape(fields[1]), fields[2], tuple(fields[3].split(","))
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Parse /proc/<pid>/cgroup text into {controller: path}; the v2 line `0::path` is under ""."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            own[""] = path
            continue
        for controller in controllers.split(","):
            if controller:
                own[controller] = path
    return own


def choose_v2_parent(root: str, own_path: str | None, root_writable: bool) -> str:
    """The directory that holds `corral/` on v2 (see the module docstring for why)."""
    if root_writable or not own_path or own_path == "/" or own_path.startswith("/.."):
        # "/.." means the daemon sits outside the mounted namespace root: only the root is known.
        return root
    parent = os.path.dirname(own_path.rstrip("/")).lstrip("/")
    return os.path.join(root, parent) if parent else root


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK)


def layout_from_text(
    mounts_text: str,
    cgroup_text: str,
    *,
    read_file: Callable[[str], str | None] = read_or_none,
    writable: Callable[[str], bool] = _writable,
) -> CgroupLayout:
    """Decide the layout from /proc/self/mounts and /proc/self/cgroup text.

    v1 wins when all its required controllers are mounted (a hybrid host with an empty
    unified mount is v1); otherwise the unified mount must offer memory, pids and cpu.

    Args:
        read_file: returns a file's text or None if absent (probes memsw, cgroup.controllers).
        writable: whether a path may be written (decides the v2 parent).
    Raises:
        UnsupportedHost: neither version offers the required controllers.
    """
    mounts = parse_mounts(mounts_text)
    own = parse_proc_cgroup(cgroup_text)

    v1: dict[str, str] = {}
    for m in mounts:
        if m.fstype == "cgroup":
            for opt in m.options:
                if opt in _V1_KNOWN and opt not in v1:
                    v1[opt] = m.point
    missing_v1 = [c for c in V1_REQUIRED if c not in v1]
    if not missing_v1:
        controllers = {c: v1[c] for c in (*V1_REQUIRED, *V1_OPTIONAL) if c in v1}
        memsw = os.path.join(v1["memory"], "memory.memsw.limit_in_bytes")
        return CgroupLayout(
            version=1, controllers=controllers, own=own, has_memsw=read_file(memsw) is not None
        )

    unified_points = [m.point for m in mounts if m.fstype == "cgroup2"]
    offered: list[str] = []
    parent = None
    if unified_points:
        root = "/sys/fs/cgroup" if "/sys/fs/cgroup" in unified_points else unified_points[0]
        parent = choose_v2_parent(
            root, own.get(""), writable(os.path.join(root, "cgroup.subtree_control"))
        )
        offered = (read_file(os.path.join(parent, "cgroup.controllers")) or "").split()
        if all(c in offered for c in V2_REQUIRED):
            return CgroupLayout(version=2, root=root, parent=parent, own=own)

    if not v1 and not unified_points:
        raise UnsupportedHost(
            "no cgroup filesystem is mounted (per /proc/self/mounts); mount the unified "
            "hierarchy with `mount -t cgroup2 none /sys/fs/cgroup`"
        )
    found_v1 = ", ".join(c for c in V1_REQUIRED if c in v1) or "none"
    v2_part = (
        f"{os.path.join(parent, 'cgroup.controllers')} offers: {' '.join(offered) or 'nothing'}"
        if parent
        else "no cgroup2 mount"
    )
    raise UnsupportedHost(
        "cgroup controllers missing: Corral needs memory, pids, cpu and freezer on cgroup v1 "
        f"(mounted: {found_v1}; missing: {', '.join(missing_v1)}) or memory, pids and cpu on "
        f"cgroup v2 ({v2_part}); mount the missing v1 controllers (e.g. `mkdir -p "
        f"/sys/fs/cgroup/{missing_v1[0]} && mount -t cgroup -o {missing_v1[0]} cgroup "
        f"/sys/fs/cgroup/{missing_v1[0]}`) or boot with systemd.unified_cgroup_hierarchy=1"
    )


def detect(
    proc_mounts: str = "/proc/self/mounts", proc_cgroup: str = "/proc/self/cgroup"
) -> CgroupLayout:
    """Read the host's cgroup layout (once, at daemon start).

    Raises:
        UnsupportedHost: /proc is unreadable or the required controllers are missing.
    """
    texts = []
    for path in (proc_mounts, proc_cgroup):
        try:
            with open(path) as f:
                texts.append(f.read())
        except OSError as e:
            raise UnsupportedHost(f"cannot read {path}: {e.strerror}; is /proc mounted?") from None
    return layout_from_text(texts[0], texts[1])


#: The line an unprivileged caller sees (stderr, `corral inspect`) where it has no cgroup.
NO_DELEGATION = "no delegated cgroup: memory/pids/cpu limits not applied; rlimits only"


def delegation_problem(layout: CgroupLayout) -> str | None:
    """Why this process cannot make cgroups under the layout, or None when it can.

    Root can. Anyone else needs a subtree it may write: on v2 a delegated one (systemd's
    `Delegate=yes`, e.g. `systemd-run --user --scope -p Delegate=yes corral ...`); v1 has
    no safe delegation, so an unprivileged caller never has cgroups there.
    """
    if os.geteuid() == 0:
        return None
    if layout.version == 1:
        closed = [path for path in (b if os.path.isdir(b) else os.path.dirname(b)
                                    for b in layout.bases().values())
                  if not os.access(path, os.W_OK)]
        if closed:
            return (f"cgroup v1: {closed[0]} is not writable by uid {os.geteuid()} (v1 "
                    f"cannot be delegated to an unprivileged user)")
        return None
    parent = layout.parent or layout.root
    for path in (parent, os.path.join(parent, "cgroup.subtree_control")):
        if not os.access(path, os.W_OK):
            return (f"cgroup v2: {path} is not writable by uid {os.geteuid()}; run under a "
                    f"delegated scope (systemd-run --user --scope -p Delegate=yes)")
    return None


# -- what a sandbox asks for -------------------------------------------------------------------


def shares_of_weight(weight: int) -> int:
    """cgroup v1's cpu.shares for a v2 cpu.weight: 100 -> 1024, never below v1's minimum 2."""
    return max(2, round(weight * 1024 / 100))


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits of one sandbox; None means unlimited. Swap is always off."""

    #: In bytes; at least MIN_MEMORY_BYTES. Memory + swap is capped at the same value.
    memory_bytes: int | None = None
    #: Tasks (processes and threads) in the whole sandbox; at least 1.
    pids_max: int | None = None
    #: In CPUs (0.5 = half of one CPU) per CFS_PERIOD_US; at least MIN_CPUS.
    cpu_quota: float | None = None
    #: Share of contended CPU against sibling cgroups, on v2's cpu.weight scale (1..10000,
    #: default 100); v1 writes cpu.shares = weight * 1024 / 100 (at least 2).
    cpu_weight: int | None = None

    def __post_init__(self) -> None:
        m = self.memory_bytes
        if m is not None:
            if not isinstance(m, int) or isinstance(m, bool):
                raise InvalidSpec("memory_bytes", f"must be a whole number of bytes, got {m!r}")
            if m < MIN_MEMORY_BYTES:
                raise InvalidSpec(
                    "memory_bytes", f"{m} is below the 1 MiB minimum; use e.g. {64 << 20} (64M)"
                )
        p = self.pids_max
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise InvalidSpec("pids_max", f"must be a positive whole number, got {p!r}")
        c = self.cpu_quota
        if c is not None:
            if not isinstance(c, int | float) or isinstance(c, bool) or not math.isfinite(c):
                raise InvalidSpec("cpu_quota", f"must be a number of CPUs, got {c!r}")
            if c < MIN_CPUS:
                raise InvalidSpec(
                    "cpu_quota", f"must be at least {MIN_CPUS} CPUs, got {c!r}; use e.g. 0.5"
                )

        w = self.cpu_weight
        if w is not None and (not isinstance(w, int) or isinstance(w, bool)
                              or not 1 <= w <= 10_000):
            raise InvalidSpec("cpu_weight", f"must be a whole number from 1 to 10000, got {w!r}")

    @property
    def cpu_shares(self) -> int | None:
        """v1's cpu.shares for cpu_weight (1024 = the default weight 100), or None."""
        return None if self.cpu_weight is None else shares_of_weight(self.cpu_weight)

    @property
    def cfs_quota_us(self) -> int | None:
        """The quota in microseconds per CFS_PERIOD_US, or None when unlimited."""
        if self.cpu_quota is None:
            return None
        # round, not int: 0.29 * 100000 is 28999.999...
        return round(self.cpu_quota * CFS_PERIOD_US)


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mkdir:
    path: str
    #: True for a group's shared directories; a sandbox's own directory must be new.
    exist_ok: bool = False


@dataclass(frozen=True)
class Write:
    path: str
    value: str
    #: Skip when the file does not exist (a kernel built or booted without that knob).
    optional: bool = False


CgroupOp = Mkdir | Write


def check_name(name: str) -> None:
    """A sandbox cgroup name is one path component of [A-Za-z0-9_.-], at most 128 bytes.

    Raises:
        InvalidSpec: the name could escape `corral/` or is empty.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidSpec(
            "name",
            f"cgroup name {name!r} must be 1-128 characters of A-Z a-z 0-9 _ . - "
            "and not start with '.' or '-'",
        )


def _v1_dirs(layout: CgroupLayout) -> dict[str, str]:
    """Controller -> mount point, one entry per distinct hierarchy (cpu,cpuacct co-mounted)."""
    seen: dict[str, str] = {}
    for controller, mnt in layout.controllers.items():
        if mnt not in seen.values():
            seen[controller] = mnt
    return seen


def plan(layout: CgroupLayout, name: str, limits: CgroupLimits, *,
         with_group: bool = True) -> list[CgroupOp]:
    """The ordered ops that create `<group>/<name>` with `limits`; pure, touches nothing.
    Without with_group, not the ops that make the group itself (`group_plan`'s: its
    directories, v2's controllers enabled for its children), for a group known to exist.

    Raises:
        InvalidSpec: a bad name.
    """
    check_name(name)
    if layout.version == 1:
        return _plan_v1(layout, name, limits, with_group)
    return _plan_v2(layout, name, limits, with_group)


def group_plan(layout: CgroupLayout, cpu_weight: int | None = None) -> list[CgroupOp]:
    """The ops that make the layout's group (v2: with the controllers enabled for its
    children), then, with cpu_weight, set the group's own weight; pure."""
    if layout.version == 1:
        ops: list[CgroupOp] = [Mkdir(os.path.join(mnt, layout.group), exist_ok=True)
                               for mnt in _v1_dirs(layout).values()]
    else:
        base = os.path.join(layout.parent, layout.group)
        ops = [
            # Enabling an already enabled controller is a no-op: every create may repeat it.
            Write(os.path.join(layout.parent, "cgroup.subtree_control"), V2_ENABLE),
            Mkdir(base, exist_ok=True),
            Write(os.path.join(base, "cgroup.subtree_control"), V2_ENABLE),
        ]
    if cpu_weight is not None:
        ops.append(Write(*_weight_knob(layout.version, layout.bases()["cpu"], cpu_weight)))
    return ops


def _weight_knob(version: int, cpu_dir: str, weight: int | None) -> tuple[str, str]:
    """(file, value) that sets the cgroup at cpu_dir to weight (None: the ordinary 100):
    v1 cpu.shares in proportion, v2 cpu.weight."""
    limits = CgroupLimits(cpu_weight=100 if weight is None else weight)
    if version == 1:
        return os.path.join(cpu_dir, "cpu.shares"), str(limits.cpu_shares)
    return os.path.join(cpu_dir, "cpu.weight"), str(limits.cpu_weight)


def _plan_v1(layout: CgroupLayout, name: str, limits: CgroupLimits,
             with_group: bool = True) -> list[CgroupOp]:
    ops: list[CgroupOp] = []
    for mnt in _v1_dirs(layout).values():
        if with_group:
            ops.append(Mkdir(os.path.join(mnt, layout.group), exist_ok=True))
        ops.append(Mkdir(os.path.join(mnt, layout.group, name)))
    leaf = {c: os.path.join(mnt, layout.group, name) for c, mnt in layout.controllers.items()}

    mem = leaf["memory"]
    if limits.memory_bytes is not None:
        # limit_in_bytes first: the kernel keeps memsw >= limit at every moment.
        ops.append(Write(os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_bytes)))
        if layout.has_memsw:
            ops.append(
                Write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(limits.memory_bytes))
            )
    # A memcg with swappiness 0 never swaps (since 3.5), with or without memsw accounting.
    ops.append(Write(os.path.join(mem, "memory.swappiness"), "0"))
    # 0 = the OOM killer stays on: a balloon is killed, not left hanging under_oom.
    ops.append(Write(os.path.join(mem, "memory.oom_control"), "0"))
    if limits.pids_max is not None:
        ops.append(Write(os.path.join(leaf["pids"], "pids.max"), str(limits.pids_max)))
    if limits.cfs_quota_us is not None:
        # No cpu.cfs_period_us write: a new cgroup's period is already CFS_PERIOD_US (the
        # kernel's default_cfs_period), and every bandwidth write walks every task group
        # of the host (tg_set_cfs_bandwidth's schedulability check): one walk, not two.
        ops.append(Write(os.path.join(leaf["cpu"], "cpu.cfs_quota_us"), str(limits.cfs_quota_us)))
    if limits.cpu_shares is not None:
        ops.append(Write(os.path.join(leaf["cpu"], "cpu.shares"), str(limits.cpu_shares)))
    return ops


def _plan_v2(layout: CgroupLayout, name: str, limits: CgroupLimits,
             with_group: bool = True) -> list[CgroupOp]:
    leaf = os.path.join(layout.parent, layout.group, name)
    ops = [*(group_plan(layout) if with_group else ()), Mkdir(leaf)]
    if limits.memory_bytes is not None:
        ops.append(Write(os.path.join(leaf, "memory.max"), str(limits.memory_bytes)))
    # Absent when the kernel has no swap accounting (swapaccount=0, no CONFIG_SWAP).
    ops.append(Write(os.path.join(leaf, "memory.swap.max"), "0", optional=True))
    if limits.pids_max is not None:
        ops.append(Write(os.path.join(leaf, "pids.max"), str(limits.pids_max)))
    if limits.cfs_quota_us is not None:
        ops.append(Write(os.path.join(leaf, "cpu.max"), f"{limits.cfs_quota_us} {CFS_PERIOD_US}"))
    if limits.cpu_weight is not None:
        ops.append(Write(os.path.join(leaf, "cpu.weight"), str(limits.cpu_weight)))
    return ops


# -- kernel I/O --------------------------------------------------------------------------------


def _hint(path: str, err: int) -> str:
    base = os.path.basename(path)
    if base == "cgroup.subtree_control" and err == _errno.EBUSY:
        return (
            "processes live in this cgroup and v2 enables controllers only for a cgroup "
            "without processes (the root excepted); move them into a leaf first, e.g. `mkdir "
            f"{os.path.dirname(path)}/init` and write each pid of cgroup.procs into "
            "init/cgroup.procs"
        )
    if base == "cgroup.subtree_control" and err == _errno.ENOENT:
        return (
            f"cgroup.controllers here does not offer all of {V2_ENABLE}; enable them in the "
            "parent's cgroup.subtree_control first"
        )
    if base == "cgroup.procs" and err == _errno.ESRCH:
        return "the process is gone"
    return ""


def _write(step: str, path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxSetupError(step, path, e.errno or _errno.EIO, _hint(path, e.errno)) from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        detail = _hint(path, e.errno) or f"writing {value!r}"
        raise SandboxSetupError(step, path, e.errno or _errno.EIO, detail) from None
    finally:
        os.close(fd)


def _read_keyed(path: str) -> dict[str, int]:
    """Read a 'key value' per line file (memory.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in (read_or_none(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_int(path: str) -> int | None:
    text = read_or_none(path)
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _rmdir_tree(path: str, retry_s: float) -> bool:
    """rmdir `path` and any child cgroups, deepest first; False if a process still holds one.

    Retries EBUSY for `retry_s` (a killed task leaves its cgroup a moment after it dies).
    Raises SandboxSetupError for anything but EBUSY and ENOENT.
    """
    if not os.path.isdir(path):
        return True
    children = [root for root, _dirs, _files in os.walk(path, topdown=False)]
    deadline = time.monotonic() + retry_s
    pause = 0.001
    for d in children:
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != _errno.EBUSY:
                    raise SandboxSetupError("cgroup rmdir", d, e.errno) from None
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
    return True


#: Bytes a renewed memory cgroup may still have charged when it is handed out, at most:
#: kernel caches of host files its last user looked up (sandbox/cgroup_pool.py).
RENEW_RESIDUAL_BYTES = 1 << 20
#: The memory cgroup's peaks and fail counts that Cgroup.renew writes back to zero (a peak
#: restarts from the usage left); absent ones are skipped.
RENEWED_MEMORY_COUNTERS = (
    "memory.max_usage_in_bytes", "memory.failcnt",
    "memory.memsw.max_usage_in_bytes", "memory.memsw.failcnt",
    "memory.kmem.max_usage_in_bytes", "memory.kmem.failcnt",
    "memory.kmem.tcp.max_usage_in_bytes", "memory.kmem.tcp.failcnt",
)


# -- the applied cgroup ------------------------------------------------------------------------


def _apply(ops: list[CgroupOp]) -> None:
    """Carry out a plan; on failure remove the directories it made (not the shared ones of
    a group), then raise SandboxSetupError (EEXIST: a new directory's name is taken)."""
    made: list[str] = []
    try:
        for op in ops:
            if isinstance(op, Mkdir):
                try:
                    os.mkdir(op.path, 0o755)
                except FileExistsError:
                    if not op.exist_ok:
                        raise SandboxSetupError("cgroup mkdir", op.path, _errno.EEXIST,
                                                "a cgroup of that name exists") from None
                    continue
                except OSError as e:
                    raise SandboxSetupError("cgroup mkdir", op.path, e.errno) from None
                if not op.exist_ok:
                    made.append(op.path)
            elif op.optional and not os.path.exists(op.path):
                continue
            else:
                _write("cgroup write", op.path, op.value)
    except SandboxSetupError:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def make_group(layout: CgroupLayout, cpu_weight: int | None = None) -> None:
    """Make the layout's group where it is missing and, with cpu_weight, set the weight
    of the group as a whole (`group_plan`).

    Raises:
        SandboxSetupError: a mkdir or write failed.
    """
    _apply(group_plan(layout, cpu_weight))


def recorded(layout: CgroupLayout, state: Mapping | None, sandbox_id: str) -> Cgroup:
    """The existing cgroup a sandbox's state.json names: "cgroup" (its id, or a pooled
    cgroup's name) in the group "cgroup_group" (CORRAL_DIR when absent, as older states
    are). Raises NotFound when it is gone."""
    state = state or {}
    group = state.get("cgroup_group") or CORRAL_DIR
    if group not in GROUPS:
        raise NotFound(f"sandbox {sandbox_id}: its state names an unknown cgroup group "
                       f"{group!r}")
    return Cgroup.open(layout.in_group(group), state.get("cgroup") or sandbox_id)


#: The groups (their directories, by controller) this process made or found: a create
#: skips their ops (Cgroup.create). A set's add and discard are atomic.
_GROUPS_MADE: set[tuple] = set()


class Cgroup:
    """The cgroup `<group>/<name>` of one sandbox, in every hierarchy the layout uses."""

    def __init__(self, layout: CgroupLayout, name: str):
        """Address an existing or planned cgroup; use `create` or `open` instead."""
        check_name(name)
        self.layout = layout
        self.name = name
        self._dir = {c: os.path.join(base, name) for c, base in layout.bases().items()}

    # -- lifecycle --

    @classmethod
    def create(cls, layout: CgroupLayout, name: str, limits: CgroupLimits) -> Cgroup:
        """Apply `plan(layout, name, limits)`; on failure remove what was made, then raise.

        The group's own ops are skipped once this process made or found the group (v1: a
        mkdir per hierarchy; v2: a mkdir and two cgroup.subtree_control writes, under the
        kernel's cgroup mutex), on every create after the first. Where the group went
        meanwhile (removed, or its controllers disabled), the leaf's first op fails
        ENOENT: the group is made again and the create tried once more.

        Raises:
            SandboxSetupError: a mkdir or write failed (EEXIST: the name is taken).
        """
        key = tuple(sorted(layout.bases().items()))  # the group's own directories
        if key in _GROUPS_MADE:
            try:
                _apply(plan(layout, name, limits, with_group=False))
                return cls(layout, name)
            except SandboxSetupError as exc:
                if exc.errno != _errno.ENOENT:
                    raise
                _GROUPS_MADE.discard(key)
        _apply(plan(layout, name, limits))
        _GROUPS_MADE.add(key)
        return cls(layout, name)

    @classmethod
    def open(cls, layout: CgroupLayout, name: str) -> Cgroup:
        """Adopt an existing `<group>/<name>` (after a daemon restart, or to reap it).

        Raises:
            NotFound: no hierarchy has that cgroup.
        """
        cg = cls(layout, name)
        if not cg.exists():
            raise NotFound(f"no cgroup {layout.group}/{name} in {', '.join(cg.paths)}")
        return cg

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.paths)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"Cgroup(v{self.layout.version}, {self.name!r})"

    @property
    def paths(self) -> tuple[str, ...]:
        """The distinct directories of this cgroup (v1: one per hierarchy; v2: one)."""
        return tuple(dict.fromkeys(self._dir.values()))

    def path(self, controller: str) -> str:
        """The directory of this cgroup that `controller` acts on (v2: the one directory)."""
        return self._dir[controller]

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The cgroup.procs files a process must be written into to join this cgroup.

        On v2 a spawn path may instead open `path("memory")` and pass it to clone3 with
        CLONE_INTO_CGROUP, which places the child atomically.
        """
        return tuple(os.path.join(d, "cgroup.procs") for d in self.paths)

    # -- processes --

    def attach(self, pid: int) -> None:
        """Move process `pid` (all its threads) into this cgroup, in every hierarchy.

        Call it before the child unshares its cgroup namespace (see the module docstring).

        Raises:
            SandboxSetupError: the write failed (ESRCH: the process is gone).
        """
        for procs in self.procs_files:
            _write("cgroup attach", procs, str(pid))

    def pids(self) -> list[int]:
        """Processes in this cgroup (in any of its hierarchies), sorted; [] once it is gone."""
        found: set[int] = set()
        for procs in self.procs_files:
            found.update(int(p) for p in (read_or_none(procs) or "").split())
        return sorted(found)

    def freeze(self, timeout_s: float = FREEZE_TIMEOUT_S) -> None:
        """Stop every process of the cgroup; returns once the kernel reports them frozen.

        Raises:
            SandboxSetupError: the write failed, or ETIMEDOUT when a task would not freeze
                (one in uninterruptible sleep can hold it in FREEZING).
        """
        path, value = self._freeze_file(True)
        _write("cgroup freeze", path, value)
        if not self._wait_frozen(timeout_s):
            raise SandboxSetupError(
                "cgroup freeze", path, _errno.ETIMEDOUT, f"not frozen after {timeout_s} s"
            )

    def thaw(self) -> None:
        """Let the processes of a frozen cgroup run again."""
        path, value = self._freeze_file(False)
        _write("cgroup thaw", path, value)

    def set_cpu_weight(self, weight: int | None) -> None:
        """Change the live cgroup's share of contended CPU (CgroupLimits.cpu_weight; None:
        the ordinary weight 100, v1's 1024 shares).

        Raises:
            InvalidSpec: a weight out of 1..10000.
            SandboxSetupError: the write failed.
        """
        path, value = self._weight_file(weight)
        _write("cgroup write", path, value)

    def _weight_file(self, weight: int | None) -> tuple[str, str]:
        return _weight_knob(self.layout.version, self._dir["cpu"], weight)

    def _freeze_file(self, frozen: bool) -> tuple[str, str]:
        if self.layout.version == 1:
            return os.path.join(self._dir["freezer"], "freezer.state"), (
                "FROZEN" if frozen else "THAWED"
            )
        return os.path.join(self._dir["freezer"], "cgroup.freeze"), "1" if frozen else "0"

    def _is_frozen(self) -> bool:
        d = self._dir["freezer"]
        if self.layout.version == 1:
            return (read_or_none(os.path.join(d, "freezer.state")) or "").strip() == "FROZEN"
        return _read_keyed(os.path.join(d, "cgroup.events")).get("frozen") == 1

    def _wait_frozen(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        pause = 0.0005
        while not self._is_frozen():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return True

    def kill(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL every process of the cgroup, forks in flight and double-forked ones too.

        v2 with cgroup.kill (5.14+): one write, the kernel kills the subtree atomically.
        Otherwise: freeze (no task can fork while frozen), SIGKILL each pid in cgroup.procs,
        thaw (the signal is delivered on thaw), and repeat until cgroup.procs is empty.

        Raises:
            SandboxSetupError: EBUSY when processes remain after `timeout_s`.
        """
        if not self.exists():
            return
        deadline = time.monotonic() + timeout_s
        kill_file = self._kill_file()
        pause = 0.0005
        while True:
            left = self.pids()
            if not left:
                return
            if time.monotonic() >= deadline:
                raise SandboxSetupError(
                    "cgroup kill",
                    self.paths[0],
                    _errno.EBUSY,
                    f"{len(left)} processes remain after {timeout_s} s: {left[:8]}",
                )
            if kill_file:
                _write("cgroup kill", kill_file, "1")
            else:
                self._freeze_and_kill(deadline)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _kill_file(self) -> str | None:
        """v2's cgroup.kill when this kernel has it (5.14+), else None."""
        if self.layout.version != 2:
            return None
        path = os.path.join(self._dir["freezer"], "cgroup.kill")
        return path if os.path.exists(path) else None

    def _freeze_and_kill(self, deadline: float) -> None:
        path, value = self._freeze_file(True)
        try:
            _write("cgroup kill", path, value)
            # Kill even if freezing stalls: a task stuck in D state must not stop the others.
            self._wait_frozen(max(0.0, min(FREEZE_TIMEOUT_S, deadline - time.monotonic())))
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            thaw_path, thaw_value = self._freeze_file(False)
            _write("cgroup kill", thaw_path, thaw_value)

    # -- accounting --

    def oom_kills(self) -> int:
        """How many tasks the OOM killer killed in this cgroup.

        v1 before 4.13 has no counter: 1 if the limit was hit and the group is under OOM.
        """
        mem = self._dir["memory"]
        if self.layout.version == 2:
            return _read_keyed(os.path.join(mem, "memory.events")).get("oom_kill", 0)
        oom = _read_keyed(os.path.join(mem, "memory.oom_control"))
        if "oom_kill" in oom:
            return oom["oom_kill"]
        failcnt = _read_int(os.path.join(mem, "memory.failcnt")) or 0
        return 1 if failcnt > 0 and oom.get("under_oom") == 1 else 0

    def oom_killed(self) -> bool:
        """Whether the OOM killer killed anything in this cgroup."""
        return self.oom_kills() > 0

    def stats(self) -> dict[str, int | None]:
        """Usage counters; a key is None when this kernel does not offer it.

        Keys: memory_bytes, memory_peak_bytes, pids, cpu_usage_us, cpu_throttled_periods,
        oom_kills.
        """
        mem, pids, cpu = self._dir["memory"], self._dir["pids"], self._dir["cpu"]
        if self.layout.version == 2:
            cpu_stat = _read_keyed(os.path.join(cpu, "cpu.stat"))
            return {
                "memory_bytes": _read_int(os.path.join(mem, "memory.current")),
                "memory_peak_bytes": _read_int(os.path.join(mem, "memory.peak")),
                "pids": _read_int(os.path.join(pids, "pids.current")),
                "cpu_usage_us": cpu_stat.get("usage_usec"),
                "cpu_throttled_periods": cpu_stat.get("nr_throttled"),
                "oom_kills": self.oom_kills(),
            }
        usage_ns = None
        if "cpuacct" in self._dir:
            usage_ns = _read_int(os.path.join(self._dir["cpuacct"], "cpuacct.usage"))
        return {
            "memory_bytes": _read_int(os.path.join(mem, "memory.usage_in_bytes")),
            "memory_peak_bytes": _read_int(os.path.join(mem, "memory.max_usage_in_bytes")),
            "pids": _read_int(os.path.join(pids, "pids.current")),
            "cpu_usage_us": None if usage_ns is None else usage_ns // 1000,
            "cpu_throttled_periods": _read_keyed(os.path.join(cpu, "cpu.stat")).get("nr_throttled"),
            "oom_kills": self.oom_kills(),
        }

    # -- reuse (v1) --

    def renew(self, limits: CgroupLimits) -> bool:
        """Make this emptied v1 cgroup what a new one with `limits` is, for its next user:
        every hierarchy but memory's gets a new directory (their counters, such as
        cpu.stat's, cannot be reset); the memory cgroup is kept, its pages reclaimed
        (memory.force_empty), its peak and fail counts written back to zero and its limits
        written again. Keeping the memory cgroup is the point: removing one makes the
        kernel reparent its share of every superblock's shrinker lists, work that grows
        with every mount on the host (5 per sandbox).

        Returns False, and the cgroup should be destroyed, when that cannot be: not v1, a
        process in it, frozen, an OOM kill on record (a counter with no reset), or memory
        sharing a hierarchy with another controller. What is still charged is not waited
        for here: kernel objects of the last user's processes are freed an RCU grace period
        after they exit (tens of ms), so its caller checks `memory_charged()` later.
        """
        mem = self._dir.get("memory")
        if self.layout.version != 1 or mem is None or self.pids() or self._is_frozen():
            return False
        if sum(d == mem for d in self._dir.values()) > 1:
            return False
        if _read_keyed(os.path.join(mem, "memory.oom_control")).get("oom_kill", 0):
            return False
        try:
            _write("cgroup renew", os.path.join(mem, "memory.force_empty"), "0")
            self.reset_memory_counters()
            others = [d for d in self.paths if d != mem]
            for d in others:
                os.rmdir(d)
            for op in plan(self.layout, self.name, limits):  # every limit written again
                if isinstance(op, Write):
                    _write("cgroup renew", op.path, op.value)
                elif op.path in others:  # the new directories (not the group's own)
                    os.mkdir(op.path, 0o755)
        except (SandboxSetupError, OSError):
            return False
        return True

    def reset_memory_counters(self) -> None:
        """v1: write the memory cgroup's peaks (from what is charged now) and fail counts
        back to zero (RENEWED_MEMORY_COUNTERS).

        Raises:
            SandboxSetupError: a write failed.
        """
        mem = self._dir["memory"]
        for name in RENEWED_MEMORY_COUNTERS:
            if os.path.exists(os.path.join(mem, name)):
                _write("cgroup renew", os.path.join(mem, name), "0")

    def memory_charged(self) -> int | None:
        """Bytes charged to the memory cgroup now (v1 usage_in_bytes, v2 memory.current)."""
        return _read_int(os.path.join(self._dir["memory"], "memory.usage_in_bytes"
                                      if self.layout.version == 1 else "memory.current"))

    # -- removal --

    def destroy(self) -> None:
        """Kill every process, then remove the cgroup's directories; idempotent.

        Raises:
            SandboxSetupError: a process would not die, or a directory stayed busy.
        """
        if not self.exists():
            return
        # Fast path: a sandbox whose PID 1 is already reaped leaves empty cgroups, and
        # rmdir is the kernel's own "is it empty?" check.
        left = []
        for d in reversed(self.paths):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        if not left:
            return
        self.kill()
        for d in left:
            if not _rmdir_tree(d, RMDIR_TIMEOUT_S):
                raise SandboxSetupError("cgroup rmdir", d, _errno.EBUSY, "a process remains")


# -- housekeeping ------------------------------------------------------------------------------


def list_corral_cgroups(layout: CgroupLayout) -> list[str]:
    """Names of every cgroup in the layout's group (`corral/<name>` by default), in any
    hierarchy, sorted."""
    names: set[str] = set()
    for base in set(layout.bases().values()):
        try:
            entries = os.scandir(base)
        except OSError:
            continue
        with entries:
            names.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
    return sorted(names)


def reap_orphans(layout: CgroupLayout, prefix: str = "",
                 pick: Callable[[str], bool] | None = None) -> list[str]:
    """Remove `<group>/<prefix>*` cgroups that no process is in any more (of them, those
    `pick` chooses, when given); returns their names.

    Left by a daemon that crashed. A cgroup with a live process (a deep task's sandbox that
    outlives a daemon restart) is kept. Call it while no `Cgroup.create` of a matching name
    is in flight: a cgroup created but not yet attached has no process either.
    """
    reaped = []
    for name in list_corral_cgroups(layout):
        if not name.startswith(prefix) or (pick is not None and not pick(name)):
            continue
        cg = Cgroup(layout, name)
        if cg.pids():
            continue
        # No retry: rmdir fails with EBUSY if a process arrived since, and then it is not ours.
        if all(_rmdir_tree(d, 0.0) for d in reversed(cg.paths)):
            reaped.append(name)
    return reaped
