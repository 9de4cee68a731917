"""The agent sessions an MCP server steers: one open Sessions.Open stream each, drained on a
thread into a bounded buffer of tokens that `session_read` answers from.

Why a held stream and not one call per tool: input and interrupts are sent on the stream
that controls the session, in order; a stream opened per call and dropped at once could be
cancelled before its input left. The buffer keeps the newest MAX_BUFFERED_CHARS of text;
a read from further back is told how many tokens it missed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

#: Text kept per session for `session_read` (older tokens are dropped, and counted).
MAX_BUFFERED_CHARS = 1 << 20


@dataclass
class SessionView:
    """What one drained session has said so far."""

    session_id: str = ""
    sandbox_id: str = ""
    #: (seq, text) of each token held, oldest first.
    tokens: deque = field(default_factory=deque)
    chars: int = 0
    #: the highest seq seen (tokens and events)
    last_seq: int = 0
    #: the seq of the newest token dropped from `tokens` to keep it under the cap
    dropped_through: int = 0
    turns_ended: list = field(default_factory=list)
    exited: dict | None = None
    #: why the stream ended early (the daemon's message), when it did
    error: str = ""


class LiveSession:
    """One session's controlling stream and the thread that drains it."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.view = SessionView()
        self._changed = threading.Condition()
        self._opened = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._drain, daemon=True,
                                        name="corral-mcp-session")
        self._thread.start()

    def wait_opened(self, timeout_s: float) -> SessionView:
        """Wait for the daemon to say which session and sandbox this is.

        Raises:
            RuntimeError: the stream ended first (with the daemon's message) or timed out.
        """
        if not self._opened.wait(timeout_s):
            raise RuntimeError(f"the daemon did not open the session in {timeout_s:g}s")
        if not self.view.session_id:
            raise RuntimeError(self.view.error or "the session stream ended before it opened")
        return self.view

    def read(self, after_seq: int, wait_s: float, max_chars: int) -> dict:
        """Tokens after after_seq: at once if there are any, else the first to come within
        wait_s; at most max_chars of text (the answer says where to go on from)."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while not self._has_news(after_seq) and not self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._answer(after_seq, max_chars)

    def _has_news(self, after_seq: int) -> bool:
        v = self.view
        return v.last_seq > after_seq or v.exited is not None

    @property
    def ended(self) -> bool:
        """Whether the stream is over (the agent exited, or the daemon ended it)."""
        return self._done

    def _answer(self, after_seq: int, max_chars: int) -> dict:
        v = self.view
        held = [(seq, text) for seq, text in v.tokens if seq > after_seq]
        text, next_seq, cut = [], after_seq, False
        size = 0
        for seq, piece in held:
            if size + len(piece) > max_chars and text:
                cut = True
                break
            text.append(piece)
            size += len(piece)
            next_seq = seq
        if not cut:
            next_seq = max(next_seq, v.last_seq)
        return {"session_id": v.session_id, "sandbox_id": v.sandbox_id, "text": "".join(text),
                "next_seq": next_seq, "more": cut,
                "entries_missed": max(0, v.dropped_through - after_seq),
                "turns_ended": list(v.turns_ended), "exited": v.exited,
                "state": "exited" if v.exited is not None else
                         ("ended" if self._done else "running"),
                **({"error": v.error} if v.error else {})}

    def _drain(self) -> None:
        from corral.runtime.client import ClientError

        try:
            for event in self.stream:
                self._take(event)
        except ClientError as exc:
            self.view.error = str(exc)
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()
            self._opened.set()

    def _take(self, event) -> None:
        from corral.runtime.client import decode_batch

        kind = event.WhichOneof("event")
        with self._changed:
            v = self.view
            if kind == "opened":
                v.session_id, v.sandbox_id = event.opened.session_id, event.opened.sandbox_id
                self._opened.set()
            elif kind == "batch":
                decoded = decode_batch(event.batch)
                for i, text in enumerate(decoded.texts):
                    v.tokens.append((decoded.first_seq + i, text))
                    v.chars += len(text)
                while v.chars > MAX_BUFFERED_CHARS and len(v.tokens) > 1:
                    seq, dropped = v.tokens.popleft()
                    v.chars -= len(dropped)
                    v.dropped_through = seq
                v.last_seq = max(v.last_seq, decoded.last_seq)
            elif kind == "turn_ended":
                v.turns_ended.append({"turn": event.turn_ended.turn,
                                      "status": event.turn_ended.status})
            elif kind == "exited":
                v.exited = {"returncode": event.exited.returncode,
                            "reason": event.exited.reason}
            self._changed.notify_all()

    def detach(self) -> None:
        """Let go of the stream; the session runs on at the daemon (its idle TTL applies)."""
        self.stream.detach()
        self._thread.join(5)


class LiveSessions:
    """The sessions this server holds a stream of, by id; safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, LiveSession] = {}

    def add(self, live: LiveSession) -> None:
        with self._lock:
            self._by_id[live.view.session_id] = live

    def get_or_resume(self, client, session_id: str, timeout_s: float) -> LiveSession:
        """The held stream of session_id, or a new one that resumes it from its oldest
        entry still held by the daemon (a session started elsewhere, or by an earlier
        server).

        Raises:
            RuntimeError: the daemon refused the resume (its message).
        """
        with self._lock:
            live = self._by_id.get(session_id)
            if live is not None and not live.ended:
                return live
        live = LiveSession(client.resume_session(session_id))
        try:
            live.wait_opened(timeout_s)
        except RuntimeError:
            live.detach()
            raise
        self.add(live)
        return live

    def detach_all(self) -> None:
        with self._lock:
            held, self._by_id = list(self._by_id.values()), {}
        for live in held:
            live.detach()
