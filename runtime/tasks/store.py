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

Faults at start (docs/architecture.md, "Task store faults"):
  * a row that does not decode (an unknown state, a spec that is not valid JSON or not a
    valid spec) is moved to the ``quarantine`` table, with one log line and one
    ``task.quarantined`` audit record each; every other task loads;
  * a file SQLite cannot read (truncated, overwritten, failing ``PRAGMA quick_check``) is
    refused with ``TaskStoreDamaged``: one line naming the file and the recovery command,
    ``corral task recover --state DIR`` (recover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from corral.sandbox.errors import CorralError

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
    failures INTEGER NOT NULL DEFAULT 0,
    request_id TEXT NOT NULL DEFAULT '',
    parent_session TEXT NOT NULL DEFAULT '',
    parent_ref TEXT NOT NULL DEFAULT '',
    delivered INTEGER NOT NULL DEFAULT 0,
    exit_reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS node_flags (
    name TEXT PRIMARY KEY,
    cordoned INTEGER NOT NULL,
    draining INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL,
    row_json TEXT NOT NULL DEFAULT ''
);
"""
#: Columns of a tasks row, in the order load() reads them.
_COLUMNS = ("id", "seq", "tenant", "spec", "submitted_at", "state", "node", "attempt",
            "updated_at", "started_at", "finished_at", "progress_json", "reason",
            "result_json", "checkpoint_seq", "exit_code", "devices", "runner_json", "failures",
            "request_id", "parent_session", "parent_ref", "delivered", "exit_reason")
#: Columns added after the first release, with their definitions: _connect adds the ones
#: an older store lacks (its rows get the defaults: no request id, no parent session).
_ADDED_COLUMNS = (("request_id", "TEXT NOT NULL DEFAULT ''"),
                  ("parent_session", "TEXT NOT NULL DEFAULT ''"),
                  ("parent_ref", "TEXT NOT NULL DEFAULT ''"),
                  ("delivered", "INTEGER NOT NULL DEFAULT 0"),
                  ("exit_reason", "TEXT NOT NULL DEFAULT ''"))


def recover_hint(path: str) -> str:
    """The recovery command for the store at path (its state directory is path's parent)."""
    return f"corral task recover --state {os.path.dirname(os.path.abspath(path))}"


class TaskStoreDamaged(CorralError):
    """tasks.db cannot be read as a database; the daemon refuses to start on it."""

    grpc_status = "DATA_LOSS"

    def __init__(self, path: str, detail: object):
        self.path = path
        super().__init__(
            f"the task store {path} is damaged ({detail}); with the daemon stopped, run "
            f"`{recover_hint(path)}` to set it aside and rebuild it from what can still be "
            f"read (docs/architecture.md, \"Task store faults\")")


_MUTABLE = ("state", "node", "attempt", "updated_at", "started_at", "finished_at",
            "progress_json", "reason", "result_json", "checkpoint_seq", "exit_code", "devices",
            "runner_json", "failures", "parent_session", "delivered", "exit_reason")
_INSERT = (f"INSERT INTO tasks (id, seq, tenant, spec, submitted_at, request_id, parent_ref, "
           f"{', '.join(_MUTABLE)}) VALUES ({', '.join('?' * (7 + len(_MUTABLE)))})")
_UPDATE = f"UPDATE tasks SET {', '.join(m + ' = ?' for m in _MUTABLE)} WHERE id = ?"


def _mutable_values(task: DeepTask) -> tuple:
    return (int(task.state), task.node, task.attempt, task.updated_at, task.started_at,
            task.finished_at, task.progress_json, task.reason, task.result_json,
            task.checkpoint_seq, task.exit_code, "\n".join(task.devices), task.runner_json,
            task.failures, task.parent_session, int(task.delivered), task.exit_reason)


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
        #: False when this store was created just now (start checks that against the
        #: task directories and the audit log: a deleted store must not start empty).
        self.existed = os.path.exists(path)
        try:
            self._conn = _connect(path)
        except sqlite3.DatabaseError as exc:
            raise TaskStoreDamaged(path, exc) from None
        self._thread = threading.Thread(target=self._write_loop, name="corral-taskstore",
                                        daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        self.writes = 0
        self._closed = False

    def load(self) -> tuple[list[DeepTask], dict[str, tuple[bool, bool]]]:
        """Every task, and the persisted (cordoned, draining) flags of nodes.

        Rows that do not decode are moved to the quarantine table (see the module docstring).

        Raises:
            TaskStoreDamaged: SQLite cannot read the file, or its quick check fails.
        """
        try:
            problems = [r[0] for r in self._conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise TaskStoreDamaged(self.path, "; ".join(map(str, problems)))
            rows = self._conn.execute(
                f"SELECT rowid, {', '.join(_COLUMNS)} FROM tasks ORDER BY seq").fetchall()
            flags = {name: (bool(c), bool(d)) for name, c, d in
                     self._conn.execute("SELECT name, cordoned, draining FROM node_flags")}
        except sqlite3.DatabaseError as exc:
            raise TaskStoreDamaged(self.path, exc) from None
        tasks, bad = [], []
        for row in rows:
            try:
                tasks.append(task_from_row(row[1:]))
            except (ValueError, TypeError, KeyError, AttributeError, CorralError) as exc:
                bad.append((row, _why(exc)))
        if bad:
            self._quarantine(bad)
        return tasks, flags

    def quarantined_ids(self) -> set[str]:
        """Ids of the tasks in the quarantine table."""
        return {r[0] for r in self._conn.execute("SELECT task_id FROM quarantine")}

    def _quarantine(self, bad: list[tuple[tuple, str]]) -> None:
        """Move rows that do not decode to the quarantine table: one log line and one audit
        record each. The row's raw values are kept there (row_json) for a person to repair.
        Recorded first: a crash before the move records the same row again at the next
        start, never moves one unrecorded."""
        moves = []
        for row, reason in bad:
            rowid, raw = row[0], dict(zip(_COLUMNS, row[1:], strict=True))
            task_id = str(raw["id"])
            tenant = raw["tenant"] if isinstance(raw["tenant"], str) else ""
            log.error("task store %s: task %s does not load (%s); moved to its quarantine "
                      "table, every other task loads", self.path, task_id, reason)
            if self.audit is not None:
                self.audit.append("task.quarantined", tenant=tenant, peer="daemon",
                                  detail={"task_id": task_id, "reason": reason,
                                          "store": self.path, "table": "quarantine"})
            moves.append((rowid, task_id, tenant, reason, json.dumps(raw, default=repr)))
        now = time.time()
        with self._conn:
            for rowid, task_id, tenant, reason, row_json in moves:
                self._conn.execute(
                    "INSERT INTO quarantine (task_id, tenant, reason, quarantined_at, row_json)"
                    " VALUES (?, ?, ?, ?, ?)", (task_id, tenant, reason, now, row_json))
                self._conn.execute("DELETE FROM tasks WHERE rowid = ?", (rowid,))

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
                  task.request_id, task.parent_ref, *_mutable_values(task))
        return self._put(_INSERT, params, audit)

    def update(self, task: DeepTask, audit: list | None = None) -> asyncio.Future:
        """Queue the task's current mutable fields (a snapshot taken now)."""
        return self._put(_UPDATE, (*_mutable_values(task), task.id), audit)

    def delete(self, task_ids: list[str], audit: list | None = None) -> asyncio.Future:
        """Queue the removal of tasks' rows (retention); resolves once all are committed
        (the writer commits in order, so the last one's commit covers the others).

        Raises:
            ValueError: no task ids.
        """
        if not task_ids:
            raise ValueError("delete() needs at least one task id")
        last = len(task_ids) - 1
        futures = [self._put("DELETE FROM tasks WHERE id = ?", (task_id,),
                             audit if i == last else None)
                   for i, task_id in enumerate(task_ids)]
        return futures[-1]

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


class TaskStoreMissing(CorralError):
    """tasks.db is gone (or lost tasks) while task directories or the audit log show them."""

    grpc_status = "DATA_LOSS"


def check_complete(store: TaskStore, tasks: list[DeepTask], tasks_root: str, audit) -> None:
    """Refuse a store that lost tasks: a task directory whose id the store does not know
    (in its tasks or quarantine table), or a store created just now while the audit log
    records submissions. Starting on it would silently forget those tasks.

    Raises:
        TaskStoreMissing: with the counts, the file and the recovery command.
    """
    known = {t.id for t in tasks} | store.quarantined_ids()
    try:
        dirs = {name for name in os.listdir(tasks_root) if name.startswith("task-")}
    except FileNotFoundError:
        dirs = set()
    unknown = dirs - known
    audited = (not store.existed and audit is not None
               and bool(audit.query(kind="task.submit", limit=1)))
    if not unknown and not audited:
        return
    if not store.existed:  # the empty file made just now must not pass the next start
        store.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.path + suffix)
    what = "is missing" if not store.existed else f"does not know {len(unknown)} task(s)"
    evidence = []
    if unknown:
        evidence.append(f"{len(unknown)} task directories under {tasks_root} "
                        f"(e.g. {min(unknown)})")
    if audited:
        evidence.append("task.submit records in the audit log")
    raise TaskStoreMissing(
        f"the task store {store.path} {what}, but {' and '.join(evidence)} show tasks; "
        f"restore it from a backup, or with the daemon stopped run `{recover_hint(store.path)}`"
        " to rebuild it and record every task it cannot restore (docs/architecture.md, "
        "\"Task store faults\")")


def task_from_row(row: tuple) -> DeepTask:
    """A DeepTask from the tasks columns in _COLUMNS order; raises when a value is wrong."""
    (tid, seq, tenant, spec, submitted_at, state, node, attempt, updated_at, started_at,
     finished_at, progress_json, reason, result_json, checkpoint_seq, exit_code, devices,
     runner_json, failures, request_id, parent_session, parent_ref, delivered,
     exit_reason) = row
    for name, value, kind in (("id", tid, str), ("tenant", tenant, str), ("node", node, str),
                              ("request_id", request_id, str),
                              ("parent_session", parent_session, str),
                              ("parent_ref", parent_ref, str),
                              ("exit_reason", exit_reason, str),
                              ("devices", devices, str), ("seq", seq, int),
                              ("attempt", attempt, int), ("failures", failures, int)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} is {value!r}, not {kind.__name__}")
    return DeepTask(
        id=tid, seq=seq, tenant=tenant, spec=TaskSpec.from_json(spec),
        state=TaskState(state), node=node, attempt=attempt, submitted_at=submitted_at,
        updated_at=updated_at, started_at=started_at, finished_at=finished_at,
        progress_json=progress_json, reason=reason, result_json=result_json,
        checkpoint_seq=checkpoint_seq, exit_code=exit_code,
        devices=tuple(d for d in devices.split("\n") if d), runner_json=runner_json,
        failures=failures, request_id=request_id, parent_session=parent_session,
        parent_ref=parent_ref, delivered=bool(delivered), exit_reason=exit_reason)


def _why(exc: BaseException) -> str:
    """A one-line reason for a row that does not load."""
    if isinstance(exc, json.JSONDecodeError):
        return f"its spec is not JSON: {exc}"
    if isinstance(exc, ValueError) and "TaskState" in str(exc):
        return f"unknown state: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _connect(path: str) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(_SCHEMA)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
    for name, definition in _ADDED_COLUMNS:  # a store written before they existed
        if name not in columns:
            conn.execute(f"ALTER TABLE tasks ADD COLUMN {name} {definition}")
    conn.commit()
    os.chmod(path, 0o600)
    return conn
