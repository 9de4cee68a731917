"""Deep tasks yield the CPU to real-time sessions (task_cpu_weight), through the real
daemon: a task's sandbox starts at the ordinary weight (a busy host does not slow its
start) and its cgroup is lowered to the daemon's task_cpu_weight once its command runs
(v1 cpu.shares, v2 cpu.weight); task_cpu_weight = 100 treats tasks like sessions."""

from __future__ import annotations

import json
import os
import time

from corral.sandbox import cgroups

from .helpers import RUNNING, attempt_files, wait_done, wait_task
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


def _settled_weight_of_a_running_task(daemon, client, expected: str) -> str:
    """A running task's sandbox cgroup weight as the host sees it, once it reads expected
    (or what it reads after 20 s)."""
    t = client.submit_task(["sleep", "60"])
    try:
        wait_task(client, t.id, lambda x: x.state == RUNNING, what="the task running")
        found, deadline = "", time.monotonic() + 20
        while time.monotonic() < deadline and found != expected:
            for path in attempt_files(str(daemon.state.parent), "runner.json"):
                if f"/tasks/{t.id}/" in path:
                    with open(path) as f:
                        sandbox_id = json.load(f)["sandbox_id"]
                    with open(_weight_file(sandbox_id)) as f:
                        found = f.read().strip()
            time.sleep(0.05)
        return found
    finally:
        client.cancel_task(t.id)
        wait_done(client, t.id)


def test_a_running_task_yields_at_the_daemons_task_cpu_weight(task_daemon):
    d = task_daemon(ONE_SLOT)
    c = d.client()
    assert _settled_weight_of_a_running_task(d, c, _as_written(10)) == _as_written(10)


def test_a_task_cpu_weight_of_100_treats_tasks_like_sessions(task_daemon):
    d = task_daemon("task_cpu_weight = 100\n" + ONE_SLOT)
    c = d.client()
    assert _settled_weight_of_a_running_task(d, c, _as_written(100)) == _as_written(100)
