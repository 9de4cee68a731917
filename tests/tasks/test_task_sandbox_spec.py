"""A task's sandbox is the SandboxSpec its request asked for, through the real daemon:
the command timeout applies (it was once dropped on the way in, with allow_net, whose
test is tests/egress/test_egress_tasks.py), and a spec stored by the daemon before tasks
carried a SandboxSpec (SandboxSpec keyword arguments) still loads after a restart."""

from __future__ import annotations

import json
import sqlite3
import time

from .helpers import FAILED, QUEUED, SUCCEEDED, wait_done, wait_task
from .test_local_tasks import ONE_SLOT


def test_a_tasks_command_timeout_ends_its_command(task_daemon):
    c = task_daemon().client()
    began = time.monotonic()
    t = c.submit_task(["sleep", "600"], command_timeout_s=1.0)
    assert t.spec.sandbox.command_timeout_s == 1.0
    done = wait_done(c, t.id, timeout_s=60)
    assert (done.state, done.reason) == (FAILED, "killed by its command timeout")
    assert time.monotonic() - began < 30  # the 1 s limit, not the command, ended it
    assert c.get_task(t.id).spec.sandbox.command_timeout_s == 1.0


def test_a_spec_stored_before_tasks_carried_a_sandbox_spec_loads_after_a_restart(task_daemon):
    d = task_daemon(ONE_SLOT)
    c = d.client()
    gate = c.submit_task(["sh", "-c", "while [ ! -e /workspace/go ]; do sleep 0.02; done"])
    wait_task(c, gate.id, lambda t: t.state != QUEUED, what="the gate task placed")
    queued = c.submit_task(["sh", "-c", "echo $GREETING"], env={"GREETING": "hi"},
                           hostname="job")
    assert d.stop() == 0
    # the row as the daemon wrote it before: the sandbox as SandboxSpec keyword arguments
    conn = sqlite3.connect(d.state / "tasks.db")
    with conn:
        (text,) = conn.execute("SELECT spec FROM tasks WHERE id = ?", (queued.id,)).fetchone()
        stored = json.loads(text)
        stored["sandbox"] = {"profile": "default", "memory_bytes": 512 << 20,
                             "pids_max": 256, "cpus": 1.0, "tmp_bytes": 64 << 20,
                             "hostname": "job", "env": [["GREETING", "hi"]]}
        conn.execute("UPDATE tasks SET spec = ? WHERE id = ?",
                     (json.dumps(stored, sort_keys=True, separators=(",", ":")), queued.id))
    conn.close()

    d.start()
    c = d.client()
    # the gate has done its part (the task below was queued behind it): whether its attempt
    # outlived the restart or a new one started, cancelling it frees the one slot
    c.cancel_task(gate.id)
    shown = c.get_task(queued.id).spec.sandbox
    assert (shown.hostname, dict(shown.env), shown.memory_bytes) == ("job", {"GREETING": "hi"},
                                                                     512 << 20)
    assert wait_done(c, queued.id).state == SUCCEEDED
