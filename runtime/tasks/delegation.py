"""Deep tasks delegated by sessions (agent protocol v1.1): the link between the two modes.

A session's agent asks for a deep task with a DELEGATE (a TOOL_CALL frame naming
`corral.delegate`, docs/agent-protocol.md); `Delegations` submits it to the scheduler as
the session's tenant, with the session as its parent, and from then on turns what the
scheduler does with it into control frames for the agent (TASK_ACCEPTED or TASK_REFUSED,
TASK_UPDATE, TASK_DONE) and `TaskNote`s for the session's watchers, in that order.

Rules this module keeps:

* Every limit of a Submit applies (policy, quotas, fair share), and a session holds at most
  `max_running` delegations that have not finished; one more is refused, naming the limit.
* A refusal names the DELEGATE field at fault (`delegate.argv`, ...); the session goes on.
* The parent link is stored with the task (task store) and audited (`task.delegate`).
* A task's end is told to its parent session once: its result files are copied into the
  session's /workspace/.corral/tasks/ID first, then TASK_DONE goes out, then the task is
  marked delivered in the store. A crash between the last two sends it again after the
  restart; the agent helper (corral_agent) marks each TASK_DONE it takes in the workspace
  (/workspace/.corral/told/ID) and drops a repeat, so the agent hears it once. (Storing
  first and sending after would lose the end instead: a lost result is worse than a repeat
  the helper can recognise.) An end no live session could take (the daemon restarted,
  the agent exited) stays owed; a session started with `delegations_from` takes the tasks
  over and is told what it is owed.
* Closing a session cancels its unfinished delegations unless it detaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import signal
import stat

from corral.ext import agent as protocol
from corral.sandbox.errors import (
    ControlClosed,
    ControlQueueFull,
    CorralError,
    FailedPrecondition,
    InvalidSpec,
    NotFound,
    ResourceExhausted,
)
from corral.sandbox.spec import SandboxSpec, parse_duration

from ..auth import Caller
from ..session_state import TaskNote
from .model import MAX_FILES_BYTES, DeepTask, TaskSpec
from .states import TaskState

log = logging.getLogger("corral.tasks.delegation")

#: Bytes of one delegation ref (the DELEGATE's id), at most.
MAX_REF_BYTES = 64
#: Result files copied into a session's workspace per task, at most (entries, bytes).
MAX_RESULT_ENTRIES = 1000
MAX_RESULT_BYTES = 64 << 20
#: Tests arm a SIGKILL between sending TASK_DONE and storing `delivered` with this variable.
DELIVERY_FAULT_ENV = "CORRAL_TEST_DELIVERY_FAULT"
_SPEC_KEYS = frozenset({"argv", "image", "selector", "resources", "priority", "max_runtime_s",
                        "max_runtime", "retries", "files", "labels"})


class DelegationLimit(ResourceExhausted):
    """The session already runs as many delegations as max_delegations_per_session."""


def _object(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidSpec(field, "must be a JSON object")
    return value


def _strings(value, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidSpec(field, "must be a list of strings")
    return value


def parse_delegate(arguments) -> tuple[TaskSpec, list[str]]:
    """The task spec a DELEGATE's arguments ask for, and the workspace files to hand over.

    Raises:
        InvalidSpec: naming the field as `delegate.FIELD`.
    """
    args = _object(arguments, "delegate")
    unknown = sorted(set(args) - _SPEC_KEYS)
    if unknown:
        raise InvalidSpec(f"delegate.{unknown[0]}", f"is not a DELEGATE field (known: "
                                                    f"{', '.join(sorted(_SPEC_KEYS))})")
    argv = _strings(args.get("argv"), "delegate.argv")
    image = args.get("image", "")
    if not isinstance(image, str):
        raise InvalidSpec("delegate.image", "must be an image REF (a string)")
    numbers = {}
    for name, kind in (("priority", int), ("retries", int), ("max_runtime_s", (int, float))):
        value = args.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InvalidSpec(f"delegate.{name}", f"{value!r} must be a number")
        numbers[name] = value
    if "max_runtime" in args:  # a duration, e.g. "20m"
        numbers["max_runtime_s"] = parse_duration(args["max_runtime"], "delegate.max_runtime")
    files = _strings(args.get("files", []), "delegate.files")
    try:
        spec = TaskSpec(
            argv=tuple(argv), sandbox=SandboxSpec(image=image) if image else SandboxSpec(),
            selector=dict(_object(args.get("selector", {}), "delegate.selector")),
            resources=dict(_object(args.get("resources", {}), "delegate.resources")),
            priority=numbers["priority"], retries=numbers["retries"],
            max_runtime_s=float(numbers["max_runtime_s"]),
            labels=dict(_object(args.get("labels", {}), "delegate.labels")))
    except InvalidSpec as exc:  # TaskSpec names spec.FIELD; the agent wrote delegate.FIELD
        field = getattr(exc, "field", "") or "delegate"
        message = str(exc).removeprefix(f"{field}: ")
        raise InvalidSpec("delegate." + field.removeprefix("spec."), message) from None
    return spec, files


def _json_or_none(text: str):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class Delegations:
    """The deep tasks of a daemon's sessions.

    Args:
        scheduler: the daemon's Scheduler (tasks are submitted to it; it calls back on
            every change of a task).
        sandboxes: the SandboxManager (files move in and out of session workspaces).
        audit: the audit log.
        lookup: session id -> the live Session, or None.
        max_running: unfinished delegations one session may hold.
    """

    def __init__(self, scheduler, sandboxes, audit, lookup, max_running: int) -> None:
        self.scheduler = scheduler
        self.sandboxes = sandboxes
        self.audit = audit
        self.lookup = lookup
        self.max_running = max_running
        #: task id -> (state, progress_json, attempt) last told to its session
        self._told: dict[str, tuple] = {}
        self._delivering: set[str] = set()
        #: session id -> refs of its DELEGATEs being submitted now (they count against the
        #: limit, and once admitted, as the task they became)
        self._starting: dict[str, set[str]] = {}
        self._background: set[asyncio.Task] = set()
        scheduler.listeners.append(self.on_task)

    # -- from the session's agent ------------------------------------------------------------

    def on_tool_call(self, session, payload: bytes) -> bool:
        """A TOOL_CALL entry of a session: True when it named one of the runtime's tools
        (DELEGATE, CANCEL_TASK, TASK_INPUT), which is then served in the background."""
        try:
            call = json.loads(payload)
        except ValueError:
            return False
        name = call.get("name") if isinstance(call, dict) else None
        if name not in (protocol.DELEGATE, protocol.CANCEL_TASK, protocol.TASK_INPUT):
            return False
        ref = call.get("id", "")
        if name == protocol.DELEGATE:
            self._spawn(self.delegate(session, ref, call.get("arguments")))
        else:
            self._spawn(self._steer(session, name, call.get("arguments")))
        return True

    async def delegate(self, session, ref, arguments) -> DeepTask | None:
        """Submit the task a DELEGATE asks for; TASK_ACCEPTED or TASK_REFUSED to the agent."""
        ref = ref if isinstance(ref, str) else ""
        try:
            if not ref or len(ref.encode()) > MAX_REF_BYTES:
                raise InvalidSpec("delegate.id", f"the ref must be 1-{MAX_REF_BYTES} bytes")
            spec, files = parse_delegate(arguments)
            caller = Caller(session.tenant, f"session:{session.id}")
            self.check_limit(session.id, ref)
            starting = self._starting.setdefault(session.id, set())
            starting.add(ref)
            try:
                if files:
                    spec = dataclasses.replace(spec, files=await self._hand_over(
                        caller, session, files))
                task = await self.scheduler.submit(
                    caller, spec, parent_session=session.id, parent_ref=ref,
                    link_detail={"sandbox_id": session.sandbox_id, "files": files})
            finally:
                starting.discard(ref)
                if not starting:
                    self._starting.pop(session.id, None)
        except CorralError as exc:
            self._refuse(session, ref, exc)
            return None
        self._send(session, protocol.TASK_ACCEPTED, {"ref": ref, "task_id": task.id})
        self._note(session, TaskNote("accepted", 0, task_id=task.id, ref=ref,
                                     state=task.state.name))
        self.on_task(task)  # what happened to it meanwhile
        return task

    def check_limit(self, session_id: str, ref: str) -> None:
        """Raises:
        InvalidSpec: an unfinished delegation of the session already has this ref.
        DelegationLimit: the session already holds max_running unfinished delegations
            (those still being submitted count)."""
        # by ref: a task counts once, whether its submission is still under way or not
        refs = {t.parent_ref for t in self.open_tasks(session_id) if t.parent_ref}
        refs |= self._starting.get(session_id, set())
        if ref in refs:
            raise InvalidSpec("delegate.id", f"the ref {ref!r} names an unfinished "
                                             "delegation of this session already")
        held = len(refs)
        if held >= self.max_running:
            raise DelegationLimit(
                f"session {session_id} already has {held} delegations that have not finished, "
                f"the most allowed (max_delegations_per_session = {self.max_running}); wait "
                "for one to finish or cancel one")

    def open_tasks(self, session_id: str) -> list[DeepTask]:
        return [t for t in self.scheduler.tasks.values()
                if t.parent_session == session_id and not t.terminal]

    async def _hand_over(self, caller: Caller, session, files: list[str]) -> dict[str, bytes]:
        """The named files of the session's workspace, for the task's workspace (read in
        one worker thread; the task.delegate record names them)."""
        workspace = self.sandboxes.get(caller, session.sandbox_id).workspace

        def read_all() -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            total = 0
            for path in files:
                rel = posixpath.normpath(path.removeprefix("/workspace/").lstrip("/"))
                try:
                    data, truncated = workspace.read(rel, MAX_FILES_BYTES >> 2)
                except CorralError as exc:
                    raise InvalidSpec("delegate.files", f"{path!r}: {exc}") from None
                total += len(data)
                if truncated or total > MAX_FILES_BYTES:
                    raise InvalidSpec("delegate.files", f"{path!r} takes the files over the "
                                                        f"{MAX_FILES_BYTES}-byte limit")
                out[rel] = data
            return out

        return await asyncio.get_running_loop().run_in_executor(None, read_all)

    def _refuse(self, session, ref: str, exc: CorralError, about: str = "") -> None:
        field = getattr(exc, "field", "") or ""
        self._send(session, protocol.TASK_REFUSED, {
            "ref": ref, "code": exc.grpc_status, "message": str(exc), "field": field,
            **({"about": about} if about else {})})
        self._note(session, TaskNote("refused", 0, ref=ref, code=exc.grpc_status,
                                     message=str(exc)))

    async def _steer(self, session, name: str, arguments) -> None:
        """CANCEL_TASK or TASK_INPUT from the agent. A mistake is told as a TASK_REFUSED
        with an empty ref and the task's ref as "about": the delegation itself stands."""
        caller = Caller(session.tenant, f"session:{session.id}")
        args = arguments if isinstance(arguments, dict) else {}
        field = "cancel_task" if name == protocol.CANCEL_TASK else "task_input"
        try:
            task = self._linked(session.id, args, field)
            if name == protocol.CANCEL_TASK:
                await self.scheduler.cancel(caller, task.id)
            else:
                text = args.get("text")
                if not isinstance(text, str):
                    raise InvalidSpec(f"{field}.text", "must be a string")
                await self.scheduler.send_input(caller, task.id, text)
        except CorralError as exc:
            self._refuse(session, "", exc, about=str(args.get("ref", "")))

    def _linked(self, session_id: str, args: dict, field: str) -> DeepTask:
        """The session's task named by task_id (or, before TASK_ACCEPTED came, by ref)."""
        task_id, ref = args.get("task_id") or "", args.get("ref") or ""
        for task in self.scheduler.tasks.values():
            if task.parent_session == session_id and (
                    (task_id and task.id == task_id) or (not task_id and task.parent_ref == ref)):
                return task
        raise NotFound(f"{field}: this session delegated no task {task_id or ref!r}")

    # -- from the scheduler ------------------------------------------------------------------

    def on_task(self, task: DeepTask) -> None:
        """Scheduler listener: a task changed; tell its parent session if it runs."""
        if not task.parent_session:
            return
        session = self.lookup(task.parent_session)
        if session is None or session.exited is not None:
            return
        if task.terminal:
            if not task.delivered and task.id not in self._delivering:
                self._delivering.add(task.id)
                self._spawn(self._deliver(session, task))
            return
        told = (task.state, task.progress_json, task.attempt)
        if self._told.get(task.id) == told:
            return
        self._told[task.id] = told
        progress = _json_or_none(task.progress_json)
        if task.parent_ref:
            self._send(session, protocol.TASK_UPDATE, {
                "task_id": task.id, "ref": task.parent_ref, "state": task.state.name,
                "progress": progress, "attempt": task.attempt, "node": task.node})
        self._note(session, TaskNote("update", 0, task_id=task.id, ref=task.parent_ref,
                                     state=task.state.name, node=task.node,
                                     attempt=task.attempt, progress_json=task.progress_json))

    async def _deliver(self, session, task: DeepTask) -> None:
        """Copy the result files in, send TASK_DONE, mark it delivered (in that order)."""
        try:
            out_dir, copy_error = "", ""
            if task.state == TaskState.SUCCEEDED:
                try:
                    out_dir = await self._copy_results(session, task)
                except (CorralError, OSError) as exc:  # e.g. the workspace is full
                    copy_error = (f"the result files were not copied into the session "
                                  f"({exc}); `corral task result {task.id}` reads them")
            if task.parent_ref:
                sent = self._send(session, protocol.TASK_DONE, {
                    "task_id": task.id, "ref": task.parent_ref, "state": task.state.name,
                    "result": _json_or_none(task.result_json), "out_dir": out_dir,
                    "reason": task.reason, "attempt": task.attempt,
                    **({"copy_error": copy_error} if copy_error else {})})
                if not sent:
                    return  # owed: a session that takes the task over is told
                await _fault_after_done_sent(self.sandboxes, session, task)
            self._note(session, TaskNote("done", 0, task_id=task.id, ref=task.parent_ref,
                                         state=task.state.name, node=task.node,
                                         attempt=task.attempt, result_json=task.result_json,
                                         out_dir=out_dir,
                                         message=copy_error or task.reason))
            task.delivered = True
            self._told.pop(task.id, None)
            await self.scheduler.store.update(task, [("task.delivered", {
                "tenant": task.tenant, "peer": "daemon", "session_id": session.id,
                "detail": {"task_id": task.id, "state": task.state.name, "out_dir": out_dir}})])
        finally:
            self._delivering.discard(task.id)

    async def _copy_results(self, session, task: DeepTask) -> str:
        """The task's out/ files into the session's workspace (one worker thread, through
        the workspace file API: no link followed); where they are inside it. The
        task.delivered record says so."""
        inside = f"{protocol.TASK_RESULTS_DIR}/{task.id}"
        rel = inside.removeprefix("/workspace/")
        workspace = self.sandboxes.get(Caller(session.tenant, "daemon"),
                                       session.sandbox_id).workspace

        def copy() -> None:
            workspace.mkdir(rel, 0o755, True)
            for path, data in _result_files(self.scheduler.result_dir(task)):
                parent = posixpath.dirname(path)
                if parent:
                    workspace.mkdir(f"{rel}/{parent}", 0o755, True)
                workspace.write(f"{rel}/{path}", data, 0o644)

        await asyncio.get_running_loop().run_in_executor(None, copy)
        return inside

    # -- the session's end and its successor -------------------------------------------------

    async def session_closing(self, caller: Caller, session_id: str, detach: bool) -> None:
        """Cancel the session's unfinished delegations, unless it detaches (audited)."""
        tasks = self.open_tasks(session_id)
        if not tasks:
            return
        await self.audit.record("session.delegations", tenant=caller.tenant, peer=caller.peer,
                                session_id=session_id, detail={
                                    "action": "detached" if detach else "cancelled",
                                    "task_ids": [t.id for t in tasks]})
        if detach:
            return
        for task in tasks:
            with contextlib.suppress(CorralError):
                await self.scheduler.cancel(caller, task.id)

    def check_adoptable(self, caller: Caller, old_session_id: str) -> None:
        """Raises:
        FailedPrecondition: that session still runs (it keeps its own delegations).
        NotFound: the caller's tenant has no tasks delegated by that session."""
        session = self.lookup(old_session_id)
        if session is not None and session.tenant == caller.tenant and session.exited is None:
            raise FailedPrecondition(f"session {old_session_id} still runs; its delegations "
                                     "stay with it")
        if not any(t.parent_session == old_session_id and t.tenant == caller.tenant
                   for t in self.scheduler.tasks.values()):
            raise NotFound(f"delegations_from: session {old_session_id!r} delegated no task "
                           "of this tenant")

    async def adopt(self, caller: Caller, session, old_session_id: str) -> list[str]:
        """Move the old session's tasks to `session` and tell it what it is owed."""
        moved = [t for t in self.scheduler.tasks.values()
                 if t.parent_session == old_session_id and t.tenant == caller.tenant]
        for task in moved:
            task.parent_session = session.id
            self._told.pop(task.id, None)
        if moved:
            await self.scheduler.store.update(moved[-1], [("task.adopted", {
                "tenant": caller.tenant, "peer": caller.peer, "session_id": session.id,
                "detail": {"from_session": old_session_id,
                           "task_ids": [t.id for t in moved]}})])
            for task in moved[:-1]:
                await self.scheduler.store.update(task)
        for task in moved:
            self.on_task(task)
        return [t.id for t in moved]

    # -- plumbing ----------------------------------------------------------------------------

    def _send(self, session, kind: int, fields: dict) -> bool:
        """A control frame to the session's agent; False when it cannot take it."""
        payload = json.dumps(fields, separators=(",", ":")).encode()
        try:
            session.control.send_frame(kind, payload)
        except (ControlClosed, ControlQueueFull) as exc:
            log.info("session %s: a task frame was not sent: %s", session.id, exc)
            return False
        return True

    @staticmethod
    def _note(session, note: TaskNote) -> None:
        """Put the news in the session's task log, after the stream's newest entry; not
        news the log holds already (a restarted daemon telling again what the session's
        notes kept: the task's end, or the same update as the task's last)."""
        if not _logged_already(session.turns.task_log, note):
            session.turns.tell(dataclasses.replace(note, seq=session.hub.stream.next_seq))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("a delegation step failed", exc_info=t.exception())

        task.add_done_callback(done)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def _logged_already(task_log, note: TaskNote) -> bool:
    """Whether task_log ((n, TaskNote) pairs, oldest first) holds `note` already: for an
    end, any end of the task; for an update, the task's newest note, if it is the same
    update (state, progress, attempt)."""
    if note.event == "done":
        return any(n.event == "done" and n.task_id == note.task_id for _, n in task_log)
    if note.event != "update":
        return False
    for _, logged in reversed(task_log):
        if logged.task_id == note.task_id:
            return (logged.event == "update" and logged.state == note.state
                    and logged.progress_json == note.progress_json
                    and logged.attempt == note.attempt)
    return False


