"""The cgroups of the deep tasks (runtime/tasks/shim_cgroup.py) on this host's real
hierarchy: the batch group beside corral/ at the task weight; the shims' cgroup in it made
at the task weight, joined, kept while a process is in it, removed when empty, and swept
once its daemon is gone (also from corral/, where earlier daemons made it); the relays'
cgroup in corral/ a shim moves to while its agent runs, and back."""

from __future__ import annotations

import os
import subprocess
import sys

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


def _procs(directory: str) -> list[int]:
    with open(os.path.join(directory, "cgroup.procs")) as f:
        return [int(line) for line in f]


def _quota(name: str) -> tuple[str, str]:
    """(quota, period) of corral/<name>'s cpu controller, as v1 or v2 writes them."""
    cpu = _cpu_dir(name, cgroups.CORRAL_DIR)
    if cgroups.detect().version == 1:
        return _read(os.path.join(cpu, "cpu.cfs_quota_us")), _read(
            os.path.join(cpu, "cpu.cfs_period_us"))
    quota, period = _read(os.path.join(cpu, "cpu.max")).split()
    return quota, period


MOVER = """
import sys, time
from corral.runtime.tasks.shim_cgroup import Moves
moves = Moves(sys.argv[1].split(","), sys.argv[2].split(","))
for where in sys.argv[3:]:  # each move once told to (a line on stdin)
    sys.stdin.readline()
    print(where, moves.enter(where), flush=True)
"""


def test_a_shim_relays_from_the_relays_cgroup_and_goes_home_after(made):
    relay = shim_cgroup.make_relay()
    assert relay is not None
    try:
        assert relay.name == f"relays.{os.getpid()}.{live_start_time(os.getpid())}"
        assert relay.layout.group == cgroups.CORRAL_DIR
        quota, period = _quota(relay.name)  # for all relays together
        assert int(quota) == int(shim_cgroup.relay_cpus() * int(period))
        # half a CPU on this 2-CPU host; an eighth of a larger one's
        assert (shim_cgroup.relay_cpus(2), shim_cgroup.relay_cpus(64)) == (0.5, 8.0)
        assert _read(os.path.join(_cpu_dir(relay.name, cgroups.CORRAL_DIR),
                                  _weight_file())) == _as_written(100)  # the ordinary weight
        assert shim_cgroup.make_relay().name == relay.name  # found again, not made twice
        shim = subprocess.Popen(
            [sys.executable, "-c", MOVER, ",".join(relay.paths), ",".join(made.paths),
             "relay", "relay", "home"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert shim_cgroup.join(made, shim.pid)  # born in the shims' cgroup
            shim.stdin.write("\n")
            shim.stdin.flush()
            # relaying: every hierarchy's cgroup is the relays'
            assert shim.stdout.readline() == "relay True\n"
            assert relay.pids() == [shim.pid] and made.pids() == []
            assert f"/{cgroups.CORRAL_DIR}/{relay.name}\n" in _cgroup_of(shim.pid)
            shim.stdin.write("\n")
            shim.stdin.flush()
            assert shim.stdout.readline() == "relay False\n"  # there already
            shim.stdin.write("\n")
            shim.stdin.flush()
            assert shim.stdout.readline() == "home True\n"
            assert made.pids() == [shim.pid] and relay.pids() == []
        finally:
            shim.kill()
            shim.wait()
    finally:
        assert shim_cgroup.release(relay) is True
    assert not os.path.exists(_cpu_dir(relay.name, cgroups.CORRAL_DIR))


def test_a_shim_outside_its_cgroup_never_moves_and_a_failed_move_leaves_it_running(made,
                                                                                   tmp_path):
    assert shim_cgroup.Moves([], made.paths).enter("relay") is False
    moves = shim_cgroup.Moves(["/relay-gone"], [])  # born outside: stays outside
    assert (moves.relay, moves.home) == ([], [])
    gone = [str(tmp_path / "gone")]  # a stopped daemon's relays' cgroup, removed meanwhile
    moves = shim_cgroup.Moves(gone, made.paths)
    assert moves.enter("relay") is False and moves.where == "home"
    # a move that fails part way (one hierarchy moved) is undone by the move home
    relay = shim_cgroup.make_relay()
    child = subprocess.Popen([sys.executable, "-c", MOVER, ",".join([*relay.paths[:1], *gone]),
                              ",".join(made.paths), "relay", "home"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert shim_cgroup.join(made, child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "relay False\n"
        assert _procs(relay.paths[0]) == [child.pid]  # split: its first hierarchy moved
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "home True\n"
        assert _procs(relay.paths[0]) == [] and _procs(made.paths[0]) == [child.pid]
    finally:
        child.kill()
        child.wait()
        assert shim_cgroup.release(relay) is True


def test_sweep_removes_the_empty_relays_cgroups_of_gone_daemons(made):
    layout = cgroups.detect()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = cgroups.Cgroup.create(layout, f"relays.{gone.pid}.1", cgroups.CgroupLimits())
    busy = cgroups.Cgroup.create(layout, f"relays.{gone.pid}.2", cgroups.CgroupLimits())
    child = subprocess.Popen(["sleep", "30"])
    try:
        busy.attach(child.pid)  # a shim relaying for a task that outlived its daemon
        swept = shim_cgroup.sweep()
        assert dead.name in swept and not dead.exists()
        assert busy.name not in swept and busy.exists() and child.poll() is None
    finally:
        child.kill()
        child.wait()
        for cg in (dead, busy):
            cg.destroy()
