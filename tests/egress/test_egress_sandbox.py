"""Egress through the real proxy, from real sandboxes, to the tests' own internet.

Each test runs a small Python client inside a sandbox (the host's /usr/bin/python3) and
checks both what the client saw and the proxy's event for the attempt.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from corral.sandbox import BindMount, Sandbox, SandboxSpec, proxy

from .conftest import egress_refs

MiB = 1 << 20


def sandbox(inet, *rules, **kw):
    events: list[dict] = []
    spec = SandboxSpec(allow_net=rules, memory_bytes=256 * MiB, timeout_s=60,
                       binds=(BindMount(inet.cert_dir, "/certs"),), **kw)
    sb = Sandbox(spec, on_net_event=events.append)
    sb.start()
    return sb, events


def run_py(sb, code: str) -> dict:
    """Run code (which sets `out`) in the sandbox; returns out, parsed from its JSON."""
    wrapped = f"import json,socket,sys\nout={{}}\n{code}\nprint(json.dumps(out))"
    proc = sb.exec(["python3", "-I", "-c", wrapped])
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    return json.loads(stdout.decode().strip().splitlines()[-1])


def events_of(events, kind="net.connect", decision=None):
    return [e for e in events if e["kind"] == kind
            and (decision is None or e.get("decision") == decision)]


def wait_events(events, n, kind="net.connect"):
    end = time.monotonic() + 10
    while len(events_of(events, kind)) < n and time.monotonic() < end:
        time.sleep(0.02)
    return events_of(events, kind)


HTTP_GET = """
import urllib.request
try:
    with urllib.request.urlopen({url!r}, timeout=10) as r:
        out['status'], out['body'] = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    out['status'], out['body'] = e.code, e.read().decode()
"""


def test_allowed_host_over_http_proxy_and_https_connect(internet):
    sb, events = sandbox(internet, "allowed.test")
    try:
        got = run_py(sb, HTTP_GET.format(url="http://allowed.test/hello"))
        assert got == {"status": 200,
                       "body": f"hello from {internet.allowed} for allowed.test /hello"}
        got = run_py(sb, """
import http.client, ssl
ctx = ssl.create_default_context(cafile='/certs/cert.pem')
c = http.client.HTTPSConnection('100.127.255.1', 3128, context=ctx, timeout=10)
c.set_tunnel('allowed.test', 443)
c.request('GET', '/secure')
r = c.getresponse()
out['status'], out['body'] = r.status, r.read().decode()
""")
        assert got == {"status": 200,
                       "body": f"hello from {internet.allowed} for allowed.test /secure"}
    finally:
        sb.destroy()
    allowed = events_of(events, decision="allow")
    assert [(e["mode"], e["name"], e["address"], e["port"]) for e in allowed] == [
        ("http", "allowed.test", internet.allowed, 80),
        ("connect", "allowed.test", internet.allowed, 443)]
    assert all(e["bytes_in"] > 0 and e["bytes_out"] > 0 and e["duration_s"] >= 0
               for e in allowed)


def test_raw_tcp_and_transparent_tls_to_an_allowed_name(internet):
    """Programs that ignore proxy variables: resolved by the sandbox resolver, then
    steered; a raw protocol is allowed through the DNS answer, TLS through its SNI."""
    sb, events = sandbox(internet, "allowed.test")
    try:
        got = run_py(sb, """
addr = socket.gethostbyname('allowed.test')
s = socket.create_connection((addr, 7000), timeout=10)
s.sendall(b'ping')
out['addr'], out['reply'] = addr, s.recv(100).decode()
import ssl
ctx = ssl.create_default_context(cafile='/certs/cert.pem')
with socket.create_connection((addr, 443), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname='allowed.test') as tls:
        tls.sendall(b'GET /tls HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n')
        out['tls'] = tls.recv(4096).decode().split('\\r\\n\\r\\n')[-1]
""")
    finally:
        sb.destroy()
    assert got == {"addr": internet.allowed, "reply": "echo:ping",
                   "tls": f"hello from {internet.allowed} for allowed.test /tls"}
    allowed = events_of(events, decision="allow")
    assert sorted((e["mode"], e["name"], e["port"], e.get("pinned", False))
                  for e in allowed) == [("transparent", "allowed.test", 443, False),
                                        ("transparent", "allowed.test", 7000, True)]
    dns = events_of(events, "net.dns", "allow")
    assert dns and dns[0]["answers"] == [internet.allowed]


DENIALS = {
    "raw IP not in the list": ("""
