"""Live restore of sessions (runtime/session_journal.py), issue #17's test: the daemon is
SIGKILLed while 20 sessions stream tokens and commands stream output; after the restart
every session resumes from the last seq its client saw, and every command from its own,
with nothing lost or duplicated (seq continuity and a digest of the content), and a
further turn works."""

from __future__ import annotations

import hashlib
import json
import signal
import time

import pytest

from corral.runtime.holder import SOCKET_NAME, HolderClient
from corral.runtime.restore import session_key as restore_key
from corral.v1 import stream_pb2

from .daemon_harness import (
    AGENTS_DIR,
    EVENT_TOKEN,
    STREAM_AGENT,
    SessionRecorder,
    batch_entries,
    collect_exec,
    upload_agents,
    wait_until,
)
from .test_live_restore import _first, kept_daemon, reaper  # noqa: F401 (fixtures)
from .test_live_restore_exec import EXPECTED, PACED, _continuous, _read_some

TURN_END = stream_pb2.EVENT_KIND_TURN_END
#: Tokens per turn and their rate: a turn outlasts the kill and the restart.
TOKENS, RATE = 4000, 500
SESSIONS = 20


def _agent_argv(own_sandbox: bool) -> list[str]:
    args = ["--tokens", str(TOKENS), "--rate", str(RATE)]
    if own_sandbox:  # no file to run in a new sandbox: the agent's source itself
        return ["python3", "-c", (AGENTS_DIR / "stream_agent.py").read_text(), *args]
    return ["python3", STREAM_AGENT, *args]


def _turn_ends(rec: SessionRecorder) -> int:
    return sum(1 for _, kind, _ in list(rec.entries) if kind == TURN_END)


