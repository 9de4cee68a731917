"""cgroups: layout detection from sample host texts, exact write plans, limits validation.

No root and no kernel: detection gets its file probes as dicts, and the apply/reap tests run
against plain directories under tmp_path.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

from corral.sandbox import cgroups
from corral.sandbox.cgroups import (
    Cgroup,
    CgroupLayout,
    CgroupLimits,
    Mkdir,
    Write,
    group_plan,
    layout_from_text,
    parse_mounts,
    parse_proc_cgroup,
    plan,
)
from corral.sandbox.errors import InvalidSpec, NotFound, SandboxSetupError, UnsupportedHost

M = 1 << 20

# -- host samples ------------------------------------------------------------------------------

# This machine: one mount per controller, cgroup2 at unified with no controllers.
V1_MOUNTS = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V1_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/8478de0c
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
V1_MEMSW = {"/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes": "9223372036854771712\n"}

# A systemd host on the unified hierarchy.
V2_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
"""
V2_SERVICE = "/user.slice/user-1000.slice/user@1000.service/app.slice/corral.service"
V2_CGROUP = f"0::{V2_SERVICE}\n"
V2_ROOT_CONTROLLERS = {"/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory hugetlb pids\n"}

# Ubuntu 20.04-style hybrid: v1 controllers (cpu and cpuacct co-mounted), empty unified.
HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,nosuid,nodev,noexec,relatime,net_cls,net_prio 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,nosuid,nodev,noexec,relatime,freezer 0 0
"""
HYBRID_CGROUP = """\
12:pids:/user.slice/user-1000.slice/session-2.scope
7:memory:/user.slice/user-1000.slice/session-2.scope
5:freezer:/
4:cpu,cpuacct:/user.slice
2:net_cls,net_prio:/
1:name=systemd:/user.slice/user-1000.slice/session-2.scope
0::/user.slice/user-1000.slice/session-2.scope
"""


def layout_of(mounts, cgroup, files=None, writable=True) -> CgroupLayout:
    files = files or {}
    return layout_from_text(mounts, cgroup, read_file=files.get, writable=lambda p: writable)


V1 = layout_of(V1_MOUNTS, V1_CGROUP, V1_MEMSW)
V2 = layout_of(V2_MOUNTS, V2_CGROUP, V2_ROOT_CONTROLLERS)
HYBRID = layout_of(HYBRID_MOUNTS, HYBRID_CGROUP)

# -- parsing -----------------------------------------------------------------------------------


def test_parse_mounts_unescapes_octal():
    [m] = parse_mounts(r"cgroup /sys/fs/cgroup/my\040mem cgroup rw,memory 0 0")
    assert m == cgroups.Mount("cgroup", "/sys/fs/cgroup/my mem", "cgroup", ("rw", "memory"))


def test_parse_mounts_skips_short_lines():
    assert parse_mounts("\ngarbage\n") == []


def test_parse_proc_cgroup_splits_comounted_controllers():
    own = parse_proc_cgroup(HYBRID_CGROUP)
    assert own["cpu"] == own["cpuacct"] == "/user.slice"
    assert own["memory"] == "/user.slice/user-1000.slice/session-2.scope"
    assert own["name=systemd"] == "/user.slice/user-1000.slice/session-2.scope"
    assert own[""] == "/user.slice/user-1000.slice/session-2.scope"


def test_parse_proc_cgroup_keeps_colons_in_path():
    assert parse_proc_cgroup("0::/a:b\n") == {"": "/a:b"}


# -- detect ------------------------------------------------------------------------------------


def test_detect_v1_like_this_machine():
    assert V1.version == 1
    assert dict(V1.controllers) == {
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
        "cpu": "/sys/fs/cgroup/cpu",
        "freezer": "/sys/fs/cgroup/freezer",
        "cpuacct": "/sys/fs/cgroup/cpuacct",
    }
    assert V1.has_memsw is True
    assert V1.root is None and V1.parent is None
    assert V1.own["memory"] == "/process_api/8478de0c"


def test_detect_v1_without_swap_accounting():
    layout = layout_of(V1_MOUNTS, V1_CGROUP, {})
    assert layout.version == 1
    assert layout.has_memsw is False


def test_detect_hybrid_with_empty_unified_is_v1():
    assert HYBRID.version == 1
    assert dict(HYBRID.controllers) == {
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "freezer": "/sys/fs/cgroup/freezer",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
    }


def test_detect_v2_root_writable_places_corral_at_root():
    assert V2.version == 2
    assert V2.root == "/sys/fs/cgroup"
    assert V2.parent == "/sys/fs/cgroup"
    assert V2.own == {"": V2_SERVICE}
    assert dict(V2.controllers) == {}


def test_detect_v2_delegated_places_corral_beside_own_cgroup():
    app_slice = "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice"
    files = {f"{app_slice}/cgroup.controllers": "cpu memory pids\n"}
    layout = layout_of(V2_MOUNTS, V2_CGROUP, files, writable=False)
    assert layout.version == 2
    assert layout.parent == app_slice


@pytest.mark.parametrize(
    ("own", "writable", "parent"),
    [
        ("/", False, "/sys/fs/cgroup"),  # daemon at the (namespace) root
        ("/corral.service", False, "/sys/fs/cgroup"),  # parent of a top-level cgroup
        ("/../../outside", False, "/sys/fs/cgroup"),  # outside the mounted namespace root
        ("/a/b/c", False, "/sys/fs/cgroup/a/b"),
        ("/a/b/c/", False, "/sys/fs/cgroup/a/b"),
        ("/a/b/c", True, "/sys/fs/cgroup"),
        (None, False, "/sys/fs/cgroup"),
    ],
)
def test_choose_v2_parent(own, writable, parent):
    assert cgroups.choose_v2_parent("/sys/fs/cgroup", own, writable) == parent


def test_detect_v2_missing_controller_is_unsupported():
    files = {"/sys/fs/cgroup/cgroup.controllers": "memory pids\n"}
    message = (
        "cgroup controllers missing: Corral needs memory, pids, cpu and freezer on cgroup v1 "
        "(mounted: none; missing: memory, pids, cpu, freezer) or memory, pids and cpu on "
        "cgroup v2 (/sys/fs/cgroup/cgroup.controllers offers: memory pids); mount the missing "
        "v1 controllers (e.g. `mkdir -p /sys/fs/cgroup/memory && mount -t cgroup -o memory "
        "cgroup /sys/fs/cgroup/memory`) or boot with systemd.unified_cgroup_hierarchy=1"
    )
    with pytest.raises(UnsupportedHost, match=f"^{re.escape(message)}$"):
        layout_of(V2_MOUNTS, V2_CGROUP, files)


def test_detect_hybrid_missing_v1_controller_is_unsupported():
    mounts = "\n".join(line for line in HYBRID_MOUNTS.splitlines() if "pids" not in line)
    message = (
        "cgroup controllers missing: Corral needs memory, pids, cpu and freezer on cgroup v1 "
        "(mounted: memory, cpu, freezer; missing: pids) or memory, pids and cpu on cgroup v2 "
        "(/sys/fs/cgroup/unified/cgroup.controllers offers: nothing); mount the missing v1 "
        "controllers (e.g. `mkdir -p /sys/fs/cgroup/pids && mount -t cgroup -o pids cgroup "
        "/sys/fs/cgroup/pids`) or boot with systemd.unified_cgroup_hierarchy=1"
    )
    with pytest.raises(UnsupportedHost, match=f"^{re.escape(message)}$"):
        layout_of(mounts, HYBRID_CGROUP)


def test_detect_no_cgroup_mounted_is_unsupported():
    message = (
        "no cgroup filesystem is mounted (per /proc/self/mounts); mount the unified hierarchy "
        "with `mount -t cgroup2 none /sys/fs/cgroup`"
    )
    with pytest.raises(UnsupportedHost, match=f"^{re.escape(message)}$"):
        layout_of("proc /proc proc rw 0 0\n", "0::/\n")


def test_detect_reads_files_and_probes_the_host(tmp_path):
    """detect() end to end on a fake host: mounts and probes point into tmp_path."""
    mem = tmp_path / "memory"
    for c in ("memory", "pids", "cpu", "freezer"):
        (tmp_path / c).mkdir()
    (mem / "memory.memsw.limit_in_bytes").write_text("max\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "".join(f"cgroup {tmp_path / c} cgroup rw,{c} 0 0\n" for c in ("memory", "pids", "cpu"))
        + f"cgroup {tmp_path / 'freezer'} cgroup rw,relatime,freezer 0 0\n"
    )
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("1:memory:/\n")
    layout = cgroups.detect(str(mounts), str(proc_cgroup))
    assert layout.version == 1
    assert layout.controllers["freezer"] == str(tmp_path / "freezer")
    assert layout.has_memsw is True


def test_detect_unreadable_proc_is_unsupported(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UnsupportedHost, match=rf"^cannot read {re.escape(str(missing))}: "):
        cgroups.detect(str(missing), "/proc/self/cgroup")


# -- limits ------------------------------------------------------------------------------------

BELOW = "is below the 1 MiB minimum; use e.g. 67108864 (64M)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpu_quota": 0}, "cpu_quota: must be at least 0.01 CPUs, got 0; use e.g. 0.5"),
        ({"cpu_quota": -1.0}, "cpu_quota: must be at least 0.01 CPUs, got -1.0; use e.g. 0.5"),
        ({"cpu_quota": 0.005}, "cpu_quota: must be at least 0.01 CPUs, got 0.005; use e.g. 0.5"),
        ({"cpu_quota": float("nan")}, "cpu_quota: must be a number of CPUs, got nan"),
        ({"cpu_quota": float("inf")}, "cpu_quota: must be a number of CPUs, got inf"),
        ({"cpu_quota": "0.5"}, "cpu_quota: must be a number of CPUs, got '0.5'"),
        ({"cpu_quota": True}, "cpu_quota: must be a number of CPUs, got True"),
        ({"memory_bytes": 0}, f"memory_bytes: 0 {BELOW}"),
        ({"memory_bytes": -5}, f"memory_bytes: -5 {BELOW}"),
        ({"memory_bytes": M - 1}, f"memory_bytes: 1048575 {BELOW}"),
        ({"memory_bytes": "64M"}, "memory_bytes: must be a whole number of bytes, got '64M'"),
        ({"memory_bytes": 1.5 * M}, "memory_bytes: must be a whole number of bytes, got 1572864.0"),
        ({"memory_bytes": True}, "memory_bytes: must be a whole number of bytes, got True"),
        ({"pids_max": 0}, "pids_max: must be a positive whole number, got 0"),
        ({"pids_max": -3}, "pids_max: must be a positive whole number, got -3"),
        ({"pids_max": 8.0}, "pids_max: must be a positive whole number, got 8.0"),
        ({"pids_max": False}, "pids_max: must be a positive whole number, got False"),
    ],
)  # fmt: skip
def test_limits_reject(kwargs, message):
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$") as info:
        CgroupLimits(**kwargs)
    assert info.value.field == next(iter(kwargs))


@pytest.mark.parametrize(
    ("cpus", "quota_us"), [(0.01, 1000), (0.29, 29000), (0.5, 50000), (1, 100000), (2.5, 250000)]
)
def test_cpu_quota_in_microseconds(cpus, quota_us):
    assert CgroupLimits(cpu_quota=cpus).cfs_quota_us == quota_us


def test_limits_accept_the_minimums_and_none():
    assert CgroupLimits(memory_bytes=M, pids_max=1, cpu_quota=0.01).memory_bytes == M
    assert CgroupLimits().cfs_quota_us is None


# -- plans -------------------------------------------------------------------------------------

V1_MKDIRS = [
    Mkdir("/sys/fs/cgroup/memory/corral", exist_ok=True),
    Mkdir("/sys/fs/cgroup/memory/corral/sb1"),
    Mkdir("/sys/fs/cgroup/pids/corral", exist_ok=True),
    Mkdir("/sys/fs/cgroup/pids/corral/sb1"),
    Mkdir("/sys/fs/cgroup/cpu/corral", exist_ok=True),
    Mkdir("/sys/fs/cgroup/cpu/corral/sb1"),
    Mkdir("/sys/fs/cgroup/freezer/corral", exist_ok=True),
    Mkdir("/sys/fs/cgroup/freezer/corral/sb1"),
    Mkdir("/sys/fs/cgroup/cpuacct/corral", exist_ok=True),
    Mkdir("/sys/fs/cgroup/cpuacct/corral/sb1"),
]
MEM = "/sys/fs/cgroup/memory/corral/sb1"


def test_plan_v1_all_limits():
    ops = plan(V1, "sb1", CgroupLimits(memory_bytes=64 * M, pids_max=32, cpu_quota=0.5))
    assert ops == [
        *V1_MKDIRS,
        Write(f"{MEM}/memory.limit_in_bytes", "67108864"),
        Write(f"{MEM}/memory.memsw.limit_in_bytes", "67108864"),
        Write(f"{MEM}/memory.swappiness", "0"),
        Write(f"{MEM}/memory.oom_control", "0"),
        Write("/sys/fs/cgroup/pids/corral/sb1/pids.max", "32"),
        Write("/sys/fs/cgroup/cpu/corral/sb1/cpu.cfs_quota_us", "50000"),
    ]


def test_plan_v1_memory_only_without_memsw():
    layout = layout_of(V1_MOUNTS, V1_CGROUP, {})
    assert plan(layout, "sb1", CgroupLimits(memory_bytes=256 * M)) == [
        *V1_MKDIRS,
        Write(f"{MEM}/memory.limit_in_bytes", "268435456"),
        Write(f"{MEM}/memory.swappiness", "0"),
        Write(f"{MEM}/memory.oom_control", "0"),
    ]


def test_plan_v1_no_limits_still_disables_swap():
    assert plan(V1, "sb1", CgroupLimits()) == [
        *V1_MKDIRS,
        Write(f"{MEM}/memory.swappiness", "0"),
        Write(f"{MEM}/memory.oom_control", "0"),
    ]


def test_plan_v1_comounted_cpu_cpuacct_makes_one_directory():
    assert plan(HYBRID, "sb1", CgroupLimits(cpu_quota=1.5)) == [
        Mkdir("/sys/fs/cgroup/memory/corral", exist_ok=True),
        Mkdir(MEM),
        Mkdir("/sys/fs/cgroup/pids/corral", exist_ok=True),
        Mkdir("/sys/fs/cgroup/pids/corral/sb1"),
        Mkdir("/sys/fs/cgroup/cpu,cpuacct/corral", exist_ok=True),
        Mkdir("/sys/fs/cgroup/cpu,cpuacct/corral/sb1"),
        Mkdir("/sys/fs/cgroup/freezer/corral", exist_ok=True),
        Mkdir("/sys/fs/cgroup/freezer/corral/sb1"),
        Write(f"{MEM}/memory.swappiness", "0"),
        Write(f"{MEM}/memory.oom_control", "0"),
        Write("/sys/fs/cgroup/cpu,cpuacct/corral/sb1/cpu.cfs_quota_us", "150000"),
    ]


def test_plan_v2_all_limits():
    ops = plan(V2, "sb1", CgroupLimits(memory_bytes=64 * M, pids_max=32, cpu_quota=0.5))
    assert ops == [
        Write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir("/sys/fs/cgroup/corral", exist_ok=True),
        Write("/sys/fs/cgroup/corral/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir("/sys/fs/cgroup/corral/sb1"),
        Write("/sys/fs/cgroup/corral/sb1/memory.max", "67108864"),
        Write("/sys/fs/cgroup/corral/sb1/memory.swap.max", "0", optional=True),
        Write("/sys/fs/cgroup/corral/sb1/pids.max", "32"),
        Write("/sys/fs/cgroup/corral/sb1/cpu.max", "50000 100000"),
    ]


def test_plan_v2_no_limits_still_disables_swap():
    assert plan(V2, "sb1", CgroupLimits()) == [
        Write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir("/sys/fs/cgroup/corral", exist_ok=True),
        Write("/sys/fs/cgroup/corral/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir("/sys/fs/cgroup/corral/sb1"),
        Write("/sys/fs/cgroup/corral/sb1/memory.swap.max", "0", optional=True),
    ]


def test_plan_without_the_group_leaves_out_exactly_the_groups_ops():
    """A group this process made already: only the sandbox's own directories and limits."""
    limits = CgroupLimits(memory_bytes=64 * M, pids_max=32, cpu_quota=0.5)
    for layout in (V1, HYBRID, V2):
        whole = plan(layout, "sb1", limits)
        group = set(group_plan(layout))
        assert group and group <= set(whole)
        assert plan(layout, "sb1", limits, with_group=False) == [
            op for op in whole if op not in group]
    assert plan(V2, "sb1", CgroupLimits(), with_group=False) == [
        Mkdir("/sys/fs/cgroup/corral/sb1"),
        Write("/sys/fs/cgroup/corral/sb1/memory.swap.max", "0", optional=True),
    ]


