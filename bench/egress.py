"""Egress proxy cost: connection setup and throughput, through the proxy vs direct, on loopback.

A sink server (a separate process, so it never shares a GIL with the proxy) listens on
127.0.0.1 of the host and, with the same socket code, inside a network namespace this bench
makes (10.214.250.10, joined to the host by a veth pair, like the tests' "internet"). The
same stdlib client script runs four ways per round, round-robin:

  direct               on the host, to 127.0.0.1:PORT
  proxy                in a sandbox: explicit CONNECT to 127.0.0.1:PORT through Corral's
                       egress proxy (veth -> egress namespace -> proxy -> host loopback)
  transparent_direct   on the host, to 10.214.250.10:PORT (over the bench's veth)
  transparent_proxy    in a sandbox, plainly to 10.214.250.10:PORT (an address rule): steered
                       by sk_lookup to the proxy, which connects on over the same veth

Connection setup = connect (+ CONNECT and its 200 for the proxy) + a one-byte echo, so the
upstream connection is really open in both cases. Throughput = one connection sending
--mbytes MiB in 256 KiB writes until the server acknowledges the count.

  bench/egress.py [--connections N] [--mbytes N] [--rounds N] [--json]

JSON keys: connect_ms_p50_direct, connect_ms_p50_proxy, connect_ms_p99_direct,
connect_ms_p99_proxy, connect_overhead_ms_p50, throughput_mb_s_direct,
throughput_mb_s_proxy, throughput_ratio (the loopback pair), the same with a
"transparent_" prefix for the veth pair, targets (the issue's: overhead <= 1 ms,
ratio >= 0.5) and whether they were met, machine; intercepted_connect_ms_p50,
intercepted_throughput_mb_s and their peers (bench/_secrets_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

import harness

SERVER = r"""
import socket, threading, struct, sys
srv = socket.socket(fileno=int(sys.argv[1]))
def handle(c):
    with c:
        kind = c.recv(1)
        if kind == b'p':
            c.sendall(b'p')
            return
        total = 0
        buf = bytearray(1 << 18)
        while (n := c.recv_into(buf)):
            total += n
        c.sendall(struct.pack('!Q', total))
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, struct, sys, time
port, n, mbytes, via, host = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                              sys.argv[4], sys.argv[5])
def connect():
    if via != 'proxy':
        s = socket.create_connection((host, port))
    else:
        s = socket.create_connection(('100.127.255.1', 3128))
        s.sendall(b'CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n' % port)
        head = b''
        while b'\r\n\r\n' not in head:
            head += s.recv(4096)
        assert head.startswith(b'HTTP/1.1 200'), head
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
lat = []
for _ in range(n):
    t = time.perf_counter()
    s = connect()
    s.sendall(b'p')
    assert s.recv(1) == b'p'
    lat.append((time.perf_counter() - t) * 1000)
    s.close()
chunk = b'x' * (1 << 18)
total = mbytes << 20
s = connect()
t = time.perf_counter()
s.sendall(b't')
sent = 0
while sent < total:
    s.sendall(chunk)
    sent += len(chunk)
s.shutdown(socket.SHUT_WR)
ack = b''
while len(ack) < 8:
    ack += s.recv(8 - len(ack))
