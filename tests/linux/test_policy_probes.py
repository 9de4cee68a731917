"""The default policy, proven from inside real sandboxes: one probe per line, exact outcomes.

Each probe runs sandbox/probes/inside.py, the conformance suite's probe program (bound
read-only at /probes), in a fresh default sandbox and asserts exactly what the kernel
answered: the errno name, the signal, the absence, the value read. Where two layers guard
the same thing, the test says which one answers first for the flags used (e.g. O_TRUNC
meets the read-only mount before the permission check; a plain O_WRONLY meets the
permission check first).

Every probe is harmless if it escapes: it writes back what it read, removes what it creates,
detaches what it attaches, changes only the sandbox's own namespaces, and the one network
probe that leaves the sandbox targets only 127.0.0.1 of the host, where this test listens.
No probe ever runs outside a sandbox.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from corral.sandbox import DEVNULL, PIPE, BindMount, Sandbox, SandboxSpec, contain, ids, mounts, run
from corral.sandbox import landlock as landlock_mod

from .conftest import (
    INSIDE,
    MiB,
    alive,
    cgroup_dirs,
    command_names,
    host_status,
    inside,
    parse_probe,
    probe_spec,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

if os.uname().machine != "x86_64":
    pytest.skip("inside.py's syscall numbers are x86_64's", allow_module_level=True)

SIGSYS = int(signal.SIGSYS)
ZERO_CAPS = "0000000000000000"


def param(case_id: str, *values):
    return pytest.param(*values, id=case_id)


# == identity: user namespace, capabilities, no_new_privs, seccomp ==========================

STATUS_LINES = [
    param("CapInh", "CapInh", ZERO_CAPS),
    param("CapPrm", "CapPrm", ZERO_CAPS),
    param("CapEff", "CapEff", ZERO_CAPS),
    param("CapBnd", "CapBnd", ZERO_CAPS),
    param("CapAmb", "CapAmb", ZERO_CAPS),
    param("NoNewPrivs", "NoNewPrivs", "1"),
    param("Seccomp-filter-mode", "Seccomp", "2"),
    param("uid-root-inside", "Uid", "0 0 0 0"),
    param("gid-root-inside", "Gid", "0 0 0 0"),
]


@pytest.mark.parametrize("key,expected", STATUS_LINES)
def test_status_of_a_command(key, expected):
    p = inside("status")
    assert p.ok, p
    assert p.value[key] == expected


@pytest.mark.parametrize("path", [param("uid_map", "/proc/self/uid_map"),
                                  param("gid_map", "/proc/self/gid_map")])
def test_id_maps(path):
    """Root inside is the first id of the sandbox's own 65536-id range of Corral's pool."""
    p = inside("read", path)
    assert p.ok, p
    inside_id, base, count = (int(x) for x in p.value.split())
    pool = ids.pool()
    assert (inside_id, count) == (0, 65536)
    assert pool.start <= base and base + count <= pool.end and (base - pool.start) % count == 0


def test_setgroups_is_denied():
    p = inside("read", "/proc/self/setgroups")
    assert p.ok, p
    assert p.value.strip() == "deny"


def test_root_inside_is_an_unprivileged_id_on_the_host():
    with Sandbox.create(probe_spec()) as sb:
        proc = sb.exec(["sleep", "30"], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
        try:
            assert wait_until(lambda: host_status(proc.pid)["Name"] == "sleep")
            status = host_status(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    base = sb.spec.uid_base
    assert status["Uid"] == f"{base} {base} {base} {base}"
    assert status["Gid"] == f"{base} {base} {base} {base}"
    assert status["CapEff"] == ZERO_CAPS
    assert status["CapBnd"] == ZERO_CAPS


@pytest.mark.parametrize("ns", ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"])
def test_namespace_differs_from_the_host(ns):
    p = inside("namespaces")
    assert p.ok, p
    assert p.value[ns].startswith(f"{ns}:[")
    assert p.value[ns] != os.readlink(f"/proc/self/ns/{ns}")


def test_hostname_is_the_sandbox_own():
    p = inside("read", "/proc/sys/kernel/hostname")
    assert p.value == "corral\n"


def test_only_the_sandbox_processes_are_visible():
    p = inside("pids_settled")
    # PID 1 (corral-init) and the probe itself: nothing of the host.
    assert p.value["all"] == sorted({1, p.value["self"]})


def test_cgroup_view_is_rooted_at_the_sandbox():
    p = inside("read", "/proc/self/cgroup")
    lines = p.value.splitlines()
    assert lines
    assert [line.rsplit(":", 1)[1] for line in lines] == ["/"] * len(lines)


def test_setuid_root_binary_gains_nothing():
    """newgrp is setuid root on the host. Inside, its owner is unmapped, the mounts are
    nosuid and no_new_privs is set: it runs as the sandbox's root with no capabilities.
    While it is blocked writing its first message (stderr is a full pipe), the host sees
    its credentials: effective uid 0 would mean the setuid bit took effect."""
    st = inside("stat", "/usr/bin/newgrp")
    assert st.value["mode"] & 0o4000, "precondition: newgrp is setuid on this host"
    assert st.value["uid"] == 65534  # host root, unmapped inside: the overflow uid
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_end, False)
    filler = 0
    try:
        while True:
            filler += os.write(write_end, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    drained = bytearray()
    with Sandbox.create(probe_spec()) as sb:
        proc = sb.exec(["/usr/bin/newgrp", "nogroup"], stdin=DEVNULL, stdout=DEVNULL,
                       stderr=write_end)
        os.close(write_end)
        try:
            assert wait_until(lambda: host_status(proc.pid)["Name"] == "newgrp"
                              and host_status(proc.pid)["State"].startswith("S"))
            status = host_status(proc.pid)
        finally:
            def drain():
                while chunk := os.read(read_end, 65536):
                    drained.extend(chunk)

            reader = threading.Thread(target=drain)
            reader.start()
            proc.wait()
            reader.join()
            os.close(read_end)
    base = sb.spec.uid_base
    assert status["Uid"] == f"{base} {base} {base} {base}"
    assert status["CapEff"] == ZERO_CAPS
    assert status["CapPrm"] == ZERO_CAPS
    assert status["NoNewPrivs"] == "1"
    assert proc.returncode == 1
    assert bytes(drained[filler:]) == (b"setgroups: Operation not permitted\n"
                                       b"setgid: Operation not permitted\n")


# == filesystem view ========================================================================


def _host_has(path: str) -> bool:
    return os.path.lexists(path)


def _support_tops() -> set[str]:
    """Top directories of the read-only support files every sandbox gets (agent helper)."""
    return {path.split("/")[1] for path in contain.support_files()}


def test_root_directory_lists_exactly_the_policy():
    expected = {os.path.basename(d) for d in mounts.HOST_SYSTEM_DIRS if _host_has(d)}
    expected |= {"dev", "etc", "proc", "tmp", "workspace", "probes"} | _support_tops()
    p = inside("listdir", "/")
    assert p.value == sorted(expected)


def test_support_files_are_all_there_is_of_their_directories():
    """/opt holds the agent helper and nothing of the host's /opt."""
    for sandbox_path in contain.support_files():
        directory, name = os.path.split(sandbox_path)
        p = inside("listdir", directory)
        assert p.value == [name]
        top = "/" + sandbox_path.split("/")[1]
        assert inside("listdir", top).value == [sandbox_path.split("/")[2]]
        # A host file owned by the host's root: the permission check answers first.
        assert inside("open", sandbox_path, "O_WRONLY").outcome == "EACCES"
        with Sandbox.create(probe_spec()) as sb:
            assert "ro" in _mount_options(sb, sandbox_path)


