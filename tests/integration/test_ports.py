"""Exposed ports (Sandboxes.ExposePort): a host listener on 127.0.0.1 forwarding each
connection to 127.0.0.1:PORT inside the sandbox's own network namespace."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import DaemonProcess, collect_exec, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

#: 5 MiB, the same bytes inside and out (made inside by the same expression).
BIG = bytes(range(256)) * (5 * 4096)
MAKE_BIG = ("import sys; open('/workspace/www/big.bin', 'wb')"
            ".write(bytes(range(256)) * (5 * 4096))")
ECHO = r"""
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 9000)); srv.listen(16)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
PROBE = ("import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 2)"
         ".close()\nexcept OSError as e:\n    print(type(e).__name__); sys.exit(3)\n")


@pytest.fixture(scope="module")
def pdaemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("ports"),
                      config="[policy]\nmax_exposed_ports = 3\n").start()
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    assert d.leftovers() == {}


@pytest.fixture(scope="module")
def acme(pdaemon):
    return pdaemon.client(tenant="acme")


def _run(client, sb_id: str, argv: list[str]):
    return collect_exec(client.exec(sb_id, argv))


def _background(client, sb_id: str, argv: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: collect_exec(client.exec(sb_id, argv)), daemon=True)
    t.start()
    return t


def _wait_listening(client, sb_id: str, port: int) -> None:
    assert wait_until(lambda: _run(client, sb_id, ["python3", "-c", PROBE.format(port=port)])
                      .returncode == 0, timeout_s=30, interval_s=0.2)


@pytest.fixture
def served(acme):
    """A sandbox of tenant acme running an HTTP server on 8080 (with a 5 MiB file) and an
    echo server on 9000, both on its own loopback."""
    sb = acme.create_sandbox(memory_bytes=256 << 20)
    assert _run(acme, sb.id, ["mkdir", "-p", "/workspace/www"]).returncode == 0
    assert _run(acme, sb.id, ["python3", "-c", MAKE_BIG]).returncode == 0
    _background(acme, sb.id, ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1",
                              "--directory", "/workspace/www"])
    _background(acme, sb.id, ["python3", "-c", ECHO])
    _wait_listening(acme, sb.id, 8080)
    _wait_listening(acme, sb.id, 9000)
    yield sb
    with contextlib.suppress(ClientError):
        acme.destroy_sandbox(sb.id)


def _details(d, kind: str, sandbox_id: str) -> list[dict]:
    """The records' details, less the policy digest every record carries."""
    out = []
    for r in d.records(kind):
        if r.sandbox_id == sandbox_id:
            detail = json.loads(r.detail_json)
            detail.pop("corral.policy", None)
            out.append(detail)
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fetch(address: str, path: str = "/big.bin") -> bytes:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as resp:
        return resp.read()


