"""Sessions over the real socket: tokens in order, steer, interrupt, resume, many watchers."""

from __future__ import annotations

import json
import threading
import time

import pytest

from corral.v1 import stream_pb2

from .daemon_harness import PLAIN_AGENT, STREAM_AGENT, SessionRecorder, numbered

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

LEDGER = "/workspace/ledger.jsonl"


def _agent(*args) -> list[str]:
    return ["python3", STREAM_AGENT, *map(str, args)]


def _ledger(client, sandbox_id: str) -> list[str]:
    """Every token the agent says it emitted, in order."""
    raw = client.read_file(sandbox_id, LEDGER).decode()
    return [json.loads(line) for line in raw.splitlines()]


def _open(client, sandbox, *args, **kw) -> SessionRecorder:
    rec = SessionRecorder(client.open_session(_agent(*args), sandbox_id=sandbox.id, **kw))
    rec.wait_for(lambda r: r.session_id, what="opened")
    return rec


def test_tokens_arrive_in_order_and_exit_is_reported(client, sandbox):
    rec = _open(client, sandbox, "--tokens", 2000, "--exit", 7, "--ledger", LEDGER)
    rec.join()
    assert rec.error is None, rec.error
    assert rec.tokens() == [f"t{i}" for i in range(2000)]
    assert rec.tokens() == _ledger(client, sandbox.id)
    seqs = rec.seqs()
    assert seqs == list(range(1, len(seqs) + 1))  # every entry, once, in order
    assert rec.lost == 0
    assert rec.turn_ends() == [(1, "completed")]
    exited = rec.first("exited")
    assert (exited.returncode, exited.reason) == (7, "exited")
    # The agent's own TURN_END frame is in the stream, right after the last token.
    kinds = [k for _, k, _ in rec.entries]
    assert kinds[-1] == stream_pb2.EVENT_KIND_TURN_END
    assert json.loads(rec.entries[-1][2])["status"] == "completed"


def test_steer_mid_turn_then_interrupt_then_next_turn(client, sandbox):
    rec = _open(client, sandbox, "--tokens", 0, "--rate", 300, "--ledger", LEDGER)
    stream = rec.stream
    rec.wait_for(lambda r: len(r.tokens()) >= 20, what="20 tokens")
    stream.send_input("steer-1")
    rec.wait_for(lambda r: "in:steer-1" in r.tokens(), what="the steering echo")
    at = rec.tokens().index("in:steer-1")
    rec.wait_for(lambda r: len(r.tokens()) >= at + 20, what="tokens after the steer")
    # The input went into the running turn: it did not end, numbering carried on.
    assert rec.turn_ends() == []
    before = numbered(rec.tokens()[:at])
    after = numbered(rec.tokens()[at + 1:])
    assert before == list(range(len(before)))
    assert after[:5] == list(range(len(before), len(before) + 5))

    stream.interrupt()
    rec.wait_for(lambda r: r.turn_ends(), what="turn_ended")
    assert rec.turn_ends() == [(1, "interrupted")]
    ended = rec.first("turn_ended")
    # The agent ended the turn itself (not the daemon's forced end after its grace).
    entry = {s: (k, p) for s, k, p in rec.entries}[ended.seq]
    assert entry[0] == stream_pb2.EVENT_KIND_TURN_END
    assert json.loads(entry[1]) == {"status": "interrupted"}
    count = len(numbered(rec.tokens()))
    time.sleep(0.3)
    assert len(numbered(rec.tokens())) == count, "tokens kept coming after the interrupt"

    stream.send_input("next")
    rec.wait_for(lambda r: len(numbered(r.tokens())) >= count + 10, what="turn 2 tokens")
    started = rec.of_kind("turn_started")
    assert [s.turn for s in started] == [2]
    toks = rec.tokens()
    assert toks[toks.index("in:next") + 1] == f"t{count}"  # the counter carries on
    stream.close_session()
    rec.join()
    exited = rec.first("exited")
    assert (exited.returncode, exited.reason) == (0, "closed")
    assert rec.tokens() == _ledger(client, sandbox.id)


def test_resume_after_a_dropped_connection_loses_and_repeats_nothing(client, sandbox):
    first = SessionRecorder(client.open_session(
        _agent("--tokens", 3000, "--rate", 3000, "--exit", 0, "--ledger", LEDGER),
        sandbox_id=sandbox.id), stop_after_seq=300)
    first.join()
    assert first.error is None
    seen = first.last_seq
    assert 300 <= seen < 3000 and first.first("exited") is None
    time.sleep(0.3)  # the agent goes on while nobody watches

    second = SessionRecorder(client.resume_session(first.session_id, after_seq=seen))
    second.join()
    assert second.error is None, second.error
    assert second.first("opened").after_seq == seen
    assert second.seqs()[0] == seen + 1
    assert first.seqs() + second.seqs() == list(range(1, second.last_seq + 1))
    tokens = first.tokens() + second.tokens()
    assert tokens == [f"t{i}" for i in range(3000)]
    assert tokens == _ledger(client, sandbox.id)
    assert second.first("exited").returncode == 0