def test_etc_holds_only_generated_files_and_harmless_host_entries():
    generated = set(mounts.etc_files(SandboxSpec()))
    shared = {os.path.basename(e) for e in mounts.HOST_ETC_ENTRIES if _host_has(e)}
    p = inside("listdir", "/etc")
    assert p.value == sorted(generated | shared)


def test_dev_lists_exactly_the_minimal_set():
    p = inside("listdir", "/dev")
    assert p.value == ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
                       "stdin", "stdout", "tty", "urandom", "zero"]


@pytest.mark.parametrize("name,rdev", [
    ("null", [1, 3]), ("zero", [1, 5]), ("full", [1, 7]), ("random", [1, 8]),
    ("urandom", [1, 9]), ("tty", [5, 0]),
])
def test_device_node(name, rdev):
    p = inside("stat", f"/dev/{name}")
    assert (p.value["kind"], p.value["rdev"]) == ("chr", rdev)


HOST_PATHS_OUT_OF_VIEW = [
    "/root", "/home", "/var", "/etc/shadow", "/etc/sudoers", "/etc/ssh", "/sys", "/run",
    "/run/corral", "/boot", "/srv", "/mnt", "/media", "/work",
    os.path.dirname(os.path.abspath(__file__)),  # this repository
    os.path.realpath(sys.prefix),  # the runtime's virtualenv
]


@pytest.mark.parametrize("path", HOST_PATHS_OUT_OF_VIEW)
def test_host_path_is_absent(path):
    p = inside("stat", path)
    assert p.outcome == "ENOENT"


