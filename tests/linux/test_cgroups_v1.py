"""cgroups on the real v1 hierarchy: limits read back, OOM kill, pids cap, whole-cgroup kill.

Needs root. Every child starts gated (it waits for a line on stdin), is attached, and only
then runs, so nothing it forks can start outside the cgroup. Every test checks that its
cgroup left nothing under /sys/fs/cgroup/*/corral/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from corral.sandbox import cgroups
from corral.sandbox.cgroups import Cgroup, CgroupLayout, CgroupLimits
from corral.sandbox.errors import SandboxSetupError

pytestmark = pytest.mark.root

M = 1 << 20
PREFIX = f"test-{uuid.uuid4().hex[:8]}-"


@pytest.fixture(scope="module")
def layout():
    layout = cgroups.detect()
    if layout.version != 1:
        pytest.skip(f"host runs cgroup v{layout.version}; these tests need the v1 hierarchy")
    return layout


def leftovers(name: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/corral/{name}")


@pytest.fixture
def make_cgroup(layout):
    """Factory for uniquely named cgroups, destroyed after the test, which then checks
    that none of them left a directory behind."""
    made: list[Cgroup] = []

    def make(limits: CgroupLimits | None = None) -> Cgroup:
        cg = Cgroup.create(layout, PREFIX + uuid.uuid4().hex[:8], limits or CgroupLimits())
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()
    for cg in made:
        assert leftovers(cg.name) == []
        assert cg.name not in cgroups.list_corral_cgroups(layout)


@pytest.fixture
def spawn():
    """Start a child gated on stdin: it runs argv only after `release(child)`."""
    children: list[subprocess.Popen] = []

    def start(argv: list[str], **kwargs) -> subprocess.Popen:
        child = subprocess.Popen(
            ["sh", "-c", 'read _ && exec "$@"', "gate", *argv],
            stdin=subprocess.PIPE,
            **kwargs,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe:
                pipe.close()


def release(child: subprocess.Popen) -> None:
    child.stdin.write(b"go\n")
    child.stdin.flush()


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def proc_state(pid: int) -> str | None:
    try:
        stat = read(f"/proc/{pid}/stat")
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# -- create and read back ----------------------------------------------------------------------


def test_limits_read_back_from_the_kernel(make_cgroup, layout):
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * M, pids_max=16, cpu_quota=0.5))
    mem, pids, cpu, freezer = (cg.path(c) for c in ("memory", "pids", "cpu", "freezer"))
    assert read(f"{mem}/memory.limit_in_bytes") == str(64 * M)
    if layout.has_memsw:
        assert read(f"{mem}/memory.memsw.limit_in_bytes") == str(64 * M)
    assert read(f"{mem}/memory.swappiness") == "0"
    assert "oom_kill_disable 0" in read(f"{mem}/memory.oom_control")
    assert read(f"{pids}/pids.max") == "16"
    assert read(f"{cpu}/cpu.cfs_period_us") == "100000"
    assert read(f"{cpu}/cpu.cfs_quota_us") == "50000"
    assert read(f"{freezer}/freezer.state") == "THAWED"
    assert sorted(leftovers(cg.name)) == sorted(cg.paths)


def test_unlimited_cgroup_keeps_kernel_defaults(make_cgroup):
    cg = make_cgroup()
    mem, pids, cpu = (cg.path(c) for c in ("memory", "pids", "cpu"))
    assert read(f"{pids}/pids.max") == "max"
    assert read(f"{cpu}/cpu.cfs_quota_us") == "-1"
    assert read(f"{mem}/memory.swappiness") == "0"


def test_bad_quota_fails_naming_the_file_and_leaves_nothing(layout):
    name = PREFIX + "einval"
    with pytest.raises(SandboxSetupError) as info:
        Cgroup.create(layout, name, CgroupLimits(cpu_quota=1e9))  # beyond the kernel's max
    err = info.value
    assert (err.step, err.errno) == ("cgroup write", errno.EINVAL)
    assert err.path == f"{layout.controllers['cpu']}/corral/{name}/cpu.cfs_quota_us"
    assert leftovers(name) == []


def test_taken_name_is_eexist_and_the_first_survives(make_cgroup, layout):
    first = make_cgroup()
    with pytest.raises(SandboxSetupError) as info:
        Cgroup.create(layout, first.name, CgroupLimits())
    assert info.value.errno == errno.EEXIST
    assert sorted(leftovers(first.name)) == sorted(first.paths)


# -- processes ---------------------------------------------------------------------------------


def test_attached_child_is_in_every_hierarchy(make_cgroup, spawn):
    cg = make_cgroup()
    child = spawn(["sleep", "60"])
    cg.attach(child.pid)
    assert cg.pids() == [child.pid]
    own = cgroups.parse_proc_cgroup(read(f"/proc/{child.pid}/cgroup"))
    for controller in ("memory", "pids", "cpu", "freezer"):
        assert own[controller] == f"/corral/{cg.name}"
    release(child)
    assert cg.stats()["pids"] == 1


def test_attach_of_a_gone_process_is_esrch(make_cgroup):
    cg = make_cgroup()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(SandboxSetupError) as info:
        cg.attach(dead.pid)
    assert (info.value.step, info.value.errno) == ("cgroup attach", errno.ESRCH)


def test_cgroup_namespace_unshared_after_attach_is_rooted_at_the_sandbox(make_cgroup, spawn):
    cg = make_cgroup()
    child = spawn(["unshare", "--cgroup", "cat", "/proc/self/cgroup"], stdout=subprocess.PIPE)
    cg.attach(child.pid)
    release(child)
    out, _ = child.communicate(timeout=10)
    seen = cgroups.parse_proc_cgroup(out.decode())
    assert [seen[c] for c in ("memory", "pids", "cpu", "freezer")] == ["/"] * 4


def test_memory_balloon_is_oom_killed(make_cgroup, spawn):
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * M))
    # bytes * n writes every page, so all 200 MB are charged (a calloc'd buffer would not be).
    child = spawn([sys.executable, "-c", "b = b'x' * (200 << 20)"])
    cg.attach(child.pid)
    assert cg.oom_killed() is False
    release(child)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert cg.oom_killed() is True
    stats = cg.stats()
    assert stats["oom_kills"] >= 1
    assert 32 * M < stats["memory_peak_bytes"] <= 64 * M


FORKER = """
import os
gate_r, gate_w = os.pipe()
made = 0
while True:
    try:
        pid = os.fork()
    except OSError as e:
        print(made, e.errno, flush=True)
        break
    if pid == 0:
        os.close(gate_w)
        os.read(gate_r, 1)  # hold the slot until the parent closes gate_w
        os._exit(0)
    made += 1
