"""Egress proxy cost: connection setup and throughput, through the proxy vs direct, on loopback.

One sink server (a separate process, so it never shares a GIL with the proxy) listens on
127.0.0.1 of the host. The same stdlib client script runs twice per round, round-robin:

  direct   on the host, connecting to 127.0.0.1:PORT itself
  proxy    inside a sandbox with --allow-net 127.0.0.1:PORT: an explicit proxy CONNECT to
           127.0.0.1:PORT through Corral's egress proxy (veth -> egress namespace -> proxy
           thread of this process -> host loopback)

Connection setup = connect (+ CONNECT and its 200 for the proxy) + a one-byte echo, so the
upstream connection is really open in both cases. Throughput = one connection sending
--mbytes MiB in 256 KiB writes until the server acknowledges the count.

  bench/egress.py [--connections N] [--mbytes N] [--rounds N] [--json]

JSON keys: connect_ms_p50_direct, connect_ms_p50_proxy, connect_ms_p99_direct,
connect_ms_p99_proxy, connect_overhead_ms_p50, throughput_mb_s_direct,
throughput_mb_s_proxy, throughput_ratio, targets (the issue's: overhead <= 1 ms,
ratio >= 0.5) and whether they were met, machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SERVER = r"""
import socket, threading, struct, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('127.0.0.1', 0)); srv.listen(512)
print(srv.getsockname()[1], flush=True)
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
port, n, mbytes, via = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def connect():
    if via == 'direct':
        s = socket.create_connection(('127.0.0.1', port))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200, help="connections per round")
    ap.add_argument("--mbytes", type=int, default=256, help="MiB sent per throughput run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/egress.py needs root (network namespaces, BPF)", file=sys.stderr)
        return 2

    from corral.sandbox import Sandbox, SandboxSpec

    python = "/usr/bin/python3"  # the interpreter inside sandboxes, used on both sides
    server = subprocess.Popen([python, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        spec = SandboxSpec(allow_net=(f"127.0.0.1:{port}",), cpus=None, timeout_s=600)
        lat = {"direct": [], "proxy": []}
        mbs = {"direct": [], "proxy": []}
        load_start = os.getloadavg()[0]
        with Sandbox.create(spec) as sandbox:
            argv = [str(port), str(args.connections), str(args.mbytes)]
            for rnd in range(args.rounds):
                order = ("direct", "proxy") if rnd % 2 == 0 else ("proxy", "direct")
                for via in order:
                    if via == "direct":
                        out = subprocess.run([python, "-c", CLIENT, *argv, via],
                                             capture_output=True, check=True).stdout
                    else:
                        proc = sandbox.exec([python, "-c", CLIENT, *argv, via])
                        out, err = proc.communicate()
                        if proc.returncode != 0:
                            raise SystemExit(f"client in the sandbox failed: {err.decode()}")
                    doc = json.loads(out)
                    lat[via] += doc["latencies_ms"][5:]  # the first few warm up caches
                    mbs[via].append(doc["mb_s"])
    finally:
        server.kill()
        server.wait()
    result = {
        "connect_ms_p50_direct": round(statistics.median(lat["direct"]), 4),
        "connect_ms_p50_proxy": round(statistics.median(lat["proxy"]), 4),
        "connect_ms_p99_direct": round(percentile(lat["direct"], 99), 4),
        "connect_ms_p99_proxy": round(percentile(lat["proxy"], 99), 4),
        "throughput_mb_s_direct": round(statistics.median(mbs["direct"]), 1),
        "throughput_mb_s_proxy": round(statistics.median(mbs["proxy"]), 1),
    }
    result["connect_overhead_ms_p50"] = round(
        result["connect_ms_p50_proxy"] - result["connect_ms_p50_direct"], 4)
    result["throughput_ratio"] = round(
        result["throughput_mb_s_proxy"] / result["throughput_mb_s_direct"], 3)
    result["targets"] = {
        "overhead_ms_max": 1.0, "ratio_min": 0.5,
        "overhead_met": result["connect_overhead_ms_p50"] <= 1.0,
        "ratio_met": result["throughput_ratio"] >= 0.5,
    }
    result["config"] = {"connections_per_round": args.connections, "mbytes": args.mbytes,
                        "rounds": args.rounds, "mode": "explicit CONNECT via the proxy"}
    result["machine"] = {"nproc": os.cpu_count(), "kernel": os.uname().release,
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
