"""corral.v1.Tasks and corral.v1.Nodes servicers: proto <-> Scheduler calls, nothing else."""

from __future__ import annotations

import asyncio
import codecs
import os
import stat
from dataclasses import dataclass, field

from corral.sandbox import SandboxSpec, fstree
from corral.sandbox.errors import CorralError, InvalidSpec, NotFinished, PermissionDenied
from corral.v1 import stream_pb2
from corral.v1 import task_pb2 as pb

from ..labels import Selector, check_state, page_token, parse_page_token
from ..tasks.model import TaskSpec
from ..tasks.ray_executor import node_local_fields
from ..tasks.runner import locate_secrets
from ..tasks.states import TaskState
from . import wire
from .bounds import SUBMIT_PENDING_ACKS, bounded_message
from .exits import exit_fields
from .sandboxes import spec_from_proto as sandbox_spec_from_proto
from .sandboxes import spec_to_proto as sandbox_spec_to_proto
from .servicer import Servicer, relay, streaming, unary

#: File bytes of one Result answer when the request names none: the answer then fits the
#: 4 MiB a gRPC client receives by default. A larger max_bytes is capped by the message
#: limit (16 MiB) instead.
DEFAULT_RESULT_BYTES = 2 << 20
#: Path bytes (with PIECE_OVERHEAD each) and pieces one Result answer carries at most.
RESULT_META_BYTES = 1 << 20
RESULT_PIECES = 10_000
PIECE_OVERHEAD = 32
#: A hole of a sparse file shorter than this is sent as zeros, not as a new piece.
MIN_HOLE_BYTES = 1 << 20
#: Result answers being read at once (each holds up to a message's worth of file bytes).
RESULT_READS = 4
LOG_CHUNK = 64 << 10


#: The SandboxSpec of a request that names none (the common case), validated once.
_DEFAULT_SANDBOX: SandboxSpec | None = None


def spec_from_proto(msg: pb.TaskSpec, snapshot_id: str = "") -> TaskSpec:
    """A validated TaskSpec; errors name the request field (spec.priority, ...).
    msg.sandbox.snapshot may be a name: the caller resolves it (the tenant's snapshots)
    and passes its id."""
    global _DEFAULT_SANDBOX
    if msg.HasField("sandbox") and msg.sandbox.ByteSize():
        sandbox = sandbox_spec_from_proto(msg.sandbox, snapshot_id)
    else:
        if _DEFAULT_SANDBOX is None:
            _DEFAULT_SANDBOX = sandbox_spec_from_proto(msg.sandbox)
        sandbox = _DEFAULT_SANDBOX
    return TaskSpec(argv=tuple(msg.argv), sandbox=sandbox, selector=dict(msg.selector),
                    resources=dict(msg.resources), priority=msg.priority, retries=msg.retries,
                    max_runtime_s=msg.max_runtime_s, files=dict(msg.files),
                    labels=dict(msg.labels), image=msg.image)


def _refuse_local_state_on_ray(nodes, spec: TaskSpec) -> None:
    """A task with secrets, a snapshot or a copy-on-write workspace runs on local nodes
    only: a Ray node's attempt runs in an actor that reaches neither the daemon's secret
    store nor its state directory (ray_executor.node_local_fields).

    Raises:
        InvalidSpec: on the first such field, naming them all and the Ray nodes its
            selector matches.
    """
    fields = node_local_fields(spec.sandbox)
    if not fields:
        return
    ray = sorted(n.name for n in nodes if n.executor == "ray"
                 and all(n.labels.get(k) == v for k, v in spec.selector.items()))
    if ray:
        raise InvalidSpec(fields[0], f"a Ray node cannot honour {', '.join(fields)} (local "
                                     f"nodes only); the selector {spec.selector or {}} "
                                     f"matches the Ray nodes {', '.join(ray)}: select "
                                     f"local nodes by their labels")


