"""Live restore of docker sandboxes, with a private dockerd and a real daemon over its socket:
a SIGKILLed daemon's containers are adopted by the next one (runtime/restore.py,
DockerSandbox.adopt); a command running at the kill is reported lost, new ones run; the
sweep leaves what restore.db keeps and removes what it does not."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from corral.runtime import restore
from corral.runtime.client import ClientError
from corral.sandbox.backends import docker
from corral.sandbox.backends.docker.sweep import runtime_base
from corral.v1 import sandbox_pb2

from ..integration.daemon_harness import DaemonProcess, collect_exec, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LIVE_RESTORE = "live_restore = true\n"


@pytest.fixture
def daemons(docker_host, tmp_path):
    """make(): a daemon with live restore on, all on one state directory (a restart); at
    the end each is stopped, and what a failed test left kept is discarded."""
    made: list[DaemonProcess] = []

    def make() -> DaemonProcess:
        d = DaemonProcess(tmp_path / "d", config=LIVE_RESTORE).start()
        made.append(d)
        return d

    yield make
    for d in made:
        d.ensure_stopped()
    restore.discard(str(tmp_path / "d" / "state"))  # stops the holder it left


def _containers(url: str) -> dict[str, dict]:
    """Corral's containers on the engine: sandbox id -> the engine's summary."""
    api = docker.client(url)
    return {c["Labels"][docker.LABEL]: c
            for c in api.containers(all=True, filters={"label": docker.LABEL})}


def _rows(d: DaemonProcess) -> dict[str, dict]:
    """restore.db's rows as the daemon wrote them: id -> backend_state."""
    db = sqlite3.connect(f"file:{d.state / restore.DB_NAME}?mode=ro", uri=True)
    try:
        return {i: json.loads(b) for i, b in db.execute(
            "SELECT id, backend_state FROM sandboxes")}
    finally:
        db.close()


def _details(d: DaemonProcess, kind: str) -> dict[str, dict]:
    return {r.sandbox_id: json.loads(r.detail_json) for r in d.records(kind)}


def _processes(url: str, container_id: str) -> list[str]:
    """The command lines running in a container (the engine's top)."""
    top = docker.client(url).top(container_id)  # ps -ef: the command line comes last
    return [row[-1] for row in top.get("Processes") or []]


@pytest.mark.timeout(300)
def test_a_docker_sandbox_outlives_a_sigkilled_daemon(daemons, docker_host):
    d = daemons()
    c = d.client()
    sb = c.create_sandbox(backend="docker", labels={"role": "kept"})
    short = c.create_sandbox(backend="docker")
    c.write_file(sb.id, "mark", b"before")
    c.set_timeout(short.id, 6)
    running = next(c.exec(sb.id, ["sh", "-c", "echo started; exec sleep 1000"])).started
    done = collect_exec(c.exec(sb.id, ["echo", "done"]))
    assert _details(d, "sandbox.create")[sb.id]["live_restore"] == "kept"
    before = {s.id: c.get_sandbox(s.id) for s in (sb, short)}
    assert wait_until(lambda: _rows(d).keys() == before.keys())
    container = _containers(docker_host)[sb.id]
    assert _rows(d)[sb.id] == {"url": docker_host, "container_id": container["Id"],
                              "created": docker.client(docker_host).inspect_container(
                                  container["Id"])["Created"]}
    workspace = docker.client(docker_host).inspect_container(
        container["Id"])["Config"]["Labels"][docker.LABEL_WORKSPACE]

    assert d.kill() == -signal.SIGKILL
    assert _containers(docker_host)[sb.id]["State"] == "running"  # the engine kept it
    d2 = daemons()
    c2 = d2.client()
    listed = {s.id: s for s in c2.list_sandboxes()}
    assert listed.keys() == before.keys()
    got = listed[sb.id]
    assert (got.labels, got.expires_at, got.state) == (
        before[sb.id].labels, before[sb.id].expires_at, sandbox_pb2.SANDBOX_STATE_RUNNING)
    assert c2.read_file(sb.id, "mark") == b"before"
    new = collect_exec(c2.exec(sb.id, ["sh", "-c", "cat /workspace/mark; echo after >> mark"]))
    assert (new.stdout, new.returncode) == (b"before", 0)
    assert c2.read_file(sb.id, "mark") == b"beforeafter\n"
    # the command that ran at the kill: its output so far, and lost (killed) at the restart
    lost = collect_exec(c2.attach(sb.id, running.exec_id))
    assert (lost.stdout, lost.returncode, lost.reason) == (
        b"started\n", -signal.SIGKILL, "daemon-shutdown")
    assert not [p for p in _processes(docker_host, container["Id"]) if "sleep 1000" in p]
    finished = collect_exec(c2.attach(sb.id, done.exec_id))  # ended before: as it was
    assert (finished.stdout, finished.returncode, finished.reason) == (b"done\n", 0, "exited")
    restored = _details(d2, "sandbox.restore")
    assert {k: v["restored"] for k, v in restored.items()} == dict.fromkeys(before, True)

    # pause and resume: the engine's freezer, still the same container
    c2.pause(sb.id)
    assert docker.client(docker_host).inspect_container(container["Id"])["State"]["Paused"]
    with pytest.raises(ClientError) as refused:
        next(c2.exec(sb.id, ["true"], wait_if_paused=False))
    assert refused.value.code.name == "FAILED_PRECONDITION"
    c2.resume(sb.id)
    assert collect_exec(c2.exec(sb.id, ["echo", "thawed"])).stdout == b"thawed\n"
    # the TTL set before the kill runs out after the restart, and its container goes
    assert wait_until(lambda: short.id in _details(d2, "sandbox.destroy"), timeout_s=30)
    assert _details(d2, "sandbox.destroy")[short.id]["reason"] == "ttl"
    assert short.id not in _containers(docker_host)

    c2.destroy_sandbox(sb.id)
    assert _containers(docker_host) == {}
    assert not os.path.exists(workspace)
    assert not {sb.id, short.id} & set(os.listdir(runtime_base()))  # journals and mark
    assert d2.stop() == 0, d2.log()
    assert _rows(d2) == {}


