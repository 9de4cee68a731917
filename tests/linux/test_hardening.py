"""Issue 18, kernel side, proven from inside real sandboxes: no setuid/setgid files, no NUMA
policy or secret memory, per-user kernel quotas charged to the sandbox and not to host root.

Every probe is harmless if it escapes: a file given a setuid bit lives in the sandbox's own
/tmp or /workspace and is removed at once; the NUMA calls ask for the default policy; the
quota test's descriptors belong to a sandbox that is destroyed before the test ends.
"""

from __future__ import annotations

import ctypes
import os
import signal

import pytest

from corral.sandbox import DEVNULL, PIPE, Sandbox, contain

from .conftest import inside, probe_spec, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

if os.uname().machine != "x86_64":
    pytest.skip("inside.py's syscall numbers are x86_64's", allow_module_level=True)


def _mount_options(sandbox: Sandbox, target: str) -> set[str]:
    proc = sandbox.exec(["cat", "/proc/self/mountinfo"])
    out, _ = proc.communicate()
    for line in out.decode().splitlines():
        fields = line.split()
        if fields[4] == target:
            return set(fields[5].split(","))
    raise AssertionError(f"{target} is not a mount point")


# == setuid / setgid ========================================================================

SETID_REFUSED = [
    # (inside.py args): each fails with EPERM from the seccomp filter, before the kernel
    # sees the mode; the file the op made for it (0644) is removed.
    ("chmod", "/workspace", "4755"),
    ("chmod", "/workspace", "2755"),
    ("chmod", "/tmp", "6755"),
    ("chmod", "/workspace", "4755", "fchmod"),
    ("chmod", "/tmp", "2711", "fchmodat"),
    ("create_mode", "/workspace", "4755"),
    ("create_mode", "/tmp", "2755", "creat"),
    ("create_mode", "/workspace", "6755", "mknodat"),
]


def test_setuid_and_setgid_modes_are_refused_and_plain_modes_work():
    with Sandbox.create(probe_spec()) as sb:
        refused = {" ".join(args): inside(*args, sandbox=sb).outcome for args in SETID_REFUSED}
        plain = {
            "chmod 755": inside("chmod", "/workspace", "755", sandbox=sb).value,
            "fchmod 1777": inside("chmod", "/tmp", "1777", "fchmod", sandbox=sb).value,
            "create 755": inside("create_mode", "/workspace", "755", sandbox=sb).value,
        }
        left = os.listdir(sb.workspace)
    assert refused == {case: "EPERM" for case in refused}
    assert plain == {"chmod 755": {"mode": "0o755"}, "fchmod 1777": {"mode": "0o1777"},
                     "create 755": {"mode": "0o755"}}
    assert left == []


def test_openat2_says_not_implemented_so_callers_fall_back():
    """openat2's mode is in memory, out of the filter's sight: ENOSYS, like a 5.5 kernel."""
    p = inside("syscall", "openat2", "-100", "s:/tmp", "buf:24", "24")
    assert p.outcome == "ENOSYS", p


@pytest.mark.parametrize("target", ["/workspace", "/tmp", "/dev/shm"])
def test_writable_mounts_are_nosuid(target):
    with Sandbox.create(probe_spec()) as sb:
        options = _mount_options(sb, target)
    assert {"nosuid", "nodev", "rw"} <= options


# == NUMA policy, secret memory =============================================================


@pytest.mark.parametrize("args", [
    pytest.param(["syscall", "mbind", "0", "4096", "0", "null", "0", "0"], id="mbind"),
    pytest.param(["syscall", "set_mempolicy", "0", "null", "0"], id="set_mempolicy"),
    pytest.param(["syscall", "get_mempolicy", "null", "null", "0", "0", "0"],
                 id="get_mempolicy"),
    pytest.param(["syscall", "set_mempolicy_home_node", "0", "4096", "0", "0"],
                 id="set_mempolicy_home_node"),
    pytest.param(["syscall", "memfd_secret", "0"], id="memfd_secret"),
])
def test_memory_placement_calls_are_denied(args):
    assert inside(*args).outcome == "EPERM"


# == per-user kernel quotas =================================================================

libc = ctypes.CDLL(None, use_errno=True)
NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4)

HOLD_INOTIFY = """
import os, sys, ctypes
libc = ctypes.CDLL(None, use_errno=True)
held = []
while True:
    fd = libc.inotify_init1(0o2000000)
    if fd < 0:
        break
    held.append(fd)
print(len(held), ctypes.get_errno(), flush=True)
sys.stdin.read()
"""

