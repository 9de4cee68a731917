"""Tenants: one never sees or touches another's sandboxes and sessions; every denial is audited.

Another tenant's id is answered exactly as an unknown one (NOT_FOUND, the same message), so
a caller cannot even learn that the id exists; the audit log still records the denial, where
only operators read it.

On the unix socket the tenant is the x-corral-tenant header; on TCP it is the bearer token,
and a call without a known token is UNAUTHENTICATED.
"""

from __future__ import annotations

import json

import grpc
import pytest

from corral.runtime.client import Client, ClientError

from .daemon_harness import STREAM_AGENT, DaemonProcess, SessionRecorder, upload_agents

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _denied_code(fn) -> str:
    return _denied(fn)[0]


def _denied(fn) -> tuple[str, str]:
    """(status name, message) of the ClientError fn raises."""
    with pytest.raises(ClientError) as exc:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
    return exc.value.code.name, str(exc.value)


def _denials(daemon, tenant: str) -> list[dict]:
    return [dict(json.loads(r.detail_json), peer=r.peer) for r in daemon.records("denied")
            if r.tenant == tenant]


def test_a_tenant_cannot_touch_another_tenants_sandbox_or_session(daemon):
    acme = daemon.client(tenant="acme")
    evil = daemon.client(tenant="evil")
    sb = acme.create_sandbox()
    upload_agents(acme, sb.id)
    assert sb.tenant == "acme"
    owner = SessionRecorder(acme.open_session(
        ["python3", STREAM_AGENT, "--idle"], sandbox_id=sb.id))
    owner.wait_for(lambda r: r.session_id, what="opened")
    exec_id = next(acme.exec(sb.id, ["sleep", "30"])).started.exec_id

    before = len(_denials(daemon, "evil"))
    before_hidden = len(_denials(daemon, ""))

    def attempts(sandbox_id: str, session_id: str) -> dict:
        return {
            "Get": lambda: evil.get_sandbox(sandbox_id),
            "Exec": lambda: evil.exec(sandbox_id, ["id"]),
            "Attach": lambda: evil.attach(sandbox_id, exec_id),
            "SendInput": lambda: evil.send_input(sandbox_id, exec_id, b"x"),
            "Signal": lambda: evil.signal(sandbox_id, 9, exec_id=exec_id),
            "WriteFile": lambda: evil.write_file(sandbox_id, "planted", b"x"),
            "ReadFile": lambda: evil.read_file(sandbox_id, "stream_agent.py"),
            "ListFiles": lambda: evil.list_files(sandbox_id),
            "Destroy": lambda: evil.destroy_sandbox(sandbox_id),
            "Open": lambda: _resume(evil, session_id),
        }

    # Someone else's ids get the very answer unknown ids get: nothing says they exist.
    unknown_sb, unknown_session = "sbx-000000000000", "ses-000000000000"
    for method, fn in attempts(unknown_sb, unknown_session).items():
        code, message = _denied(fn)
        foreign_code, foreign_message = _denied(attempts(sb.id, owner.session_id)[method])
        assert code == foreign_code == "NOT_FOUND", method
        assert foreign_message == message.replace(unknown_sb, sb.id).replace(
            unknown_session, owner.session_id), method
    # Each attempt on a foreign id is one "denied" record naming the method, who tried and
    # whose it was, kept under no tenant: only operators read it. In evil's own records a
    # denial would say the id exists (unknown ids make none), so there is none there.
    assert len(_denials(daemon, "evil")) == before
    assert [r.kind for r in evil.audit_query(kind="denied", limit=1000)
            if sb.id in r.detail_json] == []
    denials = _denials(daemon, "")[before_hidden:]
    assert [d["method"].split(".")[-1] for d in denials] == list(attempts("", ""))
    assert all(d["status"] == "NOT_FOUND" for d in denials)
    assert [d["reason"] for d in denials] == [
        f"tenant 'evil' asked for sandbox {sb.id!r} of tenant 'acme'"] * 9 + [
        f"tenant 'evil' asked for session {owner.session_id!r} of tenant 'acme'"]

    # Nothing of acme's shows for evil, and nothing was done to it.
    assert sb.id not in [b.id for b in evil.list_sandboxes()]
    got = acme.get_sandbox(sb.id)
    assert [e.running for e in got.execs if e.id == exec_id] == [True]
    assert "planted" not in [e.name for e in acme.list_files(sb.id)]
    # A non-operator reads only its own audit records.
    assert _denied_code(lambda: evil.audit_query(tenant="acme")) == "PERMISSION_DENIED"
    assert {r.tenant for r in evil.audit_query(limit=1000)} == {"evil"}
    assert {r.tenant for r in acme.audit_query(limit=1000)} == {"acme"}

    owner.stream.send_input("still mine")
    owner.wait_for(lambda r: "in:still mine" in r.tokens(), what="owner steering")
    owner.stream.close_session()
    owner.join()
    acme.destroy_sandbox(sb.id)


