"""`corral doctor`: each kernel feature Corral uses, whether this user has it, and what
Corral does without it.

Every check asks the kernel where it can (a user namespace is created in a forked child, a
detached mount is idmapped and dropped, the Landlock ABI is queried, the default seccomp
profile is compiled) and reads configuration only where asking would change the host: the
`corral` entry of /etc/subuid is looked for, never added. Nothing is left behind.

Exit status: 0 when native sandboxes can run for this user, 1 when a feature they cannot do
without is missing (user namespaces, seccomp), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import ctypes
import errno as errno_mod
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, fields

from ..sandbox.procinfo import read_or_none

EXIT_MISSING = 1
#: Verdicts of a check.
OK, DEGRADED, MISSING = "ok", "degraded", "missing"
_CLONE_NEWUSER = 0x10000000


@dataclass(frozen=True)
class Check:
    """One feature: what was found and what Corral does without it."""

    feature: str
    status: str  # ok | degraded | missing
    found: str  # what this host and user have
    without: str  # what Corral does when it is missing
    required: bool = False  # native sandboxes cannot run without it


#: What --json gives for each check: the fields of Check, in order.
CHECK_FIELDS = tuple(f.name for f in fields(Check))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor", help="check the kernel features Corral uses, for the current user",
        description="List each kernel feature Corral uses (user namespaces, subordinate ids, "
                    "idmapped mounts, cgroups and their delegation, Landlock, seccomp, "
                    "overlayfs), whether the current user has it here, and what Corral does "
                    "without it. Nothing on the host is changed.",
        epilog="exit status: 0 native sandboxes can run for this user, 1 a required feature "
               "(user namespaces, seccomp) is missing, 2 usage error.")
    p.add_argument("--json", action="store_true",
                   help=f"one JSON object: user, kernel, checks ({', '.join(CHECK_FIELDS)})")
    p.set_defaults(handler=main)
    return p


def _kernel() -> tuple[int, int]:
    release = platform.release()
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def _try_user_namespace() -> int:
    """0 when a forked child may unshare(CLONE_NEWUSER), else the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:  # the doctor runs no threads: a plain fork is fine here
        code = 0 if libc.unshare(_CLONE_NEWUSER) == 0 else ctypes.get_errno()
        os._exit(min(code, 255))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def check_user_namespaces() -> Check:
    err = _try_user_namespace()
    limit = read_or_none("/proc/sys/user/max_user_namespaces", strip=True)
    if err == 0:
        return Check("user namespaces", OK, f"can create one (max_user_namespaces={limit})",
                     "cannot run native sandboxes: every one is a user namespace; use "
                     "--backend docker", required=True)
    hints = []
    for path, want in (("/proc/sys/kernel/unprivileged_userns_clone", "1"),
                       ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "0")):
        value = read_or_none(path, strip=True)
        if value is not None and value != want:
            hints.append(f"{path} is {value} (needs {want})")
    if limit == "0":
        hints.append("/proc/sys/user/max_user_namespaces is 0")
    return Check("user namespaces", MISSING,
                 f"unshare(CLONE_NEWUSER): {errno_mod.errorcode.get(err, err)}"
                 + (f"; {'; '.join(hints)}" if hints else ""),
                 "cannot run native sandboxes: every one is a user namespace; use "
                 "--backend docker", required=True)


def check_subordinate_ids() -> Check:
    from corral.sandbox import ids

    if os.geteuid() == 0:
        try:
            pool = ids._registered()
        except ids.IdPoolError as exc:
            return Check("subordinate ids", MISSING, str(exc),
                         "sandboxes cannot start until the pool is fixed", required=True)
        without = ("sandboxes would share one host uid range (an escaped one would own "
                   "the others' files): Corral never does; it adds its pool instead")
        if pool is None:
            return Check("subordinate ids", OK,
                         f"no '{ids.POOL_NAME}' entry in {ids.SUBUID}/{ids.SUBGID} yet: the "
                         f"first sandbox adds one of {ids.POOL_SLOTS} ranges of {ids.RANGE} "
                         f"ids where no other entry is", without)
        return Check("subordinate ids", OK,
                     f"pool {pool.start}:{pool.count} ({pool.count // ids.RANGE} ranges of "
                     f"{ids.RANGE}; {ids.in_use()} in use); each sandbox has its own", without)
    mapping = ids.rootless()
    without = ("a single-id map: root inside is you and the only id, so programs that "
               "switch to another user inside fail (EINVAL)")
    if mapping.uses_helpers:
        return Check("subordinate ids", OK, mapping.describe(), without)
    return Check("subordinate ids", DEGRADED, mapping.describe(), without)


