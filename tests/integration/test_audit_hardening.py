"""The audit trail under a hostile tenant and a damaged disk, through the real daemon and CLI.

Nothing runs unrecorded, however large its argv; a bad-token flood costs a bounded number of
records that still count every call; `corral audit verify` names the first broken record of
a damaged audit.db (never a traceback or "internal error"), and `--verify-audit=full` refuses
to start on it; the log rotates into sealed segments that verify as one history, and old
segments are pruned only behind an `audit.prune` anchor.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time

import grpc
import pytest

from corral.runtime.audit import DENIAL_BURST, TRUNCATED, AuditLog, list_segments
from corral.runtime.client import Client, ClientError

from .daemon_harness import DaemonProcess, collect_exec

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

TOKEN = "acme-token-0123456789abcdef"


def _detail(rec) -> dict:
    return json.loads(rec.detail_json)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_300kb_argv_is_audited_before_it_runs(make_daemon):
    d = make_daemon("argv").start()
    client = d.client()
    sb = client.create_sandbox()
    bigs = [c * 100_000 for c in "xyz"]  # 300 KB of argv (one string may not pass 128 KiB)
    res = collect_exec(client.exec(sb.id, ["sh", "-c", "echo ran", "sh", *bigs]))
    exec_id = res.exec_id
    assert (res.stdout, res.returncode) == (b"ran\n", 0)
    # A spawn that fails (its cwd does not exist) still left its exec.start first.
    with pytest.raises(ClientError) as failed:
        list(client.exec(sb.id, ["true"], cwd="/no/such/dir"))
    assert failed.value.code.name == "INVALID_ARGUMENT"
    client.destroy_sandbox(sb.id)
    assert d.stop() == 0

    starts = {_detail(r)["exec_id"]: r for r in d.records("exec.start")}
    start = starts[exec_id]
    argv = _detail(start)["argv"]
    assert argv[:4] == ["sh", "-c", "echo ran", "sh"]
    assert argv[4:] == [{TRUNCATED: "string", "head": big[:4096], "chars": 100_000,
                         "sha256": hashlib.sha256(big.encode()).hexdigest()} for big in bigs]
    exit_rec = [r for r in d.records("exec.exit") if _detail(r)["exec_id"] == exec_id][0]
    # the host pid moved to exec.exit (0 when the command ended before it was looked up)
    assert start.seq < exit_rec.seq and _detail(exit_rec)["pid"] == res.pid
    failed_rec = d.records("exec.failed")[0]
    failed_id = _detail(failed_rec)["exec_id"]
    assert _detail(starts[failed_id])["argv"] == ["true"]
    assert starts[failed_id].seq < failed_rec.seq
    assert d.verify().ok


def test_a_bad_token_flood_is_counted_in_a_bounded_number_of_records(make_daemon):
    d = make_daemon("flood", args=("--listen", "127.0.0.1:0"),
                    config=f'[tenants.acme]\ntoken = "{TOKEN}"\n').start()
    port = _detail(d.records("daemon.start")[-1])["tcp_port"]
    # each refusal waits REFUSAL_DELAY_S (a flood is answered slowly): 60 fit in one
    # 10 s denial window
    calls = 60
    bad = Client(grpc.insecure_channel(f"127.0.0.1:{port}"),
                 (("authorization", "Bearer not-a-token-0123456789"),))
    try:
        for i in range(calls):
            with pytest.raises(ClientError) as exc:
                bad.list_sandboxes() if i % 2 else bad.get_sandbox("sb-x")
            assert exc.value.code.name == "UNAUTHENTICATED"
    finally:
        bad.close()
    good = Client.connect(target=f"127.0.0.1:{port}", token=TOKEN)
    try:
        assert good.list_sandboxes() == []  # the tenant with a token is still served
    finally:
        good.close()
    assert d.stop() == 0

    denied = [r for r in d.records("denied") if _detail(r)["status"] == "UNAUTHENTICATED"]
    summaries = d.records("denied.summary")
    assert len(denied) == DENIAL_BURST
    assert all(r.peer.startswith("ipv4:127.0.0.1:") for r in denied)
    assert len(summaries) == 1  # one window (the flood is far shorter than 10 s) or more
    counted = sum(_detail(s)["count"] for s in summaries)
    assert len(denied) + counted == calls
    methods = {}
    for s in summaries:
        assert (s.peer, _detail(s)["status"]) == ("ipv4:127.0.0.1", "UNAUTHENTICATED")
        for method, n in _detail(s)["methods"].items():
            methods[method] = methods.get(method, 0) + n
    assert sorted(methods) == ["SandboxesServicer.Get", "SandboxesServicer.List"]
    # summaries went in before it; only the checkpoint that signs it follows
    assert [r.kind for r in d.records()[-2:]] == ["daemon.stop", "audit.checkpoint"]
    assert d.verify().ok


def _flip_prev_hash(db: str, seq: int) -> None:
    """Write 0xff over the first byte of record seq's prev_hash, in the file itself."""
    conn = sqlite3.connect(db)
    prev, digest = conn.execute("SELECT prev_hash, hash FROM records WHERE seq = ?",
                                (seq,)).fetchone()
    conn.close()
    with open(db, "r+b") as f:
        data = f.read()
        at = data.find((prev + digest).encode())  # adjacent columns: unique in the file
        assert at >= 0 and data.find((prev + digest).encode(), at + 1) == -1
        f.seek(at)
        f.write(b"\xff")


