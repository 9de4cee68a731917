"""The audit log over the API and on disk: what is recorded, Verify, and tampering detected."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import (
    STREAM_AGENT,
    SessionRecorder,
    collect_exec,
    upload_agents,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _detail(rec) -> dict:
    return json.loads(rec.detail_json)


def test_every_action_is_recorded_before_its_result(client):
    sb = client.create_sandbox()
    # Written before the result is returned: no waiting needed to find it.
    created = client.audit_query(sandbox_id=sb.id, kind="sandbox.create")
    assert len(created) == 1 and created[0].tenant == "local"
    assert _detail(created[0])["policy_digest"] == sb.policy_digest
    assert created[0].peer.startswith("unix:")

    upload_agents(client, sb.id)
    res = collect_exec(client.exec(sb.id, ["sh", "-c", "exit 3"], stdin=b"abc"))
    events = client.exec(sb.id, ["cat"], keep_stdin_open=True)
    cat_id = next(events).started.exec_id
    client.send_input(sb.id, cat_id, b"12345", close=True)
    collect_exec(events)
    assert client.signal(sb.id, signal.SIGUSR1) == 0
    client.read_file(sb.id, "stream_agent.py")

    rec = SessionRecorder(client.open_session(
        ["python3", STREAM_AGENT, "--tokens", "0", "--rate", "200"], sandbox_id=sb.id))
    rec.wait_for(lambda r: len(r.tokens()) >= 5, what="tokens")
    rec.stream.send_input("steer")
    rec.stream.interrupt()
    rec.wait_for(lambda r: r.turn_ends(), what="turn end")
    rec.stream.close_session()
    rec.join()
    sid = rec.session_id
    client.destroy_sandbox(sb.id)

    records = client.audit_query(sandbox_id=sb.id, limit=1000)
    kinds = [r.kind for r in records]
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    assert kinds[0] == "sandbox.create" and kinds[-1] == "sandbox.destroy"
    starts = {_detail(r)["exec_id"]: _detail(r) for r in by_kind["exec.start"]}
    assert starts[res.exec_id]["argv"] == ["sh", "-c", "exit 3"]
    assert starts[res.exec_id]["stdin_bytes"] == 3
    assert starts[res.exec_id]["policy_digest"] == sb.policy_digest
    exits = {_detail(r)["exec_id"]: _detail(r) for r in by_kind["exec.exit"]}
    assert (exits[res.exec_id]["returncode"], exits[res.exec_id]["reason"]) == (3, "exited")
    assert [(_detail(r)["exec_id"], _detail(r)["bytes"], _detail(r)["close"])
            for r in by_kind["exec.input"]] == [(cat_id, 5, True)]
    assert _detail(by_kind["sandbox.signal"][0])["signal"] == signal.SIGUSR1
    assert [_detail(r)["path"] for r in by_kind["file.write"]] == [
        "stream_agent.py", "plain_agent.py"]
    assert [_detail(r)["path"] for r in by_kind["file.read"]] == ["stream_agent.py"]

    # The session's records carry both ids.
    for kind in ("session.open", "session.input", "session.interrupt", "session.close",
                 "session.exit"):
        assert [r.session_id for r in by_kind[kind]] == [sid], kind
    assert _detail(by_kind["session.input"][0])["bytes"] == len("steer")
    assert _detail(by_kind["session.exit"][0])["reason"] == "closed"
    assert client.audit_query(session_id=sid, kind="session.open")[0].sandbox_id == sb.id
    assert _detail(by_kind["sandbox.destroy"][0])["reason"] == "requested"

    verify = client.audit_verify()
    assert verify.ok, verify.problem
    assert verify.checked >= records[-1].seq
    everything = client.audit_query(limit=10000)
    assert [r.seq for r in everything] == list(range(1, len(everything) + 1))
    assert all(r.prev_hash == p.hash for p, r in zip(everything, everything[1:], strict=False))


def test_watch_streams_new_records(daemon):
    watcher = daemon.client()
    client = daemon.client()
    got = []
    ready = threading.Event()

    def watch():
        try:
            for rec in watcher.audit_watch(kind="sandbox."):
                got.append(rec)
                ready.set()
                if rec.kind == "sandbox.destroy":
                    return
        except ClientError:
            pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(0.3)  # the subscription is made when the call starts
    sb = client.create_sandbox()
    client.destroy_sandbox(sb.id)
    t.join(10)
    watcher.close()
    assert [(r.kind, r.sandbox_id) for r in got] == [
        ("sandbox.create", sb.id), ("sandbox.destroy", sb.id)]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def _drop_triggers(conn: sqlite3.Connection) -> None:
    """What an attacker with the file does first: the append-only triggers go."""
    names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    assert names, "the records table should be protected by triggers"
    for name in names:
        conn.execute(f'DROP TRIGGER "{name}"')


def test_tampering_on_disk_is_detected(make_daemon):
    d = make_daemon("d").start()
    c = d.client()
    sb = c.create_sandbox()
    res = collect_exec(c.exec(sb.id, ["echo", "hello"]))
    assert res.returncode == 0
    c.destroy_sandbox(sb.id)
    assert c.audit_verify().ok
    assert d.stop() == 0
    assert d.leftovers() == {}

    ok = _cli("audit", "verify", "--db", d.audit_db)
    assert ok.returncode == 0, ok.stderr
    assert "audit chain OK" in ok.stdout

    # Edit one record in the middle of the chain: exec.start's argv.
    target = [r for r in d.records("exec.start")][0]
    last_seq = d.records()[-1].seq
    assert target.seq < last_seq
    conn = sqlite3.connect(d.audit_db)
    with conn:
        _drop_triggers(conn)
        detail = json.loads(target.detail_json)
        detail["argv"] = ["echo", "innocent"]
        conn.execute("UPDATE records SET detail_json = ? WHERE seq = ?",
                     (json.dumps(detail, sort_keys=True, separators=(",", ":")), target.seq))
    conn.close()
    broken = _cli("audit", "verify", "--db", d.audit_db)
    assert broken.returncode == 1
    assert f"BROKEN at record {target.seq}" in broken.stderr

    # The daemon starts on it (the head anchor still matches the chain's end) and its own
    # Verify names the same record; nothing it appends repairs the evidence.
    d2 = make_daemon("d").start()
    v = d2.client().audit_verify()
    assert (v.ok, v.broken_at_seq) == (False, target.seq)
    assert str(target.seq) in v.problem
    assert d2.stop() == 0

    # Remove the last records: the chain alone still links, but the head anchor does not
    # agree, and the daemon refuses to open the log at all.
    conn = sqlite3.connect(d.audit_db)
    with conn:
        conn.execute("DELETE FROM records WHERE seq > (SELECT MAX(seq) FROM records) - 2")
    conn.close()
    refused = make_daemon("d")
    rc = refused.run_to_exit()
    assert rc == 1
    log = refused.log()
    assert "failed its integrity check" in log
    assert "Traceback" not in log
    gone = _cli("audit", "verify", "--db", d.audit_db)
    assert gone.returncode == 1 and "BROKEN" in gone.stderr
