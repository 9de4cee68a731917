"""The Ray executor on a real local Ray cluster (ray.cluster_utils.Cluster on 127.0.0.1).

Three Ray nodes with different labels, each hosting one long-lived Corral actor: tasks land
only on matching nodes, and killing the node that runs a task makes it resume from its last
checkpoint on another matching node.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .helpers import RUNNING, SUCCEEDED, answer, deep_task, progress, wait_done, wait_task

ray = pytest.importorskip("ray", reason="the Ray executor needs the corral[ray] extra")

from corral.runtime.tasks.ray_executor import NODE_LABEL, ray_environment  # noqa: E402

LABELS = {
    "ray-a": {"pool": "deep", "zone": "a"},
    "ray-b": {"pool": "deep", "zone": "b"},
    "ray-c": {"pool": "cpu", "zone": "c"},
}
SMALL = dict(num_cpus=1, object_store_memory=80 << 20, node_ip_address="127.0.0.1")


def start_cluster():
    """_start_cluster, started over once when a raylet does not register in time: four
    raylets start on 2 shared cores and Ray waits 30 s (fixed) for each (seen in
    back-to-back CI runs: a raylet that never registered and left no log of its own)."""
    try:
        return _start_cluster()
    except Exception:
        return _start_cluster()


def _start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        SMALL, num_cpus=0, include_dashboard=False, labels={NODE_LABEL: "head"}))
    try:
        nodes = {name: cluster.add_node(**SMALL, labels={NODE_LABEL: name, **labels})
                 for name, labels in LABELS.items()}
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, nodes


@pytest.fixture(scope="module")
def ray_cluster():
    ray_environment()
    cluster, nodes = start_cluster()
    session_dir = cluster.head_node.get_session_dir_path()
    try:
        yield cluster, nodes
    finally:
        cluster.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)  # Ray's logs and the actors' dirs


def _config(address: str) -> str:
    out = [f'ray_address = "{address}"']
    for name, labels in LABELS.items():
        lab = ", ".join(f'{k} = "{v}"' for k, v in labels.items())
        out.append(f'[[nodes]]\nname = "{name}"\nexecutor = "ray"\nlabels = {{ {lab} }}\n'
                   f'resources = {{ cpu = 2 }}\n')
    return "\n".join(out)


def _ray_node_of(client, task_id: str, attempt: int) -> str:
    for rec in client.audit_query(kind="task.start"):
        d = json.loads(rec.detail_json)
        if d["task_id"] == task_id and d["attempt"] == attempt:
            return d["runner"]["ray_node_id"]
    raise AssertionError(f"no task.start for {task_id} attempt {attempt}")


def test_tasks_land_only_on_matching_ray_nodes(ray_cluster, task_daemon):
    cluster, nodes = ray_cluster
    d = task_daemon(_config(cluster.address))
    c = d.client()
    assert {n.name: n.executor for n in c.list_nodes()} == {k: "ray" for k in LABELS}
    deep = [c.submit_task(["sh", "-c", "echo on-$(hostname)"], selector={"pool": "deep"},
                          resources={"cpu": 1}) for _ in range(3)]
    zone_c = c.submit_task(["true"], selector={"zone": "c"})
    for t in [*deep, zone_c]:
        done = wait_done(c, t.id, timeout_s=120)
        assert done.state == SUCCEEDED, done.reason
    ids = {name: n.node_id for name, n in nodes.items()}
    for t in deep:
        got = c.get_task(t.id)
        assert got.node in ("ray-a", "ray-b")
        assert _ray_node_of(c, t.id, 1) == ids[got.node]
    assert c.get_task(zone_c.id).node == "ray-c"
    assert _ray_node_of(c, zone_c.id, 1) == ids["ray-c"]
    log = (d.root / "state" / "tasks" / deep[0].id / "attempt-1" / "log").read_text()
    assert log == "on-corral\n"  # the sandbox's log came back through the actor


def test_a_lost_node_resumes_the_task_from_its_checkpoint_elsewhere(ray_cluster, task_daemon):
    cluster, nodes = ray_cluster
    d = task_daemon(_config(cluster.address))
    c = d.client()
    t = deep_task(c, "--steps", "60", "--step-seconds", "0.05", "--checkpoint-every", "5",
                  selector={"pool": "deep"}, retries=2)
    running = wait_task(c, t.id, lambda t: t.state == RUNNING and t.checkpoint_seq >= 5
                        and progress(t).get("done", 0) >= 12, timeout_s=120,
                        what="step 12, 5 checkpoints")  # a save makes at most 2: 3 saves
    first = running.node
    cluster.remove_node(nodes.pop(first))
    done = wait_done(c, t.id, timeout_s=180)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 2
    assert done.node in ("ray-a", "ray-b") and done.node != first
    result = json.loads(done.result_json)
    assert result["answer"] == answer(60) and result["attempt"] == 2
    assert result["resumed_from"] >= 10  # from its checkpoint, not from zero
    lost = {n.name: n.lost for n in c.list_nodes()}
    assert lost[first] is True and lost[done.node] is False
    assert any(json.loads(r.detail_json)["node"] == first for r in c.audit_query(kind="node.lost"))
    res = c.task_result(t.id)
    assert [(f.path, f.content) for f in res.files] == [("answer.txt", f"{answer(60)}\n".encode())]
    assert os.path.exists(d.root / "state" / "tasks" / t.id / "checkpoints" / "LATEST")
    # The Ray node comes back under the same label: a new actor, and work lands there again.
    nodes[first] = cluster.add_node(**SMALL, labels={NODE_LABEL: first, **LABELS[first]})
    cluster.wait_for_nodes()
    zone = LABELS[first]["zone"]
    again = c.submit_task(["true"], selector={"zone": zone})
    done = wait_done(c, again.id, timeout_s=120)
    assert (done.state, done.node) == (SUCCEEDED, first)
    assert _ray_node_of(c, again.id, 1) == nodes[first].node_id
    assert any(json.loads(r.detail_json)["node"] == first for r in c.audit_query(kind="node.back"))


def test_a_restarted_daemon_reattaches_to_attempts_on_ray(ray_cluster, task_daemon):
    cluster, nodes = ray_cluster
    d = task_daemon(_config(cluster.address))
    c = d.client()
    t = deep_task(c, "--steps", "50", "--step-seconds", "0.05", "--checkpoint-every", "5",
                  selector={"zone": "c"}, retries=1)
    before = wait_task(c, t.id, lambda t: t.state == RUNNING and progress(t).get("done", 0) >= 8,
                       timeout_s=120, what="step 8")
    d.kill()  # the driver dies; the detached actor and its sandbox go on
    d.start()
    c = d.client()
    done = wait_done(c, t.id, timeout_s=120)
    assert done.state == SUCCEEDED, done.reason
    assert (done.node, done.attempt) == ("ray-c", 1)
    result = json.loads(done.result_json)
    assert result == {"answer": answer(50), "steps": 50, "resumed_from": 0, "attempt": 1}
    assert progress(before)["done"] < 50
    assert any(json.loads(r.detail_json)["task_id"] == t.id
               for r in c.audit_query(kind="task.reattached"))
