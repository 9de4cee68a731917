"""Live restore of egress (allow_net) and secrets: a daemon SIGKILLed while kept sandboxes
have an egress link; after the restart the same link (sockets, namespace, veth, BPF
steering, kept by the holder) is served by the new daemon under the same rules, and a
secret's placeholder and CA are the ones the sandbox already holds.

The servers are the secrets tests' (tests/secrets/conftest.py): a network namespace this
test process makes, with api.test and other.test on a private /24. No packet goes anywhere
else: the daemon's proxy may connect only there and to loopback (upstream_only).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest

from corral.runtime import restore
from corral.runtime.holder import SOCKET_NAME, HolderClient

from ..secrets.conftest import SECRET_VALUE, cli_env, servers  # noqa: F401 (fixture)
from ..secrets.test_daemon_secrets import _everything_under
from .daemon_harness import alive, collect_exec, sandbox_footprint, wait_until
from .test_live_restore import _details, _holder_pid, kept_daemon, reaper  # noqa: F401

pytestmark = [pytest.mark.timeout(240)]

#: Inside the sandbox: DNS through its resolver (or, given argv[2], the address it
#: cached), a raw TCP connection to that address (steered transparently, allowed by its
#: DNS pin), one to a denied address (argv[1]), and one through the explicit proxy
#: (CONNECT); prints what each got.
CLIENT = """
import json, socket, sys
out = {}
def raw(host, port, data):
    try:
        s = socket.create_connection((host, port), timeout=15)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return s.recv(200).decode()
    except OSError as exc:
        return type(exc).__name__
try:
    address = sys.argv[2] if len(sys.argv) > 2 else socket.gethostbyname('api.test')
except OSError as exc:
    address = type(exc).__name__
out['resolved'] = address
out['allowed'] = raw(address, 7000, b'ping')
out['denied'] = raw(sys.argv[1], 7000, b'leak')
s = socket.create_connection(('100.127.255.1', 3128), timeout=15)
s.sendall(b'CONNECT api.test:7000 HTTP/1.1\\r\\nHost: api.test:7000\\r\\n\\r\\n')
head = b''
while b'\\r\\n\\r\\n' not in head:
    chunk = s.recv(1)
    if not chunk:
        break
    head += chunk
