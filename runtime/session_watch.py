"""What one client stream owes its client about the sessions it watches.

A `SessionWatch` is the state of one Sessions stream: `Open` watches one session, `OpenMany`
any number, each under a client-chosen ref. It knows neither the event loop nor the wire:
the servicer's stream (runtime/api/sessions.py) subclasses it to say how its writer is
woken, asks it which sessions have news, and encodes what it hands back.

Rules this module keeps:

* A watched session with news (a hub entry, a turn event, its exit) marks itself dirty once
  and joins `dirty` (round robin); the stream's writer takes it from there. Nothing here
  runs per entry or waits per session.
* What the stream owes its client beyond the replay logs (encoded opened and error
  messages, turn events) is counted against `limit` bytes, `item_cost` more per item (the
  objects holding it). Past it everything queued is dropped and `error` is set: the stream
  must end (its sessions keep running; a resume comes back).
* A turn event waits until the client has every entry it follows
  (`session_state.deliverable`); the exit goes out after the last entry, and then the
  session leaves the stream. News of delegated tasks (`TaskNote`) travels the same way.
  A stream that starts watching after entry N (0 for a start) first gets the turn events
  and task news of the session's log that come after N (`SessionTurns.logged_after`):
  nothing published before the stream attached is lost.
* A watch-only subscription may not steer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from corral.sandbox.errors import CorralError, Ended, InvalidSpec, NotFound, PermissionDenied

from .session_state import Exited, deliverable

#: Request kinds that act on a session (a watch-only subscription may not send them).
STEERING = frozenset({"input", "interrupt", "close"})
#: Bytes of an OpenMany ref, at most.
MAX_REF_BYTES = 64


class Watched:
    """One session watched on a stream (under `ref` on OpenMany)."""

    __slots__ = ("watch", "ref", "ref_field", "session", "watcher", "watch_only", "pending",
                 "events", "exited", "dirty")

    def __init__(self, watch: SessionWatch, ref: str, session, after: int,
                 watch_only: bool, ref_field: bytes = b"") -> None:
        """Start watching after entry `after` (0: from the start).

        Raises:
            SeqOutOfRange: after is past the newest entry (names resume.after_seq).
        """
        self.watch = watch
        self.ref = ref
        self.ref_field = ref_field  # the ref as the servicer encodes it
        self.session = session
        self.watch_only = watch_only
        self.pending: deque[bytes] = deque()  # encoded messages to send before news
        self.events: deque = deque()  # turn events, each sent once deliverable
        self.exited: Exited | None = session.exited
        self.dirty = False
        self.watcher = session.hub.watch(after or None, field="resume.after_seq")
        # the turn events and task news published before this stream watched: a start
        # that raced its agent's first turn, a resume after a turn ended
        for event in session.turns.logged_after(after):
            if watch.owe(watch.event_cost(event)):
                self.events.append(event)
        # Not kept on self: watched -> bound method -> watched would be a reference cycle
        # holding the session (and its replay log) until the cyclic GC ran; bound methods
        # compare equal, so remove_notify(self.mark) finds it.
        session.hub.add_notify(self.mark)
        session.listeners.add(self)
        watch.attach(session)

    def mark(self) -> None:
        """Hub notify callback: this session has news for the stream."""
        if not self.dirty:
            self.dirty = True
            self.watch.dirty.append(self)
            self.watch.wake()

    def put_nowait(self, event) -> None:
        """SessionTurns listener: turn started or ended, task news, exited."""
        if isinstance(event, Exited):
            self.exited = event
        elif self.watch.owe(self.watch.event_cost(event)):
            self.events.append(event)
        self.mark()

    def push(self, message: bytes) -> None:
        """Queue an encoded message to send before this session's news."""
        if self.watch.owe(len(message) + self.watch.item_cost):
            self.pending.append(message)

    def pop_pending(self) -> bytes:
        message = self.pending.popleft()
        self.watch.paid(len(message) + self.watch.item_cost)
        return message

    def pop_deliverable(self):
        """The next turn event the client may have now (see `deliverable`), or None."""
        events = self.events
        if events and deliverable(events[0], self.watcher.next_seq):
            event = events.popleft()
            self.watch.paid(self.watch.event_cost(event))
            return event
        return None

    @property
    def done(self) -> bool:
        """Exited, and the client has every entry and turn event: only the exit is left."""
        return self.exited is not None and self.watcher.finished and not self.events

    def release(self) -> None:
        """Stop watching: forget what is queued, let go of the hub and the session."""
        watch = self.watch
        watch.paid(sum(len(m) + watch.item_cost for m in self.pending)
                   + sum(watch.event_cost(e) for e in self.events))
        self.pending.clear()
        self.events.clear()
        session = self.session
        session.hub.remove_notify(self.mark)
        session.listeners.discard(self)
        self.watcher.close()
        watch.detach(session)