def test_host_tmp_is_not_shared():
    marker = f"/tmp/corral-probe-marker-{uuid.uuid4().hex}"
    with open(marker, "w") as f:
        f.write("host secret\n")
    try:
        p = inside("stat", marker)
    finally:
        os.unlink(marker)
    assert p.outcome == "ENOENT"


@pytest.mark.parametrize("path", mounts.PROC_MASKED_FILES)
def test_proc_file_is_masked(path):
    """Each masked /proc file is the null device: reads are empty and a write goes
    nowhere. (write_null writes only after fstat shows 1:3.) Files this kernel lacks stay absent."""
    p = inside("write_null", path)
    if not _host_has(path):
        assert p.outcome == "ENOENT"
        return
    assert p.outcome == "ok", p
    assert p.value == 1
    st = inside("stat", path)
    assert (st.value["kind"], st.value["rdev"]) == ("chr", [1, 3])
    assert inside("read", path).value == ""


@pytest.mark.parametrize("path", mounts.PROC_MASKED_DIRS)
def test_proc_directory_is_masked(path):
    p = inside("listdir", path)
    if not _host_has(path):
        assert p.outcome == "ENOENT"
    else:
        assert p.value == []


@pytest.mark.parametrize("flags,expected", [
    # O_TRUNC asks for write access to the mount first: the read-only bind answers.
    param("O_TRUNC-meets-ro-mount", "O_WRONLY|O_TRUNC", "EROFS"),
    # Without it the sysctl's own permission check runs first: only the host's root may.
    param("O_WRONLY-meets-sysctl-permission", "O_WRONLY", "EACCES"),
])
def test_core_pattern_cannot_be_written(flags, expected):
    with open("/proc/sys/kernel/core_pattern") as f:
        host_before = f.read()
    p = inside("rewrite", "/proc/sys/kernel/core_pattern", flags)
    with open("/proc/sys/kernel/core_pattern") as f:
        assert f.read() == host_before
    assert p.outcome == expected


@pytest.mark.parametrize("flags", ["O_WRONLY", "O_RDWR"])
def test_proc_self_exe_cannot_be_opened_for_writing(flags):
    """/proc/self/exe is the host's python, on a read-only bind and owned by the host's
    root: without a DAC override the permission check refuses before the mount is asked.
    (inside.py's open only opens: nothing would be written even if the open succeeded.)"""
    link = inside("readlink", "/proc/self/exe")
    assert link.value == os.path.realpath("/usr/bin/python3")
    assert inside("open", "/proc/self/exe", flags).outcome == "EACCES"


def test_proc_self_exe_cannot_be_truncated(tmp_path):
    """O_TRUNC asks the mount for write access before any permission check: EROFS. An
    escape would truncate the binary, so the probe runs on a copy of python, bound
    read-only like /usr is; the host's own python is never the target."""
    host_python = os.path.realpath("/usr/bin/python3")
    os.chmod(tmp_path, 0o755)
    copy = tmp_path / "python3"
    shutil.copy2(host_python, copy)
    size = copy.stat().st_size
    spec = probe_spec(binds=(BindMount(str(tmp_path), "/copy", writable=False),))
    result = run(["/copy/python3", "-I", "/probes/inside.py", "open", "/proc/self/exe",
                  "O_WRONLY|O_TRUNC"], spec)
    p = parse_probe(result.stdout, result.stderr, result.returncode, result.reason)
    assert copy.stat().st_size == size
    assert p.outcome == "EROFS", p


@pytest.mark.parametrize("op,path", [
    param("exe-link", "readlink", "/proc/1/exe"),  # corral-init lives outside the view
    param("exe-open", "open", "/proc/1/exe"),
    param("root", "readlink", "/proc/1/root"),
    param("cwd", "readlink", "/proc/1/cwd"),
    param("environ", "read", "/proc/1/environ"),
    param("mem", "read", "/proc/1/mem"),
])
def test_pid1_is_not_inspectable(op, path):
    """corral-init is non-dumpable, so ptrace-mode access to it needs CAP_SYS_PTRACE."""
    assert inside(op, path).outcome == "EACCES"


