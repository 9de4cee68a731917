"""What a Sessions stream owes its client (runtime/session_watch.py), without loop or wire."""

from __future__ import annotations

import pytest

from corral.ext import EventKind, TokenStream
from corral.runtime.session_state import (
    LOG_ENTRIES,
    SessionTurns,
    TaskNote,
    TurnEnded,
    TurnStarted,
)
from corral.runtime.session_watch import SessionWatch, Watched
from corral.runtime.streams import StreamHub
from corral.sandbox.errors import CorralError, ResourceExhausted

ITEM_COST = 10


class FakeSession:
    """What a Watched uses of a Session: its hub, its turns (listeners) and exit."""

    def __init__(self) -> None:
        self.hub = StreamHub(TokenStream("frames"), end_on_eof=False)
        self.turns = SessionTurns()
        self.listeners = self.turns.listeners

    @property
    def exited(self):
        return self.turns.exited

    def token(self, text: str = "t") -> int:
        return self.hub.append_event(EventKind.TOKEN, text.encode())


class Stream(SessionWatch):
    """A SessionWatch that records what it was told."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__(limit=limit, item_cost=ITEM_COST, event_cost=lambda e: 20)
        self.wakes = 0
        self.attached: list = []

    def wake(self) -> None:
        self.wakes += 1

    def attach(self, session) -> None:
        self.attached.append(session)

    def detach(self, session) -> None:
        self.attached.remove(session)

    def overflow(self) -> CorralError:
        return ResourceExhausted("over")

    def sub(self, ref: str = "a", session=None, after: int = 0, watch_only: bool = False):
        sub = Watched(self, ref, session or FakeSession(), after, watch_only)
        self.add(sub)
        return sub


def test_news_marks_a_session_dirty_once_until_taken():
    s = Stream()
    sub = s.sub()
    assert list(s.dirty) == [sub] and s.has_news  # add() sends what it has
    sub.session.token()
    sub.session.token()
    assert list(s.dirty) == [sub]
    assert s.next_dirty() is sub and not sub.dirty
    assert s.next_dirty() is None
    sub.session.token()
    assert list(s.dirty) == [sub] and s.wakes >= 2


def test_a_turn_end_waits_for_its_entry_to_be_taken():
    s = Stream()
    sub = s.sub()
    session = sub.session
    session.token()
    seq = session.hub.append_event(EventKind.TURN_END, b'{"status":"completed"}')
    session.turns.end_turn("completed", seq)
    assert sub.pop_deliverable() is None  # the client has not got the TURN_END entry
    assert s.queued == 20
    assert sub.watcher.take_ready() is not None
    event = sub.pop_deliverable()
    assert (event.turn, event.status, event.seq) == (1, "completed", seq)
    assert s.queued == 0


def test_resume_starts_after_the_seq_and_refuses_one_past_the_newest():
    s = Stream()
    session = FakeSession()
    for _ in range(3):
        session.token()
    sub = s.sub(session=session, after=2)
    assert sub.watcher.next_seq == 3
    with pytest.raises(CorralError, match=r"^resume.after_seq: 9 is past the newest entry"):
        Watched(s, "b", session, 9, False)
    assert s.attached == [session]  # the refused one never attached


def test_the_exit_goes_out_after_the_last_entry_and_the_session_leaves():
    s = Stream()
    sub = s.sub()
    session = sub.session
    session.token()
    session.turns.end_turn("completed", session.hub.append_event(
        EventKind.TURN_END, b'{"status":"completed"}'))
    session.hub.close()
    session.turns.exit(0, "exited")
    assert sub.exited is not None and not sub.done  # entries and the turn end are owed
    sub.watcher.take_ready()
    assert sub.pop_deliverable() is not None
    assert sub.done
    s.remove(sub)
    assert s.subs == {} and s.attached == []
    assert sub not in session.listeners


def test_a_session_already_exited_is_done_once_its_entries_are_taken():
    session = FakeSession()
    session.token()
    session.turns.end_turn("completed", 1)
    session.turns.exit(2, "exited")
    session.hub.close()
    sub = Stream().sub(session=session)
    assert sub.exited == session.exited and not sub.done
    sub.watcher.take_ready()
    assert not sub.done  # the turn's end, published before the stream watched, is owed
    assert isinstance(sub.pop_deliverable(), TurnEnded)
    assert sub.done


def end_turn(session, status: str = "completed") -> int:
    seq = session.hub.append_event(EventKind.TURN_END, b'{"status":"%s"}' % status.encode())
    session.turns.end_turn(status, seq)
    return seq


def taken(sub) -> list:
    """Every turn event sub may have once it took every entry, in order."""
    sub.watcher.take_ready()
    events = []
    while (event := sub.pop_deliverable()) is not None:
        events.append(event)
    return events


def test_a_turn_that_ended_before_the_stream_watched_is_not_lost():
    # The soak's hang: an agent's first turn ended while its session's start was still
    # being recorded, before any stream watched it; the stream never heard of the end.
    session = FakeSession()
    session.token()
    first_end = end_turn(session)
    s = Stream()
    sub = s.sub(session=session)
    assert sub.pop_deliverable() is None  # not before the TURN_END entry
    assert taken(sub) == [TurnEnded(1, "completed", first_end)]
    # what happens next arrives live, once
    session.turns.input_arrived("s", session.hub.stream.next_seq)
    session.token()
    second_end = end_turn(session, "interrupted")
    assert taken(sub) == [TurnStarted(2, first_end + 1), TurnEnded(2, "interrupted", second_end)]
    assert s.queued == 0


def test_a_resume_gets_the_turn_events_after_its_seq_and_not_those_before():
    session = FakeSession()
    session.token()
    first_end = end_turn(session)  # entry 2
    session.turns.input_arrived("s", session.hub.stream.next_seq)  # turn 2 from entry 3
    session.token()
    session.token()
    second_end = end_turn(session)  # entry 5
    events = [TurnStarted(2, 3), TurnEnded(2, "completed", second_end)]
    assert taken(Stream().sub(session=session, after=first_end)) == events
    assert taken(Stream().sub(session=session, after=first_end - 1)) == [
        TurnEnded(1, "completed", first_end), *events]
    # holding the TURN_END entry, the client was told of that end already
    assert taken(Stream().sub(session=session, after=second_end)) == []
    assert taken(Stream().sub(session=session, after=3)) == events[1:]


def test_the_log_keeps_the_newest_events_of_each_kind_in_publication_order():
    session = FakeSession()
    turns = session.turns
    note = TaskNote("accepted", session.hub.stream.next_seq, task_id="task-1")
    turns.tell(note)
    for _ in range(LOG_ENTRIES // 2 + 1):  # many short turns: 2 events each
        end_turn(session)
        turns.input_arrived("s", session.hub.stream.next_seq)
    assert len(turns.turn_log) == LOG_ENTRIES
    logged = turns.logged_after(0)
    # the oldest turn events went; the task's news, published first, did not
    assert logged[0] is note and logged[1] == TurnEnded(2, "completed", 2)
    assert logged[-1].turn == LOG_ENTRIES // 2 + 2 and len(logged) == LOG_ENTRIES + 1
    later = TaskNote("done", session.hub.stream.next_seq, task_id="task-1")
    turns.tell(later)
    end_turn(session)  # the exit is no event of the log
    turns.exit(0, "exited")
    assert turns.logged_after(0)[-2:] == [later, TurnEnded(LOG_ENTRIES // 2 + 2, "completed",
                                                           session.hub.stream.next_seq - 1)]


def test_past_the_limit_everything_queued_is_dropped_and_the_stream_must_end():
    s = Stream(limit=100)
    sub = s.sub()
    sub.push(b"x" * 40)  # 50 owed
    s.add_loose(b"r", b"y" * 30)  # 90 owed
    assert s.queued == 90 and s.error is None
    sub.push(b"z" * 1)  # 101: over
    assert isinstance(s.error, ResourceExhausted)
    assert (s.queued, list(sub.pending), list(s.loose), list(s.dirty)) == (
        0, [], [], [])
    assert not s.owe(1)  # nothing more is queued
    s.fail(CorralError("later"))
    assert str(s.error) == "over"  # the first error stays


def test_paying_back_what_was_sent():
    s = Stream()
    sub = s.sub()
    sub.push(b"abc")
    s.add_loose(b"r", b"de")
    assert s.queued == 3 + 2 + 2 * ITEM_COST
    assert sub.pop_pending() == b"abc"
    assert s.pop_loose() == (b"r", b"de")
    assert s.queued == 0


def test_release_stops_the_news_and_pays_back_what_was_queued():
    s = Stream()
    sub = s.sub()
    sub.push(b"abc")
    sub.session.turns.end_turn("completed", 5)
    s.remove(sub)
    assert s.queued == 0 and s.attached == []
    s.next_dirty()
    sub.session.token()
    assert not s.dirty  # the hub no longer tells it


def test_a_detached_session_marked_earlier_is_skipped():
    s = Stream()
    a, b = s.sub("a"), s.sub("b")
    s.remove(a)
    assert s.next_dirty() is b
    assert s.next_dirty() is None


def test_refs_and_who_may_steer():
    s = Stream()
    s.sub("w", watch_only=True)
    s.starting.add("s")
    with pytest.raises(CorralError, match=r"^ref: must be 1-64 bytes, got 0$"):
        s.check_ref("")
    with pytest.raises(CorralError, match=r"^ref: must be 1-64 bytes, got 65$"):
        s.check_ref("r" * 65)
    for ref in ("w", "s"):
        with pytest.raises(CorralError, match=rf"^ref: '{ref}' is already in use on this"):
            s.check_unused(ref)
    with pytest.raises(CorralError, match=r"^ref 's' is still starting") as info:
        s.watched("s", "input")
    assert info.value.grpc_status == "FAILED_PRECONDITION"
    with pytest.raises(CorralError, match=r"^no session is watched as 'x'") as info:
        s.watched("x", "detach")
    assert info.value.grpc_status == "NOT_FOUND"
    for kind in ("input", "interrupt", "close"):
        with pytest.raises(CorralError, match=r"^'w' was resumed watch-only$") as info:
            s.watched("w", kind)
        assert info.value.grpc_status == "PERMISSION_DENIED"
    assert s.watched("w", "detach").ref == "w"


def test_close_releases_every_session():
    s = Stream()
    a, b = s.sub("a"), s.sub("b")
    s.close()
    assert s.subs == {} and s.attached == []
    assert a not in a.session.listeners and b not in b.session.listeners
