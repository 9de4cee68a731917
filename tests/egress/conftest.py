"""The egress tests' own "internet", and the leak checks for egress links.

`internet` is a network namespace this test process makes (anonymous: it lives as long as
the process holds its servers), joined to the host by a veth pair on a private /24 that
nothing else uses. Its servers answer on every address of that subnet:

  80   HTTP: replies "hello from <address the client reached> for <Host> <path>"
  443  TLS (a self-signed certificate for allowed.test made here with openssl)
  7000 raw TCP: replies "echo:" + what it read
  9999 UDP: records every datagram it receives (nothing may ever arrive)

The proxy resolves allowed.test -> .10, other.test -> .11, metadata.test ->
169.254.169.254 through its hosts map, and the subnet is declared routable (a non-public
range that name rules may reach; raw connections still need an address rule).
Nothing here ever sends a packet beyond this machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.sandbox import net, proxy

from ..hostnet import free_octet
from ..linux.conftest import cgroup_layout, no_leftovers  # noqa: F401 (fixtures)


def pytest_collection_modifyitems(config, items):
    """Everything here needs root (namespaces, veths, BPF); without it, skip."""
    if os.geteuid() == 0:
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="tests/egress need root (netns, veth, BPF sk_lookup)")
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


@dataclass
class Internet:
    subnet: str
    allowed: str  # address of allowed.test
    other: str  # address of other.test (not allowed)
    hosts_file: str
    cert_dir: str
    host_ifname: str
    udp_received: list = field(default_factory=list)
    http_seen: list = field(default_factory=list)


def _serve(listener: socket.socket, handler, stop: threading.Event) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except (TimeoutError, OSError):
            continue
        threading.Thread(target=_guard, args=(handler, conn), daemon=True).start()


def _guard(handler, conn) -> None:
    with contextlib.suppress(OSError, ssl.SSLError), conn:
        conn.settimeout(10)
        handler(conn)


def _read_head(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="session")
def internet(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the egress tests need root")
    octet = free_octet("cinet", "10.213")
    subnet = f"10.213.{octet}"
    host_if = f"cinet{octet}"
    root = tmp_path_factory.mktemp("internet")
    cert_dir = root / "certs"
    cert_dir.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(cert_dir / "key.pem"), "-out", str(cert_dir / "cert.pem"),
         "-days", "2", "-subj", "/CN=allowed.test", "-addext", "subjectAltName=DNS:allowed.test"],
        check=True, capture_output=True)
    os.chmod(cert_dir, 0o755)
    os.chmod(cert_dir / "cert.pem", 0o644)
    hosts = root / "hosts"
    hosts.write_text(f"{subnet}.10 allowed.test\n{subnet}.11 other.test\n"
                     "169.254.169.254 metadata.test\n")
    inet = Internet(subnet + ".0/24", f"{subnet}.10", f"{subnet}.11", str(hosts),
                    str(cert_dir), host_if)

    def build():
        ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        host_ns = os.open(f"/proc/{os.getpid()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.link("add", ifname="inet0", kind="veth", peer={"ifname": host_if})
            idx = ipr.link_lookup(ifname="inet0")[0]
            for last in (1, 10, 11):
                ipr.addr("add", index=idx, address=f"{subnet}.{last}", prefixlen=24)
            ipr.link("set", index=idx, state="up")
            peer = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=peer, net_ns_fd=host_ns)
        os.close(host_ns)
        socks = {}
        for port in (80, 443, 7000):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(64)
            socks[port] = s
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 9999))
        socks["udp"] = udp
        return ns_fd, socks

    ns_fd, socks = net.in_netns(None, build)

    def host_side():
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=idx, address=f"{subnet}.2", prefixlen=24)
            ipr.link("set", index=idx, state="up")

    host_side()

    def http(conn):
        head = _read_head(conn)
        host = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                     if line.lower().startswith(b"host:")), b"")
        path = head.split(b" ")[1] if b" " in head else b""
        inet.http_seen.append((conn.getsockname()[0], host.decode(), path.decode()))
        body = b"hello from %s for %s %s" % (conn.getsockname()[0].encode(), host, path)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))

    tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")

    def https(conn):
        with tls_ctx.wrap_socket(conn, server_side=True) as tls:
            http(tls)

    def echo(conn):
        data = conn.recv(4096)
        conn.sendall(b"echo:" + data)

    stop = threading.Event()
    threads = [threading.Thread(target=_serve, args=(socks[p], h, stop), daemon=True)
               for p, h in ((80, http), (443, https), (7000, echo))]

    def udp_loop():
        socks["udp"].settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                inet.udp_received.append(socks["udp"].recvfrom(4096))

    threads.append(threading.Thread(target=udp_loop, daemon=True))
    for t in threads:
        t.start()
    # The in-process proxy (Sandbox API tests) resolves the test names and may reach them.
    cfg = proxy.shared_proxy().config
    cfg.hosts = proxy.parse_hosts(hosts.read_text())
    cfg.routable = (ipaddress.ip_network(inet.subnet),)
    # Even a policy bug could not make this proxy connect anywhere but to our servers.
    cfg.upstream_only = (ipaddress.ip_network(inet.subnet),
                         ipaddress.ip_network("127.0.0.0/8"))
    try:
        yield inet
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        for s in socks.values():
            s.close()
        os.close(ns_fd)  # the namespace dies, and with it both ends of the veth
        shutil.rmtree(root, ignore_errors=True)


def cli_env(inet: Internet) -> dict[str, str]:
    """Environment for a `corral` subprocess whose proxy knows the test internet."""
    return {**os.environ, "CORRAL_EGRESS_HOSTS": inet.hosts_file,
            "CORRAL_EGRESS_ROUTABLE": inet.subnet,
            "CORRAL_EGRESS_UPSTREAM_ONLY": f"{inet.subnet},127.0.0.0/8"}


def host_links() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def egress_refs(inode: int) -> list[str]:
    """Descriptors of this process that still hold the network namespace `inode`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        path = f"/proc/self/fd/{fd}"
        with contextlib.suppress(OSError):
            target = os.readlink(path)
            if target == f"net:[{inode}]":
                found.append(f"fd {fd}: namespace")
            elif target.startswith("socket:"):
                s = socket.socket(fileno=os.dup(int(fd)))
                try:
                    if net.socket_netns_inode(s) == inode:
                        found.append(f"fd {fd}: {target}")
                finally:
                    s.close()
    return found


@pytest.fixture(autouse=True)
def no_egress_leftovers(request):
    """No test may add an interface to the host or keep an egress namespace alive."""
    before = host_links()
    yield
    after = host_links()
    new = sorted(after - before)
    if new:
        pytest.fail(f"{request.node.nodeid} left host interfaces behind: {new}", pytrace=False)