#: the parent a delegated v2 layout (a user's app.slice) makes its groups in
APP = "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice"


def delegated_v2() -> CgroupLayout:
    return layout_of(V2_MOUNTS, V2_CGROUP, {f"{APP}/cgroup.controllers": "cpu memory pids"},
                     False)


def test_plan_v2_delegated_parent_pids_and_cpu():
    app = APP
    assert plan(delegated_v2(), "sb1", CgroupLimits(pids_max=100, cpu_quota=2)) == [
        Write(f"{app}/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir(f"{app}/corral", exist_ok=True),
        Write(f"{app}/corral/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir(f"{app}/corral/sb1"),
        Write(f"{app}/corral/sb1/memory.swap.max", "0", optional=True),
        Write(f"{app}/corral/sb1/pids.max", "100"),
        Write(f"{app}/corral/sb1/cpu.max", "200000 100000"),
    ]


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "../x", ".hidden", "-x", "a b", "a\n", "x" * 129, None]
)
def test_plan_rejects_names_that_could_escape(name):
    with pytest.raises(InvalidSpec, match=r"^name: cgroup name .* must be 1-128 characters"):
        plan(V1, name, CgroupLimits())


def test_paths_follow_the_plan_leaves():
    leaves = [op.path for op in plan(V1, "sb1", CgroupLimits()) if isinstance(op, Mkdir)][1::2]
    assert Cgroup(V1, "sb1").paths == tuple(leaves)
    assert Cgroup(HYBRID, "sb1").paths == (
        MEM,
        "/sys/fs/cgroup/pids/corral/sb1",
        "/sys/fs/cgroup/cpu,cpuacct/corral/sb1",
        "/sys/fs/cgroup/freezer/corral/sb1",
    )
    assert Cgroup(V2, "sb1").procs_files == ("/sys/fs/cgroup/corral/sb1/cgroup.procs",)


