"""Egress for sandboxes created over gRPC: the daemon hosts the proxy and audits every
attempt; `Sandboxes.Inspect` reads the live policy back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from corral.runtime.audit import AuditLog
from corral.sandbox import cgroups

from ..integration.daemon_harness import DaemonProcess

CLIENT = """
import json, socket, urllib.request, urllib.error
out = {}
for url in ('http://allowed.test/d', 'http://other.test/d'):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out[url] = r.status
    except urllib.error.HTTPError as e:
        out[url] = e.code
s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
s.sendall(b'CONNECT 127.0.0.1:%d HTTP/1.1\\r\\n\\r\\n' % PORT)
out['daemon'] = s.recv(200).decode().split('\\r\\n')[0]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b'x', ('203.0.113.9', 9999))
print(json.dumps(out))
"""


@pytest.fixture
def egress_daemon(internet, tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_EGRESS_HOSTS", internet.hosts_file)
    monkeypatch.setenv("CORRAL_EGRESS_ROUTABLE", internet.subnet)
    monkeypatch.setenv("CORRAL_EGRESS_UPSTREAM_ONLY", f"{internet.subnet},127.0.0.0/8")
    (tmp_path / "d").mkdir()
    d = DaemonProcess(tmp_path / "d", args=("--listen", "127.0.0.1:0"),
                      config='[tenants.acme]\ntoken = "egress-test-token-0123456789"\n')
    d.start()
    try:
        yield d
    finally:
        d.ensure_stopped()


def test_daemon_sandbox_egress_is_audited_and_inspectable(egress_daemon, internet):
    with AuditLog.open(egress_daemon.audit_db, readonly=True) as log:
        (start,) = log.query(kind="daemon.start")
    port = start.detail["tcp_port"]
    assert port
    client = egress_daemon.client()
    box = client.create_sandbox(allow_net=["allowed.test:80", "127.0.0.1"],
                                memory_bytes=256 << 20)
    assert list(box.spec.allow_net) == ["127.0.0.1", "allowed.test:80"]
    try:
        inspected = client.inspect_sandbox(box.id)
        assert list(inspected.mismatches) == []
        assert inspected.policy_digest == box.policy_digest
        report = json.loads(inspected.report_json)
        assert {link["name"] for link in report["network"]["links"]} == {"lo", "eth0"}
        assert all(p["seccomp_mode"] == 2 and p["no_new_privs"]
                   for p in report["processes"])
        cli = [sys.executable, "-m", "corral.runtime.cli", "inspect", "--socket",
               egress_daemon.socket, box.id]
        table = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[-1] == "matches the spec"
        assert "route default            via 100.127.255.1   dev eth0" in table.stdout
        as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
        doc = json.loads(as_json.stdout)
        assert (doc["mismatches"], doc["policy_digest"]) == ([], box.policy_digest)
        client.write_file(box.id, "client.py", CLIENT.replace("PORT", str(port)).encode())
        events = list(client.exec(box.id, ["python3", "-I", "/workspace/client.py"]))
        exited = [e.exited for e in events if e.HasField("exited")]
        assert exited and exited[0].returncode == 0
    finally:
        client.destroy_sandbox(box.id)
    with AuditLog.open(egress_daemon.audit_db, readonly=True) as log:
        records = log.query(sandbox_id=box.id)
    create = next(r for r in records if r.kind == "sandbox.create")
    assert create.detail["policy_digest"] == box.policy_digest
    assert create.detail["allow_net"] == ["127.0.0.1", "allowed.test:80"]
    net = [(r.kind, r.detail.get("decision"), r.detail.get("name"), r.detail.get("reason"))
           for r in records if r.kind.startswith("net.") and r.kind != "net.summary"]
    assert sorted(net, key=str) == sorted([
        ("net.connect", "allow", "allowed.test", "name rule"),
        ("net.connect", "deny", "other.test", "no rule allows other.test:80"),
        ("net.connect", "deny", "", f"127.0.0.1:{port} is a protected endpoint"),
        ("net.udp", "deny", None, "UDP is dropped (only DNS to the sandbox resolver)"),
    ], key=str)
    assert [r.kind for r in records].index("net.summary") < [r.kind for r in records].index(
        "sandbox.destroy")
    assert all(r.peer == "egress" and r.detail["policy_digest"] == box.policy_digest
               for r in records if r.kind.startswith("net."))
    inspected = [r for r in records if r.kind == "sandbox.inspect"]
    assert [r.detail["mismatches"] for r in inspected] == [[], [], []]


def test_cli_create_with_allow_net_and_inspect(egress_daemon):
    base = [sys.executable, "-m", "corral.runtime.cli"]
    sock = ["--socket", egress_daemon.socket]
    created = subprocess.run([*base, "create", *sock, "--allow-net", "Allowed.TEST:443",
                              "--allow-net", "10.0.0.0/8"], capture_output=True, text=True,
                             timeout=60)
    assert created.returncode == 0, created.stderr
    box_id = created.stdout.strip()
    try:
        box = egress_daemon.client().get_sandbox(box_id)
        assert list(box.spec.allow_net) == ["10.0.0.0/8", "allowed.test:443"]
        table = subprocess.run([*base, "inspect", *sock, box_id], capture_output=True,
                               text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        assert "link eth0       UP       100.127.255.2/30" in table.stdout
        # change the memory limit behind the daemon's back: inspect must say so, loudly
        cg = cgroups.Cgroup(cgroups.detect(), box_id)
        limit_file = next(
            os.path.join(os.path.dirname(p), n) for p in cg.procs_files
            for n in ("memory.limit_in_bytes", "memory.max")
            if os.path.exists(os.path.join(os.path.dirname(p), n)))
        with open(limit_file, "w") as f:
            f.write(str(64 << 20))
        table = subprocess.run([*base, "inspect", *sock, box_id], capture_output=True,
                               text=True, timeout=60)
        assert table.returncode == 3
        assert f"!!! cgroup memory limit is {64 << 20}, spec says {512 << 20}" in table.stdout
        assert table.stderr == (f"corral: inspect: {box_id} differs from its spec in 1 "
                                "way(s)\n")
    finally:
        subprocess.run([*base, "destroy", *sock, box_id], check=True, timeout=60)
    bad = subprocess.run([*base, "create", *sock, "--allow-net", "10.0.0.1/8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "allow_net: '10.0.0.1/8': not an address or network" in bad.stderr
