"""A session's turns after a daemon restart (runtime/sessions.py `_restored_turns`): the
phase turns.json kept, brought up to date with the journal, what notes.jsonl kept logged
again for the clients that resume from before it, and the turn's last event where the
notes lack it."""

from __future__ import annotations

from corral.ext import EventKind
from corral.runtime.session_state import Phase, TaskNote, TurnEnded, TurnStarted
from corral.runtime.sessions import _restored_turns, turn_end_status

TOKEN, END = int(EventKind.TOKEN), int(EventKind.TURN_END)


def events(*kinds: int, status: bytes = b'{"status":"interrupted"}') -> list:
    return [(i, k, status if k == END else b"t") for i, k in enumerate(kinds, 1)]


def test_between_turns_the_turns_end_is_told_again_to_a_client_from_before_it():
    log = events(TOKEN, END, TOKEN, TOKEN, END)
    turns, _ = _restored_turns({"turn": 2, "phase": "between_turns", "seq": 5}, log)
    assert turns.phase is Phase.BETWEEN_TURNS and turns.turn == 2
    assert turns.logged_after(0) == [TurnEnded(2, "interrupted", 5)]
    assert turns.logged_after(4) == [TurnEnded(2, "interrupted", 5)]
    assert turns.logged_after(5) == []  # it holds the TURN_END entry: told already


def test_a_turn_end_the_daemon_died_before_writing_ends_the_turn():
    log = events(TOKEN, END, TOKEN, TOKEN, END, status=b'{"status":"completed"}')
    turns, _ = _restored_turns({"turn": 2, "phase": "in_turn", "seq": 3}, log)
    assert turns.phase is Phase.BETWEEN_TURNS
    assert turns.logged_after(0) == [TurnEnded(2, "completed", 5)]


def test_a_running_turn_has_its_start_told_again_and_the_first_turn_none():
    log = events(TOKEN, END, TOKEN, TOKEN)
    turns, _ = _restored_turns({"turn": 2, "phase": "in_turn", "seq": 3}, log)
    assert turns.turn_open and turns.logged_after(0) == [TurnStarted(2, 3)]
    assert turns.logged_after(3) == []
    first, _ = _restored_turns({"turn": 1, "phase": "in_turn", "seq": 0}, events(TOKEN))
    assert first.turn_open and first.logged_after(0) == []


def test_a_turn_end_gone_from_the_journal_is_not_made_up():
    turns, _ = _restored_turns({"turn": 3, "phase": "between_turns", "seq": 40},
                            events(TOKEN, TOKEN))
    assert turns.phase is Phase.BETWEEN_TURNS and turns.logged_after(0) == []


def test_with_notes_every_event_logged_before_the_restart_is_told_again_in_order():
    log = events(TOKEN, END, TOKEN, END, TOKEN)
    notes = [TurnEnded(1, "completed", 2), TurnStarted(2, 3),
             TaskNote("accepted", 3, task_id="t-1", ref="a"), TurnEnded(2, "completed", 4),
             TurnStarted(3, 5), TaskNote("update", 5, task_id="t-1", state="RUNNING")]
    turns, added = _restored_turns({"turn": 3, "phase": "in_turn", "seq": 5}, log, notes)
    assert turns.turn_open and turns.turn == 3
    assert turns.logged_after(0) == notes
    assert turns.logged_after(3) == notes[3:]
    assert added == []  # the notes hold the running turn's start: nothing made up


def test_a_turn_end_the_notes_lack_is_added_once_and_returned_for_the_journal():
    log = events(TOKEN, END, TOKEN, TOKEN, END)
    notes = [TurnEnded(1, "completed", 2), TurnStarted(2, 3)]
    # the daemon died after the TURN_END entry, before it logged or wrote the turn's end
    turns, added = _restored_turns({"turn": 2, "phase": "in_turn", "seq": 3}, log, notes)
    assert turns.phase is Phase.BETWEEN_TURNS
    assert added == [TurnEnded(2, "interrupted", 5)]
    assert turns.logged_after(0) == [*notes, TurnEnded(2, "interrupted", 5)]
    # died after logging it, before writing turns.json: logged once, not twice
    notes.append(TurnEnded(2, "interrupted", 5))
    turns, added = _restored_turns({"turn": 2, "phase": "in_turn", "seq": 3}, log, notes)
    assert added == [] and turns.logged_after(0) == notes


def test_a_start_logged_before_turns_json_was_written_is_dropped():
    """The daemon died between logging the next turn's start and writing it: the agent
    never heard that input, and the session is still between turns."""
    log = events(TOKEN, END)
    notes = [TurnEnded(1, "completed", 2), TurnStarted(2, 3)]
    turns, added = _restored_turns({"turn": 1, "phase": "between_turns", "seq": 2}, log,
                                   notes)
    assert turns.phase is Phase.BETWEEN_TURNS and turns.turn == 1
    assert turns.logged_after(0) == [TurnEnded(1, "completed", 2)] and added == []


def test_a_turn_ends_status_is_its_frames_word_or_completed():
    assert turn_end_status(b'{"status":"failed"}') == "failed"
    assert turn_end_status(b"{}") == "completed"
    assert turn_end_status(b"not json") == "completed"
    assert turn_end_status(b"[1]") == "completed"