def test_a_flipped_byte_is_named_by_verify_and_refused_by_a_full_start(make_daemon):
    d = make_daemon("flip").start()
    client = d.client()
    for _ in range(3):
        client.destroy_sandbox(client.create_sandbox().id)
    assert d.stop() == 0
    assert not os.path.exists(d.audit_db + "-wal") or os.path.getsize(d.audit_db + "-wal") == 0
    _flip_prev_hash(d.audit_db, 4)

    # The CLI on the file: the record and the damage, exit 1, no traceback.
    out = _cli("audit", "verify", "--db", d.audit_db)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == ("audit chain BROKEN at record 4: record 4: its prev_hash is not 64 "
                          "hex digits (damaged)\n")
    # A tail check does not read record 4: the daemon starts, and its Verify says the same.
    d.start()
    out = _cli("audit", "verify", "--socket", d.socket)
    assert (out.returncode, out.stderr) == (
        1, "audit chain BROKEN at record 4: record 4: its prev_hash is not 64 hex digits "
           "(damaged)\n")
    assert d.stop() == 0
    # A full check refuses to start, naming it.
    full = DaemonProcess(d.root, args=("--verify-audit", "full"))
    assert full.run_to_exit() == 1
    assert "record 4: its prev_hash is not 64 hex digits (damaged)" in full.log()


def test_the_log_rotates_into_sealed_segments_that_verify_and_prune_as_one_history(
        make_daemon):
    d = make_daemon("rotate", args=("--audit-segment-records", "8")).start()
    client = d.client()
    ids = []
    for _ in range(8):
        sb = client.create_sandbox()
        ids.append(sb.id)
        client.destroy_sandbox(sb.id)
    # Queries reach the sealed segments: the first sandbox's records are in segment one.
    assert [r.kind for r in client.audit_query(sandbox_id=ids[0])] == [
        "sandbox.create", "sandbox.destroy"]
    before = client.audit_query(limit=10_000)
    out = _cli("audit", "verify", "--socket", d.socket)
    sealed_then = len(list_segments(d.audit_db))
    assert d.stop() == 0
    segments = list_segments(d.audit_db)
    assert sealed_then >= 2 and segments[0].first_seq == 1
    # every segment: 7 records then its seal, which the next segment's first record names
    for seg in segments:
        assert seg.last_seq - seg.first_seq + 1 == 8
    records = d.records()
    for seal in (r for r in records if r.kind == "audit.seal"):
        assert records[seal.seq].prev_hash == seal.hash
    last = records[-1].seq
    assert (out.returncode, out.stdout) == (
        0, f"audit chain OK: {before[-1].seq} records verified ({sealed_then} sealed segments "
           "and the active one)\n"), out.stderr

    # Every sealed segment is older than a second by now: a restart with that retention
    # prunes them all behind an audit.prune record, and verify accounts for the gap.
    time.sleep(1.2)
    kept = DaemonProcess(d.root, args=("--audit-segment-records", "8",
                                       "--audit-retention", "1s")).start()
    assert kept.stop() == 0
    # only segments the new daemon sealed since are left
    assert [s for s in list_segments(d.audit_db) if s.first_seq <= segments[-1].last_seq] == []
    prune = kept.records("audit.prune")[-1]
    assert _detail(prune)["up_to_seq"] == segments[-1].last_seq
    out = _cli("audit", "verify", "--db", d.audit_db)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(
        f"; pruned up to record {segments[-1].last_seq}, as its audit.prune record states)\n")
    assert last < prune.seq


def test_tampering_with_a_sealed_segment_is_named_by_verify(make_daemon):
    d = make_daemon("sealed", args=("--audit-segment-records", "6")).start()
    client = d.client()
    for _ in range(4):
        client.destroy_sandbox(client.create_sandbox().id)
    assert d.stop() == 0
    segment = list_segments(d.audit_db)[0]
    os.chmod(segment.path, 0o600)
    with open(segment.path, "r+b") as f:  # an edit of one byte of a sealed record's text
        data = f.read()
        at = data.find(b"unix:uid=0sandbox.create")  # peer then kind: a table row, no index
        assert at >= 0
        f.seek(at + len(b"unix:uid=0"))
        f.write(b"S")
    conn = sqlite3.connect(segment.path)
    seq = conn.execute("SELECT seq FROM records NOT INDEXED WHERE kind = 'Sandbox.create'"
                       ).fetchone()[0]
    conn.close()
    out = _cli("audit", "verify", "--db", d.audit_db)
    assert (out.returncode, out.stderr) == (
        1, f"audit chain BROKEN at record {seq}: record {seq}: content does not match its "
           "hash\n")
    with AuditLog.open(d.audit_db, readonly=True) as log:
        assert log.verify().broken_at_seq == seq
