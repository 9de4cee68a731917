"""corral.v1.Sessions servicer: the bidirectional Open and OpenMany streams <-> SessionManager.

`OpenMany` multiplexes any number of sessions over one stream, each named by a
client-chosen ref; `Open` is the same with one session and no refs. What a stream owes its
client is a `SessionWatch` (runtime/session_watch.py); this module's `_Stream` is one that
reads the requests, waits on the loop and encodes. Both send the token core's pre-encoded
batches without decoding them."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading

from corral.sandbox.errors import CorralError, InvalidSpec, PermissionDenied
from corral.v1 import session_pb2 as pb

from ..labels import ListQuery, check_labels, check_state
from ..metrics import NO_METRICS
from ..policy import RateLimited
from ..session_state import Exited, TaskNote, TurnEnded, TurnStarted
from ..session_watch import MAX_REF_BYTES, STEERING, SessionWatch, Watched
from ..streams import DEFAULT_BATCH_BYTES, prefer_readable
from .bounds import (
    ECHO_REF_BYTES,
    EVENT_COST_BYTES,
    MANY_OPENING,
    QUEUED_BYTES,
    StreamOverflow,
    bounded_message,
)
from .errors import record_denial
from .exits import exit_fields
from .sandboxes import spec_from_proto
from .servicer import Servicer, relay, streaming, unary
from .wire import field_bytes, first_seq, varint

log = logging.getLogger("corral.api.sessions")

#: An OpenMany message is cut once it holds this many bytes (more sessions' news waits for
#: the next one); far under gRPC's usual 4 MiB receive limit.
MUX_MESSAGE_BYTES = 1 << 20
#: requests written straight to the agent's control pipe: they take no opening slot
CONTROL = frozenset({"input", "interrupt"})


def _event(**kw) -> bytes:
    return pb.SessionEvent(**kw).SerializeToString()


def _session_event(ev) -> bytes:
    if isinstance(ev, TurnStarted):
        return _event(turn_started=pb.TurnStarted(turn=ev.turn, seq=ev.seq))
    if isinstance(ev, TurnEnded):
        return _event(turn_ended=pb.TurnEnded(turn=ev.turn, status=ev.status, seq=ev.seq))
    if isinstance(ev, Exited):
        return _event(exited=pb.SessionExited(returncode=ev.returncode, reason=ev.reason,
                                              **exit_fields(ev.returncode, ev.reason)))
    if isinstance(ev, TaskNote):
        return _event(task=pb.SessionTaskEvent(
            **{name: getattr(ev, name) for name in TaskNote.__slots__}))
    raise TypeError(ev)


def _cost(event) -> int:
    """What a queued turn event counts against QUEUED_BYTES (its status, or a task note's
    JSON, is the agent's)."""
    if isinstance(event, TaskNote):
        return (EVENT_COST_BYTES + len(event.progress_json) + len(event.result_json)
                + len(event.message))
    return EVENT_COST_BYTES + len(getattr(event, "status", ""))


class _Stream(SessionWatch):
    """One Open or OpenMany stream on the loop: the SessionWatch whose writer is its
    response generator, the wake-up that generator sleeps on, and the start, close and
    resume tasks it runs.

    Open is this with one session (`single`): its messages are SessionEvents, not
    MuxBatches; a request that fails ends it; it measures token latency (when news came
    to when it was sent) for the metrics.

    Bounds (runtime/api/bounds.py): what the stream owes its client is counted as a
    SessionWatch; past QUEUED_BYTES the stream ends with RESOURCE_EXHAUSTED (its sessions
    keep running). OpenMany runs at most MANY_OPENING starts, resumes and closes at once;
    the next request is read when one ends.
    """

    def __init__(self, servicer: SessionsServicer, caller, *, single: bool) -> None:
        super().__init__(limit=QUEUED_BYTES, item_cost=EVENT_COST_BYTES, event_cost=_cost)
        self.servicer = servicer
        self.manager = servicer.manager
        self.caller = caller
        self.single = single
        self.method = "SessionsServicer.Open" if single else "SessionsServicer.OpenMany"
        self.metrics = servicer.daemon.metrics
        self.clock = self.metrics.clock if single else NO_METRICS.clock
        self.requests_done = False
        self.tasks: set[asyncio.Task] = set()
        self._wakeup: asyncio.Future | None = None
        self._task_done = asyncio.Event()
        self.woken_at = 0.0  # Open: when news came that is not sent yet
        self.only: Watched | None = None  # Open: its session

    def attach(self, session) -> None:
        self.manager.attach(session)

    def detach(self, session) -> None:
        self.manager.detach(session)

    def overflow(self) -> StreamOverflow:
        log.warning("Sessions.%s of tenant %s ended: its client left more than %d bytes "
                    "unread", "Open" if self.single else "OpenMany", self.caller.tenant,
                    QUEUED_BYTES)
        return StreamOverflow("more than 1 MiB of session events", f"{QUEUED_BYTES} bytes")

    # -- waking ------------------------------------------------------------------------------

    def wake(self) -> None:
        self.woken_at = self.woken_at or self.clock()
        fut = self._wakeup
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self) -> None:
        self.woken_at = 0.0  # what woke it last was sent already
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    @property
    def finished(self) -> bool:
        """Open: its session's exit went out. OpenMany: the client half-closed and nothing
        is left to watch or send."""
        if self.single:
            return not self.subs
        return (self.requests_done and not self.subs and not self.starting
                and not self.has_news and not self.tasks)

    async def respond(self, requests):
        """The stream's responses, while a task applies its requests.

        Woken by the hubs (entries, end) or by a published event; nothing here runs a task
        per batch. The checks and the wait below have no await in between, so no wake-up
        can fall between them. OpenMany sends at most one message per mux interval: what
        arrives meanwhile joins the next.
        """
        reader = asyncio.ensure_future(self.read_requests(requests))
        loop = asyncio.get_running_loop()
        interval = 0.0 if self.single else self.servicer.daemon.config.mux_interval_ms / 1000
        last = float("-inf")
        try:
            while not (self.single and self.finished):  # Open: over once its exit went out
                if self.error is not None:
                    raise self.error
                if not self.has_news:
                    if self.finished:
                        return
                    if reader.done() and reader.exception() is not None:
                        raise reader.exception()
                    await self.wait()
                    continue
                if self.single:
                    for message in self.messages():
                        yield message
                    continue
                delay = last + interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                message = self.cut()
                last = loop.time()
                if message:
                    yield message
        finally:
            reader.cancel()
            self.close()

    # -- encoding one session's news -------------------------------------------------------

    def drain(self, sub: Watched, add) -> int:
        """Hand add(ref_field, header, payload) what sub has to send now, in order: queued
        messages, lost entries, one batch, the turn events it allows, and the exit once
        everything before it went (then sub leaves the stream). Returns add's total."""
        size = 0
        ref_field = sub.ref_field
        while sub.pending:
            size += add(ref_field, sub.pop_pending())
        watcher = sub.watcher
        expected = watcher.next_seq
        batch = watcher.take_ready(DEFAULT_BATCH_BYTES)
        if batch is not None:
            first = first_seq(batch)
            if first > expected:
                # the log evicted entries this client had not read: say so first
                size += add(ref_field, _event(lagged=pb.SessionLagged(
                    first_available_seq=first)))
                self.metrics.watcher_lagged()
            size += add(ref_field, b"\x12" + varint(len(batch)), batch)
            self.metrics.entries_sent(watcher.next_seq - first, self.woken_at)
            self.woken_at = 0.0
            if watcher.next_seq < sub.session.hub.stream.next_seq:
                sub.mark()  # more than one batch was waiting
        while (event := sub.pop_deliverable()) is not None:
            size += add(ref_field, _session_event(event))
        if sub.done:
            size += add(ref_field, _session_event(sub.exited))
            self.remove(sub)
        return size

    def cut(self) -> bytes:
        """One MuxBatch: loose errors, then every dirty session's news (round robin), up to
        MUX_MESSAGE_BYTES; the rest stays dirty."""
        parts: list[bytes] = []

        def add(ref_field: bytes, header: bytes, payload: bytes = b"") -> int:
            # MuxBatch.events[i] = MuxEvent{ref, event=SessionEvent bytes}; the SessionEvent
            # is header + payload (payload: a batch the core encoded, never copied here)
            event_len = len(header) + len(payload)
            inner = ref_field + b"\x12" + varint(event_len)
            head = b"\x0a" + varint(len(inner) + event_len) + inner
            parts.append(head)
            parts.append(header)
            if payload:
                parts.append(payload)
            return len(head) + event_len

        size = 0
        while self.loose and size < MUX_MESSAGE_BYTES:
            size += add(*self.pop_loose())
        for _ in range(len(self.dirty)):
            if size >= MUX_MESSAGE_BYTES:
                break
            sub = self.next_dirty()
            if sub is None:
                break
            size += self.drain(sub, add)
        return b"".join(parts)

    def messages(self) -> list[bytes]:
        """Open: the SessionEvents its session has to send now (at most one batch), one
        message each; a session with more marks itself dirty again."""
        out: list[bytes] = []

        def add(_ref_field: bytes, header: bytes, payload: bytes = b"") -> int:
            out.append(header + payload if payload else header)
            return 0

        sub = self.next_dirty()
        if sub is not None:
            self.drain(sub, add)
        return out

    # -- requests ----------------------------------------------------------------------------

    def refuse(self, ref: str, exc: Exception) -> None:
        """A request failed: Open ends with it; OpenMany says so under its ref."""
        if self.single:
            if not isinstance(exc, CorralError):
                exc = CorralError(f"reading requests failed: {exc}")
            self.fail(exc)
            return
        if isinstance(exc, CorralError):
            record_denial(self.servicer, None, exc, self.method)
        else:
            log.error("%s failed for ref %r", self.method, ref[:MAX_REF_BYTES], exc_info=exc)
        # a ref over MAX_REF_BYTES is refused; a huge one is echoed by its start only
        ref_bytes = ref.encode()[:ECHO_REF_BYTES].decode("utf-8", "ignore").encode()
        self.add_loose(field_bytes(1, ref_bytes), _error_event(exc))

    async def read_requests(self, requests) -> None:
        try:
            async for req in requests:
                if self.error is not None:
                    break  # the stream is ending: read no more
                # steering never waits for an opening slot: control before output (#21)
                while (len(self.tasks) >= MANY_OPENING
                       and req.WhichOneof("request") not in CONTROL):
                    self._task_done.clear()
                    await self._task_done.wait()
                ref = "" if self.single else req.ref  # Open's requests have no ref
                try:
                    await self.handle(req)
                except RateLimited as exc:
                    # over the tenant's rate: the stream ends and reads nothing more (a
                    # client that floods it pays for a new stream, not the daemon)
                    self.refuse(ref, exc)
                    self.error = exc
                    break
                except CorralError as exc:
                    self.refuse(ref, exc)
                    if self.single:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.single:
                raise
            self.refuse("", exc)  # Open: the client went away mid-read
        finally:
            self.requests_done = True
            self.wake()

    async def handle(self, req) -> None:
        kind = req.WhichOneof("request")
        if self.single:
            if kind not in STEERING:
                raise InvalidSpec("request", f"{kind} is only valid as the first message")
            if self.only.watch_only:
                raise PermissionDenied("this stream was opened watch-only")
            await self.steer(self.only, kind, req)
            return
        ref = req.ref
        self.check_ref(ref)
        if kind is None:
            raise InvalidSpec("request", "no request set")
        if kind in ("start", "resume"):
            self.check_unused(ref)
            # each start or resume counts like a call of its own, weighed by its size (the
            # stream's own opening was counted by Servicer.caller)
            policies = self.servicer.daemon.policies
            policies.charge(self.caller, policies.request_weight(req.ByteSize()))
            self.starting.add(ref)
            self._spawn(self.open_ref(ref, req))
            return
        sub = self.watched(ref, kind)
        if kind == "detach":
            self.remove(sub)
            return
        await self.steer(sub, kind, req)

    async def steer(self, sub: Watched, kind: str, req) -> None:
        """Apply an input, interrupt or close to sub's session (OpenMany closes on a task
        of its own, so the next request is read meanwhile)."""
        caller, manager, session = self.caller, self.manager, sub.session
        if kind == "input":
            manager.input(caller, session, req.input.text)
        elif kind == "interrupt":
            manager.interrupt(caller, session)
        elif self.single:
            await manager.close(caller, session, req.close.detach)
        else:
            self._spawn(manager.close(caller, session, req.close.detach), sub.ref)

    def _spawn(self, coro, ref: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            self._task_done.set()
            if not t.cancelled() and t.exception() is not None and ref is not None:
                self.refuse(ref, t.exception())
            self.wake()

        task.add_done_callback(done)

    async def open_session(self, req, ref: str | None = None) -> Watched:
        """Start or resume the session a start or resume asks for, and watch it.

        Raises:
            CorralError: the start failed, the session is not the caller's, or after_seq
                is past its newest entry.
        """
        caller = self.caller
        if req.WhichOneof("request") == "start":
            session = await self.manager.open(caller, **_start_kwargs(req.start))
            after, watch_only = 0, False
        else:
            resume = req.resume
            session = self.manager.get(caller, resume.session_id)
            after, watch_only = resume.after_seq, resume.watch_only
            session.hub.check_after_seq(after, "resume.after_seq")  # before the record
            detail = {"after_seq": after, "watch_only": watch_only}
            self.servicer.audit.append(
                "session.resume", tenant=caller.tenant, peer=caller.peer,
                sandbox_id=session.sandbox_id, session_id=session.id,
                detail=detail if ref is None else {**detail, "ref": ref})
        sub = Watched(self, ref or "", session, after, watch_only,
                      field_bytes(1, ref.encode()) if ref is not None else b"")
        sub.push(_event(opened=pb.SessionOpened(
            session_id=session.id, sandbox_id=session.sandbox_id, after_seq=after)))
        self.add(sub)
        if self.single:
            self.only = sub
        return sub

    async def open_ref(self, ref: str, req) -> None:
        """OpenMany: open_session under ref; a failure is told under ref."""
        try:
            await self.open_session(req, ref)
        except Exception as exc:
            self.refuse(ref, exc)
        finally:
            self.starting.discard(ref)

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.only = None
        super().close()


def grpc_wakeup_fds() -> tuple[int, ...]:
    """The sockets through which grpc.aio's poller thread wakes the loop (the thread's
    target is its PollerCompletionQueue, which holds the pair); () when grpc runs otherwise.

    Only found this way: grpc keeps its queue in a module-level C variable.
    """
    for thread in threading.enumerate():
        queue = getattr(getattr(thread, "_target", None), "__self__", None)
        if type(queue).__name__ == "PollerCompletionQueue":
            return tuple(ref.fileno() for ref in gc.get_referents(queue)
                         if isinstance(ref, socket.socket) and ref.fileno() >= 0)
    return ()


def session_info(session) -> pb.SessionInfo:
    exited = session.exited
    return pb.SessionInfo(
        session_id=session.id, sandbox_id=session.sandbox_id,
        state=pb.SESSION_STATE_EXITED if exited is not None else pb.SESSION_STATE_RUNNING,
        labels=session.labels, created_at=session.created_at, last_seq=session.last_seq,
        turn=session.turn, owns_sandbox=session.owns_sandbox, watchers=session.attached,
        **(exit_fields(exited.returncode, exited.reason) if exited is not None else {}),
        returncode=exited.returncode if exited is not None else 0,
        reason=exited.reason if exited is not None else "")


class SessionsServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.manager = daemon.sessions
        self._preferring: asyncio.AbstractEventLoop | None = None

    def _control_first(self) -> None:
        """Once per loop: gRPC's wake-ups cut output drains short, so a steering request
        is read (and written to its agent) ahead of the rest of a flood."""
        loop = asyncio.get_running_loop()
        if self._preferring is not loop:
            self._preferring = loop
            prefer_readable(loop, grpc_wakeup_fds())

    @streaming
    async def Open(self, request_iterator, context):
        self._control_first()
        stream = _Stream(self, self.caller(context), single=True)
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("request") not in ("start", "resume"):
            raise InvalidSpec("request", "the first message must be start or resume")
        await stream.open_session(first)
        async for message in stream.respond(requests):
            yield message

    @streaming
    async def OpenMany(self, request_iterator, context):
        self._control_first()
        stream = _Stream(self, self.caller(context), single=False)
        async for message in stream.respond(request_iterator):
            yield message

    Get = relay("manager.get", "session_id", answer=session_info)

    @unary
    async def List(self, request, context):
        caller = self.caller(context)
        check_state(request.state, SESSION_STATES, "SessionState")
        listing = ListQuery.of(request, "sessions", request.state)
        chosen, token = listing.page(
            self.manager.find(caller, listing.selector, SESSION_STATES[request.state]),
            lambda s: s.seq)
        return pb.ListSessionsResponse(sessions=[session_info(s) for s in chosen],
                                       next_page_token=token)


def _start_kwargs(start) -> dict:
    """SessionManager.open's arguments for a SessionStart (Open's and OpenMany's)."""
    target = start.WhichOneof("target")
    kw = dict(argv=list(start.argv),
              spec=spec_from_proto(start.spec) if target != "sandbox_id" else None,
              sandbox_id=start.sandbox_id if target == "sandbox_id" else "",
              env=dict(start.env), first_input=start.input,
              labels=check_labels(start.labels, "start.labels"),
              delegations_from=start.delegations_from,
              wait_if_paused=start.wait_if_paused)
    if start.request_id:
        # what a retry under the same request_id must ask for: the start without its id
        same = pb.SessionStart()
        same.CopyFrom(start)
        same.ClearField("request_id")
        kw.update(request_id=start.request_id,
                  fingerprint=same.SerializeToString(deterministic=True).hex())
    return kw


SESSION_STATES = {pb.SESSION_STATE_UNSPECIFIED: None, pb.SESSION_STATE_RUNNING: False,
                  pb.SESSION_STATE_EXITED: True}


def _error_event(exc: Exception) -> bytes:
    if isinstance(exc, CorralError):
        return _event(error=pb.SessionError(
            code=exc.grpc_status, message=bounded_message(str(exc)),
            field=bounded_message(getattr(exc, "field", "") or "")))
    return _event(error=pb.SessionError(code="INTERNAL",
                                        message="internal error; see the daemon's log"))
