"""Audit log cost: append latency and throughput under synchronous=FULL and NORMAL, verify speed,
a bad-token flood through deny() (records written, cost per call), appends across rotations,
appends with signed checkpoints against plain ones, and export in both formats.

Each append is the real thing: validate, hash, INSERT (5 indexes), commit, head anchor write.
The log lives in --dir (default: a temporary folder under the current directory, so it is on the
disk the daemon would use, not a tmpfs).

    python bench/audit.py --json      # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time

import harness

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


def _signed_appends(folder: str, count: int, rounds: int = 12) -> dict:
    """Appends with signed checkpoints (every 1000 records, as the daemon's default) against
    the same appends unsigned. Both carry the policy digest on every record, as the daemon
    writes them whether it signs or not: the difference is the signing alone (the commit
    hook that counts records, the Ed25519 signature, the checkpoint records).

    The machine's noise drifts over seconds, so the two run in alternating rounds on fresh
    logs (the first mode of a pair alternates too), and the overhead is the p50 of every
    signed append against the p50 of every plain one; the median over the rounds of each
    round's own ratio is reported beside it."""
    from corral.runtime.signing import Checkpointer, FileSigner, checkpoint_message

    audit._SYNCHRONOUS = "FULL"
    signer = FileSigner.load_or_create(os.path.join(folder, "bench-signing.key"))
    plain: list[float] = []
    signed: list[float] = []
    pairs: list[float] = []
    cpu = {"plain": 0.0, "signed": 0.0}  # process CPU seconds (every thread): no disk waits
    checkpoints = 0
    for r in range(rounds):
        p50 = {}
        for mode in ("plain", "signed") if r % 2 == 0 else ("signed", "plain"):
            path = os.path.join(folder, f"sign-{mode}-{r}.db")
            with audit.AuditLog.open(path) as log:
                log.policy_digest = "sha256:" + "ef" * 32
                cp = (Checkpointer(log, signer, every_records=1000, interval_s=60)
                      if mode == "signed" else None)
                log.append("bench.warmup", tenant="bench")
                samples = []
                c0 = time.process_time()
                for i in range(count // rounds):
                    t0 = time.perf_counter()
                    log.append("exec.start", tenant="bench", peer="uid=1000 pid=1",
                               sandbox_id="sb-1", session_id=f"s-{i % 64}", detail=DETAIL)
                    samples.append(time.perf_counter() - t0)
                if cp is not None:
                    cp.close()
                    checkpoints += cp.checkpoints
                cpu[mode] += time.process_time() - c0
            (signed if mode == "signed" else plain).extend(samples)
            p50[mode] = _percentile(sorted(samples), 0.5)
        pairs.append(p50["signed"] / p50["plain"] - 1)
    plain.sort()
    signed.sort()
    pairs.sort()
    t0 = time.perf_counter()
    for i in range(1000):
        signer.sign(checkpoint_message(i, "ab" * 32, 1.5, signer.key_id))
    sign_us = (time.perf_counter() - t0) / 1000 * 1e6
    p50_plain, p50_signed = _percentile(plain, 0.5), _percentile(signed, 0.5)
    return {
        "unsigned_append_us_p50": round(p50_plain * 1e6, 1),
        "signed_append_us_p50": round(p50_signed * 1e6, 1),
        "signed_append_us_p99": round(_percentile(signed, 0.99) * 1e6, 1),
        "signing_overhead_pct": round((p50_signed / p50_plain - 1) * 100, 1),
        "signing_overhead_round_median_pct": round(_percentile(pairs, 0.5) * 100, 1),
        "signing_rounds": rounds,
        "unsigned_append_cpu_us": round(cpu["plain"] / len(plain) * 1e6, 1),
        "signed_append_cpu_us": round(cpu["signed"] / len(signed) * 1e6, 1),
        "signing_cpu_overhead_pct": round((cpu["signed"] / cpu["plain"] - 1) * 100, 1),
        "signed_checkpoints": checkpoints,
        "ed25519_sign_us": round(sign_us, 1),
    }


def _export_formats(folder: str) -> dict:
    """The CLI's export path (row batches -> jsonl / OCSF text) and the signature check of
    an exported copy, on the log _verify_and_query built, signed every 1000 records."""
    from corral.runtime import audit_export
    from corral.runtime.signing import FileSigner, verify_signed

    path = os.path.join(folder, "verify.db")
    signer = FileSigner.load_or_create(os.path.join(folder, "bench-signing.key"))
    out = {}
    with audit.AuditLog.open(path, readonly=True) as log:
        for fmt in ("jsonl", "ocsf"):
            t0 = time.perf_counter()
            n = 0
            with open(os.path.join(folder, f"export.{fmt}"), "w") as f:
                for rows in log.row_batches():
                    f.write(audit_export.format_rows(rows, fmt))
                    n += len(rows)
            out[f"export_{fmt}_records_per_s"] = round(n / (time.perf_counter() - t0))
    # a signed copy: a checkpoint after every 1000 records of the exported lines
    import base64

    from corral.runtime.signing import CHECKPOINT_KIND, checkpoint_message

    rows = []
    with open(os.path.join(folder, "export.jsonl")) as f:
        rows = list(audit_export.read_copy(f))
    signed, prev = [], audit.GENESIS_HASH
    seq = 0
    for i, r in enumerate(rows):
        for row in [r] + ([] if (i + 1) % 1000 else [None]):
            seq += 1
            if row is None:
                detail = {"seq": seq - 1, "hash": prev, "time": 1.0, "key_id": signer.key_id,
                          "reason": "records", "signature": base64.b64encode(signer.sign(
                              checkpoint_message(seq - 1, prev, 1.0, signer.key_id))).decode()}
                row = (0, 1.0, "", "daemon", CHECKPOINT_KIND, "", "",
                       audit._canonical_json(detail), "", "")
            digest = audit.record_hash(prev, seq=seq, time=row[1], tenant=row[2], peer=row[3],
                                       kind=row[4], sandbox_id=row[5], session_id=row[6],
                                       detail_json=row[7])
            signed.append((seq, *row[1:8], prev, digest))
            prev = digest
    t0 = time.perf_counter()
    result = verify_signed(signed, signer.public_key)
    assert result.ok, result
    out["verify_signed_records_per_s"] = round(len(signed) / (time.perf_counter() - t0))
    return out


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
    parser.add_argument("--only", choices=("governance",),
                        help="governance: only signed appends, export and the signature check")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="corral-audit-bench-", dir=args.dir or os.getcwd())
    try:
        if args.only == "governance":
            result = {
                **_signed_appends(folder, args.appends),
                **_verify_and_query(folder, args.verify_records),
                **_export_formats(folder),
            }
        else:
            result = {
                "python": platform.python_version(),
                "sqlite": audit.sqlite3.sqlite_version,
                "full": _appends(folder, "FULL", args.appends, 1),
                "full_4_threads": _appends(folder, "FULL", args.appends, 4),
                "normal": _appends(folder, "NORMAL", args.appends, 1),
                "normal_4_threads": _appends(folder, "NORMAL", args.appends, 4),
                **_signed_appends(folder, args.appends),
                **_verify_and_query(folder, args.verify_records),
                **_export_formats(folder),
                **_denial_flood(folder, 2000),
                **_rotation(folder, 5000, 1000),
            }
    finally:
        audit._SYNCHRONOUS = "FULL"
        shutil.rmtree(folder, ignore_errors=True)
    harness.emit(result, args.json)


if __name__ == "__main__":
    main()
