"""Mount plan of the native sandbox: a pure list of MountOps, applied by the child in C.

``plan(spec, root, workspace)`` decides everything (which host paths appear, where, with
which flags) without touching the system, so it is unit-tested without root. The child
(ext/_spawn.pyx) executes the ops in order: everything up to ``pivot`` happens on paths
under ``root`` while the host tree is still visible (bind sources, and the fully visible
/proc that mounting a new procfs requires); after ``pivot`` paths are sandbox paths.

A policy's plan is computed once: every sandbox of the same shape (spec but its own ids,
no user binds, no image) differs only in its root, workspace, empty directory and the
workspace's descriptor, which are put into a cached template (``_PlanCache``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from .spec import SandboxSpec

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# mount_setattr(2) attributes
ATTR_RDONLY = 0x1
ATTR_NOSUID = 0x2
ATTR_NODEV = 0x4
ATTR_NOEXEC = 0x8

READ_ONLY = ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV

#: Host directories shared read-only (when they exist; merged-/usr symlinks are copied as links).
HOST_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
#: Host files and directories of /etc that programs need and that hold no host secrets.
HOST_ETC_ENTRIES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
    "/etc/os-release",
)
#: Generated /etc files that replace an image's own (its passwd, group, nsswitch.conf stay).
IMAGE_ETC_FILES = ("hosts", "hostname", "resolv.conf")
#: Device nodes bound from the host into the sandbox's /dev.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: /proc files hidden behind /dev/null: kernel memory, host-wide triggers and layouts.
PROC_MASKED_FILES = (
    "/proc/kcore",
    "/proc/kallsyms",
    "/proc/kmsg",
    "/proc/keys",
    "/proc/key-users",
    "/proc/sysrq-trigger",
    "/proc/timer_list",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/kpagecount",
    "/proc/kpageflags",
    "/proc/kpagecgroup",
    "/proc/config.gz",
)
#: /proc directories replaced by an empty read-only tmpfs.
PROC_MASKED_DIRS = ("/proc/acpi", "/proc/scsi", "/proc/asound", "/proc/firmware")
#: /proc subtrees kept visible but read-only.
PROC_READ_ONLY = ("/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/sysvipc")


@dataclass(frozen=True)
class MountOp:
    """One step of the plan; field meaning depends on kind (see ext/_spawn.pyx OpKind)."""

    kind: str  # mkdir mount setattr file symlink pivot mask_file mask_dir touch ro_self attach
    #            sysctls
    target: str
    source: str | None = None
    fstype: str | None = None
    flags: int = 0
    data: str | None = None
    mode: int = 0

    def as_tuple(self) -> tuple:
        return (self.kind, self.source, self.target, self.fstype, self.flags, self.data, self.mode)


class HostView:
    """What the plan needs to know about host paths; tests pass a dict-backed fake."""

    def kind(self, path: str) -> str | None:
        """'dir', 'file', 'link:<target>' or None when absent."""
        if path in _STATIC_PATHS:
            return _static_kind(path)
        return _probe_kind(path)


#: System paths whose shape does not change while a runtime runs; probed once.
_STATIC_PATHS = frozenset(HOST_SYSTEM_DIRS + HOST_ETC_ENTRIES + tuple("/dev/" + d for d in DEVICES))


@functools.cache
def _static_kind(path: str) -> str | None:
    return _probe_kind(path)


def _probe_kind(path: str) -> str | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link:" + os.readlink(path)
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def etc_files(spec: SandboxSpec) -> dict[str, str]:
    """The generated, minimal /etc: one user (root), no network names but localhost."""
    return {
        "passwd": "root:x:0:0:root:/workspace:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {spec.hostname}\n::1\tlocalhost ip6-localhost\n",
        "hostname": spec.hostname + "\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
        # with an egress policy, the proxy's resolver on the egress link (sandbox/net.py)
        "resolv.conf": ("nameserver 100.127.255.1\noptions attempts:1\n"
                        if spec.allow_net else ""),
    }


#: tmpfs counts its size= in pages.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: shmem keeps a symlink's target (with its NUL) in the inode up to this length, else in a page.
_SHMEM_SHORT_SYMLINK = 128


def tmpfs_pages(ops: list[MountOp], root: str) -> int:
    """Pages of tmpfs blocks the plan's files and links under root take: each file's
    content rounded up to pages, a page for each long link; directories and empty
    mount-point files take none."""
    pages = 0
    for op in ops:
        if not op.target.startswith(root + "/"):
            continue
        if op.kind == "file":
            pages += -(-len((op.data or "").encode()) // PAGE_SIZE)
        elif op.kind == "symlink" and len(os.fsencode(op.source or "")) + 1 > _SHMEM_SHORT_SYMLINK:
            pages += 1
    return pages


def _parents(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (the directories to create before c)."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def plan(
    spec: SandboxSpec,
    root: str,
    workspace: str | None,
    host: HostView | None = None,
    detached: dict[str, int] | None = None,
    support: dict[str, str] | None = None,
    image_root: int | None = None,
    empty_dir: str | None = None,
    scratch: str | None = None,
) -> list[MountOp]:
    """Ordered mount operations that build the sandbox's filesystem view.

    On the real host (host None), without user binds or an image, the plan comes from a
    template of its policy made at the first call (_PLANS); otherwise it is made anew.

    Args:
        spec: the sandbox spec (binds, tmp size, hostname).
        root: host directory that becomes the sandbox's root (a tmpfs is mounted on it).
        workspace: host directory mounted writable at /workspace; None: a scratch
            workspace, a tmpfs the sandbox mounts itself (mount options `scratch`, e.g.
            "size=...,nr_inodes=..."), seen by nobody outside and gone with the sandbox.
        host: view of the host's paths (defaults to the real filesystem).
        detached: host paths the caller already cloned with open_tree(2), to their
            descriptors; the child attaches those instead of bind-mounting by path (the
            workspace and user binds: the child's ids may not reach them).
        support: read-only files Corral itself provides inside every sandbox
            ({sandbox path: host path}), e.g. the agent protocol helper.
        image_root: the descriptor of a detached overlay of an image's layers
            (sandbox/images/overlay.py), attached as the root instead of the tmpfs; no
            host system directory is bound and /etc is the image's (its generated
            hosts, hostname and resolv.conf are already in the overlay's upper layer).
        empty_dir: an empty host directory bound read-only over each masked /proc
            directory (default: "empty" beside root, which the runtime makes with it).
    """
    empty_dir = empty_dir or default_empty_dir(root)
    detached = detached or {}
    if workspace is None and scratch is None:
        raise ValueError("a sandbox with no workspace directory needs scratch options")
    if host is None:
        found = template(spec, workspace, detached=detached, support=support,
                         image_root=image_root, scratch=scratch)
        if found is not None:
            return found.fill(root, workspace, detached.get(workspace), empty_dir)
    return _make_plan(spec, root, workspace, host or HostView(), detached, support, image_root,
                      empty_dir, scratch)


def default_empty_dir(root: str) -> str:
    """The empty directory beside a sandbox's root, which the runtime makes with it."""
    return os.path.join(os.path.dirname(root), "empty")


def template(spec: SandboxSpec, workspace: str | None, *, detached: dict[str, int] | None = None,
             support: dict[str, str] | None = None, image_root: int | None = None,
             scratch: str | None = None) -> Template | None:
    """The template plan() fills for these arguments on the real host, or None where it
    makes the plan anew (user binds, an image, other detached paths than the workspace).

    Raises:
        ValueError: no workspace and no scratch options.
    """
    detached = detached or {}
    if workspace is None and scratch is None:
        raise ValueError("a sandbox with no workspace directory needs scratch options")
    if image_root is not None or spec.binds or not set(detached) <= {workspace}:
        return None
    return _PLANS.template(spec, workspace, workspace in detached, support, scratch)


def _make_plan(spec: SandboxSpec, root: str, workspace: str | None, host: HostView,
               detached: dict[str, int], support: dict[str, str] | None,
               image_root: int | None, empty_dir: str, scratch: str | None) -> list[MountOp]:
    """plan() itself, every step decided anew (the host is probed where it must be)."""
    steps = _PlanSteps(root, host, detached)
    # 1. Nothing we mount may propagate back to the host.
    steps.add("mount", "/", source=None, flags=MS_REC | MS_PRIVATE)
    if image_root is not None:
        # 2-4. The image's overlay (nosuid,nodev, idmapped layers) is the root and its /etc.
        steps.ops.append(MountOp("attach", root, flags=image_root))
    else:
        steps.host_root(spec)  # 2-4. a tmpfs root, host system directories, a minimal /etc
    steps.dev(spec, in_root_tmpfs=image_root is None)  # 5
    steps.proc(empty_dir)  # 6
    # 7. Writable scratch: /tmp and the workspace.
    if image_root is None:
        steps.scratch_dir("/tmp", ATTR_NOSUID | ATTR_NODEV)
    else:
        steps.mkdirs("/tmp", 0o1777)
        steps.add("mount", steps.inside("/tmp"), source="tmpfs", fstype="tmpfs",
                  flags=MS_NOSUID | MS_NODEV, data=f"mode=1777,size={spec.tmp_bytes}")
    if workspace is None:  # as a host workspace: capped, nosuid, nodev, root's inside
        steps.mkdirs("/workspace")
        steps.add("mount", steps.inside("/workspace"), source="tmpfs", fstype="tmpfs",
                  flags=MS_NOSUID | MS_NODEV, data=f"mode=0755,{scratch}")
    else:
        steps.bind(workspace, "/workspace", writable=True, kind="dir")
    # 8. Corral's own support files, then the user's extra binds in the order given.
    for target, source in (support or {}).items():
        steps.bind(source, target, writable=False)
    for b in spec.binds:
        steps.bind(b.source, b.target, writable=b.writable)
    # 9. Switch root, then freeze the root tmpfs itself.
    steps.add("pivot", root)
    steps.add("setattr", "/", flags=READ_ONLY, mode=0)
    steps.add("setattr", "/dev", flags=READ_ONLY | ATTR_NOEXEC, mode=0)
    if image_root is None:
        steps.size_root_tmpfs(spec.tmp_bytes)
    return steps.ops


class Template:
    """A policy's plan with placeholders (ROOT, WORKSPACE, EMPTY, and WORKSPACE_FD as an
    attach's descriptor) for what each sandbox has of its own; `fill` puts them back.

    `compiled` is free for the spawn side to keep its own form of the ops in (contain.py
    keeps the C MountTable there, made once per template).
    """

    #: placeholders: a NUL never occurs in a real path (ChildPlan refuses one)
    ROOT, WORKSPACE, EMPTY = "\0root", "\0workspace", "\0empty"
    PLACEHOLDERS = (ROOT, WORKSPACE, EMPTY)
    WORKSPACE_FD = -2

    def __init__(self, ops: tuple[MountOp, ...]) -> None:
        self.ops = ops
        #: what the setup makes in the root (bind-mount points, generated files), relative
        #: to it: a snapshot of the root's upper layer leaves them out
        self.setup_files = setup_files(ops, self.ROOT)
        self.compiled: object | None = None

    def fill(self, root: str, workspace: str | None, workspace_fd: int | None,
             empty_dir: str) -> list[MountOp]:
        paths = {self.ROOT: root, self.WORKSPACE: workspace, self.EMPTY: empty_dir}

        def real(value: str | None) -> str | None:
            if value is None or value[:1] != "\0":
                return value
            placeholder, slash, rest = value.partition("/")
            return paths[placeholder] + slash + rest

        ops = []
        for op in self.ops:
            # a frozen dataclass's __init__ sets each field through object.__setattr__:
            # copying the instance dict is several times faster for ~100 ops
            filled = object.__new__(MountOp)
            filled.__dict__.update(op.__dict__)
            filled.__dict__["target"] = real(op.target)
            filled.__dict__["source"] = real(op.source)
            if op.kind == "attach" and op.flags == self.WORKSPACE_FD:
                filled.__dict__["flags"] = workspace_fd
            ops.append(filled)
        return ops


def setup_files(ops, root: str) -> frozenset[str]:
    """The files and links a plan makes in the root (touch, file, symlink), relative to it."""
    return frozenset(op.target[len(root) + 1:] for op in ops
                     if op.kind in ("touch", "file", "symlink")
                     and op.target.startswith(root + "/"))


class _PlanCache:
    """Templates of plans by policy (Template), made at the first plan of each. Bounded;
    safe to share between threads.

    What a template depends on is its key: the spec with its per-sandbox ids and
    workspace path left out, the support files, whether the workspace is detached. The
    host paths it probes are the static system ones and Corral's support files.
    """

    SIZE = 64

    def __init__(self) -> None:
        self._templates: OrderedDict[tuple, Template] = OrderedDict()
        self._lock = threading.Lock()

    def template(self, spec: SandboxSpec, workspace: str | None, detached_workspace: bool,
                 support: dict[str, str] | None, scratch: str | None) -> Template | None:
        """The template of this policy (made now if new), or None when the spec holds a
        field of a kind no template is kept for."""
        key = (tuple(getattr(spec, name) for name in _policy_fields()),
               tuple(sorted((support or {}).items())), not detached_workspace,
               scratch if workspace is None else None)
        try:
            hash(key)
        except TypeError:
            return None
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
                return template
        detached = {Template.WORKSPACE: Template.WORKSPACE_FD} if detached_workspace else {}
        template = Template(tuple(_make_plan(
            spec, Template.ROOT, None if workspace is None else Template.WORKSPACE,
            HostView(), detached, support, None, Template.EMPTY, scratch)))
        with self._lock:
            template = self._templates.setdefault(key, template)
            while len(self._templates) > self.SIZE:
                self._templates.popitem(last=False)
        return template


_PLANS = _PlanCache()
#: SandboxSpec fields that name one sandbox, not its policy: left out of a template's key.
_PER_SANDBOX_FIELDS = frozenset({"uid_base", "uid_count", "workspace", "labels"})


@functools.cache
def _policy_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SandboxSpec)
                 if f.name not in _PER_SANDBOX_FIELDS)