def _host_root_inotify() -> int:
    """0, or the errno of one inotify_init1 by host root (in a forked child, whose
    descriptor dies with it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            fd = libc.inotify_init1(0o2000000)
            os.write(w, bytes([0 if fd >= 0 else ctypes.get_errno()]))
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return data[0]


def _namespace_owner(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        uid = ctypes.c_uint32()
        assert libc.ioctl(fd, NS_GET_OWNER_UID, ctypes.byref(uid)) == 0, ctypes.get_errno()
        return uid.value
    finally:
        os.close(fd)


def test_the_sandbox_user_namespace_belongs_to_its_own_host_uid():
    """The kernel charges per-user quotas spent inside to the namespace's owner: uid_base,
    not host root."""
    with Sandbox.create(probe_spec()) as sb:
        assert _namespace_owner(sb.init_pid) == sb.spec.uid_base
        limits = {os.path.basename(path): inside("read", path, sandbox=sb).value
                  for path, _ in contain.user_namespace_sysctls()}
    assert "max_inotify_instances" in limits and "max_user_namespaces" in limits
    assert limits == {name: f"{value}\n" for name, value in contain.USER_NAMESPACE_LIMITS.items()
                      if name in limits}


def test_a_sandbox_exhausting_inotify_instances_leaves_host_root_its_own():
    """Issue 18.8: one sandbox took all 128 inotify instances of uid 0 and host root got
    EMFILE. Now the sandbox runs out at its own namespace's cap (EMFILE after 32), charged
    to uid_base, and host root, probed while the sandbox holds them all, is unaffected."""
    assert _host_root_inotify() == 0  # precondition: root has some to spare
    with Sandbox.create(probe_spec()) as sb:
        holder = sb.exec(["python3", "-I", "-c", HOLD_INOTIFY], stdin=PIPE, stdout=PIPE)
        try:
            held, err = map(int, holder.stdout.readline().split())
            root_after = _host_root_inotify()
        finally:
            holder.stdin.close()
            holder.wait()
            holder.stdout.close()
    assert (held, err) == (32, 24)  # EMFILE
    assert root_after == 0


NEST_USER_NAMESPACES = """
import os, sys, ctypes
libc = ctypes.CDLL(None, use_errno=True)
made, err, children = 0, 0, []
r, w = os.pipe()
for _ in range(40):
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        ok = libc.unshare(0x10000000) == 0
        os.write(res_w, str(0 if ok else ctypes.get_errno()).encode())
        os.read(r, 1)  # hold the namespace until the parent is done
        os._exit(0)
    os.close(res_w)
    code = int(os.read(res_r, 16))
    os.close(res_r)
    children.append(pid)
    if code:
        err = code
        break
    made += 1
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
print(made, err)
"""


def test_nested_user_namespaces_stop_at_the_sandbox_cap():
    """Under a profile that lets a sandbox make user namespaces at all, it gets 16 (its
    own max_user_namespaces), then ENOSPC: never the owner's whole host quota."""
    with Sandbox.create(probe_spec(profile="unconfined")) as sb:
        proc = sb.exec(["python3", "-I", "-c", NEST_USER_NAMESPACES], stdout=PIPE)
        out, _ = proc.communicate()
    assert out.split() == [b"16", b"28"]  # ENOSPC


# == signals by pidfd, never by a reused number =============================================


def _innocent_with_pid(pid: int):
    """A host process (a session and group leader, as a shell or daemon would be) made
    to get exactly `pid`, by setting the PID namespace's last pid just below it; returns
    (its pid, the pipe end that releases it) or None if another fork took the number."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(w)
                os.close(ready_r)
                os.setsid()
                os.write(ready_w, b"!")
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"!"  # it leads its own group now
        os.close(ready_r)
        if child == pid:
            return child, w
        os.close(w)
        os.waitpid(child, 0)
    return None


def _release(child: int, w: int) -> int:
    """Let the innocent process exit; its wait status (a signal would show here)."""
    os.close(w)
    _, status = os.waitpid(child, 0)
    return status


def _reaped_but_unsettled(sb):
    """A command that has exited and been reaped by the sandbox's PID 1, whose exit the
    runtime has not read yet (so it still counts as running): the window in which its
    host pid number is free for anyone."""
    proc = sb.exec(["sh", "-c", "read line"], stdin=PIPE, stdout=DEVNULL, stderr=DEVNULL)
    assert proc.pid > 0 and proc.pidfd >= 0  # found while it waited for its input
    proc.stdin.close()
    assert wait_until(lambda: not os.path.exists(f"/proc/{proc.pid}"))
    assert proc.returncode is None
    return proc


@pytest.mark.parametrize("how", ["signal_group", "kill"])
def test_a_reused_pid_is_never_signalled_through_a_finished_command(how):
    """Issue 18 (Low): Signal, interrupt and timeout did killpg(pid) by number. Once the
    command is reaped, that number (and group id) can belong to any host process."""
    with Sandbox.create(probe_spec()) as sb:
        proc = _reaped_but_unsettled(sb)
        innocent = _innocent_with_pid(proc.pid)
        assert innocent is not None, "could not place a process on the freed pid"
        try:
            if how == "signal_group":
                assert proc.signal_group(signal.SIGTERM) is False
            else:
                proc.kill()
        finally:
            status = _release(*innocent)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_stale_listing_never_signals_a_process_outside_the_sandbox(monkeypatch):
    """Sandbox.signal lists the cgroup, then signals: a pid reused in between by a host
    process must not be hit (simulated: the listing names a host process)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        with Sandbox.create(probe_spec()) as sb:
            monkeypatch.setattr(sb, "pids", lambda: [sb.init_pid, child])
            assert sb.signal(signal.SIGTERM) == 0
    finally:
        status = _release(child, w)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_signal_group_reaches_the_whole_group_of_a_running_command():
    script = "sleep 300 & sleep 300 & echo ready; wait"
    with Sandbox.create(probe_spec()) as sb:
        proc = sb.exec(["sh", "-c", script], stdin=DEVNULL, stdout=PIPE, stderr=DEVNULL)
        assert proc.stdout.readline() == b"ready\n"
        assert wait_until(lambda: len(sb.pids()) == 4)  # PID 1, sh, two sleeps
        assert proc.signal_group(signal.SIGTERM) is True
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert wait_until(lambda: sb.pids() == [sb.init_pid])
        proc.stdout.close()
        assert sb.signal(signal.SIGTERM) == 0  # nothing left but PID 1
