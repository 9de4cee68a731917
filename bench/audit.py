"""Audit log cost: append latency and throughput under synchronous=FULL and NORMAL, verify speed,
a bad-token flood through deny() (records written, cost per call) and appends across rotations.

Each append is the real thing: validate, hash, INSERT (5 indexes), commit, head anchor write.
The log lives in --dir (default: a temporary folder under the current directory, so it is on the
disk the daemon would use, not a tmpfs).

    python bench/audit.py --json      # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

from corral.runtime import audit

DETAIL = {"argv": ["python", "-m", "agent", "--rate", "1000"], "policy": "sha256:" + "ab" * 32}


def _percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def _appends(folder: str, synchronous: str, count: int, threads: int) -> dict:
    audit._SYNCHRONOUS = synchronous
    path = os.path.join(folder, f"{synchronous.lower()}-{threads}.db")
    latencies: list[float] = []
    with audit.AuditLog.open(path) as log:
        log.append("bench.warmup", tenant="bench")

        def worker(n: int) -> None:
            mine = []
            for i in range(n):
                t0 = time.perf_counter()
                log.append(
                    "exec.start", tenant="bench", peer="uid=1000 pid=1", sandbox_id="sb-1",
                    session_id=f"s-{i % 64}", detail=DETAIL,
                )  # fmt: skip
                mine.append(time.perf_counter() - t0)
            latencies.extend(mine)  # list.extend is atomic under the GIL

        workers = [
            threading.Thread(target=worker, args=(count // threads,)) for _ in range(threads)
        ]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "appends": len(latencies),
        "appends_per_s": round(len(latencies) / elapsed),
        "append_us_p50": round(_percentile(latencies, 0.50) * 1e6, 1),
        "append_us_p99": round(_percentile(latencies, 0.99) * 1e6, 1),
    }


def _verify_and_query(folder: str, records: int) -> dict:
    audit._SYNCHRONOUS = "NORMAL"  # only to build the log quickly; verify does not write
    path = os.path.join(folder, "verify.db")
    with audit.AuditLog.open(path) as log:
        for i in range(records):
            log.append(
                "session.input", tenant=f"t{i % 8}", sandbox_id=f"sb-{i % 500}",
                detail={"bytes": i, "text_sha256": "cd" * 32},
            )  # fmt: skip
        t0 = time.perf_counter()
        result = log.verify()
        verify_s = time.perf_counter() - t0
        assert result.ok, result
        t0 = time.perf_counter()
        for i in range(100):
            log.query(sandbox_id=f"sb-{i}", limit=100)
        query_s = (time.perf_counter() - t0) / 100
        t0 = time.perf_counter()
        exported = log.export_jsonl(os.path.join(folder, "export.jsonl"))
        export_s = time.perf_counter() - t0
    return {
        "verify_records": records,
        "verify_records_per_s": round(records / verify_s),
        "query_by_sandbox_ms": round(query_s * 1e3, 3),
        "export_records_per_s": round(exported / export_s),
    }


def _denial_flood(folder: str, calls: int) -> dict:
    """An unauthenticated flood through `deny()`: records written and the cost per call."""
    audit._SYNCHRONOUS = "FULL"
    path = os.path.join(folder, "denials.db")
    with audit.AuditLog.open(path) as log:
        t0 = time.perf_counter()
        for i in range(calls):
            future = log.deny(tenant="", peer=f"ipv4:203.0.113.9:{1024 + i % 60000}",
                              status="UNAUTHENTICATED", method="SandboxesServicer.List",
                              reason="unknown bearer token")
            if future is not None:
                future.result()  # as the daemon does: the refusal waits for its record
        per_call = (time.perf_counter() - t0) / calls
    with audit.AuditLog.open(path, readonly=True) as log:
        records = log.query(limit=audit.MAX_QUERY_LIMIT)
    counted = sum(r.detail.get("count", 0) for r in records if r.kind == "denied.summary")
    return {
        "denial_calls": calls,
        "denial_records": len(records),
        "denials_accounted": counted + sum(r.kind == "denied" for r in records),
        "denial_us_per_call": round(per_call * 1e6, 1),
    }


def _rotation(folder: str, records: int, segment_records: int) -> dict:
    """Appends across rotations: the slowest append (the one that seals) and verify."""
    audit._SYNCHRONOUS = "FULL"
    path = os.path.join(folder, "rotate.db")
    worst = 0.0
    with audit.AuditLog.open(path, segment_records=segment_records) as log:
        for i in range(records):
            t0 = time.perf_counter()
            log.append("exec.start", tenant="bench", sandbox_id=f"sb-{i % 50}", detail=DETAIL)
            worst = max(worst, time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = log.verify()
        verify_s = time.perf_counter() - t0
        assert result.ok, result
    return {
        "rotation_segments": result.segments,
        "rotation_worst_append_ms": round(worst * 1e3, 2),
        "rotation_verify_records_per_s": round(result.checked / verify_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--appends", type=int, default=4000)
    parser.add_argument("--verify-records", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where to put the logs (default: ./tmp*)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="corral-audit-bench-", dir=args.dir or os.getcwd())
    try:
        result = {
            "python": platform.python_version(),
            "sqlite": audit.sqlite3.sqlite_version,
            "full": _appends(folder, "FULL", args.appends, 1),
            "full_4_threads": _appends(folder, "FULL", args.appends, 4),
            "normal": _appends(folder, "NORMAL", args.appends, 1),
            "normal_4_threads": _appends(folder, "NORMAL", args.appends, 4),
            **_verify_and_query(folder, args.verify_records),
            **_denial_flood(folder, 2000),
            **_rotation(folder, 5000, 1000),
        }
    finally:
        audit._SYNCHRONOUS = "FULL"
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        for key, value in result.items():
            print(f"{key:22} {value}")


if __name__ == "__main__":
    main()
