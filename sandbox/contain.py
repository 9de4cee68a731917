"""The order of containment, in one place; builds the child plans that _spawn executes.

A sandbox's first process (its PID 1) and every command later run in it go through the
same ordered steps. The parent does what needs host privileges or may allocate; the child
(C code in ext/_spawn.pyx, no Python) does the rest, in exactly this order:

  parent  1. prepare: compile seccomp BPF, probe landlock ABI, plan mounts, create cgroup
  child   2. clone(NEWUSER|NEWPID|NEWNS|NEWNET|NEWUTS|NEWIPC) as the sandbox's own host uid
             (effective uid = uid_base, so the user namespace's owner -- who the kernel
             charges for per-user quotas -- is not root), with the pooled rlimits lifted;
             wait for the parent
  parent  3. write uid_map / setgroups=deny / gid_map, release the child
  child   4. setresuid/setresgid(0) inside the user namespace
          5. join the cgroup (write "0" to each cgroup.procs), unshare(NEWCGROUP)
          6. sethostname, bring up loopback (the only interface)
          7. mounts in plan order, pivot_root, root and /dev read-only; PID 1 caps its
             namespace's own quotas (USER_NAMESPACE_LIMITS into /proc/sys/user/* of the
             sandbox's procfs, once mounted, before /proc/sys turns read-only)
          8. chdir, setsid (no controlling terminal), install stdio and protocol fds;
             a command given a pty (exec with tty) makes its stdin, a slave of the
             sandbox's own devpts, its controlling terminal (TIOCSCTTY)
          9. drop every capability (bounding, ambient, effective, permitted), lock securebits
         10. no_new_privs
         11. landlock (commands only: corral-init is exec'd from outside the sandbox view)
         12. rlimits (nofile, core=0, fsize) — after landlock, which opens descriptors while
             the child still holds all of the runtime's
         13. mark every other descriptor close-on-exec
         14. seccomp, last, so the setup above is not filtered
         15. execve (PID 1: corral-init; commands: argv)

A command joins an existing sandbox through its PID 1's pidfd: a helper writes itself into
the cgroup, setns() into all seven namespaces at once, clones the command and exits, so
the command becomes a child of PID 1, which reaps it and reports its wait status to the
runtime on a pipe (descriptor 3 of corral-init); the command runs steps 4 and 8-15.

A sandbox that runs one command given at creation (``run()``, ``corral run``; bwrap and
``docker run`` do the same) starts it without a join: its ChildPlan goes to spawn_init with
PID 1's, and PID 1 clones it right after step 7, before PID 1's own steps 8-15. The command
is PID 1's child from birth, in its cgroup and namespaces, and runs steps 4 and 8-15 as a
joined command does; it reports its pid and any failure on a pipe of its own.

A child step that fails is reported by its name in ext/_spawn.pyx STEP_NAMES, which
becomes SandboxSetupError.step.

Step 2's mount namespace is a copy of its creator's. The runtime's holds a workspace (and
more) per sandbox, so a copy of it, making it private and detaching it at pivot_root all
grew with the sandboxes held: a create took 39 ms at 2,000 against 9 ms at 10. As root
the launcher therefore first joins a base namespace (base_mount_namespace), made once
per process, which keeps only the host mounts that the setup reaches by path; everything
else reaches PID 1 as a detached mount (open_tree), made where the mounts live.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import landlock, mounts, seccomp
from .errors import SandboxSetupError
from .spec import SandboxSpec

#: Highest capability number to drop; CAP_LAST_CAP is read from the kernel when possible.
_CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


#: What one sandbox may spend of the kernel's per-user quotas, written by its PID 1 into its
#: user namespace's own /proc/sys/user/* (counts; the kernel's host defaults are per user:
#: 128 inotify instances, a memory-sized number of watches). Every charge inside is also
#: charged to the namespace's owner (uid_base) on the host, against the host's limits:
#: sandboxes sharing a uid_base share those, and each can take only the share below.
#: Nested namespaces exist only under profiles that allow them (not the default).
USER_NAMESPACE_LIMITS: dict[str, int] = {
    "max_inotify_instances": 32,
    "max_inotify_watches": 16384,
    "max_fanotify_groups": 8,
    "max_fanotify_marks": 8192,
    "max_user_namespaces": 16,
    "max_mnt_namespaces": 64,
    "max_pid_namespaces": 64,
    "max_net_namespaces": 64,
    "max_ipc_namespaces": 64,
    "max_uts_namespaces": 64,
    "max_cgroup_namespaces": 64,
    "max_time_namespaces": 64,
}
_USER_SYSCTL_DIR = "/proc/sys/user"

#: rlimit-counted per-user quotas (POSIX message queue bytes, queued signals, processes,
#: locked shared memory) whose pool the launcher lifts for the new namespace (see
#: ext/_spawn.pyx corral_lift_user_pools); PID 1 takes the runtime's own values back.
POOLED_RLIMITS = (resource.RLIMIT_MSGQUEUE, resource.RLIMIT_SIGPENDING,
                  resource.RLIMIT_NPROC, resource.RLIMIT_MEMLOCK)


@functools.cache
def user_namespace_sysctls() -> tuple[tuple[str, int], ...]:
    """(path, value) for each USER_NAMESPACE_LIMITS file this kernel has.

    Looked up once per process: the kernel's set of files is fixed while it runs, and a
    lookup under /proc/sys/user gets slower the more user namespaces the host has made
    (0.9 ms at 260 sandboxes, 15 ms at 2,650 here): 14 of them per create made each
    create slower as sandboxes piled up.
    """
    return tuple((f"{_USER_SYSCTL_DIR}/{name}", value)
                 for name, value in USER_NAMESPACE_LIMITS.items()
                 if os.path.exists(f"{_USER_SYSCTL_DIR}/{name}"))


def namespace_owner(spec: SandboxSpec) -> int:
    """The effective uid the sandbox's user namespace is created with: its own host uid
    when the runtime is root (else the runtime's own, which is what the kernel uses)."""
    return spec.uid_base if os.geteuid() == 0 else -1


@functools.cache
def last_cap() -> int:
    try:
        with open(_CAP_LAST_CAP_FILE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63  # dropping unknown capabilities returns EINVAL, which the child ignores


#: Base mount namespaces of this process by runtime tree, each a descriptor held for the
#: process's lifetime (one in practice: the runtime's own tree, /run/corral as root).
_base_namespaces: dict[str, int] = {}
_base_lock = threading.Lock()


def base_mount_namespace(tree: str) -> int:
    """The mount namespace the launcher of a sandbox of Corral's runtime tree `tree` (the
    directory of its sandboxes directory and of their shared root mount point and empty
    directory, /run/corral as root) joins before cloning PID 1 (as root; -1, the runtime's
    own, for anyone else).

    A private copy of the runtime's, made at the first call, keeping the mounts that hold
    what PID 1's setup opens or binds by path: the host system directories and /etc
    entries (with what is mounted below them), /proc, /dev, Corral's support files and the
    runtime tree (the root mount point, the empty directory, each sandbox's generated
    files). Every other mount -- above all the workspaces of the sandboxes already there,
    in a restarted daemon -- is detached from it, so neither it nor any copy keeps them.
    What the runtime mounts later stays in its own namespace only, where the file API and
    a restarted daemon find it; a sandbox gets those as detached mounts. An unprivileged
    runtime mounts nothing per sandbox (workspaces are plain directories): its own
    namespace is as small, and so is that of root without CAP_SYS_ADMIN (EPERM here),
    whose workspaces are too.

    Raises:
        SandboxSetupError: the namespace could not be made (step and path named).
    """
    if os.geteuid() != 0:
        return -1
    with _base_lock:
        fd = _base_namespaces.get(tree)
        if fd is None:
            from corral.ext import _spawn

            needed = (*mounts.HOST_SYSTEM_DIRS, *mounts.HOST_ETC_ENTRIES, "/proc", "/dev",
                      *("/dev/" + name for name in mounts.DEVICES), tree,
                      *support_files().values())
            drops = mounts.base_namespace_detach(
                _mount_points(), needed, mounts.HOST_SYSTEM_DIRS + mounts.HOST_ETC_ENTRIES)
            try:
                fd = _spawn.mount_namespace_without(drops)
            except PermissionError:
                fd = -1  # root without CAP_SYS_ADMIN (a container): the runtime's own
            except OSError as exc:
                raise SandboxSetupError("base mount namespace", exc.filename or tree,
                                        exc.errno or 5, exc.strerror or "") from None
            _base_namespaces[tree] = fd
        return fd


def _mount_points() -> list[str]:
    """This process's mount points, in /proc/self/mountinfo's order (parents first)."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                   os.fsdecode(line.split(b" ")[4])) for line in lines if line]


@dataclass(frozen=True)
class Prepared:
    """Parent-side work that depends only on the spec (shared by every process of a sandbox)."""

    spec: SandboxSpec
    seccomp_profile: seccomp.SeccompProfile
    seccomp_bpf: bytes | None
    landlock: landlock.LandlockPlan
    rlimits: tuple[tuple[int, int, int], ...]


def _rlimits(spec: SandboxSpec, cgroup: bool = True) -> tuple[tuple[int, int, int], ...]:
    """(resource, soft, hard), clamped to what this process may grant.

    Without a cgroup (an unprivileged caller with no delegated subtree) the spec's memory
    and pids limits become what rlimits can do: RLIMIT_DATA caps each process's heap and
    private mappings, RLIMIT_NPROC the sandbox's tasks (counted per user namespace, so the
    caller's own processes outside do not count against it). No CPU quota.
    """
    wanted = [
        (resource.RLIMIT_NOFILE, spec.nofile),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, spec.fsize_bytes),
    ]
    if not cgroup:
        wanted += [(resource.RLIMIT_DATA, spec.memory_bytes),
                   (resource.RLIMIT_NPROC, spec.pids_max)]
    out = []
    for res, want in wanted:
        _, hard = resource.getrlimit(res)
        value = want if hard == resource.RLIM_INFINITY else min(want, hard)
        out.append((res, value, value))
    return tuple(out)


def prepare(spec: SandboxSpec, cgroup: bool = True) -> Prepared:
    """Step 1: compile and probe everything the children will need (cgroup: whether the
    sandbox gets one; rlimits stand in for its limits when not).

    Raises:
        InvalidSpec: the seccomp profile cannot be loaded or compiled.
    """
    profile = seccomp.load_profile(spec.profile)
    writable = tuple(b.target for b in spec.binds if b.writable)
    return Prepared(
        spec=spec,
        seccomp_profile=profile,
        seccomp_bpf=seccomp.prepare(profile),
        landlock=landlock.prepare(
            extra_writable=writable,
            devices=tuple("/dev/" + os.path.basename(d) for d in spec.devices)),
        rlimits=_rlimits(spec, cgroup),
    )


def id_map(spec: SandboxSpec) -> bytes:
    """uid_map/gid_map line: ids 0..count-1 inside are base.. outside (root is unprivileged)."""
    return f"0 {spec.uid_base} {spec.uid_count}\n".encode()


#: Descriptor of PID 1 on which it reports the wait status of every process it reaps.
INIT_STATUS_FD = 3


def init_plan(prepared: Prepared, *, root: str, workspace: str | None, init_fd: int,
              cgroup_fds: tuple[int, ...], status_fd: int,
              detached: dict[str, int] | None = None, image_root: int | None = None,
              empty_dir: str | None = None):
    """(ChildPlan, InitMounts) of a sandbox's PID 1 (steps 4-15, exec'ing corral-init);
    workspace None: a scratch workspace (scratch_workspace_options), mounted by PID 1.
    empty_dir: the empty directory bound over masked /proc directories (default: "empty"
    beside root).

    A policy's mount plan is converted to C once (its template's MountTable, shared by
    every ChildPlan of that policy); only the sandbox's own directories and workspace
    descriptor are given per plan. The InitMounts names what the mounts make in the root
    and, on a failure report (which names an op index), the op's path.
    """
    from corral.ext import _spawn

    spec = prepared.spec
    detached = detached or {}
    support = support_files()
    scratch = scratch_workspace_options() if workspace is None else None
    empty_dir = empty_dir or mounts.default_empty_dir(root)
    template = mounts.template(spec, workspace, detached=detached, support=support,
                               image_root=image_root, scratch=scratch)
    if template is not None:
        table = template.compiled
        if table is None:  # two threads may both make it: either one serves
            table = template.compiled = _spawn.MountTable(
                [op.as_tuple() for op in template.ops], bases=mounts.Template.PLACEHOLDERS)
        workspace_fd = detached.get(workspace) if workspace is not None else None
        mount_args = {"mount_ops": table, "mount_bases": (root, workspace or "", empty_dir),
                      "attach_fd": -1 if workspace_fd is None else workspace_fd}
        made = InitMounts(template.setup_files,
                          lambda: template.fill(root, workspace, workspace_fd, empty_dir))
    else:
        ops = mounts.plan(spec, root, workspace, detached=detached, support=support,
                          image_root=image_root, empty_dir=empty_dir, scratch=scratch)
        mount_args = {"mount_ops": [op.as_tuple() for op in ops]}
        made = InitMounts(mounts.setup_files(ops, root), lambda: ops)
    plan = _spawn.ChildPlan(
        argv=["corral-init"],
        envp=[],
        cwd="/",
        fds=[(status_fd, INIT_STATUS_FD)],
        hostname=spec.hostname,
        **mount_args,
        rlimits=prepared.rlimits + _pooled_rlimits(spec),
        sysctls=tuple((os.path.basename(path), value)
                      for path, value in user_namespace_sysctls()),
        seccomp_bpf=prepared.seccomp_bpf,
        seccomp_flags=prepared.seccomp_profile.load_flags,
        cgroup_fds=cgroup_fds,
        last_cap=last_cap(),
        pdeathsig=9 if spec.die_with_parent else 0,
        exec_fd=init_fd,
    )
    return plan, made


@dataclass(frozen=True)
class InitMounts:
    """What PID 1's mounts make: `setup_files`, the files and links they create in the
    root (relative to it), and `ops()`, the MountOps themselves with the sandbox's own
    paths (made on demand: only a failure report needs them)."""

    setup_files: frozenset[str]
    ops: Callable[[], list[mounts.MountOp]]


def _pooled_rlimits(spec: SandboxSpec) -> tuple[tuple[int, int, int], ...]:
    """The runtime's own values of POOLED_RLIMITS, which the launcher lifted for a new user
    namespace it creates as the sandbox's owner (none lifted otherwise)."""
    if namespace_owner(spec) < 0:
        return ()
    return tuple((res, *resource.getrlimit(res)) for res in POOLED_RLIMITS)


