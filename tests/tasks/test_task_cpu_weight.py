"""Deep tasks yield the CPU to real-time sessions (task_cpu_weight), through the real
daemon: the task's sandbox's cgroup carries the weight (v1 cpu.shares, v2 cpu.weight), and
its processes run at the matching nice value, which they cannot lower; task_cpu_weight =
100 treats tasks like sessions."""

from __future__ import annotations

import json
import os
import time

from corral.sandbox import cgroups

from .helpers import RUNNING, SUCCEEDED, attempt_files, wait_done, wait_task
from .test_local_tasks import ONE_SLOT

# The task's nice value (field 19 of /proc/self/stat) and whether it could lower it
# (renice -n -1 needs CAP_SYS_NICE in the host's user namespace).
REPORT = r"""
mkdir -p /workspace/out
nice=$(cut -d' ' -f19 /proc/self/stat)
if renice -n -1 -p $$ >/dev/null 2>&1; then lowered=yes; else lowered=no; fi
echo "$nice $lowered" > /workspace/out/report
"""


def _report(client) -> str:
    t = client.submit_task(["sh", "-c", REPORT])
    done = wait_done(client, t.id)
    assert done.state == SUCCEEDED, done.reason
    (f,) = [f for f in client.task_result(t.id).files if f.path == "report"]
    return f.content.decode().strip()


def _weight_of_a_running_task(daemon, client) -> str:
    """A running task's sandbox cgroup's cpu.shares (v1) or cpu.weight (v2), as the host
    sees it."""
    t = client.submit_task(["sleep", "60"])
    try:
        wait_task(client, t.id, lambda x: x.state == RUNNING, what="the task running")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for path in attempt_files(str(daemon.state.parent), "runner.json"):
                if f"/tasks/{t.id}/" in path:
                    with open(path) as f:
                        sandbox_id = json.load(f)["sandbox_id"]
                    layout = cgroups.detect()
                    if layout.version == 1:
                        path = os.path.join(layout.controllers["cpu"], cgroups.CORRAL_DIR,
                                            sandbox_id, "cpu.shares")
                    else:
                        path = os.path.join(layout.parent or layout.root, cgroups.CORRAL_DIR,
                                            sandbox_id, "cpu.weight")
                    with open(path) as f:
                        return f.read().strip()
            time.sleep(0.05)
        raise AssertionError("the task's runner.json did not appear")
    finally:
        client.cancel_task(t.id)
        wait_done(client, t.id)


def _as_written(weight: int) -> str:
    """What the task's cgroup file holds for weight on this host's hierarchy."""
    return str(cgroups.shares_of_weight(weight) if cgroups.detect().version == 1 else weight)


def test_a_task_runs_at_the_daemons_task_cpu_weight(task_daemon):
    d = task_daemon(ONE_SLOT)
    c = d.client()
    assert _report(c) == "10 no"  # the default weight 10 -> nice 10, and it stays there
    assert _weight_of_a_running_task(d, c) == _as_written(10)  # v1: 102 of 1024


def test_a_task_cpu_weight_of_100_treats_tasks_like_sessions(task_daemon):
    d = task_daemon("task_cpu_weight = 100\n" + ONE_SLOT)
    c = d.client()
    assert _report(c) == "0 no"
    assert _weight_of_a_running_task(d, c) == _as_written(100)
