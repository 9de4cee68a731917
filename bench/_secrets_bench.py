"""Intercepted TLS (secrets) vs direct TLS: connection setup and throughput, for bench/egress.py.

A TLS server (a separate process; its certificate from a CA this bench makes) listens on
port 443 of bench/egress.py's server namespace (its SERVER_NET.10, joined to the host by a
veth pair), made again for this part. The same
stdlib client runs three ways per round, round-robin:

  direct_tls        on the host, verifying the server with the bench's CA
  passthrough_tls   in a sandbox allowed api.bench:443, no secret: today's proxy path
                    (steered, SNI read, spliced), the client verifying with the bench's CA
  intercepted       in a sandbox with secret API_TOKEN bound to api.bench: the proxy
                    terminates TLS (the sandbox's CA), swaps the placeholder in the
                    Authorization header, and verifies the server with the bench's CA

The interception's own cost is intercepted - passthrough_tls (same sandbox path, same
client); intercepted - direct_tls adds what every sandboxed connection pays anyway.

Connection setup = TCP connect + TLS handshake + one HTTP/1.1 request and its response
(so the upstream leg is really open and the header really rewritten). Throughput = one
POST of --mbytes MiB (a fixed length over the rewrite bound: streamed, scanned for other
secrets' placeholders) until the server answers with the count it received.
Downloads (DOWNLOADS) = curl fetching --mbytes MiB: on the host by HTTP/1.1, and in the
secret's sandbox by HTTP/1.1 and by h2 (the response scrubbed as it streams; the server
speaks HTTP/1.1, so h2 is translated by sandbox/intercept_h2.py).
"""

from __future__ import annotations

import errno
import json
import os
import statistics
import subprocess
import tempfile
import time

NAME = "api.bench"
#: The download ways (curl, a response of --mbytes MiB): the h1 and h2 interception's
#: throughput from the server toward the sandbox, against the same download direct.
DOWNLOADS = ("direct_download", "intercepted_h1_download", "intercepted_h2_download")

SERVER = r"""
import socket, ssl, sys, threading
srv = socket.socket(fileno=int(sys.argv[1]))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2])
def handle(c):
    with c, ctx.wrap_socket(c, server_side=True) as t:
        head = b''
        while b'\r\n\r\n' not in head:
            head += t.recv(65536)
        head, _, body = head.partition(b'\r\n\r\n')
        path = head.split(b' ')[1]
        if path.startswith(b'/download/'):
            size, block = int(path[10:]), b'd' * (1 << 18)
            t.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
                      % size)
            for _ in range(size // len(block)):
                t.sendall(block)
            return
        length = int(head.lower().split(b'content-length:')[1].split(b'\r\n')[0])
        got, buf = len(body), bytearray(1 << 18)
        while got < length and (n := t.recv_into(buf)):
            got += n
        reply = str(got).encode()
        t.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
                  % len(reply) + reply)
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, os, socket, ssl, sys, time
host, address, cafile = sys.argv[1], sys.argv[2], sys.argv[3]
n, mbytes = int(sys.argv[4]), int(sys.argv[5])
address = socket.gethostbyname(address)  # once: every way pays the same per connection
ctx = ssl.create_default_context(cafile=cafile or None)
ctx.set_alpn_protocols(['http/1.1'])
token = os.environ.get('API_TOKEN', 'direct-token-0000')
def exchange(length, body=b''):
    s = ctx.wrap_socket(socket.create_connection((address, 443)), server_hostname=host)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b'POST / HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n'
              b'Content-Length: %d\r\n\r\n' % (host.encode(), token.encode(), length) + body)
    return s
def answer(s):
    data = b''
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return int(data.rpartition(b'\r\n\r\n')[2])
lat = []
for _ in range(n):
    t = time.perf_counter()
    assert answer(exchange(1, b'p')) == 1
    lat.append((time.perf_counter() - t) * 1000)
chunk, total = b'x' * (1 << 18), mbytes << 20
t = time.perf_counter()
s = exchange(total)
for _ in range(total // len(chunk)):
    s.sendall(chunk)
assert answer(s) == total
print(json.dumps({'latencies_ms': lat, 'mb_s': total / (time.perf_counter() - t) / 1e6}))
"""


def _open_server_namespace(server_namespace):
    """bench/egress.py's server_namespace(443), retried while the veth of its previous
    namespace is still being deleted (the kernel does that after the last descriptor)."""
    for _ in range(50):
        try:
            return server_namespace(443)
        except Exception as exc:  # pyroute2's NetlinkError: EEXIST for the old link
            if getattr(exc, "code", None) != errno.EEXIST:
                raise
            time.sleep(0.1)
    return server_namespace(443)