def exec_plan(prepared: Prepared, argv: list[str], *, env: list[str], cwd: str,
              fds: list[tuple[int, int]], cgroup_fds: tuple[int, ...], ctty: bool = False,
              user: tuple[int, int] | None = None, by_init: bool = False):
    """The ChildPlan of a command joining the sandbox (steps 4, 8-15); user: (uid, gid)
    inside to run as (an image's User), None for root; by_init: PID 1 starts it (one-shot,
    spawn_init command=), so it inherits PID 1's lifted pooled rlimits and takes the
    runtime's values back, which a joined command inherits from the runtime.

    No parent-death signal: a command's parent is the sandbox's PID 1 (its launcher exits
    at once), and it dies with PID 1, whose own parent-death signal ties it to the runtime.
    """
    from corral.ext import _spawn

    path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/bin:/bin")
    ll = prepared.landlock
    return _spawn.ChildPlan(
        argv=argv,
        envp=env,
        search_path=[p for p in path.split(":") if p.startswith("/")],
        cwd=cwd,
        fds=fds,
        # the pooled values first: the spec's own (RLIMIT_NPROC without a cgroup) win
        rlimits=(_pooled_rlimits(prepared.spec) if by_init else ()) + prepared.rlimits,
        landlock_rules=ll.rules,
        landlock_handled=ll.handled,
        landlock_abi=ll.abi,
        seccomp_bpf=prepared.seccomp_bpf,
        seccomp_flags=prepared.seccomp_profile.load_flags,
        cgroup_fds=cgroup_fds,
        last_cap=last_cap(),
        ctty=ctty,
        user=user,
    )


def scratch_workspace_options() -> str:
    """tmpfs options of a scratch workspace: the caps of a host one (workspace_fs)."""
    from . import workspace_fs

    return f"size={workspace_fs.max_bytes()},nr_inodes={workspace_fs.max_inodes()}"


#: Where the agent protocol helper appears in every sandbox (PYTHONPATH points there).
AGENT_HELPER_DIR = "/opt/corral/lib"


def support_files() -> dict[str, str]:
    """Read-only files every sandbox gets: the dependency-free agent protocol helper."""
    from corral.ext import _spawn

    helper = os.path.join(os.path.dirname(_spawn.__file__), "agent.py")
    if not os.path.isfile(helper):
        return {}
    return {AGENT_HELPER_DIR + "/corral_agent.py": helper}


def init_binary() -> str:
    """Path of corral-init, built next to the _spawn extension."""
    from corral.ext import _spawn

    return os.path.join(os.path.dirname(_spawn.__file__), "corral-init")
