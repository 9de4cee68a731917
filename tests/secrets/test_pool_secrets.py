"""Warm pools with egress, through a real daemon (runtime/pools.py `egress`): a Create with
secrets (or with allow_net) takes a ready sandbox of a pool of that class, gets its secrets,
CA and rules at acquire, and then behaves as a cold sandbox of the same request does: the
same placeholders in its commands, the value put in on the way to the bound host only, the
same files, mounts, policy digest, kernel policy and probe verdicts. The hit is audited as
any pool hit (`sandbox.create` with `pool=NAME`), its egress records as its tenant's.
"""

from __future__ import annotations

import json
import os

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.sandbox.probes import suite

from ..integration.daemon_harness import DaemonProcess, collect_exec, wait_until
from ..integration.test_pools import same_verdicts
from .conftest import SECRET_VALUE, cli_env

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

MiB = 1 << 20
#: The pools' class as a Create asks for it.
CLASS = {"memory_bytes": 128 * MiB, "pids_max": 64, "tmp_bytes": 8 * MiB, "cpus": 1.0}
SECRET = [{"name": "API_TOKEN", "hosts": ["api.test"]}]
CONFIG = """
pool_refill_per_s = 20
[secrets]
dir = "{store}"
[tenants.alpha]
[tenants.beta]
[tenants.gamma]
[pools.keyed]
size = 1
memory = "128M"
pids = 64
tmp = "8M"
cpus = 1
egress = "secrets"
tenants = ["alpha", "beta"]
[pools.netted]
size = 1
memory = "128M"
pids = 64
tmp = "8M"
cpus = 1
egress = "allow_net"
tenants = ["alpha"]
"""
CURL = ('curl -sS --max-time 20 -H "Authorization: Bearer $API_TOKEN" '
        '"https://api.test/v1?key=$API_TOKEN"')
#: What a sandbox shows of its egress set-up, one command each (compared pooled vs cold).
VIEWS = {
    "resolv.conf": "cat /etc/resolv.conf",
    "env names": "env | cut -d= -f1 | sort",
    "proxy env": 'echo "$HTTPS_PROXY $NO_PROXY $SSL_CERT_FILE $NODE_EXTRA_CA_CERTS"',
    "mounts": "awk '{print $5, $6, $9}' /proc/self/mountinfo",
    "trust files": "ls -A /etc/ssl/certs | sort | md5sum",
    "certificates in the bundle": "grep -c 'BEGIN CERTIFICATE' "
                                  "/etc/ssl/certs/ca-certificates.crt",
    "links": "cat /proc/net/dev | cut -d: -f1 | sort",
    "routes": "cat /proc/net/route",
}


@pytest.fixture
def daemon(servers, tmp_path, monkeypatch):
    for key, value in cli_env(servers).items():  # the daemon's proxy knows the test servers
        monkeypatch.setenv(key, value)
    store = tmp_path / "secrets"
    for tenant in ("alpha", "gamma"):  # beta has none
        (store / tenant).mkdir(parents=True)
        (store / tenant / "API_TOKEN").write_text(SECRET_VALUE + "\n")
        os.chmod(store / tenant / "API_TOKEN", 0o600)
    d = DaemonProcess(tmp_path / "d", config=CONFIG.format(store=store))
    d.start()
    yield d
    d.ensure_stopped()


def ready(daemon) -> dict[str, list[str]]:
    """Ids of the sandboxes each pool spawned, in order (once both pools have one)."""
    def fills():
        found: dict[str, list[str]] = {}
        for rec in daemon.records("sandbox.pool.fill"):
            found.setdefault(json.loads(rec.detail_json)["pool"], []).append(rec.sandbox_id)
        return found
    assert wait_until(lambda: len(fills()) == 2, timeout_s=60, interval_s=0.05), daemon.log()
    return fills()