def spec_to_proto(spec: TaskSpec) -> pb.TaskSpec:
    return pb.TaskSpec(
        argv=list(spec.argv), selector=spec.selector, resources=spec.resources,
        priority=spec.priority, retries=spec.retries, max_runtime_s=spec.max_runtime_s,
        labels=spec.labels, sandbox=sandbox_spec_to_proto(spec.sandbox, ttl_s=0),
        image=spec.image)


def task_to_proto(task) -> pb.Task:
    return pb.Task(
        id=task.id, tenant=task.tenant, spec=spec_to_proto(task.spec), state=int(task.state),
        node=task.node, attempt=task.attempt, submitted_at=task.submitted_at,
        updated_at=task.updated_at, progress_json=task.progress_json, reason=task.reason,
        result_json=task.result_json, checkpoint_seq=task.checkpoint_seq,
        started_at=task.started_at, finished_at=task.finished_at, exit_code=task.exit_code,
        devices=list(task.devices), request_id=task.request_id,
        parent_session=task.parent_session,
        **(exit_fields(task.exit_code, task.exit_reason) if task.finished_at else {}))


def node_to_proto(node, tasks=None) -> pb.Node:
    """The node as the API shows it; tasks: the ids to list (default: all it holds)."""
    return pb.Node(name=node.name, labels=node.labels, capacity=node.capacity,
                   free={k: round(v, 9) for k, v in node.free.items()},
                   cordoned=node.cordoned, heartbeat_at=node.heartbeat_at,
                   draining=node.draining, executor=node.executor,
                   tasks=sorted(node.tasks if tasks is None else tasks), lost=node.lost)


class TasksServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.scheduler = daemon.scheduler
        self._result_reads = asyncio.Semaphore(RESULT_READS)

    def _parent(self, caller, request) -> str:
        """The request's parent_session, once it is known to be a session of the caller's
        tenant (another tenant's is NOT_FOUND, like an unknown id, and audited)."""
        if request.parent_session:
            self.daemon.sessions.get(caller, request.parent_session)
        return request.parent_session

    async def _spec(self, caller, msg: pb.TaskSpec) -> TaskSpec:
        """The request's TaskSpec, its snapshot named by id, its secrets checked.

        Raises:
            NotFound: no such snapshot of the caller's, or no such secret in its store.
            InvalidSpec: secrets, a snapshot or a workspace on a task that a Ray node
                could run (the field).
        """
        snapshot_id = ""
        if msg.sandbox.snapshot:  # an id or a name, of the caller's snapshots only
            snapshot_id = (await self.daemon.sandboxes.run_blocking(
                self.daemon.state.get, caller, msg.sandbox.snapshot)).id
        spec = spec_from_proto(msg, snapshot_id)
        _refuse_local_state_on_ray(self.scheduler.nodes.nodes.values(), spec)
        if spec.sandbox.secrets:
            await self.daemon.sandboxes.run_blocking(  # each name is in the tenant's store
                locate_secrets, self.daemon.sandboxes.secrets, caller.tenant,
                spec.sandbox.secrets)
        return spec

    @unary
    async def Submit(self, request, context):
        caller = self.caller(context)
        task = await self.scheduler.submit(caller, await self._spec(caller, request.spec),
                                           request.request_id,
                                           parent_session=self._parent(caller, request))
        self.scheduler.snapshot_holds.sync(task)  # held from now until the task ends
        # The answer echoes the request's spec (no need to rebuild it from the domain
        # object) with what the task holds: the cpu and memory it got by default.
        answer = pb.Task(id=task.id, tenant=task.tenant, spec=request.spec,
                         state=int(task.state), submitted_at=task.submitted_at,
                         updated_at=task.updated_at, node=task.node, attempt=task.attempt,
                         reason=task.reason, request_id=task.request_id,
                         parent_session=task.parent_session)
        answer.spec.resources.update(task.spec.resources)
        answer.spec.image = task.spec.image  # also when only spec.sandbox.image named it
        answer.spec.sandbox.snapshot = task.spec.sandbox.snapshot  # the id, not a name
        return answer

    @streaming
    async def SubmitStream(self, request_iterator, context):
        caller = self.caller(context)
        sched = self.scheduler
        # (task, commit future) or (None, (status, message)), in request order. Bounded: when the
        # client reads no acks, this stream stops reading its requests (back-pressure), so
        # it holds at most this many acks (a refusal's message is cut by bounded_message).
        pending: asyncio.Queue = asyncio.Queue(maxsize=SUBMIT_PENDING_ACKS)

        async def read() -> None:
            async for request in request_iterator:
                try:
                    item = sched.admit(caller, await self._spec(caller, request.spec),
                                       request.request_id,
                                       parent_session=self._parent(caller, request))
                except CorralError as exc:
                    # only the status and a bounded message wait: the exception would
                    # keep its traceback, and with it the refused request, alive
                    item = (None, (exc.grpc_status, bounded_message(str(exc))))
                await pending.put(item)
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            index = 0
            while True:
                item = await pending.get()
                if item is None:
                    break
                task, committed = item
                if task is None:
                    ack = pb.SubmitAck(index=index, error_code=committed[0],
                                       error=committed[1])
                else:
                    await sched.admitted(task, committed)
                    sched.snapshot_holds.sync(task)
                    ack = pb.SubmitAck(index=index, task_id=task.id)
                yield ack
                index += 1
            await reader
        finally:
            reader.cancel()

    Get = relay("scheduler.get", "task_id", answer=task_to_proto)

    @unary
    async def List(self, request, context):
        caller = self.caller(context)
        state = check_state(request.state, set(TaskState), "TaskState value")
        state = TaskState(state) if state else None
        selector = Selector.parse(request.selector)
        query = f"{request.selector}\0{request.state}\0{request.parent_session}"
        before = parse_page_token(request.page_token, "tasks", query)
        limit = request.limit or 1000
        tasks = self.scheduler.list(caller, state, limit=limit + 1, selector=selector,
                                    before_seq=before, parent_session=request.parent_session)
        more = len(tasks) > limit
        tasks = tasks[:limit]
        return pb.ListTasksResponse(
            tasks=[task_to_proto(t) for t in tasks],
            next_page_token=page_token("tasks", query, tasks[-1].seq) if more else "")

    Cancel = relay("scheduler.cancel", "task_id", answer=task_to_proto)

    @unary
    async def Result(self, request, context):
        task = self.scheduler.get(self.caller(context), request.task_id)
        if not task.terminal:
            raise NotFinished(f"task {task.id} is {task.state.name}; it has no result yet")
        if "\0" in request.path or request.path.startswith("/") or ".." in \
                request.path.split("/"):
            raise InvalidSpec("path", f"{request.path!r} is not a path relative to out/")
        head = pb.TaskResult(task=wire.fill_typed(task_to_proto(task)),
                             result_json=task.result_json).SerializeToString()
        budget = result_budget(request.max_bytes, len(head))
        async with self._result_reads:  # at most RESULT_READS answers being built at once
            return await asyncio.get_running_loop().run_in_executor(
                None, _encode_result, head, self.scheduler.result_dir(task), budget,
                request.path, request.offset)

    @streaming
    async def Watch(self, request, context):
        caller = self.caller(context)
        sched = self.scheduler
        task = sched.get(caller, request.task_id)
        wake = sched.subscribe(task.id)
        log_reader = _LogReader()
        try:
            last = None
            while True:
                # Read before the snapshot: the state may change while a yield waits, and
                # the stream must never end without having sent the terminal state.
                terminal = task.terminal
                snapshot = task_to_proto(task)
                key = snapshot.SerializeToString()
                if key != last:
                    last = key
                    yield pb.TaskUpdate(task=snapshot)
                for batch in log_reader.read(sched.attempt_log(task), task.attempt):
                    yield pb.TaskUpdate(log=batch)
                if terminal:
                    return
                try:
                    item = await asyncio.wait_for(wake.get(), timeout=1.0)
                except TimeoutError:
                    continue
                if item is None:  # the daemon is stopping
                    return
        finally:
            sched.unsubscribe(task.id, wake)