# -- apply, open, reap on plain directories ----------------------------------------------------


@pytest.fixture
def fake_v1(tmp_path) -> CgroupLayout:
    """A v1 layout whose hierarchies are plain directories: mkdir works, knob writes fail."""
    controllers = {}
    for c in ("memory", "pids", "cpu", "freezer"):
        (tmp_path / c).mkdir()
        controllers[c] = str(tmp_path / c)
    return CgroupLayout(version=1, controllers=controllers)


def test_create_failure_names_the_file_and_removes_what_it_made(fake_v1):
    with pytest.raises(SandboxSetupError) as info:
        Cgroup.create(fake_v1, "sb1", CgroupLimits(memory_bytes=64 * M))
    err = info.value
    path = os.path.join(fake_v1.controllers["memory"], "corral/sb1/memory.limit_in_bytes")
    assert (err.step, err.path, err.errno) == ("cgroup write", path, errno.ENOENT)
    assert str(err).startswith(f"sandbox setup failed at cgroup write {path!r}: ENOENT")
    for mnt in fake_v1.controllers.values():
        assert os.listdir(os.path.join(mnt, "corral")) == []


def test_create_taken_name_is_eexist_and_keeps_the_other(fake_v1):
    taken = os.path.join(fake_v1.controllers["cpu"], "corral", "sb1")
    os.makedirs(taken)
    with pytest.raises(SandboxSetupError) as info:
        Cgroup.create(fake_v1, "sb1", CgroupLimits())
    assert (info.value.step, info.value.path, info.value.errno) == (
        "cgroup mkdir",
        taken,
        errno.EEXIST,
    )
    assert os.path.isdir(taken)
    assert not os.path.exists(os.path.join(fake_v1.controllers["memory"], "corral", "sb1"))
    assert not os.path.exists(os.path.join(fake_v1.controllers["pids"], "corral", "sb1"))


