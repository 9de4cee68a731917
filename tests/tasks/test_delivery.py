"""Delivery semantics of deep tasks: at-least-once, and what a task needs to be idempotent.

Every attempt finds CORRAL_TASK_ID (stable) and CORRAL_ATTEMPT_ID (its own) in its
environment; a Submit carries an optional request_id, so a retried Submit returns the task
the first one made instead of a second task.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from corral.runtime.client import ClientError

from .helpers import RUNNING, SUCCEEDED, shims_under, wait_done, wait_task

#: Appends (task id, attempt, attempt id) to a file in its checkpoint directory (carried
#: from attempt to attempt), fails its first attempt, and reports the list in its RESULT.
#: With --hang it waits on its second attempt's first run until killed.
RECORDER = """
import json, os, sys, time
import corral_agent as a
path = os.path.join(os.environ["CORRAL_CHECKPOINT_DIR"], "seen.json")
seen = json.load(open(path)) if os.path.exists(path) else []
seen.append([os.environ["CORRAL_TASK_ID"], os.environ["CORRAL_ATTEMPT"],
             os.environ["CORRAL_ATTEMPT_ID"]])
with open(path + ".tmp", "w") as f:
    json.dump(seen, f)
os.replace(path + ".tmp", path)
if "--hang" in sys.argv and len(seen) == 1:
    a.progress(stage="side effect done")
    time.sleep(600)
if len(seen) < 2:
    sys.exit(1)
a.result(seen=seen)
"""


def _recorder(client, *args, **kw):
    return client.submit_task(["python3", "/workspace/recorder.py", *args],
                              files={"recorder.py": RECORDER.encode()}, **kw)


def _check_ids(task_id: str, seen: list) -> None:
    assert [s[0] for s in seen] == [task_id, task_id]  # the task id is stable
    assert [s[1] for s in seen] == ["1", "2"]
    first, second = seen[0][2], seen[1][2]
    assert first != second  # each attempt has its own id
    assert first.startswith(f"{task_id}.1.") and second.startswith(f"{task_id}.2.")
    assert len(first) == len(task_id) + 11  # ".1." + 8 hex digits


def test_every_attempt_gets_the_task_id_and_its_own_attempt_id(task_daemon):
    d = task_daemon()
    c = d.client()
    task = _recorder(c, retries=1)
    done = wait_done(c, task.id)
    assert done.state == SUCCEEDED, done.reason
    seen = json.loads(done.result_json)["seen"]
    _check_ids(task.id, seen)
    # The attempt ids are in the audit trail too (each task.start names its runner).
    starts = [json.loads(r.detail_json)["runner"]["attempt_id"]
              for r in c.audit_query(kind="task.start")]
    assert starts == [s[2] for s in seen]


def test_a_crash_of_daemon_and_shim_repeats_the_attempt_under_a_new_attempt_id(task_daemon):
    """At-least-once: the side effect of an attempt whose runner died is done again by the
    next attempt; the same CORRAL_TASK_ID is what lets a task notice."""
    d = task_daemon()
    c = d.client()
    task = _recorder(c, "--hang", retries=1)
    wait_task(c, task.id, lambda t: t.state == RUNNING and "side effect" in t.progress_json
              and t.checkpoint_seq >= 1, what="the first attempt's side effect, checkpointed")
    d.kill()
    for pid in shims_under(str(d.root)):
        os.kill(pid, signal.SIGKILL)
    d.start()
    c = d.client()
    done = wait_done(c, task.id)
    assert done.state == SUCCEEDED, done.reason
    _check_ids(task.id, json.loads(done.result_json)["seen"])


def test_a_retried_submit_with_its_request_id_returns_the_same_task(task_daemon):
    d = task_daemon()
    c = d.client()
    first = c.submit_task(["true"], request_id="req-0001")
    again = c.submit_task(["true"], request_id="req-0001")
    assert again.id == first.id and again.request_id == "req-0001"
    assert [t.id for t in c.list_tasks()] == [first.id]
    assert wait_done(c, first.id).state == SUCCEEDED
    # After the task ran, and after a restart, the same request still names it.
    assert d.stop() == 0
    d.start()
    c = d.client()
    again = c.submit_task(["true"], request_id="req-0001")
    assert again.id == first.id and again.state == SUCCEEDED
    # One submission, one record: the retries made nothing.
    submits = [json.loads(r.detail_json)["task_ids"] for r in c.audit_query(kind="task.submit")]
    assert submits == [[first.id]]

    with pytest.raises(ClientError) as refused:
        c.submit_task(["false"], request_id="req-0001")
    assert refused.value.code.name == "ALREADY_EXISTS"
    assert str(refused.value).endswith(
        f"request_id 'req-0001' already made task {first.id} with a different spec; a new "
        "task needs a new request_id")
    # Request ids are per tenant; no request id is a new task every time.
    other = d.client(tenant="other").submit_task(["true"], request_id="req-0001")
    assert other.id != first.id
    assert c.submit_task(["true"]).id != c.submit_task(["true"]).id

    with pytest.raises(ClientError) as bad:
        c.submit_task(["true"], request_id="has space")
    assert bad.value.code.name == "INVALID_ARGUMENT"
    assert "request_id: must be at most 128 printable ASCII characters" in str(bad.value)


def test_request_ids_on_a_submit_stream(task_daemon):
    from corral.v1 import task_pb2

    d = task_daemon()
    c = d.client()
    spec = task_pb2.TaskSpec(argv=["true"])
    requests = [task_pb2.SubmitTaskRequest(spec=spec, request_id=f"s-{i % 2}")
                for i in range(4)]
    acks = list(c.tasks.SubmitStream(iter(requests), metadata=c.metadata))
    assert [a.error for a in acks] == [""] * 4
    ids = [a.task_id for a in acks]
    assert ids[0] == ids[2] and ids[1] == ids[3] and ids[0] != ids[1]
    for task_id in set(ids):
        assert wait_done(c, task_id).state == SUCCEEDED
    assert sorted(t.id for t in c.list_tasks()) == sorted(set(ids))
