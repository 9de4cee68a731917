"""Deep tasks on Ray nodes and what lives only on the daemon's machine (issues 13, 14).

A Ray node's attempt runs in an actor with a state directory of its own: a task with
secrets, a snapshot or a copy-on-write workspace is refused at submit where its selector
matches a Ray node, and fails (never runs without its state) when a Ray node that matches
appears later. What such an attempt's egress proxy records comes back with its log and is
audited by the daemon, as a local attempt's is.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from corral.runtime.client import ClientError

from .helpers import QUEUED, SUCCEEDED, wait_done, wait_task
from .test_ray import ray_cluster  # noqa: F401 (the module's real Ray cluster)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LOCAL = '[[nodes]]\nname = "here"\nlabels = { pool = "deep" }\nresources = { cpu = 2 }\n'


def _ray_node(name: str, labels: str) -> str:
    return f'[[nodes]]\nname = "{name}"\nexecutor = "ray"\nlabels = {{ {labels} }}\n' \
           f'resources = {{ cpu = 2 }}\n'


def test_a_cow_task_is_refused_on_ray_at_submit_and_waits_for_a_local_node(
        ray_cluster, task_daemon, tmp_path):  # noqa: F811
    cluster, _ = ray_cluster
    project = tmp_path / "project"
    project.mkdir()
    (project / "keep.txt").write_text("host\n")
    head = f'ray_address = "{cluster.address}"\n'
    d = task_daemon(head + LOCAL + _ray_node("ray-c", 'pool = "cpu"'))
    c = d.client()
    with pytest.raises(ClientError) as exc:
        c.submit_task(["true"], selector={"pool": "cpu"}, workspace_dir=str(project),
                      workspace_cow=True)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.sandbox.workspace_dir: " in str(exc.value) and "ray-c" in str(exc.value)
    c.cordon_node("here")  # the task waits: no node takes it yet
    task = c.submit_task(["sh", "-c", "echo ran > /workspace/ran"], selector={"pool": "deep"},
                         retries=2, workspace_dir=str(project), workspace_cow=True)
    assert wait_task(c, task.id, lambda t: t.state == QUEUED, 30).attempt == 0
    d.stop()
    # a free Ray node that the selector matches appears: placement passes it by
    d.config_path.write_text(head + LOCAL + _ray_node("ray-a", 'pool = "deep"'))
    d.start()
    c = d.client()
    c.cordon_node("here")
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        now = c.get_task(task.id)
        assert (now.state, now.attempt) == (QUEUED, 0), (now.state, now.node, now.reason)
        time.sleep(0.2)
    c.cordon_node("here", on=False)
    done = wait_done(c, task.id, 120)
    assert (done.state, done.attempt, done.node) == (SUCCEEDED, 1, "here"), done.reason
    assert sorted(p.name for p in project.iterdir()) == ["keep.txt"]  # its change set waits
    starts = [json.loads(r.detail_json) for r in c.audit_query(kind="task.start")]
    assert [x["node"] for x in starts if x["task_id"] == task.id] == ["here"]


def test_egress_records_of_a_ray_attempt_are_audited(ray_cluster, task_daemon):  # noqa: F811
    cluster, _ = ray_cluster
    d = task_daemon(f'ray_address = "{cluster.address}"\n' + _ray_node("ray-c", 'zone = "c"'))
    c = d.client()
    task = c.submit_task(["sh", "-c", "curl -sS --max-time 10 http://10.9.9.9/ || true"],
                         allow_net=["allowed.test:80"])
    done = wait_done(c, task.id, 120)
    assert (done.state, done.node) == (SUCCEEDED, "ray-c"), done.reason
    mine = [(r.kind, json.loads(r.detail_json)) for r in c.audit_query()
            if r.kind.startswith("net.") and r.peer == "egress"]
    mine = [(kind, detail) for kind, detail in mine if detail.get("task_id") == task.id]
    denied = [detail for kind, detail in mine if kind == "net.connect"]
    assert [(x["decision"], x["address"], x["attempt"]) for x in denied] == [
        ("deny", "10.9.9.9", 1)], denied
    assert "net.summary" in [kind for kind, _ in mine]  # written as the sandbox ended
    records = d.root / "state" / "tasks" / task.id / "attempt-1" / "net.jsonl"
    assert len(records.read_bytes().splitlines()) == len(mine)  # each audited once