def test_open_missing_is_not_found_and_destroy_of_missing_is_a_no_op(fake_v1):
    with pytest.raises(NotFound, match=r"^no cgroup corral/ghost in "):
        Cgroup.open(fake_v1, "ghost")
    cg = Cgroup(fake_v1, "ghost")
    cg.destroy()
    cg.destroy()
    assert cg.pids() == []


def test_list_and_reap_keep_cgroups_with_processes(fake_v1):
    for name in ("t-empty", "t-busy", "other-empty"):
        os.makedirs(os.path.join(fake_v1.controllers["memory"], "corral", name))
        os.makedirs(os.path.join(fake_v1.controllers["freezer"], "corral", name))
    busy = os.path.join(fake_v1.controllers["freezer"], "corral", "t-busy", "cgroup.procs")
    with open(busy, "w") as f:
        f.write("4242\n")
    assert cgroups.list_corral_cgroups(fake_v1) == ["other-empty", "t-busy", "t-empty"]
    assert Cgroup.open(fake_v1, "t-busy").pids() == [4242]
    assert cgroups.reap_orphans(fake_v1, prefix="t-") == ["t-empty"]
    assert cgroups.list_corral_cgroups(fake_v1) == ["other-empty", "t-busy"]


def test_layout_checks_itself():
    assert CgroupLayout(version=2, root="/sys/fs/cgroup").parent == "/sys/fs/cgroup"
    with pytest.raises(ValueError, match=r"^a v2 CgroupLayout needs the unified mount point"):
        CgroupLayout(version=2)
    with pytest.raises(ValueError, match=r"^a v1 CgroupLayout needs mount points for \['pids'"):
        CgroupLayout(version=1, controllers={"memory": "/m", "cpu": "/c", "freezer": "/f"})
    with pytest.raises(ValueError, match=r"^cgroup version must be 1 or 2, not 3$"):
        CgroupLayout(version=3)


