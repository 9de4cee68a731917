"""Interactive sessions: an agent streaming tokens, steered and interrupted, watched by many.

A session is one agent process in a sandbox with the protocol's two pipes (corral.ext.agent):
its events fd (agent -> runtime frames) feeds one TokenStream, the replay log every watcher
reads; its control fd carries INPUT, INTERRUPT, SHUTDOWN.
A plain agent (one that never writes a frame) is still a session: its stdout joins the
same stream as tokens, its stderr as LOG entries, input goes to its stdin as a line and an
interrupt is SIGINT.

Sessions outlive their clients: a dropped connection resumes from the last seq it saw, and
a session nobody watches for `idle_ttl_s` is closed and its sandbox reaped.

With live restore on, a session in a kept sandbox outlives the daemon too: its replay log,
turn state and record are journaled (runtime/session_journal.py), the holder keeps its
protocol pipes, and `restore` adopts it at start with the seqs it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
import weakref
from dataclasses import dataclass, field

from corral.ext import EventKind, TokenStream
from corral.sandbox.errors import CorralError, Ended, FailedPrecondition, InvalidSpec, NotFound

from .auth import Caller, check_owner
from .idempotency import RequestLedger
from .labels import EVERYTHING, Selector
from .metrics import NO_METRICS
from .sandboxes import signal_command
from .session_journal import SessionJournal, load_sessions
from .session_state import Exited, Phase, SessionTurns, TurnEnded, TurnStarted
from .streams import AgentPipes, ControlWriter, StreamHub
from .tasks.delegation import Delegations

log = logging.getLogger("corral.sessions")

INTERRUPT_GRACE_S = 2.0
SHUTDOWN_GRACE_S = 2.0
MAX_INPUT_BYTES = 1 << 20


@dataclass
class Session:
    id: str
    tenant: str
    sandbox_id: str
    owns_sandbox: bool
    hub: StreamHub
    control: ControlWriter
    exec_handle: object = None
    #: Its phase and turn number, and the client streams told of their changes.
    turns: SessionTurns = field(default_factory=SessionTurns)
    attached: int = 0
    detached_since: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _interrupt_timer: asyncio.TimerHandle | None = None
    _tasks: list = field(default_factory=list)
    #: The copiers of a plain agent's stdout and stderr into the hub (PlainOutput).
    plain_output: tuple = ()
    #: The client's key/value metadata (runtime/labels.py), checked.
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0  # Unix time
    #: Start order in this daemon: Sessions.List pages in this order.
    seq: int = 0
    #: Live restore: its SessionJournal (it outlives a daemon restart); None otherwise.
    kept: object = None

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest entry of its stream (0 before the first)."""
        return self.hub.stream.next_seq - 1

    @property
    def protocol_seen(self) -> bool:
        """True once the agent wrote any frame: it speaks the protocol."""
        return self.hub.stream.statistics().frames > 0

    @property
    def turn(self) -> int:
        return self.turns.turn

    @property
    def exited(self) -> Exited | None:
        return self.turns.exited

    @property
    def closing(self) -> bool:
        return self.turns.closing

    @property
    def listeners(self) -> set:
        """The client streams told of turn changes (each with `put_nowait(event)`)."""
        return self.turns.listeners


class PlainOutput:
    """Copies what a plain agent writes on stdout (TOKEN entries) or stderr (LOG entries)
    into its session's hub as soon as the command's text hub has read it: each entry's bytes
    go from one log to the other, with no batch encoded and decoded in between."""

    __slots__ = ("stream", "target", "kind", "next_seq")

    def __init__(self, source: StreamHub, target: StreamHub, kind: int,
                 next_seq: int = 1) -> None:
        # The stream, not its hub: the hub holds this copier's callback, and a reference
        # back would be a cycle keeping both logs until the cyclic GC ran.
        self.stream = source.stream
        self.target = target
        self.kind = kind
        self.next_seq = next_seq  # a restored session's copier starts past what was copied
        source.add_notify(self.copy)
        self.copy()  # what the hub read while the agent was starting

    def copy(self) -> None:
        """StreamHub notify callback: append the entries read since the last call."""
        stream = self.stream
        end = stream.next_seq
        start = max(self.next_seq, stream.first_seq)
        self.next_seq = end
        for seq in range(start, end):
            event = stream.get(seq)
            if event.kind == EventKind.TOKEN and event.payload:
                self.target.append_event(self.kind, event.payload)

    def stop(self, source: StreamHub) -> None:
        """Copy nothing more from source (the hub given to the constructor)."""
        source.remove_notify(self.copy)


