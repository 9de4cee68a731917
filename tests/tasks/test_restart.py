"""A daemon SIGKILLed mid-task and restarted: the task is never lost and never restarts
from zero. With its sandbox alive the new daemon re-attaches; with the sandbox gone too it
retries from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal

from .helpers import (
    QUEUED,
    RUNNING,
    SUCCEEDED,
    answer,
    deep_task,
    progress,
    shims_under,
    wait_done,
    wait_task,
)

ONE_SLOT = """
[[nodes]]
name = "solo"
labels = { pool = "solo" }
resources = { cpu = 1 }
"""


def _running_past(step: int, checkpoints: int = 1):
    """Running, past `step`, with at least `checkpoints` checkpoints persisted. A save of
    the deep agent may make up to two (its directory changes, then its frame comes) and
    pacing may fold several into one, so a count of checkpoints says little about the step
    they hold: a test that needs the step reads the persisted checkpoint (`_saved_step`)."""
    return lambda t: t.state == RUNNING and progress(t).get("done", 0) >= step \
        and t.checkpoint_seq >= checkpoints


def _saved_step(root, task_id: str) -> int:
    """The step the task's last persisted checkpoint holds: the newer of its frame and the
    state.json of its directory (as examples/agents/deep_task.py restores it)."""
    checkpoints = root / "state" / "tasks" / task_id / "checkpoints"
    latest = checkpoints / (checkpoints / "LATEST").read_text().strip()
    steps = [json.loads((latest / "frame").read_bytes())["step"]] \
        if (latest / "frame").exists() else []
    state = latest / "files" / "state.json"
    if state.exists():
        steps.append(json.loads(state.read_text())["step"])
    return max(steps)


def test_sigkill_restart_reattaches_to_the_live_sandbox(task_daemon):
    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = deep_task(c, "--steps", "60", "--step-seconds", "0.05", "--checkpoint-every", "5",
                  retries=2)
    before = wait_task(c, t.id, _running_past(12), what="step 12")
    assert d.kill() == -signal.SIGKILL
    shims = shims_under(str(d.root))
    assert len(shims) == 1  # the attempt did not die with its daemon
    d.start()
    c = d.client()
    after = wait_task(c, t.id, lambda t: progress(t).get("done", 0) > progress(before)["done"],
                      what="more progress")
    assert after.attempt == 1
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    result = json.loads(done.result_json)
    assert result == {"answer": answer(60), "steps": 60, "resumed_from": 0, "attempt": 1}
    kinds = [r.kind for r in c.audit_query(kind="task.")]
    assert "task.reattached" in kinds
    # The restarted daemon's orphan sweep left the task's sandbox alone.
    [start] = c.audit_query(kind="task.start")
    assert start.sandbox_id.startswith("sbx-")
    assert start.sandbox_id not in {r.sandbox_id for r in c.audit_query(kind="sandbox.reaped")}


def test_sigkill_restart_with_the_sandbox_gone_resumes_from_checkpoint(task_daemon):
    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = deep_task(c, "--steps", "60", "--step-seconds", "0.05", "--checkpoint-every", "5",
                  retries=2, resources={"cpu": 1})
    queued = c.submit_task(["true"], resources={"cpu": 1})
    wait_task(c, t.id, _running_past(17, checkpoints=2), what="step 17, 2 checkpoints")
    assert c.get_task(queued.id).state == QUEUED
    d.kill()
    for pid in shims_under(str(d.root)):  # the node's runner dies too: the sandbox with it
        os.kill(pid, signal.SIGKILL)
    saved = _saved_step(d.root, t.id)  # nothing writes checkpoints any more
    assert saved >= 5
    d.start()
    c = d.client()
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 2
    result = json.loads(done.result_json)
    assert result["answer"] == answer(60)
    assert result["attempt"] == 2
    assert result["resumed_from"] == saved  # from the last checkpoint, not from zero
    assert wait_done(c, queued.id).state == SUCCEEDED  # the queued task survived too
    kinds = [r.kind for r in c.audit_query(kind="task.")]
    assert "task.retrying" in kinds


TWO_NODES = """
[[nodes]]
name = "left"
labels = { pool = "deep" }
resources = { cpu = 1 }

[[nodes]]
name = "right"
labels = { pool = "deep" }
resources = { cpu = 1 }
"""


def test_drain_moves_a_running_task_to_another_node_from_its_checkpoint(task_daemon):
    d = task_daemon(TWO_NODES)
    c = d.client()
    t = deep_task(c, "--steps", "40", "--step-seconds", "0.05", "--checkpoint-every", "5",
                  selector={"pool": "deep"}, resources={"cpu": 1})
    first = wait_task(c, t.id, _running_past(8, checkpoints=2), what="step 8").node
    drained = c.drain_node(first)
    assert drained.draining and drained.cordoned
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    assert done.node != first and done.attempt == 2
    result = json.loads(done.result_json)
    assert result["resumed_from"] >= 5 and result["answer"] == answer(40)
    # A drain is not a failure: a task without retries still got its second attempt.
    assert {n.name: (n.draining, list(n.tasks)) for n in c.list_nodes()}[first] == (True, [])
    assert c.cordon_node(first, on=False).draining is False


def test_a_task_that_ended_while_no_daemon_ran_is_settled_at_restart(task_daemon):
    from .helpers import wait_until_true

    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = deep_task(c, "--steps", "20", "--step-seconds", "0.05", "--checkpoint-every", "5")
    wait_task(c, t.id, lambda t: t.state == RUNNING, what="running")
    d.kill()
    assert wait_until_true(lambda: shims_under(str(d.root)) == [], timeout_s=60)
    d.start()
    c = d.client()
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 1
    assert progress(done)["done"] == 20
    assert json.loads(done.result_json)["answer"] == answer(20)
    assert done.checkpoint_seq >= 4
