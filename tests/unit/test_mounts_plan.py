"""The mount plan is pure: it is checked here op by op, without root or a kernel."""

import pytest

from corral.sandbox import SandboxSpec
from corral.sandbox.mounts import (
    ATTR_NODEV,
    ATTR_NOEXEC,
    ATTR_NOSUID,
    MS_BIND,
    MS_PRIVATE,
    MS_REC,
    PAGE_SIZE,
    READ_ONLY,
    HostView,
    MountOp,
    plan,
    tmpfs_pages,
)
from corral.sandbox.spec import BindMount

ROOT = "/run/corral/sandboxes/sbx-test/root"


class FakeHost(HostView):
    """A Debian-12-like merged-/usr host."""

    def __init__(self, entries):
        self.entries = entries

    def kind(self, path):
        return self.entries.get(path)


DEBIAN = FakeHost({
    "/usr": "dir",
    "/bin": "link:usr/bin",
    "/sbin": "link:usr/sbin",
    "/lib": "link:usr/lib",
    "/lib64": "link:usr/lib64",
    "/etc/ld.so.cache": "file",
    "/etc/alternatives": "dir",
    "/etc/localtime": "link:/usr/share/zoneinfo/Etc/UTC",
    "/dev/null": "file",
    "/dev/zero": "file",
    "/dev/urandom": "file",
    "/usr/share": "dir",
    "/etc/hostname": "file",
})


def ops_for(spec=None, host=DEBIAN, **kw):
    return plan(spec or SandboxSpec(), ROOT, "/tmp/ws", host=host, **kw)


def targets(ops, kind):
    return [op.target for op in ops if op.kind == kind]


def test_first_everything_private_then_root_tmpfs():
    ops = ops_for()
    assert ops[0] == MountOp("mount", "/", flags=MS_REC | MS_PRIVATE)
    assert ops[1].kind == "mount" and ops[1].target == ROOT and ops[1].fstype == "tmpfs"


def test_system_dirs_bound_read_only_and_links_kept_as_links():
    ops = ops_for()
    i = ops.index(MountOp("mount", ROOT + "/usr", source="/usr", flags=MS_BIND | MS_REC))
    assert ops[i + 1] == MountOp("setattr", ROOT + "/usr", flags=READ_ONLY, mode=1)
    assert MountOp("symlink", ROOT + "/bin", source="usr/bin") in ops
    assert MountOp("symlink", ROOT + "/lib64", source="usr/lib64") in ops
    # absent on this host: not planned at all
    assert not any("/lib32" in op.target for op in ops)


def test_etc_is_generated_plus_a_few_host_entries():
    ops = ops_for(SandboxSpec(hostname="box1"))
    files = {op.target[len(ROOT):]: op.data for op in ops if op.kind == "file"}
    assert set(files) == {"/etc/passwd", "/etc/group", "/etc/hosts", "/etc/hostname",
                          "/etc/nsswitch.conf", "/etc/resolv.conf"}
    assert files["/etc/hostname"] == "box1\n"
    assert files["/etc/passwd"].startswith("root:x:0:0:root:/workspace:")
    bound = [op.source for op in ops if op.kind == "mount" and op.target.startswith(ROOT + "/etc")]
    assert bound == ["/etc/ld.so.cache", "/etc/alternatives"]
    # /etc/shadow and the rest of the host's /etc never appear
    assert not any("shadow" in (op.source or "") + op.target for op in ops)


def test_dev_is_minimal():
    ops = ops_for()
    devs = [op.source for op in ops
            if op.kind == "mount" and op.source and op.source.startswith("/dev/")]
    assert devs == ["/dev/null", "/dev/zero", "/dev/urandom"]  # those the fake host has
    pts = next(op for op in ops if op.target == ROOT + "/dev/pts" and op.kind == "mount")
    assert pts.fstype == "devpts" and "newinstance" in pts.data
    assert MountOp("symlink", ROOT + "/dev/ptmx", source="pts/ptmx") in ops