class _LogReader:
    """New bytes of an attempt's log as StreamBatch text, split on UTF-8 boundaries."""

    def __init__(self):
        self.attempt = 0
        self.offset = 0
        self.seq = 1
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def read(self, path: str, attempt: int):
        if attempt != self.attempt:
            self.attempt, self.offset = attempt, 0
            self.decoder.reset()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            while True:
                chunk = os.pread(fd, LOG_CHUNK, self.offset)
                if not chunk:
                    return
                self.offset += len(chunk)
                text = self.decoder.decode(chunk).encode("utf-8")
                if text:
                    batch = stream_pb2.StreamBatch(first_seq=self.seq, text=text,
                                                   lengths=[len(text)], end_seq=self.seq + 1)
                    self.seq += 1
                    yield batch
        finally:
            os.close(fd)


@dataclass
class ResultPiece:
    path: str
    content: bytes
    offset: int
    size: int
    truncated: bool


@dataclass
class ResultPage:
    pieces: list[ResultPiece] = field(default_factory=list)
    next_path: str = ""
    next_offset: int = 0


def _encode_result(head: bytes, root: str, budget: int, path: str, offset: int) -> bytes:
    """The TaskResult answer, encoded here (Result's serializer is the identity): the file
    bytes are copied once, from the pread buffers into the answer, never through message
    objects. Fields may come in any order on the wire; `head` carries task and result_json.
    """
    page = _read_tree(root, budget, path, offset)
    parts = [head]
    for p in page.pieces:  # fields in number order, as the generated code would write them
        path = pb.TaskFile(path=p.path).SerializeToString()
        content = [wire.varint((2 << 3) | 2), wire.varint(len(p.content)), p.content] \
            if p.content else []
        rest = pb.TaskFile(truncated=p.truncated, offset=p.offset,
                           size=p.size).SerializeToString()
        inner = len(path) + sum(map(len, content)) + len(rest)
        parts += [wire.varint((3 << 3) | 2), wire.varint(inner), path, *content, rest]
    parts.append(pb.TaskResult(next_path=page.next_path,
                               next_offset=page.next_offset).SerializeToString())
    return b"".join(parts)


def result_budget(max_bytes: int, envelope_bytes: int) -> int:
    """File bytes one Result answer may carry: what was asked (0: DEFAULT_RESULT_BYTES),
    never more than the message limit leaves after the task, the paths and the framing."""
    room = wire.MAX_MESSAGE_BYTES - envelope_bytes - RESULT_META_BYTES - (64 << 10)
    return max(1, min(max_bytes or DEFAULT_RESULT_BYTES, room))


