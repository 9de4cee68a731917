"""Deep tasks on a real daemon with real sandboxes: placement, devices, priorities, fair
share, cancel, max runtime, bad submissions, checkpoints, results, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from corral.runtime.client import ClientError

from .helpers import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    answer,
    deep_task,
    progress,
    wait_done,
    wait_task,
)

DEVICE = "/tmp/ctask-accel0"

NODES = f"""
[[nodes]]
name = "cpu-a"
labels = {{ pool = "cpu" }}
resources = {{ cpu = 2 }}

[[nodes]]
name = "gpu-a"
labels = {{ pool = "deep", accelerator = "h200" }}
resources = {{ cpu = 4, "accelerator.h200" = 1 }}
devices = {{ "accelerator.h200" = ["{DEVICE}"] }}
"""

#: A task that runs until the test creates /workspace/go (see open_gate).
GATED = ["sh", "-c", "while [ ! -e /workspace/go ]; do sleep 0.02; done"]


def open_gate(daemon, task_id: str, attempt: int = 1) -> None:
    ws = daemon.root / "state" / "tasks" / task_id / f"attempt-{attempt}" / "workspace"
    (ws / "go").write_text("")


ONE_SLOT = """
[[nodes]]
name = "solo"
labels = { pool = "solo" }
resources = { cpu = 1 }
"""


@pytest.fixture
def accel_device():
    """A character device made for the test (same driver as /dev/null) as "the accelerator"."""
    if os.path.exists(DEVICE):
        os.unlink(DEVICE)
    os.mknod(DEVICE, 0o20666, os.makedev(1, 3))
    os.chmod(DEVICE, 0o666)
    yield DEVICE
    os.unlink(DEVICE)


def test_selector_resources_and_devices(task_daemon, accel_device):
    d = task_daemon(NODES)
    c = d.client()
    probe = ["sh", "-c", "test -c /dev/ctask-accel0 && echo x > /dev/ctask-accel0 "
                         "&& echo granted || echo absent; exit 0"]
    on_gpu = c.submit_task(probe, selector={"pool": "deep"}, resources={"accelerator.h200": 1})
    plain = c.submit_task(probe, selector={"pool": "deep"})
    on_cpu = c.submit_task(probe, selector={"pool": "cpu"}, resources={"cpu": 2})
    for t in (on_gpu, plain, on_cpu):
        assert wait_done(c, t.id).state == SUCCEEDED
    got = {t.id: c.get_task(t.id) for t in (on_gpu, plain, on_cpu)}
    assert got[on_gpu.id].node == "gpu-a" and got[plain.id].node == "gpu-a"
    assert got[on_cpu.id].node == "cpu-a"
    assert list(got[on_gpu.id].devices) == [DEVICE]
    assert list(got[plain.id].devices) == []
    log = d.root / "state" / "tasks"
    assert (log / on_gpu.id / "attempt-1" / "log").read_text() == "granted\n"
    assert (log / plain.id / "attempt-1" / "log").read_text() == "absent\n"
    # Placement decisions are audited with the node and what was granted.
    placed = {json.loads(r.detail_json)["task_id"]: json.loads(r.detail_json)
              for r in c.audit_query(kind="task.placed")}
    assert placed[on_gpu.id]["node"] == "gpu-a"
    assert placed[on_gpu.id]["devices"] == [DEVICE]


def test_resources_make_a_second_task_wait(task_daemon, accel_device):
    d = task_daemon(NODES)
    c = d.client()
    first = c.submit_task(GATED, resources={"accelerator.h200": 1})
    second = c.submit_task(["true"], resources={"accelerator.h200": 1})
    wait_task(c, first.id, lambda t: t.state == RUNNING, what="running")
    assert c.get_task(second.id).state == QUEUED
    open_gate(d, first.id)
    a, b = wait_done(c, first.id), wait_done(c, second.id)
    assert a.state == b.state == SUCCEEDED
    assert b.started_at >= a.finished_at


def test_bad_submissions_name_the_field(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    cases = [
        (dict(resources={"gpu": 1}), grpc.StatusCode.INVALID_ARGUMENT, "spec.resources[gpu]"),
        (dict(selector={"Bad Key!": "x"}), grpc.StatusCode.INVALID_ARGUMENT, "spec.selector"),
        (dict(selector={"pool": ""}), grpc.StatusCode.INVALID_ARGUMENT, "spec.selector"),
        (dict(priority=-1), grpc.StatusCode.INVALID_ARGUMENT, "spec.priority"),
        (dict(resources={"cpu": -1}), grpc.StatusCode.INVALID_ARGUMENT, "spec.resources[cpu]"),
        (dict(selector={"pool": "gpu"}), grpc.StatusCode.FAILED_PRECONDITION, "spec.selector"),
        (dict(resources={"cpu": 2}), grpc.StatusCode.FAILED_PRECONDITION, "spec.resources"),
    ]
    for kw, code, field in cases:
        with pytest.raises(ClientError) as info:
            c.submit_task(["true"], **kw)
        assert info.value.code == code, kw
        assert f": {field}: " in str(info.value) or str(info.value).split(": ", 1)[1].startswith(
            field + ": "), str(info.value)
    assert c.list_tasks() == []


def test_priority_first_then_fair_share(task_daemon):
    d = task_daemon(ONE_SLOT)
    c = d.client()  # tenant "local"
    blocker = c.submit_task(GATED, resources={"cpu": 1})
    wait_task(c, blocker.id, lambda t: t.state == RUNNING, what="running")
    alice_low = [c.submit_task(["true"], resources={"cpu": 1}) for _ in range(5)]
    bob_client = _tenant_client(c, "bob")
    bob_one = bob_client.submit_task(["true"], resources={"cpu": 1})
    alice_high = c.submit_task(["true"], resources={"cpu": 1}, priority=5)
    everything = [blocker, *alice_low, bob_one, alice_high]
    assert [c.get_task(t.id).state for t in everything[1:]] == [QUEUED] * 7
    open_gate(d, blocker.id)
    for t in everything:
        assert wait_done(c, t.id, timeout_s=120).state == SUCCEEDED
    order = sorted((c.get_task(t.id) for t in everything), key=lambda t: t.started_at)
    ids = [t.id for t in order]
    # The blocker ran first; then priority 5; then bob (fair share) before alice's queue.
    assert ids[:3] == [blocker.id, alice_high.id, bob_one.id], ids
    assert ids[3:] == [t.id for t in alice_low]


def _tenant_client(client, tenant: str):
    from corral.runtime.client import Client

    return Client(client.channel, (("x-corral-tenant", tenant),))


def test_cancel_kills_the_whole_tree(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    t = c.submit_task(["sh", "-c", "sleep 987654 & (sleep 987654 &) ; sleep 987654; wait"])
    wait_task(c, t.id, lambda t: t.state == RUNNING, what="running")
    wait_task(c, t.id, lambda _: len(_sleepers()) == 3, what="3 sleepers")
    c.cancel_task(t.id)
    done = wait_done(c, t.id)
    assert done.state == CANCELLED
    assert _sleepers() == []
    assert [r.kind for r in c.audit_query(kind="task.cancel")]


def _sleepers() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() == b"sleep\x00987654\x00":
                        with open(f"/proc/{pid}/stat") as s:
                            if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                                out.append(int(pid))
            except OSError:
                pass
    return out


def test_cancel_of_a_queued_task(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    blocker = c.submit_task(["sleep", "30"], resources={"cpu": 1})
    queued = c.submit_task(["true"], resources={"cpu": 1})
    assert c.cancel_task(queued.id).state == CANCELLED
    c.cancel_task(blocker.id)
    assert wait_done(c, blocker.id).state == CANCELLED


def test_max_runtime_is_enforced(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    t = c.submit_task(["sleep", "600"], max_runtime_s=1.0, retries=3)
    done = wait_done(c, t.id, timeout_s=30)
    assert done.state == FAILED
    assert done.reason == "max runtime of 1s reached"
    assert done.attempt == 1  # a timeout is not retried


def test_crash_then_retry_resumes_from_checkpoint(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    t = deep_task(c, "--steps", "30", "--step-seconds", "0.01", "--checkpoint-every", "5",
                  "--crash-at", "17", retries=1)
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 2
    result = json.loads(done.result_json)
    assert result == {"answer": answer(30), "steps": 30, "resumed_from": 15, "attempt": 2}
    res = c.task_result(t.id)
    assert [(f.path, f.content) for f in res.files] == [("answer.txt", f"{answer(30)}\n".encode())]


def test_failure_without_retries_fails(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    t = c.submit_task(["sh", "-c", "exit 7"])
    done = wait_done(c, t.id)
    assert (done.state, done.exit_code, done.reason) == (FAILED, 7, "exited 7")
    with pytest.raises(ClientError) as info:
        c.task_result(c.submit_task(["sleep", "30"]).id)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_finished_task_reports_its_exit_as_execs_do(task_daemon):
    """Task.exit_reason, signal and exit_status say how the last command ended, in the
    same words ExecExited uses: an exit, a signal, the max runtime, a cancel."""
    from corral.v1 import stream_pb2

    c = task_daemon(ONE_SLOT).client()
    running = c.submit_task(["sleep", "30"])
    assert c.get_task(running.id).exit_reason == stream_pb2.EXIT_REASON_UNSPECIFIED
    wait_task(c, running.id, lambda t: t.state == RUNNING, what="running")
    c.cancel_task(running.id)
    cancelled = wait_done(c, running.id)
    assert (cancelled.state, cancelled.exit_reason) == (CANCELLED,
                                                        stream_pb2.EXIT_REASON_CANCELLED)
    cases = [(["sh", "-c", "exit 7"], 0, (FAILED, stream_pb2.EXIT_REASON_EXITED, 0, 7)),
             (["sh", "-c", "kill -TERM $$"], 0,
              (FAILED, stream_pb2.EXIT_REASON_SIGNALED, 15, 143)),
             (["sleep", "30"], 1, (FAILED, stream_pb2.EXIT_REASON_TIMEOUT, 9, 137)),
             (["true"], 0, (SUCCEEDED, stream_pb2.EXIT_REASON_EXITED, 0, 0))]
    for argv, max_runtime_s, want in cases:
        done = wait_done(c, c.submit_task(argv, max_runtime_s=max_runtime_s).id)
        assert (done.state, done.exit_reason, done.signal, done.exit_status) == want, (
            argv, done.reason)


def test_cli_verbs(task_daemon, tmp_path):
    d = task_daemon(ONE_SLOT)
    agent = tmp_path / "deep_task.py"
    from .helpers import DEEP_TASK

    agent.write_bytes(DEEP_TASK)

    def corral(*args):
        return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args,
                               "--socket", d.socket] if args[0] == "nodes" else
                              [sys.executable, "-m", "corral.runtime.cli", *args[:2],
                               "--socket", d.socket, *args[2:]],
                              capture_output=True, text=True, timeout=120)

    sub = corral("task", "submit", "--selector", "pool=solo", "--resources", "cpu=1",
                 "--priority", "3", "--retries", "1", "--max-runtime", "2m",
                 "--put", f"{agent}:deep_task.py", "--",
                 "python3", "/workspace/deep_task.py", "--steps", "10", "--step-seconds", "0.01")
    assert sub.returncode == 0, sub.stderr
    task_id = sub.stdout.strip()
    assert task_id.startswith("task-")
    watch = corral("task", "watch", task_id)
    assert watch.returncode == 0, watch.stderr
    assert "100.0% 10/10" in watch.stderr
    assert "attempt 1: starting at step 0 of 10" in watch.stdout  # the LOG frame, streamed
    assert f"{task_id}: SUCCEEDED" in watch.stderr
    got = corral("task", "get", task_id, "--json")
    info = json.loads(got.stdout)
    assert info["state"] == "SUCCEEDED" and info["spec"]["priority"] == 3
    assert info["spec"]["selector"] == {"pool": "solo"}
    assert info["spec"]["max_runtime_s"] == 120
    res = corral("task", "result", task_id, "--out", str(tmp_path / "out"))
    assert json.loads(res.stdout)["answer"] == answer(10)
    assert (tmp_path / "out" / "answer.txt").read_text() == f"{answer(10)}\n"
    ls = corral("task", "ls")
    assert task_id in ls.stdout and "SUCCEEDED" in ls.stdout
    bad = corral("task", "submit", "--priority", "-4", "--", "true")
    assert bad.returncode == 2 and "spec.priority" in bad.stderr
    nodes = corral("nodes")
    assert nodes.returncode == 0 and "solo" in nodes.stdout and "pool=solo" in nodes.stdout
    assert corral("nodes", "cordon", "solo").returncode == 0
    queued = corral("task", "submit", "--", "true").stdout.strip()
    assert "cordoned" in corral("nodes").stdout
    c = d.client()
    assert c.get_task(queued).state == QUEUED
    assert corral("nodes", "uncordon", "solo").returncode == 0
    assert wait_done(c, queued).state == SUCCEEDED
    assert progress(c.get_task(task_id))["done"] == 10


def test_submit_stream_acks_each_task_after_its_commit(task_daemon):
    from corral.v1 import task_pb2

    d = task_daemon(ONE_SLOT)
    c = d.client()
    c.cordon_node("solo")  # nothing runs: only admission is under test
    specs = [task_pb2.TaskSpec(argv=["true"], priority=i) for i in range(50)]
    specs[20] = task_pb2.TaskSpec(argv=["true"], priority=-3)
    acks = list(c.submit_tasks(specs))
    assert [a.index for a in acks] == list(range(50))
    bad = acks[20]
    assert (bad.task_id, bad.error_code) == ("", "INVALID_ARGUMENT")
    assert bad.error.startswith("spec.priority: ")
    ids = [a.task_id for a in acks if a.task_id]
    assert len(ids) == 49
    assert {t.id for t in c.list_tasks()} == set(ids)
    # Acknowledged = committed: a SIGKILLed daemon still has every one of them, queued.
    d.kill()
    d.start()
    c = d.client()
    assert {t.id: t.state for t in c.list_tasks()} == {i: QUEUED for i in ids}
    assert [n.cordoned for n in c.list_nodes()] == [True]


def test_tenants_see_only_their_own_tasks_and_only_operators_manage_nodes(task_daemon):
    c = task_daemon(ONE_SLOT).client()  # "local" is an operator
    bob = _tenant_client(c, "bob")
    mine = bob.submit_task(["true"])
    other = _tenant_client(c, "carol")
    # another tenant's task is answered as an unknown one: NOT_FOUND, the same message
    for call in (lambda t: other.get_task(t), lambda t: other.cancel_task(t)):
        with pytest.raises(ClientError) as info:
            call(mine.id)
        with pytest.raises(ClientError) as unknown:
            call("task-0000000000000000")
        assert info.value.code == unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert str(info.value) == str(unknown.value).replace("task-0000000000000000", mine.id)
    assert [t.id for t in other.list_tasks()] == []
    assert [t.id for t in bob.list_tasks()] == [mine.id]
    assert c.get_task(mine.id).tenant == "bob"  # operators see every tenant's
    with pytest.raises(ClientError) as info:
        bob.cordon_node("solo")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert [n.name for n in bob.list_nodes()] == ["solo"]
    submits = [json.loads(r.detail_json) for r in c.audit_query(kind="task.submit")
               if r.tenant == "bob"]
    assert [s["task_ids"] for s in submits] == [[mine.id]]
    assert wait_done(c, mine.id).state == SUCCEEDED


def test_cancel_right_after_submit_always_ends_cancelled(task_daemon):
    from .helpers import shims_under

    d = task_daemon(ONE_SLOT)
    c = d.client()
    ids = []
    for _ in range(6):  # whichever state the cancel meets: queued, placed or running
        t = c.submit_task(["sleep", "600"], resources={"cpu": 1})
        c.cancel_task(t.id)
        ids.append(t.id)
    for task_id in ids:
        assert wait_done(c, task_id).state == CANCELLED
    assert [n.free["cpu"] for n in c.list_nodes()] == [1.0]
    from .helpers import wait_until_true

    assert wait_until_true(lambda: shims_under(str(d.root)) == [])