def _resume(client, session_id: str) -> SessionRecorder:
    rec = SessionRecorder(client.resume_session(session_id, after_seq=0))
    rec.join()
    if rec.error:
        raise rec.error
    return rec


ACME_TOKEN = "acme-token-0123456789abcdef"
EVIL_TOKEN = "evil-token-0123456789abcdef"


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory):
    # Port 0: the kernel picks one, the daemon records which in its daemon.start record.
    d = DaemonProcess(
        tmp_path_factory.mktemp("tcp"), args=("--listen", "127.0.0.1:0"),
        config=f'[tenants.acme]\ntoken = "{ACME_TOKEN}"\n[tenants.evil]\ntoken = "{EVIL_TOKEN}"\n',
    ).start()
    try:
        d.port = json.loads(d.records("daemon.start")[-1].detail_json)["tcp_port"]
        assert d.port > 0
        assert f"127.0.0.1:{d.port}" in d.log()
        yield d
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
    assert d.leftovers() == {}


def test_tcp_listener_needs_a_known_bearer_token(tcp_daemon):
    target = f"127.0.0.1:{tcp_daemon.port}"
    for metadata in ((), (("authorization", "Bearer not-a-token-0123456789"),),
                     (("authorization", f"Basic {ACME_TOKEN}"),),
                     (("x-corral-tenant", "acme"),)):
        anon = Client(grpc.insecure_channel(target), metadata)
        try:
            assert _denied_code(anon.list_sandboxes) == "UNAUTHENTICATED", metadata
            assert _denied_code(lambda c=anon: c.create_sandbox()) == "UNAUTHENTICATED"
        finally:
            anon.close()
    records = tcp_daemon.records("denied")
    assert len([r for r in records if json.loads(r.detail_json)["status"] == "UNAUTHENTICATED"
                and r.peer.startswith("ipv4:127.0.0.1")]) == 8
    assert tcp_daemon.records("sandbox.create") == []

    acme = Client.connect(target=target, token=ACME_TOKEN)
    # The tenant header means nothing on TCP: the token decides who is calling.
    evil = Client(grpc.insecure_channel(target), (("authorization", f"Bearer {EVIL_TOKEN}"),
                                                  ("x-corral-tenant", "acme")))
    try:
        sb = acme.create_sandbox()
        assert sb.tenant == "acme"
        assert sb.id not in [b.id for b in evil.list_sandboxes()]
        assert _denied_code(lambda: evil.get_sandbox(sb.id)) == "NOT_FOUND"
        assert _denied_code(lambda: evil.destroy_sandbox(sb.id)) == "NOT_FOUND"
        res = list(acme.exec(sb.id, ["echo", "over tcp"]))
        assert res[-1].exited.returncode == 0
        acme.destroy_sandbox(sb.id)
    finally:
        acme.close()
        evil.close()
    created = tcp_daemon.records("sandbox.create")
    assert [(r.tenant, r.peer.split(":")[0]) for r in created] == [("acme", "ipv4")]