def _detached_tmpfs() -> int:
    """A new tmpfs as a detached mount (fsopen/fsconfig/fsmount): attached nowhere."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fs = libc.syscall(430, b"tmpfs", 1)  # fsopen(FSOPEN_CLOEXEC)
    if fs < 0:
        raise OSError(ctypes.get_errno(), "fsopen(tmpfs)")
    try:
        if libc.syscall(431, fs, 6, None, None, 0) < 0:  # fsconfig(FSCONFIG_CMD_CREATE)
            raise OSError(ctypes.get_errno(), "fsconfig")
        tree = libc.syscall(432, fs, 1, 0)  # fsmount(FSMOUNT_CLOEXEC)
        if tree < 0:
            raise OSError(ctypes.get_errno(), "fsmount")
        return tree
    finally:
        os.close(fs)


def _try_idmap(path: str | None) -> int:
    """0 when a detached clone of path (None: a new tmpfs) can be idmapped here, else the
    errno."""
    from corral.ext import _spawn

    tree = userns = -1
    try:
        tree = _spawn.open_tree_clone(path) if path else _detached_tmpfs()
        userns = _spawn.userns_with_maps(b"0 4294967293 1\n", b"0 4294967293 1\n")
        _spawn.idmap_tree(tree, userns)
        return 0
    except OSError as exc:
        return exc.errno or errno_mod.EIO
    finally:
        for fd in (tree, userns):
            if fd >= 0:
                os.close(fd)


def check_idmapped_mounts() -> Check:
    major, minor = _kernel()
    if os.geteuid() != 0:
        return Check("idmapped mounts", OK,
                     "not available to an unprivileged user (they need CAP_SYS_ADMIN over "
                     "the filesystem), and not needed: root inside is you, so what a "
                     "sandbox writes in your directories is yours",
                     "-")
    results = []
    bad = False
    # a new empty directory: /tmp itself may hold other mounts (a recursive clone takes them)
    scratch = tempfile.mkdtemp(prefix="corral-doctor-")
    try:
        probes = [("your directories", scratch, tempfile.gettempdir()),
                  ("tmpfs (task workspaces)", None, None)]
        outcomes = [(label, shown, _try_idmap(path)) for label, path, shown in probes]
    finally:
        os.rmdir(scratch)
    for label, path, err in outcomes:
        where = f"{_fstype(path)} at {path}" if path else "a new tmpfs"
        if err == 0:
            results.append(f"{label} ({where}): yes")
        else:
            bad = True
            results.append(f"{label} ({where}): {errno_mod.errorcode.get(err, err)}")
    return Check("idmapped mounts", DEGRADED if bad else OK,
                 f"Linux {major}.{minor} (needs 5.12; tmpfs 6.3, overlayfs 5.19); "
                 + "; ".join(results),
                 "a --workspace, --ro or --rw directory on a filesystem that cannot be "
                 "idmapped is refused (setup fails naming mount_setattr(MOUNT_ATTR_IDMAP)); "
                 "Corral's own workspaces still work (made for each sandbox's ids); a task's "
                 "workspace fails to mount")


def check_cgroups() -> Check:
    from corral.sandbox import cgroups
    from corral.sandbox.errors import CorralError

    try:
        layout = cgroups.detect()
    except CorralError as exc:
        return Check("cgroups", MISSING, str(exc),
                     "no memory, pids or CPU limits: " + cgroups.NO_DELEGATION)
    where = (", ".join(sorted(layout.controllers)) if layout.version == 1
             else f"unified at {layout.root}, corral/ under {layout.parent}")
    problem = cgroups.delegation_problem(layout)
    without = (f"one line on stderr and in `corral inspect` ('{cgroups.NO_DELEGATION}'); "
               f"RLIMIT_DATA caps each process's memory and RLIMIT_NPROC the sandbox's "
               f"tasks; no CPU quota, no cgroup-wide kill (the PID namespace still ends "
               f"everything)")
    if problem is None:
        how = "as root" if os.geteuid() == 0 else "delegated to you"
        return Check("cgroups", OK, f"v{layout.version} ({where}); writable {how}; "
                                    f"{_batch_group(layout)}", without)
    return Check("cgroups", DEGRADED, f"v{layout.version} ({where}); {problem}", without)


def _batch_group(layout) -> str:
    """What the deep tasks' group (corral-batch/, beside corral/) weighs now."""
    from corral.sandbox import cgroups
    from corral.sandbox.procinfo import read_or_none

    cpu = layout.in_group(cgroups.BATCH_DIR).bases()["cpu"]
    knob = "cpu.shares" if layout.version == 1 else "cpu.weight"
    value = read_or_none(os.path.join(cpu, knob), strip=True)
    if value is None:
        return (f"deep tasks: {cgroups.BATCH_DIR}/ not made yet (a daemon makes it at its "
                f"task_cpu_weight)")
    return f"deep tasks: {cgroups.BATCH_DIR}/ at {knob} {value}"


def check_cgroup_moves() -> Check:
    """Whether moving a process into a cgroup waits for an RCU grace period (each spawn
    and exec moves one): sandbox/cgroup_tuning.py. Doctor only reads; a root sandbox start
    turns the flag on unless configured not to."""
    from corral.sandbox import cgroup_tuning

    without = ("each sandbox start and exec after a quiet spell waits out an RCU grace period "
               "when it joins its cgroup (about 15 ms measured on a v1 host); a root "
               "`corral run` or daemon turns favordynmods on unless "
               f"{cgroup_tuning.ENV}=0 or cgroup_favordynmods = false")
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    if cgroup_tuning.is_on(text):
        return Check("cgroup moves", OK, "cgroup2 favordynmods is on: a move into a cgroup "
                     "never waits for an RCU grace period", without)
    if not cgroup_tuning.cgroup2_mounts(text):
        return Check("cgroup moves", DEGRADED, "no cgroup2 hierarchy mounted, so "
                     "favordynmods cannot be set (boot with cgroup_favordynmods=true)", without)
    return Check("cgroup moves", DEGRADED, "cgroup2 favordynmods is off", without)