class SessionWatch:
    """The sessions one client stream watches, and the bytes it owes its client.

    A subclass says how the stream's writer is woken (`wake`), who hears that a session is
    watched (`attach`, `detach`) and what error ends an overflowing stream (`overflow`).
    They are methods, not callbacks given in: a stream holding its own bound methods would
    be a reference cycle, and with it every session it watched, until the cyclic GC ran.

    Args:
        limit: bytes of queued items (see the module's rules) before the stream must end.
        item_cost: what each queued item costs beyond its bytes.
        event_cost: what a queued turn event costs.
    """

    def __init__(self, *, limit: int, item_cost: int,
                 event_cost: Callable[[object], int]) -> None:
        self.limit = limit
        self.item_cost = item_cost
        self.event_cost = event_cost
        self.subs: dict[str, Watched] = {}
        self.starting: set[str] = set()
        self.dirty: deque[Watched] = deque()
        self.loose: deque[tuple[bytes, bytes]] = deque()  # (ref field, message): no Watched
        #: bytes (with item_cost per item) of everything queued for the client
        self.queued = 0
        #: set once the stream must end; nothing is queued after it
        self.error: CorralError | None = None

    def wake(self) -> None:
        """Called (synchronously) whenever there is news for the stream's writer."""
        raise NotImplementedError

    def attach(self, session) -> None:
        """The stream starts watching session."""

    def detach(self, session) -> None:
        """The stream stops watching session."""

    def overflow(self) -> CorralError:
        """The error the stream ends with once it owes its client more than `limit`."""
        raise NotImplementedError

    # -- what the stream owes its client ------------------------------------------------

    def owe(self, nbytes: int) -> bool:
        """Count nbytes more queued for the client; False (queue nothing) once over."""
        if self.error is not None:
            return False
        if self.queued + nbytes > self.limit:
            self.fail(self.overflow())
            return False
        self.queued += nbytes
        return True

    def paid(self, nbytes: int) -> None:
        if self.error is None:
            self.queued -= nbytes

    def fail(self, error: CorralError) -> None:
        """End the stream with error (the first one wins): drop everything queued."""
        if self.error is not None:
            return
        self.error = error
        self.loose.clear()
        self.dirty.clear()
        for sub in self.subs.values():
            sub.dirty = False
            sub.pending.clear()
            sub.events.clear()
        self.queued = 0
        self.wake()

    def add_loose(self, ref_field: bytes, message: bytes) -> None:
        """Queue an encoded message about no watched session (a refused request)."""
        if self.owe(len(message) + self.item_cost):
            self.loose.append((ref_field, message))
        self.wake()

    def pop_loose(self) -> tuple[bytes, bytes]:
        ref_field, message = self.loose.popleft()
        self.paid(len(message) + self.item_cost)
        return ref_field, message

    @property
    def has_news(self) -> bool:
        return bool(self.dirty or self.loose)

    # -- which sessions -----------------------------------------------------------------

    @staticmethod
    def check_ref(ref: str) -> None:
        """Raises:
        InvalidSpec: the ref is not 1-MAX_REF_BYTES bytes."""
        size = len(ref.encode())
        if not ref or size > MAX_REF_BYTES:
            raise InvalidSpec("ref", f"must be 1-{MAX_REF_BYTES} bytes, got {size}")

    def check_unused(self, ref: str) -> None:
        """Raises:
        InvalidSpec: a session is watched, or starting, as ref on this stream."""
        if ref in self.subs or ref in self.starting:
            raise InvalidSpec("ref", f"{ref!r} is already in use on this stream")

    def watched(self, ref: str, kind: str) -> Watched:
        """The session watched as ref, which a request of this kind is about.

        Raises:
            Ended: the ref is still starting.
            NotFound: nothing is watched as ref.
            PermissionDenied: kind steers and the ref was resumed watch-only.
        """
        sub = self.subs.get(ref)
        if sub is None:
            if ref in self.starting:
                raise Ended(f"ref {ref!r} is still starting: wait for its opened event")
            raise NotFound(f"no session is watched as {ref!r} on this stream")
        if kind in STEERING and sub.watch_only:
            raise PermissionDenied(f"{ref!r} was resumed watch-only")
        return sub

    def add(self, sub: Watched) -> None:
        """Watch sub's session from now on; the writer sends what it has at once."""
        self.subs[sub.ref] = sub
        sub.mark()

    def remove(self, sub: Watched) -> None:
        """Stop watching sub's session (it detached, or its exit was sent)."""
        if self.subs.get(sub.ref) is sub:
            del self.subs[sub.ref]
        sub.release()

    def next_dirty(self) -> Watched | None:
        """The next session with news still watched here, or None when there is none."""
        dirty = self.dirty
        while dirty:
            sub = dirty.popleft()
            sub.dirty = False
            if self.subs.get(sub.ref) is sub:  # else detached since it was marked
                return sub
        return None

    def close(self) -> None:
        """Stop watching every session and forget what is queued."""
        for sub in self.subs.values():
            sub.release()
        self.subs.clear()
        self.dirty.clear()
        self.loose.clear()
