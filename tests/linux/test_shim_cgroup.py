"""The cgroups of the deep tasks (runtime/tasks/shim_cgroup.py) on this host's real
hierarchy: the batch group beside corral/ at the task weight; the shims' cgroup in it made
at the task weight, joined, kept while a process is in it, removed when empty, and swept
once its daemon is gone (also from corral/, where earlier daemons made it)."""

from __future__ import annotations

import os
import subprocess

import pytest

from corral.runtime.tasks import shim_cgroup
from corral.sandbox import cgroups
from corral.sandbox.procinfo import live_start_time

from ..tasks.test_task_cpu_weight import _as_written

pytestmark = pytest.mark.skipif(
    cgroups.delegation_problem(cgroups.detect()) is not None,
    reason="needs cgroups of the runtime's own (root, or a delegated v2 subtree)")


def _cpu_dir(name: str, group: str = cgroups.BATCH_DIR) -> str:
    """The cpu directory of <group>/<name> (of the group itself without a name)."""
    return os.path.join(cgroups.detect().in_group(group).bases()["cpu"], name)


def _weight(name: str) -> str:
    return _read(os.path.join(_cpu_dir(name), _weight_file()))


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


@pytest.fixture
def made():
    """This process's shims' cgroup at weight 10; the batch group's weight (host-wide, a
    daemon's here may have set it) is written back after."""
    group_weight = os.path.join(_cpu_dir(""), os.path.basename(_weight_file()))
    before = _read(group_weight) if os.path.exists(group_weight) else None
    cg = shim_cgroup.make(10)
    assert cg is not None
    yield cg
    for pid in cg.pids():
        with pytest.raises(ProcessLookupError):  # every test ends its own processes
            os.kill(pid, 0)
    shim_cgroup.release(cg)
    if before is not None:
        with open(group_weight, "w") as f:
            f.write(before)


def _weight_file() -> str:
    return "cpu.shares" if cgroups.detect().version == 1 else "cpu.weight"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_made_at_the_task_weight_joined_and_kept_while_a_process_is_in_it(made):
    assert made.name == f"tasks.{os.getpid()}.{live_start_time(os.getpid())}"
    assert made.layout.group == cgroups.BATCH_DIR
    assert (_weight(""), _weight(made.name)) == (_as_written(10), _as_written(10))
    assert shim_cgroup.make(25).name == made.name  # the same process: rewritten, not made
    assert (_weight(""), _weight(made.name)) == (_as_written(25), _as_written(25))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert shim_cgroup.join(made, child.pid) is True
        assert f"/{cgroups.BATCH_DIR}/{made.name}\n" in _cgroup_of(child.pid)
        assert made.pids() == [child.pid]
        assert shim_cgroup.release(made) is False  # busy: left as it is, nothing killed
        assert child.poll() is None and made.exists()
    finally:
        child.kill()
        child.wait()
    assert shim_cgroup.release(made) is True
    assert not made.exists() and not os.path.exists(_cpu_dir(made.name))


def test_a_gone_process_cannot_join(made):
    child = subprocess.Popen(["true"])
    child.wait()
    assert shim_cgroup.join(made, child.pid) is False
    assert shim_cgroup.join(None, os.getpid()) is False  # no cgroup here: nothing to join


def test_sweep_removes_the_empty_ones_of_gone_daemons_only(made):
    layout = cgroups.detect().in_group(cgroups.BATCH_DIR)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = cgroups.Cgroup.create(layout, f"tasks.{gone.pid}.1", cgroups.CgroupLimits())
    # where a daemon before the batch group made its shims' cgroup
    older = cgroups.Cgroup.create(layout.in_group(cgroups.CORRAL_DIR), f"tasks.{gone.pid}.3",
                                  cgroups.CgroupLimits())
    busy = cgroups.Cgroup.create(layout, f"tasks.{gone.pid}.2", cgroups.CgroupLimits())
    other = cgroups.Cgroup.create(layout, "tasks.x", cgroups.CgroupLimits())  # not its name
    child = subprocess.Popen(["sleep", "30"])
    try:
        busy.attach(child.pid)  # a shim that outlived its daemon
        swept = shim_cgroup.sweep()
        assert dead.name in swept and not dead.exists()
        assert older.name in swept and not older.exists()
        assert busy.name not in swept and busy.exists() and child.poll() is None
        assert made.exists() and other.exists()  # a live daemon's, and a name not its own
    finally:
        child.kill()
        child.wait()
        for cg in (dead, older, busy, other):
            cg.destroy()
