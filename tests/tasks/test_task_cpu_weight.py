"""Deep tasks yield the CPU to real-time sessions (task_cpu_weight), through the real
daemon: a task's sandbox is made at the daemon's task_cpu_weight (v1 cpu.shares, v2
cpu.weight), and the shim that starts it runs in the daemon's shims' cgroup
(runtime/tasks/shim_cgroup.py) at that weight too; task_cpu_weight = 100 treats tasks like
sessions."""

from __future__ import annotations

import json
import os

from corral.sandbox import cgroups

from .helpers import RUNNING, attempt_files, shims_under, wait_done, wait_task
from .test_local_tasks import ONE_SLOT


def _as_written(weight: int) -> str:
    """What a cgroup's weight file holds for weight on this host's hierarchy."""
    return str(cgroups.shares_of_weight(weight) if cgroups.detect().version == 1 else weight)


def _weight_file(sandbox_id: str) -> str:
    layout = cgroups.detect()
    if layout.version == 1:
        return os.path.join(layout.controllers["cpu"], cgroups.CORRAL_DIR, sandbox_id,
                            "cpu.shares")
    return os.path.join(layout.parent or layout.root, cgroups.CORRAL_DIR, sandbox_id,
                        "cpu.weight")


def _weights_of_a_running_task(daemon, client) -> tuple[str, str]:
    """A running task's sandbox cgroup weight, and its shim's cgroup weight, as the host
    sees them (its sandbox is made at its weight: no wait for a later write)."""
    t = client.submit_task(["sleep", "60"])
    try:
        wait_task(client, t.id, lambda x: x.state == RUNNING, what="the task running")
        (runner_json,) = [p for p in attempt_files(str(daemon.state.parent), "runner.json")
                          if f"/tasks/{t.id}/" in p]
        with open(runner_json) as f:
            sandbox_id = json.load(f)["sandbox_id"]
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
    """The name of pid's corral/<prefix>... cgroup (every hierarchy holds the same)."""
    with open(f"/proc/{pid}/cgroup") as f:
        names = {line.rsplit("/corral/", 1)[1].strip() for line in f if "/corral/" in line}
    assert len(names) == 1, names
    (name,) = names
    assert name.startswith(prefix), name
    return name


def test_a_task_and_its_shim_run_at_the_daemons_task_cpu_weight(task_daemon):
    d = task_daemon(ONE_SLOT)
    assert _weights_of_a_running_task(d, d.client()) == (_as_written(10), _as_written(10))


def test_a_task_cpu_weight_of_100_treats_tasks_like_sessions(task_daemon):
    d = task_daemon("task_cpu_weight = 100\n" + ONE_SLOT)
    assert _weights_of_a_running_task(d, d.client()) == (_as_written(100), _as_written(100))


def test_the_shims_cgroup_goes_with_its_daemon(task_daemon):
    """Made at start (the zygote is in it), removed at a stop that leaves no shim in it."""
    d = task_daemon(ONE_SLOT)
    layout = cgroups.detect()
    ours = [n for n in cgroups.list_corral_cgroups(layout) if n.startswith(f"tasks.{d.pid}.")]
    assert len(ours) == 1
    assert cgroups.Cgroup(layout, ours[0]).pids()  # the zygote
    d.stop()
    assert not cgroups.Cgroup(layout, ours[0]).exists()