class _PlanSteps:
    """The operations plan() collects, with the directories already made, and its steps."""

    def __init__(self, root: str, host: HostView, detached: dict[str, int]):
        self.root = root
        self.host = host
        self.detached = detached
        self.ops: list[MountOp] = []
        self.made: set[str] = set()

    def inside(self, path: str) -> str:
        return self.root + path

    def add(self, kind: str, target: str, **fields) -> None:
        self.ops.append(MountOp(kind, target, **fields))

    def scratch_dir(self, path: str, attrs: int) -> None:
        """A writable directory (mode 1777) of the tmpfs it lies in, bound onto itself for
        mount flags of its own (attrs): a mount, but no superblock of its own."""
        for d in _parents(path):
            self.mkdirs(d)
        self.made.add(path)
        self.add("mkdir", self.inside(path), mode=0o1777)
        self.add("mount", self.inside(path), source=self.inside(path), flags=MS_BIND)
        self.add("setattr", self.inside(path), flags=attrs, mode=0)

    def size_root_tmpfs(self, scratch_bytes: int) -> None:
        """Size the root tmpfs to exactly what the plan writes into it plus scratch_bytes,
        so that /tmp and /dev/shm (its directories) hold scratch_bytes together, no more."""
        index = next(i for i, op in enumerate(self.ops)
                     if op.kind == "mount" and op.target == self.root)
        size = scratch_bytes + tmpfs_pages(self.ops, self.root) * PAGE_SIZE
        self.ops[index] = replace(self.ops[index], data=f"mode=0755,size={size}")

    def mkdirs(self, path: str, mode: int = 0o755) -> None:
        for d in [*_parents(path), path]:
            if d not in self.made:
                self.made.add(d)
                self.ops.append(MountOp("mkdir", self.inside(d), mode=mode))

    def bind(self, source: str, target: str, writable: bool, kind: str | None = None) -> None:
        """Bind a host path (attach it, when the caller detached it), read-only unless
        writable; a link is kept as a link. A path the host lacks is left out."""
        kind = kind or self.host.kind(source)
        if kind is None:
            return
        if kind.startswith("link:"):
            # Keep merged-/usr style links as links: the target is bound on its own.
            for d in _parents(target):
                self.mkdirs(d)
            self.add("symlink", self.inside(target), source=kind[5:])
            return
        if kind == "dir":
            self.mkdirs(target)
        else:
            for d in _parents(target):
                self.mkdirs(d)
            self.add("touch", self.inside(target), mode=0o644)
        if source in self.detached:
            self.add("attach", self.inside(target), flags=self.detached[source])
        else:
            self.add("mount", self.inside(target), source=source, flags=MS_BIND | MS_REC)
        attrs = ATTR_NOSUID | ATTR_NODEV if writable else READ_ONLY
        self.add("setattr", self.inside(target), flags=attrs, mode=1)

    def host_root(self, spec: SandboxSpec) -> None:
        """2. A tmpfs as the new root (it holds mount points, generated /etc, and the
        scratch directories /tmp and /dev/shm, bound writable); 3. host system directories,
        read-only; 4. a minimal /etc: generated files plus a few read-only host entries."""
        # its size= is set by size_root_tmpfs once the plan is complete
        self.add("mount", self.root, source="tmpfs", fstype="tmpfs",
                 flags=MS_NOSUID | MS_NODEV, data="mode=0755")
        for d in HOST_SYSTEM_DIRS:
            self.bind(d, d, writable=False)
        self.mkdirs("/etc")
        for name, content in etc_files(spec).items():
            self.add("file", self.inside("/etc/" + name), data=content, mode=0o644)
        for entry in HOST_ETC_ENTRIES:
            self.bind(entry, entry, writable=False)

    def dev(self, spec: SandboxSpec, in_root_tmpfs: bool) -> None:
        """5. /dev: a few bound host nodes and the granted devices, a private devpts, shm,
        and the fd links.

        On the tmpfs root /dev is a directory of that tmpfs, bound onto itself (a mount of
        its own, for its noexec, but no superblock of its own): every superblock adds a
        shrinker, and the kernel sizes each memory cgroup's shrinker table by all of them,
        so one superblock less per sandbox cuts a cost that grows with the square of the
        sandboxes held. Both are read-only after the pivot. On an image's root /dev stays
        a tmpfs of its own, so nothing of it is written into the image's upper layer; it
        is sized for /dev/shm, its only writable part (its own entries take no blocks).
        /dev/shm is a directory of whichever tmpfs holds /dev, bound onto itself.
        """
        inside = self.inside
        self.mkdirs("/dev")
        if in_root_tmpfs:
            self.add("mount", inside("/dev"), source=inside("/dev"), flags=MS_BIND)
        else:
            self.add("mount", inside("/dev"), source="tmpfs", fstype="tmpfs",
                     flags=MS_NOSUID | MS_NOEXEC, data=f"mode=0755,size={spec.tmp_bytes}")
        self.made.discard("/dev/pts")
        self.made.discard("/dev/shm")
        host_nodes = [("/dev/" + dev, "/dev/" + dev) for dev in DEVICES
                      if self.host.kind("/dev/" + dev) is not None]
        # granted devices (a task's accelerator): usable, not executable
        granted = [(dev, "/dev/" + os.path.basename(dev)) for dev in spec.devices]
        for source, path in host_nodes + granted:
            self.add("touch", inside(path), mode=0o666)
            self.add("mount", inside(path), source=source, flags=MS_BIND)
            self.add("setattr", inside(path), flags=ATTR_NOSUID | ATTR_NOEXEC)
        self.add("mkdir", inside("/dev/pts"), mode=0o755)
        self.add("mount", inside("/dev/pts"), source="devpts", fstype="devpts",
                 flags=MS_NOSUID | MS_NOEXEC, data="newinstance,ptmxmode=0666,mode=620")
        self.add("symlink", inside("/dev/ptmx"), source="pts/ptmx")
        self.scratch_dir("/dev/shm", ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            self.add("symlink", inside("/dev/" + name), source=target)

    def proc(self, empty_dir: str) -> None:
        """6. A fresh /proc of the sandbox's PID namespace, with the host-wide parts hidden
        (masked directories: empty_dir bound over them, read-only). Its /proc/sys/user is
        where PID 1 caps its user namespace's quotas, before /proc/sys is read-only."""
        self.mkdirs("/proc", 0o555)
        self.add("mount", self.inside("/proc"), source="proc", fstype="proc",
                 flags=MS_NOSUID | MS_NODEV | MS_NOEXEC)
        self.add("sysctls", self.inside("/proc/sys/user"))
        for path in PROC_READ_ONLY:
            self.add("ro_self", self.inside(path))
        for path in PROC_MASKED_FILES:
            self.add("mask_file", self.inside(path))
        for path in PROC_MASKED_DIRS:
            self.add("mask_dir", self.inside(path), source=empty_dir)


def base_namespace_detach(mount_points: list[str], needed: tuple[str, ...],
                          needed_trees: tuple[str, ...]) -> list[str]:
    """The mount points to detach from a copy of the runtime's mount namespace so that
    it keeps only what a sandbox's setup reaches by path (the base namespace every PID 1
    copies its own from; sandbox/contain.py base_mount_namespace).

    Kept: every mount that holds a path in needed (it or one of its ancestors) and every
    mount below a path in needed_trees (those are bound recursively). Everything else
    goes: the tops of what goes, in the order given, each once (detaching a mount takes
    what is mounted below it).

    Args:
        mount_points: the namespace's mount points (/proc/self/mountinfo's fifth field).
        needed: absolute paths the setup opens or binds by path.
        needed_trees: the subset bound with everything mounted below it.
    """
    def within(path: str, top: str) -> bool:
        return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")

    def kept(point: str) -> bool:
        return (any(within(path, point) for path in needed)
                or any(within(point, tree) for tree in needed_trees))

    drops: list[str] = []
    for point in mount_points:
        if kept(point) or any(within(point, top) for top in drops):
            continue
        drops = [top for top in drops if not within(top, point)]
        drops.append(point)
    return drops


#: Filesystems of which a sandbox may make a superblock of its own (ext4, devtmpfs and the
#: like are the host's, shared by binds).
PER_SANDBOX_FSTYPES = frozenset({"tmpfs", "devpts", "proc", "mqueue", "sysfs", "cgroup",
                                 "cgroup2", "overlay", "ramfs"})


def own_superblocks(mountinfo: str) -> dict[str, tuple[str, ...]]:
    """{major:minor: (fstype, mount points...)} of the superblocks a sandbox's mount table
    (its PID 1's /proc/PID/mountinfo) shows of its own kinds. Its IPC namespace's mqueue
    superblock exists whether mounted or not, and is not shown unless mounted."""
    found: dict[str, list[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in PER_SANDBOX_FSTYPES:
            found.setdefault(fields[2], [fstype]).append(fields[4])
    return {dev: tuple(entry) for dev, entry in found.items()}
