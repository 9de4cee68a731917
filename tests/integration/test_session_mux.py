"""Sessions.OpenMany over the real socket: many sessions on one stream, each by its ref.

The same guarantees as Open (every entry once, in order; steer and interrupt reach the right
agent), plus what multiplexing adds: a failed request is an error event for its ref only,
refs are checked, detach leaves a session running for a later resume.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import pytest

from corral.runtime.client import ClientError, SessionMux

from .daemon_harness import STREAM_AGENT, SessionRecorder, batch_entries, numbered

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

EVENT_TOKEN = 1


def _agent(*args) -> list[str]:
    return ["python3", STREAM_AGENT, *map(str, args)]


class MuxRecorder:
    """Reads one SessionMux on a thread; per ref: entries (seq, kind, payload) and events."""

    def __init__(self, mux: SessionMux):
        self.mux = mux
        self.entries: dict[str, list[tuple[int, int, bytes]]] = defaultdict(list)
        self.events: dict[str, list[tuple[str, object]]] = defaultdict(list)
        self.error: ClientError | None = None
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ref, ev in self.mux:
                kind = ev.WhichOneof("event")
                with self._cond:
                    if kind == "batch":
                        self.entries[ref].extend(batch_entries(ev.batch))
                    else:
                        self.events[ref].append((kind, getattr(ev, kind)))
                    self._cond.notify_all()
        except ClientError as exc:
            self.error = exc
        finally:
            with self._cond:
                self.done.set()
                self._cond.notify_all()

    def wait_for(self, predicate, timeout_s: float = 30.0, what: str = "") -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self) or self.done.is_set(), timeout_s)
            if ok and predicate(self):
                return
        raise AssertionError(f"timed out waiting for {what}: events {dict(self.events)}, "
                             f"error {self.error}")

    def join(self, timeout_s: float = 60.0) -> None:
        assert self.done.wait(timeout_s), f"mux stream still open: {dict(self.events)}"

    def tokens(self, ref: str) -> list[str]:
        with self._cond:
            return [p.decode() for _, k, p in self.entries[ref] if k == EVENT_TOKEN]

    def seqs(self, ref: str) -> list[int]:
        with self._cond:
            return [s for s, _, _ in self.entries[ref]]

    def of_kind(self, ref: str, kind: str) -> list:
        with self._cond:
            return [m for k, m in self.events[ref] if k == kind]

    def first(self, ref: str, kind: str):
        found = self.of_kind(ref, kind)
        return found[0] if found else None

    def opened(self, ref: str) -> bool:
        return self.first(ref, "opened") is not None


@pytest.fixture
def sandboxes(client, sandbox):
    """Three sandboxes holding the test agents (the first is the `sandbox` fixture's)."""
    from .daemon_harness import upload_agents

    made = [sandbox]
    for _ in range(2):
        sb = client.create_sandbox(memory_bytes=256 << 20)
        upload_agents(client, sb.id)
        made.append(sb)
    yield made
    for sb in made[1:]:
        try:
            client.destroy_sandbox(sb.id)
        except ClientError:
            pass


def test_many_sessions_on_one_stream_each_complete_and_in_order(client, sandboxes):
    mux = client.open_many()
    rec = MuxRecorder(mux)
    counts = {"a": 3000, "b": 500, "c": 1}
    for (ref, n), sb in zip(counts.items(), sandboxes, strict=True):
        mux.start(ref, _agent("--tokens", n, "--exit", 0), sandbox_id=sb.id)
    for ref in counts:
        rec.wait_for(lambda r, ref=ref: r.first(ref, "exited") is not None, what=f"{ref} exit")
    mux.close()
    rec.join()
    assert rec.error is None, rec.error
    ids = set()
    for ref, n in counts.items():
        assert rec.tokens(ref) == [f"t{i}" for i in range(n)]
        seqs = rec.seqs(ref)
        assert seqs == list(range(1, len(seqs) + 1)), f"{ref}: gaps or repeats"
        kinds = [k for k, _ in rec.events[ref]]
        assert kinds[0] == "opened" and kinds[-1] == "exited"
        assert [(t.turn, t.status) for t in rec.of_kind(ref, "turn_ended")] == [(1, "completed")]
        assert rec.first(ref, "exited").returncode == 0
        ids.add(rec.first(ref, "opened").session_id)
        assert mux.session_ids[ref] == rec.first(ref, "opened").session_id
    assert len(ids) == 3


def test_steer_and_interrupt_reach_only_their_own_session(client, sandboxes):
    mux = client.open_many()
    rec = MuxRecorder(mux)
    for ref, sb in zip(("x", "y"), sandboxes, strict=False):
        mux.start(ref, _agent("--tokens", 0, "--rate", 300), sandbox_id=sb.id)
    rec.wait_for(lambda r: len(r.tokens("x")) >= 20 and len(r.tokens("y")) >= 20,
                 what="tokens on both")
    mux.send_input("x", "steer-x")
    rec.wait_for(lambda r: "in:steer-x" in r.tokens("x"), what="the steering echo")
    mux.interrupt("x")
    rec.wait_for(lambda r: r.of_kind("x", "turn_ended"), what="x's turn end")
    assert [(t.turn, t.status) for t in rec.of_kind("x", "turn_ended")] == [(1, "interrupted")]
    assert "in:steer-x" not in rec.tokens("y")
    y_before = len(rec.tokens("y"))
    x_before = len(rec.tokens("x"))
    time.sleep(0.3)
    assert len(rec.tokens("y")) > y_before, "y stopped with x's interrupt"
    assert len(rec.tokens("x")) == x_before, "x kept streaming after its interrupt"
    assert rec.of_kind("y", "turn_ended") == []
    mux.send_input("x", "next")
    rec.wait_for(lambda r: [s.turn for s in r.of_kind("x", "turn_started")] == [2],
                 what="x's second turn")
    for ref in ("x", "y"):
        mux.close_session(ref)
    mux.close()
    rec.join()
    assert rec.error is None
    for ref in ("x", "y"):
        exited = rec.first(ref, "exited")
        assert (exited.returncode, exited.reason) == (0, "closed")
        assert numbered(rec.tokens(ref)) == list(range(len(numbered(rec.tokens(ref)))))


def test_a_failed_request_is_an_error_for_its_ref_only(client, sandboxes, daemon):
    mux = client.open_many()
    rec = MuxRecorder(mux)
    mux.start("ok", _agent("--idle", "--tokens", 5, "--exit", 0), sandbox_id=sandboxes[0].id)
    rec.wait_for(lambda r: r.opened("ok"), what="ok opened")
    mux.start("bad", [], sandbox_id=sandboxes[1].id)  # empty argv
    mux.start("ok", _agent(), sandbox_id=sandboxes[1].id)  # ref in use
    mux.interrupt("nobody")
    mux.start("", _agent(), sandbox_id=sandboxes[1].id)
    mux.start("x" * 65, _agent(), sandbox_id=sandboxes[1].id)
    mux.start("gone", _agent(), sandbox_id="sbx-doesnotexist")
    rec.wait_for(lambda r: all(r.of_kind(ref, "error") for ref in ("bad", "nobody", "gone"))
                 and len(r.of_kind("ok", "error")) == 1, what="the error events")
    bad = rec.first("bad", "error")
    assert (bad.code, bad.field) == ("INVALID_ARGUMENT", "start.argv")
    dup = rec.first("ok", "error")
    assert (dup.code, dup.field) == ("INVALID_ARGUMENT", "ref")
    assert rec.first("nobody", "error").code == "NOT_FOUND"
    assert rec.first("gone", "error").code == "NOT_FOUND"
    rec.wait_for(lambda r: len(r.of_kind("", "error")) == 1
                 and len(r.of_kind("x" * 65, "error")) == 1, what="ref errors")
    assert rec.first("", "error").field == "ref"
    mux.send_input("ok", "x" * ((1 << 20) + 1))  # over the 1 MiB input limit
    rec.wait_for(lambda r: len(r.of_kind("ok", "error")) == 2, what="the oversize input")
    big = rec.of_kind("ok", "error")[1]
    assert (big.code, big.field) == ("INVALID_ARGUMENT", "input.text")
    # the stream and the good session went on: it still takes input and completes
    mux.send_input("ok", "go")
    rec.wait_for(lambda r: r.first("ok", "exited") is not None, what="ok exit")
    assert rec.tokens("ok") == ["in:go"] + [f"t{i}" for i in range(5)]
    # a failed start frees the ref again
    mux.start("bad", _agent("--tokens", 2, "--exit", 0), sandbox_id=sandboxes[1].id)
    rec.wait_for(lambda r: r.first("bad", "exited") is not None, what="bad retried")
    assert rec.tokens("bad") == ["t0", "t1"]
    mux.close()
    rec.join()
    assert rec.error is None


def test_watch_only_refuses_steering_and_the_denial_is_audited(client, sandbox, daemon):
    owner = SessionRecorder(client.open_session(_agent("--idle", "--tokens", 3, "--exit", 0),
                                                sandbox_id=sandbox.id))
    owner.wait_for(lambda r: r.session_id, what="opened")
    mux = client.open_many()
    rec = MuxRecorder(mux)
    mux.resume("w", owner.session_id, watch_only=True)
    rec.wait_for(lambda r: r.opened("w"), what="resumed")
    mux.send_input("w", "sneaky")
    rec.wait_for(lambda r: r.of_kind("w", "error"), what="the denial")
    assert rec.first("w", "error").code == "PERMISSION_DENIED"
    denials = [r for r in daemon.records("denied")
               if json.loads(r.detail_json).get("method") == "SessionsServicer.OpenMany"]
    assert denials, "the denial is not in the audit log"
    owner.stream.send_input("go")
    owner.join()
    rec.wait_for(lambda r: r.first("w", "exited") is not None, what="w exit")
    assert rec.tokens("w") == owner.tokens() == ["in:go", "t0", "t1", "t2"]
    mux.close()
    rec.join()


def test_detach_then_resume_on_another_stream_loses_and_repeats_nothing(client, sandbox):
    first = client.open_many()
    rec1 = MuxRecorder(first)
    first.start("s", _agent("--tokens", 3000, "--rate", 3000, "--exit", 0),
                sandbox_id=sandbox.id)
    rec1.wait_for(lambda r: len(r.seqs("s")) >= 300, what="300 entries")
    first.detach("s")
    first.close()  # nothing left on this stream: it ends
    rec1.join()
    assert rec1.error is None and rec1.first("s", "exited") is None
    seen = rec1.seqs("s")[-1]
    sid = rec1.first("s", "opened").session_id
    time.sleep(0.3)  # the agent goes on while nobody watches

    second = client.open_many()
    rec2 = MuxRecorder(second)
    second.resume("again", sid, after_seq=seen)
    rec2.wait_for(lambda r: r.first("again", "exited") is not None, what="exit")
    second.close()
    rec2.join()
    assert rec2.first("again", "opened").after_seq == seen
    assert rec1.seqs("s") + rec2.seqs("again") == list(range(1, rec2.seqs("again")[-1] + 1))
    assert rec1.tokens("s") + rec2.tokens("again") == [f"t{i}" for i in range(3000)]


def test_cancelling_the_stream_leaves_its_sessions_running(client, sandbox):
    mux = client.open_many()
    rec = MuxRecorder(mux)
    mux.start("s", _agent("--idle", "--tokens", 4, "--exit", 0), sandbox_id=sandbox.id)
    rec.wait_for(lambda r: r.opened("s"), what="opened")
    sid = rec.first("s", "opened").session_id
    mux.cancel()
    rec.join()
    again = SessionRecorder(client.resume_session(sid))
    again.wait_for(lambda r: r.session_id == sid, what="resumed")
    again.stream.send_input("go")
    again.join()
    assert again.tokens() == ["in:go", "t0", "t1", "t2", "t3"]


def test_a_resume_behind_the_replay_log_is_told_where_it_starts(make_daemon):
    from .daemon_harness import upload_agents

    d = make_daemon("small-log", config="stream_log_bytes = 65536\n").start()
    client = d.client()
    sb = client.create_sandbox(memory_bytes=256 << 20)
    upload_agents(client, sb.id)
    owner = SessionRecorder(client.open_session(
        _agent("--idle", "--tokens", 3000, "--pad", 64, "--exit", 0), sandbox_id=sb.id))
    owner.wait_for(lambda r: r.session_id, what="opened")
    sid = owner.session_id
    owner.stream.send_input("go")
    owner.wait_for(lambda r: r.turn_ends(), what="the turn's end")
    mux = client.open_many()
    rec = MuxRecorder(mux)
    mux.resume("late", sid, after_seq=1)  # far behind: the 64 KiB log dropped the start
    rec.wait_for(lambda r: r.of_kind("late", "lagged") and r.seqs("late"), what="lagged")
    lagged = rec.first("late", "lagged")
    seqs = rec.seqs("late")
    assert lagged.first_available_seq > 1
    assert seqs[0] == lagged.first_available_seq
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous from there
    assert rec.tokens("late")[-1] == owner.tokens()[-1]
    rec.wait_for(lambda r: r.first("late", "exited") is not None, what="exit")
    mux.close()
    rec.join()
    owner.join()
    client.destroy_sandbox(sb.id)
