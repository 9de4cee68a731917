"""Superblocks a sandbox makes, counted from its PID 1's mount table, and the scratch space
that lives in them.

Every superblock registers a memory-cgroup-aware shrinker, and the kernel sizes each memory
cgroup's shrinker table by the most shrinkers it has seen at once, so each superblock a
sandbox makes costs every sandbox's memory cgroup (docs/operations.md, Density). A default
sandbox makes three it can see (its root tmpfs, which also holds /dev, /dev/shm and /tmp;
its devpts; its procfs), besides its workspace and its IPC namespace's internal mqueue.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from corral.sandbox import Sandbox, SandboxSpec, mounts

from .conftest import MiB, inside, probe_spec
from .test_image_run import image  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

def mount_table(pid: int) -> dict[str, tuple[str, str, set[str]]]:
    """{mount point: (major:minor, fstype, options)} of a process, the top mount of each."""
    table = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            table[fields[4]] = (fields[2], fstype, set(fields[5].split(",")))
    return table


def _sh(sandbox: Sandbox, script: str, **kw) -> tuple[int, str]:
    proc = sandbox.exec(["/bin/sh", "-c", script], **kw)
    out, _ = proc.communicate()
    return proc.wait(), out.decode()


def test_a_default_sandbox_makes_three_superblocks_it_can_see():
    with Sandbox.create(probe_spec()) as sb:
        table = mount_table(sb.init_pid)
        with open(f"/proc/{sb.init_pid}/mountinfo") as f:
            own = mounts.own_superblocks(f.read())
    workspace = table["/workspace"][0]
    assert sorted(fs for dev, (fs, *_) in own.items() if dev != workspace) == [
        "devpts", "proc", "tmpfs"], own
    root = table["/"][0]
    # /dev, /dev/shm and /tmp are directories of the root tmpfs, mounts of their own
    assert [table[p][0] for p in ("/dev", "/dev/shm", "/tmp")] == [root] * 3
    assert table["/dev/pts"][1] == "devpts" and table["/proc"][1] == "proc"


def test_scratch_keeps_its_mount_flags():
    with Sandbox.create(probe_spec()) as sb:
        table = mount_table(sb.init_pid)
    assert {"ro", "nosuid", "nodev"} <= table["/"][2]
    assert {"ro", "noexec"} <= table["/dev"][2]
    assert {"rw", "nosuid", "nodev"} <= table["/tmp"][2] and "noexec" not in table["/tmp"][2]
    assert {"rw", "nosuid", "nodev", "noexec"} <= table["/dev/shm"][2]


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_directories_keep_their_modes_under_the_usual_umask():
    """mkdir honours the umask (022 would make the scratch directories 1755): the child
    sets the plan's mode after it. (A stricter umask, 077, keeps the sandbox's runtime
    directory from its own user namespace: setup fails before any mkdir.)"""
    with _umask(0o022), Sandbox.create(probe_spec()) as sb:
        code, out = _sh(sb, "stat -c %a /tmp /dev/shm /dev /etc")
        user = _sh(sb, "touch /tmp/u /dev/shm/u && stat -c %u /tmp/u", user=(1000, 1000))
    assert (code, out) == (0, "1777\n1777\n755\n755\n")
    assert user == (0, "1000\n")  # anyone may write there, as on a host's /tmp


def test_tmp_alone_holds_exactly_tmp_bytes():
    p = inside("fill", "/tmp/fill", str(64 * MiB), spec=probe_spec(tmp_bytes=8 * MiB))
    assert (p.errno, p.value["written"]) == ("ENOSPC", 8 * MiB)


def test_tmp_and_shm_share_tmp_bytes():
    with Sandbox.create(probe_spec(tmp_bytes=8 * MiB)) as sb:
        assert _sh(sb, "head -c 3145728 /dev/zero > /tmp/kept") == (0, "")
        shm = inside("fill", "/dev/shm/fill", str(64 * MiB), sandbox=sb)
        assert _sh(sb, "rm /tmp/kept") == (0, "")
        tmp = inside("fill", "/tmp/fill", str(64 * MiB), sandbox=sb)
    assert (shm.errno, shm.value["written"]) == ("ENOSPC", 5 * MiB)
    assert (tmp.errno, tmp.value["written"]) == ("ENOSPC", 8 * MiB)


def test_an_image_sandbox_keeps_shm_in_its_dev_tmpfs(image):  # noqa: F811
    """On an image's root /dev is a tmpfs of its own (nothing lands in the image's upper
    layer): /dev/shm is its directory, holding tmp_bytes; /tmp stays a tmpfs of its own."""
    with Sandbox(SandboxSpec(image=image, tmp_bytes=8 * MiB)) as sb:
        table = mount_table(sb.init_pid)
        code, out = _sh(sb, "cat /dev/zero > /dev/shm/f; stat -c %s /dev/shm/f; "
                            "cat /dev/zero > /tmp/f; stat -c %s /tmp/f")
    assert table["/dev/shm"][0] == table["/dev"][0] != table["/tmp"][0]
    assert {"rw", "nosuid", "nodev", "noexec"} <= table["/dev/shm"][2]
    assert out == f"{8 * MiB}\n{8 * MiB}\n"
