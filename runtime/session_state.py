"""A session's turns and life as a plain object, and the rules for telling a client about them.

Nothing here knows the event loop, gRPC or the sandbox: runtime/sessions.py drives a
`SessionTurns` from what the agent does, and the servicers (runtime/api/sessions.py) hand
the events it publishes to their clients in the order `deliverable` allows.

Rules this module keeps:

* Every phase change goes through ``SessionTurns._move(to)``; a move missing from
  ``TRANSITIONS`` raises ``InvalidTransition(from_, to)``. A session starts IN_TURN (turn 1
  runs from the start); a TURN_END (the agent's, or one the runtime forces) moves it to
  BETWEEN_TURNS; an input there starts the next turn; it exits only BETWEEN_TURNS (a turn
  still open when the agent exits is ended first), and nothing leaves EXITED.
* Each change is published to every listener as one event (`TurnStarted`, `TurnEnded`,
  `Exited`), in the order the changes happened.
* Closing is a request, not a phase: a session asked to close keeps running (and steering
  still reaches it) until its agent exits; the close's reason becomes the exit's reason.
* A client is told of a turn event only once it has every stream entry the event comes
  after (`deliverable`), so events and batches never cross on one stream. News of a
  delegated task (`TaskNote`, published by `tell`) keeps the same rule.
* Every event but the exit is also logged (the newest LOG_ENTRIES turn events and as many
  task notes, each kind on its own so that many short turns never push out a task's
  news): a stream that starts watching after entry N is first handed what it lacks, in
  the order it was published (`SessionTurns.logged_after`), so an event published before
  anyone watched (an agent whose first turn ended while its session's start was still
  being recorded, a turn that ended while the client was away) is not lost.
* What is logged can also be kept elsewhere: `SessionTurns.sink`, when set, is handed every
  event as it is logged (runtime/session_journal.py writes them for live restore), and
  `note_record` / `note_from_record` turn one into a JSON object and back.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from corral.sandbox.errors import Ended, InvalidTransition

#: Turn events, and as many news of delegated tasks, a session keeps for the streams that
#: start watching it later (a start racing its agent's first turn, a resume).
LOG_ENTRIES = 4096


class Phase(enum.Enum):
    IN_TURN = "in_turn"
    BETWEEN_TURNS = "between_turns"
    EXITED = "exited"


#: from -> the phases it may move to.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IN_TURN: frozenset({Phase.BETWEEN_TURNS}),
    Phase.BETWEEN_TURNS: frozenset({Phase.IN_TURN, Phase.EXITED}),
    Phase.EXITED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class TurnStarted:
    turn: int
    seq: int  # the first stream entry of the turn


@dataclass(frozen=True, slots=True)
class TurnEnded:
    turn: int
    status: str
    seq: int  # the TURN_END entry


@dataclass(frozen=True, slots=True)
class Exited:
    returncode: int  # the agent's exit code, or -N when signal N killed it
    reason: str  # a requested close's reason, else how the agent ended, e.g. "exited"


@dataclass(frozen=True, slots=True)
class TaskNote:
    """What the session's agent was told of a task it delegated (protocol v1.1), as its
    watchers get it: event "accepted", "refused", "update" or "done"."""

    event: str
    seq: int  # it comes after every stream entry before this one
    task_id: str = ""
    ref: str = ""
    state: str = ""
    node: str = ""
    attempt: int = 0
    progress_json: str = ""
    result_json: str = ""
    out_dir: str = ""
    code: str = ""
    message: str = ""


class SessionTurns:
    """The phase and turn number of one session, and who is told when they change.

    Listeners are objects with `put_nowait(event)` (a client stream's inbox); they are
    called synchronously, in the order the changes happen.
    """

    __slots__ = ("phase", "turn", "exited", "close_reason", "listeners", "turn_log",
                 "task_log", "sink", "_published")

    def __init__(self) -> None:
        self.phase = Phase.IN_TURN
        self.turn = 1
        self.exited: Exited | None = None
        #: Set by the first request_close(): the reason the session's exit will give.
        self.close_reason: str | None = None
        self.listeners: set = set()
        #: (publication number, event), oldest first: the turns started and ended, and
        #: what the agent was told of its deep tasks (see `logged_after`).
        self.turn_log: deque[tuple[int, TurnStarted | TurnEnded]] = deque(maxlen=LOG_ENTRIES)
        self.task_log: deque[tuple[int, TaskNote]] = deque(maxlen=LOG_ENTRIES)
        #: Called with every event as it is logged (published or remembered), or None.
        self.sink: Callable[[TurnStarted | TurnEnded | TaskNote], None] | None = None
        self._published = 0

    @property
    def turn_open(self) -> bool:
        return self.phase is Phase.IN_TURN

    @property
    def closing(self) -> bool:
        """Asked to close, not exited yet."""
        return self.close_reason is not None and self.exited is None

    def check_running(self, session_id: str) -> None:
        """Raises:
        Ended: the session has exited (nothing can steer it any more)."""
        if self.phase is Phase.EXITED:
            raise Ended(f"session {session_id} has ended")

    def input_arrived(self, session_id: str, next_seq: int) -> TurnStarted | None:
        """Steering text is being delivered: between turns it starts the next one, whose
        first entry will be next_seq.

        Raises:
            Ended: the session has exited.
        """
        self.check_running(session_id)
        if self.phase is Phase.IN_TURN:
            return None
        self._move(Phase.IN_TURN)
        self.turn += 1
        return self._publish(TurnStarted(self.turn, next_seq))

    def end_turn(self, status: str, seq: int) -> TurnEnded | None:
        """The turn ended with `status` at entry seq; None (and no event) between turns."""
        if self.phase is not Phase.IN_TURN:
            return None
        self._move(Phase.BETWEEN_TURNS)
        return self._publish(TurnEnded(self.turn, status, seq))

    def request_close(self, reason: str) -> bool:
        """Note a request to end the session; True for the first one while it runs."""
        if self.exited is not None or self.close_reason is not None:
            return False
        self.close_reason = reason
        return True

    def exit(self, returncode: int, reason: str) -> Exited:
        """The agent exited (end its turn first). A requested close's reason wins over
        `reason`.

        Raises:
            InvalidTransition: a turn is still open, or the session exited already.
        """
        self._move(Phase.EXITED)
        self.exited = Exited(returncode, self.close_reason or reason)
        return self._publish(self.exited)

    def tell(self, note: TaskNote) -> TaskNote:
        """Log news of a delegated task and publish it to every listener (it changes no
        phase)."""
        return self._publish(note)

    def _move(self, to: Phase) -> None:
        """Raises:
        InvalidTransition: TRANSITIONS has no move from the current phase to `to`."""
        if to not in TRANSITIONS[self.phase]:
            raise InvalidTransition(self.phase.name, to.name)
        self.phase = to

    def logged_after(self, after: int) -> list[TurnStarted | TurnEnded | TaskNote]:
        """The logged events a client holding every entry up to `after` (0: none) lacks
        (`missed`), in the order they were published."""
        return [event for event in self.logged() if missed(event, after)]

    def logged(self) -> list[TurnStarted | TurnEnded | TaskNote]:
        """Every logged event still kept, in the order it was logged."""
        merged = heapq.merge(self.turn_log, self.task_log, key=lambda item: item[0])
        return [event for _, event in merged]

    def remember(self, event: TurnStarted | TurnEnded | TaskNote) -> None:
        """Log an event without publishing it (one from before a daemon restart: the
        streams that resume are told of it, nobody watches yet)."""
        self._log(event)

    def _log(self, event: TurnStarted | TurnEnded | TaskNote) -> None:
        self._published += 1
        log = self.task_log if isinstance(event, TaskNote) else self.turn_log
        log.append((self._published, event))
        if self.sink is not None:
            self.sink(event)

    def _publish(self, event):
        if not isinstance(event, Exited):
            self._log(event)
        for listener in list(self.listeners):
            listener.put_nowait(event)
        return event


def deliverable(event, next_seq: int) -> bool:
    """Whether a client whose next entry is next_seq may get this turn event now: only once
    it has every entry the event comes after (a turn's end after its TURN_END entry, a
    turn's start after the entries before it), so events and batches never cross."""
    if isinstance(event, TurnEnded):
        return next_seq > event.seq
    if isinstance(event, TurnStarted | TaskNote):
        return next_seq >= event.seq
    return True


def missed(event, after: int) -> bool:
    """Whether a client that has every entry up to `after` (0: none) and starts watching now
    lacks this logged event: it comes after an entry the client does not have yet.

    A turn's end is told after its TURN_END entry (seq); a turn's start and a task's news
    before the entry `seq`. A client holding entry `seq` was told of either already."""
    return event.seq > after


#: The "kind" of each logged event's record (note_record).
_KINDS: dict[type, str] = {TurnStarted: "turn_started", TurnEnded: "turn_ended",
                           TaskNote: "task"}
_TYPES = {kind: cls for cls, kind in _KINDS.items()}
_MISSING = object()


def note_record(event: TurnStarted | TurnEnded | TaskNote) -> dict:
    """A logged event as a JSON object: its fields and its "kind"."""
    return {"kind": _KINDS[type(event)], **dataclasses.asdict(event)}


def note_from_record(record: dict) -> TurnStarted | TurnEnded | TaskNote:
    """The event note_record made `record` from.

    Raises:
        ValueError: not such a record (an unknown kind, a field missing or of another
            type).
    """
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    cls = _TYPES.get(record.get("kind"))
    if cls is None:
        raise ValueError(f"unknown kind {record.get('kind')!r}")
    values = {}
    for field in dataclasses.fields(cls):
        value = record.get(field.name, _MISSING)
        if value is _MISSING:
            if field.default is dataclasses.MISSING:
                raise ValueError(f"{field.name} missing")
            continue
        expected = int if field.type == "int" else str
        if type(value) is not expected:
            raise ValueError(f"{field.name} is not a {expected.__name__}")
        values[field.name] = value
    return cls(**values)

