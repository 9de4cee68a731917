"""Deep tasks yield the CPU to real-time sessions (task_cpu_weight), through the real
daemon: a task's sandbox is batch work, made in `corral-batch/` beside `corral/`, and the
daemon sets that group's weight, which bounds all tasks together, to its task_cpu_weight (v1
cpu.shares, v2 cpu.weight). Inside it the task's sandbox and the daemon's shims' cgroup
(runtime/tasks/shim_cgroup.py), where the shim that starts it runs, are at that weight too;
task_cpu_weight = 100 gives tasks together the weight of the sessions' group. Once the
task's agent runs, its shim relays from the daemon's relays' cgroup in corral/."""

from __future__ import annotations

import json
import os

from corral.sandbox import cgroups
from corral.sandbox.backends.native import runtime_base

from ..processes import wait_until
from .helpers import RUNNING, attempt_files, shims_under, wait_done, wait_task
from .test_local_tasks import ONE_SLOT


def _as_written(weight: int) -> str:
    """What a cgroup's weight file holds for weight on this host's hierarchy."""
    return str(cgroups.shares_of_weight(weight) if cgroups.detect().version == 1 else weight)


def _weight_file(name: str = "", group: str = cgroups.BATCH_DIR) -> str:
    """The weight file of <group>/<name> (of the group itself without a name)."""
    layout = cgroups.detect().in_group(group)
    leaf = "cpu.shares" if layout.version == 1 else "cpu.weight"
    return os.path.join(layout.bases()["cpu"], name, leaf)


def _weights_of_a_running_task(daemon, client) -> tuple[str, str]:
    """A running task's sandbox cgroup weight, and its daemon's shims' cgroup weight, as
    the host sees them (its sandbox is made at its weight in the batch group: no later
    write). While its agent runs, its shim relays from the daemon's relays' cgroup in
    corral/, at the ordinary weight and a quota."""
    t = client.submit_task(["sleep", "60"])
    try:
        wait_task(client, t.id, lambda x: x.state == RUNNING, what="the task running")
        (runner_json,) = [p for p in attempt_files(str(daemon.state.parent), "runner.json")
                          if f"/tasks/{t.id}/" in p]
        with open(runner_json) as f:
            sandbox_id = json.load(f)["sandbox_id"]
        with open(os.path.join(runtime_base(), sandbox_id, "state.json")) as f:
            state = json.load(f)
        assert (state["cgroup"], state["cgroup_group"]) == (sandbox_id, cgroups.BATCH_DIR)
        with open(_weight_file(sandbox_id)) as f:
            sandbox_weight = f.read().strip()
        (shim,) = shims_under(str(daemon.state.parent))
        # the shim moves once the agent has started: give it that moment
        assert wait_until(lambda: _cgroup_named(shim, cgroups.CORRAL_DIR)
                          .startswith(f"relays.{daemon.pid}."), 10.0), _cgroups_of(shim)
        relay = _cgroup_named(shim, cgroups.CORRAL_DIR)
        with open(_weight_file(relay, cgroups.CORRAL_DIR)) as f:
            assert f.read().strip() == _as_written(100)
        (shims,) = _daemons_cgroups(daemon, cgroups.BATCH_DIR, "tasks.")
        with open(_weight_file(shims)) as f:
            return sandbox_weight, f.read().strip()
    finally:
        client.cancel_task(t.id)
        wait_done(client, t.id)


def _cgroups_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def _cgroup_named(pid: int, group: str) -> str:
    """The name of pid's <group>/... cgroup ("" if it is in none; every hierarchy holds
    the same)."""
    names = {line.rsplit(f"/{group}/", 1)[1].strip()
             for line in _cgroups_of(pid).splitlines() if f"/{group}/" in line}
    assert len(names) <= 1, names
    return names.pop() if names else ""


def _daemons_cgroups(daemon, group: str, prefix: str) -> list[str]:
    """The daemon's own <group>/<prefix><pid>.<start> cgroups."""
    layout = cgroups.detect().in_group(group)
    return [n for n in cgroups.list_corral_cgroups(layout)
            if n.startswith(f"{prefix}{daemon.pid}.")]


def _group_weight() -> str:
    with open(_weight_file()) as f:
        return f.read().strip()


def test_a_task_and_its_shim_run_in_the_batch_group_at_the_daemons_task_cpu_weight(
        task_daemon):
    d = task_daemon(ONE_SLOT)
    assert _group_weight() == _as_written(10)
    assert _weights_of_a_running_task(d, d.client()) == (_as_written(10), _as_written(10))


def test_a_task_cpu_weight_of_100_gives_tasks_the_weight_of_the_sessions(task_daemon):
    d = task_daemon("task_cpu_weight = 100\n" + ONE_SLOT)
    assert _group_weight() == _as_written(100)
    assert _weights_of_a_running_task(d, d.client()) == (_as_written(100), _as_written(100))


def test_the_shims_and_relays_cgroups_go_with_their_daemon(task_daemon):
    """Made at start (the zygote is in the shims'), removed at a stop that leaves no shim
    in them."""
    d = task_daemon(ONE_SLOT)
    (shims,) = _daemons_cgroups(d, cgroups.BATCH_DIR, "tasks.")
    (relays,) = _daemons_cgroups(d, cgroups.CORRAL_DIR, "relays.")
    batch = cgroups.detect().in_group(cgroups.BATCH_DIR)
    assert cgroups.Cgroup(batch, shims).pids()  # the zygote
    assert not cgroups.Cgroup(cgroups.detect(), relays).pids()  # no task runs
    d.stop()
    assert not cgroups.Cgroup(batch, shims).exists()
    assert not cgroups.Cgroup(cgroups.detect(), relays).exists()