def test_proc_masks_after_proc_mount_and_before_pivot():
    ops = ops_for()
    kinds = [op.kind for op in ops]
    proc = next(i for i, op in enumerate(ops) if op.fstype == "proc")
    pivot = kinds.index("pivot")
    masked = {op.target[len(ROOT):] for op in ops[proc:pivot] if op.kind == "mask_file"}
    assert {"/proc/kcore", "/proc/sysrq-trigger", "/proc/kallsyms", "/proc/keys"} <= masked
    ro = {op.target[len(ROOT):] for op in ops if op.kind == "ro_self"}
    assert "/proc/sys" in ro
    assert proc < pivot


def test_tmp_and_shm_are_directories_of_the_root_tmpfs_sized_for_them():
    ops = ops_for(SandboxSpec(tmp_bytes=8 << 20, hostname="box1"))
    # no tmpfs of their own: each is its directory (1777) bound onto itself for its flags
    assert [op.target for op in ops if op.fstype == "tmpfs"] == [ROOT]
    for path, attrs in (("/tmp", ATTR_NOSUID | ATTR_NODEV),
                        ("/dev/shm", ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC)):
        i = ops.index(MountOp("mkdir", ROOT + path, mode=0o1777))
        assert ops[i + 1:i + 3] == [
            MountOp("mount", ROOT + path, source=ROOT + path, flags=MS_BIND),
            MountOp("setattr", ROOT + path, flags=attrs, mode=0)]
    # the root holds the plan's own files (one page each, resolv.conf empty) and 8 MiB more
    pages = sum(1 for op in ops if op.kind == "file" and op.data)
    assert pages == 5
    assert ops[1].data == f"mode=0755,size={(8 << 20) + pages * PAGE_SIZE}"


def test_a_long_link_in_the_root_takes_a_page():
    long_target = "/usr/share/" + "z" * 120
    host = FakeHost(DEBIAN.entries | {"/etc/localtime": "link:" + long_target})
    short = ops_for(SandboxSpec(tmp_bytes=8 << 20))
    long = ops_for(SandboxSpec(tmp_bytes=8 << 20), host=host)
    assert tmpfs_pages(long, ROOT) == tmpfs_pages(short, ROOT) + 1
    assert tmpfs_pages(short, ROOT) == 5


def test_workspace_writable_nosuid_nodev():
    ops = ops_for()
    i = ops.index(MountOp("mount", ROOT + "/workspace", source="/tmp/ws", flags=MS_BIND | MS_REC))
    expected = MountOp("setattr", ROOT + "/workspace", flags=ATTR_NOSUID | ATTR_NODEV, mode=1)
    assert ops[i + 1] == expected


def test_detached_sources_are_attached_not_bound():
    ops = ops_for(detached={"/tmp/ws": 17})
    assert MountOp("attach", ROOT + "/workspace", flags=17) in ops
    assert not any(op.source == "/tmp/ws" for op in ops)


def test_user_binds_create_parents_and_respect_mode():
    spec = SandboxSpec(binds=(BindMount("/usr/share", "/mnt/in/data", False),
                              BindMount("/etc/hostname", "/opt/f.txt", True)))
    ops = ops_for(spec)
    made = [t[len(ROOT):] for t in targets(ops, "mkdir")[-4:]]
    assert made == ["/mnt", "/mnt/in", "/mnt/in/data", "/opt"]
    assert MountOp("setattr", ROOT + "/mnt/in/data", flags=READ_ONLY, mode=1) in ops
    assert MountOp("touch", ROOT + "/opt/f.txt", mode=0o644) in ops
    assert MountOp("setattr", ROOT + "/opt/f.txt", flags=ATTR_NOSUID | ATTR_NODEV, mode=1) in ops


def test_ends_with_pivot_then_read_only_root_and_dev():
    ops = ops_for()
    assert ops[-3] == MountOp("pivot", ROOT)
    assert ops[-2] == MountOp("setattr", "/", flags=READ_ONLY)
    assert ops[-1] == MountOp("setattr", "/dev", flags=READ_ONLY | ATTR_NOEXEC)
    # every pre-pivot path lives under the new root (or is the private-making "/")
    for op in ops[1:-3]:
        assert op.target.startswith(ROOT), op


@pytest.mark.parametrize("kind", ["mkdir", "mount", "setattr", "file", "symlink", "touch"])
def test_as_tuple_matches_the_child_struct(kind):
    op = MountOp(kind, "/t", source="/s", fstype="x", flags=3, data="d", mode=0o600)
    assert op.as_tuple() == (kind, "/s", "/t", "x", 3, "d", 0o600)
