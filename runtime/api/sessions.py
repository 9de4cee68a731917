"""corral.v1.Sessions servicer: the bidirectional Open and OpenMany streams <-> SessionManager.

`Open` carries one session; `OpenMany` multiplexes any number of them over one stream, each
named by a client-chosen ref (see `_Mux`). Both send the token core's pre-encoded batches
without decoding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from corral.sandbox.errors import CorralError, InvalidSpec, NotFound, PermissionDenied
from corral.v1 import session_pb2 as pb

from ..labels import Selector, check_labels, check_page_size, page, page_token, parse_page_token
from ..metrics import NO_METRICS
from ..policy import RateLimited
from ..sandboxes import Ended
from ..sessions import Exited, TurnEnded, TurnStarted
from ..streams import DEFAULT_BATCH_BYTES
from .bounds import (
    ECHO_REF_BYTES,
    EVENT_COST_BYTES,
    MANY_OPENING,
    QUEUED_BYTES,
    StreamOverflow,
    bounded_message,
)
from .errors import Servicer, record_denial, streaming, unary
from .sandboxes import spec_from_proto
from .wire import field_bytes, first_seq, varint

log = logging.getLogger("corral.api.sessions")

#: An OpenMany message is cut once it holds this many bytes (more sessions' news waits for
#: the next one); far under gRPC's usual 4 MiB receive limit.
MUX_MESSAGE_BYTES = 1 << 20
MAX_REF_BYTES = 64


def _event(**kw) -> bytes:
    return pb.SessionEvent(**kw).SerializeToString()


def _session_event(ev) -> bytes:
    if isinstance(ev, TurnStarted):
        return _event(turn_started=pb.TurnStarted(turn=ev.turn, seq=ev.seq))
    if isinstance(ev, TurnEnded):
        return _event(turn_ended=pb.TurnEnded(turn=ev.turn, status=ev.status, seq=ev.seq))
    if isinstance(ev, Exited):
        return _event(exited=pb.SessionExited(returncode=ev.returncode, reason=ev.reason))
    raise TypeError(ev)


def _cost(event) -> int:
    """What a queued turn event counts against QUEUED_BYTES (its status is the agent's)."""
    return EVENT_COST_BYTES + len(getattr(event, "status", ""))


def _overflow() -> StreamOverflow:
    return StreamOverflow("more than 1 MiB of session events", f"{QUEUED_BYTES} bytes")


def _deliverable(event, next_seq: int) -> bool:
    """Whether a client whose next entry is next_seq may get this turn event now: only once
    it has every entry the event comes after (a turn's end after its TURN_END entry, a
    turn's start after the entries before it), so events and batches never cross."""
    if isinstance(event, TurnEnded):
        return next_seq > event.seq
    if isinstance(event, TurnStarted):
        return next_seq >= event.seq
    return True


class _Inbox:
    """What one Open stream is told: published session events (and request errors) in
    order, and a wake-up for hub news. Session.publish() and the request reader call
    put_nowait; the hub calls wake.

    At most QUEUED_BYTES of events wait for a client that does not read; past that they
    are dropped and the stream ends with RESOURCE_EXHAUSTED (the session keeps running;
    resume comes back)."""

    __slots__ = ("tenant", "events", "queued", "error", "_waiter", "_woken", "clock",
                 "woken_at")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.events: deque = deque()
        self.queued = 0  # _cost() of the events held
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        # A wake-up that came while the stream was not waiting (it was sending): the next
        # wait() returns at once. Without it, news that arrived during a yield was lost
        # and the stream slept until the session's next entry.
        self._woken = False
        self.clock = NO_METRICS.clock  # metrics: when news came, for the token latency
        self.woken_at = 0.0

    def put_nowait(self, item) -> None:
        if isinstance(item, BaseException):
            self.error = self.error or item
        elif self.error is None:
            self.queued += _cost(item)
            if self.queued > QUEUED_BYTES:
                self.events.clear()
                self.error = _overflow()
                log.warning("Sessions.Open of tenant %s ended: its client left more than %d "
                            "bytes unread", self.tenant, QUEUED_BYTES)
            else:
                self.events.append(item)
        self.wake()

    def pop(self):
        item = self.events.popleft()
        self.queued -= _cost(item)
        return item

    def wake(self) -> None:
        self.woken_at = self.woken_at or self.clock()
        waiter = self._waiter
        if waiter is None:
            self._woken = True
        elif not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if self._woken:
            self._woken = False
            return
        self.woken_at = 0.0  # what woke it last was sent already
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class SessionsServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.manager = daemon.sessions

    @streaming
    async def Open(self, request_iterator, context):
        caller = self.caller(context)
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        kind = first.WhichOneof("request")
        watch_only = False
        if kind == "start":
            session = await self.manager.open(caller, **_start_kwargs(first.start))
            after = 0
        elif kind == "resume":
            session = self.manager.get(caller, first.resume.session_id)
            after = first.resume.after_seq
            session.hub.check_after_seq(after, "resume.after_seq")  # before attaching
            watch_only = first.resume.watch_only
            self.audit.append("session.resume", tenant=caller.tenant, peer=caller.peer,
                              sandbox_id=session.sandbox_id, session_id=session.id,
                              detail={"after_seq": after, "watch_only": watch_only})
        else:
            raise InvalidSpec("request", "the first message must be start or resume")

        self.manager.attach(session)
        inbox = _Inbox(caller.tenant)
        metrics = self.daemon.metrics
        inbox.clock = metrics.clock
        session.listeners.add(inbox)
        session.hub.add_notify(inbox.wake)
        watcher = session.hub.watch(after or None)
        reader = asyncio.ensure_future(self._read_requests(caller, session, requests,
                                                            watch_only, inbox))
        try:
            yield _event(opened=pb.SessionOpened(session_id=session.id,
                                                 sandbox_id=session.sandbox_id,
                                                 after_seq=after))
            exited = session.exited
            events = inbox.events
            while True:
                # Woken by the hub (entries, end) or by a published event; nothing here
                # runs a task per batch. The checks and the wait below have no await in
                # between, so no wake-up can fall between them.
                if inbox.error is not None:
                    raise inbox.error
                expected = watcher.next_seq
                batch = watcher.take_ready()
                if batch is not None:
                    first = first_seq(batch)
                    if first > expected:
                        # the log evicted entries this client had not read: say so, then
                        # the batch (which starts at the first one still held)
                        metrics.watcher_lagged()
                        yield _event(lagged=pb.SessionLagged(first_available_seq=first))
                    yield field_bytes(2, batch)
                    metrics.entries_sent(watcher.next_seq - first, inbox.woken_at)
                    inbox.woken_at = 0.0
                while events and _deliverable(events[0], watcher.next_seq):
                    item = inbox.pop()
                    if isinstance(item, Exited):
                        exited = item
                    else:
                        yield _session_event(item)
                if batch is not None:
                    continue
                if exited is not None and watcher.finished and not events:
                    yield _session_event(exited)
                    return
                await inbox.wait()
        finally:
            reader.cancel()
            session.hub.remove_notify(inbox.wake)
            watcher.close()
            session.listeners.discard(inbox)
            self.manager.detach(session)

    @streaming
    async def OpenMany(self, request_iterator, context):
        mux = _Mux(self, self.caller(context))
        reader = asyncio.ensure_future(mux.read_requests(request_iterator))
        loop = asyncio.get_running_loop()
        interval = self.daemon.config.mux_interval_ms / 1000
        last = float("-inf")
        try:
            while True:
                if mux.error is not None:
                    raise mux.error
                if not mux.has_news:
                    if mux.finished:
                        return
                    if reader.done() and reader.exception() is not None:
                        raise reader.exception()
                    await mux.wait()
                    continue
                # at most one message per interval: what arrives meanwhile joins this one
                delay = last + interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                message = mux.cut()
                last = loop.time()
                if message:
                    yield message
        finally:
            reader.cancel()
            mux.close()

    @unary
    async def Get(self, request, context):
        return session_info(self.manager.get(self.caller(context), request.session_id))

    @unary
    async def List(self, request, context):
        caller = self.caller(context)
        selector = Selector.parse(request.selector)
        size = check_page_size(request.page_size)
        if request.state not in SESSION_STATES:
            raise InvalidSpec("state", f"{request.state} is not a SessionState")
        query = f"{request.selector}\0{request.state}"
        after = parse_page_token(request.page_token, "sessions", query)
        chosen, last = page(self.manager.find(caller, selector, SESSION_STATES[request.state]),
                            after, size, lambda s: s.seq)
        return pb.ListSessionsResponse(
            sessions=[session_info(s) for s in chosen],
            next_page_token=page_token("sessions", query, last) if last is not None else "")

    async def _read_requests(self, caller, session, requests, watch_only, queue) -> None:
        """Steering messages from this client, applied as they arrive."""
        try:
            async for req in requests:
                kind = req.WhichOneof("request")
                if kind in ("input", "interrupt", "close") and watch_only:
                    raise PermissionDenied("this stream was opened watch-only")
                if kind == "input":
                    self.manager.input(caller, session, req.input.text)
                elif kind == "interrupt":
                    self.manager.interrupt(caller, session)
                elif kind == "close":
                    await self.manager.close(caller, session)
                else:
                    raise InvalidSpec("request", f"{kind} is only valid as the first message")
        except asyncio.CancelledError:
            raise
        except CorralError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # the client went away mid-read
            with contextlib.suppress(Exception):
                queue.put_nowait(CorralError(f"reading requests failed: {exc}"))


# --- OpenMany: many sessions over one stream ---------------------------------------------------


def _start_kwargs(start) -> dict:
    """SessionManager.open's arguments for a SessionStart (Open's and OpenMany's)."""
    target = start.WhichOneof("target")
    kw = dict(argv=list(start.argv),
              spec=spec_from_proto(start.spec) if target != "sandbox_id" else None,
              sandbox_id=start.sandbox_id if target == "sandbox_id" else "",
              env=dict(start.env), first_input=start.input,
              labels=check_labels(start.labels, "start.labels"))
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


def session_info(session) -> pb.SessionInfo:
    exited = session.exited
    return pb.SessionInfo(
        session_id=session.id, sandbox_id=session.sandbox_id,
        state=pb.SESSION_STATE_EXITED if exited is not None else pb.SESSION_STATE_RUNNING,
        labels=session.labels, created_at=session.created_at, last_seq=session.last_seq,
        turn=session.turn, owns_sandbox=session.owns_sandbox, watchers=session.attached,
        returncode=exited.returncode if exited is not None else 0,
        reason=exited.reason if exited is not None else "")


def _error_event(exc: Exception) -> bytes:
    if isinstance(exc, CorralError):
        return _event(error=pb.SessionError(
            code=exc.grpc_status, message=bounded_message(str(exc)),
            field=bounded_message(getattr(exc, "field", "") or "")))
    return _event(error=pb.SessionError(code="INTERNAL",
                                        message="internal error; see the daemon's log"))


class _Sub:
    """One session watched on an OpenMany stream under a ref."""

    __slots__ = ("mux", "ref", "ref_field", "session", "watcher", "watch_only", "pending",
                 "events", "exited", "dirty")

    def __init__(self, mux: _Mux, ref: str, session, after: int, watch_only: bool) -> None:
        self.mux = mux
        self.ref = ref
        self.ref_field = field_bytes(1, ref.encode())
        self.session = session
        self.watch_only = watch_only
        self.pending: deque[bytes] = deque()  # encoded SessionEvents to send before news
        self.events: deque = deque()  # turn events, each sent once its entries are (see
        # _deliverable)
        self.exited: Exited | None = None
        self.dirty = False
        self.watcher = session.hub.watch(after or None, field="resume.after_seq")
        # Not kept on self: sub -> bound method -> sub would be a reference cycle holding
        # the session (and its replay log) until the cyclic GC ran; bound methods compare
        # equal, so remove_notify(self.mark) finds it.
        session.hub.add_notify(self.mark)
        session.listeners.add(self)
        mux.manager.attach(session)

    def mark(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.mux.dirty.append(self)
            self.mux.wake()

    def put_nowait(self, event) -> None:
        """Session.publish() target: turn started/ended, exited."""
        if isinstance(event, Exited):
            self.exited = event
        elif isinstance(event, BaseException):
            self.push(_error_event(event))
        elif self.mux.owe(_cost(event)):
            self.events.append(event)
        self.mark()

    def push(self, event: bytes) -> None:
        """Queue an encoded SessionEvent to send before this session's news."""
        if self.mux.owe(len(event) + EVENT_COST_BYTES):
            self.pending.append(event)

    def release(self) -> None:
        self.mux.paid(sum(len(e) + EVENT_COST_BYTES for e in self.pending)
                      + sum(_cost(e) for e in self.events))
        self.pending.clear()
        self.events.clear()
        session = self.session
        session.hub.remove_notify(self.mark)
        session.listeners.discard(self)
        self.watcher.close()
        self.mux.manager.detach(session)


class _Mux:
    """The state of one OpenMany stream.

    Sessions with news mark themselves dirty (a hub notify callback or a published event);
    the response generator wakes once, cuts one MuxBatch holding every dirty session's batch
    and events (up to MUX_MESSAGE_BYTES; the rest stays dirty, round robin), and yields it.
    While gRPC is sending one message, news piles up into the next: the busier the daemon,
    the fewer and fuller the messages. Nothing here waits per session.

    Bounds (runtime/api/bounds.py): what the stream owes its client (loose errors, each
    session's pending and turn events) is counted in `queued`; past QUEUED_BYTES it
    is dropped and the stream ends with RESOURCE_EXHAUSTED (its sessions keep running).
    At most MANY_OPENING starts, resumes and closes run at once; the next request is read
    when one ends.
    """

    def __init__(self, servicer: SessionsServicer, caller) -> None:
        self.servicer = servicer
        self.manager = servicer.manager
        self.caller = caller
        self.subs: dict[str, _Sub] = {}
        self.starting: set[str] = set()
        self.dirty: deque[_Sub] = deque()
        self.loose: deque[tuple[bytes, bytes]] = deque()  # (ref field, event): no _Sub
        self.requests_done = False
        self.tasks: set[asyncio.Task] = set()
        self._wakeup: asyncio.Future | None = None
        self._task_done = asyncio.Event()
        #: bytes (with EVENT_COST_BYTES per item) of everything queued for the client
        self.queued = 0
        #: set once the stream must end (StreamOverflow); nothing is queued after it
        self.error: CorralError | None = None

    # -- what the stream owes its client -----------------------------------------------------

    def owe(self, nbytes: int) -> bool:
        """Count nbytes more queued for the client; False (queue nothing) once over."""
        if self.error is not None:
            return False
        if self.queued + nbytes > QUEUED_BYTES:
            self.error = _overflow()
            log.warning("Sessions.OpenMany of tenant %s ended: its client left more than "
                        "%d bytes unread", self.caller.tenant, QUEUED_BYTES)
            self.loose.clear()
            self.dirty.clear()
            for sub in self.subs.values():
                sub.dirty = False
                sub.pending.clear()
                sub.events.clear()
            self.queued = 0
            self.wake()
            return False
        self.queued += nbytes
        return True

    def paid(self, nbytes: int) -> None:
        if self.error is None:
            self.queued -= nbytes

    # -- waking ------------------------------------------------------------------------------

    def wake(self) -> None:
        fut = self._wakeup
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self) -> None:
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    @property
    def has_news(self) -> bool:
        return bool(self.dirty or self.loose)

    @property
    def finished(self) -> bool:
        """The client half-closed and nothing is left to watch or send."""
        return (self.requests_done and not self.subs and not self.starting
                and not self.has_news and not self.tasks)

    # -- cutting one message -----------------------------------------------------------------

    def cut(self) -> bytes:
        parts: list[bytes] = []
        size = 0

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

        loose = self.loose
        while loose and size < MUX_MESSAGE_BYTES:
            ref_field, event = loose.popleft()
            self.paid(len(event) + EVENT_COST_BYTES)
            size += add(ref_field, event)
        dirty = self.dirty
        for _ in range(len(dirty)):
            if size >= MUX_MESSAGE_BYTES:
                break
            sub = dirty.popleft()
            sub.dirty = False
            if self.subs.get(sub.ref) is not sub:
                continue  # detached since it was marked
            while sub.pending:
                event = sub.pending.popleft()
                self.paid(len(event) + EVENT_COST_BYTES)
                size += add(sub.ref_field, event)
            watcher = sub.watcher
            expected = watcher.next_seq
            batch = watcher.take_ready(DEFAULT_BATCH_BYTES)
            if batch is not None:
                first = first_seq(batch)
                if first > expected:
                    # the log evicted entries this client had not read: say so first
                    size += add(sub.ref_field, _event(lagged=pb.SessionLagged(
                        first_available_seq=first)))
                    self.servicer.daemon.metrics.watcher_lagged()
                size += add(sub.ref_field, b"\x12" + varint(len(batch)), batch)
                self.servicer.daemon.metrics.entries_sent(watcher.next_seq - first)
                if watcher.next_seq < sub.session.hub.stream.next_seq:
                    sub.mark()  # more than one batch was waiting
            events = sub.events
            while events and _deliverable(events[0], watcher.next_seq):
                event = events.popleft()
                self.paid(_cost(event))
                size += add(sub.ref_field, _session_event(event))
            if sub.exited is not None and watcher.finished and not events:
                size += add(sub.ref_field, _session_event(sub.exited))
                del self.subs[sub.ref]
                sub.release()
        return b"".join(parts)

    # -- requests ----------------------------------------------------------------------------

    def fail(self, ref: str, exc: Exception, method: str) -> None:
        if isinstance(exc, CorralError):
            record_denial(self.servicer, None, exc, method)
        else:
            log.error("%s failed for ref %r", method, ref[:MAX_REF_BYTES], exc_info=exc)
        event = _error_event(exc)
        # a ref over MAX_REF_BYTES is refused; a huge one is echoed by its start only
        ref_bytes = ref.encode()[:ECHO_REF_BYTES].decode("utf-8", "ignore").encode()
        if self.owe(len(event) + EVENT_COST_BYTES):
            self.loose.append((field_bytes(1, ref_bytes), event))
        self.wake()

    async def read_requests(self, requests) -> None:
        try:
            async for req in requests:
                if self.error is not None:
                    break  # the stream is ending: read no more
                while len(self.tasks) >= MANY_OPENING:
                    self._task_done.clear()
                    await self._task_done.wait()
                try:
                    await self.handle(req)
                except RateLimited as exc:
                    # over the tenant's rate: the stream ends and reads nothing more (a
                    # client that floods it pays for a new stream, not the daemon)
                    self.fail(req.ref, exc, "SessionsServicer.OpenMany")
                    self.error = exc
                    break
                except CorralError as exc:
                    self.fail(req.ref, exc, "SessionsServicer.OpenMany")
        finally:
            self.requests_done = True
            self.wake()

    async def handle(self, req) -> None:
        ref = req.ref
        kind = req.WhichOneof("request")
        if not ref or len(ref.encode()) > MAX_REF_BYTES:
            raise InvalidSpec("ref", f"must be 1-{MAX_REF_BYTES} bytes, got "
                                     f"{len(ref.encode())}")
        if kind is None:
            raise InvalidSpec("request", "no request set")
        if kind in ("start", "resume"):
            if ref in self.subs or ref in self.starting:
                raise InvalidSpec("ref", f"{ref!r} is already in use on this stream")
            # each start or resume counts like a call of its own, weighed by its size (the
            # stream's own opening was counted by Servicer.caller)
            policies = self.servicer.daemon.policies
            policies.charge(self.caller, policies.request_weight(req.ByteSize()))
            self.starting.add(ref)
            self._spawn(self._open(ref, req))
            return
        sub = self.subs.get(ref)
        if sub is None:
            if ref in self.starting:
                raise Ended(f"ref {ref!r} is still starting: wait for its opened event")
            raise NotFound(f"no session is watched as {ref!r} on this stream")
        caller, manager, session = self.caller, self.manager, sub.session
        if kind in ("input", "interrupt", "close") and sub.watch_only:
            raise PermissionDenied(f"{ref!r} was resumed watch-only")
        if kind == "input":
            manager.input(caller, session, req.input.text)
        elif kind == "interrupt":
            manager.interrupt(caller, session)
        elif kind == "close":
            self._spawn(manager.close(caller, session), ref)
        elif kind == "detach":
            del self.subs[ref]
            sub.release()

    def _spawn(self, coro, ref: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            self._task_done.set()
            if not t.cancelled() and t.exception() is not None and ref is not None:
                self.fail(ref, t.exception(), "SessionsServicer.OpenMany")
            self.wake()

        task.add_done_callback(done)

    async def _open(self, ref: str, req) -> None:
        caller = self.caller
        try:
            if req.WhichOneof("request") == "start":
                session = await self.manager.open(caller, **_start_kwargs(req.start))
                after, watch_only = 0, False
            else:
                resume = req.resume
                session = self.manager.get(caller, resume.session_id)
                after, watch_only = resume.after_seq, resume.watch_only
                self.servicer.audit.append(
                    "session.resume", tenant=caller.tenant, peer=caller.peer,
                    sandbox_id=session.sandbox_id, session_id=session.id,
                    detail={"after_seq": after, "watch_only": watch_only, "ref": ref})
            sub = _Sub(self, ref, session, after, watch_only)
        except Exception as exc:
            self.fail(ref, exc, "SessionsServicer.OpenMany")
            return
        finally:
            self.starting.discard(ref)
        self.subs[ref] = sub
        sub.push(_event(opened=pb.SessionOpened(
            session_id=session.id, sandbox_id=session.sandbox_id, after_seq=after)))
        if session.exited is not None:
            sub.exited = session.exited
        sub.mark()

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for sub in self.subs.values():
            sub.release()
        self.subs.clear()