WRITES = [
    # (case, inside.py args, exact outcome)
    param("create-in-usr", ["open", "/usr/corral-probe", "O_WRONLY|O_CREAT"], "EROFS"),
    param("mkdir-in-usr", ["mkdir", "/usr/corral-probe"], "EROFS"),
    param("host-binary-O_WRONLY", ["open", "/usr/bin/python3.11", "O_WRONLY"], "EACCES"),
    param("etc-passwd", ["open", "/etc/passwd", "O_WRONLY"], "EROFS"),
    param("etc-passwd-O_TRUNC", ["open", "/etc/passwd", "O_WRONLY|O_TRUNC"], "EROFS"),
    param("etc-hosts", ["open", "/etc/hosts", "O_WRONLY"], "EROFS"),
    param("create-in-etc", ["open", "/etc/corral-probe", "O_WRONLY|O_CREAT"], "EROFS"),
    param("create-in-root", ["open", "/corral-probe", "O_WRONLY|O_CREAT"], "EROFS"),
    param("create-in-dev", ["open", "/dev/corral-probe", "O_WRONLY|O_CREAT"], "EROFS"),
    param("mknod-in-dev", ["mknod", "/dev/corral-probe", "char"], "EROFS"),
    param("proc-sys-file", ["open", "/proc/sys/kernel/hostname", "O_WRONLY|O_TRUNC"], "EROFS"),
    param("workspace", ["open", "/workspace/corral-probe", "O_WRONLY|O_CREAT"], "ok"),
    param("tmp", ["open", "/tmp/corral-probe", "O_WRONLY|O_CREAT"], "ok"),
    param("dev-shm", ["open", "/dev/shm/corral-probe", "O_WRONLY|O_CREAT"], "ok"),
    param("dev-null", ["write_null", "/dev/null"], "ok"),
]


@pytest.mark.parametrize("args,expected", WRITES)
def test_write(args, expected):
    assert inside(*args).outcome == expected


def test_workspace_writes_reach_the_host_directory():
    with Sandbox.create(probe_spec()) as sb:
        proc = sb.exec(["/bin/sh", "-c", "echo from-inside > /workspace/note"])
        proc.communicate()
        path = os.path.join(sb.workspace, "note")
        with open(path) as f:
            content = f.read()
        owner = os.stat(path).st_uid
    assert proc.returncode == 0
    assert content == "from-inside\n"
    assert owner == sb.spec.uid_base  # Corral's own workspace: made for the sandbox's root


# == landlock ===============================================================================


def _mount_options(sandbox: Sandbox, target: str) -> set[str]:
    proc = sandbox.exec(["cat", "/proc/self/mountinfo"])
    out, _ = proc.communicate()
    for line in out.decode().splitlines():
        fields = line.split()
        if fields[4] == target:
            return set(fields[5].split(","))
    raise AssertionError(f"{target} is not a mount point")


@pytest.mark.parametrize("device", ["full", "zero", "urandom"])
def test_landlock_alone_refuses_writing_a_device(device):
    """The device is a writable bind mount and mode 0666: only landlock can refuse."""
    assert landlock_mod.abi_version() > 0, "the policy needs landlock; this kernel lacks it"
    with Sandbox.create(probe_spec()) as sb:
        options = _mount_options(sb, f"/dev/{device}")
        st = inside("stat", f"/dev/{device}", sandbox=sb)
        p = inside("open", f"/dev/{device}", "O_WRONLY", sandbox=sb)
    assert "rw" in options
    assert st.value["mode"] == 0o666
    assert p.outcome == "EACCES"


@pytest.mark.parametrize("args,expected", [
    # /proc is a writable mount and the file is the process's own: landlock refuses.
    param("proc-self-comm", ["open", "/proc/self/comm", "O_WRONLY"], "EACCES"),
    # Character devices may not be made even where files may (and CAP_MKNOD is gone too,
    # but landlock's check comes first).
    param("mknod-char-in-tmp", ["mknod", "/tmp/corral-probe", "char"], "EACCES"),
    param("mknod-char-in-workspace", ["mknod", "/workspace/corral-probe", "char"], "EACCES"),
    param("mknod-fifo-in-tmp", ["mknod", "/tmp/corral-probe", "fifo"], "ok"),
])
def test_landlock_rule(args, expected):
    assert inside(*args).outcome == expected


@pytest.mark.parametrize("writable,expected", [
    param("rw-bind", True, "ok"),
    param("ro-bind", False, "EROFS"),
])
def test_user_bind_mount(tmp_path, writable, expected):
    os.chmod(tmp_path, 0o700)  # idmapped: its owner is root inside, whatever its mode
    spec = probe_spec(binds=(BindMount(str(tmp_path), "/data", writable),))
    p = inside("open", "/data/corral-probe", "O_WRONLY|O_CREAT", spec=spec)
    assert p.outcome == expected
    assert os.listdir(tmp_path) == []


# == seccomp ================================================================================

