"""What one audit record costs the daemon's process in CPU, and so in GIL time, at the group
sizes a loaded daemon produces.

Two measurements, each against a peer in the same run:

* `submit_*`: records of the daemon's steering kind (session.input, the detail the session
  layer writes, a policy digest) submitted in bursts of 1, 16 and 128 to a real `AuditLog`
  (synchronous=FULL, on --dir's disk), every future awaited. CPU (user + system of the whole
  process: the submitting thread and the commit thread) per record, and the mean group a
  commit wrote.
* `paced_*`: the same records one at a time, 0.2 ms apart, through `submit` (a commit as
  soon as the commit thread is free) against `submit_background` (queued records wait up to
  2 ms for company): CPU per record and mean group.
* `hash_*`, `detail_*`: the writer's record hash (`audit._chained_hash`) and flat-detail
  encoder (`audit._encode_flat_detail`) against the reference functions of
  runtime/audit_records.py that give the same bytes; CPU per record, alternating.

    python bench/audit_commit.py [--records N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import tempfile
import time

import harness

from corral.runtime import audit
from corral.runtime.audit_records import _encode_detail, record_hash

SIZES = {
    "records": harness.Size(6000, 600, "records per burst size in the submit measurement"),
    "encodes": harness.Size(200, 10, "rounds of 100 encodes per way in the encode part"),
}
BURSTS = (1, 16, 128)
POLICY = "sha256:" + "ab" * 32


def _paced_cost(folder: str, way: str, count: int) -> dict:
    """CPU per record and mean group for count records submitted one at a time, 0.2 ms
    apart (about 256 sessions steering at 20/s), by `submit` or `submit_background`."""
    path = os.path.join(folder, f"paced-{way}.db")
    with audit.AuditLog.open(path) as log:
        log.policy_digest = POLICY
        log.append("bench.warmup", tenant="bench")
        before = log.statistics()
        submit = log.submit if way == "submit" else log.submit_background
        futures = []
        cpu0 = time.process_time()
        for i in range(count):
            futures.append(submit("session.input", tenant="bench", peer="ipv4:127.0.0.1:40000",
                                  sandbox_id="sb-0123456789abcdef",
                                  session_id=f"ss-{i % 256:016x}",
                                  detail={"bytes": 12, "turn": i % 7}))
            time.sleep(0.0002)
        concurrent.futures.wait(futures)
        cpu = time.process_time() - cpu0
        commits = log.statistics().commits - before.commits
    return {f"paced_{way}_cpu_us_per_record": round(1e6 * cpu / count, 1),
            f"paced_{way}_group_mean": round(count / max(commits, 1), 1)}


def _submit_cost(folder: str, burst: int, count: int) -> dict:
    """CPU per record and mean group size for count records submitted burst at a time."""
    path = os.path.join(folder, f"submit-{burst}.db")
    with audit.AuditLog.open(path) as log:
        log.policy_digest = POLICY
        log.append("bench.warmup", tenant="bench")
        before = log.statistics()
        cpu0 = time.process_time()
        for start in range(0, count, burst):
            futures = [
                log.submit("session.input", tenant="bench", peer="ipv4:127.0.0.1:40000",
                           sandbox_id="sb-0123456789abcdef", session_id=f"ss-{i % 256:016x}",
                           detail={"bytes": 12, "turn": i % 7})
                for i in range(start, min(start + burst, count))
            ]  # fmt: skip
            concurrent.futures.wait(futures)
        cpu = time.process_time() - cpu0
        after = log.statistics()
    commits = after.commits - before.commits
    return {f"submit_cpu_us_per_record_burst_{burst}": round(1e6 * cpu / count, 1),
            f"submit_group_mean_burst_{burst}": round(count / max(commits, 1), 1)}


def _encode_cost(repeat: int) -> dict:
    """CPU per record of the writer's encoders against the reference ones they replace on the
    hot path (same output; tests/unit/test_audit_writer_paths.py), alternating."""
    item = audit._prepare("session.input", POLICY, tenant="bench", peer="ipv4:127.0.0.1:40000",
                          sandbox_id="sb-0123456789abcdef", session_id="ss-0000000000000001",
                          detail={"bytes": 12, "turn": 3})
    detail = {"bytes": 12, "turn": 3, "corral.policy": POLICY}
    ways = {
        "hash_fast": lambda: audit._chained_hash("ab" * 32, 1234, 1.7e9, item),
        "hash_reference": lambda: record_hash(
            "ab" * 32, seq=1234, time=1.7e9, tenant=item.tenant, peer=item.peer,
            kind=item.kind, sandbox_id=item.sandbox_id, session_id=item.session_id,
            detail_json=item.detail_json),
        "detail_fast": lambda: audit._encode_flat_detail(detail),
        "detail_reference": lambda: _encode_detail(detail),
    }
    spent = dict.fromkeys(ways, 0.0)
    for _ in range(repeat):
        for name, way in ways.items():
            cpu0 = time.thread_time()
            for _ in range(100):
                way()
            spent[name] += time.thread_time() - cpu0
    us = {name: 1e6 * s / (repeat * 100) for name, s in spent.items()}
    return {"hash_fast_us": round(us["hash_fast"], 2),
            "hash_reference_us": round(us["hash_reference"], 2),
            "ratio_hash_reference_vs_fast": round(us["hash_reference"] / us["hash_fast"], 2),
            "detail_fast_us": round(us["detail_fast"], 2),
            "detail_reference_us": round(us["detail_reference"], 2),
            "ratio_detail_reference_vs_fast":
                round(us["detail_reference"] / us["detail_fast"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="where the logs go (default: a temporary "
                        "folder under the current directory, on the daemon's kind of disk)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    harness.add_sizes(parser, SIZES)
    args = parser.parse_args()
    harness.apply_quick(args, SIZES)
    folder = tempfile.mkdtemp(prefix="corral-bench-audit-commit-", dir=args.dir or ".")
    try:
        result: dict = {}
        for burst in BURSTS:
            result.update(_submit_cost(folder, burst, args.records))
        for way in ("submit", "submit_background"):
            result.update(_paced_cost(folder, way, args.records // 3))
        result["ratio_paced_submit_vs_background_cpu"] = round(
            result["paced_submit_cpu_us_per_record"]
            / result["paced_submit_background_cpu_us_per_record"], 2)
        result.update(_encode_cost(args.encodes))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    harness.emit(result, args.json)


if __name__ == "__main__":
    main()
