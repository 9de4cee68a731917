"""The secrets tests' own "internet": TLS servers with their own CA, in a test-made netns.

`api.test` (.10) is the host the tests bind their secret to; `other.test` (.11) is allowed
but bound to nothing. Every server records every byte it receives (`Servers.received`),
so a test can prove that a value or placeholder never arrived where it must not:

  80   HTTP: answers 200 with a JSON echo of the request (method, path, headers, body)
  443  TLS (a leaf of the test CA for api.test and other.test): the same echo; the
       response also carries the Authorization header back as `X-Echo-Auth`
  7000 raw TCP: reads until EOF, answers "got N bytes"

The in-process proxy resolves the names through its hosts map, may reach the subnet
(routable), connects nowhere else (upstream_only) and verifies the servers with the test
CA (upstream_ca_file), never with verification off.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corral.sandbox import net, proxy

from ..egress.conftest import _read_head, _serve, no_egress_leftovers  # noqa: F401
from ..hostnet import free_octet
from ..linux.conftest import cgroup_layout, no_leftovers  # noqa: F401 (fixtures)

#: The value the tests' secret holds; it must never be seen inside a sandbox.
SECRET_VALUE = "sk-live-7f3a9c1e5b2d4068a1c3e5f7091b2d4f"


def pytest_collection_modifyitems(config, items):
    """What uses the test servers needs root (namespaces, veths, BPF); without it, skip."""
    if os.geteuid() == 0:
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="the secrets servers need root (netns, veth, BPF)")
    for item in items:
        if here in item.path.resolve().parents and "servers" in getattr(
                item, "fixturenames", ()):
            item.add_marker(skip)


@dataclass
class Servers:
    subnet: str
    api: str  # address of api.test (the secret's host)
    other: str  # address of other.test (allowed, bound to nothing)
    ca_file: str  # the test CA (the proxy verifies the servers with it)
    hosts_file: str
    received: list = field(default_factory=list)  # (server, bytes) for every connection

    def all_received(self) -> bytes:
        return b"\n".join(data for _, data in list(self.received))


def make_ca(directory: Path, names: list[str]) -> tuple[str, str, str]:
    """A test CA and a server leaf for names: (ca.pem, leaf.pem, leaf-key.pem) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secrets test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "leaf.pem", directory / "leaf-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return tuple(str(p) for p in paths)


def _read_request(conn) -> bytes:
    """A whole HTTP/1.1 request: the head and a Content-Length or chunked body."""
    data = _read_head(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    elif b"transfer-encoding: chunked" in lower:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return head + b"\r\n\r\n" + body


def _echo_http(servers: Servers, label: str, conn) -> None:
    """Answer one request with a JSON echo of it (and its Authorization as a header)."""
    request = _read_request(conn)
    servers.received.append((label, request))
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    echo = json.dumps({"request": lines[0], "headers": headers,
                       "body": body.decode("latin-1")}).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Echo-Auth: "
                 + auth.encode("latin-1") + b"\r\nContent-Length: %d\r\nConnection: close"
                 b"\r\n\r\n" % len(echo) + echo)


def _raw(servers: Servers, conn) -> None:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    servers.received.append(("raw", data))
    conn.sendall(b"got %d bytes" % len(data))


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the secrets tests need root")
    octet = free_octet("csec", "10.214")
    subnet = f"10.214.{octet}"
    host_if = f"csec{octet}"
    root = tmp_path_factory.mktemp("secrets-internet")
    ca_file, leaf, leaf_key = make_ca(root, ["api.test", "other.test"])
    hosts = root / "hosts"
    hosts.write_text(f"{subnet}.10 api.test\n{subnet}.11 other.test\n")
    found = Servers(subnet + ".0/24", f"{subnet}.10", f"{subnet}.11", ca_file, str(hosts))

    def build():
        ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        host_ns = os.open(f"/proc/{os.getpid()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="sec0", kind="veth", peer={"ifname": host_if})
            idx = ipr.link_lookup(ifname="sec0")[0]
            for last in (1, 10, 11):
                ipr.addr("add", index=idx, address=f"{subnet}.{last}", prefixlen=24)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname=host_if)[0], net_ns_fd=host_ns)
        os.close(host_ns)
        socks = {}
        for port in (80, 443, 7000):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(64)
            socks[port] = s
        return ns_fd, socks

    ns_fd, socks = net.in_netns(None, build)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.addr("add", index=idx, address=f"{subnet}.2", prefixlen=24)
        ipr.link("set", index=idx, state="up")
    tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ctx.load_cert_chain(leaf, leaf_key)

    def https(conn):
        with tls_ctx.wrap_socket(conn, server_side=True) as tls:
            _echo_http(found, "https", tls)

    handlers = {80: lambda c: _echo_http(found, "http", c), 443: https,
                7000: lambda c: _raw(found, c)}
    stop = threading.Event()
    threads = [threading.Thread(target=_serve, args=(socks[p], h, stop), daemon=True)
               for p, h in handlers.items()]
    for t in threads:
        t.start()
    cfg = proxy.shared_proxy().config
    saved = (cfg.hosts, cfg.routable, cfg.upstream_only, cfg.upstream_ca_file)
    cfg.hosts = {**cfg.hosts, **proxy.parse_hosts(hosts.read_text())}
    cfg.routable = (*cfg.routable, ipaddress.ip_network(found.subnet))
    cfg.upstream_only = (*(cfg.upstream_only or (ipaddress.ip_network("127.0.0.0/8"),)),
                         ipaddress.ip_network(found.subnet))
    cfg.upstream_ca_file, cfg._upstream_tls = ca_file, None
    try:
        yield found
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        for s in socks.values():
            s.close()
        os.close(ns_fd)
        cfg.hosts, cfg.routable, cfg.upstream_only, cfg.upstream_ca_file = saved
        cfg._upstream_tls = None
        with contextlib.suppress(OSError):
            shutil.rmtree(root)


def cli_env(found: Servers) -> dict[str, str]:
    """Environment for a `corral` subprocess whose proxy knows the test servers."""
    return {**os.environ, "CORRAL_EGRESS_HOSTS": found.hosts_file,
            "CORRAL_EGRESS_ROUTABLE": found.subnet,
            "CORRAL_EGRESS_UPSTREAM_ONLY": f"{found.subnet},127.0.0.0/8",
            "CORRAL_EGRESS_UPSTREAM_CA": found.ca_file}


def events_when(events: list, predicate, least: int = 1) -> list:
    """The events matching predicate, once at least `least` have come: a connection's
    record is emitted when the proxy has closed it, which may be just after the client
    has its answer (waits up to 10 s, then returns what there is for the test to judge)."""
    end = time.monotonic() + 10
    while True:
        found = [e for e in list(events) if predicate(e)]
        if len(found) >= least or time.monotonic() > end:
            return found
        time.sleep(0.02)
