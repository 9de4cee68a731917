"""Deep tasks yield the CPU to real-time sessions (task_cpu_weight), through the real
daemon: a task's sandbox is batch work, made in `corral-batch/` beside `corral/`, and the
daemon sets that group's weight, which bounds all tasks together, to its task_cpu_weight (v1
cpu.shares, v2 cpu.weight). Inside it the task's sandbox and the daemon's shims' cgroup
(runtime/tasks/shim_cgroup.py), where the shim that starts it runs, are at that weight too;
task_cpu_weight = 100 gives tasks together the weight of the sessions' group."""

from __future__ import annotations

import json
import os

from corral.sandbox import cgroups
from corral.sandbox.backends.native import runtime_base

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
    """A running task's sandbox cgroup weight, and its shim's cgroup weight, as the host
    sees them (its sandbox is made at its weight in the batch group: no later write)."""
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
        shims = _cgroup_named(shim, f"tasks.{daemon.pid}.")
        with open(_weight_file(shims)) as f:
            return sandbox_weight, f.read().strip()
    finally:
        client.cancel_task(t.id)
        wait_done(client, t.id)


def _cgroup_named(pid: int, prefix: str) -> str:
    """The name of pid's corral-batch/<prefix>... cgroup (every hierarchy holds the same)."""
    group = f"/{cgroups.BATCH_DIR}/"
    with open(f"/proc/{pid}/cgroup") as f:
        names = {line.rsplit(group, 1)[1].strip() for line in f if group in line}
    assert len(names) == 1, names
    (name,) = names
    assert name.startswith(prefix), name
    return name


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


def test_the_shims_cgroup_goes_with_its_daemon(task_daemon):
    """Made at start (the zygote is in it), removed at a stop that leaves no shim in it."""
    d = task_daemon(ONE_SLOT)
    layout = cgroups.detect().in_group(cgroups.BATCH_DIR)
    ours = [n for n in cgroups.list_corral_cgroups(layout) if n.startswith(f"tasks.{d.pid}.")]
    assert len(ours) == 1
    assert cgroups.Cgroup(layout, ours[0]).pids()  # the zygote
    d.stop()
    assert not cgroups.Cgroup(layout, ours[0]).exists()
