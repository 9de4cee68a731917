"""The local executor: each attempt runs under a shim process on this machine.

Launch writes the attempt's plan and has the warm zygote (zygote.py) fork a shim for it
(or, without one, starts ``python -m corral.runtime.tasks.shim``), in its own session; the
executor then follows the attempt through two descriptors on the event
loop, no thread and no polling: the task's notify FIFO (one byte per change the shim
persisted, naming what changed: files.BELL_*, so a PROGRESS costs the daemon one file read)
and a pidfd of the shim (readable once it has exited). After a daemon restart
``recover()`` finds a live shim by its lock (flock held for its whole life) and attaches
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from corral.sandbox.errors import Unavailable
from corral.sandbox.locks import flock_held as _lock_held  # a live shim holds its lock

from . import shim_cgroup
from .files import (
    BELL_CHECKPOINT,
    BELL_NET,
    BELL_PROGRESS,
    BELL_RESULT,
    BELL_STARTED,
    BELLS,
    TaskFiles,
    read_json,
)
from .images import PULLING_FILE
from .net_audit import audit_net_events
from .runner import locate_secrets, process_alive
from .shim import LOCK_NAME

log = logging.getLogger("corral.tasks.local")

#: After SIGTERM (cancel), how long a shim gets before SIGKILL (its sandbox dies with it).
CANCEL_GRACE_S = 5.0


@dataclass
class _Watch:
    task_id: str
    attempt: int
    files: TaskFiles
    attempt_dir: str
    pid: int
    pidfd: int = -1
    fifo: int = -1
    started: bool = False
    pulling: bool = False  # its pulling.json was reported (the task's image, images.py)
    # the st_mtime_ns of progress.json and result.json when last read (0: never seen)
    mtimes: dict[str, int] = field(default_factory=dict)
    checkpoint_seq: int = 0
    done: bool = False
    #: What the bells rung since the last sync name (files.BELL_* bytes); None: anything
    news: set[int] | None = field(default_factory=set)
    sync_due: bool = False  # a sync task is made and has not taken `news` yet
    heard: bool = False  # a bell came: the shim's end of the FIFO was open


class Zygote:
    """The daemon's end of zygote.py: spawn(plan, log) -> (pid, pidfd) of a new shim."""

    def __init__(self, cgroup=None):
        """Start it; with `cgroup` (shim_cgroup.make), move it there before it can fork a
        shim (it forks one only when asked, and nobody can ask before this returns)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.runtime.tasks.zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                start_new_session=True, cwd="/")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self._lock = threading.Lock()
        shim_cgroup.join(cgroup, self.proc.pid)

    def spawn(self, plan_path: str, log_path: str) -> tuple[int, int]:
        """Blocking (run it off the loop). Raises OSError/ConnectionError when it is gone."""
        with self._lock:
            self.sock.sendall(json.dumps({"plan": plan_path, "log": log_path}).encode())
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
        if not data:
            raise ConnectionError("the shim zygote exited")
        return json.loads(data)["pid"], (fds[0] if fds else -1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)


class LocalExecutor:
    name = "local"

    def __init__(self, use_zygote: bool = True, cpu_weight: int | None = None):
        """cpu_weight: the daemon's task_cpu_weight, for the cgroup the zygote and the
        shims run in (shim_cgroup.py); None leaves them in the daemon's."""
        self.scheduler = None
        self._cpu_weight = cpu_weight
        self._cgroup = None  # shim_cgroup.make's
        self._relay = None  # shim_cgroup.make_relay's, used only with _cgroup
        self._watches: dict[str, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._use_zygote = use_zygote
        self._zygote: Zygote | None = None
        self._direct: dict[int, subprocess.Popen] = {}  # shims started without the zygote
        self._stopping = False
        #: The daemon's SecretStore (service.py): where a task's secrets live.
        self.secret_store = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        if self._cpu_weight is not None:
            await self._loop.run_in_executor(None, shim_cgroup.sweep)
            self._cgroup = await self._loop.run_in_executor(None, shim_cgroup.make,
                                                            self._cpu_weight)
            if self._cgroup is not None:
                self._relay = await self._loop.run_in_executor(None, shim_cgroup.make_relay)
        if self._use_zygote:
            try:
                self._zygote = Zygote(self._cgroup)
            except OSError as exc:
                log.warning("no shim zygote (%s); each attempt starts a new interpreter", exc)

    async def stop(self) -> None:
        """Detach from every attempt (they keep running; the next daemon re-attaches)."""
        self._stopping = True
        for w in list(self._watches.values()):
            self._close(w)
        self._watches.clear()
        if self._zygote is not None:
            await self._loop.run_in_executor(None, self._zygote.close)
            self._zygote = None
        for cgroup in (self._cgroup, self._relay):  # kept while an attempt's shim runs on
            shim_cgroup.release(cgroup)
        self._cgroup = self._relay = None

    def node_alive(self, node) -> bool:
        return True

    # -- attempts ----------------------------------------------------------------------------

    async def launch(self, task, node, plan) -> None:
        plan.tenant = task.tenant
        if self._cgroup is not None and self._relay is not None:
            plan.relay_cgroup, plan.home_cgroup = list(self._relay.paths), list(self._cgroup.paths)
        if plan.sandbox.secrets:  # where the values live, never the values (runner.py)
            plan.secret_sources = await self._loop.run_in_executor(
                None, locate_secrets, self.secret_store, task.tenant, plan.sandbox.secrets)
        files = TaskFiles(plan.tasks_root, task.id)
        attempt_dir = files.attempt_dir(plan.attempt)

        def prepare() -> str:
            files.create()
            os.makedirs(attempt_dir, mode=0o700, exist_ok=True)
            path = os.path.join(attempt_dir, "plan.json")
            with open(path, "w") as f:
                f.write(plan.to_json())
            return path

        plan_path = await self._loop.run_in_executor(None, prepare)
        w = _Watch(task.id, plan.attempt, files, attempt_dir, pid=0,
                   checkpoint_seq=task.checkpoint_seq)
        # The FIFO's reader is open before the shim's writer: no byte is missed.
        w.fifo = os.open(files.notify_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        log_path = os.path.join(attempt_dir, "shim.log")
        try:
            w.pid, w.pidfd = await self._spawn(plan_path, log_path)
        except BaseException:
            os.close(w.fifo)
            raise
        self._attach(w)
        if task.cancel_requested or task.drain_requested:  # asked while we were starting it
            self.cancel(task)

    async def _spawn(self, plan_path: str, log_path: str) -> tuple[int, int]:
        """(pid, pidfd) of a new shim: forked by the warm zygote, else a new interpreter."""
        if self._stopping:
            raise Unavailable("the daemon is stopping")
        if self._zygote is not None:
            try:
                return await self._loop.run_in_executor(None, self._zygote.spawn, plan_path,
                                                        log_path)
            except (OSError, ValueError) as exc:
                if self._stopping:
                    raise Unavailable("the daemon is stopping") from None
                log.warning("the shim zygote failed (%s); starting shims directly from now on",
                            exc)
                zygote, self._zygote = self._zygote, None
                await self._loop.run_in_executor(None, zygote.close)
        with open(log_path, "ab") as shim_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "corral.runtime.tasks.shim", plan_path],
                stdin=subprocess.DEVNULL, stdout=shim_log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, cwd="/")
        self._direct[proc.pid] = proc  # reaped when it exits
        shim_cgroup.join(self._cgroup, proc.pid)
        return proc.pid, os.pidfd_open(proc.pid)

    def started(self, task) -> bool:
        files = TaskFiles(self.scheduler.tasks_root, task.id)
        return os.path.exists(os.path.join(files.attempt_dir(task.attempt), "shim.json"))

    async def recover(self, task) -> bool:
        files = TaskFiles(self.scheduler.tasks_root, task.id)
        attempt_dir = files.attempt_dir(task.attempt)
        if not _lock_held(os.path.join(attempt_dir, LOCK_NAME)):
            return False
        shim = read_json(os.path.join(attempt_dir, "shim.json")) or {}
        pid = shim.get("pid")
        if not pid or not process_alive(pid, shim.get("start")):
            return False
        w = _Watch(task.id, task.attempt, files, attempt_dir, pid=pid,
                   checkpoint_seq=task.checkpoint_seq, started=bool(task.started_at))
        try:
            w.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        w.fifo = os.open(files.notify_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._attach(w)
        return True

    def leftovers(self, task) -> dict:
        """Progress, result and checkpoint the attempt persisted (for a daemon that was down)."""
        files = TaskFiles(self.scheduler.tasks_root, task.id)
        adir = files.attempt_dir(task.attempt)
        out: dict = {"checkpoint_seq": files.latest_checkpoint()}
        for name in ("progress", "result"):
            with contextlib.suppress(OSError):
                with open(os.path.join(adir, f"{name}.json"), encoding="utf-8",
                          errors="replace") as f:
                    out[f"{name}_json"] = f.read()
        return out

    def final_outcome(self, task) -> dict | None:
        """The exit record of the task's current attempt, if it ended unobserved."""
        files = TaskFiles(self.scheduler.tasks_root, task.id)
        return read_json(os.path.join(files.attempt_dir(task.attempt), "exit.json"))

    async def send_input(self, task, text: str) -> None:
        """Steering for the running attempt: its runner hands it to the agent."""
        files = TaskFiles(self.scheduler.tasks_root, task.id)
        await self._loop.run_in_executor(None, files.post_input, text)

    def cancel(self, task) -> None:
        w = self._watches.get(task.id)
        if w is None or w.done:
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(w.pidfd, signal.SIGTERM)
        self._loop.call_later(CANCEL_GRACE_S, self._force_kill, w)

    def _force_kill(self, w: _Watch) -> None:
        if not w.done and w.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)

    # -- following an attempt ----------------------------------------------------------------

    def _attach(self, w: _Watch) -> None:
        self._watches[w.task_id] = w
        self._loop.add_reader(w.fifo, self._on_bell, w)
        if w.pidfd >= 0:
            self._loop.add_reader(w.pidfd, self._on_exit, w)
        else:  # it had already exited (and been reaped) when we asked
            self._loop.call_soon(self._on_exit, w)
        self._loop.call_soon(self._on_bell, w, True)  # what happened before we looked

    def _on_bell(self, w: _Watch, first: bool = False) -> None:
        """The shim rang (or, `first`, we start to follow it: anything may have changed).
        What the bytes name joins the next sync; one sync task at a time is waiting.

        The shim closes its end of the FIFO last of all: from then on the FIFO reads as
        end-of-file and is always readable (level-triggered), so it is no longer watched:
        its exit (the pidfd) does the last sync. Watched on, it would wake the loop again
        and again, a sync each time, until the shim's interpreter had exited. (Before the
        shim opens its end the FIFO reads as end-of-file too, but is not readable: an
        end-of-file is the shim's once a bell was heard, or when the loop found the FIFO
        readable, as it does only after a writer came and went.)"""
        if w.done:
            return
        data = b""
        ended = False
        try:
            while chunk := os.read(w.fifo, 4096):
                data += chunk
            ended = True  # end-of-file: no writer is left
        except BlockingIOError:  # all read; the shim's end is still open
            pass
        except OSError:
            ended = True
        w.heard = w.heard or bool(data)
        if ended and (w.heard or not first) and w.fifo >= 0:
            self._loop.remove_reader(w.fifo)
        if first or not BELLS.issuperset(data):  # BELL_ANY, an older shim's byte
            w.news = None
        elif w.news is not None:
            w.news.update(data)
        if (data or first) and not w.sync_due:
            w.sync_due = True
            self._loop.create_task(self._sync(w, from_bell=True))

    async def _sync(self, w: _Watch, from_bell: bool = False) -> None:
        """Report what the shim persisted: what its bells named (from_bell), else all."""
        news = None
        if from_bell:
            news, w.news, w.sync_due = w.news, set(), False

        def rung(bell: bytes) -> bool:
            return news is None or bell[0] in news

        sched = self.scheduler
        if rung(BELL_STARTED) and not w.started and not w.pulling:
            pulling = read_json(os.path.join(w.attempt_dir, PULLING_FILE))
            if pulling is not None:
                w.pulling = True
                await sched.on_pulling(w.task_id, w.attempt, pulling.get("image", ""))
        if rung(BELL_STARTED) and not w.started:
            runner = read_json(os.path.join(w.attempt_dir, "runner.json"))
            if runner is not None:
                w.started = True
                await sched.on_started(w.task_id, w.attempt, runner.get("started_at", 0.0),
                                       runner)
        kw = {}
        for name, bell in (("progress", BELL_PROGRESS), ("result", BELL_RESULT)):
            text = _changed_text(w, f"{name}.json") if rung(bell) else None
            if text is not None:
                kw[f"{name}_json"] = text
        if rung(BELL_CHECKPOINT):
            seq = w.files.latest_checkpoint()
            if seq != w.checkpoint_seq:
                w.checkpoint_seq = seq
                kw["checkpoint_seq"] = seq
        if kw:
            await sched.on_update(w.task_id, w.attempt, **kw)
        task = sched.tasks.get(w.task_id)
        if task is not None and rung(BELL_NET):
            await audit_net_events(sched.audit, task.tenant, w.task_id, w.attempt,
                                   w.attempt_dir)
        sched.on_log(w.task_id)  # its log may have grown: watchers read on

    def _on_exit(self, w: _Watch) -> None:
        if w.done:
            return
        self._close(w)
        w.done = True
        self._watches.pop(w.task_id, None)
        proc = self._direct.pop(w.pid, None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)

        async def finish() -> None:
            await self._sync(w)
            outcome = read_json(os.path.join(w.attempt_dir, "exit.json")) or {
                "outcome": "lost", "returncode": -1,
                "reason": "the attempt's shim ended without an exit record"}
            await self.scheduler.on_exit(w.task_id, w.attempt, outcome)

        self._loop.create_task(finish())

    def _close(self, w: _Watch) -> None:
        for attr in ("fifo", "pidfd"):
            fd = getattr(w, attr)
            if fd >= 0:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
                os.close(fd)
                setattr(w, attr, -1)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _changed_text(w: _Watch, name: str) -> str | None:
    """The text of the attempt's file `name` when its mtime moved since the last look, else
    None: the shim rewrites progress and result whole, so an unchanged mtime is no news."""
    path = os.path.join(w.attempt_dir, name)
    st = _mtime(path)
    if st == w.mtimes.get(name, 0):
        return None
    w.mtimes[name] = st
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None