def check_landlock() -> Check:
    from corral.sandbox import landlock

    abi = landlock.abi_version()
    without = ("writes are bounded by the mounts alone (read-only root and host "
               "directories, writable /workspace, /tmp, /dev/shm): no second layer")
    if abi <= 0:
        return Check("landlock", DEGRADED, "not available (kernel without it, or 'landlock' "
                     "missing from the lsm= boot parameter)", without)
    return Check("landlock", OK, f"ABI {abi}; rights used are those ABI {abi} knows", without)


def check_seccomp() -> Check:
    from corral.sandbox import seccomp
    from corral.sandbox.errors import CorralError

    mode = None
    for line in (read_or_none("/proc/self/status") or "").splitlines():
        if line.startswith("Seccomp:"):
            mode = line.split()[1]
    without = ("sandboxes cannot start with a profile; only --profile unconfined runs "
               "(and Corral then refuses a writable directory of yours)")
    if mode is None:
        return Check("seccomp", MISSING, "the kernel has no seccomp (CONFIG_SECCOMP_FILTER)",
                     without, required=True)
    try:
        bpf = seccomp.prepare(seccomp.load_profile("default"))
    except CorralError as exc:
        return Check("seccomp", MISSING, f"filter mode available; {exc}", without,
                     required=True)
    return Check("seccomp", OK, f"filter mode; the default profile compiles to "
                 f"{len(bpf or b'') // 8} BPF instructions (libseccomp)", without,
                 required=True)


def check_overlayfs() -> Check:
    have = "overlay" in (read_or_none("/proc/filesystems") or "").split()
    modular = os.path.exists(f"/lib/modules/{platform.release()}/kernel/fs/overlayfs")
    without = ("native sandboxes do not use it; the docker backend's private engine falls "
               "back to the vfs storage driver (full copies: slower, more disk)")
    if have:
        return Check("overlayfs", OK, "in /proc/filesystems (the docker backend's engine "
                     "stores images with overlay2)", without)
    if modular:
        return Check("overlayfs", OK, "module present, loaded on first use", without)
    return Check("overlayfs", DEGRADED, "not in this kernel", without)


def check_egress() -> Check:
    """--allow-net: transparent steering as root; the explicit proxy only as a user."""
    from corral.sandbox import net

    without = net.ROOTLESS_NOTE
    if os.geteuid() != 0:
        return Check("egress", DEGRADED, "as a user: HTTP(S) through HTTP_PROXY and DNS only "
                     "(steering every connection needs BPF sk_lookup, CAP_BPF and "
                     "CAP_NET_ADMIN on the host)", without)
    return Check("egress", OK, "transparent steering: a veth per sandbox and BPF sk_lookup "
                 "hand every TCP and UDP flow to the audited proxy", without)


def _fstype(path: str) -> str:
    best, kind = "", "?"
    for line in (read_or_none("/proc/self/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) > 2:
            point = fields[1].replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                    best):
                best, kind = point, fields[2]
    return kind


CHECKS = (check_user_namespaces, check_subordinate_ids, check_idmapped_mounts, check_cgroups,
          check_cgroup_moves, check_landlock, check_seccomp, check_overlayfs, check_egress)


def run_checks() -> list[Check]:
    out = []
    for check in CHECKS:
        try:
            out.append(check())
        except Exception as exc:  # noqa: BLE001 - one broken probe must not hide the rest
            name = check.__name__.removeprefix("check_").replace("_", " ")
            out.append(Check(name, MISSING, f"the check itself failed: {exc!r}", "-"))
    return out


def who() -> str:
    import pwd

    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return f"{name} (uid {uid}, {'root' if uid == 0 else 'rootless'})"


def render(checks: list[Check]) -> str:
    lines = [f"corral doctor for {who()} on Linux {platform.release()}", ""]
    width = max(len(c.feature) for c in checks)
    for c in checks:
        lines.append(f"{c.feature:<{width}}  {c.status.upper() if c.status != OK else 'ok':<9} "
                     f"{c.found}")
        if c.status != OK and c.without != "-":
            lines.append(f"{'':<{width}}  {'':<9} without it: {c.without}")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.json:
        sys.stdout.write(json.dumps({
            "user": who(), "uid": os.geteuid(), "rootless": os.geteuid() != 0,
            "kernel": platform.release(), "checks": [asdict(c) for c in checks],
        }, indent=2) + "\n")
    else:
        sys.stdout.write(render(checks))
    return EXIT_MISSING if any(c.required and c.status == MISSING for c in checks) else 0