async def _fault_after_done_sent(sandboxes, session, task: DeepTask) -> None:
    """Tests only: with DELIVERY_FAULT_ENV set to "after_done_sent", the daemon SIGKILLs
    itself once the agent has taken a TASK_DONE (its helper's marker is in the workspace,
    looked for up to 10 s) and before `delivered` is stored: the window in which a crash
    makes the restarted daemon tell the task's end again. Never set outside tests."""
    if os.environ.get(DELIVERY_FAULT_ENV) != "after_done_sent":
        return
    workspace = sandboxes.get(Caller(session.tenant, "daemon"), session.sandbox_id).workspace
    marker = f"{protocol.TASKS_TOLD_DIR.removeprefix('/workspace/')}/{task.id}"
    for _ in range(1000):
        with contextlib.suppress(CorralError):
            workspace.read(marker, 1)
            break
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def _result_files(root: str) -> list[tuple[str, bytes]]:
    """The regular files under a task's out/ directory (relative path, bytes), links and
    special files left out, within MAX_RESULT_ENTRIES and MAX_RESULT_BYTES."""
    out: list[tuple[str, bytes]] = []
    total = 0
    for top, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(top, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or total + st.st_size > MAX_RESULT_BYTES:
                    continue
                data = f.read()
            total += len(data)
            out.append((os.path.relpath(path, root), data))
            if len(out) >= MAX_RESULT_ENTRIES:
                return out
    return out
