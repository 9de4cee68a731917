"""A session's delegated task placed on the Ray executor behaves as a local one: accepted,
updates, steered through its parent (INPUT reaches the agent via the node's actor), done
with its result files in the session's workspace."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_delegation import _delegate, _first, _session, _task_spec, _told

from .test_ray import _config, ray_cluster  # noqa: F401 - the module's Ray cluster fixture

pytest.importorskip("ray", reason="the Ray executor needs the corral[ray] extra")


def test_a_delegated_task_on_ray_is_steered_and_its_result_delivered(
        ray_cluster, task_daemon):  # noqa: F811 - the fixture imported above
    cluster, _ = ray_cluster
    client = task_daemon(_config(cluster.address)).client()
    rec, sandbox_id = _session(client)
    _delegate(rec, "remote", _task_spec(600, 0.1, selector={"pool": "deep"},
                                        resources={"cpu": 1}))
    task_id = _first(rec, event="accepted", ref="remote")["task_id"]
    running = _first(rec, event="update", ref="remote", state="RUNNING", timeout_s=120)
    assert running["node"] in ("ray-a", "ray-b")
    rec.stream.send_input(json.dumps({"do": "steer", "ref": "remote", "text": "finish"}))
    done = _first(rec, event="done", ref="remote", timeout_s=120)
    assert done["state"] == "SUCCEEDED" and done["result"]["inputs"] == ["finish"]
    steps = done["result"]["steps"]
    assert client.read_file(sandbox_id, f".corral/tasks/{task_id}/answer.txt") == \
        f"{steps} steps\n".encode()
    assert [m["event"] for m in _told(rec) if m.get("ref") == "remote"].count("done") == 1
    rec.stream.close_session()
    rec.join()