def created(daemon, sandbox_id: str) -> tuple[str, dict]:
    (rec,) = [r for r in daemon.records("sandbox.create") if r.sandbox_id == sandbox_id]
    return rec.tenant, json.loads(rec.detail_json)


def run(client, sandbox_id: str, script: str):
    return collect_exec(client.exec(sandbox_id, ["sh", "-c", script]))


def views(client, sandbox_id: str) -> dict[str, bytes]:
    return {name: run(client, sandbox_id, script).stdout for name, script in VIEWS.items()}


def test_a_pooled_sandbox_takes_the_requests_secret_as_a_cold_one_does(daemon, servers):
    pools = ready(daemon)
    alpha, beta, gamma = (daemon.client(t) for t in ("alpha", "beta", "gamma"))
    # beta is served but has no such secret: refused as a cold create refuses it, and the
    # ready sandbox is not spent on it
    with pytest.raises(ClientError) as refused:
        beta.create_sandbox(**CLASS, secrets=SECRET)
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    pooled = alpha.create_sandbox(**CLASS, secrets=SECRET)
    cold = gamma.create_sandbox(**CLASS, secrets=SECRET)  # gamma: no pool serves it
    assert pooled.id == pools["keyed"][0]
    assert created(daemon, pooled.id)[0] == "alpha"
    assert created(daemon, pooled.id)[1]["pool"] == "keyed"
    assert "pool" not in created(daemon, cold.id)[1]
    # the request's spec, not the birth one: the same rules and digest as the cold one
    assert list(pooled.spec.allow_net) == list(cold.spec.allow_net) == [
        "api.test:443", "api.test:80"]
    born = [json.loads(r.detail_json)["policy_digest"] for r in daemon.records(
        "sandbox.pool.fill") if r.sandbox_id == pooled.id]
    assert born and pooled.policy_digest != born[0]  # computed again, of the request's
    assert "invalid" not in str(pooled) + str(alpha.inspect_sandbox(pooled.id))

    placeholders = {}
    for client, sb in ((alpha, pooled), (gamma, cold)):
        before = len(servers.received)
        result = run(client, sb.id, CURL)
        assert result.returncode == 0, result.stderr
        arrived = b"".join(data for _, data in servers.received[before:])
        assert f"Bearer {SECRET_VALUE}".encode() in arrived  # put in for the bound host
        assert f"key={SECRET_VALUE}".encode() in arrived
        assert SECRET_VALUE.encode() not in result.stdout  # echoed back, scrubbed
        assert b"corral_secret_" in result.stdout
        inside = run(client, sb.id, "echo $API_TOKEN").stdout.strip()
        assert inside.startswith(b"corral_secret_") and len(inside) == 46
        placeholders[sb.id] = inside
        # a host the rules do not name is refused, placeholder and all
        before = len(servers.received)
        out = run(client, sb.id, 'curl -sS --max-time 10 -H "X: $API_TOKEN" '
                                 "http://other.test/")
        assert out.stdout == b"corral: egress denied: no rule allows other.test:80\n"
        assert b"corral_secret_" not in b"".join(d for _, d in servers.received[before:])
    assert placeholders[pooled.id] != placeholders[cold.id]  # new for every sandbox
    shown = views(alpha, pooled.id)
    assert shown == views(gamma, cold.id)
    assert shown["resolv.conf"].startswith(b"nameserver 100.127.255.1\n")
    assert b"/etc/ssl/certs " in shown["mounts"] and b"eth0" in shown["links"]
    assert b"SSL_CERT_FILE" in shown["env names"] and b"API_TOKEN" in shown["env names"]
    cas = [run(c, s.id, "cat /etc/ssl/certs/corral-sandbox-ca.crt").stdout
           for c, s in ((alpha, pooled), (gamma, cold))]
    assert cas[0].count(b"BEGIN CERTIFICATE") == 1 and cas[0] != cas[1]  # its own CA

    # the egress records are the tenant's, under the request's policy
    assert wait_until(lambda: [r for r in daemon.records("net.connect")
                               if r.sandbox_id == pooled.id], timeout_s=10)
    mine = [r for r in daemon.records() if r.kind.startswith("net.")
            and r.sandbox_id == pooled.id]
    assert {r.tenant for r in mine} == {"alpha"}
    assert {json.loads(r.detail_json)["policy_digest"] for r in mine} == {
        pooled.policy_digest}

    reports = [c.inspect_sandbox(s.id) for c, s in ((alpha, pooled), (gamma, cold))]
    assert [list(r.mismatches) for r in reports] == [[], []]
    live = [json.loads(r.report_json) for r in reports]
    for key in ("cgroup_limits", "landlock", "network", "notes"):
        assert live[0][key] == live[1][key], key
    # the pool refills what was taken, with a sandbox of its own
    assert wait_until(lambda: len(ready(daemon)["keyed"]) == 2, timeout_s=30)
    alpha.destroy_sandbox(pooled.id)
    gamma.destroy_sandbox(cold.id)
    assert daemon.stop() == 0
    assert SECRET_VALUE not in daemon.log()
    assert daemon.leftovers() == {}


