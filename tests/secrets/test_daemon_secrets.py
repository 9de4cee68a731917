"""Secrets through the daemon: values come from its per-tenant store, never from a client, and
never show in anything the daemon keeps or answers (state directory, log, Get, Inspect,
errors)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from corral.runtime.client import ClientError

from ..integration.daemon_harness import DaemonProcess, collect_exec
from .conftest import SECRET_VALUE, cli_env

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

CURL = ('curl -sS --max-time 20 -H "Authorization: Bearer $API_TOKEN" '
        '"https://api.test/v1?key=$API_TOKEN"')


@pytest.fixture
def secret_daemon(servers, tmp_path, monkeypatch):
    for key, value in cli_env(servers).items():  # the daemon's proxy knows the test servers
        monkeypatch.setenv(key, value)
    store = tmp_path / "secrets" / "local"
    store.mkdir(parents=True)
    (store / "API_TOKEN").write_text(SECRET_VALUE + "\n")
    os.chmod(store / "API_TOKEN", 0o600)
    d = DaemonProcess(tmp_path / "d", config=f'[secrets]\ndir = "{tmp_path / "secrets"}"\n')
    d.start()
    yield d
    d.ensure_stopped()


def _everything_under(path: Path) -> bytes:
    found = []
    for item in path.rglob("*"):
        if item.is_file() and not item.is_symlink():
            try:
                found.append(item.read_bytes())
            except OSError:
                pass
    return b"\n".join(found)


def test_the_store_gives_the_value_and_nothing_the_daemon_keeps_holds_it(secret_daemon,
                                                                        servers):
    c = secret_daemon.client()
    sb = c.create_sandbox(secrets=[{"name": "API_TOKEN", "hosts": ["api.test"]}])
    assert [(s.name, list(s.hosts)) for s in sb.spec.secrets] == [("API_TOKEN", ["api.test"])]
    assert "api.test:443" in sb.spec.allow_net  # a secret implies its host
    before = len(servers.received)
    result = collect_exec(c.exec(sb.id, ["sh", "-c", CURL]))
    assert result.returncode == 0, result.stderr
    arrived = b"".join(data for _, data in servers.received[before:])
    assert f"Bearer {SECRET_VALUE}".encode() in arrived
    assert f"key={SECRET_VALUE}".encode() in arrived
    assert SECRET_VALUE.encode() not in result.stdout  # echoed back, scrubbed
    assert b"corral_secret_" in result.stdout
    env = collect_exec(c.exec(sb.id, ["sh", "-c", "echo $API_TOKEN"])).stdout
    assert env.startswith(b"corral_secret_") and SECRET_VALUE.encode() not in env
    report = c.inspect_sandbox(sb.id)
    shown = (report.report_json + str(c.get_sandbox(sb.id)) + str(c.list_sandboxes())).encode()
    assert SECRET_VALUE.encode() not in shown
    c.destroy_sandbox(sb.id)
    assert secret_daemon.stop() == 0
    assert SECRET_VALUE.encode() not in _everything_under(secret_daemon.state)
    assert SECRET_VALUE not in secret_daemon.log()


def test_a_secret_the_tenant_lacks_is_refused_by_name(secret_daemon):
    stranger = secret_daemon.client(tenant="acme")
    with pytest.raises(ClientError) as exc:
        stranger.create_sandbox(secrets=[{"name": "API_TOKEN", "hosts": ["api.test"]}])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    assert "'API_TOKEN'" in str(exc.value) and SECRET_VALUE not in str(exc.value)
    with pytest.raises(ClientError) as exc:
        stranger.create_sandbox(secrets=[{"name": "bad name", "hosts": ["api.test"]}])
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
