"""Sandboxes.Create with backend "docker" over the daemon's real socket: the same API, a
container on the engine at the daemon's DOCKER_HOST."""

from __future__ import annotations

import signal

import pytest

from corral.runtime.client import ClientError
from corral.sandbox import ids
from corral.sandbox.backends import docker

from ..integration.daemon_harness import DaemonProcess, collect_exec

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

MiB = 1 << 20


@pytest.fixture
def daemon(docker_host, tmp_path):
    d = DaemonProcess(tmp_path / "daemon").start()
    try:
        yield d
        assert d.stop() == 0, d.log()
    finally:
        d.ensure_stopped()


def _containers(url: str) -> list[str]:
    api = docker.client(url)
    return [c["Labels"][docker.LABEL]
            for c in api.containers(all=True, filters={"label": docker.LABEL})]


def test_create_exec_files_destroy_on_docker(daemon, docker_host):
    client = daemon.client()
    sb = client.create_sandbox(backend="docker", memory_bytes=64 * MiB)
    try:
        assert sb.spec.backend == "docker"
        assert _containers(docker_host) == [sb.id]
        res = collect_exec(client.exec(sb.id, ["sh", "-c", "id -u; cat; echo err >&2; exit 5"],
                                       stdin=b"piped\n"))
        uid, piped = res.stdout.splitlines()
        assert (piped, res.stderr) == (b"piped", b"err\n")
        pool = ids.pool()  # the container's user: the root of a range of Corral's pool
        assert pool.start <= int(uid) < pool.end and (int(uid) - pool.start) % ids.RANGE == 0
        assert (res.returncode, res.reason) == (5, "exited")
        assert client.write_file(sb.id, "in.txt", b"from the api\n") == 13
        res = collect_exec(client.exec(sb.id, ["sh", "-c", "cat in.txt > out.txt"]))
        assert res.returncode == 0
        assert client.read_file(sb.id, "out.txt") == b"from the api\n"
        timed = collect_exec(client.exec(sb.id, ["sleep", "60"], timeout_s=0.5))
        assert (timed.returncode, timed.reason) == (-signal.SIGKILL, "timeout")
        oom = collect_exec(client.exec(sb.id, ["python3", "-c", "b = b'x' * (256 << 20)"]))
        assert (oom.returncode, oom.reason) == (-signal.SIGKILL, "oom")
    finally:
        client.destroy_sandbox(sb.id)
    assert _containers(docker_host) == []
    created = [r for r in daemon.records() if r.kind == "sandbox.create"]
    assert created[-1].detail["backend"] == "docker"


def test_unknown_backend_is_invalid_argument(daemon):
    client = daemon.client()
    with pytest.raises(ClientError) as info:
        client.create_sandbox(backend="lxc")
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert "backend: 'lxc' is not a backend; use native or docker" in str(info.value)


def test_daemon_stop_removes_its_docker_sandboxes(docker_host, tmp_path):
    d = DaemonProcess(tmp_path / "daemon").start()
    try:
        client = d.client()
        ids = [client.create_sandbox(backend="docker").id for _ in range(2)]
        assert sorted(_containers(docker_host)) == sorted(ids)
        assert d.stop() == 0, d.log()
    finally:
        d.ensure_stopped()
    assert _containers(docker_host) == []


def test_cli_create_on_docker(daemon, docker_host):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "corral.runtime.cli"]
    made = subprocess.run([*cli, "create", "--socket", daemon.socket, "--backend", "docker"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.strip()
    assert _containers(docker_host) == [sandbox_id]
    gone = subprocess.run([*cli, "destroy", "--socket", daemon.socket, sandbox_id],
                          capture_output=True, text=True, timeout=120)
    assert gone.returncode == 0, gone.stderr
    assert _containers(docker_host) == []


def test_sandbox_ttl_removes_the_container(daemon, docker_host):
    from ..processes import wait_until

    client = daemon.client()
    sb = client.create_sandbox(backend="docker", ttl_s=1)
    assert _containers(docker_host) == [sb.id]
    assert wait_until(lambda: _containers(docker_host) == [], timeout_s=30)

    def reasons():  # the record follows the container's removal
        return [r.detail.get("reason") for r in daemon.records("sandbox.destroy")
                if r.sandbox_id == sb.id]

    assert wait_until(lambda: reasons() == ["ttl"], timeout_s=10), reasons()


def test_agent_session_runs_in_a_docker_sandbox(daemon, docker_host):
    """Sessions.Open in a docker sandbox: the protocol's events and control descriptors
    cross the engine (FIFOs), tokens arrive in order, steering reaches the agent."""
    from ..integration.daemon_harness import STREAM_AGENT, SessionRecorder, upload_agents

    client = daemon.client()
    sb = client.create_sandbox(backend="docker")
    try:
        upload_agents(client, sb.id)
        rec = SessionRecorder(client.open_session(
            ["python3", STREAM_AGENT, "--tokens", "500", "--exit", "3"], sandbox_id=sb.id))
        rec.join()
        assert rec.error is None, rec.error
        assert rec.tokens() == [f"t{i}" for i in range(500)]
        assert rec.turn_ends() == [(1, "completed")]
        exited = rec.first("exited")
        assert (exited.returncode, exited.reason) == (3, "exited")
        steer = SessionRecorder(client.open_session(
            ["python3", STREAM_AGENT, "--tokens", "0", "--rate", "200"], sandbox_id=sb.id))
        steer.wait_for(lambda r: len(r.tokens()) >= 5, what="5 tokens")
        steer.stream.send_input("steer-1")
        steer.wait_for(lambda r: "in:steer-1" in r.tokens(), what="the steering echo")
        steer.stream.interrupt()
        steer.wait_for(lambda r: r.turn_ends(), what="the interrupted turn's end")
        assert steer.turn_ends()[0][1] == "interrupted"
        steer.stream.close_session()
        steer.join()
        assert steer.first("exited") is not None
    finally:
        client.destroy_sandbox(sb.id)


def test_a_deep_task_runs_on_docker_and_resumes_from_its_checkpoint(daemon, docker_host):
    import json

    from ..tasks.helpers import SUCCEEDED, answer, deep_task, wait_done

    client = daemon.client()
    t = deep_task(client, "--steps", "30", "--step-seconds", "0.01", "--checkpoint-every", "5",
                  "--crash-at", "17", retries=1, backend="docker", memory_bytes=128 * MiB)
    assert t.spec.sandbox.backend == "docker"
    done = wait_done(client, t.id, timeout_s=120)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 2  # the first attempt crashed at step 17 ...
    result = json.loads(done.result_json)
    # ... and the second started from the checkpoint of step 15, not from zero
    assert result == {"answer": answer(30), "steps": 30, "resumed_from": 15, "attempt": 2}
    res = client.task_result(t.id)
    assert [(f.path, f.content) for f in res.files] == [("answer.txt", f"{answer(30)}\n".encode())]
    assert _containers(docker_host) == []  # each attempt's container went with it
    started = [r for r in daemon.records() if r.kind == "sandbox.create"]
    assert started == []  # task sandboxes are the runner's, not Sandboxes.Create's


def test_a_task_on_docker_runs_in_a_container(daemon, docker_host):
    from ..tasks.helpers import FAILED, SUCCEEDED, wait_done

    client = daemon.client()
    probe = ["sh", "-c", "test -e /.dockerenv"]  # the engine puts this in every container
    on_docker = client.submit_task(probe, backend="docker")
    on_native = client.submit_task(probe)
    assert wait_done(client, on_docker.id, timeout_s=120).state == SUCCEEDED
    assert wait_done(client, on_native.id, timeout_s=120).state == FAILED
