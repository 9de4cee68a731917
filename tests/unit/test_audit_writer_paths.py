"""The audit writer's hot paths give exactly what the reference encoders give.

The writer hashes records with `audit._chained_hash` and encodes the daemon's flat details
with `audit._encode_flat_detail`. Each must agree byte for byte with the reference
(`record_hash`, `_encode_detail`), or `corral audit verify` would reject logs the daemon
wrote. The inputs here are
hostile on purpose: quotes, backslashes, control characters, non-BMP text, huge ints, times
with long reprs.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from corral.runtime import audit
from corral.runtime.audit_records import _encode_detail, record_hash
from corral.sandbox.errors import InvalidSpec

HOSTILE_TEXT = [
    "", "plain", 'quote " and \\ backslash', "tab\tnewline\nreturn\r", "\x01\x1f\x7f",
    "é ü ß", "日本語", "emoji \U0001F600 astral", "\u2028\u2029 separators", "</script>",
    "a" * 1024,
]
TIMES = [0.0, 1.0, 1733355000.123456, 1e-7, 123456789012.5, 0.1 + 0.2, 5e-324]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
@pytest.mark.parametrize("when", TIMES)
def test_chained_hash_is_record_hash(text, when):
    item = audit._prepare("session.input", "", tenant=text, peer=text[::-1],
                          sandbox_id=text[:7], session_id=text[-9:], detail={"t": text})
    for seq in (1, 42, 2**53 + 1):
        expected = record_hash(
            "ab" * 32, seq=seq, time=when, tenant=item.tenant, peer=item.peer,
            kind=item.kind, sandbox_id=item.sandbox_id, session_id=item.session_id,
            detail_json=item.detail_json,
        )  # fmt: skip
        assert audit._chained_hash("ab" * 32, seq, when, item) == expected


FLAT_DETAILS = [
    {}, {"bytes": 12, "turn": 3}, {"ok": True, "no": False, "none": None},
    {"big": 2**80, "neg": -7, "zero": 0}, {"z": "last", "a": "first", "m": "middle"},
    {text[:40] or "k": text for text in HOSTILE_TEXT}, {"\U0001F600": "\x00 nul"},
]


@pytest.mark.parametrize("detail", FLAT_DETAILS)
def test_flat_detail_encodes_as_the_general_path(detail):
    assert audit._encode_flat_detail(detail) == _encode_detail(detail)


@pytest.mark.parametrize("detail", [
    None, {"nested": {"a": 1}}, {"list": [1, 2]}, {"float": 1.5}, {1: "int key"},
    {"huge": "x" * (audit.MAX_DETAIL_BYTES + 1)}, {"surrogate": "\ud800"},
    {f"k{i}": i for i in range(33)},
])
def test_other_details_take_the_general_path(detail):
    assert audit._encode_flat_detail(detail) is None


def test_a_lone_surrogate_is_still_refused_by_name(tmp_path):
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        with pytest.raises(InvalidSpec, match="detail.*lone surrogate"):
            log.append("session.input", tenant="t", detail={"text": "\udcff"})
        assert log.last_seq() == 0


def test_a_huge_flat_detail_is_bounded_as_before(tmp_path):
    detail = {"text": "y" * (audit.MAX_DETAIL_BYTES * 2)}
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        record = log.append("exec.start", tenant="t", detail=detail)
    assert record.detail == _encode_detail(detail)[1]
    assert record.detail != detail


@pytest.mark.parametrize("group", [1, 5, 64, 300])
def test_a_group_commit_of_many_records_verifies(tmp_path, group):
    path = str(tmp_path / "a.db")
    with audit.AuditLog.open(path) as log:
        log.policy_digest = "sha256:" + "cd" * 32
        futures = [
            log.submit("session.input", tenant="t", peer="ipv4:127.0.0.1:1",
                       sandbox_id="sb", session_id=f"ss-{i}", detail={"bytes": i, "turn": 1})
            for i in range(group)
        ]  # fmt: skip
        records = [f.result() for f in futures]
        assert [r.seq for r in records] == list(range(1, group + 1))
        assert log.verify() == audit.VerifyResult(ok=True, checked=group)
        stored = log.query(limit=group)
    assert [(r.seq, r.hash, r.detail) for r in stored] == [
        (r.seq, r.hash, r.detail) for r in records]
    with audit.AuditLog.open(path, readonly=True) as reader:
        assert reader.verify().ok
        assert reader.last_seq() == group


def _background(log, count: int, first: int = 0) -> list:
    return [log.submit_background("session.input", tenant="t", session_id=f"ss-{i}",
                                  detail={"bytes": i, "turn": 1})
            for i in range(first, first + count)]


def test_background_records_wait_for_an_awaited_one_and_share_its_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "BACKGROUND_COALESCE_S", 60.0)
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        log.append("warmup", tenant="t")
        before = log.statistics().commits
        waiting = _background(log, 3)
        concurrent.futures.wait(waiting, timeout=0.2)
        assert [f.done() for f in waiting] == [False, False, False]
        awaited = log.submit("sandbox.create", tenant="t", sandbox_id="sb-1")
        records = [f.result(timeout=30) for f in [*waiting, awaited]]
        assert [r.seq for r in records] == [2, 3, 4, 5]
        assert records[-1].kind == "sandbox.create"
        assert log.statistics().commits == before + 1
        assert log.verify() == audit.VerifyResult(ok=True, checked=5)


def test_a_full_background_group_is_written_without_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "BACKGROUND_COALESCE_S", 60.0)
    monkeypatch.setattr(audit, "BACKGROUND_GROUP", 4)
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        records = [f.result(timeout=30) for f in _background(log, 4)]
        assert [r.seq for r in records] == [1, 2, 3, 4]
        assert log.statistics().commits == 1


def test_an_append_takes_queued_background_records_first(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "BACKGROUND_COALESCE_S", 60.0)
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        waiting = _background(log, 2)
        record = log.append("sandbox.destroy", tenant="t", sandbox_id="sb-1")
        assert record.seq == 3
        assert [f.result(timeout=0).seq for f in waiting] == [1, 2]


def test_close_writes_background_records_still_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "BACKGROUND_COALESCE_S", 60.0)
    path = str(tmp_path / "a.db")
    log = audit.AuditLog.open(path)
    waiting = _background(log, 2)
    log.close()
    assert [f.result(timeout=0).seq for f in waiting] == [1, 2]
    with audit.AuditLog.open(path, readonly=True) as reader:
        assert [r.kind for r in reader.query()] == ["session.input", "session.input"]
        assert reader.verify() == audit.VerifyResult(ok=True, checked=2)
    with pytest.raises(audit.AuditError, match="closed"):
        log.submit_background("session.input", tenant="t")


def test_background_records_are_checked_at_once(tmp_path):
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        with pytest.raises(InvalidSpec, match="tenant"):
            log.submit_background("session.input", tenant=7)
        assert log.last_seq() == 0
