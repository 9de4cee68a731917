"""A kept sandbox's sessions across a daemon restart (live restore): what each session is,
its turn state, and its replay log on disk.

Each session of a kept sandbox has a directory `<sandbox runtime dir>/sessions/<id>/`
(tmpfs under /run/corral; removed when the session ends, and with the sandbox's runtime
directory): `session.json` (tenant, labels, agent command, ... written once, off the
start's path, on live restore's writer thread), `turns.json` (turn number, phase and the
seq of the last change; rewritten at each change, before an input reaches the agent), and
`events/`, the runtime/journal.py OutputJournal of its hub: every read of the agent's
events pipe and every entry the runtime appends (a plain agent's output, a forced
TURN_END), so the rebuilt log has the seqs the old one had; and `notes.jsonl`, what the
session logged for its watchers (its turns' starts and ends, the news of its delegated
tasks: runtime/session_state.py), one JSON line each, appended as it is logged and
rewritten with what the session still keeps once it holds four times as many lines, so
that a watcher that resumes after a restart is told of what came before it. The agent
itself is a command of the sandbox (runtime/command_journal.py rebuilds it); the holder
keeps its events read end and control write end (restore.session_key).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from dataclasses import dataclass

from .journal import Loaded, OutputJournal, load_each, write_json
from .session_state import LOG_ENTRIES, SessionTurns, note_from_record, note_record

#: The directory of a sandbox's session journals, in its runtime directory.
SESSIONS_DIR = "sessions"
SESSION_FILE = "session.json"
TURNS_FILE = "turns.json"
NOTES_FILE = "notes.jsonl"
#: Lines notes.jsonl may hold before it is rewritten with what the session still keeps
#: (at most LOG_ENTRIES of each kind): appends stay cheap and the file stays bounded.
NOTES_COMPACT_LINES = 4 * LOG_ENTRIES


class SessionJournal:
    """One session's directory (module docstring)."""

    def __init__(self, directory: str, log_bytes: int) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.events = OutputJournal(os.path.join(directory, "events"), log_bytes)
        self._notes_fd = -1
        self._note_lines = 0
        self._turns: SessionTurns | None = None
        #: The loop appends notes; live restore's writer thread removes the directory.
        self._notes_lock = threading.Lock()
        self._removed = False

    @classmethod
    def for_sandbox(cls, sandbox_runtime_dir: str, session_id: str,
                    log_bytes: int) -> SessionJournal:
        return cls(os.path.join(sandbox_runtime_dir, SESSIONS_DIR, session_id), log_bytes)

    def write_record(self, record: dict) -> None:
        write_json(os.path.join(self.directory, SESSION_FILE), record)

    def write_turns(self, turn: int, phase: str, seq: int) -> None:
        """The turn state after a change at entry seq (on the loop: a small tmpfs file)."""
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: it has ended
            write_json(os.path.join(self.directory, TURNS_FILE),
                        {"turn": turn, "phase": phase, "seq": seq})

    def keep_notes(self, turns: SessionTurns, lines: int = 0) -> None:
        """From now on, append every event `turns` logs to notes.jsonl (which holds `lines`
        lines already: a restored session's)."""
        self._turns = turns
        self._note_lines = lines
        turns.sink = self.append_note

    def append_note(self, event) -> None:
        """One logged event, as a line of notes.jsonl (on the loop: a short tmpfs write).
        A session whose directory is gone (it has ended) writes nothing."""
        line = (json.dumps(note_record(event), separators=(",", ":")) + "\n").encode()
        with self._notes_lock:
            if self._removed:
                return
            if self._note_lines >= NOTES_COMPACT_LINES and self._turns is not None:
                self._compact()  # the event is logged already: the rewrite holds it
                return
            try:
                if self._notes_fd < 0:
                    self._notes_fd = os.open(
                        os.path.join(self.directory, NOTES_FILE),
                        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.write(self._notes_fd, line)
            except FileNotFoundError:
                return
            self._note_lines += 1

    def _compact(self) -> None:
        """Rewrite notes.jsonl with what the session still keeps, whole or not at all.
        Caller holds _notes_lock."""
        events = self._turns.logged()
        path = os.path.join(self.directory, NOTES_FILE)
        try:
            with open(path + ".tmp", "w") as f:
                for event in events:
                    f.write(json.dumps(note_record(event), separators=(",", ":")) + "\n")
            os.replace(path + ".tmp", path)
        except FileNotFoundError:
            return
        self._close_notes()
        self._note_lines = len(events)

    def _close_notes(self) -> None:
        if self._notes_fd >= 0:
            os.close(self._notes_fd)
            self._notes_fd = -1

    def remove(self) -> None:
        self.events.close()
        with self._notes_lock:  # no note is being written, and none will be
            self._removed = True
            self._close_notes()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class LoadedSession:
    """A session's directory as a restarted daemon found it."""

    record: dict
    turns: dict
    journal: SessionJournal
    log: Loaded | None
    #: What notes.jsonl held, in order (None: the file is absent, a journal written
    #: before it was kept), and how many lines it had.
    notes: list | None = None
    note_lines: int = 0


def _load_session(directory: str) -> LoadedSession:
    with open(os.path.join(directory, SESSION_FILE)) as f:
        record = json.load(f)
    turns = {"turn": 1, "phase": "in_turn", "seq": 0}
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(directory, TURNS_FILE)) as f:
            turns = json.load(f)
    journal = SessionJournal(directory, int(record["log_bytes"]))
    notes, lines = load_notes(os.path.join(directory, NOTES_FILE))
    return LoadedSession(record, turns, journal, journal.events.load(), notes, lines)


def load_notes(path: str) -> tuple[list | None, int]:
    """The events notes.jsonl at path holds, in order, and its line count; (None, 0) when
    there is no such file. A last line cut by a SIGKILL mid-write is cut off the file (the
    next append starts a line of its own); a line that cannot be read back is skipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, 0
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        os.truncate(path, len(raw))
    events, lines = [], 0
    for line in raw.splitlines():
        lines += 1
        try:
            events.append(note_from_record(json.loads(line)))
        except ValueError:
            continue
    return events, lines


def load_sessions(sandbox_runtime_dir: str) -> tuple[list[LoadedSession], list[str]]:
    """The sessions whose journals a sandbox's runtime directory holds, oldest first, and
    the problems met (session id: why; such a directory is removed)."""
    found, problems = load_each(os.path.join(sandbox_runtime_dir, SESSIONS_DIR),
                                _load_session,
                                "{name}: its journal cannot be read back ({error})")
    found.sort(key=lambda s: s.record.get("created_at", 0.0))
    return found, problems
