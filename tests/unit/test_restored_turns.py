"""A session's turns after a daemon restart (runtime/sessions.py `_restored_turns`): the
phase turns.json kept, brought up to date with the journal, and the turn's last event
logged again for the clients that resume from before it."""

from __future__ import annotations

from corral.ext import EventKind
from corral.runtime.session_state import Phase, TurnEnded, TurnStarted
from corral.runtime.sessions import _restored_turns, turn_end_status

TOKEN, END = int(EventKind.TOKEN), int(EventKind.TURN_END)


def events(*kinds: int, status: bytes = b'{"status":"interrupted"}') -> list:
    return [(i, k, status if k == END else b"t") for i, k in enumerate(kinds, 1)]


def test_between_turns_the_turns_end_is_told_again_to_a_client_from_before_it():
    log = events(TOKEN, END, TOKEN, TOKEN, END)
    turns = _restored_turns({"turn": 2, "phase": "between_turns", "seq": 5}, log)
    assert turns.phase is Phase.BETWEEN_TURNS and turns.turn == 2
    assert turns.logged_after(0) == [TurnEnded(2, "interrupted", 5)]
    assert turns.logged_after(4) == [TurnEnded(2, "interrupted", 5)]
    assert turns.logged_after(5) == []  # it holds the TURN_END entry: told already


def test_a_turn_end_the_daemon_died_before_writing_ends_the_turn():
    log = events(TOKEN, END, TOKEN, TOKEN, END, status=b'{"status":"completed"}')
    turns = _restored_turns({"turn": 2, "phase": "in_turn", "seq": 3}, log)
    assert turns.phase is Phase.BETWEEN_TURNS
    assert turns.logged_after(0) == [TurnEnded(2, "completed", 5)]


def test_a_running_turn_has_its_start_told_again_and_the_first_turn_none():
    log = events(TOKEN, END, TOKEN, TOKEN)
    turns = _restored_turns({"turn": 2, "phase": "in_turn", "seq": 3}, log)
    assert turns.turn_open and turns.logged_after(0) == [TurnStarted(2, 3)]
    assert turns.logged_after(3) == []
    first = _restored_turns({"turn": 1, "phase": "in_turn", "seq": 0}, events(TOKEN))
    assert first.turn_open and first.logged_after(0) == []


def test_a_turn_end_gone_from_the_journal_is_not_made_up():
    turns = _restored_turns({"turn": 3, "phase": "between_turns", "seq": 40},
                            events(TOKEN, TOKEN))
    assert turns.phase is Phase.BETWEEN_TURNS and turns.logged_after(0) == []


def test_a_turn_ends_status_is_its_frames_word_or_completed():
    assert turn_end_status(b'{"status":"failed"}') == "failed"
    assert turn_end_status(b"{}") == "completed"
    assert turn_end_status(b"not json") == "completed"
    assert turn_end_status(b"[1]") == "completed"