#: A process that starts a docker sandbox of its own, says its id, and waits to be killed:
#: its container is one no restore.db keeps.
STRAY = textwrap.dedent("""
    import sys
    from corral.sandbox import SandboxSpec
    from corral.sandbox.backends.docker import DockerSandbox
    sb = DockerSandbox(SandboxSpec(backend="docker"))
    sb.start()
    print(sb.id, sb.workspace, flush=True)
    sys.stdin.read()
""")


def _stray_container() -> tuple[str, str]:
    """A docker sandbox whose creator was SIGKILLed: (its id, its workspace)."""
    stray = subprocess.Popen([sys.executable, "-c", STRAY], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    stray_id, stray_workspace = stray.stdout.readline().split()
    stray.kill()
    stray.wait()
    stray.stdin.close()
    stray.stdout.close()
    return stray_id, stray_workspace


def _reaped(client) -> dict[str, dict]:
    """The daemon's sandbox.reaped records of docker sandboxes: sandbox id -> what each
    says of the sweep (reason, backend, engine)."""
    found = {}
    for record in client.audit_query(kind="sandbox.reaped"):
        detail = json.loads(record.detail_json)
        if detail.get("backend") == "docker":
            found[record.sandbox_id] = {k: detail[k] for k in ("reason", "backend", "engine")
                                        if k in detail}
    return found


@pytest.mark.timeout(300)
def test_the_sweep_keeps_what_the_store_keeps_and_removes_the_rest(daemons, docker_host):
    d = daemons()
    c = d.client()
    kept = c.create_sandbox(backend="docker")
    c.pause(kept.id)  # frozen across the restart
    assert wait_until(lambda: kept.id in _rows(d))
    labels = docker.client(docker_host).inspect_container(
        _containers(docker_host)[kept.id]["Id"])["Config"]["Labels"]
    stray_id, stray_workspace = _stray_container()
    assert d.kill() == -signal.SIGKILL
    assert _containers(docker_host).keys() == {kept.id, stray_id}

    d2 = daemons()  # its recovery sweeps the engine it adopted from
    assert _containers(docker_host).keys() == {kept.id}
    assert not os.path.exists(stray_workspace)
    c2 = d2.client()
    # what the sweep removed is in the chain, as the native sweep's is
    assert _reaped(c2) == {stray_id: {"reason": "its daemon died", "backend": "docker",
                                      "engine": docker_host}}
    assert [(s.id, s.state) for s in c2.list_sandboxes()] == [
        (kept.id, sandbox_pb2.SANDBOX_STATE_PAUSED)]
    assert _containers(docker_host)[kept.id]["State"] == "paused"
    c2.resume(kept.id)
    # its first docker create sweeps again (as every process's first start does): the
    # container restore.db keeps stays, though its creator label names a dead daemon
    other = c2.create_sandbox(backend="docker")
    assert _containers(docker_host).keys() == {kept.id, other.id}
    assert docker.sweep(docker_host) == []  # another process's sweep keeps it too
    assert collect_exec(c2.exec(kept.id, ["echo", "here"])).stdout == b"here\n"
    for s in (kept, other):
        c2.destroy_sandbox(s.id)
    assert _containers(docker_host) == {}
    for label in (docker.LABEL_WORKSPACE, docker.LABEL_FDS, docker.LABEL_RUNTIME):
        assert not os.path.exists(labels[label]), label
    assert d2.stop() == 0, d2.log()


@pytest.mark.timeout(300)
def test_a_clean_stop_keeps_the_container_and_live_restore_off_removes_it(
        daemons, docker_host, tmp_path):
    d = daemons()
    sb = d.client().create_sandbox(backend="docker")
    assert wait_until(lambda: sb.id in _rows(d))
    assert d.stop() == 0, d.log()
    assert _containers(docker_host)[sb.id]["State"] == "running"

    d2 = daemons()
    assert [s.id for s in d2.client().list_sandboxes()] == [sb.id]
    assert d2.stop() == 0, d2.log()
    assert sb.id in _containers(docker_host)  # kept again

    off = DaemonProcess(tmp_path / "d").start()  # the same state, live restore off
    try:
        assert _containers(docker_host) == {}  # no store keeps it now: swept at the start
        assert off.client().list_sandboxes() == []
        assert _reaped(off.client()) == {sb.id: {"reason": "its daemon died",
                                                 "backend": "docker", "engine": docker_host}}
        assert not os.path.exists(off.state / restore.DB_NAME)
    finally:
        assert off.stop() == 0, off.log()


@pytest.mark.timeout(300)
def test_the_first_docker_start_records_what_its_sweep_removes(docker_host, tmp_path):
    """Live restore off: a container whose creator died is removed by the daemon's first
    docker start on that engine, and the chain says so (sandbox.reaped)."""
    d = DaemonProcess(tmp_path / "d").start()
    try:
        stray_id, stray_workspace = _stray_container()
        c = d.client()
        assert _reaped(c) == {}
        made = c.create_sandbox(backend="docker")
        assert _containers(docker_host).keys() == {made.id}
        assert not os.path.exists(stray_workspace)
        assert wait_until(lambda: stray_id in _reaped(c))
        assert _reaped(c) == {stray_id: {"reason": "its daemon died", "backend": "docker",
                                         "engine": docker_host}}
        c.destroy_sandbox(made.id)
    finally:
        assert d.stop() == 0, d.log()