def _echo(port: int, data: bytes) -> bytes:
    """Send data, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := s.recv(1 << 20):
            got += chunk
        sender.join()
    return bytes(got)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _code(fn) -> tuple[str, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code.name, str(exc.value)


def test_expose_fetch_echo_concurrent_then_unexpose(pdaemon, acme, served):
    # one expose first: the event loop's one-time descriptors then exist (on uvloop, libuv
    # keeps a /dev/null descriptor for its EMFILE handling from the first listener on)
    warm = acme.expose_port(served.id, 7000)
    acme.unexpose_port(served.id, warm.port)
    baseline = _fds(pdaemon.pid)
    web = acme.expose_port(served.id, 8080)
    assert (web.host_address, web.port, web.sandbox_id) == ("127.0.0.1", 8080, served.id)
    assert 0 < web.host_port < 65536
    echo = acme.expose_port(served.id, 9000)
    address = f"127.0.0.1:{web.host_port}"

    assert _fetch(address) == BIG  # download direction, byte-exact
    assert _echo(echo.host_port, BIG) == BIG  # upload direction + half-close

    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(_fetch(address)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [BIG, BIG]

    listed = {p.port: p for p in acme.list_ports(served.id)}
    assert sorted(listed) == [8080, 9000]
    assert listed[8080].host_port == web.host_port and listed[8080].connections == 3

    # an open connection is closed by the unexpose
    held = socket.create_connection(("127.0.0.1", echo.host_port), timeout=30)
    held.sendall(b"ping")
    assert held.recv(4) == b"ping"
    gone = acme.unexpose_port(served.id, 9000)
    assert gone.connections == 2
    assert held.recv(10) == b""  # EOF (or reset) once the forward is gone
    held.close()
    acme.unexpose_port(served.id, 8080)
    assert _refused(web.host_port) and _refused(echo.host_port)
    assert acme.list_ports(served.id) == []
    assert wait_until(lambda: _fds(pdaemon.pid) == baseline, timeout_s=10), \
        (_fds(pdaemon.pid), baseline)

    expose = _details(pdaemon, "sandbox.port.expose", served.id)
    assert expose[0] == {"port": 7000, "host_address": "127.0.0.1", "host_port": warm.host_port}
    expose = expose[1:]
    assert expose == [{"port": 8080, "host_address": "127.0.0.1", "host_port": web.host_port},
                      {"port": 9000, "host_address": "127.0.0.1",
                       "host_port": echo.host_port}]
    unexpose = _details(pdaemon, "sandbox.port.unexpose", served.id)[1:]  # the warm one first
    assert unexpose == [
        {"port": 9000, "host_port": echo.host_port, "connections": 2, "reason": "requested"},
        {"port": 8080, "host_port": web.host_port, "connections": 3, "reason": "requested"}]


def test_destroy_closes_listener_and_connections(pdaemon, acme):
    before = _fds(pdaemon.pid)
    sb = acme.create_sandbox(memory_bytes=256 << 20)
    _background(acme, sb.id, ["python3", "-c", ECHO])
    _wait_listening(acme, sb.id, 9000)
    exposed = acme.expose_port(sb.id, 9000)
    held = socket.create_connection(("127.0.0.1", exposed.host_port), timeout=30)
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    acme.destroy_sandbox(sb.id)
    with contextlib.suppress(ConnectionResetError):
        assert held.recv(10) == b""
    held.close()
    assert _refused(exposed.host_port)
    assert wait_until(lambda: _fds(pdaemon.pid) == before, timeout_s=15), \
        (_fds(pdaemon.pid), before)
    [rec] = _details(pdaemon, "sandbox.port.unexpose", sb.id)
    assert rec == {"port": 9000, "host_port": exposed.host_port, "connections": 1,
                   "reason": "sandbox-destroyed"}


def test_a_closed_inner_port_resets_and_the_sandbox_cannot_reach_the_host(acme, served):
    exposed = acme.expose_port(served.id, 8081)  # nothing listens on 8081 inside
    with socket.create_connection(("127.0.0.1", exposed.host_port), timeout=30) as s:
        try:
            got = s.recv(10)
        except ConnectionResetError:
            got = b""
    assert got == b""
    # one-way: inside, the host port is the sandbox's own (empty) loopback
    inside = _run(acme, served.id, ["python3", "-c", PROBE.format(port=exposed.host_port)])
    assert (inside.returncode, inside.stdout) == (3, b"ConnectionRefusedError\n")
    acme.unexpose_port(served.id, 8081)


def test_refusals(pdaemon, acme, served):
    for kw, field in (({"port": 0}, "port"), ({"port": 65536}, "port"),
                      ({"port": 80, "host_port": 70000}, "host_port")):
        code, msg = _code(lambda kw=kw: acme.expose_port(served.id, **kw))
        assert code == "INVALID_ARGUMENT" and field + ":" in msg, msg
    code, msg = _code(lambda: acme.unexpose_port(served.id, 0))
    assert code == "INVALID_ARGUMENT" and "port:" in msg

    other = pdaemon.client(tenant="other")
    assert _code(lambda: other.expose_port("sbx-doesnotexist", 8080))[0] == "NOT_FOUND"
    assert _code(lambda: other.expose_port(served.id, 8080))[0] == "NOT_FOUND"
    assert _code(lambda: other.list_ports(served.id))[0] == "NOT_FOUND"
    web = acme.expose_port(served.id, 8080)
    assert _code(lambda: other.unexpose_port(served.id, 8080))[0] == "NOT_FOUND"

    assert _code(lambda: acme.expose_port(served.id, 8080))[0] == "ALREADY_EXISTS"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        code, msg = _code(lambda: acme.expose_port(served.id, 9000, host_port=busy))
        assert code == "FAILED_PRECONDITION" and f"host_port: 127.0.0.1:{busy}" in msg, msg
    assert _code(lambda: acme.unexpose_port(served.id, 9000))[0] == "NOT_FOUND"

    acme.expose_port(served.id, 9000)
    acme.expose_port(served.id, 9001)
    code, msg = _code(lambda: acme.expose_port(served.id, 9002))
    assert code == "RESOURCE_EXHAUSTED" and "already has 3 exposed ports" in msg \
        and "(exposed_ports = 3)" in msg, msg
    assert _fetch(f"127.0.0.1:{web.host_port}") == BIG  # what was exposed still works
    for port in (8080, 9000, 9001):
        acme.unexpose_port(served.id, port)


def _corral(d, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_SOCKET=d.socket)
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args, "--tenant", "acme"],
                          capture_output=True, env=env, timeout=60, check=False)


def test_cli_port_exposes_lists_and_removes(pdaemon, acme, served):
    with socket.socket() as probe:  # a free host port to ask for
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    made = _corral(pdaemon, "port", served.id, "8080", "--host-port", str(free))
    assert (made.returncode, made.stdout) == (0, f"127.0.0.1:{free}\n".encode()), made.stderr
    assert _fetch(f"127.0.0.1:{free}") == BIG
    listed = _corral(pdaemon, "port", served.id)
    assert (listed.returncode, listed.stdout) == (0, f"8080 -> 127.0.0.1:{free}\n".encode())
    again = _corral(pdaemon, "port", served.id, "8080")
    assert again.returncode == 1 and b"ALREADY_EXISTS" in again.stderr, again.stderr
    bad = _corral(pdaemon, "port", served.id, "0")
    assert bad.returncode == 2 and b"port: 0 is not a port" in bad.stderr, bad.stderr
    removed = _corral(pdaemon, "port", served.id, "8080", "--remove")
    assert (removed.returncode, removed.stdout) == (0, b"")
    assert _refused(free)
    assert _corral(pdaemon, "port", served.id).stdout == b""


def test_connections_per_port_are_bounded(acme, served):
    from corral.runtime.ports import MAX_CONNECTIONS_PER_PORT

    exposed = acme.expose_port(served.id, 9000)
    held = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_PORT):
            s = socket.create_connection(("127.0.0.1", exposed.host_port), timeout=30)
            s.sendall(b"hi")
            assert s.recv(2) == b"hi"
            held.append(s)
        with socket.create_connection(("127.0.0.1", exposed.host_port), timeout=30) as extra:
            try:
                got = extra.recv(10)
            except ConnectionResetError:
                got = b""
        assert got == b""  # closed on accept: the port holds its maximum
        held.pop().close()

        def one_more_echoes() -> bool:
            with socket.create_connection(("127.0.0.1", exposed.host_port), timeout=30) as s:
                try:
                    s.sendall(b"yo")
                    return s.recv(2) == b"yo"
                except (ConnectionResetError, BrokenPipeError):
                    return False
        assert wait_until(one_more_echoes, timeout_s=20, interval_s=0.1)
    finally:
        for s in held:
            s.close()
        acme.unexpose_port(served.id, 9000)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_a_reader_that_stops_holds_the_writer_back(pdaemon, acme, served):
    """Backpressure: the echo's reply is not read, so the forward stops reading the upload;
    the sender stalls with the daemon's memory flat, then everything arrives intact."""
    import select

    exposed = acme.expose_port(served.id, 9000)
    rss_before = _rss(pdaemon.pid)
    stream = memoryview(bytes(range(256)) * 257)  # bytes i of the stream is i % 256
    sent = 0
    with socket.create_connection(("127.0.0.1", exposed.host_port), timeout=30) as s:
        s.setblocking(False)
        while sent < (256 << 20):
            try:
                sent += s.send(stream[sent % 256:sent % 256 + (64 << 10)])
            except BlockingIOError:
                if not select.select([], [s], [], 2.0)[1]:
                    break  # nothing moved for 2 s: the pipeline is full
        assert sent < (256 << 20), "the forward took 256 MiB without anyone reading"
        grown = _rss(pdaemon.pid) - rss_before
        assert grown < (16 << 20), grown
        s.setblocking(True)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while data := s.recv(1 << 20):
            got += data
    assert len(got) == sent
    assert bytes(got) == (bytes(range(256)) * (sent // 256 + 1))[:sent]
    acme.unexpose_port(served.id, 9000)
