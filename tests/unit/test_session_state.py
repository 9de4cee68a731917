"""The session state machine (runtime/session_state.py): its table, its events, delivery."""

from __future__ import annotations

import pytest

from corral.runtime.session_state import (
    TRANSITIONS,
    Exited,
    Phase,
    SessionTurns,
    TurnEnded,
    TurnStarted,
    deliverable,
)
from corral.sandbox.errors import CorralError, InvalidTransition


class Listener:
    def __init__(self) -> None:
        self.events: list = []

    def put_nowait(self, event) -> None:
        self.events.append(event)


@pytest.fixture
def turns():
    t = SessionTurns()
    t.listeners.add(listener := Listener())
    return t, listener


def test_the_table_allows_exactly_these_moves():
    assert {(a, b) for a, to in TRANSITIONS.items() for b in to} == {
        (Phase.IN_TURN, Phase.BETWEEN_TURNS),
        (Phase.BETWEEN_TURNS, Phase.IN_TURN),
        (Phase.BETWEEN_TURNS, Phase.EXITED),
    }

def test_nothing_leaves_exited():
    t = SessionTurns()
    t.end_turn("completed", 1)
    t.exit(0, "exited")
    with pytest.raises(InvalidTransition, match=r"^illegal transition EXITED -> IN_TURN$"):
        t._move(Phase.IN_TURN)
    assert t.end_turn("completed", 2) is None and t.phase is Phase.EXITED


def test_a_session_starts_in_turn_1(turns):
    t, listener = turns
    assert (t.phase, t.turn, t.turn_open, t.exited, t.closing) == (
        Phase.IN_TURN, 1, True, None, False)
    assert listener.events == []


def test_input_during_a_turn_starts_nothing(turns):
    t, listener = turns
    assert t.input_arrived("ses-1", next_seq=5) is None
    assert (t.phase, t.turn, listener.events) == (Phase.IN_TURN, 1, [])


def test_turn_end_then_input_starts_the_next_turn_at_the_next_entry(turns):
    t, listener = turns
    assert t.end_turn("completed", seq=7) == TurnEnded(1, "completed", 7)
    assert t.phase is Phase.BETWEEN_TURNS and not t.turn_open
    assert t.input_arrived("ses-1", next_seq=8) == TurnStarted(2, 8)
    assert t.phase is Phase.IN_TURN and t.turn == 2
    assert listener.events == [TurnEnded(1, "completed", 7), TurnStarted(2, 8)]


def test_a_second_turn_end_is_ignored(turns):
    t, listener = turns
    t.end_turn("interrupted", seq=3)
    assert t.end_turn("completed", seq=4) is None
    assert listener.events == [TurnEnded(1, "interrupted", 3)]


def test_exit_needs_the_turn_ended_first(turns):
    t, listener = turns
    with pytest.raises(InvalidTransition, match=r"^illegal transition IN_TURN -> EXITED$"):
        t.exit(0, "exited")
    assert t.exited is None and listener.events == []


def test_exit_is_published_and_final(turns):
    t, listener = turns
    t.end_turn("completed", seq=2)
    assert t.exit(3, "exited") == Exited(3, "exited")
    assert t.exited == Exited(3, "exited") and t.phase is Phase.EXITED
    assert listener.events[-1] == Exited(3, "exited")
    with pytest.raises(CorralError, match=r"^session ses-9 has ended$") as info:
        t.input_arrived("ses-9", next_seq=3)
    assert info.value.grpc_status == "FAILED_PRECONDITION"
    with pytest.raises(CorralError, match=r"^session ses-9 has ended$"):
        t.check_running("ses-9")
    with pytest.raises(InvalidTransition):
        t.exit(0, "again")


def test_a_requested_close_names_the_exit_and_counts_once(turns):
    t, _ = turns
    assert t.request_close("idle") is True
    assert t.closing
    assert t.request_close("closed") is False  # the first reason stays
    t.input_arrived("ses-1", next_seq=1)  # still steerable while closing
    t.end_turn("interrupted", seq=1)
    assert t.exit(-15, "killed") == Exited(-15, "idle")
    assert not t.closing
    assert t.request_close("closed") is False


def test_every_listener_hears_every_change_in_order():
    t = SessionTurns()
    a, b = Listener(), Listener()
    t.listeners |= {a, b}
    t.end_turn("completed", 4)
    t.input_arrived("s", 5)
    t.end_turn("failed", 9)
    t.exit(1, "exited")
    expected = [TurnEnded(1, "completed", 4), TurnStarted(2, 5), TurnEnded(2, "failed", 9),
                Exited(1, "exited")]
    assert a.events == expected and b.events == expected


@pytest.mark.parametrize(("event", "next_seq", "ok"), [
    (TurnEnded(1, "completed", 10), 10, False),  # its TURN_END entry not sent yet
    (TurnEnded(1, "completed", 10), 11, True),
    (TurnStarted(2, 11), 10, False),  # entries before the turn not all sent yet
    (TurnStarted(2, 11), 11, True),
    (Exited(0, "exited"), 1, True),
])
def test_a_turn_event_is_delivered_only_after_the_entries_it_follows(event, next_seq, ok):
    assert deliverable(event, next_seq) is ok
