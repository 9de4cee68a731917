"""Issue 18, kernel side, proven from inside real sandboxes: no setuid/setgid files, no NUMA
policy or secret memory, per-user kernel quotas charged to the sandbox and not to host root.

Every probe is harmless if it escapes: a file given a setuid bit lives in the sandbox's own
/tmp or /workspace and is removed at once; the NUMA calls ask for the default policy; the
quota test's descriptors belong to a sandbox that is destroyed before the test ends.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from corral.sandbox import Sandbox

from .conftest import inside, probe_spec

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


@pytest.mark.parametrize("target", ["/workspace", "/tmp"])
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
