"""The audit log's bounds and retention: details that never fail for size, denials that are
counted without a record each, a check that survives any damage, sealed chained segments and
pruning with an anchor."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time

import pytest

from corral.runtime import audit
from corral.runtime.audit import (
    MAX_DETAIL_BYTES,
    PRUNE_KIND,
    SEAL_KIND,
    TRUNCATED,
    AuditLog,
    DenialLimiter,
    list_segments,
)
from corral.sandbox.errors import AuditTampered, InvalidSpec

T0 = 1_700_000_000.0


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "audit.db")


def fill(log: AuditLog, n: int, *, start: int = 0, time: float | None = None) -> None:
    for i in range(start, start + n):
        log.append("exec.start", tenant=f"t{i % 2}", sandbox_id=f"sb{i % 3}",
                   detail={"argv": ["echo", str(i)]}, time=T0 + i if time is None else time)


def sha(value) -> str:
    text = value if isinstance(value, str) else audit._canonical_json(value)
    return hashlib.sha256(text.encode()).hexdigest()


# -- bounded details -----------------------------------------------------------------------------


def test_a_300kb_argument_is_kept_as_its_head_length_and_digest(path):
    big = "x" * 300_000
    with AuditLog.open(path) as log:
        rec = log.append("exec.start", tenant="acme", detail={"argv": ["sh", "-c", big]})
    assert len(rec.detail_json.encode()) <= MAX_DETAIL_BYTES
    assert rec.detail["argv"][:2] == ["sh", "-c"]
    assert rec.detail["argv"][2] == {TRUNCATED: "string", "head": "x" * 4096,
                                     "chars": 300_000, "sha256": sha(big)}


def test_a_long_list_keeps_its_first_items_and_the_digest_of_all(path):
    argv = [str(i) for i in range(100_000)]
    with AuditLog.open(path) as log:
        rec = log.append("exec.start", tenant="acme", detail={"argv": argv})
    assert rec.detail["argv"][:256] == argv[:256]
    assert rec.detail["argv"][256] == {TRUNCATED: "list", "items": 100_000, "sha256": sha(argv)}
    assert len(rec.detail["argv"]) == 257


def test_a_wide_detail_keeps_its_first_keys_and_the_digest_of_all(path):
    wide = {f"k{i:05d}": ["y" * 300] * 300 for i in range(400)}
    with AuditLog.open(path) as log:
        rec = log.append("task.submit", tenant="acme", detail=wide)
    assert len(rec.detail_json.encode()) <= MAX_DETAIL_BYTES
    assert sorted(rec.detail)[:2] == ["corral.truncated", "k00000"]
    assert rec.detail[TRUNCATED] == {"keys": 400, "sha256": sha(wide)}


def test_a_detail_too_big_at_every_level_becomes_a_summary_that_fits(path):
    # 8 x 8 x 8 x 8 strings of control characters (6 bytes of JSON each) outgrow every level
    deep = {f"k{i}": [[["\x01" * 80] * 8] * 8] * 8 for i in range(8)}
    with AuditLog.open(path) as log:
        rec = log.append("task.submit", tenant="acme", detail=deep)
        assert log.verify().ok
    assert len(rec.detail_json.encode()) <= MAX_DETAIL_BYTES
    text = audit._canonical_json(deep)
    assert rec.detail == {TRUNCATED: "detail", "bytes": len(text.encode()), "sha256": sha(text),
                          "keys": [f"k{i}" for i in range(8)], "key_count": 8}


def test_small_details_are_stored_exactly_as_given(path):
    detail = {"argv": ["echo", "é" * 100], "n": 3}
    with AuditLog.open(path) as log:
        rec = log.append("exec.start", tenant="acme", detail=detail)
    assert rec.detail == detail


def test_a_long_id_is_cut_with_its_digest_instead_of_refused(path):
    with AuditLog.open(path) as log:
        rec = log.append("file.write", tenant="acme", sandbox_id="s" * 5000)
    assert len(rec.sandbox_id) <= 1024
    assert rec.sandbox_id.startswith("s" * 896)
    assert rec.sandbox_id.endswith(f"[{TRUNCATED} 5000 chars sha256:{sha('s' * 5000)[:32]}]")


# -- denials ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_denials_past_the_burst_are_counted_into_one_summary(path):
    clock = FakeClock()
    with AuditLog.open(path) as log:
        limiter = DenialLimiter(log, window_s=10.0, burst=3, clock=clock)
        futures = [limiter.deny(tenant="", peer=f"ipv4:10.0.0.7:{4000 + i}",
                                status="UNAUTHENTICATED", method=f"M{i % 2}", reason="bad token")
                   for i in range(50)]
        assert [f is not None for f in futures] == [True] * 3 + [False] * 47
        for f in futures[:3]:
            f.result()
        clock.now += 10.0  # the window is over: the next denial opens a new one
        limiter.deny(tenant="", peer="ipv4:10.0.0.7:9", status="UNAUTHENTICATED",
                     method="M0", reason="bad token").result()
        limiter.close()
    with AuditLog.open(path, readonly=True) as log:
        denied = log.query(kind="denied")
        summaries = log.query(kind="denied.summary")
    assert len(denied) == 4
    assert [s.peer for s in summaries] == ["ipv4:10.0.0.7"]
    detail = summaries[0].detail
    assert (detail["count"], detail["recorded"], detail["status"], detail["methods"]) == (
        47, 3, "UNAUTHENTICATED", {"M0": 23, "M1": 24})
    assert len(denied) + detail["count"] == 51


def test_denials_from_many_addresses_share_one_overflow_window(path):
    with AuditLog.open(path) as log:
        limiter = DenialLimiter(log, window_s=10.0, burst=1, max_keys=4, clock=FakeClock())
        for i in range(100):
            limiter.deny(tenant="", peer=f"ipv4:10.0.{i}.1:80", status="UNAUTHENTICATED",
                         method="M", reason="r")
        limiter.close()
    with AuditLog.open(path, readonly=True) as log:
        denied = log.query(kind="denied", limit=1000)
        summaries = log.query(kind="denied.summary", limit=1000)
    assert len(denied) == 5  # four addresses, then the overflow key's first
    assert [(s.peer, s.detail["count"]) for s in summaries] == [("*", 95)]


def test_a_window_that_ends_quietly_is_summarised_by_the_flusher(path):
    with AuditLog.open(path) as log:
        limiter = DenialLimiter(log, window_s=0.05, burst=1)
        for _ in range(5):
            limiter.deny(tenant="", peer="ipv4:10.0.0.9:1", status="UNAUTHENTICATED",
                         method="M", reason="r")
        deadline = time.monotonic() + 30  # no new denial comes: the flusher thread ends it
        while not log.query(kind="denied.summary") and time.monotonic() < deadline:
            time.sleep(0.01)
        summaries = log.query(kind="denied.summary")
        limiter.close()
    assert [(s.peer, s.detail["count"], s.detail["recorded"]) for s in summaries] == [
        ("ipv4:10.0.0.9", 4, 1)]


def test_closing_the_log_writes_the_open_windows_summaries(path):
    with AuditLog.open(path) as log:
        for _ in range(40):
            log.deny(tenant="acme", peer="unix:uid=0", status="PERMISSION_DENIED",
                     method="Get", reason="not yours")
    with AuditLog.open(path, readonly=True) as log:
        kinds = [r.kind for r in log.query(limit=100)]
        summary = log.query(kind="denied.summary")[0].detail
    assert kinds == ["denied"] * audit.DENIAL_BURST + ["denied.summary"]
    assert summary["count"] == 40 - audit.DENIAL_BURST


# -- verify, whatever the damage -------------------------------------------------------------------


def _raw(path: str, sql: str, params=()) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER records_no_update")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("prev_hash", b"\xff" * 64, "record 5: its prev_hash is not 64 hex digits (damaged)"),
        ("hash", b"\xc3" + b"0" * 63, "record 5: its hash is not 64 hex digits (damaged)"),
        ("tenant", b"t\xff0", "record 5: its tenant is not valid UTF-8 (damaged bytes)"),
        ("detail_json", b'{"argv":["echo","4"\xff}',
         "record 5: its detail_json is not valid UTF-8 (damaged bytes)"),
        ("detail_json", '{"argv":["echo","4"]',
         "record 5: content does not match its hash (detail_json is not JSON)"),
        ("time", "soon", "record 5: its time is not a number (damaged)"),
    ],
)
def test_verify_names_the_damaged_record_whatever_the_bytes(path, column, value, problem):
    with AuditLog.open(path) as log:
        fill(log, 8)
    _raw(path, f"UPDATE records SET {column} = CAST(? AS TEXT) WHERE seq = 5"
         if isinstance(value, bytes) else f"UPDATE records SET {column} = ? WHERE seq = 5",
         (value,))
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.ok, result.broken_at_seq, result.problem) == (False, 5, problem)


def test_verify_reports_a_rehashed_record_whose_detail_is_not_json(path):
    with AuditLog.open(path) as log:
        fill(log, 3)
    conn = sqlite3.connect(path)
    row = conn.execute("SELECT * FROM records WHERE seq = 3").fetchone()
    digest = audit.record_hash(row[8], seq=3, time=row[1], tenant=row[2], peer=row[3],
                               kind=row[4], sandbox_id=row[5], session_id=row[6],
                               detail_json="[1]")
    conn.execute("DROP TRIGGER records_no_update")
    conn.execute("UPDATE records SET detail_json = '[1]', hash = ? WHERE seq = 3", (digest,))
    conn.commit()
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.broken_at_seq, result.problem) == (
        3, "record 3: detail_json is not a JSON object")


def test_verify_reports_an_unreadable_page_instead_of_raising(path):
    with AuditLog.open(path) as log:
        for i in range(400):
            log.append("exec.start", tenant="acme", detail={"pad": "p" * 400, "i": i})
    page = 4096
    with open(path, "r+b") as f:  # wreck a b-tree page in the middle of the table
        f.seek(page * 20)
        f.write(b"\xff" * 64)
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    conn = sqlite3.connect(path)
    readable = []
    for seq in range(1, 401):  # which records SQLite can still read, one by one
        try:
            conn.execute("SELECT * FROM records WHERE seq = ?", (seq,)).fetchone()
            readable.append(seq)
        except sqlite3.DatabaseError:
            break
    conn.close()
    first_bad = readable[-1] + 1
    assert 1 < first_bad < 400
    assert (result.ok, result.broken_at_seq, result.checked) == (False, first_bad, first_bad - 1)
    assert result.problem == (f"record {first_bad} onward: the active segment audit.db cannot "
                              "be read (database disk image is malformed): the file is damaged")


def test_full_check_at_open_refuses_a_chain_broken_in_the_middle(path):
    with AuditLog.open(path) as log:
        fill(log, 10)
    _raw(path, "UPDATE records SET tenant = 'mallory' WHERE seq = 4")
    AuditLog.open(path).close()  # the tail check does not read record 4
    with pytest.raises(AuditTampered, match=r"record 4: content does not match its hash"):
        AuditLog.open(path, verify="full")
    with pytest.raises(InvalidSpec, match=r"^verify_audit: 'most' is not 'full' or 'tail'$"):
        AuditLog.open(path, verify="most")


# -- segments and pruning ----------------------------------------------------------------------


def test_rotation_seals_segments_that_chain_and_verify_as_one_history(path):
    with AuditLog.open(path, segment_records=10) as log:
        fill(log, 35)
        segments = list_segments(path)
        result = log.verify()
        records = log.query(limit=1000)
    # each sealed segment: 9 records then its seal; the next one starts with the seal's hash
    assert [(s.first_seq, s.last_seq) for s in segments] == [(1, 10), (11, 20), (21, 30)]
    assert [r.seq for r in records] == list(range(1, 39))
    seals = [r for r in records if r.kind == SEAL_KIND]
    assert [r.seq for r in seals] == [10, 20, 30]
    for seal in seals:
        assert records[seal.seq].prev_hash == seal.hash  # record seal.seq + 1
    assert seals[1].detail["first_seq"] == 11 and seals[1].detail["records"] == 10
    assert (result.ok, result.checked, result.segments, result.first_seq) == (True, 38, 3, 1)
    for s in segments:
        assert os.stat(s.path).st_mode & 0o777 == 0o400
        assert not os.path.exists(s.path + "-wal")


def test_queries_span_segments_in_both_directions(path):
    with AuditLog.open(path, segment_records=10) as log:
        fill(log, 35)
        # sb0 is every third exec.start (i = 0, 3, 6...); seals at 10, 20, 30 shift the seqs
        sb0 = [r.seq for r in log.query(kind="exec.start", limit=100) if r.sandbox_id == "sb0"]
        assert [r.seq for r in log.query(sandbox_id="sb0", limit=5)] == sb0[:5]
        assert [r.seq for r in log.query(sandbox_id="sb0", limit=5, latest=True)] == sb0[-5:]
        assert len(sb0) == 12 and sb0[:5] == [1, 4, 7, 11, 14]
        latest = log.query(kind="exec.start", limit=4, latest=True)
        assert [r.seq for r in latest] == [35, 36, 37, 38]
        assert [r.seq for r in log.query(after_seq=18, limit=4)] == [19, 20, 21, 22]


def test_reopening_continues_after_the_last_seal(path):
    with AuditLog.open(path, segment_records=5) as log:
        fill(log, 4)  # record 5 is the seal: the active segment is empty
        assert log.last_seq() == 5
    with AuditLog.open(path, segment_records=5) as log:
        rec = log.append("daemon.start", tenant="")
        assert (rec.seq, rec.prev_hash) == (6, log.query(kind=SEAL_KIND)[0].hash)
        assert log.verify().ok


def test_a_crash_after_the_seal_before_the_move_is_finished_at_open(path):
    with AuditLog.open(path) as log:
        fill(log, 3)
        log.append(SEAL_KIND, tenant="", peer="daemon", detail={"first_seq": 1, "records": 4})
    with AuditLog.open(path) as log:
        assert [(s.first_seq, s.last_seq) for s in list_segments(path)] == [(1, 4)]
        assert log.append("daemon.start", tenant="").seq == 5
        assert log.verify().ok


def _sealed_connection(segment_path: str) -> sqlite3.Connection:
    os.chmod(segment_path, 0o600)
    conn = sqlite3.connect(segment_path)
    conn.execute("DROP TRIGGER records_no_update")
    conn.execute("DROP TRIGGER records_no_delete")
    return conn


def test_tampering_with_a_sealed_segment_is_reported(path):
    with AuditLog.open(path, segment_records=10) as log:
        fill(log, 28)
    middle = list_segments(path)[1]
    conn = _sealed_connection(middle.path)
    conn.execute("UPDATE records SET detail_json = ? WHERE seq = 14", ('{"argv":["rm"]}',))
    conn.commit()
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.ok, result.broken_at_seq, result.problem) == (
        False, 14, "record 14: content does not match its hash")
    with pytest.raises(AuditTampered, match="record 14"):
        AuditLog.open(path, verify="full")


def test_a_truncated_or_removed_sealed_segment_is_reported(path):
    with AuditLog.open(path, segment_records=10) as log:
        fill(log, 28)  # 1-10, 11-20, 21-30 sealed; 31 active
    first, middle, _ = list_segments(path)
    conn = _sealed_connection(middle.path)
    conn.execute("DELETE FROM records WHERE seq = 20")  # its seal
    conn.commit()
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        assert log.verify().problem == (
            f"sealed segment {middle.name}: named for records 11-20 but ends at record 19")
    os.unlink(middle.path)
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.broken_at_seq, result.problem) == (
        21, "record 21: previous records 11-20 are missing")
    os.unlink(first.path)  # the oldest, with no audit.prune record to account for it
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.broken_at_seq, result.problem) == (
        21, "record 21: previous records 1-20 are missing")


def test_pruning_removes_old_segments_behind_a_verifiable_anchor(path):
    with AuditLog.open(path, segment_records=10) as log:
        log._clock = lambda: T0
        fill(log, 18, time=T0)  # segments 1-10 and 11-20 (seals at T0)
        log._clock = lambda: T0 + 10_000
        fill(log, 12, start=18, time=T0 + 10_000)  # segment 21-30, newer; then 31-32 active
        removed = log.prune(retention_s=3600)
        prune = log.query(kind=PRUNE_KIND)[0]
        seal_20 = log.query(kind=SEAL_KIND, limit=10)[0]
        result = log.verify()
    assert removed == 2
    assert [(s.first_seq, s.last_seq) for s in list_segments(path)] == [(21, 30)]
    assert seal_20.seq == 30  # the seals of 10 and 20 went with their segments
    first_left = AuditLog.open(path, readonly=True)
    try:
        oldest = first_left.query(limit=1)[0]
    finally:
        first_left.close()
    assert oldest.seq == 21
    assert (prune.seq, prune.detail["up_to_seq"], prune.detail["hash"],
            prune.detail["segments"], prune.detail["first_seq"]) == (
        34, 20, oldest.prev_hash, 2, 1)
    assert (result.ok, result.first_seq, result.segments, result.checked) == (True, 21, 1, 14)


def test_retention_prunes_at_each_rotation(path):
    with AuditLog.open(path, segment_records=5, retention_s=3600) as log:
        log._clock = lambda: T0
        fill(log, 8, time=T0)  # 1-5 and 6-10 sealed at T0
        log._clock = lambda: T0 + 7200
        fill(log, 4, start=8, time=T0 + 7200)  # 11-15 sealed: 1-10 are past retention
        assert [(s.first_seq, s.last_seq) for s in list_segments(path)] == [(11, 15)]
        assert log.query(kind=PRUNE_KIND)[0].detail["up_to_seq"] == 10
        assert log.verify().ok


def test_removing_more_than_the_prune_anchor_states_is_reported(path):
    with AuditLog.open(path, segment_records=10) as log:
        log._clock = lambda: T0
        fill(log, 9, time=T0)
        log._clock = lambda: T0 + 10_000
        fill(log, 20, start=9, time=T0 + 10_000)  # 11-20, 21-30 sealed; 31-33 active
        assert log.prune(retention_s=3600) == 1  # up to record 10, as record 33
    os.unlink(list_segments(path)[0].path)  # 11-20: not pruned, removed
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.broken_at_seq, result.problem) == (
        11, "records 11-20 are missing: the log was pruned only up to record 10 (record 33)")


def test_a_forged_prune_anchor_is_reported(path):
    with AuditLog.open(path, segment_records=10) as log:
        fill(log, 12, time=T0)  # 1-10 sealed, 11-13 active
        log.append(PRUNE_KIND, tenant="", peer="daemon",
                   detail={"up_to_seq": 10, "hash": "ab" * 32})
    os.unlink(list_segments(path)[0].path)
    with AuditLog.open(path, readonly=True) as log:
        result = log.verify()
    assert (result.broken_at_seq, result.problem) == (
        14, "record 14: audit.prune says record 10 had hash abababababababab..., which does "
            "not match the chain")


def test_rotation_waits_while_a_check_holds_the_files(path):
    with AuditLog.open(path, segment_records=5) as log:
        lock = audit._files_lock(path, exclusive=False)
        try:
            fill(log, 8)
            assert list_segments(path) == []  # a verify is reading: nothing moved
        finally:
            audit._release(lock)
        log.rotate()
        assert [(s.first_seq, s.last_seq) for s in list_segments(path)] == [(1, 9)]
        assert log.verify().ok


def test_a_rotation_that_waited_is_retried_a_second_later_not_records_later(path):
    now = [100.0]
    with AuditLog.open(path, segment_records=5) as log:
        log._monotonic = lambda: now[0]
        lock = audit._files_lock(path, exclusive=False)
        try:
            fill(log, 4)  # 1-4, and the seal's turn: a verify is reading, so it waits
        finally:
            audit._release(lock)
        fill(log, 1, start=4)  # within the second: still waiting
        assert list_segments(path) == []
        now[0] += audit.ROTATE_RETRY_S
        fill(log, 1, start=5)  # the first record after it seals
        assert [(s.first_seq, s.last_seq) for s in list_segments(path)] == [(1, 7)]
        assert log.verify().ok


def test_a_prune_record_that_fills_the_segment_seals_it(path):
    # The prune holds the files lock while its record is written; the seal that record
    # makes due must still follow, not wait for a rotation that can never take the lock.
    with AuditLog.open(path, segment_records=5) as log:
        log._clock = lambda: T0
        fill(log, 8, time=T0)  # 1-4 + seal 5, 6-9 + seal 10
        log._clock = lambda: T0 + 7200
        fill(log, 3, start=8, time=T0 + 7200)  # 11-13 active
        assert log.prune(retention_s=3600) == 2  # record 14, the fourth of five
        assert [(s.first_seq, s.last_seq) for s in list_segments(path)] == [(11, 15)]
        assert log.query(kind=PRUNE_KIND)[0].seq == 14
        fill(log, 1, start=11, time=T0 + 7200)
        assert log.last_seq() == 16
        assert log.verify().ok


def test_rotation_by_bytes(path):
    with AuditLog.open(path, segment_bytes=8192) as log:
        for i in range(40):
            log.append("file.write", tenant="acme", detail={"path": "p" * 500, "i": i})
        assert len(list_segments(path)) >= 2
        assert log.verify().ok
        exported = []
        log.export_jsonl(_Collect(exported))
        last = log.last_seq()
    assert [json.loads(line)["seq"] for line in "".join(exported).splitlines()] == list(
        range(1, last + 1))
    assert audit.verify_records(json.loads(line) for line in "".join(exported).splitlines()).ok


class _Collect:
    def __init__(self, out: list):
        self.out = out

    def write(self, text: str) -> None:
        self.out.append(text)