dt = time.perf_counter() - t
assert struct.unpack('!Q', ack)[0] == total
print(json.dumps({'latencies_ms': lat, 'mb_s': total / dt / 1e6}))
"""


def percentile(values, q):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


SERVER_NET = "10.214.250"
WAYS = ("direct", "proxy", "transparent_direct", "transparent_proxy")


def listener(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def server_namespace(port: int):
    """A namespace holding a listener on SERVER_NET.10:port, joined to the host by a veth
    pair; it (and the host end) disappears with the last descriptor: (ns fd, listener)."""
    from pyroute2 import IPRoute

    from corral.sandbox import net

    def build():
        ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        host_ns = os.open(f"/proc/{os.getpid()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="bench0", kind="veth", peer={"ifname": "cbench0"})
            idx = ipr.link_lookup(ifname="bench0")[0]
            ipr.addr("add", index=idx, address=f"{SERVER_NET}.10", prefixlen=24)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="cbench0")[0], net_ns_fd=host_ns)
        os.close(host_ns)
        return ns_fd, listener("0.0.0.0", port)

    ns_fd, sock = net.in_netns(None, build)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="cbench0")[0]
        ipr.addr("add", index=idx, address=f"{SERVER_NET}.1", prefixlen=24)
        ipr.link("set", index=idx, state="up")
    return ns_fd, sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200, help="connections per round")
    ap.add_argument("--mbytes", type=int, default=256, help="MiB sent per throughput run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    harness.require_root("network namespaces, BPF")

    from corral.sandbox import Sandbox, SandboxSpec

    python = "/usr/bin/python3"  # the interpreter inside sandboxes, used on both sides
    local = listener("127.0.0.1", 0)
    port = local.getsockname()[1]
    ns_fd, remote = server_namespace(port)
    servers = [subprocess.Popen([python, "-c", SERVER, str(sock.fileno())],
                                pass_fds=[sock.fileno()]) for sock in (local, remote)]
    local.close()
    remote.close()
    lat = {way: [] for way in WAYS}
    mbs = {way: [] for way in WAYS}
    load_start = os.getloadavg()[0]
    try:
        spec = SandboxSpec(allow_net=(f"127.0.0.1:{port}", f"{SERVER_NET}.10:{port}"),
                           cpus=None, timeout_s=600)
        with Sandbox.create(spec) as sandbox:
            for rnd in range(args.rounds):
                order = WAYS[rnd % len(WAYS):] + WAYS[:rnd % len(WAYS)]
                for way in order:
                    host = f"{SERVER_NET}.10" if way.startswith("transparent") else "127.0.0.1"
                    via = "proxy" if way == "proxy" else "plain"
                    argv = [python, "-c", CLIENT, str(port), str(args.connections),
                            str(args.mbytes), via, host]
                    if way.endswith("direct"):
                        out = subprocess.run(argv, capture_output=True, check=True).stdout
                    else:
                        proc = sandbox.exec(argv)
                        out, err = proc.communicate()
                        if proc.returncode != 0:
                            raise SystemExit(f"client in the sandbox failed: {err.decode()}")
                    doc = json.loads(out)
                    lat[way] += doc["latencies_ms"][5:]  # the first few warm up caches
                    mbs[way].append(doc["mb_s"])
    finally:
        for server in servers:
            server.kill()
            server.wait()
        os.close(ns_fd)  # the server namespace goes, and both ends of its veth with it
    result = {}
    for prefix, direct, proxied in (("", "direct", "proxy"),
                                    ("transparent_", "transparent_direct",
                                     "transparent_proxy")):
        part = {
            "connect_ms_p50_direct": round(statistics.median(lat[direct]), 4),
            "connect_ms_p50_proxy": round(statistics.median(lat[proxied]), 4),
            "connect_ms_p99_direct": round(percentile(lat[direct], 99), 4),
            "connect_ms_p99_proxy": round(percentile(lat[proxied], 99), 4),
            "throughput_mb_s_direct": round(statistics.median(mbs[direct]), 1),
            "throughput_mb_s_proxy": round(statistics.median(mbs[proxied]), 1),
        }
        part["connect_overhead_ms_p50"] = round(
            part["connect_ms_p50_proxy"] - part["connect_ms_p50_direct"], 4)
        part["throughput_ratio"] = round(
            part["throughput_mb_s_proxy"] / part["throughput_mb_s_direct"], 3)
        result.update({prefix + k: v for k, v in part.items()})

    result["targets"] = {
        "overhead_ms_max": 1.0, "ratio_min": 0.5,
        "overhead_met": result["connect_overhead_ms_p50"] <= 1.0,
        "ratio_met": result["throughput_ratio"] >= 0.5,
    }
    import _secrets_bench  # intercepted TLS toward a secret's host vs direct TLS

    result.update(_secrets_bench.measure(python, args.connections, args.mbytes, args.rounds,
                                         server_namespace, f"{SERVER_NET}.10"))
    result["config"] = {"connections_per_round": args.connections, "mbytes": args.mbytes,
                        "rounds": args.rounds,
                        "modes": {"proxy": "explicit CONNECT, loopback upstream",
                                  "transparent_proxy": "steered, address rule, veth upstream"}}
    result["machine"] = {"nproc": os.cpu_count(), "kernel": os.uname().release,
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]}
    harness.emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