class SessionManager:
    metrics = NO_METRICS  # the daemon's DaemonMetrics when --metrics is on

    def __init__(self, sandboxes, audit, *, idle_ttl_s: float = 300.0,
                 stream_log_bytes: int = 8 << 20):
        self.sandboxes = sandboxes
        self.audit = audit
        self.idle_ttl_s = idle_ttl_s
        self.stream_log_bytes = stream_log_bytes
        self._sessions: dict[str, Session] = {}
        #: Opens under way per tenant (counted into its max_sessions quota).
        self._opening: dict[str, int] = {}
        self._reaper: asyncio.Task | None = None
        self._seq = 0
        #: SessionStart.request_id (runtime/idempotency.py): session ids by tenant and id.
        self.requests = RequestLedger("session")
        #: The deep tasks sessions delegate (tasks/delegation.py), once attach_scheduler ran.
        self.delegations = None
        #: Live restore (runtime/restore.py LiveRestore), None when off.
        self.live_restore = None

    def attach_scheduler(self, scheduler, max_delegations: int) -> None:
        """Let sessions delegate deep tasks to scheduler (protocol v1.1), at most
        max_delegations unfinished ones per session."""
        self.delegations = Delegations(scheduler, self.sandboxes, self.audit,
                                       self._sessions.get, max_delegations)
        # a restored session keeps its id, so its tasks' links hold; what they owe it (a
        # TASK_DONE the dead daemon had not stored as delivered) is told now
        restored = {s.id for s in self._sessions.values() if s.kept is not None
                    and s.exited is None}
        for task in list(scheduler.tasks.values()):
            if task.parent_session in restored:
                self.delegations.on_task(task)

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    def find(self, caller: Caller, selector: Selector = EVERYTHING,
             exited: bool | None = None) -> list[Session]:
        """The caller's sessions whose labels match selector (and, unless exited is None,
        that have or have not exited), in start order."""
        found = [s for s in self._sessions.values() if s.tenant == caller.tenant
                 and selector.matches(s.labels)
                 and (exited is None or (s.exited is not None) == exited)]
        return sorted(found, key=lambda s: s.seq)

    async def shutdown(self, reason: str) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        # kept sessions run on for the next daemon (an upgrade is a stop and a start)
        await asyncio.gather(*(self._end(s, reason) for s in list(self._sessions.values())
                               if s.kept is None or s.exited is not None),
                             return_exceptions=True)
        if self.delegations is not None:
            await self.delegations.close()

    # -- opening --------------------------------------------------------------------------

    async def open(self, caller: Caller, *, argv: list[str], spec=None, sandbox_id: str = "",
                   env: dict[str, str] | None = None, first_input: str = "",
                   labels: dict[str, str] | None = None, request_id: str = "",
                   fingerprint: str = "", delegations_from: str = "",
                   wait_if_paused: bool = False) -> Session:
        """Start an agent in a new sandbox (spec) or an existing one (sandbox_id).

        Args:
            labels: already checked (runtime/labels.py); a sandbox made for it gets them too.
            delegations_from: a gone session whose delegated tasks this one takes over.
            wait_if_paused: an existing sandbox that is paused is waited for (its Resume)
                instead of refused with FailedPrecondition.
            request_id, fingerprint: once per request_id of this tenant: a retry with the
                same fingerprint gets the session the first one started.

        Raises:
            RequestIdReused: the request_id started a session for a different start.
            Ended: the session the request_id started is no longer held.
        """
        if request_id:
            async def make() -> str:
                session = await self.open(caller, argv=argv, spec=spec, sandbox_id=sandbox_id,
                                          env=env, first_input=first_input, labels=labels,
                                          delegations_from=delegations_from,
                                          wait_if_paused=wait_if_paused)
                return session.id

            session_id, replayed = await self.requests.run(caller.tenant, request_id,
                                                           fingerprint, make)
            session = self._sessions.get(session_id)
            if session is None:
                raise Ended(f"request_id {request_id!r} started session {session_id}, "
                            "which has ended and is no longer held")
            if replayed:
                await self.audit.record("session.resume", tenant=caller.tenant, peer=caller.peer,
                                        sandbox_id=session.sandbox_id, session_id=session.id,
                                        detail={"after_seq": 0, "request_id": request_id})
            return session
        if not argv:
            raise InvalidSpec("start.argv", "the agent command is empty")
        if delegations_from:
            if self.delegations is None:
                raise FailedPrecondition("this daemon runs no deep tasks to take over")
            self.delegations.check_adoptable(caller, delegations_from)
        tenant = caller.tenant
        held = sum(1 for s in self._sessions.values() if s.tenant == tenant)
        self.sandboxes.policies.of(caller).check_count(
            "sessions", held + self._opening.get(tenant, 0), "max_sessions")
        self._opening[tenant] = self._opening.get(tenant, 0) + 1
        try:
            session = await self._open(caller, argv=argv, spec=spec, sandbox_id=sandbox_id,
                                       env=env, first_input=first_input, labels=labels or {},
                                       wait_if_paused=wait_if_paused)
            if delegations_from:
                await self.delegations.adopt(caller, session, delegations_from)
            return session
        finally:
            self._opening[tenant] -= 1
            if not self._opening[tenant]:
                del self._opening[tenant]

    async def _open(self, caller: Caller, *, argv: list[str], spec, sandbox_id: str,
                    env: dict[str, str] | None, first_input: str,
                    labels: dict[str, str], wait_if_paused: bool = False) -> Session:
        session_id = "ses-" + secrets.token_hex(6)
        owns = not sandbox_id
        if owns:
            msb = await self.sandboxes.create(caller, spec, owner_session=session_id,
                                              labels=labels)
        else:
            msb = self.sandboxes.get(caller, sandbox_id)
        # the kernel's default capacity for the events pipe, as sessions have always had
        pipes = AgentPipes.open(events_pipe_bytes=None)
        agent_env = {**(env or {}), **pipes.env(), "CORRAL_SESSION_ID": session_id}
        try:
            handle = await self.sandboxes.exec(
                caller, msb.id, argv, env=agent_env, keep_stdin_open=True,
                pass_fds=pipes.pass_fds(), session_id=session_id,
                wait_if_paused=wait_if_paused,
            )
        except BaseException:
            pipes.close()
            if owns:
                with contextlib.suppress(Exception):
                    await self.sandboxes.destroy(caller, msb.id, "session start failed")
            raise
        finally:
            pipes.close_agent_ends()
        holder: list[weakref.ref] = []
        # end_on_eof=False: after the agent's last frame the runtime may still append its
        # own final TURN_END; watchers end when _watch_exit closes the hub.
        # The callback holds the session weakly: session -> hub -> callback -> session would
        # be a cycle, and the replay log (megabytes) would wait for the cyclic GC.
        journal = (SessionJournal.for_sandbox(msb.sandbox.runtime_dir, session_id,
                                              self.stream_log_bytes)
                   if msb.kept and self.live_restore is not None else None)
        hub = StreamHub(TokenStream("frames", log_bytes=self.stream_log_bytes),
                        on_event=lambda ev: self._on_agent_event(holder[0](), ev),
                        end_on_eof=False, journal=journal and journal.events)
        session = Session(
            id=session_id, tenant=caller.tenant, sandbox_id=msb.id, owns_sandbox=owns,
            hub=hub, control=ControlWriter(pipes.control_w), exec_handle=handle,
            # unwatched until a stream attaches: a client gone while its start was still
            # running leaves a session the idle reaper ends like any other
            detached_since=time.monotonic(), labels=dict(labels), created_at=time.time(),
        )
        self._seq += 1
        session.seq = self._seq
        holder.append(weakref.ref(session))
        if journal is not None:  # before anything can be logged
            journal.keep_notes(session.turns)
        hub.attach_fd(pipes.events_r)
        if journal is not None:
            session.kept = journal
            self.live_restore.keep_session(msb.id, session_id, [pipes.events_r, pipes.control_w],
                                           journal, {
                "id": session_id, "tenant": caller.tenant, "sandbox_id": msb.id,
                "owns_sandbox": owns, "exec_id": handle.id, "argv": list(argv),
                "labels": dict(labels), "created_at": session.created_at,
                "log_bytes": self.stream_log_bytes})
        self._sessions[session_id] = session
        loop = asyncio.get_running_loop()
        session.plain_output = (PlainOutput(handle.stdout, hub, EventKind.TOKEN),
                                PlainOutput(handle.stderr, hub, EventKind.LOG))
        session._tasks = [loop.create_task(self._watch_exit(session))]
        await self.audit.record("session.open", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=msb.id, session_id=session_id,
                                detail={"argv": list(argv), "owns_sandbox": owns,
                                        "exec_id": handle.id, "policy_digest": msb.policy_digest,
                                        **({"labels": labels} if labels else {})})
        if first_input:
            self.input(caller, session, first_input, audit=False)
        return session

    def get(self, caller: Caller, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        missing = f"session {session_id!r} does not exist"
        if session is None:
            raise NotFound(missing)
        # another tenant's: NOT_FOUND as for an unknown id, audited as a denial
        check_owner(caller, session.tenant, "session", session_id, missing)
        return session

    def attach(self, session: Session) -> None:
        session.attached += 1
        session.detached_since = None

    def detach(self, session: Session) -> None:
        session.attached -= 1
        if session.attached <= 0:
            session.attached = 0
            session.detached_since = time.monotonic()

    # -- steering -------------------------------------------------------------------------

    def input(self, caller: Caller, session: Session, text: str, audit: bool = True) -> None:
        """Deliver steering text into the running turn (or start the next turn)."""
        data = text.encode("utf-8")
        if len(data) > MAX_INPUT_BYTES:
            raise InvalidSpec("input.text", f"{len(data)} bytes is over the 1 MiB limit")
        started = session.turns.input_arrived(session.id, session.hub.stream.next_seq)
        if started is not None and session.kept is not None:  # before the agent hears it
            session.kept.write_turns(started.turn, "in_turn", started.seq)
        session.control.send_input(text)
        if not session.protocol_seen and session.exec_handle.stdin is not None:
            with contextlib.suppress(CorralError):
                session.exec_handle.stdin.write(data + b"\n")
        if audit:
            self._record_later("session.input", tenant=caller.tenant, peer=caller.peer,
                               sandbox_id=session.sandbox_id, session_id=session.id,
                               detail={"bytes": len(data), "turn": session.turn})

    def interrupt(self, caller: Caller, session: Session) -> None:
        """End the current turn: INTERRUPT (SIGINT for a plain agent), forced after a grace."""
        session.turns.check_running(session.id)
        if session.protocol_seen:
            session.control.send_interrupt()
        elif session.exec_handle.process.pid:
            signal_command(session.exec_handle.process, signal.SIGINT)
        if session.turns.turn_open:
            self.metrics.interrupt_sent(session.id)
        if session.turns.turn_open and session._interrupt_timer is None:
            loop = asyncio.get_running_loop()
            session._interrupt_timer = loop.call_later(
                INTERRUPT_GRACE_S, self._force_turn_end, session, "interrupted")
        self._record_later("session.interrupt", tenant=caller.tenant, peer=caller.peer,
                           sandbox_id=session.sandbox_id, session_id=session.id,
                           detail={"turn": session.turn, "protocol": session.protocol_seen})

    async def close(self, caller: Caller, session: Session, detach: bool = False) -> None:
        """End the session; its unfinished delegations are cancelled unless detach."""
        await self.audit.record("session.close", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=session.sandbox_id, session_id=session.id,
                                detail={"detach": True} if detach else {})
        if self.delegations is not None:
            await self.delegations.session_closing(caller, session.id, detach)
        await self._end(session, "closed")

    # -- live restore ---------------------------------------------------------------------

    def restore(self, recovered) -> int:
        """Adopt the sessions of the sandboxes live restore adopted at start (each a
        runtime/restore.py Recovered, after SandboxManager.restore rebuilt their commands):
        a session comes back with its id, tenant, labels, turn state and replay log (the
        same seqs), reading its agent's pipes again. One that cannot be is ended with the
        reason (its watchers get its log and an exit saying why), audited, and a sandbox
        it owned is destroyed. Returns how many were adopted."""
        adopted = 0
        for result in recovered:
            msb = self.sandboxes._sandboxes.get(result.row.id) if result.sandbox else None
            if msb is None:
                continue
            loaded, problems = load_sessions(msb.sandbox.runtime_dir)
            for problem in problems:
                self._audit_restore(msb.tenant, msb.id, problem.partition(":")[0],
                                    problem.partition(": ")[2])
            for found in loaded:
                pipes = result.sessions.pop(found.record["id"], [])
                adopted += self._adopt(msb, found, pipes)
            for session_id, fds in result.sessions.items():  # held, with no journal
                _close_fds(fds)
                self.live_restore.forget_session(msb.id, session_id, _NoJournal())
                self._audit_restore(msb.tenant, msb.id, session_id, "its journal is gone")
            if msb.owner_session and msb.owner_session not in self._sessions:
                self._destroy_later(msb, "its session could not be restored")
        return adopted

    def _adopt(self, msb, found, pipes: list[int]) -> int:
        """One session (restore); 1 when adopted, 0 when it was ended instead."""
        record = found.record
        handle = msb.execs.get(record["exec_id"])
        log = found.log
        holder: list[weakref.ref] = []
        hub = StreamHub(TokenStream("frames", log_bytes=int(record["log_bytes"]),
                                    first_seq=log.first_seq if log else 1),
                        on_event=lambda ev: self._on_agent_event(holder[0](), ev),
                        end_on_eof=False, journal=found.journal.events)
        events = hub.restore_log(log.records) if log else []
        turns, added = _restored_turns(found.turns, events, found.notes)
        reason = ("its agent's command was not kept" if handle is None else
                  "the holder kept none of its pipes" if len(pipes) != 2 else "")
        if reason:
            _close_fds(pipes)
            pipes = [-1, -1]
        session = Session(
            id=record["id"], tenant=record["tenant"], sandbox_id=msb.id,
            owns_sandbox=bool(record["owns_sandbox"]), hub=hub,
            control=ControlWriter(pipes[1]) if not reason else _closed_control(),
            exec_handle=handle, turns=turns,
            detached_since=time.monotonic(), labels=dict(record.get("labels", {})),
            created_at=float(record.get("created_at", 0.0)), kept=found.journal)
        found.journal.keep_notes(session.turns, found.note_lines)
        for event in added:  # so that the next restart finds them too
            found.journal.append_note(event)
        self._seq += 1
        session.seq = self._seq
        holder.append(weakref.ref(session))
        self._sessions[session.id] = session
        if session.owns_sandbox:
            msb.owner_session = session.id
        if reason:
            self._end_lost(session, reason)
            return 0
        hub.attach_fd(pipes[0])
        session.plain_output = (
            PlainOutput(handle.stdout, hub, EventKind.TOKEN, handle.stdout.stream.next_seq),
            PlainOutput(handle.stderr, hub, EventKind.LOG, handle.stderr.stream.next_seq))
        session._tasks = [asyncio.get_running_loop().create_task(self._watch_exit(session))]
        self.audit.append("session.restore", tenant=session.tenant, peer="daemon",
                          sandbox_id=msb.id, session_id=session.id, detail={
                              "restored": True, "exec_id": handle.id, "turn": session.turn,
                              "phase": session.turns.phase.value,
                              "last_seq": session.last_seq})
        return 1

    def _end_lost(self, session: Session, reason: str) -> None:
        """A session that could not be adopted: its log stays readable, it ends now with
        reason (what a watcher that resumes is told), and a sandbox it owned goes."""
        hub = session.hub
        if session.turns.turn_open:
            payload = json.dumps({"status": "interrupted", "forced": True,
                                  "reason": reason}).encode()
            session.turns.end_turn("interrupted", hub.append_event(EventKind.TURN_END, payload))
        hub.close()
        handle = session.exec_handle
        if handle is not None and handle.running:  # an agent no one can drive any more
            signal_command(handle.process, signal.SIGKILL)
        session.exec_handle = None
        session.turns.exit(-signal.SIGKILL, f"not restored: {reason}")
        session.ended.set()
        self._audit_restore(session.tenant, session.sandbox_id, session.id, reason)
        if self.live_restore is not None:
            self.live_restore.forget_session(session.sandbox_id, session.id, session.kept)
        msb = self.sandboxes._sandboxes.get(session.sandbox_id)
        if session.owns_sandbox and msb is not None:
            self._destroy_later(msb, "its session could not be restored")

    def _audit_restore(self, tenant: str, sandbox_id: str, session_id: str,
                       reason: str) -> None:
        log.warning("session %s of sandbox %s not restored: %s", session_id, sandbox_id, reason)
        self.audit.append("session.restore", tenant=tenant, peer="daemon",
                          sandbox_id=sandbox_id, session_id=session_id,
                          detail={"restored": False, "reason": reason})

    def _destroy_later(self, msb, reason: str) -> None:
        async def destroy() -> None:
            with contextlib.suppress(Exception):
                await self.sandboxes._destroy(msb, reason, msb.tenant, "daemon")

        asyncio.get_running_loop().create_task(destroy())

    # -- internals ------------------------------------------------------------------------

    def _record_later(self, kind: str, **fields) -> None:
        """Audit a steering action already delivered (input, interrupt) without waiting for
        the disk: the record joins a background group (AuditLog.submit_background: up to 2 ms
        for others to join), so neither the agent nor the event loop waits for an fsync, a
        loaded daemon pays one commit per group, and the log keeps call order. Steering has
        no result to hold back; a record that cannot be written is logged as an error."""
        future = self.audit.submit_background(kind, **fields)

        def check(f) -> None:
            if f.exception() is not None:
                log.error("audit record %s for session %s was not written: %s", kind,
                          fields.get("session_id"), f.exception())

        future.add_done_callback(check)

    def _on_agent_event(self, session: Session | None, event) -> None:
        if session is None:  # gone already: nobody is left to tell
            return
        if event.kind == EventKind.TOOL_CALL and self.delegations is not None:
            self.delegations.on_tool_call(session, event.payload)
            return
        if event.kind == EventKind.TURN_END and session.turns.turn_open:
            self._turn_ended(session, turn_end_status(event.payload), event.seq)

    def _turn_ended(self, session: Session, status: str, seq: int) -> None:
        self.metrics.turn_ended(session.id)
        if session._interrupt_timer is not None:
            session._interrupt_timer.cancel()
            session._interrupt_timer = None
        session.turns.end_turn(status, seq)
        if session.kept is not None:
            session.kept.write_turns(session.turns.turn, "between_turns", seq)

    def _force_turn_end(self, session: Session, status: str) -> None:
        session._interrupt_timer = None
        if session.turns.turn_open:
            payload = json.dumps({"status": status, "forced": True}).encode()
            seq = session.hub.append_event(EventKind.TURN_END, payload)
            self._turn_ended(session, status, seq)

    async def _watch_exit(self, session: Session) -> None:
        handle = session.exec_handle
        await handle.exited.wait()
        # Everything the agent wrote before it exited is in the pipes: drain them first.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session.hub.wait_eof(), 2.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(handle.stdout.wait_eof(), handle.stderr.wait_eof()), 2.0)
        if session.turns.turn_open:
            status = "interrupted" if session._interrupt_timer else (
                "completed" if handle.returncode == 0 else "failed")
            self._force_turn_end(session, status)
        for output, source in zip(session.plain_output, (handle.stdout, handle.stderr),
                                  strict=True):
            output.stop(source)
        session.hub.close()
        session.control.close()
        exited = session.turns.exit(handle.returncode, handle.reason)
        session.ended.set()
        if session.kept is not None and self.live_restore is not None:
            self.live_restore.forget_session(session.sandbox_id, session.id, session.kept)
        await self.audit.record("session.exit", tenant=session.tenant, peer="daemon",
                                sandbox_id=session.sandbox_id, session_id=session.id,
                                detail={"returncode": handle.returncode, "reason": exited.reason})
        # The session's own log holds everything the command's output hubs read (PlainOutput
        # copied it): let those logs go now, not when the session is reaped.
        session.exec_handle = None
        handle.stdout.close()
        handle.stderr.close()
        if session.owns_sandbox:
            msb = self.sandboxes._sandboxes.get(session.sandbox_id)
            if msb is not None:
                await self.sandboxes._destroy(msb, "session ended", session.tenant, "daemon")

    async def _end(self, session: Session, reason: str) -> None:
        """Ask the agent to stop (SHUTDOWN, SIGTERM, SIGKILL), wait for its exit."""
        if session.turns.request_close(reason):
            handle = session.exec_handle  # _watch_exit drops it once the agent has exited
            proc = handle.process
            with contextlib.suppress(Exception):
                session.control.send_shutdown()
            for sig, wait_s in ((None, SHUTDOWN_GRACE_S), (signal.SIGTERM, SHUTDOWN_GRACE_S),
                                (signal.SIGKILL, 5.0)):
                if sig is not None and proc.pid:
                    signal_command(proc, sig)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(handle.exited.wait(), wait_s)
                if handle.exited.is_set():
                    break
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session.ended.wait(), 10.0)
        if self._sessions.pop(session.id, None) is not None:
            self.metrics.session_removed(session)
        self._release(session)

    @staticmethod
    def _release(session: Session) -> None:
        """Drop what a removed session still holds, so its replay logs (megabytes each) go
        with the last reference instead of waiting for the cyclic GC. Its finished tasks are
        forgotten (one that ended with an exception holds a traceback whose frames point
        back here); once the session has ended, its hub and control pipe are closed (they
        normally are already: this is idempotent)."""
        session._tasks = [t for t in session._tasks if not t.done()]
        session.listeners.clear()
        if not session.ended.is_set():  # _watch_exit still runs and closes them itself
            return
        session.hub.close()
        session.control.close()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if session.detached_since is None:
                    continue
                if now - session.detached_since >= self.idle_ttl_s:
                    log.info("session %s idle for %.0fs: reaping", session.id, self.idle_ttl_s)
                    if session.exited is None:
                        await self.audit.record(
                            "session.idle", tenant=session.tenant, peer="daemon",
                            sandbox_id=session.sandbox_id, session_id=session.id,
                            detail={"idle_ttl_s": self.idle_ttl_s})
                        if self.delegations is not None:  # abandoned: its tasks go too
                            await self.delegations.session_closing(
                                Caller(session.tenant, "daemon"), session.id, detach=False)
                    await self._end(session, "idle")