def test_a_pooled_sandbox_takes_the_requests_allow_net_as_a_cold_one_does(daemon):
    pools = ready(daemon)
    alpha, gamma = daemon.client("alpha"), daemon.client("gamma")
    pooled = alpha.create_sandbox(**CLASS, allow_net=["other.test:80"])
    cold = gamma.create_sandbox(**CLASS, allow_net=["other.test:80"])
    assert pooled.id == pools["netted"][0]
    assert created(daemon, pooled.id)[1]["pool"] == "netted"
    assert list(pooled.spec.allow_net) == list(cold.spec.allow_net) == ["other.test:80"]
    for client, sb in ((alpha, pooled), (gamma, cold)):
        allowed = run(client, sb.id, "curl -sS --max-time 20 http://other.test/hello")
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout)["request"].startswith("GET /hello ")
        denied = run(client, sb.id, "curl -sS --max-time 10 https://api.test/")
        assert denied.returncode != 0
        assert run(client, sb.id, "echo ${SSL_CERT_FILE:-unset}").stdout == b"unset\n"
    shown = views(alpha, pooled.id)
    assert shown == views(gamma, cold.id)
    assert shown["resolv.conf"].startswith(b"nameserver 100.127.255.1\n")
    assert b"/etc/ssl/certs " not in shown["mounts"]  # no trust of its own without secrets
    # a Create with secrets does not take from this pool, nor one without egress
    keyed_before = ready(daemon)["keyed"][:1]
    plain = alpha.create_sandbox(**CLASS)
    assert plain.id not in {*pools["netted"], *keyed_before}
    assert "pool" not in created(daemon, plain.id)[1]
    assert daemon.stop() == 0
    assert daemon.leftovers() == {}


def test_the_probe_suite_gives_a_pooled_sandbox_with_a_secret_the_verdicts_of_a_cold_one(
        daemon):
    pools = ready(daemon)
    pooled = daemon.client("alpha").create_sandbox(**CLASS, secrets=SECRET).id
    cold = daemon.client("gamma").create_sandbox(**CLASS, secrets=SECRET).id
    assert pooled == pools["keyed"][0]
    verdicts = same_verdicts(daemon, pooled, cold)
    escaped = {n for n, r in verdicts["alpha"].items() if r.verdict != suite.CONTAINED}
    # the two limits a Create cannot ask for (as for a pooled sandbox without egress), and
    # the three probes that judge against no network at all: an egress sandbox has its
    # link and a default route by design, every packet steered to the proxy (sandbox/net.py)
    assert escaped == {"disk-fill-workspace", "fd-exhaustion", "interfaces", "metadata-route",
                       "dns-route"}
    assert daemon.stop() == 0
    assert daemon.leftovers() == {}