def _digest(tokens: list[str]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


@pytest.mark.timeout(300)
def test_sessions_and_commands_resume_after_a_sigkill(kept_daemon, reaper):  # noqa: F811
    d, c = _first(kept_daemon, reaper)
    shared = c.create_sandbox()
    reaper.pids.add(shared.init_pid)
    upload_agents(c, shared.id)
    first = []
    for i in range(SESSIONS):
        own = i % 2 == 0  # half in sandboxes of their own, half in one shared sandbox
        stream = c.open_session(_agent_argv(own), **({} if own else {"sandbox_id": shared.id}))
        first.append(SessionRecorder(stream))
    for rec in first:
        rec.wait_for(lambda r: len(r.tokens()) >= 50, timeout_s=60, what="50 tokens")
    ids = [rec.stream.session_id for rec in first]
    infos = {i: c.get_session(i) for i in ids}
    reaper.pids.update(c.get_sandbox(info.sandbox_id).init_pid for info in infos.values())
    commands = []
    for _ in range(3):
        events = c.exec(shared.id, ["sh", "-c", PACED])
        commands.append((events, *_read_some(events, 5000)))
    before = {rec.stream.session_id: rec.last_seq for rec in first}

    assert d.kill() == -signal.SIGKILL
    for rec in first:
        rec.join()
    for events, *_ in commands:
        events.close()
    assert all(_turn_ends(rec) == 0 for rec in first)  # every turn ran across the kill

    d2 = kept_daemon().start()
    c2 = d2.client()
    restored = {r.session_id: json.loads(r.detail_json) for r in d2.records("session.restore")}
    assert {k: v["restored"] for k, v in restored.items()} == dict.fromkeys(ids, True)
    second = [SessionRecorder(c2.resume_session(rec.stream.session_id, after_seq=rec.last_seq))
              for rec in first]
    for _events, exec_id, seen, seqs in commands:  # each command from its last seen seq
        rest = collect_exec(c2.attach(shared.id, exec_id, stdout_after_seq=seqs[-1]))
        assert _continuous(rest.stdout_seqs, seqs[-1] + 1)
        assert bytes(seen) + rest.stdout == EXPECTED and rest.returncode == 0
    for rec in second:  # turn 1 ends after the restart, then a further turn
        rec.wait_for(lambda r: _turn_ends(r) == 1, timeout_s=60, what="turn 1's end")
        rec.stream.send_input("again")
    for rec in second:
        rec.wait_for(lambda r: _turn_ends(r) == 2, timeout_s=60, what="turn 2's end")
        rec.stream.close_session()
    for old, new in zip(first, second, strict=True):
        new.join(30)
        assert new.error is None, new.error
        entries = old.entries + new.entries
        assert old.seqs()[-1] >= before[old.stream.session_id]
        assert [s for s, _, _ in entries] == list(range(1, len(entries) + 1))
        tokens = old.tokens() + new.tokens()
        expected = ([f"t{i}" for i in range(TOKENS)] + ["in:again"]
                    + [f"t{i}" for i in range(TOKENS, 2 * TOKENS)])
        assert _digest(tokens) == _digest(expected) and tokens == expected
        assert new.first("exited") is not None
    # the sessions' own sandboxes went with their sessions
    owned = {infos[i].sandbox_id for i in ids} - {shared.id}
    assert wait_until(lambda: not owned & {s.id for s in c2.list_sandboxes()}, timeout_s=30)
    c2.destroy_sandbox(shared.id)
    time.sleep(0.1)
    assert d2.stop() == 0, d2.log()


@pytest.mark.timeout(180)
def test_steering_after_restarts_and_a_session_that_cannot_be_adopted(
        kept_daemon, reaper):  # noqa: F811
    d, c = _first(kept_daemon, reaper)
    endless = ["--tokens", "0", "--rate", "200"]
    steered = SessionRecorder(c.open_session(_agent_argv(True)[:3] + endless))
    lost = SessionRecorder(c.open_session(_agent_argv(True)[:3] + endless))
    for rec in (steered, lost):
        rec.wait_for(lambda r: len(r.tokens()) >= 20, timeout_s=60, what="20 tokens")
    infos = {rec.stream.session_id: c.get_session(rec.stream.session_id)
             for rec in (steered, lost)}
    reaper.pids.update(c.get_sandbox(i.sandbox_id).init_pid for i in infos.values())
    lost_id, lost_box = lost.stream.session_id, infos[lost.stream.session_id].sandbox_id
    assert wait_until(lambda: restore_key(lost_box, lost_id) in _held(d))
    assert d.kill() == -signal.SIGKILL
    for rec in (steered, lost):
        rec.join()
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        holder.forget(restore_key(lost_box, lost_id))  # its pipes are gone for good

    d2 = kept_daemon().start()
    c2 = d2.client()
    restored = {r.session_id: json.loads(r.detail_json) for r in d2.records("session.restore")}
    assert (restored[lost_id]["restored"], restored[lost_id]["reason"]) == (
        False, "the holder kept none of its pipes")
    gone = SessionRecorder(c2.resume_session(lost_id, after_seq=lost.last_seq))
    gone.join()
    exited = gone.first("exited")
    assert exited.reason == "not restored: the holder kept none of its pipes"
    assert gone.seqs()[0] == lost.last_seq + 1  # what it held, then its forced turn end
    assert gone.entries[-1][1] == TURN_END
    assert wait_until(lambda: lost_box not in {s.id for s in c2.list_sandboxes()},
                      timeout_s=30)

    again = SessionRecorder(c2.resume_session(steered.stream.session_id,
                                              after_seq=steered.last_seq))
    again.wait_for(lambda r: len(r.tokens()) >= 10, what="tokens after the restart")
    again.stream.interrupt()
    again.wait_for(lambda r: _turn_ends(r) == 1, what="the interrupt's turn end")
    assert json.loads(again.entries[-1][2])["status"] == "interrupted"
    again.stream.send_input("more")
    again.wait_for(lambda r: "in:more" in r.tokens(), what="the next turn")
    assert d2.stop() == 0, d2.log()  # a clean stop (an upgrade): the session runs on
    again.join()

    d3 = kept_daemon().start()
    mux = d3.client().open_many()  # resumed through OpenMany this time
    mux.resume("a", steered.stream.session_id, after_seq=again.last_seq)
    # a watcher from the start is told of every turn event the session logged, though
    # they came before the restart: turn 1's end (the interrupt, on d2) and turn 2's start
    # (notes.jsonl), in the order they happened, each once
    mux.resume("w", steered.stream.session_id, after_seq=0, watch_only=True)
    last, exited, closing, started, ended = [], None, False, [], set()
    told = []
    for ref, ev in mux:
        kind = ev.WhichOneof("event")
        if ref == "w":
            if kind == "turn_started":
                started.append(ev.turn_started.turn)
                told.append(("started", ev.turn_started.turn))
            elif kind == "turn_ended":
                told.append(("ended", ev.turn_ended.turn, ev.turn_ended.status))
        elif kind == "batch":
            last.extend(batch_entries(ev.batch))
            if not closing and sum(1 for _, k, _ in last if k == EVENT_TOKEN) >= 10:
                closing = True
                mux.close_session("a")
        elif kind == "exited":
            exited = ev.exited
        if kind == "exited":
            ended.add(ref)
            if ended == {"a", "w"}:
                break
    mux.close()
    assert started == [2]
    assert told[:2] == [("ended", 1, "interrupted"), ("started", 2)]
    entries = steered.entries + again.entries + last
    assert [s for s, _, _ in entries] == list(range(1, len(entries) + 1))
    tokens = [p.decode() for _, k, p in entries if k == EVENT_TOKEN]
    numbers = [int(t[1:]) for t in tokens if t.startswith("t")]
    assert len(numbers) >= 30 and numbers == list(range(len(numbers)))
    assert tokens.count("in:more") == 1 and exited is not None
    assert d3.stop() == 0, d3.log()


def _held(d) -> set[str]:
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        return set(holder.keys())