SECCOMP_DENIALS = [
    # (case, inside.py args, exact errno) -- see sandbox/profiles/default.json
    param("mount", ["syscall", "mount", "s:none", "s:/tmp", "s:tmpfs", "0", "null"], "EPERM"),
    param("umount-a-proc-mask", ["syscall", "umount2", "s:/proc/kallsyms", "2"], "EPERM"),
    param("pivot_root", ["syscall", "pivot_root", "s:.", "s:."], "EPERM"),
    param("chroot", ["syscall", "chroot", "s:/tmp"], "EPERM"),
    param("fsopen", ["syscall", "fsopen", "s:tmpfs", "0"], "EPERM"),
    param("fspick", ["syscall", "fspick", "-100", "s:/tmp", "0"], "EPERM"),
    param("fsmount", ["syscall", "fsmount", "-1", "0", "0"], "EPERM"),
    param("open_tree", ["syscall", "open_tree", "-100", "s:/tmp", "1"], "EPERM"),
    param("move_mount", ["syscall", "move_mount", "-1", "s:", "-100", "s:/tmp", "0"], "EPERM"),
    param("mount_setattr", ["syscall", "mount_setattr", "-100", "s:/tmp", "0", "buf:32", "32"],
          "EPERM"),
    param("unshare-user", ["syscall", "unshare", "0x10000000"], "EPERM"),
    param("unshare-mount", ["syscall", "unshare", "0x00020000"], "EPERM"),
    param("clone-newuser", ["syscall", "clone", "0x10000011", "0", "null", "null", "0"], "EPERM"),
    param("clone-newns", ["syscall", "clone", "0x00020011", "0", "null", "null", "0"], "EPERM"),
    param("clone-newnet", ["syscall", "clone", "0x40000011", "0", "null", "null", "0"], "EPERM"),
    param("setns-own-net", ["syscall", "setns", "fd:/proc/self/ns/net", "0"], "EPERM"),
    param("io_uring_setup", ["syscall", "io_uring_setup", "8", "buf:120"], "EPERM"),
    param("io_uring_enter", ["syscall", "io_uring_enter", "-1", "0", "0", "0", "null", "0"],
          "EPERM"),
    param("userfaultfd", ["syscall", "userfaultfd", "0x80000"], "EPERM"),
    param("keyctl", ["syscall", "keyctl", "0", "-3", "0"], "EPERM"),
    param("add_key", ["syscall", "add_key", "s:user", "s:corral-probe", "s:x", "1", "-2"],
          "EPERM"),
    param("request_key", ["syscall", "request_key", "s:user", "s:corral-probe", "null", "0"],
          "EPERM"),
    param("bpf", ["syscall", "bpf", "0", "buf:128", "128"], "EPERM"),
    param("perf_event_open", ["syscall", "perf_event_open", "buf:128", "0", "-1", "-1", "0"],
          "EPERM"),
    param("ptrace-attach-pid1", ["ptrace_attach", "1"], "EPERM"),
    param("process_vm_readv-pid1", ["process_vm_readv", "1"], "EPERM"),
    param("process_vm_writev", ["syscall", "process_vm_writev", "1", "null", "0", "null", "0",
                                "0"], "EPERM"),
    param("kcmp", ["syscall", "kcmp", "1", "1", "0", "0", "0"], "EPERM"),
    param("kexec_load", ["syscall", "kexec_load", "0", "0", "null", "0"], "EPERM"),
    param("kexec_file_load", ["syscall", "kexec_file_load", "-1", "-1", "0", "s:", "0"], "EPERM"),
    param("init_module", ["syscall", "init_module", "null", "0", "s:"], "EPERM"),
    param("finit_module", ["syscall", "finit_module", "-1", "s:", "0"], "EPERM"),
    param("delete_module", ["syscall", "delete_module", "s:corral_probe_none", "0"], "EPERM"),
    param("open_by_handle_at", ["syscall", "open_by_handle_at", "-100", "buf:128", "0"],
          "EPERM"),
    param("name_to_handle_at", ["syscall", "name_to_handle_at", "-100", "s:/", "buf:128",
                                "buf:4", "0"], "EPERM"),
    param("personality-READ_IMPLIES_EXEC", ["syscall", "personality", "0x0400000"], "EPERM"),
    param("personality-ADDR_NO_RANDOMIZE", ["syscall", "personality", "0x0040000"], "EPERM"),
    param("sethostname", ["syscall", "sethostname", "s:corral", "6"], "EPERM"),
    param("iopl", ["syscall", "iopl", "3"], "EPERM"),
    param("ioperm", ["syscall", "ioperm", "0x80", "1", "1"], "EPERM"),
    param("syslog-read-all", ["syscall", "syslog", "3", "buf:64", "64"], "EPERM"),
    param("reboot-bad-magic", ["syscall", "reboot", "0", "0", "0", "null"], "EPERM"),
    param("fanotify_init", ["syscall", "fanotify_init", "0", "0"], "EPERM"),
    param("settimeofday-noop", ["syscall", "settimeofday", "null", "null"], "EPERM"),
    param("clone3", ["clone3"], "ENOSYS"),  # so that glibc falls back to clone
]


