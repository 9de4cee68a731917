"""A bad-token flood against a real daemon: what it writes to the audit log, and what it costs
another tenant (List latency, quiet and under the flood).

Starts `corral daemon` with a TCP listener in a temporary state directory (root: it makes
sandboxes), then: a well-behaved tenant times `List` calls alone; then the same while
`--flooders` threads send calls with a wrong bearer token as fast as they can.

    python bench/audit_flood.py --json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import harness

from corral.runtime.audit import AuditLog
from corral.runtime.client import Client, ClientError

TOKEN = "bench-token-0123456789abcdef"


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def _start(folder: str) -> tuple[subprocess.Popen, int]:
    config = os.path.join(folder, "corral.toml")
    with open(config, "w") as f:
        f.write(f'[tenants.bench]\ntoken = "{TOKEN}"\n')
    state = os.path.join(folder, "state")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.runtime.cli", "daemon", "--socket",
         os.path.join(folder, "corral.sock"), "--state", state, "--listen", "127.0.0.1:0",
         "--config", config],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = os.path.join(state, "audit.db")
    for _ in range(400):
        time.sleep(0.05)
        if os.path.exists(db):
            try:
                with AuditLog.open(db, readonly=True) as log:
                    starts = log.query(kind="daemon.start")
            except Exception:  # noqa: BLE001 - not created yet
                continue
            if starts:
                return proc, starts[-1].detail["tcp_port"]
    proc.kill()
    raise SystemExit("the daemon did not start")


def _timed_lists(client: Client, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.list_sandboxes()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--calls", type=int, default=300, help="List calls timed per phase")
    parser.add_argument("--flooders", type=int, default=4)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="corral-flood-bench-")
    proc, port = _start(folder)
    target = f"127.0.0.1:{port}"
    result: dict = {}
    try:
        good = Client.connect(target=target, token=TOKEN)
        _timed_lists(good, 20)  # warm up
        quiet = _timed_lists(good, args.calls)
        stop = threading.Event()
        sent = [0] * args.flooders

        def flood(i: int) -> None:
            bad = Client(grpc.insecure_channel(target),
                         (("authorization", "Bearer not-a-token-0123456789"),))
            while not stop.is_set():
                try:
                    bad.list_sandboxes()
                except ClientError:
                    sent[i] += 1
            bad.close()

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(args.flooders)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        loud = _timed_lists(good, args.calls)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        good.close()
        result = {
            "quiet_list_ms_p50": round(_percentile(quiet, 0.5) * 1e3, 2),
            "quiet_list_ms_p99": round(_percentile(quiet, 0.99) * 1e3, 2),
            "flood_list_ms_p50": round(_percentile(loud, 0.5) * 1e3, 2),
            "flood_list_ms_p99": round(_percentile(loud, 0.99) * 1e3, 2),
            "bad_calls": sum(sent),
            "bad_calls_per_s": round(sum(sent) / elapsed),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    with AuditLog.open(os.path.join(folder, "state", "audit.db"), readonly=True) as log:
        records = log.query(limit=10_000, kind="denied")
        summaries = log.query(limit=10_000, kind="denied.summary")
    result["denied_records"] = len(records)
    result["summary_records"] = len(summaries)
    result["denials_accounted"] = len(records) + sum(s.detail.get("count", 0)
                                                     for s in summaries)
    shutil.rmtree(folder, ignore_errors=True)
    harness.emit(result, args.json)


if __name__ == "__main__":
    main()