# -- the batch group ---------------------------------------------------------------------------


def test_the_batch_group_is_a_sibling_of_corral_at_the_top_on_v1():
    batch = V1.in_group(cgroups.BATCH_DIR)
    assert (V1.group, batch.group, V1.in_group(cgroups.CORRAL_DIR) is V1) == (
        "corral", "corral-batch", True)
    ops = plan(batch, "sb1", CgroupLimits(cpu_weight=10))
    assert ops[:2] == [Mkdir("/sys/fs/cgroup/memory/corral-batch", exist_ok=True),
                       Mkdir("/sys/fs/cgroup/memory/corral-batch/sb1")]
    assert ops[-1] == Write("/sys/fs/cgroup/cpu/corral-batch/sb1/cpu.shares", "102")
    assert Cgroup(batch, "sb1").path("cpu") == "/sys/fs/cgroup/cpu/corral-batch/sb1"
    # the group's own weight: what bounds every batch cgroup together
    assert cgroups.group_plan(batch, 10) == [
        Mkdir("/sys/fs/cgroup/memory/corral-batch", exist_ok=True),
        Mkdir("/sys/fs/cgroup/pids/corral-batch", exist_ok=True),
        Mkdir("/sys/fs/cgroup/cpu/corral-batch", exist_ok=True),
        Mkdir("/sys/fs/cgroup/freezer/corral-batch", exist_ok=True),
        Mkdir("/sys/fs/cgroup/cpuacct/corral-batch", exist_ok=True),
        Write("/sys/fs/cgroup/cpu/corral-batch/cpu.shares", "102"),
    ]
    assert cgroups.group_plan(batch)[-1] == Mkdir("/sys/fs/cgroup/cpuacct/corral-batch",
                                                  exist_ok=True)  # no weight: none written