os.close(gate_w)
for _ in range(made):
    os.wait()
"""


def test_pids_limit_makes_fork_fail_with_eagain(make_cgroup, spawn):
    cg = make_cgroup(CgroupLimits(pids_max=8))
    child = spawn([sys.executable, "-c", FORKER], stdout=subprocess.PIPE)
    cg.attach(child.pid)
    release(child)
    out, _ = child.communicate(timeout=30)
    made, err = (int(x) for x in out.split())
    assert err == errno.EAGAIN
    assert made == 7  # the forker itself holds the eighth slot
    assert read(f"{cg.path('pids')}/pids.events") == "max 1"


def test_shell_fork_beyond_pids_max_fails(make_cgroup, spawn, tmp_path):
    cg = make_cgroup(CgroupLimits(pids_max=4))
    script = "for i in 1 2 3 4 5 6; do sleep 30 & done; wait"
    with open(tmp_path / "stderr", "wb") as err:
        child = spawn(["sh", "-c", script], stderr=err)
        cg.attach(child.pid)
        release(child)
        # dash gives up on the fork that fails with EAGAIN and exits 2; its three sleeps stay.
        assert child.wait(timeout=10) == 2
    assert b"Cannot fork" in (tmp_path / "stderr").read_bytes()
    assert len(cg.pids()) == 3
    assert read(f"{cg.path('pids')}/pids.events") == "max 1"


def test_cpu_quota_throttles_a_busy_loop(make_cgroup, spawn):
    cg = make_cgroup(CgroupLimits(cpu_quota=0.05))
    child = spawn([sys.executable, "-c", "while True: pass"])
    cg.attach(child.pid)
    release(child)
    wait_for(lambda: cg.stats()["cpu_throttled_periods"], what="a throttled CFS period")
    assert cg.stats()["cpu_usage_us"] > 0


def test_freeze_stops_and_thaw_resumes(make_cgroup, spawn):
    cg = make_cgroup()
    child = spawn(["sleep", "60"])
    cg.attach(child.pid)
    release(child)
    freezer = cg.path("freezer")
    cg.freeze()
    assert read(f"{freezer}/freezer.state") == "FROZEN"
    assert proc_state(child.pid) == "D"
    cg.thaw()
    assert read(f"{freezer}/freezer.state") == "THAWED"
    wait_for(lambda: proc_state(child.pid) == "S", what="the child to sleep again")


# -- kill and destroy --------------------------------------------------------------------------


def test_kill_reaches_a_double_forked_grandchild(make_cgroup, spawn):
    cg = make_cgroup()
    child = spawn(["sh", "-c", "(sleep 1000 &); sleep 1000"])
    cg.attach(child.pid)
    release(child)

    def escaped():
        # The grandchild whose parent (the subshell) has exited: not a child of `sh` any more.
        for pid in cg.pids():
            stat = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
            if pid != child.pid and int(stat[1]) != child.pid:
                return pid
        return None

    orphan = wait_for(escaped, what="the double-forked grandchild")
    assert orphan in cg.pids()
    cg.kill()
    assert cg.pids() == []
    assert child.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: proc_state(orphan) in (None, "Z"), what="the grandchild to die")


def test_destroy_kills_removes_and_is_idempotent(make_cgroup, spawn, layout):
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * M, pids_max=16))
    child = spawn(["sleep", "60"])
    cg.attach(child.pid)
    release(child)
    cg.destroy()
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert leftovers(cg.name) == []
    assert cg.exists() is False
    cg.destroy()
    assert cg.pids() == []


def test_destroy_of_a_frozen_cgroup(make_cgroup, spawn):
    cg = make_cgroup()
    child = spawn(["sleep", "60"])
    cg.attach(child.pid)
    release(child)
    cg.freeze()
    with cg:
        pass
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert leftovers(cg.name) == []


def test_reap_orphans_keeps_cgroups_with_processes(make_cgroup, spawn, layout):
    empty, busy = make_cgroup(), make_cgroup()
    child = spawn(["sleep", "60"])
    busy.attach(child.pid)
    assert cgroups.reap_orphans(layout, prefix=PREFIX) == [empty.name]
    assert leftovers(empty.name) == []
    assert busy.pids() == [child.pid]
    assert cgroups.list_corral_cgroups(layout).count(busy.name) == 1
    assert Cgroup.open(layout, busy.name).pids() == [child.pid]


# -- v2 process control, on this host's unified mount ------------------------------------------
# On a v1 host the cgroup2 mount has no memory/pids/cpu (they are bound to v1), so v2 limits
# cannot be tested here; its core files (cgroup.procs, cgroup.freeze, cgroup.kill) can.


@pytest.fixture
def unified(layout) -> CgroupLayout:
    mounts = cgroups.parse_mounts(read("/proc/self/mounts"))
    points = [m.point for m in mounts if m.fstype == "cgroup2"]
    if not points:
        pytest.skip("this host has no cgroup2 mount")
    return CgroupLayout(version=2, root=points[0], parent=points[0])


@pytest.fixture
def make_v2(unified):
    """Cgroups made by hand under <unified>/corral/: plan() would enable absent controllers."""
    made: list[Cgroup] = []

    def make() -> Cgroup:
        cg = Cgroup(unified, PREFIX + "v2-" + uuid.uuid4().hex[:8])
        os.makedirs(cg.path("memory"))
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()
        assert not os.path.exists(cg.path("memory"))


def test_v2_create_without_controllers_names_subtree_control(unified):
    name = PREFIX + "v2-enoent"
    with pytest.raises(SandboxSetupError) as info:
        Cgroup.create(unified, name, CgroupLimits())
    err = info.value
    assert (err.step, err.path, err.errno) == (
        "cgroup write",
        f"{unified.root}/cgroup.subtree_control",
        errno.ENOENT,
    )
    assert "cgroup.controllers here does not offer all of +memory +pids +cpu" in str(err)
    assert not os.path.exists(f"{unified.root}/corral/{name}")


def test_v2_freeze_and_thaw(make_v2, spawn):
    cg = make_v2()
    child = spawn(["sleep", "60"])
    cg.attach(child.pid)
    release(child)
    events = f"{cg.path('freezer')}/cgroup.events"
    cg.freeze()
    assert "frozen 1" in read(events)
    cg.thaw()
    wait_for(lambda: "frozen 0" in read(events), what="the cgroup to thaw")


@pytest.mark.parametrize("with_cgroup_kill", [True, False], ids=["cgroup.kill", "freeze-loop"])
def test_v2_kill_reaches_a_double_forked_grandchild(make_v2, spawn, monkeypatch, with_cgroup_kill):
    if not with_cgroup_kill:
        monkeypatch.setattr(Cgroup, "_kill_file", lambda self: None)  # a kernel before 5.14
    cg = make_v2()
    assert cg.procs_files == (f"{cg.path('memory')}/cgroup.procs",)
    child = spawn(["sh", "-c", "(sleep 1000 &); sleep 1000"])
    cg.attach(child.pid)
    release(child)
    wait_for(lambda: len(cg.pids()) == 3, what="sh, its sleep and the double-forked sleep")
    cg.kill()
    assert cg.pids() == []
    assert child.wait(timeout=10) == -signal.SIGKILL


def test_a_group_removed_after_a_create_is_made_again_by_the_next(layout):
    """Cgroup.create makes a group once per process, then skips its ops; a group removed
    meanwhile (by an operator, a sweep) is made again, not reported as ENOENT."""
    # the hierarchies' roots moved into a directory of this test's, so that the group
    # ("corral" below it) is this test's alone to remove
    roots = {c: os.path.join(mnt, f"{PREFIX}root") for c, mnt in layout.controllers.items()}
    for root in set(roots.values()):
        os.mkdir(root)
    private = dataclasses.replace(layout, controllers=roots)
    dirs = list(set(private.bases().values()))
    try:
        Cgroup.create(private, f"{PREFIX}a", CgroupLimits(pids_max=8)).destroy()
        assert all(os.path.isdir(d) for d in dirs)
        for d in dirs:  # empty now: the next create finds no group
            os.rmdir(d)
        again = Cgroup.create(private, f"{PREFIX}b", CgroupLimits(pids_max=8))
        try:
            assert all(os.path.isdir(os.path.join(d, f"{PREFIX}b")) for d in dirs)
            with open(os.path.join(again.path("pids"), "pids.max")) as f:
                assert f.read().strip() == "8"
        finally:
            again.destroy()
        # and the create after that skips the group's ops again: it still works
        Cgroup.create(private, f"{PREFIX}c", CgroupLimits()).destroy()
    finally:
        for d in [*dirs, *set(roots.values())]:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
    assert not any(os.path.exists(d) for d in [*dirs, *roots.values()])