try:
    s = socket.create_connection(({other!r}, 7000), timeout=10)
    s.sendall(b'ping')
    out['reply'] = s.recv(100).decode()
except OSError as e:
    out['error'] = type(e).__name__
""", {"error": "ConnectionResetError"},
        ("net.connect", "transparent", "", 7000, "no rule allows {other}:7000")),
    "plain HTTP to an unlisted host": (
        HTTP_GET.format(url="http://other.test/x"),
        {"status": 403, "body": "corral: egress denied: no rule allows other.test:80\n"},
        ("net.connect", "http", "other.test", 80, "no rule allows other.test:80")),
    "allowed name with a forged Host": ("""
s = socket.create_connection(({other!r}, 80), timeout=10)
s.sendall(b'GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n')
try:
    out['reply'] = s.recv(100).decode()
except OSError as e:
    out['error'] = type(e).__name__
""", {"error": "ConnectionResetError"},
        ("net.connect", "transparent", "allowed.test", 80,
         "{other} is not an address of allowed.test (forged name)")),
    "DNS for an unlisted name": ("""
try:
    out['addr'] = socket.gethostbyname('other.test')
except socket.gaierror as e:
    out['error'] = e.errno == socket.EAI_NONAME
""", {"error": True}, ("net.dns", "dns", "other.test", 53, "no rule allows 'other.test'")),
    "UDP to anything": ("""
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b'exfil', ({allowed!r}, 9999))
out['sent'] = True
""", {"sent": True}, ("net.udp", "udp", None, 9999,
                       "UDP is dropped (only DNS to the sandbox resolver)")),
    "the metadata address by name": (
        HTTP_GET.format(url="http://metadata.test/latest/meta-data/"),
        {"status": 403, "body": "corral: egress denied: 169.254.169.254 is a non-public "
                                "address (link-local)\n"},
        ("net.connect", "http", "metadata.test", 80,
         "169.254.169.254 is a non-public address (link-local)")),
    "the metadata address raw": ("""
try:
    s = socket.create_connection(('169.254.169.254', 80), timeout=10)
    s.sendall(b'GET /latest/meta-data/ HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\n\\r\\n')
    out['reply'] = s.recv(100).decode()
except OSError as e:
    out['error'] = type(e).__name__
""", {"error": "ConnectionResetError"},
        ("net.connect", "transparent", "", 80, "no rule allows 169.254.169.254:80")),
    "an unlisted SNI sent to an allowed name's address": ("""
import ssl
ctx = ssl.create_default_context(cafile='/certs/cert.pem')
try:
    with socket.create_connection(({allowed!r}, 443), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname='other.test') as tls:
            out['reply'] = tls.recv(100).decode()
except OSError as e:
    out['error'] = type(e).__name__
""", {"error": "ConnectionResetError"},
        ("net.connect", "transparent", "other.test", 443, "no rule allows other.test:443")),
    "an allowed name on a port its rule does not list": ("""
s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
s.sendall(b'CONNECT allowed.test:7000 HTTP/1.1\\r\\n\\r\\n')
out['reply'] = s.recv(200).decode().split('\\r\\n')[0]
""", {"reply": "HTTP/1.1 403 Forbidden"},
        ("net.connect", "connect", "allowed.test", 7000, "no rule allows allowed.test:7000")),
    "not an HTTP proxy request": ("""
s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
s.sendall(b'\\x00\\x01garbage\\r\\n\\r\\n')
out['reply'] = s.recv(200).decode().split('\\r\\n')[0]
""", {"reply": "HTTP/1.1 400 Bad Request"},
        ("net.connect", "proxy", "", 3128, "not an HTTP proxy request")),
}


@pytest.mark.parametrize("case", list(DENIALS))
def test_denied_and_reported(internet, case):
    code, expected, (kind, mode, name, port, reason) = DENIALS[case]
    sb, events = sandbox(internet, "allowed.test:80", "allowed.test:443", "metadata.test")
    try:
        got = run_py(sb, code.format(other=internet.other, allowed=internet.allowed))
        assert got == expected
        denied = wait_events(events, 1, kind)
    finally:
        sb.destroy()
    assert len(denied) == 1, events
    e = denied[0]
    assert (e["decision"], e["mode"], e["port"], e["reason"]) == (
        "deny", mode, port, reason.format(other=internet.other))
    if name is not None:
        assert e["name"] == name
    assert not internet.udp_received
    assert all(seen[0] != internet.other for seen in internet.http_seen)


def test_daemon_port_is_protected_even_when_its_address_is_allowed(internet):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    proxy.shared_proxy().protect("127.0.0.1", port)
    sb, events = sandbox(internet, "127.0.0.1")
    try:
        got = run_py(sb, f"""
