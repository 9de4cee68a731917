"""The Ray executor: one long-lived actor per labelled Ray node hosts that node's sandboxes.

Placement stays the scheduler's (labels and resources from the daemon's `[[nodes]]` with
``executor = "ray"``); each such node's actor is pinned to the Ray node carrying the label
``corral.node=<name>`` (``label_selector``), so "task placed on node N" means "its sandbox runs
on the Ray node labelled N". The actor runs the same AttemptRunner as the local shim, in a
thread of its own process: the sandbox's PID 1 dies with the actor, i.e. with its Ray node.

What crosses Ray, and only this: the attempt's plan and last checkpoint (daemon -> actor);
runner start, PROGRESS and RESULT payloads, new checkpoints, the attempt's log and, at the
end, its exit record and /workspace/out (actor -> daemon, pulled by the daemon's poll loop).
Tokens never do: interactive token streams stay on the daemon's gRPC data plane.

A node whose actor dies (ActorDiedError: the Ray node was lost) is marked lost; its attempts
end as "lost" and their tasks are retried from the last checkpoint the daemon holds, on
another matching node. The actors are detached: a restarted daemon finds them by name and
re-attaches to the attempts they still run.

Needs the optional extra ``corral[ray]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import threading

from corral.sandbox import fstree

from .files import MAX_COPY_BYTES, TaskFiles, read_json
from .images import PULLING_FILE
from .net_audit import audit_net_events
from .nodes import node_local_fields
from .runner import NET_EVENTS_FILE

log = logging.getLogger("corral.tasks.ray")

NAMESPACE = "corral"
NODE_LABEL = "corral.node"
POLL_S = 0.1
PING_S = 2.0
MAX_LOG_CHUNK = 256 << 10


def ray_environment() -> None:
    """Environment every Corral process that talks to Ray needs (FIELD-NOTES: Ray)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Keep a driver on 127.0.0.1: Ray otherwise turns a loopback address into the host's
    # routable IP, where a cluster bound to loopback does not listen.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _tar_dir(path: str) -> bytes | None:
    """A tar of a task directory's copy of an agent-written tree (a checkpoint, out/).

    Walked iteratively (tarfile.add recurses: a 1,500-level tree raised RecursionError),
    regular files and directories only. A tar has no holes: files are taken while their
    full length fits MAX_COPY_BYTES in all, so a sparse 1 TiB file cannot fill memory.
    """
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    buf = io.BytesIO()
    room = MAX_COPY_BYTES
    try:
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for entry in fstree.walk(top):
                info = tarfile.TarInfo("./" + entry.path)
                info.mode, info.mtime = entry.st.st_mode & 0o777, int(entry.st.st_mtime)
                if stat.S_ISDIR(entry.st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    continue
                fd = fstree.open_file(entry.dir_fd, entry.name)
                if fd is None:
                    continue
                with os.fdopen(fd, "rb") as f:
                    info.size = os.fstat(fd).st_size
                    if info.size > room:
                        log.warning("%s: %s left out of the transfer (%d bytes, %d left of "
                                    "the copy limit)", path, entry.path, info.size, room)
                        continue
                    room -= info.size
                    tar.addfile(info, f)
    finally:
        os.close(top)
    return buf.getvalue()


def _untar(data: bytes, dest: str) -> None:
    """Unpack a _tar_dir() tar into dest: directories and regular files only, names checked
    (relative, no '..'), each made relative to the directory descriptors of the current
    path (extractall resolves every member's whole path: quadratic in the tree's depth,
    a minute of the daemon's time for a 2,000-level tree), at most 32 of them open."""
    os.makedirs(dest, exist_ok=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    stack: list[list] = [["", os.open(dest, flags)]]  # [name, fd or None] along the path

    def leave() -> None:
        _, fd = stack.pop()
        try:
            if stack[-1][1] is None:
                stack[-1][1] = os.open("..", flags, dir_fd=fd)
        finally:
            os.close(fd)

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if not parts or ".." in parts or member.name.startswith("/") or not (
                        member.isdir() or member.isreg()):
                    continue
                *dirs, name = parts
                common = 0
                while (common < len(dirs) and common + 1 < len(stack)
                       and stack[common + 1][0] == dirs[common]):
                    common += 1
                while len(stack) > common + 1:
                    leave()
                for part in dirs[common:]:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=stack[-1][1])
                    stack.append([part, os.open(part, flags, dir_fd=stack[-1][1])])
                    if len(stack) > 33 and stack[-33][1] is not None:  # never the root
                        os.close(stack[-33][1])
                        stack[-33][1] = None
                parent = stack[-1][1]
                if member.isdir():
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=parent)
                    continue
                src = tar.extractfile(member)
                out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o644, dir_fd=parent)
                with os.fdopen(out, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
    finally:
        for _, fd in stack:
            if fd is not None:
                os.close(fd)


def _save_checkpoint_tar(files: TaskFiles, data: bytes) -> int:
    tmp = tempfile.mkdtemp(prefix="corral-ckpt-")
    try:
        _untar(data, tmp)
        frame_path = os.path.join(tmp, "frame")
        frame = None
        if os.path.exists(frame_path):
            with open(frame_path, "rb") as f:
                frame = f.read()
        files_dir = os.path.join(tmp, "files")
        return files.save_checkpoint(frame, files_dir if os.path.isdir(files_dir) else None)
    finally:
        fstree.remove_tree(tmp, ignore_errors=True)


class NodeHost:
    """The body of a node's actor (a plain class so it is testable without Ray)."""

    def __init__(self, node: str, root: str | None = None):
        # Ray installs uvloop's event loop policy in its workers; the sandboxes this actor
        # runs need asyncio's own loops (pyroute2 opens its netlink sockets as datagram
        # endpoints, which uvloop refuses: "invalid family 16"), so a sandbox with a
        # network failed here. Ray's own loops are made without the policy.
        asyncio.set_event_loop_policy(None)
        self.node = node
        self.root = root or _session_root(node)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._runners: dict[str, object] = {}
        self._lock = threading.Lock()

    def ping(self) -> dict:
        return {"node": self.node, "pid": os.getpid(), "attempts": sorted(self._runners)}

    def where(self) -> str:
        """The id of the Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self, plan_json: str, checkpoint_tar: bytes | None) -> None:
        from .runner import AttemptPlan, AttemptRunner

        plan = AttemptPlan.from_json(plan_json)
        plan.tasks_root = self.root
        files = TaskFiles(self.root, plan.task_id)
        fstree.remove_tree(files.dir, ignore_errors=True)  # a fresh start on this node
        files.create()
        if checkpoint_tar:
            _save_checkpoint_tar(files, checkpoint_tar)
        runner = AttemptRunner(plan)
        key = f"{plan.task_id}/{plan.attempt}"
        with self._lock:
            self._runners[key] = runner
        # The runner's thread spawns the sandbox and lives as long as it (PDEATHSIG).
        threading.Thread(target=self._run, args=(runner,), name=f"attempt-{key}",
                         daemon=True).start()

    @staticmethod
    def _run(runner) -> None:
        try:
            runner.run()
        except Exception:  # noqa: BLE001 - recorded in exit.json by the runner
            log.exception("attempt failed")

    def send_input(self, task_id: str, text: str) -> None:
        """Steering for the task's running attempt on this node (its runner forwards it)."""
        TaskFiles(self.root, task_id).post_input(text)

    def cancel(self, task_id: str, attempt: int) -> bool:
        runner = self._runners.get(f"{task_id}/{attempt}")
        if runner is None:
            return False
        runner.cancel()
        return True

    def poll(self, task_id: str, attempt: int, have_checkpoint: int, log_offset: int,
             net_offset: int = 0) -> dict:
        """What the attempt persisted since the daemon last asked: its log and egress
        records (NET_EVENTS_FILE) from the offsets the daemon holds."""
        files = TaskFiles(self.root, task_id)
        adir = files.attempt_dir(attempt)
        known = f"{task_id}/{attempt}" in self._runners
        out: dict = {"known": known or os.path.isdir(adir)}
        out["pulling"] = read_json(os.path.join(adir, PULLING_FILE))
        out["runner"] = read_json(os.path.join(adir, "runner.json"))
        if out["runner"] is not None:
            out["runner"]["ray_node_id"] = self.where()
        for name in ("progress", "result"):
            with contextlib.suppress(OSError):
                with open(os.path.join(adir, f"{name}.json"), encoding="utf-8",
                          errors="replace") as f:
                    out[name] = f.read()
        seq = files.latest_checkpoint()
        if seq > have_checkpoint:
            out["checkpoint"] = (seq, _tar_dir(files.checkpoint_dir(seq)))
        for key, name, offset in (("log", "log", log_offset),
                                  ("net", NET_EVENTS_FILE, net_offset)):
            with contextlib.suppress(OSError):
                with open(os.path.join(adir, name), "rb") as f:
                    f.seek(offset)
                    out[key] = f.read(MAX_LOG_CHUNK)
        exit_record = read_json(os.path.join(adir, "exit.json"))
        if exit_record is not None and not out.get("log") and not out.get("net"):
            out["exit"] = exit_record  # only once the log and the records are drained
            if exit_record.get("outcome") == "succeeded":
                out["out"] = _tar_dir(files.out)
        return out

    def forget(self, task_id: str, attempt: int) -> None:
        with self._lock:
            self._runners.pop(f"{task_id}/{attempt}", None)
        fstree.remove_tree(TaskFiles(self.root, task_id).dir, ignore_errors=True)


def _session_root(node: str) -> str:
    """Attempt directories under the Ray session's own directory (removed with its logs)."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        base = os.path.join(ctx.get_temp_dir(), ctx.get_session_name())
    except Exception:  # noqa: BLE001 - not inside Ray: a private temporary directory
        base = tempfile.mkdtemp(prefix="corral-ray-")
    return os.path.join(base, "corral", node, str(os.getpid()))


_actor_class = None


def actor_class():
    """NodeHost as a Ray actor class (made on first use: importing Ray is slow)."""
    global _actor_class
    if _actor_class is None:
        import ray

        _actor_class = ray.remote(num_cpus=0, max_concurrency=64, max_restarts=0)(NodeHost)
    return _actor_class


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, nodes):
        self.address = address
        self.node_names = [n.name for n in nodes]
        self.scheduler = None
        self.actors: dict[str, object] = {}
        self._alive: dict[str, bool] = {}
        self._polls: dict[str, asyncio.Task] = {}
        self._pinger: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _ray(self, fn, *args):
        return await self._loop.run_in_executor(None, fn, *args)

    async def _call(self, ref):
        return await asyncio.wrap_future(ref.future())

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        ray_environment()
        import ray

        try:
            await self._ray(lambda: ray.init(address=self.address or "auto",
                                             namespace=NAMESPACE, log_to_driver=False))
        except Exception as exc:  # noqa: BLE001 - ConnectionError and kin: say where
            raise RuntimeError(f"cannot reach the Ray cluster at {self.address or 'auto'} "
                               f"(ray_address): {exc}") from None
        for name in self.node_names:
            self.actors[name] = self._actor(name)
            self._alive[name] = True
        self._pinger = self._loop.create_task(self._ping_loop())

    def _actor(self, name: str):
        """The node's actor: the running one, or a new one (pending until its Ray node is up)."""
        return actor_class().options(
            name=f"corral-node-{name}", namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, label_selector={NODE_LABEL: name},
        ).remote(name)

    async def stop(self) -> None:
        """Stop following attempts (the actors and their sandboxes keep running)."""
        if self._pinger is not None:
            self._pinger.cancel()
        for t in self._polls.values():
            t.cancel()
        self._polls.clear()
        import ray

        with contextlib.suppress(Exception):
            await self._ray(ray.shutdown)

    async def _ping_loop(self) -> None:
        while True:
            for name, actor in list(self.actors.items()):
                if not self._alive.get(name):
                    await self._try_rejoin(name)
                    continue
                try:
                    await asyncio.wait_for(self._call(actor.ping.remote()), timeout=30)
                except TimeoutError:
                    continue  # e.g. its Ray node is still starting
                except Exception as exc:  # noqa: BLE001 - ActorDiedError and kin
                    self._lost(name, f"its Ray actor died: {type(exc).__name__}")
            await asyncio.sleep(PING_S)

    async def _try_rejoin(self, name: str) -> None:
        """A lost node whose Ray node (same label) is back gets a new actor and work again."""
        try:
            actor = await self._ray(self._actor, name)
            await asyncio.wait_for(self._call(actor.ping.remote()), timeout=PING_S)
        except Exception:  # noqa: BLE001 - still gone (pending actor, or dead again)
            return
        self.actors[name] = actor
        self._alive[name] = True
        self.scheduler.node_back(name)

    def _lost(self, name: str, reason: str) -> None:
        if self._alive.get(name):
            self._alive[name] = False
            self.scheduler.node_lost(name, reason)

    def node_alive(self, node) -> bool:
        return self._alive.get(node.name, False)

    # -- attempts ----------------------------------------------------------------------------

    async def launch(self, task, node, plan) -> None:
        fields = node_local_fields(plan.sandbox)
        if fields:  # a Ray node that matches appeared after the submit: never run it here
            await self.scheduler.on_exit(task.id, plan.attempt, {
                "outcome": "refused", "returncode": -1,
                "reason": f"placed on the Ray node {node.name}, which cannot honour "
                          f"{', '.join(fields)} (local nodes only): select local nodes "
                          f"by their labels"})
            return
        files = TaskFiles(plan.tasks_root, task.id)
        await self._ray(files.create)
        seq = files.latest_checkpoint()
        tar = await self._ray(_tar_dir, files.checkpoint_dir(seq)) if seq else None
        actor = self.actors[node.name]
        await self._call(actor.start.remote(plan.to_json(), tar))
        self._follow(task.id, plan.attempt, node.name, seq)
        if task.cancel_requested or task.drain_requested:  # asked while we were starting it
            self.cancel(task)

    def started(self, task) -> bool:
        return False

    def final_outcome(self, task) -> dict | None:
        return None

    def leftovers(self, task) -> dict:
        return {}  # what the actor holds comes with the next poll

    async def recover(self, task) -> bool:
        actor = self.actors.get(task.node)
        if actor is None:
            return False
        try:
            state = await asyncio.wait_for(self._call(actor.poll.remote(
                task.id, task.attempt, task.checkpoint_seq, 0)), timeout=30)
        except Exception:  # noqa: BLE001 - a dead actor: the attempt is lost
            return False
        if not state.get("known"):
            return False
        self._follow(task.id, task.attempt, task.node, task.checkpoint_seq,
                     started=bool(task.started_at))
        return True

    async def send_input(self, task, text: str) -> None:
        """Steering for the running attempt, through its node's actor."""
        await self._call(self.actors[task.node].send_input.remote(task.id, text))

    def cancel(self, task) -> None:
        actor = self.actors.get(task.node)
        if actor is not None:
            with contextlib.suppress(Exception):
                actor.cancel.remote(task.id, task.attempt)

    def _follow(self, task_id: str, attempt: int, node: str, have: int,
                started: bool = False) -> None:
        old = self._polls.pop(task_id, None)
        if old is not None:
            old.cancel()
        self._polls[task_id] = self._loop.create_task(
            self._poll(task_id, attempt, node, have, started))

    async def _poll(self, task_id: str, attempt: int, node: str, have: int,
                    started: bool) -> None:
        sched = self.scheduler
        actor = self.actors[node]
        files = TaskFiles(sched.tasks_root, task_id)
        attempt_dir = files.attempt_dir(attempt)
        log_path = os.path.join(attempt_dir, "log")
        net_path = os.path.join(attempt_dir, NET_EVENTS_FILE)
        await self._ray(lambda: os.makedirs(attempt_dir, exist_ok=True))
        log_offset, net_offset = await self._ray(lambda: (_size(log_path), _size(net_path)))
        pulling = False
        try:
            while True:
                try:
                    state = await self._call(actor.poll.remote(task_id, attempt, have,
                                                               log_offset, net_offset))
                except Exception as exc:  # noqa: BLE001 - ActorDiedError: the node is gone
                    self._lost(node, f"its Ray actor died: {type(exc).__name__}")
                    await sched.on_exit(task_id, attempt, {
                        "outcome": "lost", "returncode": -1,
                        "reason": f"node {node} was lost ({type(exc).__name__})"})
                    return
                if state.get("pulling") and not (started or pulling):
                    pulling = True
                    await sched.on_pulling(task_id, attempt, state["pulling"].get("image", ""))
                if state.get("runner") and not started:
                    started = True
                    await sched.on_started(task_id, attempt,
                                           state["runner"].get("started_at", 0.0),
                                           state["runner"])
                kw = {}
                if state.get("checkpoint"):
                    seq, tar = state["checkpoint"]
                    if tar is not None:
                        have = await self._ray(_save_checkpoint_tar, files, tar)
                        kw["checkpoint_seq"] = have
                if state.get("progress") is not None:
                    kw["progress_json"] = state["progress"]
                if state.get("result") is not None:
                    kw["result_json"] = state["result"]
                if kw:
                    await sched.on_update(task_id, attempt, **kw)
                if state.get("net"):
                    net_offset += await self._audit_net(task_id, attempt, net_path,
                                                        state["net"])
                if state.get("log"):
                    chunk = state["log"]
                    await self._ray(_append, log_path, chunk)
                    log_offset += len(chunk)
                    sched.on_log(task_id)
                if state.get("log") or state.get("net"):
                    continue
                if state.get("exit") is not None:
                    if state.get("out") is not None:
                        await self._ray(_replace_out, files, state["out"])
                    with contextlib.suppress(Exception):
                        actor.forget.remote(task_id, attempt)
                    await sched.on_exit(task_id, attempt, state["exit"])
                    return
                await asyncio.sleep(POLL_S)
        finally:
            if self._polls.get(task_id) is asyncio.current_task():
                del self._polls[task_id]

    async def _audit_net(self, task_id: str, attempt: int, net_path: str, chunk: bytes) -> int:
        """Egress records of an attempt on a Ray node (net.connect, net.deny, ...): kept
        in the daemon's copy of the attempt's NET_EVENTS_FILE and audited from it as a
        local attempt's are (net_audit.py: each once, across daemon restarts); returns
        how many bytes came."""
        await self._ray(_append, net_path, chunk)
        task = self.scheduler.tasks.get(task_id)
        if task is not None:
            await audit_net_events(self.scheduler.audit, task.tenant, task_id, attempt,
                                   os.path.dirname(net_path))
        return len(chunk)


def _size(path: str) -> int:
    """The size of a file the daemon copies from an actor (0: none yet)."""
    return os.path.getsize(path) if os.path.exists(path) else 0


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _replace_out(files: TaskFiles, data: bytes) -> None:
    tmp = files.out + ".tmp"
    fstree.remove_tree(tmp, ignore_errors=True)
    _untar(data, tmp)
    fstree.remove_tree(files.out, ignore_errors=True)
    os.rename(tmp, files.out)
