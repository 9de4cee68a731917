"""The deep-task scheduler: admission, queues, placement, attempts, recovery.

Domain layer (asyncio, no gRPC types). Every task lives in memory (``self.tasks``) and in the
TaskStore; a state change is made in memory, checked against the transition table, and
written through the store's group commit; whatever depends on it (a launch, an answer to
the caller) waits for that commit.

Order of placement: priority first (higher first); within one priority the tenant holding
the fewest placed or running tasks goes next (ties: the one served longest ago), and
within a tenant submissions are first-in first-out. A task that fits nowhere right now does
not block the ones behind it (the next few of that tenant are tried, then other tenants).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections import deque

from corral.ext.agent import MAX_CONTROL_PAYLOAD
from corral.sandbox.errors import FailedPrecondition, InvalidSpec, NotFound, Unavailable
from corral.sandbox.spec import SandboxSpec

from ..auth import check_owner
from ..labels import EVERYTHING, Selector
from ..metrics import NO_METRICS
from ..policy import PolicyBook, TenantPolicy
from . import states
from .files import TaskFiles
from .model import DeepTask, RequestIdReused, TaskSpec, check_request_id
from .nodes import Node, NodeConfig, NodeRegistry, node_local_fields
from .retention import TaskRetention
from .runner import AttemptPlan
from .states import TaskState
from .store import TaskStore, check_complete

log = logging.getLogger("corral.tasks")

#: How many queued tasks of one tenant a pass tries before moving on to the next tenant.
SCAN_PER_TENANT = 32
HEARTBEAT_S = 5.0
#: A change of progress alone reaches the task store at most this often per task (the
#: latest wins). Watchers hear each at once, from memory. After a crash the attempt's own
#: progress.json, read back when the daemon re-attaches or settles the attempt, is at least
#: as new as the row; a checkpoint, a result or a state change is stored at once, and with
#: it the progress of the moment.
PROGRESS_STORE_INTERVAL_S = 1.0


def sandbox_limits(spec: TaskSpec, cpu_weight: int | None = None) -> SandboxSpec:
    """The attempt's SandboxSpec: what the task holds is what its cgroup allows
    (resources cpu -> CPU quota in cores, memory -> memory limit in bytes), at cpu_weight
    (the daemon's task_cpu_weight) unless the task's sandbox names its own, as batch work
    (its cgroup in corral-batch/, whose weight bounds all tasks together)."""
    held: dict = {"batch": True}
    if cpu_weight is not None and spec.sandbox.cpu_weight is None:
        held["cpu_weight"] = cpu_weight
    if "cpu" in spec.resources:
        held["cpus"] = float(spec.resources["cpu"])
    if "memory" in spec.resources:
        held["memory_bytes"] = max(8 << 20, int(spec.resources["memory"]))
    if spec.image:  # the node pulls it (runner.py) before the sandbox starts on it
        held["image"] = spec.image
    return dataclasses.replace(spec.sandbox, **held)


class Scheduler:
    """Tasks and nodes of one daemon."""

    metrics = NO_METRICS  # the daemon's DaemonMetrics when --metrics is on

    def __init__(self, state_dir: str, audit, node_configs: list[NodeConfig], *,
                 executors: dict | None = None, policies: PolicyBook | None = None,
                 retention_s: float = 0.0, cpu_weight: int | None = None):
        self.state_dir = state_dir
        #: Tasks' sandboxes' CPU weight unless their spec names one (task_cpu_weight).
        self.cpu_weight = cpu_weight
        #: Each tenant's operator policy: task limits, priority cap, task quotas.
        self.policies = policies or PolicyBook(TenantPolicy.tenant_default(), {})
        self.tasks_root = os.path.join(state_dir, "tasks")
        self.audit = audit
        self.store = TaskStore(os.path.join(state_dir, "tasks.db"), audit)
        self.nodes = NodeRegistry()
        for cfg in node_configs:
            self.nodes.add(Node.from_config(cfg))
        self.executors = executors or {}
        self.tasks: dict[str, DeepTask] = {}
        # priority -> tenant -> FIFO of waiting task ids
        self._queues: dict[int, dict[str, deque]] = {}
        self._active: dict[str, int] = {}  # tenant -> placed + running tasks
        self._served: dict[str, int] = {}  # tenant -> placement counter when last served
        self._served_n = 0
        self._seq = 0
        # (tenant, request_id) -> its task, for as long as the task is kept (idempotent
        # Submit); tasks admitted whose commit no admitted() has seen yet, with that commit
        self._requests: dict[tuple[str, str], DeepTask] = {}
        self._fresh: dict[str, asyncio.Future] = {}
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        #: Called with each task that changed (state, progress, result), synchronously:
        #: the delegations of sessions (delegation.py) follow their tasks here.
        self.listeners: list = []
        self._kick_pending = False
        self._heartbeat: asyncio.Task | None = None
        #: Removes finished tasks and lost attempts' workspaces after retention_s (0: never).
        self.retention = TaskRetention(self, retention_s)
        self._closing = False
        #: task id -> the timer that stores its latest progress (_store_progress_later)
        self._progress_due: dict[str, asyncio.TimerHandle] = {}
        #: Called with "task" before one is admitted: raises ResourceExhausted when the
        #: daemon cannot afford it (state disk full: runtime/resources.py).
        self.admission = lambda kind: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.placements = 0
        self.placement_ns = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.makedirs(self.tasks_root, mode=0o700, exist_ok=True)
        tasks, flags = self.store.load()  # TaskStoreDamaged: refuse, naming the recovery
        check_complete(self.store, tasks, self.tasks_root, self.audit)  # TaskStoreMissing
        self.store.start(self._loop)
        for name, (cordoned, draining) in flags.items():
            if name in self.nodes.nodes:
                node = self.nodes.nodes[name]
                node.cordoned, node.draining = cordoned, draining
        for ex in self.executors.values():
            await ex.start(self)
        for task in tasks:
            self.tasks[task.id] = task
            self._seq = max(self._seq, task.seq)
            if task.request_id:
                self._requests[(task.tenant, task.request_id)] = task
        for task in tasks:
            if task.state in states.WAITING:
                self._enqueue(task)
            elif task.state in states.ACTIVE:
                await self._recover(task)
        self._heartbeat = self._loop.create_task(self._beat())
        self.retention.start()
        self.kick()

    async def _recover(self, task: DeepTask) -> None:
        """A task that was placed or running when the last daemon ended."""
        node = self.nodes.nodes.get(task.node)
        executor = self.executors.get(node.executor) if node else None
        if node is not None:
            self.nodes.reserve_exact(node, task.id, task.spec.resources, task.devices)
            self._active[task.tenant] = self._active.get(task.tenant, 0) + 1
        attached = executor is not None and await executor.recover(task)
        if attached:
            self.audit.append("task.reattached", tenant=task.tenant, peer="daemon",
                              detail={"task_id": task.id, "node": task.node,
                                      "attempt": task.attempt})
            return
        if executor is not None:  # what the attempt persisted while no daemon watched
            left = executor.leftovers(task)
            if left:
                await self.on_update(task.id, task.attempt, **left)
        outcome = executor.final_outcome(task) if executor is not None else None
        before_start = task.state in (TaskState.PLACED, TaskState.PULLING)
        if outcome is not None:  # it ended while no daemon was watching
            if task.state == TaskState.PLACED or (before_start
                                                  and not _ended_before_start(outcome)):
                await self._move(task, TaskState.RUNNING, task.reason)
            await self._finish_attempt(task, outcome)
        elif before_start and not (executor and executor.started(task)):
            self._release(task)
            task.attempt -= 1  # that attempt never ran
            await self._move(task, TaskState.QUEUED, "placement undone: the daemon restarted "
                                                     "before the attempt started")
            self._enqueue(task)
        else:
            if before_start:
                await self._move(task, TaskState.RUNNING, task.reason)
            await self._finish_attempt(task, {"outcome": "lost", "returncode": -1,
                                              "reason": "its runner is gone (daemon restart "
                                                        "or node loss)"})

    async def stop(self) -> None:
        """Stop placing; running attempts keep running (a restarted daemon re-attaches)."""
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.retention.stop()
        for ex in self.executors.values():
            with contextlib.suppress(Exception):
                await ex.stop()
        for queues in self._watchers.values():
            for q in queues:
                q.put_nowait(None)
        self._flush_progress()  # queued before the close, so written by it
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)

    async def _beat(self) -> None:
        while True:
            now = time.time()
            for node in self.nodes.nodes.values():
                ex = self.executors.get(node.executor)
                if ex is not None and ex.node_alive(node):
                    node.heartbeat_at = now
            await asyncio.sleep(HEARTBEAT_S)

    # -- requests ----------------------------------------------------------------------------

    async def submit(self, caller, spec: TaskSpec, request_id: str = "", *,
                     parent_session: str = "", parent_ref: str = "",
                     link_detail: dict | None = None) -> DeepTask:
        """Admit a task; returns once it is committed (and queued)."""
        task, committed = self.admit(caller, spec, request_id, parent_session=parent_session,
                                     parent_ref=parent_ref, link_detail=link_detail)
        await self.admitted(task, committed)
        return task

    def admit(self, caller, spec: TaskSpec, request_id: str = "", *, parent_session: str = "",
              parent_ref: str = "", link_detail: dict | None = None,
              ) -> tuple[DeepTask, asyncio.Future]:
        """First half of submit, without waiting: check, record, queue the row's write.

        A request_id this tenant already used returns that task (and its commit) instead.
        parent_session (checked by the caller: the tenant's own) links it to a session,
        parent_ref is that session's agent's name for it; the link is audited with the
        row's commit (task.delegate when an agent delegated it, else task.link), with
        link_detail added (its "sandbox_id", the session's sandbox, as the record's own).

        Raises:
            Unavailable, InvalidSpec, Unsatisfiable: refused; nothing was written.
            RequestIdReused: the request_id made a task with another spec.
        """
        if self._closing:
            raise Unavailable("the daemon is shutting down")
        spec = self._held_resources(spec)
        if request_id:
            replayed = self._replayed(caller, spec, request_id)
            if replayed is not None:
                return replayed
        self.admission("task")
        self._check_policy(caller, spec)
        self.nodes.check_satisfiable(spec)
        self._seq += 1
        now = time.time()
        task = DeepTask(id="task-" + secrets.token_hex(8), seq=self._seq, tenant=caller.tenant,
                        spec=spec, submitted_at=now, updated_at=now, request_id=request_id,
                        parent_session=parent_session, parent_ref=parent_ref)
        self.tasks[task.id] = task
        audit = [("task.submit", {"tenant": caller.tenant, "peer": caller.peer,
                                  "task_id": task.id})]
        if parent_session:
            detail = {"task_id": task.id, "ref": parent_ref, **(link_detail or {})}
            audit.append(("task.delegate" if parent_ref else "task.link", {
                "tenant": caller.tenant, "peer": caller.peer, "session_id": parent_session,
                "sandbox_id": detail.pop("sandbox_id", ""), "detail": detail}))
        committed = self.store.insert(task, audit)
        self._fresh[task.id] = committed
        if request_id:
            self._requests[(task.tenant, request_id)] = task
        return task, committed

    def _replayed(self, caller, spec: TaskSpec,
                  request_id: str) -> tuple[DeepTask, asyncio.Future] | None:
        """The task a repeated request_id made, with its commit (done unless still under
        way); None for a new request_id."""
        task = self._requests.get((caller.tenant, check_request_id(request_id)))
        if task is None:
            return None
        if task.spec != spec:
            raise RequestIdReused(
                f"request_id {request_id!r} already made task {task.id} with a different "
                "spec; a new task needs a new request_id")
        committed = self._fresh.get(task.id)
        if committed is None:
            committed = self._loop.create_future()
            committed.set_result(None)
        return task, committed

    def _held_resources(self, spec: TaskSpec) -> TaskSpec:
        """The spec with the cpu and memory it holds named, when the nodes count them.

        A task that names no cpu still takes a core (its sandbox's CPU quota, 1 by default)
        and the memory its sandbox may use: otherwise any number of "no resources" tasks
        would run at once, outside placement accounting.
        """
        known = self.nodes.resource_names
        extra: dict[str, float] = {}
        if "cpu" in known and "cpu" not in spec.resources:
            extra["cpu"] = float(spec.sandbox.cpus or 1.0)
        if "memory" in known and "memory" not in spec.resources:
            extra["memory"] = float(spec.sandbox.memory_bytes)
        if not extra:
            return spec
        return dataclasses.replace(spec, resources={**spec.resources, **extra})

    def _check_policy(self, caller, spec: TaskSpec) -> None:
        """The tenant's policy: sandbox limits, priority, tasks not yet finished.

        Raises:
            PolicyDenied, QuotaExceeded: refused; nothing was written.
        """
        rules = self.policies.of(caller)
        rules.check_priority(spec.priority)
        rules.check_sandbox(sandbox_limits(spec), "spec.sandbox")
        open_tasks = sum(1 for t in self.tasks.values()
                         if t.tenant == caller.tenant and not t.terminal)
        rules.check_count("unfinished tasks", open_tasks, "max_queued_tasks")

    def _may_start(self, tenant: str) -> bool:
        """Whether the tenant is under its max_running_tasks quota."""
        limit = self.policies.of_tenant(tenant).max_running_tasks
        return limit is None or self._active.get(tenant, 0) < limit

    async def admitted(self, task: DeepTask, committed: asyncio.Future) -> None:
        """Second half: wait for the commit, then make the task placeable. The first call
        for a task after its commit queues it (or, when the commit failed, forgets it); a
        repeated request's call finds that done."""
        try:
            await committed
        except BaseException:
            if self._fresh.pop(task.id, None) is not None:
                self.tasks.pop(task.id, None)
                if task.request_id:
                    self._requests.pop((task.tenant, task.request_id), None)
            raise
        if self._fresh.pop(task.id, None) is not None:
            self._enqueue(task)
            self.kick()

    def forget(self, task: DeepTask) -> None:
        """Drop a finished task whose row and directory are gone (retention): its request
        id is free again, and its Watch streams end."""
        self.tasks.pop(task.id, None)
        if task.request_id:
            self._requests.pop((task.tenant, task.request_id), None)
        for q in self._watchers.pop(task.id, ()):
            q.put_nowait(None)

    def get(self, caller, task_id: str) -> DeepTask:
        task = self.tasks.get(task_id)
        missing = f"task {task_id!r} does not exist"
        if task is None:
            raise NotFound(missing)
        if not caller.operator:  # another tenant's: NOT_FOUND as for an unknown id, audited
            check_owner(caller, task.tenant, "task", task_id, missing)
        return task

    def list(self, caller, state: TaskState | None = None, limit: int = 1000,
             selector: Selector = EVERYTHING, before_seq: int = 0,
             parent_session: str = "") -> list[DeepTask]:
        """The caller's tasks (an operator's: everyone's), newest first; with before_seq,
        only those submitted before that one (the next page); with parent_session, only
        those linked to that session."""
        out = []
        for task in reversed(self.tasks.values()):
            if before_seq and task.seq >= before_seq:
                continue
            if parent_session and task.parent_session != parent_session:
                continue
            if (task.tenant == caller.tenant or caller.operator) and (
                    state is None or task.state == state) and selector.matches(task.spec.labels):
                out.append(task)
                if len(out) >= limit:
                    break
        return out

    async def cancel(self, caller, task_id: str) -> DeepTask:
        task = self.get(caller, task_id)
        await self.audit.record("task.cancel", tenant=caller.tenant, peer=caller.peer,
                                detail={"task_id": task.id, "state": task.state.name})
        if task.terminal:
            return task
        if task.state in states.WAITING:
            self._dequeue(task)
            task.finished_at = time.time()
            await self._move(task, TaskState.CANCELLED, f"cancelled by {caller.tenant}")
            return task
        task.cancel_requested = True
        self._executor_of(task).cancel(task)
        return task

    async def send_input(self, caller, task_id: str, text: str) -> DeepTask:
        """Steering text for a running task's agent (an INPUT frame on its control pipe).

        Raises:
            FailedPrecondition: the task is not running.
            InvalidSpec: the text is over the control payload limit.
        """
        task = self.get(caller, task_id)
        if task.state != TaskState.RUNNING:
            raise FailedPrecondition(f"task {task.id} is {task.state.name}, not RUNNING: only "
                                     "a running task takes input")
        if len(text.encode()) > MAX_CONTROL_PAYLOAD:
            raise InvalidSpec("text", f"is over the {MAX_CONTROL_PAYLOAD}-byte input limit")
        await self._executor_of(task).send_input(task, text)
        await self.audit.record("task.input", tenant=caller.tenant, peer=caller.peer,
                                detail={"task_id": task.id, "attempt": task.attempt,
                                        "bytes": len(text.encode())})
        return task

    def result_dir(self, task: DeepTask) -> str:
        return TaskFiles(self.tasks_root, task.id).out

    def attempt_log(self, task: DeepTask) -> str:
        return os.path.join(TaskFiles(self.tasks_root, task.id).attempt_dir(task.attempt), "log")

    # -- nodes -------------------------------------------------------------------------------

    async def cordon(self, caller, name: str, on: bool) -> Node:
        node = self.nodes.get(name)
        node.cordoned = on
        if not on:
            node.draining = False
        await self.store.set_node_flags(name, node.cordoned, node.draining, [(
            "node.cordon" if on else "node.uncordon",
            {"tenant": caller.tenant, "peer": caller.peer, "detail": {"node": name}})])
        self.kick()
        return node

    async def drain(self, caller, name: str) -> Node:
        """Cordon the node and send its tasks back to the queue (they resume elsewhere)."""
        node = self.nodes.get(name)
        node.cordoned = node.draining = True
        await self.store.set_node_flags(name, True, True, [(
            "node.drain", {"tenant": caller.tenant, "peer": caller.peer,
                           "detail": {"node": name, "tasks": sorted(node.tasks)}})])
        for task_id in list(node.tasks):
            task = self.tasks[task_id]
            task.drain_requested = True
            self._executor_of(task).cancel(task)
        return node

    def node_lost(self, name: str, reason: str) -> None:
        """An executor reports that a node is gone; its attempts end as lost."""
        node = self.nodes.nodes.get(name)
        if node is None or node.lost:
            return
        node.lost = True
        self.audit.append("node.lost", tenant="", peer="daemon",
                          detail={"node": name, "reason": reason, "tasks": sorted(node.tasks)})

    def node_back(self, name: str) -> None:
        """A lost node answers again (its Ray node rejoined): it gets work again."""
        node = self.nodes.nodes.get(name)
        if node is None or not node.lost:
            return
        node.lost = False
        node.heartbeat_at = time.time()
        self.audit.append("node.back", tenant="", peer="daemon", detail={"node": name})
        self.kick()

    # -- queues and placement ---------------------------------------------------------------

    def _enqueue(self, task: DeepTask) -> None:
        self._queues.setdefault(task.spec.priority, {}).setdefault(task.tenant, deque()).append(
            task.id)
        self.metrics.task_queued(task.id)

    def _dequeue(self, task: DeepTask) -> None:
        q = self._queues.get(task.spec.priority, {}).get(task.tenant)
        if q is not None:
            with contextlib.suppress(ValueError):
                q.remove(task.id)
        self.metrics.task_unqueued(task.id)

    def kick(self) -> None:
        """Run a placement pass soon (coalesced: many kicks, one pass)."""
        if not self._kick_pending and self._loop is not None and not self._closing:
            self._kick_pending = True
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        self._kick_pending = False
        if self._closing:
            return
        for priority in sorted(self._queues, reverse=True):
            tenants = self._queues[priority]
            while True:
                order = sorted((t for t, q in tenants.items() if q and self._may_start(t)),
                               key=lambda t: (self._active.get(t, 0), self._served.get(t, 0)))
                if not order:
                    break
                placed = False
                for tenant in order:
                    if self._place_one(tenants[tenant]):
                        placed = True
                        break
                if not placed:
                    break
            for tenant in [t for t, q in tenants.items() if not q]:
                del tenants[tenant]

    def _place_one(self, queue: deque) -> bool:
        for i, task_id in enumerate(queue):
            if i >= SCAN_PER_TENANT:
                return False
            task = self.tasks[task_id]
            t0 = time.perf_counter_ns()
            node = self.nodes.place(task.spec.selector, task.spec.resources,
                                    bool(node_local_fields(task.spec.sandbox)))
            self.placement_ns += time.perf_counter_ns() - t0
            if node is None:
                continue
            del queue[i]
            self._assign(task, node)
            return True
        return False

    def _assign(self, task: DeepTask, node: Node) -> None:
        self.placements += 1
        self.metrics.task_placed(task.id)
        devices = self.nodes.reserve(node, task.id, task.spec.resources)
        self._active[task.tenant] = self._active.get(task.tenant, 0) + 1
        self._served_n += 1
        self._served[task.tenant] = self._served_n
        task.node = node.name
        task.devices = devices
        task.attempt += 1
        task.started_at = 0.0
        task.progress_json = ""
        task.cancel_requested = False
        self._loop.create_task(self._launch(task, node))

    async def _launch(self, task: DeepTask, node: Node) -> None:
        attempt = task.attempt
        await self._move(task, TaskState.PLACED, f"placed on {node.name}", audit=[(
            "task.placed", {"tenant": task.tenant, "peer": "scheduler", "detail": {
                "task_id": task.id, "node": node.name, "attempt": attempt,
                "priority": task.spec.priority, "selector": task.spec.selector,
                "resources": task.spec.resources, "devices": list(task.devices),
                "checkpoint_seq": task.checkpoint_seq}})])
        if task.attempt != attempt:
            return
        if task.cancel_requested:  # cancelled while the placement was being committed
            await self._finish_attempt(task, {"outcome": "cancelled", "returncode": 0,
                                              "reason": "cancelled before it started"})
            return
        plan = AttemptPlan(
            task_id=task.id, attempt=attempt, argv=list(task.spec.argv),
            sandbox=sandbox_limits(task.spec, self.cpu_weight),
            files={k: v.decode("latin-1") for k, v in task.spec.files.items()},
            devices=list(task.devices),
            deadline=(time.time() + task.spec.max_runtime_s) if task.spec.max_runtime_s else 0.0,
            tasks_root=self.tasks_root)
        if self._closing:  # left PLACED: the next daemon puts it back in the queue
            return
        try:
            await self.executors[node.executor].launch(task, node, plan)
        except Exception as exc:  # noqa: BLE001 - the attempt fails, the daemon goes on
            if self._closing:
                return
            log.exception("launching %s on %s failed", task.id, node.name)
            await self.on_exit(task.id, attempt, {"outcome": "error", "returncode": -1,
                                                  "reason": f"launch failed: {exc}"})

    def _executor_of(self, task: DeepTask):
        return self.executors[self.nodes.nodes[task.node].executor]

    def _release(self, task: DeepTask) -> None:
        if task.node:
            self.nodes.release(task.node, task.id, task.spec.resources, task.devices)
            self._active[task.tenant] = max(0, self._active.get(task.tenant, 0) - 1)
        self.kick()

    # -- state changes -----------------------------------------------------------------------

    async def _move(self, task: DeepTask, to: TaskState, reason: str, audit=None) -> None:
        """Change a task's state, store it, then tell watchers and listeners: a state is
        reported only once it is stored (a session told RUNNING or SUCCEEDED before a
        crash finds the same after the restart)."""
        states.check(task.state, to)
        task.state = to
        task.reason = reason
        task.updated_at = time.time()
        await self.store.update(task, audit)
        self._notify(task)

    def _notify(self, task: DeepTask, log_bytes: bool = False) -> None:
        for q in self._watchers.get(task.id, ()):
            if q.qsize() < 2:  # a pending wake-up is enough: watchers read the latest state
                q.put_nowait(task.id)
        for listener in self.listeners:
            try:
                listener(task)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop a task
                log.exception("a task listener failed on %s", task.id)

    def subscribe(self, task_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.setdefault(task_id, set()).add(q)
        return q

    def unsubscribe(self, task_id: str, q: asyncio.Queue) -> None:
        subs = self._watchers.get(task_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._watchers[task_id]

    # -- executor callbacks ------------------------------------------------------------------

    def _current(self, task_id: str, attempt: int) -> DeepTask | None:
        task = self.tasks.get(task_id)
        if task is None or task.attempt != attempt or task.terminal:
            return None
        return task

    async def on_pulling(self, task_id: str, attempt: int, image: str) -> None:
        """The attempt's node began pulling the task's image (PLACED -> PULLING)."""
        task = self._current(task_id, attempt)
        if task is None or task.state != TaskState.PLACED:
            return
        await self._move(task, TaskState.PULLING, f"pulling {image} on {task.node}", audit=[(
            "task.pulling", {"tenant": task.tenant, "peer": "scheduler", "detail": {
                "task_id": task.id, "node": task.node, "attempt": attempt,
                "image": image}})])

    async def on_started(self, task_id: str, attempt: int, started_at: float,
                         runner: dict) -> None:
        task = self._current(task_id, attempt)
        if task is None or task.state not in (TaskState.PLACED, TaskState.PULLING):
            return
        task.started_at = started_at
        task.runner_json = json.dumps(runner)
        await self._move(task, TaskState.RUNNING, f"running on {task.node}", audit=[(
            "task.start", {"tenant": task.tenant, "peer": "scheduler",
                           "sandbox_id": runner.get("sandbox_id", ""),
                           "detail": {"task_id": task.id, "node": task.node,
                                      "attempt": attempt, "checkpoint_seq": task.checkpoint_seq,
                                      "runner": runner}})])

    async def on_update(self, task_id: str, attempt: int, *, progress_json: str | None = None,
                        checkpoint_seq: int | None = None,
                        result_json: str | None = None) -> None:
        task = self._current(task_id, attempt)
        if task is None:
            return
        changed = False
        if progress_json is not None and progress_json != task.progress_json:
            task.progress_json, changed = progress_json, True
        if checkpoint_seq is not None and checkpoint_seq != task.checkpoint_seq:
            task.checkpoint_seq, changed = checkpoint_seq, True
        if result_json is not None and result_json != task.result_json:
            task.result_json, changed = result_json, True
        if changed:
            task.updated_at = time.time()
            self._notify(task)
            if checkpoint_seq is None and result_json is None:
                self._store_progress_later(task.id)
            else:
                await self.store.update(task)

    def _store_progress_later(self, task_id: str) -> None:
        """Store the task's row within PROGRESS_STORE_INTERVAL_S (one write however many
        progress reports come meanwhile)."""
        if task_id not in self._progress_due and self._loop is not None and not self._closing:
            self._progress_due[task_id] = self._loop.call_later(
                PROGRESS_STORE_INTERVAL_S, self._store_progress, task_id)

    def _store_progress(self, task_id: str) -> None:
        self._progress_due.pop(task_id, None)
        task = self.tasks.get(task_id)
        if task is not None:
            written = self.store.update(task)
            if written is not None:
                written.add_done_callback(_log_store_failure)

    def _flush_progress(self) -> None:
        """Store every progress still waiting for its interval (the daemon is stopping)."""
        for task_id, timer in list(self._progress_due.items()):
            timer.cancel()
            self._store_progress(task_id)

    def on_log(self, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is not None:
            self._notify(task)

    async def on_exit(self, task_id: str, attempt: int, outcome: dict) -> None:
        task = self._current(task_id, attempt)
        if task is None:
            return
        if task.state in (TaskState.PLACED, TaskState.PULLING):
            if _ended_before_start(outcome) or task.cancel_requested:
                pass  # never started: PLACED (or PULLING) moves straight on
            else:
                await self._move(task, TaskState.RUNNING, task.reason)
        await self._finish_attempt(task, outcome)

    async def _finish_attempt(self, task: DeepTask, outcome: dict) -> None:
        kind = outcome.get("outcome", "error")
        task.exit_code = int(outcome.get("returncode", -1))
        reason = outcome.get("reason", kind)
        self._release(task)
        drained = task.drain_requested
        task.drain_requested = False
        detail = {"task_id": task.id, "node": task.node, "attempt": task.attempt,
                  "outcome": kind, "returncode": task.exit_code, "reason": reason}
        if task.cancel_requested or (kind == "cancelled" and not drained):
            to, why = TaskState.CANCELLED, "cancelled"
        elif kind == "succeeded":
            to, why = TaskState.SUCCEEDED, reason
        elif drained:
            to, why = TaskState.RETRYING, f"node {task.node} drained"
        elif kind == "timeout":
            to, why = TaskState.FAILED, f"max runtime of {task.spec.max_runtime_s:g}s reached"
        elif kind == "pull_failed" and not outcome.get("retryable"):
            to, why = TaskState.FAILED, reason  # the same image fails the same way again
        elif kind == "refused":
            to, why = TaskState.FAILED, reason  # its node cannot honour its spec (no retry)
        else:
            task.failures += 1
            if task.failures <= task.spec.retries:
                to, why = TaskState.RETRYING, f"attempt {task.attempt} {reason}; retrying"
            else:
                to, why = TaskState.FAILED, reason
        if to in states.TERMINAL:
            task.finished_at = time.time()
            task.exit_reason = ("cancelled" if to == TaskState.CANCELLED
                                else outcome.get("exit_reason", ""))
        if task.state in (TaskState.PLACED, TaskState.PULLING) and to == TaskState.SUCCEEDED:
            await self._move(task, TaskState.RUNNING, task.reason)
        await self._move(task, to, why, audit=[(
            "task." + to.name.lower(), {"tenant": task.tenant, "peer": "scheduler",
                                        "detail": detail})])
        if to == TaskState.RETRYING:
            self._enqueue(task)
            self.kick()


def _log_store_failure(future: asyncio.Future) -> None:
    """A progress row that could not be written: logged (its file still has it)."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("storing a task's progress failed: %s", future.exception())


def _ended_before_start(outcome: dict) -> bool:
    """An exit record of an attempt whose command never ran (its task skips RUNNING)."""
    return outcome.get("outcome") in ("error", "lost", "pull_failed", "refused")
