"""Create latency with an audit sink that is down, against no sink (issue 22: "p99 within 10%").

Starts a real `corral daemon` (root: it makes sandboxes) per configuration and times
`Sandboxes.Create` (then Destroy, untimed) N times through the real client. Configurations,
alternated run by run so machine noise hits them alike:

* ``none``: no sink;
* ``refused``: a syslog TCP sink on a port where nothing listens (every delivery refused,
  retried with backoff);
* ``stalled``: a syslog TCP sink whose listener accepts and never reads (sends block once
  the socket buffers fill: the worst kind of down).

    sudo python bench/audit_sinks.py --json --runs 3 --creates 60
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

import harness

from corral.runtime.client import Client


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def _daemon(root: str, config: str) -> tuple[subprocess.Popen, str]:
    path = os.path.join(root, "corral.toml")
    with open(path, "w") as f:
        f.write(config)
    return harness.start_daemon(root, "--config", path)


def _run(mode: str, creates: int) -> dict:
    root = tempfile.mkdtemp(prefix="cbs-", dir="/tmp")
    hold = None
    config = ""
    if mode != "none":
        hold = socket.socket()
        hold.bind(("127.0.0.1", 0))
        port = hold.getsockname()[1]
        if mode == "stalled":
            hold.listen(1)  # accepted by the kernel, never read
        else:
            hold.close()
            hold = None
        config = (f'[audit.sinks.siem]\ntype = "syslog"\nprotocol = "tcp"\n'
                  f'address = "127.0.0.1:{port}"\n')
    proc, sock = _daemon(root, config)
    try:
        client = Client.connect(socket=sock)
        client.destroy_sandbox(client.create_sandbox().id)  # warm up
        latencies = []
        for _ in range(creates):
            t0 = time.perf_counter()
            sb = client.create_sandbox()
            latencies.append(time.perf_counter() - t0)
            client.destroy_sandbox(sb.id)
        status = client.audit_status()
        lag = status.sinks[0].lag if status.sinks else 0
        client.close()
    finally:
        harness.stop_daemon(proc, 60)
        if hold is not None:
            hold.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"create_ms_p50": round(_percentile(latencies, 0.5) * 1e3, 2),
            "create_ms_p99": round(_percentile(latencies, 0.99) * 1e3, 2), "sink_lag": lag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--creates", type=int, default=60)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"none": [], "refused": [], "stalled": []}
    for _ in range(args.runs):
        for mode in runs:
            runs[mode].append(_run(mode, args.creates))
    result = {}
    for mode, results in runs.items():
        p99 = [r["create_ms_p99"] for r in results]
        p50 = [r["create_ms_p50"] for r in results]
        result[mode] = {"create_ms_p50_best": min(p50), "create_ms_p50_worst": max(p50),
                        "create_ms_p99_best": min(p99), "create_ms_p99_worst": max(p99),
                        "sink_lag_at_end": [r["sink_lag"] for r in results]}
    harness.emit(result, args.json)


if __name__ == "__main__":
    main()
