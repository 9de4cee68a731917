"""Retention of deep tasks (issue 20, "Retention"): finished tasks, their results and lost
attempts' workspaces are removed after `task_retention`, audited; running work never is."""

from __future__ import annotations

import json
import os
import signal

import pytest

from corral.runtime import config
from corral.runtime.client import ClientError
from corral.sandbox.errors import InvalidSpec

from .helpers import RUNNING, SUCCEEDED, shims_under, wait_done, wait_task, wait_until_true

RETAIN_2S = 'task_retention = "2s"\n'

WRITER = ["sh", "-c", "mkdir -p /workspace/out && echo kept > /workspace/out/answer"]


def _gone(client, task_id: str) -> bool:
    try:
        client.get_task(task_id)
    except ClientError as exc:
        assert exc.code.name == "NOT_FOUND"
        return True
    return False


def test_a_finished_task_and_its_result_are_removed_after_the_retention(task_daemon):
    d = task_daemon(RETAIN_2S)
    c = d.client()
    task = c.submit_task(WRITER, request_id="r-1")
    running = c.submit_task(["sleep", "600"])
    assert wait_done(c, task.id).state == SUCCEEDED
    result = c.task_result(task.id)
    assert [(f.path, f.content) for f in result.files] == [("answer", b"kept\n")]
    task_dir = d.state / "tasks" / task.id
    assert task_dir.is_dir()

    assert wait_until_true(lambda: _gone(c, task.id), 30)
    assert not task_dir.exists()
    [expired] = c.audit_query(kind="task.expired")
    detail = json.loads(expired.detail_json)
    assert (expired.tenant, detail["task_ids"], detail["retention_s"]) == ("local", [task.id], 2)
    # The task that still runs is kept, whatever its age.
    assert c.get_task(running.id).state == RUNNING
    assert (d.state / "tasks" / running.id).is_dir()
    # Its request id is free again: the same one now makes a new task.
    again = c.submit_task(WRITER, request_id="r-1")
    assert again.id != task.id
    # The row went too: a restart neither lists the task nor refuses a store that lost it.
    c.cancel_task(running.id)
    wait_done(c, running.id)
    assert d.stop() == 0
    d.start()
    c = d.client()
    assert task.id not in {t.id for t in c.list_tasks()}


def test_a_lost_attempts_workspace_is_removed_and_the_running_one_kept(task_daemon):
    d = task_daemon(RETAIN_2S)
    c = d.client()
    task = c.submit_task(["sleep", "600"], retries=1)
    wait_task(c, task.id, lambda t: t.state == RUNNING, what="running")
    lost_link = d.state / "tasks" / task.id / "attempt-1" / "workspace"
    assert os.path.islink(lost_link)
    d.kill()
    for pid in shims_under(str(d.root)):  # the attempt is lost with its runner
        os.kill(pid, signal.SIGKILL)
    d.start()
    c = d.client()
    wait_task(c, task.id, lambda t: t.state == RUNNING and t.attempt == 2, what="attempt 2")
    assert wait_until_true(lambda: not os.path.lexists(lost_link), 30)
    records = c.audit_query(kind="task.workspace_expired")
    assert [(json.loads(r.detail_json)["task_id"], json.loads(r.detail_json)["attempt"])
            for r in records] == [(task.id, 1)]
    # The running attempt's workspace is untouched, and the task is still there.
    running_link = d.state / "tasks" / task.id / "attempt-2" / "workspace"
    assert os.path.islink(running_link) and os.path.isdir(running_link)
    assert c.get_task(task.id).state == RUNNING
    c.cancel_task(task.id)
    wait_done(c, task.id)


def test_retention_settings():
    assert config.load(None, {}).task_retention_s == 7 * 86400
    assert config.load(None, {"task_retention_s": config.retention_seconds("0")}
                       ).task_retention_s == 0
    with pytest.raises(InvalidSpec, match=r"^task_retention: -1 must be a duration \(e\.g\. "
                                          r"7d\) or 0 to keep every task$"):
        config.load(None, {"task_retention_s": -1})
    with pytest.raises(InvalidSpec, match=r"^task-retention: 'soon' is not a duration"):
        config.retention_seconds("soon", "task-retention")
