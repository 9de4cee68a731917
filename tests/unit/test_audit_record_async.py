"""AuditLog.record: the daemon's event loop keeps serving while a record is written, and the
record is durable (in the file) when the await returns, as with append; a write failure
reaches the awaiting action. The commit is made slow by delaying the real insert."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from corral.runtime import audit
from corral.sandbox.errors import AuditError

SLOW_S = 0.2


def _slow(log: audit.AuditLog, seconds: float = SLOW_S) -> None:
    real = log._insert

    def insert(rows):
        time.sleep(seconds)  # a slow disk: the fsync of a loaded host
        return real(rows)

    log._insert = insert


async def _ticks_while(make) -> tuple[int, object]:
    """How many 10 ms ticks another coroutine made while make() ran on the same loop."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    try:
        result = await make()
    finally:
        stop.set()
        await task
    return ticks, result


def test_the_loop_runs_while_a_record_is_written_and_it_is_durable_after(tmp_path):
    path = str(tmp_path / "a.db")
    with audit.AuditLog.open(path) as log:
        _slow(log)

        async def both():
            async def awaited():
                return await log.record("exec.input", tenant="t", peer="p", sandbox_id="sb")

            async def blocking():
                return log.append("exec.input", tenant="t", peer="p", sandbox_id="sb")

            return await _ticks_while(awaited), await _ticks_while(blocking)

        (free_ticks, rec), (blocked_ticks, _) = asyncio.run(both())
        # the loop ticked through the 200 ms write with record(), and not at all with append()
        assert free_ticks >= 5
        assert blocked_ticks <= 1
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT kind, sandbox_id FROM records WHERE seq = ?",
                                (rec.seq,)).fetchone() == ("exec.input", "sb")
        finally:
            conn.close()


def test_a_write_failure_reaches_the_awaiting_action(tmp_path):
    with audit.AuditLog.open(str(tmp_path / "a.db")) as log:
        log._insert = lambda rows: AuditError(log.path, "cannot append: disk full")
        with pytest.raises(AuditError, match="disk full"):
            asyncio.run(log.record("file.write", tenant="t", peer="p"))


def test_a_closed_log_refuses_at_once(tmp_path):
    log = audit.AuditLog.open(str(tmp_path / "a.db"))
    log.close()
    with pytest.raises(AuditError, match="closed"):
        asyncio.run(log.record("file.write", tenant="t", peer="p"))


def test_a_group_of_queued_records_never_runs_past_a_segments_seal(tmp_path):
    """Records queued together (the event loop's record(), steering's background records)
    are split at the segment's limit: every sealed segment holds exactly segment_records
    records, its seal included, and the seal counts them."""
    path = str(tmp_path / "a.db")
    with audit.AuditLog.open(path, segment_records=8) as log:
        _slow(log, 0.02)  # while one commit runs, the others queue up as one group

        async def many():
            await asyncio.gather(*(log.record("exec.input", tenant="t", peer="p")
                                   for _ in range(40)))

        asyncio.run(many())
        segments = audit.list_segments(path)
        assert len(segments) >= 4
        for seg in segments:
            assert seg.last_seq - seg.first_seq + 1 == 8
        seals = log.query(kind=audit.SEAL_KIND, limit=100)
        assert [r.detail["records"] for r in seals] == [8] * len(segments)