def measure(python: str, connections: int, mbytes: int, rounds: int, server_namespace,
            server_address: str) -> dict:
    """Run the three ways `rounds` times; the JSON keys bench/egress.py adds to its result.

    Args:
        server_namespace: bench/egress.py's server_namespace(port) -> (ns fd, listener),
            the listener on server_address.
    """
    import ipaddress

    from corral.sandbox import Sandbox, proxy
    from corral.sandbox.secrets import SandboxCA
    from corral.sandbox.spec import BindMount, SandboxSpec, SecretBinding

    work = tempfile.mkdtemp(prefix="corral-secrets-bench-")
    ca = SandboxCA([NAME])
    ca_file, chain_file = os.path.join(work, "ca.pem"), os.path.join(work, "server.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.cert_pem)
    with open(os.open(chain_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(b"".join(ca.leaf_pem(NAME)))
    cfg = proxy.shared_proxy().config
    cfg.hosts = {**cfg.hosts, NAME: (server_address,)}
    cfg.routable = (*cfg.routable, ipaddress.ip_network(f"{server_address}/24", strict=False))
    cfg.upstream_ca_file, cfg._upstream_tls = ca_file, None
    ns_fd, sock = _open_server_namespace(server_namespace)
    server = subprocess.Popen([python, "-c", SERVER, str(sock.fileno()), chain_file],
                              pass_fds=[sock.fileno()])
    sock.close()
    ways = ("direct_tls", "passthrough_tls", "intercepted")
    lat: dict[str, list] = {way: [] for way in ways}
    mbs: dict[str, list] = {way: [] for way in ways}
    try:
        secret = SandboxSpec(secrets=(SecretBinding("API_TOKEN", (NAME,)),), cpus=None,
                             timeout_s=600)
        plain = SandboxSpec(allow_net=(f"{NAME}:443",), cpus=None, timeout_s=600,
                            binds=(BindMount(work, "/bench-ca"),))
        with Sandbox(secret, secrets={"API_TOKEN": "sk-bench-0123456789abcdef"}) as sandbox, \
                Sandbox(plain) as passthrough:
            for rnd in range(rounds):
                for way in ways[rnd % 3:] + ways[:rnd % 3]:
                    # in a sandbox the name resolves through the proxy; intercepted trusts
                    # the sandbox's own CA (its default store), passthrough the bench's
                    argv = [python, "-c", CLIENT, NAME,
                            server_address if way == "direct_tls" else NAME,
                            {"direct_tls": ca_file, "passthrough_tls": "/bench-ca/ca.pem",
                             "intercepted": ""}[way], str(connections), str(mbytes)]
                    doc = json.loads(_client(way, argv, sandbox, passthrough))
                    lat[way] += doc["latencies_ms"][5:]
                    mbs[way].append(doc["mb_s"])
                for way in DOWNLOADS[rnd % 3:] + DOWNLOADS[:rnd % 3]:
                    mbs.setdefault(way, []).append(_download(
                        way, mbytes, ca_file, server_address, sandbox))
    finally:
        server.kill()
        server.wait()
        os.close(ns_fd)
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    return _summary(lat, mbs)


def _download(way: str, mbytes: int, ca_file: str, server_address: str, sandbox) -> float:
    """MB/s of one curl download of mbytes MiB: on the host over HTTP/1.1, or in the
    secret's sandbox (intercepted, the response scrubbed as it streams) by HTTP/1.1 or h2."""
    flags = "--http2" if way == "intercepted_h2_download" else "--http1.1"
    if way == "direct_download":
        flags += f" --cacert {ca_file} --resolve {NAME}:443:{server_address}"
    argv = ["sh", "-c", f'exec curl -sS -o /dev/null -w "%{{speed_download}}" {flags} '
                        f'-H "Authorization: Bearer $API_TOKEN" '
                        f'https://{NAME}/download/{mbytes << 20}']
    return float(_client(way, argv, sandbox, None)) / 1e6


def _client(way: str, argv: list[str], sandbox, passthrough) -> bytes:
    """The client's output, run on the host (direct_*) or in the way's sandbox."""
    if way.startswith("direct"):
        return subprocess.run(argv, capture_output=True, check=True).stdout
    proc = (sandbox if way.startswith("intercepted") else passthrough).exec(argv)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{way} client failed: {err.decode()}")
    return out


def _summary(lat: dict, mbs: dict) -> dict:
    ms = {way: statistics.median(values) for way, values in lat.items()}
    mb = {way: statistics.median(values) for way, values in mbs.items()}
    out = {f"{way}_connect_ms_p50": round(ms[way], 4) for way in ms}
    out.update({f"{way}_throughput_mb_s": round(mb[way], 1) for way in mb})
    out["intercepted_connect_overhead_ms_p50"] = round(
        ms["intercepted"] - ms["passthrough_tls"], 4)
    out["intercepted_over_direct_ms_p50"] = round(ms["intercepted"] - ms["direct_tls"], 4)
    out["intercepted_throughput_ratio"] = round(mb["intercepted"] / mb["direct_tls"], 3)
    out["intercepted_throughput_ratio_passthrough"] = round(
        mb["intercepted"] / mb["passthrough_tls"], 3)
    for proto in ("h1", "h2"):
        out[f"intercepted_{proto}_download_ratio"] = round(
            mb[f"intercepted_{proto}_download"] / mb["direct_download"], 3)
    out["intercepted_targets"] = {
        "overhead_ms_max": 3.0, "ratio_min": 0.3,
        "overhead_met": out["intercepted_connect_overhead_ms_p50"] <= 3.0,
        "overhead_met_over_host_direct": out["intercepted_over_direct_ms_p50"] <= 3.0,
        "ratio_met": out["intercepted_throughput_ratio"] >= 0.3,
        "download_ratio_met": min(out["intercepted_h1_download_ratio"],
                                  out["intercepted_h2_download_ratio"]) >= 0.3,
    }
    return out