def _restored_turns(saved: dict, events: list[tuple[int, int, bytes]],
                    notes: list | None = None) -> tuple[SessionTurns, list]:
    """The turn state turns.json kept, brought up to date with the log (a TURN_END entry
    after its last change: the daemon died before it wrote the change, so that turn has
    ended), with what the session had logged for its watchers; and the events logged here
    that notes did not hold, for the journal.

    `notes` (notes.jsonl, runtime/session_journal.py) is logged again as it was, so that a
    client resuming from before the restart is told of everything it would have been told
    without it, but a turn event of a turn past turns.json's (the daemon died after
    logging a start and before writing it: the agent never heard that input). Then the
    turn's last event is logged where notes lack it: the end the log shows, or the start
    of the turn that runs. Without notes (a journal from before they were kept) that last
    event is all that is logged; otherwise a client waiting for a turn's end would wait
    for ever."""
    turns = SessionTurns()
    turns.turn = int(saved.get("turn", 1))
    turns.phase = Phase(saved.get("phase", Phase.IN_TURN.value))
    if turns.phase is Phase.EXITED:  # never written: an exit ends the journal
        turns.phase = Phase.BETWEEN_TURNS
    changed_at = int(saved.get("seq", 0))
    ends = {seq: payload for seq, kind, payload in events if kind == EventKind.TURN_END}
    later = min((seq for seq in ends if seq > changed_at), default=None)
    if turns.turn_open and later is not None:
        turns.phase = Phase.BETWEEN_TURNS
        changed_at = later
    last = None  # the last turn event logged again
    for event in notes or ():
        if isinstance(event, TurnStarted | TurnEnded):
            if event.turn > turns.turn:
                continue
            last = event
        turns.remember(event)
    added = []
    if turns.phase is Phase.BETWEEN_TURNS and changed_at in ends:
        missing = TurnEnded(turns.turn, turn_end_status(ends[changed_at]), changed_at)
        if not (isinstance(last, TurnEnded) and last.turn == turns.turn):
            added.append(missing)
    elif turns.turn_open and turns.turn > 1 and changed_at:
        if not (isinstance(last, TurnStarted) and last.turn == turns.turn):
            added.append(TurnStarted(turns.turn, changed_at))
    for event in added:
        turns.remember(event)
    return turns, added


def turn_end_status(payload: bytes) -> str:
    """The status a TURN_END frame's JSON gives ("completed" where it gives none)."""
    try:
        status = json.loads(payload).get("status", "completed")
    except (ValueError, AttributeError):
        status = "completed"
    return str(status)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _closed_control() -> ControlWriter:
    """A control writer whose pipe is already gone (a session ended at restore)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    control = ControlWriter(w)
    control.close()
    return control


class _NoJournal:
    """The journal of a session whose directory is gone: nothing to remove."""

    def remove(self) -> None:
        pass
