"""Create latency with an audit sink that is down, against no sink (issue 22: "p99 within 10%").

Starts a real `corral daemon` (root: it makes sandboxes) per configuration, all three side by
side, and times `Sandboxes.Create` (then Destroy, untimed) N times each through the real
client, the creates alternating among the daemons one by one so machine noise hits them
alike. Configurations:

* ``none``: no sink;
* ``refused``: a syslog TCP sink on a port where nothing listens (every delivery refused,
  retried with backoff);
* ``stalled``: a syslog TCP sink whose listener accepts and never reads (sends block once
  the socket buffers fill: the worst kind of down).

    sudo python bench/audit_sinks.py --json --runs 3 --creates 1000
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


class _Config:
    """One daemon of the comparison: no sink, a refused one or a stalled one."""

    def __init__(self, mode: str):
        self.mode = mode
        self.root = tempfile.mkdtemp(prefix="cbs-", dir="/tmp")
        self.hold = None
        config = ""
        if mode != "none":
            self.hold = socket.socket()
            self.hold.bind(("127.0.0.1", 0))
            port = self.hold.getsockname()[1]
            if mode == "stalled":
                self.hold.listen(1)  # accepted by the kernel, never read
            else:
                self.hold.close()
                self.hold = None
            config = (f'[audit.sinks.siem]\ntype = "syslog"\nprotocol = "tcp"\n'
                      f'address = "127.0.0.1:{port}"\n')
        self.proc, sock = _daemon(self.root, config)
        self.client = Client.connect(socket=sock)
        self.client.destroy_sandbox(self.client.create_sandbox().id)  # warm up
        self.latencies: list[float] = []

    def create_once(self) -> None:
        t0 = time.perf_counter()
        sb = self.client.create_sandbox()
        self.latencies.append(time.perf_counter() - t0)
        self.client.destroy_sandbox(sb.id)

    def close(self) -> dict:
        status = self.client.audit_status()
        lag = status.sinks[0].lag if status.sinks else 0
        self.client.close()
        harness.stop_daemon(self.proc, 60)
        if self.hold is not None:
            self.hold.close()
        shutil.rmtree(self.root, ignore_errors=True)
        return {"create_ms_p50": round(_percentile(self.latencies, 0.5) * 1e3, 2),
                "create_ms_p99": round(_percentile(self.latencies, 0.99) * 1e3, 2),
                "sink_lag": lag}


def _run(creates: int) -> dict[str, dict]:
    """One run: the three daemons side by side, creates alternating among them one by one,
    so a stall of the shared machine lands on all three alike."""
    configs: list[_Config] = []
    try:
        for mode in ("none", "refused", "stalled"):
            configs.append(_Config(mode))
        for _ in range(creates):
            for config in configs:
                config.create_once()
    finally:
        results = {c.mode: c.close() for c in configs}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--creates", type=int, default=1000,
                        help="creates per daemon and run (a p99 needs many: 1000 by default)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"none": [], "refused": [], "stalled": []}
    for _ in range(args.runs):
        for mode, result in _run(args.creates).items():
            runs[mode].append(result)
    result = {}
    for mode, results in runs.items():
        p99 = [r["create_ms_p99"] for r in results]
        p50 = [r["create_ms_p50"] for r in results]
        result[mode] = {"create_ms_p50_best": min(p50), "create_ms_p50_worst": max(p50),
                        "create_ms_p99_best": min(p99), "create_ms_p99_worst": max(p99),
                        "sink_lag_at_end": [r["sink_lag"] for r in results]}
    # each run's down sink against that run's no sink (target: within 10%)
    for mode in ("refused", "stalled"):
        result[mode]["p99_vs_none_by_run"] = [
            round(r["create_ms_p99"] / n["create_ms_p99"], 3)
            for r, n in zip(runs[mode], runs["none"], strict=True)]
    harness.emit(result, args.json)


if __name__ == "__main__":
    main()