def test_a_stream_that_watches_after_a_turn_ended_is_told_of_it_once(client, sandbox):
    # A turn event published before a stream watched (a start whose agent ended its first
    # turn while the start was still being recorded: the soak's hang) used to be lost.
    owner = _open(client, sandbox, "--tokens", 50)
    owner.wait_for(lambda r: r.turn_ends(), what="turn_ended")
    [ended] = owner.of_kind("turn_ended")
    late = SessionRecorder(client.resume_session(owner.session_id, watch_only=True))
    late.wait_for(lambda r: r.turn_ends(), what="the late stream's turn_ended")
    assert late.entries == owner.entries
    assert late.of_kind("turn_ended") == [ended]
    # a stream holding the TURN_END entry was told of the end already: not again
    after = SessionRecorder(client.resume_session(owner.session_id, after_seq=ended.seq,
                                                  watch_only=True))
    before = SessionRecorder(client.resume_session(owner.session_id, after_seq=ended.seq - 1,
                                                   watch_only=True))
    before.wait_for(lambda r: r.turn_ends(), what="turn_ended after resuming before it")
    assert before.of_kind("turn_ended") == [ended]
    owner.stream.send_input("more")  # turn 2: 50 tokens more, told live to every stream
    for rec in (owner, late, after, before):
        rec.wait_for(lambda r: len(r.of_kind("turn_ended")) == 2 - (r is after),
                     what="turn 2's end")
    owner.stream.close_session()
    for rec in (owner, late, after, before):
        rec.join()
        assert rec.error is None, rec.error
        assert [e.turn for e in rec.of_kind("turn_started")] == [2]
        assert rec.first("exited").reason == "closed"
    assert owner.turn_ends() == [(1, "completed"), (2, "completed")]
    assert late.turn_ends() == before.turn_ends() == owner.turn_ends()
    assert after.turn_ends() == [(2, "completed")]


def test_watchers_get_identical_streams(client, sandbox):
    owner = _open(client, sandbox, "--idle", "--tokens", 5000, "--exit", 0)
    sid = owner.session_id
    watchers = [SessionRecorder(client.resume_session(sid, watch_only=True)) for _ in range(3)]
    for w in watchers:
        w.wait_for(lambda r: r.session_id == sid, what="opened")
    owner.stream.send_input("go")
    for r in (owner, *watchers):
        r.join()
        assert r.error is None, r.error
    assert owner.tokens() == ["in:go"] + [f"t{i}" for i in range(5000)]
    for w in watchers:
        assert w.entries == owner.entries
        assert w.turn_ends() == owner.turn_ends() == [(1, "completed")]
        assert w.first("exited") == owner.first("exited")


def test_a_slow_watcher_does_not_slow_a_fast_one(client, sandbox):
    # 40,000 tokens of 64 bytes: far more than a stalled client's transport buffers hold.
    total = 40000
    owner = _open(client, sandbox, "--idle", "--tokens", total, "--pad", 64, "--exit", 0)
    sid = owner.session_id
    release = threading.Event()
    slow = SessionRecorder(client.resume_session(sid, watch_only=True), release=release)
    fast = SessionRecorder(client.resume_session(sid, watch_only=True))
    try:
        for w in (slow, fast):
            w.wait_for(lambda r: r.session_id == sid, what="opened")
        owner.stream.send_input("go")
        slow.wait_for(lambda r: r.entries, what="the slow watcher's first batch")
        # The slow watcher now reads nothing more; the fast one must still get everything.
        fast.join(60)
        assert fast.error is None and fast.lost == 0
        assert fast.first("exited") is not None
        assert numbered(fast.tokens()) == list(range(total))
        assert not slow.done.is_set()
        assert slow.last_seq < total // 2
    finally:
        release.set()
    # Once it reads again it gets the very same stream, nothing lost.
    slow.join(60)
    owner.join(60)
    assert slow.lost == 0
    assert slow.entries == fast.entries == owner.entries


def test_plain_agent_stdout_arrives_as_tokens(client, sandbox):
    rec = SessionRecorder(client.open_session(
        ["python3", PLAIN_AGENT, "--lines", "5", "--echo", "--exit", "3"],
        sandbox_id=sandbox.id))
    rec.wait_for(lambda r: "line 4\n" in "".join(r.tokens()), what="the 5 lines")
    rec.stream.send_input("hello")
    rec.wait_for(lambda r: "echo: hello\n" in "".join(r.tokens()), what="the echo")
    rec.stream.send_input("quit")
    rec.join()
    assert "".join(rec.tokens()) == "".join(f"line {i}\n" for i in range(5)) + "echo: hello\n"
    logs = [p.decode() for _, k, p in rec.entries if k == stream_pb2.EVENT_KIND_LOG]
    assert "".join(logs) == "plain agent on stderr\n"
    exited = rec.first("exited")
    assert (exited.returncode, exited.reason) == (3, "exited")
    assert rec.turn_ends() == [(1, "failed")]  # no TURN_END frame: the exit code decides


def test_watch_only_stream_cannot_steer(client, sandbox, daemon):
    owner = _open(client, sandbox, "--idle", "--tokens", 5, "--ledger", LEDGER)
    watcher = SessionRecorder(client.resume_session(owner.session_id, watch_only=True))
    watcher.wait_for(lambda r: r.session_id, what="opened")
    watcher.stream.send_input("from-watcher")
    watcher.join()
    assert watcher.error is not None and watcher.error.code.name == "PERMISSION_DENIED"
    denied = [r for r in daemon.records("denied")
              if json.loads(r.detail_json)["reason"] == "this stream was opened watch-only"]
    assert denied and denied[-1].tenant == "local"

    owner.stream.send_input("from-owner")
    owner.wait_for(lambda r: r.turn_ends(), what="turn end")
    assert owner.tokens() == ["in:from-owner", "t0", "t1", "t2", "t3", "t4"]
    owner.stream.close_session()
    owner.join()
    assert "in:from-watcher" not in _ledger(client, sandbox.id)
