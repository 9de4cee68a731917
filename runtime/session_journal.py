"""A kept sandbox's sessions across a daemon restart (live restore): what each session is,
its turn state, and its replay log on disk.

Each session of a kept sandbox has a directory `<sandbox runtime dir>/sessions/<id>/`
(tmpfs under /run/corral; removed when the session ends, and with the sandbox's runtime
directory): `session.json` (tenant, labels, agent command, ... written once, off the
start's path, on live restore's writer thread), `turns.json` (turn number, phase and the
seq of the last change; rewritten at each change, before an input reaches the agent), and
`events/`, the runtime/journal.py OutputJournal of its hub: every read of the agent's
events pipe and every entry the runtime appends (a plain agent's output, a forced
TURN_END), so the rebuilt log has the seqs the old one had. The agent itself is a command
of the sandbox (runtime/command_journal.py rebuilds it); the holder keeps its events read
end and control write end (restore.session_key).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

from .journal import Loaded, OutputJournal, load_each, write_json

#: The directory of a sandbox's session journals, in its runtime directory.
SESSIONS_DIR = "sessions"
SESSION_FILE = "session.json"
TURNS_FILE = "turns.json"


class SessionJournal:
    """One session's directory (module docstring)."""

    def __init__(self, directory: str, log_bytes: int) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.events = OutputJournal(os.path.join(directory, "events"), log_bytes)

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

    def remove(self) -> None:
        self.events.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class LoadedSession:
    """A session's directory as a restarted daemon found it."""

    record: dict
    turns: dict
    journal: SessionJournal
    log: Loaded | None


def _load_session(directory: str) -> LoadedSession:
    with open(os.path.join(directory, SESSION_FILE)) as f:
        record = json.load(f)
    turns = {"turn": 1, "phase": "in_turn", "seq": 0}
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(directory, TURNS_FILE)) as f:
            turns = json.load(f)
    journal = SessionJournal(directory, int(record["log_bytes"]))
    return LoadedSession(record, turns, journal, journal.events.load())


def load_sessions(sandbox_runtime_dir: str) -> tuple[list[LoadedSession], list[str]]:
    """The sessions whose journals a sandbox's runtime directory holds, oldest first, and
    the problems met (session id: why; such a directory is removed)."""
    found, problems = load_each(os.path.join(sandbox_runtime_dir, SESSIONS_DIR),
                                _load_session,
                                "{name}: its journal cannot be read back ({error})")
    found.sort(key=lambda s: s.record.get("created_at", 0.0))
    return found, problems