def test_the_batch_group_on_v2_root_and_delegated():
    assert cgroups.group_plan(V2.in_group(cgroups.BATCH_DIR), 10) == [
        Write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir("/sys/fs/cgroup/corral-batch", exist_ok=True),
        Write("/sys/fs/cgroup/corral-batch/cgroup.subtree_control", "+memory +pids +cpu"),
        Write("/sys/fs/cgroup/corral-batch/cpu.weight", "10"),
    ]
    app = APP
    assert plan(delegated_v2().in_group(cgroups.BATCH_DIR), "sb1",
                CgroupLimits(cpu_weight=10)) == [
        Write(f"{app}/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir(f"{app}/corral-batch", exist_ok=True),
        Write(f"{app}/corral-batch/cgroup.subtree_control", "+memory +pids +cpu"),
        Mkdir(f"{app}/corral-batch/sb1"),
        Write(f"{app}/corral-batch/sb1/memory.swap.max", "0", optional=True),
        Write(f"{app}/corral-batch/sb1/cpu.weight", "10"),
    ]


def test_a_group_is_corral_or_batch():
    with pytest.raises(ValueError, match=r"^a cgroup group is one of \('corral', "
                                         r"'corral-batch'\), not '\.\./x'$"):
        V1.in_group("../x")


def test_recorded_finds_the_group_a_state_names(fake_v1):
    batch = fake_v1.in_group(cgroups.BATCH_DIR)
    for mnt in fake_v1.controllers.values():  # plain directories: no knobs to write
        os.makedirs(os.path.join(mnt, "corral-batch", "sb1"))
    made = Cgroup(batch, "sb1")
    found = cgroups.recorded(fake_v1, {"cgroup": "sb1", "cgroup_group": "corral-batch"}, "sb1")
    assert found.paths == made.paths
    # a state without the key (an older one, or corral/'s) is corral/'s: not this one
    with pytest.raises(NotFound, match=r"^no cgroup corral/sb1 in "):
        cgroups.recorded(fake_v1, {"cgroup": "sb1"}, "sb1")
    with pytest.raises(NotFound, match=r"^sandbox sb1: its state names an unknown cgroup "
                                       r"group '\.\.'$"):
        cgroups.recorded(fake_v1, {"cgroup_group": ".."}, "sb1")
    made.destroy()


def test_make_group_sets_the_weight_of_the_group_itself(fake_v1, tmp_path):
    layout = fake_v1.in_group(cgroups.BATCH_DIR)
    (tmp_path / "cpu" / "corral-batch").mkdir()
    (tmp_path / "cpu" / "corral-batch" / "cpu.shares").write_text("")  # a knob to write
    cgroups.make_group(layout, 10)
    assert (tmp_path / "cpu" / "corral-batch" / "cpu.shares").read_text() == "102"
    assert sorted(os.listdir(tmp_path / "memory")) == ["corral-batch"]
    cgroups.make_group(layout)  # again, no weight: nothing changes, nothing fails
    assert (tmp_path / "cpu" / "corral-batch" / "cpu.shares").read_text() == "102"