out['connect'] = head.split(b'\\r\\n')[0].decode()
s.sendall(b'via-proxy')
s.shutdown(socket.SHUT_WR)
out['proxied'] = s.recv(200).decode()
print(json.dumps(out))
"""

CURL = ('curl -sS --max-time 20 -H "Authorization: Bearer $API_TOKEN" '
        '"https://api.test/v1?key=$API_TOKEN"')


@pytest.fixture
def egress_env(servers, tmp_path, monkeypatch):  # noqa: F811
    """The daemons' environment and config: the proxy knows the test servers, and the
    secret store holds API_TOKEN (and GONE_TOKEN, which a test removes)."""
    for key in ("CORRAL_EGRESS_HOSTS", "CORRAL_EGRESS_ROUTABLE", "CORRAL_EGRESS_UPSTREAM_ONLY",
                "CORRAL_EGRESS_UPSTREAM_CA"):
        monkeypatch.setenv(key, cli_env(servers)[key])
    store = tmp_path / "secrets" / "local"
    store.mkdir(parents=True)
    for name in ("API_TOKEN", "GONE_TOKEN"):
        (store / name).write_text(SECRET_VALUE + "\n")
        os.chmod(store / name, 0o600)
    return f'live_restore = true\n[secrets]\ndir = "{tmp_path / "secrets"}"\n', store


def _kept_first(kept_daemon, reaper, config: str):  # noqa: F811
    d = kept_daemon(config).start()
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        reaper.pids.add(_holder_pid(holder))
    return d, d.client()


def _restarted(kept_daemon, config: str, kept, lost, why: str):  # noqa: F811
    """The next daemon, started: kept was restored, lost was killed and reported with a
    reason that says why; returns it and a client."""
    d = kept_daemon(config).start()
    restored = _details(d, "sandbox.restore")
    assert restored[kept.id]["restored"] is True
    assert restored[lost.id]["restored"] is False
    assert restored[lost.id]["reason"].startswith("its egress cannot be served again: ")
    assert why in restored[lost.id]["reason"], restored[lost.id]
    assert wait_until(lambda: not alive(lost.init_pid))
    assert sandbox_footprint(lost.id) == {}
    return d, d.client()


def _run_client(c, sandbox_id: str, denied: str, *cached: str) -> dict:
    """CLIENT's answers; a denied connection's (a reset, or EOF) as "refused"."""
    result = collect_exec(c.exec(sandbox_id, ["python3", "-I", "/workspace/client.py", denied,
                                              *cached]))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    if out["denied"] in ("", "ConnectionResetError"):
        out["denied"] = "refused"
    return out


#: What CLIENT gets while the egress is served.
SERVED = {"allowed": "got 4 bytes", "denied": "refused",
          "connect": "HTTP/1.1 200 Connection established", "proxied": "got 9 bytes"}


def _net_records(d, sandbox_id: str) -> list[dict]:
    return [json.loads(r.detail_json) for r in d.records("net.connect")
            if r.sandbox_id == sandbox_id]


def _links(pid: str) -> dict[str, str]:
    """Link -> target of process pid's network namespace and descriptors ({} once gone)."""
    out = {}
    try:
        paths = [f"/proc/{pid}/ns/net"] + [f"/proc/{pid}/fd/{fd}"
                                           for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return out
    for path in paths:
        with contextlib.suppress(OSError):
            out[path] = os.readlink(path)
    return out


def _holder_netns(d) -> set[str]:
    """The network namespaces the holder of d's state keeps a descriptor of."""
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        pid = _holder_pid(holder)
    return {target for path, target in _links(str(pid)).items()
            if "/fd/" in path and target.startswith("net:[")}


def _holders_of(target: str) -> list[str]:
    """Every descriptor or namespace link on the host that still names target."""
    return [path for pid in filter(str.isdigit, os.listdir("/proc"))
            for path, named in _links(pid).items() if named == target]


def test_an_allow_net_sandbox_keeps_its_egress_across_a_sigkill(kept_daemon, reaper,  # noqa: F811
                                                               egress_env, servers):  # noqa: F811
    config, _ = egress_env
    d, c = _kept_first(kept_daemon, reaper, config)
    sb = c.create_sandbox(allow_net=["api.test:7000"])
    lost = c.create_sandbox(allow_net=["api.test:7000"])
    reaper.pids.update((sb.init_pid, lost.init_pid))
    created = _details(d, "sandbox.create")
    assert created[sb.id]["live_restore"] == created[lost.id]["live_restore"] == "kept"
    c.write_file(sb.id, "client.py", CLIENT.encode())
    before = len(servers.received)
    assert _run_client(c, sb.id, servers.other) == {"resolved": servers.api, **SERVED}
    assert len(servers.received) - before == 2  # the denied one never arrived
    assert wait_until(lambda: {restore.EGRESS_NAME} <= {
        k.partition("/")[2] for k in _holder_keys(d) if k.startswith(sb.id + "/")})
    egress_ns = _holder_netns(d)
    assert len(egress_ns) == 2  # one egress namespace per sandbox, both held

    assert d.kill() == -signal.SIGKILL
    assert alive(sb.init_pid) and alive(lost.init_pid)
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        holder.forget(f"{lost.id}/{restore.EGRESS_NAME}")  # its egress is lost meanwhile

    d2, c2 = _restarted(kept_daemon, config, sb, lost, "the holder kept no egress descriptors")
    assert [s.id for s in c2.list_sandboxes()] == [sb.id]

    before = len(servers.received)
    # no DNS query first: the address cached before the restart is still pinned to api.test
    assert _run_client(c2, sb.id, servers.other, servers.api) == {"resolved": servers.api,
                                                                  **SERVED}
    assert _run_client(c2, sb.id, servers.other) == {"resolved": servers.api, **SERVED}
    assert len(servers.received) - before == 4
    assert [r for r in _net_records(d2, sb.id) if r.get("pinned")][0]["decision"] == "allow"
    records = _net_records(d2, sb.id)  # audited by the new daemon, as before
    assert {(r["decision"], r["address"], r["port"]) for r in records} >= {
        ("allow", servers.api, 7000), ("deny", servers.other, 7000)}, records

    assert list(c2.inspect_sandbox(sb.id).mismatches) == []  # eth0, route to the proxy

    assert d2.stop() == 0, d2.log()  # an upgrade: a clean stop keeps it too
    d3 = kept_daemon(config).start()
    c3 = d3.client()
    assert _run_client(c3, sb.id, servers.other) == {"resolved": servers.api, **SERVED}
    (held,) = _holder_netns(d3)  # the lost one's namespace is gone already
    assert held in egress_ns
    c3.destroy_sandbox(sb.id)
    assert wait_until(lambda: not alive(sb.init_pid))
    assert wait_until(lambda: _holders_of(held) == []), _holders_of(held)
    assert not any(k.startswith(sb.id) for k in _holder_keys(d3))
    assert sandbox_footprint(sb.id) == {}
    assert not os.path.isdir("/run/netns") or not any(
        sb.id in name for name in os.listdir("/run/netns"))
    assert d3.stop() == 0, d3.log()
    assert not os.path.exists(d3.state / SOCKET_NAME)  # the holder ended: nothing held


def _holder_keys(d) -> dict[str, int]:
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        return holder.keys()


def test_a_secrets_sandbox_keeps_its_placeholder_and_ca_across_a_sigkill(
        kept_daemon, reaper, egress_env, servers):  # noqa: F811
    config, store = egress_env
    d, c = _kept_first(kept_daemon, reaper, config)
    sb = c.create_sandbox(secrets=[{"name": "API_TOKEN", "hosts": ["api.test"]}])
    gone = c.create_sandbox(secrets=[{"name": "GONE_TOKEN", "hosts": ["api.test"]}])
    reaper.pids.update((sb.init_pid, gone.init_pid))
    assert _details(d, "sandbox.create")[sb.id]["live_restore"] == "kept"
    held = "echo $API_TOKEN; cat /etc/ssl/certs/corral-sandbox-ca.crt"
    placeholder_and_ca = collect_exec(c.exec(sb.id, ["sh", "-c", held])).stdout
    assert placeholder_and_ca.startswith(b"corral_secret_")
    before = len(servers.received)
    result = collect_exec(c.exec(sb.id, ["sh", "-c", CURL]))
    assert result.returncode == 0, result.stderr
    assert f"Bearer {SECRET_VALUE}".encode() in b"".join(
        data for _, data in servers.received[before:])
    assert wait_until(lambda: sum(1 for k in _holder_keys(d) if k.endswith(
        "/" + restore.EGRESS_NAME)) == 2)

    assert d.kill() == -signal.SIGKILL
    os.unlink(store / "GONE_TOKEN")  # the operator removed it meanwhile

    d2, c2 = _restarted(kept_daemon, config, sb, gone, "GONE_TOKEN")
    # the same placeholder in new commands' environment, the same CA in its trust
    assert collect_exec(c2.exec(sb.id, ["sh", "-c", held])).stdout == placeholder_and_ca
    before = len(servers.received)
    result = collect_exec(c2.exec(sb.id, ["sh", "-c", CURL]))
    assert result.returncode == 0, result.stderr
    arrived = b"".join(data for _, data in servers.received[before:])
    assert f"Bearer {SECRET_VALUE}".encode() in arrived  # injected by the new daemon
    assert f"key={SECRET_VALUE}".encode() in arrived
    assert SECRET_VALUE.encode() not in result.stdout  # echoed back, scrubbed again
    assert b"corral_secret_" in result.stdout
    assert SECRET_VALUE not in d2.log()
    assert SECRET_VALUE.encode() not in _everything_under(d2.state)  # nor on its disk
    assert list(c2.inspect_sandbox(sb.id).mismatches) == []
    c2.destroy_sandbox(sb.id)
    assert sandbox_footprint(sb.id) == {}
    assert d2.stop() == 0, d2.log()
    assert not os.path.exists(d2.state / SOCKET_NAME)
