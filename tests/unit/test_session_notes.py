"""What a session logged for its watchers, kept on disk for live restore
(runtime/session_journal.py notes.jsonl; runtime/session_state.py note_record)."""

from __future__ import annotations

import json
import os

import pytest

from corral.runtime import session_journal
from corral.runtime.session_journal import NOTES_FILE, SessionJournal, load_notes
from corral.runtime.session_state import (
    SessionTurns,
    TaskNote,
    TurnEnded,
    TurnStarted,
    note_from_record,
    note_record,
)

EVENTS = [TurnEnded(1, "completed", 4), TurnStarted(2, 5),
          TaskNote("done", 9, task_id="t-1", ref="r", state="SUCCEEDED", attempt=2,
                   result_json='{"x": 1}', out_dir="/workspace/.corral/tasks/t-1")]


def test_every_kind_of_event_comes_back_from_its_record_equal():
    for event in EVENTS:
        record = json.loads(json.dumps(note_record(event)))
        assert note_from_record(record) == event


@pytest.mark.parametrize("record, why", [
    ([1, 2], "not a JSON object"),
    ({"kind": "exited", "returncode": 0}, "unknown kind 'exited'"),
    ({"kind": "turn_started", "turn": 2}, "seq missing"),
    ({"kind": "turn_ended", "turn": "2", "status": "x", "seq": 1}, "turn is not a int"),
    ({"kind": "task", "event": "update", "seq": 3, "attempt": True}, "attempt is not a int"),
])
def test_a_record_that_is_not_an_events_is_refused_naming_why(record, why):
    with pytest.raises(ValueError, match=f"^{why}$"):
        note_from_record(record)


def test_what_the_turns_log_is_appended_and_read_back_in_order(tmp_path):
    journal = SessionJournal(str(tmp_path / "s1"), 1 << 16)
    turns = SessionTurns()
    journal.keep_notes(turns)
    turns.end_turn("completed", 4)
    turns.input_arrived("s1", 5)
    turns.tell(EVENTS[2])
    found, lines = load_notes(os.path.join(journal.directory, NOTES_FILE))
    assert found == EVENTS and lines == 3
    journal.remove()
    assert not os.path.exists(journal.directory)
    turns.tell(EVENTS[2])  # after the session's directory went: nothing written, no error


def test_a_line_cut_by_a_kill_is_cut_off_and_a_missing_file_is_none(tmp_path):
    path = tmp_path / NOTES_FILE
    assert load_notes(str(path)) == (None, 0)
    good = json.dumps(note_record(EVENTS[0]))
    path.write_text(good + "\n" + good[:12])
    assert load_notes(str(path)) == ([EVENTS[0]], 1)
    assert path.read_text() == good + "\n"  # the next append starts a line of its own
    path.write_text(good + "\n" + "not json\n" + good + "\n")
    assert load_notes(str(path)) == ([EVENTS[0], EVENTS[0]], 3)  # a bad line is skipped


def test_a_restored_session_appends_after_what_its_notes_held(tmp_path):
    directory = str(tmp_path / "s1")
    journal = SessionJournal(directory, 1 << 16)
    turns = SessionTurns()
    journal.keep_notes(turns)
    turns.end_turn("completed", 4)
    with open(os.path.join(directory, NOTES_FILE), "a") as f:
        f.write('{"kind":"turn_st')  # the daemon killed mid-write
    found, lines = load_notes(os.path.join(directory, NOTES_FILE))
    again = SessionJournal(directory, 1 << 16)  # the next daemon's
    restored = SessionTurns()
    for event in found:
        restored.remember(event)
    again.keep_notes(restored, lines)
    restored.tell(EVENTS[2])
    assert load_notes(os.path.join(directory, NOTES_FILE)) == (
        [TurnEnded(1, "completed", 4), EVENTS[2]], 2)


def test_the_file_is_rewritten_with_what_the_session_keeps_once_it_is_long(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(session_journal, "NOTES_COMPACT_LINES", 10)
    monkeypatch.setattr(SessionTurns, "__init__", _small_turns_init)
    journal = SessionJournal(str(tmp_path / "s1"), 1 << 16)
    turns = SessionTurns()
    journal.keep_notes(turns)
    for i in range(25):
        turns.tell(TaskNote("update", i, task_id="t-1", progress_json=f'{{"n": {i}}}'))
    path = os.path.join(journal.directory, NOTES_FILE)
    found, lines = load_notes(path)
    # never past the bound plus what came since the last rewrite, and always the newest
    assert lines <= 10
    assert found[-4:] == turns.logged()  # what the session keeps is all there
    assert [e.seq for e in found] == list(range(25 - len(found), 25))
    assert not os.path.exists(path + ".tmp")
    journal.remove()


_real_init = SessionTurns.__init__


def _small_turns_init(self) -> None:
    """A SessionTurns that keeps 4 events of each kind (LOG_ENTRIES is 4096)."""
    from collections import deque

    _real_init(self)
    self.turn_log = deque(maxlen=4)
    self.task_log = deque(maxlen=4)


def test_a_restarted_daemon_does_not_log_again_what_the_notes_hold():
    """runtime/tasks/delegation.py `_logged_already`: after a restart the daemon tells its
    running tasks' state again, and an end it sent before the kill; watchers resuming from
    before the restart get each once."""
    from corral.runtime.tasks.delegation import _logged_already

    update = TaskNote("update", 3, task_id="t-1", state="RUNNING", attempt=1,
                      progress_json='{"p": 40}')
    log = [(1, TaskNote("accepted", 2, task_id="t-1")), (2, update),
           (3, TaskNote("update", 4, task_id="t-2", state="RUNNING"))]
    assert _logged_already(log, TaskNote("update", 0, task_id="t-1", state="RUNNING",
                                         attempt=1, progress_json='{"p": 40}'))
    # news: more progress, another attempt, another state, another task
    for fresh in (TaskNote("update", 0, task_id="t-1", state="RUNNING", attempt=1,
                           progress_json='{"p": 50}'),
                  TaskNote("update", 0, task_id="t-1", state="RUNNING", attempt=2,
                           progress_json='{"p": 40}'),
                  TaskNote("update", 0, task_id="t-1", state="PENDING", attempt=1,
                           progress_json='{"p": 40}'),
                  TaskNote("update", 0, task_id="t-3", state="RUNNING")):
        assert not _logged_already(log, fresh)
    done = TaskNote("done", 9, task_id="t-1", state="SUCCEEDED")
    assert not _logged_already(log, done)
    log.append((4, done))
    assert _logged_already(log, TaskNote("done", 0, task_id="t-1", state="SUCCEEDED"))
    assert not _logged_already(log, TaskNote("done", 0, task_id="t-2", state="FAILED"))
    # after its end, the same update as its last is news no more, but the end is newest
    assert not _logged_already(log, TaskNote("update", 0, task_id="t-1", state="RUNNING",
                                             attempt=1, progress_json='{"p": 40}'))