def _read_tree(root: str, budget: int, start: str = "", start_offset: int = 0) -> ResultPage:
    """One page of the regular files under root, from (start, start_offset) on: at most
    `budget` content bytes, RESULT_META_BYTES of paths and RESULT_PIECES pieces. Links are
    never followed, anything but a regular file is left out (and never opened in a way that
    could block), holes of sparse files are skipped, and the walk is iterative (any depth).
    """
    page = ResultPage()
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                      | os.O_NONBLOCK)
    except OSError:
        return page
    start_parts = tuple(p for p in start.split("/") if p) if start else ()
    used = meta = 0
    try:
        for entry in fstree.walk(top, start=start_parts):
            if not stat.S_ISREG(entry.st.st_mode):
                continue
            path = entry.path
            try:
                cost = len(path.encode("utf-8")) + PIECE_OVERHEAD
            except UnicodeEncodeError:  # not UTF-8: no proto string can carry its name
                continue
            offset = 0
            if (start_parts and entry.depth == len(start_parts) - 1
                    and entry.name == start_parts[-1] and entry.parts == start_parts):
                offset = start_offset
            fd = fstree.open_file(entry.dir_fd, entry.name)
            if fd is None:
                continue
            try:
                size = os.fstat(fd).st_size
                offset = min(offset, size)
                first = len(page.pieces)
                stop_at = None
                ranges = list(_merged_ranges(fd, offset, size)) or [(offset, offset)]
                for start_pos, end_pos in ranges:
                    if (used >= budget and end_pos > start_pos) or meta + cost > \
                            RESULT_META_BYTES or len(page.pieces) >= RESULT_PIECES:
                        stop_at = start_pos
                        break
                    take = min(end_pos - start_pos, budget - used)
                    data = os.pread(fd, take, start_pos) if take else b""
                    page.pieces.append(ResultPiece(path, data, start_pos, size, False))
                    used += len(data)
                    meta += cost
                    if start_pos + len(data) < end_pos:
                        stop_at = start_pos + len(data)
                        break
            finally:
                os.close(fd)
            for piece in page.pieces[first:-1]:
                piece.truncated = True
            if stop_at is not None:
                if len(page.pieces) > first:
                    page.pieces[-1].truncated = True
                page.next_path, page.next_offset = path, stop_at
                return page
    except fstree.TreeChanged:
        pass  # out/ is the daemon's own copy: nothing moves it while a task is finished
    finally:
        os.close(top)
    return page


def _merged_ranges(fd: int, offset: int, size: int):
    """Data ranges of fd from offset, holes shorter than MIN_HOLE_BYTES read as zeros."""
    pending = None
    for start, stop in fstree.data_ranges(fd, offset, size):
        if pending is not None and start - pending[1] < MIN_HOLE_BYTES:
            pending = (pending[0], stop)
            continue
        if pending is not None:
            yield pending
        pending = (start, stop)
    if pending is not None:
        yield pending


class NodesServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.scheduler = daemon.scheduler

    def _operator(self, context):
        caller = self.caller(context)
        if not caller.operator:
            raise PermissionDenied("only operators cordon, uncordon or drain nodes")
        return caller

    def _shown(self, caller, node) -> pb.Node:
        """A tenant sees only its own tasks on a node; operators see every one."""
        if caller.operator:
            return node_to_proto(node)
        tasks = self.scheduler.tasks
        own = [tid for tid in node.tasks
               if (task := tasks.get(tid)) is not None and task.tenant == caller.tenant]
        return node_to_proto(node, own)

    @unary
    async def List(self, request, context):
        caller = self.caller(context)
        return pb.ListNodesResponse(
            nodes=[self._shown(caller, n) for n in self.scheduler.nodes.nodes.values()])

    @unary
    async def Get(self, request, context):
        caller = self.caller(context)
        if not request.name:
            raise InvalidSpec("name", "is empty")
        return self._shown(caller, self.scheduler.nodes.get(request.name))

    @unary
    async def Cordon(self, request, context):
        node = await self.scheduler.cordon(self._operator(context), request.name, True)
        return node_to_proto(node)

    @unary
    async def Uncordon(self, request, context):
        node = await self.scheduler.cordon(self._operator(context), request.name, False)
        return node_to_proto(node)

    @unary
    async def Drain(self, request, context):
        node = await self.scheduler.drain(self._operator(context), request.name)
        return node_to_proto(node)


def task_handlers(daemon) -> list:
    """The generic handlers of Tasks and Nodes (registered by the daemon)."""
    from .wire import generic_handler

    services = pb.DESCRIPTOR.services_by_name
    # Result answers are encoded by the servicer (identity serializer): see _encode_result
    return [generic_handler(services["Tasks"], TasksServicer(daemon),
                            streaming_bytes=frozenset({"Result"})),
            generic_handler(services["Nodes"], NodesServicer(daemon))]