@pytest.mark.parametrize("args,expected", SECCOMP_DENIALS)
def test_seccomp_denies(args, expected):
    p = inside(*args)
    assert p.outcome == expected, p


@pytest.mark.parametrize("args", [
    param("threads", ["threads", "4"]),
    param("personality-query", ["syscall", "personality", "0xffffffff"]),
    param("landlock-abi-query", ["syscall", "landlock_create_ruleset", "null", "0", "1"]),
])
def test_seccomp_allows(args):
    """clone3's ENOSYS must leave threads working (pthread_create falls back to clone)."""
    p = inside(*args)
    assert p.outcome == "ok", p
    if args[0] == "threads":
        assert p.value == 4  # four distinct thread ids


@pytest.mark.parametrize("op", ["x32_getpid", "i386_getpid"])
def test_foreign_syscall_abi_kills_the_process(op):
    p = inside(op)
    assert (p.ok, p.returncode, p.reason) == (None, -SIGSYS, "signaled")


FILTER_DIFFERENTIAL = [
    # Probes the kernel alone would let through (or answer differently): the answer under
    # the default profile must be the filter's, which "unconfined" shows is not the kernel's.
    param("io_uring_setup", ["syscall", "io_uring_setup", "8", "buf:120"], "EPERM"),
    param("clone3", ["clone3"], "ENOSYS"),
    param("keyctl", ["syscall", "keyctl", "0", "-3", "0"], "EPERM"),
    param("unshare-user", ["syscall", "unshare", "0x10000000"], "EPERM"),
    param("personality", ["syscall", "personality", "0x0400000"], "EPERM"),
    param("AF_VSOCK", ["socket", "40"], "EAFNOSUPPORT"),
    param("bpf", ["syscall", "bpf", "0", "buf:128", "128"], "EPERM"),
    param("open_by_handle_at", ["syscall", "open_by_handle_at", "-100", "buf:128", "0"],
          "EPERM"),
    param("TIOCSTI-on-devnull", ["tiocsti", "stdin"], "EPERM"),
    param("i386", ["i386_getpid"], f"signal {SIGSYS}"),
    param("x32", ["x32_getpid"], f"signal {SIGSYS}"),
]


@pytest.mark.parametrize("args,expected", FILTER_DIFFERENTIAL)
def test_the_filter_is_what_denies(args, expected):
    kw = {"stdin": DEVNULL} if args[0] == "tiocsti" else {}
    with Sandbox.create(probe_spec()) as sb:
        confined = inside(*args, sandbox=sb, **kw)
    with Sandbox.create(probe_spec(profile="unconfined")) as sb:
        unconfined = inside(*args, sandbox=sb, **kw)
    assert confined.outcome == expected
    if unconfined.outcome == expected:
        pytest.skip(f"this kernel itself answers {expected}: the filter's part cannot be seen")


SOCKETS = [
    param("AF_VSOCK", ["socket", "40", "1"], "EAFNOSUPPORT"),
    param("AF_PACKET", ["socket", "17", "3", "0"], "EAFNOSUPPORT"),
    param("AF_ALG", ["socket", "38", "5"], "EAFNOSUPPORT"),
    param("AF_BLUETOOTH", ["socket", "31", "1"], "EAFNOSUPPORT"),
    param("AF_KEY", ["socket", "15", "3", "2"], "EAFNOSUPPORT"),
    param("NETLINK_AUDIT", ["socket", "16", "3", "9"], "EPROTONOSUPPORT"),
    param("NETLINK_NETFILTER", ["socket", "16", "3", "12"], "EPROTONOSUPPORT"),
    param("socketpair-AF_INET", ["socketpair", "2"], "EAFNOSUPPORT"),
    param("NETLINK_ROUTE", ["socket", "16", "3", "0"], "ok"),
    param("AF_UNIX", ["socket", "1", "1"], "ok"),
    param("AF_INET", ["socket", "2", "1"], "ok"),
    param("AF_INET6", ["socket", "10", "2"], "ok"),
    param("socketpair-AF_UNIX", ["socketpair", "1"], "ok"),
]


@pytest.mark.parametrize("args,expected", SOCKETS)
def test_socket_family(args, expected):
    assert inside(*args).outcome == expected


# == terminals ==============================================================================