s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
s.sendall(b'CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n')
out['reply'] = s.recv(200).decode().split('\\r\\n')[0]
""")
    finally:
        sb.destroy()
        listener.close()
    assert got == {"reply": "HTTP/1.1 403 Forbidden"}
    (e,) = events_of(events, decision="deny")
    assert e["reason"] == f"127.0.0.1:{port} is a protected endpoint"


@contextlib.contextmanager
def host_listener(address: str):
    """A listener on this host (never accepted from: a connection that got through waits in
    its backlog, where the test finds it)."""
    listener = socket.socket()
    listener.bind((address, 0))
    listener.listen()
    listener.setblocking(False)
    try:
        yield listener, listener.getsockname()[1]
    finally:
        listener.close()


def reached(listener) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@contextlib.contextmanager
def upstream_also(*networks: str):
    """Widen the test proxy's upstream confinement for one test (the 0.0.0.0/8 spelling of
    this host), as an operator who never set CORRAL_EGRESS_UPSTREAM_ONLY would have it."""
    import ipaddress

    cfg = proxy.shared_proxy().config
    saved = cfg.upstream_only
    cfg.upstream_only = saved + tuple(ipaddress.ip_network(n) for n in networks)
    try:
        yield
    finally:
        cfg.upstream_only = saved


CONNECT_TO = """
s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
s.sendall(b'CONNECT {target} HTTP/1.1\\r\\n\\r\\n')
out['reply'] = s.recv(300).decode()
"""


def test_the_daemon_port_is_refused_at_0_0_0_0_under_an_allow_everything_rule(internet):
    """Issue 18.4: Linux connects 0.0.0.0 to this host, so CONNECT 0.0.0.0:PORT with
    allow_net=["0.0.0.0/0"] reached the protected daemon port on 127.0.0.1."""
    with host_listener("127.0.0.1") as (listener, port), upstream_also("0.0.0.0/8"):
        proxy.shared_proxy().protect("127.0.0.1", port)
        sb, events = sandbox(internet, "0.0.0.0/0")
        try:
            got = [run_py(sb, CONNECT_TO.format(target=f"{target}:{port}"))["reply"]
                   for target in ("0.0.0.0", "0.0.0.9", "[::ffff:127.0.0.1]")]
        finally:
            sb.destroy()
        assert not reached(listener)
    reason = f"127.0.0.1:{port} is a protected endpoint"
    body = f"corral: egress denied: {reason}\n"
    assert got == [f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: "
                   f"{len(body)}\r\nConnection: close\r\n\r\n{body}"] * 3
    assert [e["reason"] for e in events_of(events, decision="deny")] == [reason] * 3


def test_wide_rules_do_not_reach_host_loopback_services(internet):
    """An unprotected service on 127.0.0.1 (a host's redis, say) is not reached by
    0.0.0.0/0, whether asked for as 0.0.0.0 or 127.0.0.1."""
    with host_listener("127.0.0.1") as (listener, port), upstream_also("0.0.0.0/8"):
        sb, events = sandbox(internet, "0.0.0.0/0")
        try:
            got = [run_py(sb, CONNECT_TO.format(target=f"{target}:{port}"))["reply"]
                   .split("\r\n")[0] for target in ("0.0.0.0", "127.0.0.1")]
        finally:
            sb.destroy()
        assert not reached(listener)
    assert got == ["HTTP/1.1 403 Forbidden"] * 2
    assert [e["reason"] for e in events_of(events, decision="deny")] == [
        f"no rule allows 127.0.0.1:{port}"] * 2


def test_the_host_own_address_is_not_reached_through_a_network_rule(internet):
    """The host's side of the test link ({subnet}.2) is an address of this host: a rule for
    the whole /24 (and the routable range) reaches the servers there, not the host."""
    host_address = internet.subnet.rsplit(".", 1)[0] + ".2"
    with host_listener(host_address) as (listener, port):
        sb, events = sandbox(internet, internet.subnet)
        try:
            got = run_py(sb, CONNECT_TO.format(target=f"{host_address}:{port}") + f"""
try:
    t = socket.create_connection(({host_address!r}, {port}), timeout=10)
    t.sendall(b'x')
    out['raw'] = t.recv(10).decode()
except OSError as e:
    out['raw'] = type(e).__name__
""")
        finally:
            sb.destroy()
        assert not reached(listener)
    assert got["reply"].split("\r\n")[0] == "HTTP/1.1 403 Forbidden"
    assert got["raw"] == "ConnectionResetError"
    assert sorted((e["mode"], e["reason"]) for e in events_of(events, decision="deny")) == [
        ("connect", f"no rule allows {host_address}:{port}"),
        ("transparent", f"no rule allows {host_address}:{port}")]


RELAY = """
import socket, threading
srv = socket.socket(); srv.bind(('127.0.0.1', 8888)); srv.listen()
def pump(a, b):
    try:
        while (d := a.recv(65536)):
            b.sendall(d)
    except OSError:
        pass
    b.close()
def serve():
    while True:
        c, _ = srv.accept()
        u = socket.create_connection(('100.127.255.1', 3128))
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        threading.Thread(target=pump, args=(u, c), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
import sys; print('ready', flush=True); sys.stdin.read()
"""


def test_connect_relayed_through_a_second_process_is_still_checked(internet):
    sb, events = sandbox(internet, "allowed.test")
    try:
        relay = sb.exec(["python3", "-I", "-c", RELAY])
        assert relay.stdout.readline() == b"ready\n"
        got = run_py(sb, """
s = socket.create_connection(('127.0.0.1', 8888), timeout=10)
s.sendall(b'CONNECT other.test:443 HTTP/1.1\\r\\nHost: other.test:443\\r\\n\\r\\n')
out['reply'] = s.recv(200).decode().split('\\r\\n')[0]
""")
        relay.kill()
        relay.communicate()
    finally:
        sb.destroy()
    assert got == {"reply": "HTTP/1.1 403 Forbidden"}
    (e,) = events_of(events, decision="deny")
    assert (e["mode"], e["name"], e["reason"]) == (
        "connect", "other.test", "no rule allows other.test:443")


LINKS = "out['links'] = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev')" \
        ".read().splitlines()[2:])"


def test_link_and_namespace_are_gone_after_destroy(internet):
    sb, events = sandbox(internet, "allowed.test")
    try:
        inode = sb.egress.egress_ns_inode
        assert egress_refs(inode)  # the namespace fd and the proxy's two sockets
        got = run_py(sb, LINKS + """
out['route'] = open('/proc/net/route').read().split('\\n')[1].split()[:3]
""")
    finally:
        sb.destroy()
    assert got == {"links": ["eth0", "lo"], "route": ["eth0", "00000000", "01FF7F64"]}
    assert egress_refs(inode) == []
    assert proxy.shared_proxy().connections(sb.id) == 0
    assert len(events_of(events, "net.summary")) == 1


def test_no_allow_net_means_no_link_at_all():
    sb = Sandbox(SandboxSpec(memory_bytes=256 * MiB, timeout_s=30))
    sb.start()
    try:
        assert sb.egress is None
        got = run_py(sb, LINKS + "\nimport os\nout['proxy'] = os.environ.get('https_proxy')")
    finally:
        sb.destroy()
    assert got == {"links": ["lo"], "proxy": None}


def test_wildcards_and_address_rules(internet):
    """*.test allows names below test; an address rule allows a raw connection that the
    routable range alone (name rules only) does not."""
    sb, events = sandbox(internet, "*.test:80", f"{internet.other}:7000")
    try:
        got = run_py(sb, HTTP_GET.format(url="http://other.test/w") + f"""
s = socket.create_connection(({internet.other!r}, 7000), timeout=10)
s.sendall(b'raw')
out['raw'] = s.recv(100).decode()
try:
    s2 = socket.create_connection(({internet.allowed!r}, 7000), timeout=10)
    s2.sendall(b'raw')
    out['raw2'] = s2.recv(100).decode()
except OSError as e:
    out['raw2'] = type(e).__name__
""")
    finally:
        sb.destroy()
    assert got == {"status": 200, "body": f"hello from {internet.other} for other.test /w",
                   "raw": "echo:raw", "raw2": "ConnectionResetError"}
    decided = sorted((e["decision"], e["port"], e["address"], e["rule"])
                     for e in events_of(events))
    assert decided == [("allow", 80, internet.other, "*.test:80"),
                       ("allow", 7000, internet.other, f"{internet.other}:7000"),
                       ("deny", 7000, internet.allowed, "")]


def test_udp_denials_are_capped_and_counted(internet):
    sb, events = sandbox(internet, "allowed.test")
    try:
        run_py(sb, f"""
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(100):
    u.sendto(b'%d' % i, ({internet.allowed!r}, 9999))
import time; time.sleep(0.3)
""")
    finally:
        sb.destroy()
    assert len(events_of(events, "net.udp")) == 64
    (summary,) = events_of(events, "net.summary")
    assert (summary["denied"], summary["suppressed"]) == (100, 36)
    assert not internet.udp_received


def test_a_second_request_on_a_proxy_connection_cannot_ride_the_first(internet):
    sb, events = sandbox(internet, "allowed.test")
    seen_before = len(internet.http_seen)
    try:
        got = run_py(sb, """
s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
s.sendall(b'GET http://allowed.test/1 HTTP/1.1\\r\\nHost: allowed.test\\r\\n'
          b'Connection: keep-alive\\r\\n\\r\\n'
          b'GET http://other.test/2 HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n')
data = b''
while (chunk := s.recv(4096)):
    data += chunk
out['responses'] = data.count(b'HTTP/1.1 200')
out['body'] = data.split(b'\\r\\n\\r\\n', 1)[1].decode()
""")
    finally:
        sb.destroy()
    assert got == {"responses": 1,
                   "body": f"hello from {internet.allowed} for allowed.test /1"}
    assert internet.http_seen[seen_before:] == [(internet.allowed, "allowed.test", "/1")]


def test_the_sandbox_cannot_rewire_its_link_or_spoof(internet):
    """Root inside holds no capabilities: its routes stay, raw sockets are refused, so the
    only way out stays the proxy."""
    sb, _ = sandbox(internet, "allowed.test")
    try:
        got = run_py(sb, """
import errno, struct
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
rtmsg = struct.pack('BBBBBBBBI', socket.AF_INET, 0, 0, 0, 254, 0, 0, 0, 0)
nl.send(struct.pack('IHHII', 16 + len(rtmsg), 25, 1 | 4, 1, 0) + rtmsg)  # RTM_DELROUTE
reply = nl.recv(4096)
out['delroute'] = errno.errorcode.get(-struct.unpack_from('i', reply, 16)[0])
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    out['raw'] = 'ok'
except OSError as e:
    out['raw'] = errno.errorcode[e.errno]
out['route'] = open('/proc/net/route').read().split('\\n')[1].split()[:3]
""")
    finally:
        sb.destroy()
    assert got == {"delroute": "EPERM", "raw": "EPERM",
                   "route": ["eth0", "00000000", "01FF7F64"]}


def test_curl_through_the_proxy_and_transparently(internet):
    """The real client: curl with the proxy variables (HTTP, HTTPS CONNECT) and with
    --noproxy (its own DNS lookup through the sandbox resolver, then steered)."""
    sb, events = sandbox(internet, "allowed.test")
    try:
        outputs = []
        for args in (["http://allowed.test/c1"],
                     ["--cacert", "/certs/cert.pem", "https://allowed.test/c2"],
                     ["--noproxy", "*", "http://allowed.test/c3"],
                     ["--noproxy", "*", "--cacert", "/certs/cert.pem",
                      "https://allowed.test/c4"],
                     ["-o", "/dev/null", "-w", "%{http_code}", "http://other.test/c5"]):
            proc = sb.exec(["curl", "-sS", "--max-time", "10", *args])
            out, err = proc.communicate()
            outputs.append((proc.returncode, out.decode(), err.decode()))
    finally:
        sb.destroy()
    hello = f"hello from {internet.allowed} for allowed.test"
    assert outputs == [(0, f"{hello} /c1", ""), (0, f"{hello} /c2", ""),
                       (0, f"{hello} /c3", ""), (0, f"{hello} /c4", ""), (0, "403", "")]
    modes = sorted((e["mode"], e["decision"]) for e in events_of(events))
    assert modes == [("connect", "allow"), ("http", "allow"), ("http", "deny"),
                     ("transparent", "allow"), ("transparent", "allow")]


def test_two_sandboxes_two_policies(internet):
    a, events_a = sandbox(internet, "allowed.test")
    b, events_b = sandbox(internet, "other.test")
    try:
        code = "\n".join(HTTP_GET.format(url=f"http://{name}/two").replace(
            "out['status'], out['body']", f"out['{name}']")
            for name in ("allowed.test", "other.test"))
        got_a, got_b = run_py(a, code), run_py(b, code)
    finally:
        a.destroy()
        b.destroy()
    assert got_a["allowed.test"][0] == 200 and got_a["other.test"][0] == 403
    assert got_b["allowed.test"][0] == 403 and got_b["other.test"][0] == 200
    assert {e["sandbox_id"] for e in events_a} == {a.id}
    assert {e["sandbox_id"] for e in events_b} == {b.id}
