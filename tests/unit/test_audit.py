"""The audit log: appends chain, queries filter, and every kind of tampering on disk is named.

Tampering goes through a separate sqlite3 connection on the database file, as an attacker (or a
careless tool) with write access to the file would; it first drops the append-only triggers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from corral.runtime import audit
from corral.runtime.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditRecord,
    VerifyResult,
    format_record,
    record_hash,
    verify_records,
)
from corral.sandbox.errors import AuditError, AuditTampered, CorralError, InvalidSpec

T0 = 1_700_000_000.0


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "audit.db")


@pytest.fixture
def log(path):
    with AuditLog.open(path) as log:
        yield log


def fill(log: AuditLog, n: int) -> list[AuditRecord]:
    return [
        log.append(
            "exec.start",
            tenant=f"t{i % 2}",
            sandbox_id=f"sb{i % 3}",
            detail={"argv": ["echo", str(i)]},
            time=T0 + i,
        )
        for i in range(1, n + 1)
    ]


def tamper(path: str, *statements: tuple) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER IF EXISTS records_no_update")
    conn.execute("DROP TRIGGER IF EXISTS records_no_delete")
    for statement in statements:
        conn.execute(*statement)
    conn.commit()
    conn.close()


def row(path: str, seq: int) -> tuple:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            f"SELECT {audit._COLUMNS} FROM records WHERE seq = ?", (seq,)
        ).fetchone()
    finally:
        conn.close()


def broken(result: VerifyResult) -> tuple[int, str]:
    assert not result.ok
    return result.broken_at_seq, result.problem


# -- appending ---------------------------------------------------------------------------------


def test_append_builds_a_hash_chain(log):
    records = fill(log, 5)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in zip(records, records[1:], strict=False):
        assert after.prev_hash == before.hash
    for r in records:
        fields = r.to_dict()
        del fields["prev_hash"], fields["hash"]
        assert r.hash == record_hash(r.prev_hash, **fields)
    assert log.last_seq() == 5
    assert log.query() == records


def test_hash_covers_the_documented_canonical_encoding():
    content = (
        '{"detail_json":"{\\"a\\":1,\\"b\\":\\"é\\"}","kind":"exec.start","peer":"",'
        '"sandbox_id":"sb","seq":1,"session_id":"","tenant":"acme","time":1700000000.25}'
    )
    expected = hashlib.sha256((GENESIS_HASH + content).encode()).hexdigest()
    assert expected == record_hash(
        GENESIS_HASH, seq=1, time=1700000000.25, tenant="acme", peer="", kind="exec.start",
        sandbox_id="sb", session_id="", detail_json='{"a":1,"b":"é"}',
    )  # fmt: skip


def test_detail_is_stored_canonically(log):
    rec = log.append("x", tenant="t", detail={"b": (1, 2), "a": {"z": None, "y": 1.5}})
    assert rec.detail == {"a": {"y": 1.5, "z": None}, "b": [1, 2]}
    assert rec.detail_json == '{"a":{"y":1.5,"z":null},"b":[1,2]}'
    assert row(log.path, 1)[7] == rec.detail_json
    assert log.query()[0].detail == rec.detail


def test_default_time_is_now_and_ids_default_empty(log):
    before = time.time()
    rec = log.append("daemon.start", tenant="")
    assert before <= rec.time <= time.time()
    assert (rec.peer, rec.sandbox_id, rec.session_id, rec.detail) == ("", "", "", {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": ""}, r"^kind: is empty; use a dotted name such as 'exec\.start'$"),
        ({"kind": "Exec.start"}, r"^kind: 'Exec\.start' is not a kind: use at most 128 of .*$"),
        ({"kind": "1exec"}, r"^kind: '1exec' is not a kind: .*$"),
        ({"kind": "exec start"}, r"^kind: 'exec start' is not a kind: .*$"),
        ({"kind": 7}, r"^kind: must be a string, got int$"),
        ({"detail": {"x": object()}}, r"^detail: is not JSON-serializable: .*object.*$"),
        ({"detail": {"x": float("nan")}}, r"^detail: is not JSON-serializable: .*$"),
        ({"detail": ["not", "a", "dict"]}, r"^detail: must be a dict, got list$"),
        ({"detail": {"x": "\ud800"}}, r"^detail: is not valid Unicode \(a lone surrogate\)$"),
        ({"tenant": None}, r"^tenant: must be a string, got NoneType$"),
        ({"peer": "a\x00b"}, r"^peer: contains a NUL character$"),
        ({"time": float("inf")}, r"^time: inf is not a time; use Unix seconds >= 0$"),
        ({"time": "now"}, r"^time: must be Unix seconds \(a number\), got str$"),
    ],
)
def test_append_rejects_bad_input_naming_the_field(log, kwargs, message):
    args = {"kind": "exec.start", "tenant": "acme", **kwargs}
    with pytest.raises(InvalidSpec, match=message):
        log.append(args.pop("kind"), **args)
    assert log.last_seq() == 0  # nothing written


# -- querying ----------------------------------------------------------------------------------


@pytest.fixture
def varied(log):
    specs = [
        ("sandbox.create", "acme", "sb1", ""),
        ("exec.start", "acme", "sb1", ""),
        ("session.open", "acme", "sb1", "s1"),
        ("session.input", "acme", "sb1", "s1"),
        ("sandbox.create", "globex", "sb2", ""),
        ("exec.exit", "globex", "sb2", ""),
        ("sandbox.destroy", "acme", "sb1", ""),
        ("denied", "globex", "sb1", ""),
    ]
    for i, (kind, tenant, sandbox_id, session_id) in enumerate(specs, start=1):
        log.append(kind, tenant=tenant, sandbox_id=sandbox_id, session_id=session_id, time=T0 + i)
    return log


@pytest.mark.parametrize(
    ("filters", "seqs"),
    [
        ({}, [1, 2, 3, 4, 5, 6, 7, 8]),
        ({"since": T0 + 3}, [3, 4, 5, 6, 7, 8]),
        ({"until": T0 + 3}, [1, 2]),
        ({"since": T0 + 2, "until": T0 + 5}, [2, 3, 4]),
        ({"sandbox_id": "sb2"}, [5, 6]),
        ({"session_id": "s1"}, [3, 4]),
        ({"tenant": "globex"}, [5, 6, 8]),
        ({"kind": "sandbox.create"}, [1, 5]),
        ({"kind": "sandbox."}, [1, 5, 7]),
        ({"kind": "session."}, [3, 4]),
        ({"kind": "sandbox"}, []),  # exact: no record's kind is just "sandbox"
        ({"kind": "denied"}, [8]),
        ({"limit": 3}, [1, 2, 3]),
        ({"limit": 3, "latest": True}, [6, 7, 8]),
        ({"after_seq": 6}, [7, 8]),
        ({"after_seq": 2, "limit": 2}, [3, 4]),
        ({"tenant": "acme", "kind": "sandbox.", "sandbox_id": "sb1"}, [1, 7]),
        ({"sandbox_id": "", "session_id": None}, [1, 2, 3, 4, 5, 6, 7, 8]),  # "" = any
    ],
)
def test_query_filters(varied, filters, seqs):
    assert [r.seq for r in varied.query(**filters)] == seqs


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"limit": 0}, r"^limit: 0 must be between 1 and 10000$"),
        ({"limit": 10_001}, r"^limit: 10001 must be between 1 and 10000$"),
        ({"after_seq": -1}, r"^after_seq: -1 must be at least 0$"),
        ({"kind": "Sandbox."}, r"^kind: 'Sandbox\.' is not a kind: .*$"),
        ({"since": T0, "until": T0 - 1}, r"^until: 1699999999\.0 is before since .*$"),
        ({"since": "yesterday"}, r"^since: must be Unix seconds \(a number\), got str$"),
    ],
)
def test_query_rejects_bad_filters(varied, filters, message):
    with pytest.raises(InvalidSpec, match=message):
        varied.query(**filters)


# -- verifying, and tampering on disk ----------------------------------------------------------


def test_verify_an_intact_chain(log):
    assert log.verify() == VerifyResult(ok=True, checked=0)
    fill(log, 10)
    assert log.verify() == VerifyResult(ok=True, checked=10)


def test_edited_record_is_named(log):
    fill(log, 10)
    tamper(log.path, ("UPDATE records SET detail_json = ? WHERE seq = 3", ('{"argv":["rm"]}',)))
    assert broken(log.verify()) == (3, "record 3: content does not match its hash")


def test_edited_metadata_is_named(log):
    fill(log, 10)
    tamper(log.path, ("UPDATE records SET tenant = 'mallory' WHERE seq = 7",))
    assert broken(log.verify()) == (7, "record 7: content does not match its hash")


def test_removed_record_is_named(log):
    fill(log, 10)
    tamper(log.path, ("DELETE FROM records WHERE seq = 5",))
    assert broken(log.verify()) == (6, "record 6: previous record 5 is missing")


def test_removed_run_of_records_is_named(log):
    fill(log, 10)
    tamper(log.path, ("DELETE FROM records WHERE seq BETWEEN 1 AND 3",))
    assert broken(log.verify()) == (4, "record 4: previous records 1-3 are missing")


def test_reordered_records_are_named(log):
    fill(log, 10)
    tamper(
        log.path,
        ("UPDATE records SET seq = -5 WHERE seq = 5",),
        ("UPDATE records SET seq = 5 WHERE seq = 3",),
        ("UPDATE records SET seq = 3 WHERE seq = -5",),
    )
    assert broken(log.verify()) == (
        3,
        "record 3: out of order: its prev_hash is the hash of record 4, not of record 2: "
        "records were reordered",
    )


def test_edited_and_rehashed_record_breaks_the_next_link(log):
    fill(log, 10)
    seq, t, tenant, peer, kind, sandbox_id, session_id, _, prev_hash, _ = row(log.path, 3)
    forged = '{"argv":["echo","innocent"]}'
    new_hash = record_hash(
        prev_hash, seq=seq, time=t, tenant=tenant, peer=peer, kind=kind,
        sandbox_id=sandbox_id, session_id=session_id, detail_json=forged,
    )  # fmt: skip
    tamper(
        log.path, ("UPDATE records SET detail_json = ?, hash = ? WHERE seq = 3", (forged, new_hash))
    )
    assert broken(log.verify()) == (
        4,
        "record 4: prev_hash does not match the hash of record 3: "
        "record 3 was edited and re-hashed",
    )


def test_rehashed_last_record_is_caught_by_the_head_anchor(log):
    fill(log, 10)
    seq, t, tenant, peer, kind, sandbox_id, session_id, _, prev_hash, _ = row(log.path, 10)
    new_hash = record_hash(
        prev_hash, seq=seq, time=t, tenant=tenant, peer=peer, kind=kind,
        sandbox_id=sandbox_id, session_id=session_id, detail_json="{}",
    )  # fmt: skip
    tamper(
        log.path, ("UPDATE records SET detail_json = '{}', hash = ? WHERE seq = 10", (new_hash,))
    )
    assert broken(log.verify()) == (
        10,
        "record 10: hash does not match the head anchor: the chain was rewritten",
    )


def test_tail_truncation_is_caught_by_the_head_anchor(log):
    fill(log, 10)
    tamper(log.path, ("DELETE FROM records WHERE seq > 8",))
    result = log.verify()
    assert result.checked == 8
    assert broken(result) == (
        9,
        "chain ends at record 8 but the head anchor says 10: records were removed from the end",
    )


def test_removing_every_record_is_caught(log):
    fill(log, 3)
    tamper(log.path, ("DELETE FROM records",))
    assert broken(log.verify()) == (
        1,
        "chain is empty but the head anchor says 3: records were removed from the end",
    )


def test_missing_head_anchor_is_reported(log):
    fill(log, 3)
    os.unlink(log.head_path)
    assert broken(log.verify()) == (
        0,
        f"head anchor missing: {log.head_path} does not exist, so records removed from the end "
        "cannot be detected",
    )


def test_unreadable_head_anchor_is_reported(log):
    fill(log, 3)
    with open(log.head_path, "r+b") as f:
        f.write(b"x" * 256)
    assert broken(log.verify()) == (
        0,
        f"head anchor unreadable: {log.head_path} holds no valid (seq, hash) line",
    )


def test_torn_head_slot_falls_back_to_the_previous_head(path):
    with AuditLog.open(path) as log:
        fill(log, 4)
    with open(path + ".head", "r+b") as f:  # record 4 lives in slot 0: tear it
        f.seek(40)
        f.write(b"\0\0\0")
    assert audit._read_head(path + ".head") == audit.HeadAnchor(3, row(path, 3)[9])
    with AuditLog.open(path) as log:  # the lagging anchor is moved on and rewritten whole
        assert log.verify() == VerifyResult(ok=True, checked=4)
    assert audit._read_head(path + ".head") == audit.HeadAnchor(4, row(path, 4)[9])


def test_verify_reports_the_first_problem_in_chain_order(log):
    fill(log, 10)
    tamper(
        log.path,
        ("DELETE FROM records WHERE seq > 8",),
        ("UPDATE records SET kind = 'x' WHERE seq = 6",),
        ("UPDATE records SET kind = 'y' WHERE seq = 2",),
    )
    assert broken(log.verify()) == (2, "record 2: content does not match its hash")


def test_records_refuse_update_and_delete_while_triggers_stand(log):
    fill(log, 2)
    conn = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.IntegrityError, match=r"^audit records are append-only$"):
        conn.execute("UPDATE records SET tenant = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match=r"^audit records are append-only$"):
        conn.execute("DELETE FROM records WHERE seq = 2")
    conn.close()
    assert log.verify().ok


# -- reopening ---------------------------------------------------------------------------------


def test_reopen_continues_the_chain(path):
    with AuditLog.open(path) as log:
        first = fill(log, 3)
    with AuditLog.open(path) as log:
        assert log.last_seq() == 3
        rec = log.append("daemon.start", tenant="")
        assert (rec.seq, rec.prev_hash) == (4, first[-1].hash)
        assert log.verify() == VerifyResult(ok=True, checked=4)


def test_open_refuses_a_truncated_log_but_readonly_inspects_it(path):
    with AuditLog.open(path) as log:
        fill(log, 6)
    tamper(path, ("DELETE FROM records WHERE seq > 4",))
    pattern = (
        r"^audit log .*: failed its integrity check: chain ends at record 4 but the head "
        r"anchor says 6: records were removed from the end; keep it as evidence .*$"
    )
    with pytest.raises(AuditTampered, match=pattern) as caught:
        AuditLog.open(path)
    assert caught.value.broken_at_seq == 5
    assert caught.value.grpc_status == "DATA_LOSS"
    assert audit._read_head(path + ".head").seq == 6  # the evidence was not overwritten
    with AuditLog.open(path, readonly=True) as ro:
        assert ro.last_seq() == 4
        assert len(ro.query()) == 4
        assert broken(ro.verify())[0] == 5
        with pytest.raises(AuditError, match=r"^audit log .*: is open read-only$"):
            ro.append("x", tenant="t")


def test_open_refuses_a_log_whose_anchor_was_deleted(path):
    with AuditLog.open(path) as log:
        fill(log, 2)
    os.unlink(path + ".head")
    pattern = r"^audit log .*: failed its integrity check: head anchor missing: .*\.head .*$"
    with pytest.raises(AuditTampered, match=pattern):
        AuditLog.open(path)
    assert not os.path.exists(path + ".head")


def test_open_moves_a_lagging_anchor_on_after_a_crash(path):
    with AuditLog.open(path) as log:
        records = fill(log, 5)
    # A crash between the commit of record 5 and its anchor write leaves the anchor at 4.
    with open(path + ".head", "r+b") as f:
        f.write(audit._head_slot(4, records[3].hash) * 2)
    with AuditLog.open(path) as log:
        assert audit._read_head(log.head_path) == audit.HeadAnchor(5, records[4].hash)
        assert log.append("daemon.start", tenant="").seq == 6
        assert log.verify().ok


def test_open_checks_records_past_a_lagging_anchor(path):
    with AuditLog.open(path) as log:
        records = fill(log, 5)
    with open(path + ".head", "r+b") as f:
        f.write(audit._head_slot(3, records[2].hash) * 2)
    tamper(path, ("UPDATE records SET kind = 'x' WHERE seq = 5",))
    with pytest.raises(AuditTampered, match=r"^.*: record 5: content does not match its hash; .*$"):
        AuditLog.open(path)


def test_sigkill_mid_append_then_reopen_continues_a_valid_chain(path):
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from corral.runtime.audit import AuditLog\n"
            "log = AuditLog.open(sys.argv[1])\n"
            "while True:\n"
            "    log.append('session.input', tenant='t', detail={'bytes': 5})\n",
            path,
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
            head = audit._read_head(path + ".head")  # a problem string until it exists
            if isinstance(head, audit.HeadAnchor) and head.seq >= 50:
                break
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    with AuditLog.open(path) as log:
        before = log.last_seq()
        assert before >= 50
        assert log.append("daemon.start", tenant="").seq == before + 1
        assert log.verify() == VerifyResult(ok=True, checked=before + 1)


def test_second_writer_is_refused(log):
    pattern = r"^audit log .*: is already open for writing by another process$"
    with pytest.raises(AuditError, match=pattern):
        AuditLog.open(log.path)
    log.close()
    AuditLog.open(log.path).close()  # the lock goes with close


def test_files_are_private(log):
    fill(log, 1)
    for suffix in ("", "-wal", "-shm", ".head"):
        assert stat.S_IMODE(os.stat(log.path + suffix).st_mode) == 0o600, suffix


def test_not_an_audit_log(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database at all, just some text\n" * 20)
    pattern = r"^audit log .*notes\.txt: is not a Corral audit log \(file is not a database\)$"
    with pytest.raises(AuditError, match=pattern):
        AuditLog.open(str(text))
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    pattern = (
        r"^audit log .*other\.db: is not a Corral audit log "
        r"\(a SQLite database of something else\)$"
    )
    with pytest.raises(AuditError, match=pattern):
        AuditLog.open(str(other))
    assert not os.path.exists(str(other) + ".head")
    with pytest.raises(AuditError, match=r"^audit log .*missing\.db: does not exist$"):
        AuditLog.open(str(tmp_path / "missing.db"), readonly=True)


def test_audit_errors_join_the_error_tree():
    assert issubclass(AuditTampered, AuditError)
    assert issubclass(AuditError, CorralError)
    assert AuditError.grpc_status == "INTERNAL"


def test_closed_log_refuses_work(path):
    log = AuditLog.open(path)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditError, match=r"^audit log .*: is closed$"):
        log.append("x", tenant="t")
    with pytest.raises(AuditError, match=r"^audit log .*: is closed$"):
        log.query()


# -- threads and subscribers -------------------------------------------------------------------


def test_concurrent_appends_keep_one_valid_chain(log):
    errors = []

    def worker(n: int) -> None:
        try:
            for i in range(500):
                log.append("session.input", tenant=f"t{n}", detail={"i": i})
        except Exception as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    records = log.query(limit=10_000)
    assert [r.seq for r in records] == list(range(1, 2001))
    for n in range(4):  # each thread's own records keep their order
        assert [r.detail["i"] for r in records if r.tenant == f"t{n}"] == list(range(500))
    assert log.verify() == VerifyResult(ok=True, checked=2000)


def test_subscribers_get_every_record_in_order(log):
    got_a, got_b = [], []
    token_a = log.subscribe(got_a.append)
    log.subscribe(got_b.append)
    fill(log, 3)
    assert log.unsubscribe(token_a) is True
    assert log.unsubscribe(token_a) is False
    log.append("x", tenant="t")
    assert [r.seq for r in got_a] == [1, 2, 3]
    assert got_b == log.query()


def test_subscriber_order_holds_under_concurrent_appends(log):
    got = []
    log.subscribe(got.append)
    threads = [
        threading.Thread(target=lambda: [log.append("x", tenant="t") for _ in range(100)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.seq for r in got] == list(range(1, 401))


def test_a_failing_subscriber_does_not_break_append(log, caplog):
    def explode(record):
        raise RuntimeError("subscriber bug")

    got = []
    log.subscribe(explode)
    log.subscribe(got.append)
    rec = log.append("x", tenant="t")
    assert got == [rec]
    assert log.statistics().callback_errors == 1
    assert "audit subscriber" in caplog.text
    assert log.verify().ok


# -- export, and checking a shipped copy -------------------------------------------------------


def test_export_jsonl_round_trip(log, tmp_path):
    fill(log, 20)
    out = tmp_path / "ship.jsonl"
    assert log.export_jsonl(str(out)) == 20
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    lines = out.read_text().splitlines()
    shipped = [AuditRecord.from_dict(json.loads(line)) for line in lines]
    assert shipped == log.query()
    assert [json.loads(line) for line in lines] == [r.to_dict() for r in shipped]
    assert verify_records(json.loads(line) for line in lines) == VerifyResult(True, 20)
    assert verify_records(shipped) == VerifyResult(True, 20)

    buffer = io.StringIO()  # an open file, and a later batch: the copy continues the chain
    assert log.export_jsonl(buffer, after_seq=15) == 5
    tail = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [d["seq"] for d in tail] == [16, 17, 18, 19, 20]
    assert tail[0]["prev_hash"] == shipped[14].hash
    assert verify_records(tail) == VerifyResult(True, 5)

    binary = io.BytesIO()
    assert log.export_jsonl(binary, after_seq=19) == 1
    assert json.loads(binary.getvalue()) == shipped[-1].to_dict()


def test_verify_records_catches_tampering_in_a_shipped_copy(log):
    fill(log, 6)
    buffer = io.StringIO()
    log.export_jsonl(buffer)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    lines[2]["detail_json"] = '{"argv":["rm","-rf","/"]}'
    assert broken(verify_records(lines)) == (3, "record 3: content does not match its hash")
    del lines[2]
    assert broken(verify_records(lines)) == (4, "record 4: previous record 3 is missing")
    del lines[1]["seq"]
    assert broken(verify_records(lines)) == (0, "entry 2: has no integer seq")


def test_export_keeps_tampered_text_verbatim(log):
    fill(log, 3)
    tamper(log.path, ("UPDATE records SET detail_json = ? WHERE seq = 2", ('{ "spaced" : 1 }',)))
    buffer = io.StringIO()
    log.export_jsonl(buffer)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert lines[1]["detail_json"] == '{ "spaced" : 1 }'
    assert broken(verify_records(lines)) == broken(log.verify())


def test_export_of_text_that_is_not_utf8_keeps_every_row(log):
    """SQLite's fast decoder refuses such text; the export goes on from that row with
    the byte-keeping decoder, in order, losing and repeating nothing."""
    fill(log, 5000)  # more than one batch before and after the bad row
    tamper(log.path, ("UPDATE records SET tenant = CAST(? AS TEXT) WHERE seq = 3000",
                      (b"t\xff\xfe",)))
    buffer = io.BytesIO()
    assert log.export_jsonl(buffer) == 5000
    lines = [json.loads(line) for line in buffer.getvalue().decode("utf-8",
                                                                  "surrogateescape").splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 5001))
    assert lines[2999]["tenant"] == "t\udcff\udcfe"
    assert broken(verify_records(lines)) == broken(log.verify())
    assert broken(log.verify())[0] == 3000


# -- for people --------------------------------------------------------------------------------


def test_format_record():
    rec = AuditRecord(
        seq=42, time=1712345678.5, tenant="acme", peer="uid=1000 pid=7", kind="exec.start",
        sandbox_id="sb-1", session_id="s-9", detail={"argv": ["ls", "-l"]}, prev_hash="0" * 64,
        hash="1" * 64,
    )  # fmt: skip
    assert format_record(rec) == (
        "2024-04-05T19:34:38.500Z #42 acme exec.start sandbox=sb-1 session=s-9 "
        'peer="uid=1000 pid=7" {"argv":["ls","-l"]}'
    )


def test_format_record_is_terminal_safe_and_short():
    rec = AuditRecord(
        seq=1, time=0.0, tenant="evil\x1b[2J", peer="", kind="denied", sandbox_id="",
        session_id="", detail={"text": "\u202e" + "x" * 1000}, prev_hash="", hash="",
    )  # fmt: skip
    line = format_record(rec)
    assert line.startswith("1970-01-01T00:00:00.000Z #1 evil\\x1b[2J denied {")
    assert "\x1b" not in line and "\u202e" not in line and "\\u202e" in line
    assert line.endswith("…") and len(line) < 300


# -- group commit (submit) ---------------------------------------------------------------------


def test_records_queued_behind_a_commit_share_one_transaction(log):
    log.append("first", tenant="t")
    before = log.statistics()
    with log._lock:  # a commit in progress: everything submitted now queues behind it
        futures = [log.submit("queued", tenant="t", detail={"i": i}) for i in range(50)]
        assert not any(f.done() for f in futures)
    records = [f.result(timeout=10) for f in futures]
    after = log.statistics()
    assert [r.seq for r in records] == list(range(2, 52))
    assert [r.detail["i"] for r in records] == list(range(50))
    assert after.appends - before.appends == 50
    assert after.commits - before.commits == 1  # one transaction, one fsync, for all 50
    assert log.verify().ok
    assert [r.seq for r in log.query(kind="queued", limit=100)] == list(range(2, 52))


def test_append_and_submit_keep_call_order(log):
    with log._lock:
        queued = log.submit("a", tenant="t")
    # append writes what was submitted before it first, in the same transaction
    rec = log.append("b", tenant="t")
    assert queued.result(timeout=10).seq == rec.seq - 1
    assert [r.kind for r in log.query(limit=10)] == ["a", "b"]


def test_submit_validates_at_once_and_close_writes_what_is_queued(path):
    log = AuditLog.open(path)
    with pytest.raises(InvalidSpec, match="^kind"):
        log.submit("Bad Kind", tenant="t")
    with log._lock:
        futures = [log.submit("late", tenant="t") for _ in range(5)]
    log.close()
    assert [f.result(timeout=10).seq for f in futures] == [1, 2, 3, 4, 5]
    with pytest.raises(AuditError, match="is closed"):
        log.submit("after", tenant="t")
    with AuditLog.open(path, readonly=True) as ro:
        assert ro.last_seq() == 5 and ro.verify().ok
        with pytest.raises(AuditError, match="read-only"):
            ro.submit("x", tenant="t")


def test_a_failed_group_fails_every_record_in_it_and_writes_none(log, path):
    log.append("first", tenant="t")
    other = sqlite3.connect(path)
    other.execute("DROP TRIGGER IF EXISTS records_no_update")
    # something else takes seq 3: the group 2-4 collides and must leave no partial write
    row = other.execute("SELECT * FROM records WHERE seq = 1").fetchone()
    other.execute(f"INSERT INTO records VALUES ({', '.join('?' * len(row))})", (3, *row[1:]))
    other.commit()
    other.close()
    with log._lock:
        futures = [log.submit("g", tenant="t") for _ in range(3)]
    for f in futures:
        with pytest.raises(AuditError, match="collide with existing ones"):
            f.result(timeout=10)
    assert [r.seq for r in log.query(limit=10)] == [1, 3]