@pytest.mark.parametrize("target,request_code,stdin", [
    param("stdin-pipe", "stdin", "0x5412", PIPE),
    param("stdin-devnull", "stdin", "0x5412", DEVNULL),
    # A pty of the sandbox's own devpts: the byte would only reach its own terminal.
    param("own-pty", "pty", "0x5412", DEVNULL),
    param("own-pty-high-bits-set", "pty", "0x100005412", DEVNULL),
    param("TIOCLINUX-own-pty", "pty", "0x541c", DEVNULL),
])
def test_tiocsti_is_denied(target, request_code, stdin):
    with Sandbox.create(probe_spec()) as sb:
        p = inside("tiocsti", target, request_code, sandbox=sb, stdin=stdin)
    assert p.outcome == "EPERM", p


def test_no_controlling_terminal():
    assert inside("open", "/dev/tty", "O_RDWR").outcome == "ENXIO"
    session = inside("sid").value
    assert session["sid"] == session["pid"] == session["pgid"]  # a new session's leader


# == network ================================================================================


def test_only_loopback():
    assert inside("interfaces").value == ["lo"]


def test_loopback_works_inside():
    assert inside("loopback_echo").value == "ping"


def test_host_loopback_listener_is_unreachable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        p = inside("connect_tcp", "127.0.0.1", str(port))
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert p.outcome == "ECONNREFUSED"


# == processes ==============================================================================


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_to_pid1_from_inside_is_ignored(sig):
    with Sandbox.create(probe_spec()) as sb:
        p = inside("kill", "1", str(int(sig)), sandbox=sb)
        init_alive = alive(sb.init_pid)
        after = inside("pids_settled", sandbox=sb)
    assert p.outcome == "ok"  # the kernel accepts it and drops it: PID 1 has no handler
    assert init_alive
    assert after.outcome == "ok"


