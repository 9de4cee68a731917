"""Sessions delegate deep tasks (agent protocol v1.1), through the real daemon.

The session's agent (agents/delegator.py) is scripted by its inputs and says, as tokens,
every task message the runtime sent it; the tasks run agents/worker_task.py, handed over
from the session's workspace.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.runtime.client import ClientError, SessionStream
from corral.v1 import session_pb2, task_pb2

from .daemon_harness import SessionRecorder
from .test_client_verbs import _corral

AGENTS = Path(__file__).resolve().parent / "agents"
DELEGATOR = ["python3", "/workspace/delegator.py"]


def _session(client, **start) -> tuple[SessionRecorder, str]:
    """A sandbox holding the test agents, and a session of the delegator in it."""
    sb = client.create_sandbox(memory_bytes=256 << 20)
    for name in ("delegator.py", "worker_task.py"):
        client.write_file(sb.id, name, (AGENTS / name).read_bytes())
    req = session_pb2.SessionRequest(start=session_pb2.SessionStart(
        argv=DELEGATOR, sandbox_id=sb.id, **start))
    rec = SessionRecorder(SessionStream(client.sessions, req, client.metadata))
    rec.wait_for(lambda r: r.session_id, what="opened")
    return rec, sb.id


def _task_spec(steps: int, pause: float, **more) -> dict:
    return {"argv": ["python3", "/workspace/worker_task.py", str(steps), str(pause)],
            "files": ["worker_task.py"], "resources": {"cpu": 0.25}, **more}


def _delegate(rec: SessionRecorder, ref: str, spec: dict) -> None:
    rec.stream.send_input(json.dumps({"do": "delegate", "ref": ref, "spec": spec}))


def _told(rec: SessionRecorder) -> list[dict]:
    """The task messages the agent read, in order."""
    return [json.loads(t.removeprefix("task:")) for t in rec.tokens() if t.startswith("task:")]


def _first(rec: SessionRecorder, timeout_s: float = 60.0, **match) -> dict:
    """The first task message the agent read with these fields (waiting for it)."""
    def found(r):
        return [m for m in _told(r) if all(m.get(k) == v for k, v in match.items())]

    rec.wait_for(found, timeout_s, what=f"a task message {match}")
    return found(rec)[0]


def _watched(rec: SessionRecorder) -> list:
    with rec._cond:
        return [ev for kind, ev in rec.events if kind == "task"]


def test_three_delegations_steered_cancelled_and_finished(daemon, client):
    rec, sandbox_id = _session(client)
    _delegate(rec, "steered", _task_spec(600, 0.1))
    _delegate(rec, "cancelled", _task_spec(600, 0.1))
    _delegate(rec, "quick", _task_spec(3, 0.05))
    ids = {ref: _first(rec, event="accepted", ref=ref)["task_id"]
           for ref in ("steered", "cancelled", "quick")}

    quick = _first(rec, event="done", ref="quick")
    assert quick["state"] == "SUCCEEDED"
    assert quick["result"] == {"steps": 3, "inputs": []}
    assert quick["out_dir"] == f"/workspace/.corral/tasks/{ids['quick']}"
    assert client.read_file(sandbox_id, f".corral/tasks/{ids['quick']}/answer.txt") == \
        b"3 steps\n"

    _first(rec, event="update", ref="steered", state="RUNNING")
    rec.stream.send_input(json.dumps({"do": "steer", "ref": "steered", "text": "finish"}))
    steered = _first(rec, event="done", ref="steered")
    assert steered["state"] == "SUCCEEDED"
    assert steered["result"]["inputs"] == ["finish"]
    assert steered["result"]["steps"] < 600

    rec.stream.send_input(json.dumps({"do": "cancel", "ref": "cancelled"}))
    assert _first(rec, event="done", ref="cancelled")["state"] == "CANCELLED"

    # the agent heard of each task in order: accepted, its updates, done once
    for ref in ids:
        events = [m["event"] for m in _told(rec) if m.get("ref") == ref]
        assert events[0] == "accepted" and events[-1] == "done" and events.count("done") == 1
    # watchers got the same news as SessionEvent.task, after the entries before it
    rec.wait_for(lambda r: sum(e.event == "done" for e in _watched(r)) == 3, 10,
                 what="three done events for watchers")
    done = {e.task_id: e for e in _watched(rec) if e.event == "done"}
    assert done[ids["quick"]].out_dir == quick["out_dir"]
    assert json.loads(done[ids["quick"]].result_json) == quick["result"]
    # the parent link: stored, listed, audited
    sid = rec.session_id
    listed = client._call(client.tasks.List, task_pb2.ListTasksRequest(parent_session=sid))
    assert sorted(t.id for t in listed.tasks) == sorted(ids.values())
    assert client.get_task(ids["quick"]).parent_session == sid
    delegated = [r for r in client.audit_query(kind="task.delegate") if r.session_id == sid]
    assert sorted(json.loads(r.detail_json)["task_id"] for r in delegated) == sorted(
        ids.values())
    # the CLI: ls --session, the parent in get, the news inline for a watcher that attaches
    listed = _corral(daemon, "task", "ls", "--session", sid, "--json")
    assert sorted(json.loads(line)["id"] for line in listed.stdout.decode().splitlines()) == \
        sorted(ids.values())
    assert f"parent:     {sid}\n" in _corral(daemon, "task", "get", ids["quick"]).stdout.decode()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "corral.runtime.cli", "session", "--attach", sid, "--watch"],
        env=dict(os.environ, CORRAL_SOCKET=daemon.socket), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while client.get_session(sid).watchers < 2:  # attached (it replays) while it runs
        assert watcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    rec.stream.close_session()
    rec.join()
    replay = watcher.communicate(timeout=60)[1].decode()
    assert f"[task {ids['quick']} SUCCEEDED on " in replay
    assert f"[task {ids['cancelled']} CANCELLED on " in replay


def test_a_malformed_delegate_is_refused_naming_the_field_and_the_session_goes_on(client):
    rec, _ = _session(client)
    rec.stream.send_input(json.dumps({"do": "raw", "ref": "bad",
                                      "arguments": {"argv": "python3 -c 1"}}))
    refused = _first(rec, event="refused", ref="bad")
    assert refused["code"] == "INVALID_ARGUMENT"
    assert refused["field"] == "delegate.argv"
    assert refused["message"] == "delegate.argv: must be a list of strings"
    rec.stream.send_input(json.dumps({"do": "raw", "ref": "bad2",
                                      "arguments": {"argv": ["true"], "priority": 5000}}))
    assert _first(rec, event="refused", ref="bad2")["field"] == "delegate.priority"
    rec.stream.send_input(json.dumps({"do": "echo", "text": "still here"}))
    rec.wait_for(lambda r: "echo:still here" in r.tokens(), 20, what="the echo")
    rec.wait_for(lambda r: any(e.event == "refused" and e.code == "INVALID_ARGUMENT"
                               for e in _watched(r)), 10, what="the refusal for watchers")
    rec.stream.close_session()
    rec.join()


def test_a_tenant_cannot_link_to_another_tenants_session(daemon, client):
    rec, _ = _session(client)
    other = daemon.client(tenant="intruder")
    with pytest.raises(ClientError) as err:
        other._call(other.tasks.Submit, task_pb2.SubmitTaskRequest(
            spec=task_pb2.TaskSpec(argv=["true"]), parent_session=rec.session_id))
    assert err.value.code.name == "NOT_FOUND"
    assert other._call(other.tasks.List, task_pb2.ListTasksRequest(
        parent_session=rec.session_id)).tasks == []
    # its own session links fine, and is listed with it
    linked = client._call(client.tasks.Submit, task_pb2.SubmitTaskRequest(
        spec=task_pb2.TaskSpec(argv=["true"]), parent_session=rec.session_id))
    assert linked.parent_session == rec.session_id
    # taking over another tenant's delegations is refused the same way
    intruder = SessionRecorder(SessionStream(other.sessions, session_pb2.SessionRequest(
        start=session_pb2.SessionStart(argv=["true"], delegations_from=rec.session_id,
                                       spec={"memory_bytes": 64 << 20})), other.metadata))
    intruder.join()
    assert intruder.error is not None and intruder.error.code.name == "NOT_FOUND"
    rec.stream.close_session()
    rec.join()
    # closing (without detach) cancelled the task linked to it
    deadline = time.monotonic() + 20
    while client.get_task(linked.id).state not in (task_pb2.TASK_STATE_CANCELLED,
                                                   task_pb2.TASK_STATE_SUCCEEDED):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_delegation_limit_is_enforced(make_daemon):
    d = make_daemon("limited", config="max_delegations_per_session = 2\n").start()
    client = d.client()
    rec, _ = _session(client)
    for ref in ("a", "b", "c"):
        _delegate(rec, ref, _task_spec(600, 0.1))
    refused = _first(rec, event="refused", ref="c")
    assert refused["code"] == "RESOURCE_EXHAUSTED"
    assert "max_delegations_per_session = 2" in refused["message"]
    assert {_first(rec, event="accepted", ref=r)["ref"] for r in ("a", "b")} == {"a", "b"}
    # a ref names one unfinished delegation
    _delegate(rec, "b", _task_spec(1, 0.01))
    assert _first(rec, event="refused", ref="b")["field"] == "delegate.id"
    # one finished makes room again
    rec.stream.send_input(json.dumps({"do": "cancel", "ref": "a"}))
    _first(rec, event="done", ref="a")
    _delegate(rec, "d", _task_spec(1, 0.01))
    assert _first(rec, event="done", ref="d")["state"] == "SUCCEEDED"
    rec.stream.close_session()
    rec.join()


def test_a_detached_close_leaves_the_task_running_and_its_result_readable(client):
    rec, _ = _session(client)
    _delegate(rec, "bg", _task_spec(15, 0.1))
    task_id = _first(rec, event="accepted", ref="bg")["task_id"]
    rec.stream._requests.put(session_pb2.SessionRequest(
        close=session_pb2.SessionClose(detach=True)))
    rec.join()
    deadline = time.monotonic() + 60
    while client.get_task(task_id).state != task_pb2.TASK_STATE_SUCCEEDED:
        assert client.get_task(task_id).state != task_pb2.TASK_STATE_CANCELLED
        assert time.monotonic() < deadline
        time.sleep(0.2)
    result = client.task_result(task_id)
    assert json.loads(result.result_json) == {"steps": 15, "inputs": []}
    assert [(f.path, f.content) for f in result.files] == [("answer.txt", b"15 steps\n")]
    closed = [r for r in client.audit_query(kind="session.delegations")
              if r.session_id == rec.session_id]
    assert [(d["action"], d["task_ids"]) for d in map(json.loads, (
        r.detail_json for r in closed))] == [("detached", [task_id])]


def test_daemon_sigkill_mid_task_the_result_still_arrives_exactly_once(make_daemon):
    d = make_daemon("restart").start()
    client = d.client()
    rec, _ = _session(client)
    old_session = rec.session_id
    _delegate(rec, "long", _task_spec(40, 0.1))
    task_id = _first(rec, event="accepted", ref="long")["task_id"]
    _first(rec, event="update", ref="long", state="RUNNING")
    d.kill()
    d.start()
    client = d.client()
    assert client.get_task(task_id).parent_session == old_session
    new, _ = _session(client, delegations_from=old_session)
    done = _first(new, event="done", task_id=task_id, timeout_s=90)
    assert done["state"] == "SUCCEEDED" and done["result"]["steps"] == 40
    assert client.get_task(task_id).parent_session == new.session_id
    new.stream.send_input(json.dumps({"do": "echo", "text": "after"}))
    new.wait_for(lambda r: "echo:after" in r.tokens(), 20, what="the echo")
    assert [m["event"] for m in _told(new) if m.get("task_id") == task_id].count("done") == 1
    # delivered is stored: a second take-over finds nothing owed
    new.stream.close_session()
    new.join()
    d.stop()
    with sqlite3.connect(str(d.state / "tasks.db")) as db:
        assert db.execute("SELECT delivered, parent_session FROM tasks WHERE id = ?",
                          (task_id,)).fetchone() == (1, new.session_id)


def _client_session(client, **options) -> tuple[SessionRecorder, str]:
    """As _session, started through Client.open_session (its delegations_from parameter)."""
    sb = client.create_sandbox(memory_bytes=256 << 20)
    for name in ("delegator.py", "worker_task.py"):
        client.write_file(sb.id, name, (AGENTS / name).read_bytes())
    rec = SessionRecorder(client.open_session(DELEGATOR, sandbox_id=sb.id, **options))
    rec.wait_for(lambda r: r.session_id, what="opened")
    return rec, sb.id


def test_the_client_detaches_a_close_and_a_new_session_takes_the_delegations_over(client):
    old, _ = _client_session(client)
    _delegate(old, "bg", _task_spec(20, 0.1))
    task_id = _first(old, event="accepted", ref="bg")["task_id"]
    old.stream.close_session(detach=True)
    old.join()
    assert client.get_task(task_id).state != task_pb2.TASK_STATE_CANCELLED
    new, _ = _client_session(client, delegations_from=old.session_id)
    done = _first(new, event="done", task_id=task_id, timeout_s=90)
    assert done["state"] == "SUCCEEDED" and done["result"]["steps"] == 20
    assert client.get_task(task_id).parent_session == new.session_id
    assert [t.id for t in client.list_tasks(parent_session=new.session_id)] == [task_id]
    assert client.list_tasks(parent_session=old.session_id) == []
    new.stream.close_session()
    new.join()


def test_the_client_links_a_submitted_task_to_a_session(client):
    rec, _ = _client_session(client)
    linked = client.submit_task(["sleep", "600"], resources={"cpu": 0.25},
                                parent_session=rec.session_id, memory_bytes=64 << 20)
    assert linked.parent_session == rec.session_id
    assert [t.id for t in client.list_tasks(parent_session=rec.session_id)] == [linked.id]
    # a session that still runs keeps its delegations: taking them over is refused
    other = SessionRecorder(client.open_session(["true"], delegations_from=rec.session_id,
                                                memory_bytes=64 << 20))
    other.join()
    assert other.error is not None and other.error.code.name == "FAILED_PRECONDITION"
    rec.stream.close_session()  # without detach: the linked task is cancelled
    rec.join()
    deadline = time.monotonic() + 20
    while client.get_task(linked.id).state != task_pb2.TASK_STATE_CANCELLED:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_corral_session_takes_delegations_over_with_a_flag(daemon, client):
    unknown = _corral(daemon, "session", "--delegations-from", "ses-000000000000", "--",
                      "true")
    assert unknown.returncode == 1
    assert unknown.stderr.decode() == (
        "corral: session: NOT_FOUND: delegations_from: session 'ses-000000000000' delegated "
        "no task of this tenant\n")
    rec, _ = _client_session(client)
    running = _corral(daemon, "session", "--delegations-from", rec.session_id, "--", "true")
    assert running.returncode == 1
    assert running.stderr.decode() == (
        f"corral: session: FAILED_PRECONDITION: session {rec.session_id} still runs; its "
        "delegations stay with it\n")
    rec.stream.close_session()
    rec.join()


def _ledger(client, sandbox_id: str, task_id: str) -> list[str]:
    """The events the agents of a sandbox really took for a task (delegator.py's ledger)."""
    try:
        text = bytes(client.read_file(sandbox_id, "task-ledger.jsonl")).decode()
    except ClientError as exc:  # no message taken yet: no ledger yet
        assert exc.code.name == "NOT_FOUND", exc
        return []
    return [m["event"] for m in map(json.loads, text.splitlines()) if m.get("task_id") == task_id]


def test_a_crash_between_task_done_and_its_commit_tells_the_agent_once(make_daemon,
                                                                         monkeypatch):
    """The daemon SIGKILLs itself (DELIVERY_FAULT_ENV) after writing TASK_DONE to the
    agent's pipe, before storing `delivered`. Restarted (live restore keeps the sandbox and
    the session, with its id, so the task's link holds), it tells the restored session
    again; the agent helper drops the repeat by its marker in the workspace, and the
    delivery is stored this time."""
    from corral.runtime.tasks.delegation import DELIVERY_FAULT_ENV

    monkeypatch.setenv(DELIVERY_FAULT_ENV, "after_done_sent")
    d = make_daemon("fault", config="live_restore = true\n").start()
    client = d.client()
    rec, sb = _session(client)
    try:
        _delegate(rec, "quick", _task_spec(2, 0.05))
        task_id = _first(rec, event="accepted", ref="quick")["task_id"]
        assert d.proc.wait(timeout=90) == -9  # the fault point's SIGKILL
        rec.join()
        monkeypatch.delenv(DELIVERY_FAULT_ENV)
        d.start()
        client = d.client()
        deadline = time.monotonic() + 30
        while "done" not in _ledger(client, sb, task_id) and time.monotonic() < deadline:
            time.sleep(0.05)  # the agent read the TASK_DONE written before the kill
        assert _ledger(client, sb, task_id).count("done") == 1
        assert client.read_file(sb, f".corral/told/{task_id}") == b""
        new = SessionRecorder(client.resume_session(rec.session_id, after_seq=rec.last_seq))
        new.wait_for(lambda r: any(e.event == "done" and e.task_id == task_id
                                   for e in _watched(r)), 60, what="the task's end, again")
        new.stream.send_input(json.dumps({"do": "echo", "text": "after"}))
        new.wait_for(lambda r: "echo:after" in r.tokens(), 20, what="the echo")
        assert _ledger(client, sb, task_id).count("done") == 1  # the repeat was dropped
        assert [m["event"] for m in _told(rec) + _told(new)
                if m.get("task_id") == task_id].count("done") == 1
        # a watcher from the start is told of the task's news from before the kill too
        # (the session's notes.jsonl), then its end, each once
        watcher = SessionRecorder(client.resume_session(rec.session_id, watch_only=True))
        watcher.wait_for(lambda r: any(e.event == "done" and e.task_id == task_id
                                       for e in _watched(r)), 30, what="the task's end")
        told = [e.event for e in _watched(watcher) if e.task_id == task_id]
        assert told[0] == "accepted" and told.count("accepted") == 1
        assert told.count("done") == 1 and told[-1] == "done"
        new.stream.close_session()
        new.join()
        watcher.join()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.client().destroy_sandbox(sb)
    assert d.stop() == 0, d.log()
    with sqlite3.connect(str(d.state / "tasks.db")) as db:
        assert db.execute("SELECT delivered FROM tasks WHERE id = ?",
                          (task_id,)).fetchone() == (1,)


def _done_frame(task_id: str) -> bytes:
    from corral.ext import agent as protocol

    return protocol.encode_frame(protocol.TASK_DONE, json.dumps(
        {"task_id": task_id, "ref": "r", "state": "SUCCEEDED"}).encode())


def test_the_agent_helper_takes_a_task_done_once_per_workspace(tmp_path):
    """A repeated TASK_DONE is dropped, by this agent and by a later one of the same
    workspace (told_dir), once one was handed over; one read and never taken is not."""
    from corral.ext import agent as protocol

    told = tmp_path / "told"
    r, w = os.pipe()
    try:
        os.write(w, _done_frame("task-a") + _done_frame("task-a"))
        first = protocol.Agent(events_fd=None, control_fd=r, env={}, told_dir=str(told))
        taken = first.wait(1)
        assert (taken.kind, json.loads(taken.text)["task_id"]) == ("task", "task-a")
        assert first.wait(0.05) is None  # the repeat in the same pipe
        assert os.listdir(told) == ["task-a"]
        os.write(w, _done_frame("task-a") + _done_frame("task-b"))
        later = protocol.Agent(events_fd=None, control_fd=r, env={}, told_dir=str(told))
        assert json.loads(later.wait(1).text)["task_id"] == "task-b"
        assert sorted(os.listdir(told)) == ["task-a", "task-b"]
    finally:
        os.close(w)
        os.close(r)
