"""TaskStore: deep tasks in SQLite (WAL), written by one thread with group commit.

Durability: ``PRAGMA synchronous=FULL``. In WAL mode NORMAL only fsyncs at checkpoints, so
a power loss could drop transactions whose Submit was already acknowledged; FULL fsyncs the
WAL at every commit. The cost is one fsync per *transaction*, not per task: every write goes
through a queue to one writer thread, which takes everything queued (up to
``MAX_BATCH``) into a single transaction, commits it, appends the batch's audit records, and
only then resolves the callers' futures. Under load many submissions share one fsync; alone,
a submission waits for exactly one.

Reads never touch the database: the scheduler keeps every task in memory and the store is
read back only by ``load()`` at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
from collections import defaultdict
from dataclasses import dataclass

from .model import DeepTask, TaskSpec
from .states import TaskState

log = logging.getLogger("corral.tasks.store")

MAX_BATCH = 4096
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    spec TEXT NOT NULL,
    state INTEGER NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    progress_json TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    result_json TEXT NOT NULL DEFAULT '',
    checkpoint_seq INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER NOT NULL DEFAULT 0,
    devices TEXT NOT NULL DEFAULT '',
    runner_json TEXT NOT NULL DEFAULT '',
    failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS node_flags (
    name TEXT PRIMARY KEY,
    cordoned INTEGER NOT NULL,
    draining INTEGER NOT NULL
);
"""
_MUTABLE = ("state", "node", "attempt", "updated_at", "started_at", "finished_at",
            "progress_json", "reason", "result_json", "checkpoint_seq", "exit_code", "devices",
            "runner_json", "failures")
_INSERT = (f"INSERT INTO tasks (id, seq, tenant, spec, submitted_at, {', '.join(_MUTABLE)}) "
           f"VALUES ({', '.join('?' * (5 + len(_MUTABLE)))})")
_UPDATE = f"UPDATE tasks SET {', '.join(m + ' = ?' for m in _MUTABLE)} WHERE id = ?"


def _mutable_values(task: DeepTask) -> tuple:
    return (int(task.state), task.node, task.attempt, task.updated_at, task.started_at,
            task.finished_at, task.progress_json, task.reason, task.result_json,
            task.checkpoint_seq, task.exit_code, "\n".join(task.devices), task.runner_json,
            task.failures)


@dataclass
class _Op:
    sql: str
    params: tuple
    audit: list  # [(kind, kwargs)] appended after the commit
    future: asyncio.Future | None


class TaskStore:
    """The durable half of the scheduler: insert/update return after the commit."""

    def __init__(self, path: str, audit=None):
        self.path = path
        self.audit = audit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._conn = _connect(path)
        self._thread = threading.Thread(target=self._write_loop, name="corral-taskstore",
                                        daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        self.writes = 0
        self._closed = False

    def load(self) -> tuple[list[DeepTask], dict[str, tuple[bool, bool]]]:
        """Every task, and the persisted (cordoned, draining) flags of nodes."""
        tasks = []
        for row in self._conn.execute(
                "SELECT id, seq, tenant, spec, submitted_at, " + ", ".join(_MUTABLE)
                + " FROM tasks ORDER BY seq"):
            (tid, seq, tenant, spec, submitted_at, state, node, attempt, updated_at, started_at,
             finished_at, progress_json, reason, result_json, checkpoint_seq, exit_code, devices,
             runner_json, failures) = row
            tasks.append(DeepTask(
                id=tid, seq=seq, tenant=tenant, spec=TaskSpec.from_json(spec),
                state=TaskState(state), node=node, attempt=attempt, submitted_at=submitted_at,
                updated_at=updated_at, started_at=started_at, finished_at=finished_at,
                progress_json=progress_json, reason=reason, result_json=result_json,
                checkpoint_seq=checkpoint_seq, exit_code=exit_code,
                devices=tuple(d for d in devices.split("\n") if d), runner_json=runner_json,
                failures=failures))
        flags = {name: (bool(c), bool(d)) for name, c, d in
                 self._conn.execute("SELECT name, cordoned, draining FROM node_flags")}
        return tasks, flags

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        """Write everything queued, then stop the writer and close the database."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._conn.close()

    # -- writes ------------------------------------------------------------------------------

    def insert(self, task: DeepTask, audit: list | None = None) -> asyncio.Future:
        """Queue the task's first row; the future resolves once it is committed."""
        params = (task.id, task.seq, task.tenant, task.spec.to_json(), task.submitted_at,
                  *_mutable_values(task))
        return self._put(_INSERT, params, audit)

    def update(self, task: DeepTask, audit: list | None = None) -> asyncio.Future:
        """Queue the task's current mutable fields (a snapshot taken now)."""
        return self._put(_UPDATE, (*_mutable_values(task), task.id), audit)

    def set_node_flags(self, name: str, cordoned: bool, draining: bool,
                       audit: list | None = None) -> asyncio.Future:
        return self._put("INSERT OR REPLACE INTO node_flags (name, cordoned, draining) "
                         "VALUES (?, ?, ?)", (name, int(cordoned), int(draining)), audit)

    def _put(self, sql: str, params: tuple, audit: list | None) -> asyncio.Future:
        if self._closed:
            raise RuntimeError("the task store is closed")
        fut = self._loop.create_future() if self._loop is not None else None
        self._queue.put(_Op(sql, params, audit or [], fut))
        return fut

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
            error: BaseException | None = None
            try:
                with self._conn:  # one transaction, one fsync
                    for op in batch:
                        self._conn.execute(op.sql, op.params)
                self.commits += 1
                self.writes += len(batch)
                self._append_audit(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                log.exception("task store commit of %d writes failed", len(batch))
                error = exc
            futures = [op.future for op in batch if op.future is not None]
            if futures and self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(_resolve, futures, error)
                except RuntimeError:  # the loop closed meanwhile
                    pass

    def _append_audit(self, batch: list[_Op]) -> None:
        if self.audit is None:
            return
        # Submissions of one batch become one record per tenant (ids listed): a record per
        # task would cost an fsync each and cap submissions at the audit log's rate.
        submits: dict[tuple, list[str]] = defaultdict(list)
        for op in batch:
            for kind, kw in op.audit:
                if kind == "task.submit":
                    submits[(kw["tenant"], kw.get("peer", ""))].append(kw["task_id"])
                else:
                    self.audit.append(kind, **kw)
        for (tenant, peer), ids in submits.items():
            self.audit.append("task.submit", tenant=tenant, peer=peer,
                              detail={"task_ids": ids, "count": len(ids)})


def _resolve(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(RuntimeError(f"task store write failed: {error}"))


def _connect(path: str) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(_SCHEMA)
    conn.commit()
    os.chmod(path, 0o600)
    return conn