def test_joining_commands_cannot_be_hijacked():
    """A command watches for processes being joined into its sandbox, and tries to open
    each one's /proc/PID/mem and exe for writing (the CVE-2019-5736 pattern: before its
    execve a joining command still runs the runtime's image, in the runtime's memory).
    A joiner caught after its execve is `true`, the sandbox's own process, which the
    watcher may open as any process of the sandbox (no Yama here): its command line carries
    the marker, so it is counted apart and only a joiner still in the runtime's image can
    fail the test (on a loaded machine the watcher often sees a joiner only after exec)."""
    marker = "corral-join-test-" + os.urandom(4).hex()
    with Sandbox.create(probe_spec()) as sb:
        watcher = sb.exec([*INSIDE, "join_watch", "2", marker], stdin=DEVNULL)
        time.sleep(0.3)
        joined = 0
        while watcher.poll() is None:
            proc = sb.exec(["true", marker], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
            proc.wait()
            joined += 1
        out, err = watcher.communicate()
    p = parse_probe(out, err, watcher.returncode, watcher.reason)
    assert p.outcome == "ok", p.value
    assert joined > 0
    assert p.value["seen"] > 0
    assert set(p.value["refused"]) <= {"mem:EACCES", "exe:EACCES", "mem:ENOENT", "exe:ENOENT"}


def test_double_forked_daemon_dies_with_the_sandbox():
    sb = Sandbox.create(probe_spec())
    try:
        proc = sb.exec(["/bin/sh", "-c", "(setsid sleep 1000 &)"], stdin=DEVNULL,
                       stdout=DEVNULL, stderr=DEVNULL)
        assert proc.wait() == 0
        # The subshell forks, setsid execs sleep, the subshell and sh exit: wait for that.
        assert wait_until(lambda: command_names(sb) == ["sleep"])
        pids = sb.pids()
        sandbox_id = sb.id
    finally:
        sb.destroy()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert cgroup_dirs(sandbox_id) == []


# == resources ==============================================================================


def test_fork_bomb_stops_at_the_pids_limit():
    with Sandbox.create(probe_spec(pids_max=32)) as sb:
        p = inside("forkbomb", "512", sandbox=sb)
        after = inside("pids_settled", sandbox=sb)
    assert p.errno == "EAGAIN"
    # PID 1 and the probe count against the limit; so may, for a moment, the relay that
    # started the probe (it exits once the probe has exec'd). The limit is what stopped it.
    assert 32 - 3 <= p.value["forked"] <= 32 - 2
    # the bomb is defused and the sandbox still works: PID 1 and the new probe only
    assert after.outcome == "ok"
    assert after.value["all"] == sorted({1, after.value["self"]})
    # the host is not affected: this process can still start one
    assert subprocess.run(["true"]).returncode == 0


def test_memory_balloon_is_killed_by_the_limit():
    p = inside("balloon", "1024", spec=probe_spec(memory_bytes=64 * MiB))
    assert (p.ok, p.returncode, p.reason) == (None, -signal.SIGKILL, "oom")


@pytest.mark.parametrize("path", ["/tmp/fill", "/dev/shm/fill"])
def test_disk_fill_stops_at_the_tmpfs_cap(path):
    p = inside("fill", path, str(64 * MiB), spec=probe_spec(tmp_bytes=8 * MiB))
    assert p.errno == "ENOSPC"
    assert p.value["written"] == 8 * MiB


@pytest.mark.parametrize("offset,expected", [
    param("last-byte-allowed", MiB - 1, "ok"),
    param("first-byte-past", MiB, "EFBIG"),  # python ignores SIGXFSZ, so write() says EFBIG
])
def test_workspace_file_size_limit(offset, expected):
    p = inside("fsize", "/workspace/big", str(offset), spec=probe_spec(fsize_bytes=MiB))
    assert p.outcome == expected


def test_file_size_limit_signals_sigxfsz():
    """A program with default signal dispositions is killed by SIGXFSZ at the limit."""
    with Sandbox.create(probe_spec(fsize_bytes=MiB)) as sb:
        proc = sb.exec(["/bin/sh", "-c", "exec head -c 2097152 /dev/zero > /workspace/big"],
                       stdin=DEVNULL)
        proc.communicate()
        size = os.path.getsize(os.path.join(sb.workspace, "big"))
    assert (proc.returncode, proc.reason.value) == (-signal.SIGXFSZ, "signaled")
    assert size == MiB


def test_open_descriptors_stop_at_nofile():
    p = inside("nofile", "100000", spec=probe_spec(nofile=64))
    assert p.errno == "EMFILE"
    assert p.value["highest"] == 64


def test_rlimits():
    p = inside("rlimits", spec=probe_spec(nofile=200, fsize_bytes=3 * MiB))
    assert p.value == {"RLIMIT_CORE": [0, 0], "RLIMIT_NOFILE": [200, 200],
                       "RLIMIT_FSIZE": [3 * MiB, 3 * MiB]}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_cgroup_limits_as_the_host_sees_them():
    """Memory without swap, pids and the CPU quota, read back from the sandbox's cgroup."""
    with Sandbox.create(probe_spec(memory_bytes=96 * MiB, pids_max=40, cpus=0.5)) as sb:
        dirs = {os.path.basename(os.path.dirname(os.path.dirname(d))): d
                for d in cgroup_dirs(sb.id)}
        if "memory" in dirs:  # cgroup v1: one directory per controller
            memory, pids, cpu = dirs["memory"], dirs["pids"], dirs["cpu"]
            limits = {
                "memory": _read(f"{memory}/memory.limit_in_bytes"),
                "memory+swap": _read(f"{memory}/memory.memsw.limit_in_bytes"),
                "pids": _read(f"{pids}/pids.max"),
                "cpu": (int(_read(f"{cpu}/cpu.cfs_quota_us"))
                        / int(_read(f"{cpu}/cpu.cfs_period_us"))),
            }
        else:  # unified v2
            (unified,) = dirs.values()
            quota, period = _read(f"{unified}/cpu.max").split()
            limits = {
                "memory": _read(f"{unified}/memory.max"),
                "memory+swap": str(96 * MiB + int(_read(f"{unified}/memory.swap.max"))),
                "pids": _read(f"{unified}/pids.max"),
                "cpu": int(quota) / int(period),
            }
    assert limits == {"memory": str(96 * MiB), "memory+swap": str(96 * MiB), "pids": "40",
                      "cpu": 0.5}


def test_cpu_quota_throttles_a_busy_loop():
    """A tenth of a core for one wall-clock second: far less than a second of CPU."""
    p = inside("spin", "1.0", spec=probe_spec(cpus=0.1))
    assert p.ok, p
    assert 0 < p.value < 0.5


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_oom_pressure_while_joining_never_touches_the_runtime():
    """Commands join a sandbox pinned at its memory limit. Until execve a joining
    command shares the runtime's memory; the OOM killer must never pick it, or it would
    kill the runtime too. Run in a child process so a failure cannot take pytest down."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO_ROOT!r})
        from tests.linux.conftest import probe_spec
        from corral.sandbox import DEVNULL, Sandbox
        ballast = bytearray(b"x" * (200 << 20))  # a runtime bigger than any hog
        with Sandbox.create(probe_spec(memory_bytes=64 << 20)) as sb:
            hog = sb.exec(["/bin/sh", "-c",
                           "while :; do python3 -I /probes/inside.py balloon 1024; done"],
                          stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
            end, joined = time.monotonic() + 3, 0
            while time.monotonic() < end:
                sb.exec(["true"], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL).wait()
                joined += 1
            kills = sb.stats().get("oom_kills")
            hog.kill()
            hog.wait()
        print(joined, kills)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=90)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    joined, kills = map(int, result.stdout.split())
    assert joined > 0
    assert kills > 0  # the hog really did run into the limit meanwhile
