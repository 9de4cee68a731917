"""`corral task recover --state DIR`: rebuild a damaged or missing tasks.db, offline.

The daemon refuses to start on a task store it cannot read (TaskStoreDamaged) or on one that
lost tasks its directories or audit log still show (TaskStoreMissing). This is the way back,
run with the daemon stopped:

1. the damaged file (with its -wal and -shm) is renamed ``tasks.db.damaged-<UTC time>``,
   never deleted;
2. every row SQLite can still read from it (tasks, quarantine, node flags) is copied into a
   new store; rows that do not decode are quarantined by the next start, as usual;
3. every task known elsewhere (a directory under ``tasks/``, a ``task.submit`` audit
   record) that was not salvaged is recorded in the quarantine table as lost, with its
   tenant when the audit log names it: its spec is gone, so it cannot run again, but it is
   accounted for, and the next start does not refuse on it;
4. one ``task.store_recovered`` audit record lists what was salvaged and what was lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import struct
import time

from corral.sandbox.errors import CorralError

from .store import _ADDED_COLUMNS, _COLUMNS, _connect

#: Rows are read back in chunks of rowids when a full scan of a damaged table fails.
_CHUNK = 64
#: A chunked salvage stops after this many chunks in a row gave nothing.
_EMPTY_CHUNKS = 256


class StoreInUse(CorralError):
    """A process (the daemon) has the task store open: recovery must run offline."""

    grpc_status = "FAILED_PRECONDITION"


@dataclasses.dataclass
class Recovery:
    """What one recovery did."""

    store: str
    moved_to: str = ""  # where the old file went ("" when there was none)
    salvaged: int = 0  # task rows copied into the new store
    lost: list[str] = dataclasses.field(default_factory=list)  # ids recorded as lost
    read_errors: int = 0  # rows (or whole tables) SQLite could not read

    def summary(self) -> str:
        parts = [f"task store {self.store} rebuilt: {self.salvaged} task(s) salvaged"]
        if self.moved_to:
            parts.append(f"the old file is kept at {self.moved_to}")
        if self.lost:
            shown = ", ".join(self.lost[:10]) + (" ..." if len(self.lost) > 10 else "")
            parts.append(f"{len(self.lost)} task(s) could not be restored and are recorded "
                         f"as lost in its quarantine table: {shown}")
        return "; ".join(parts)


def recover(state_dir: str, audit=None) -> Recovery:
    """Rebuild state_dir/tasks.db (see the module docstring). audit: an open AuditLog.

    Raises:
        StoreInUse: a running process has the store open.
    """
    path = check_offline(state_dir)
    result = Recovery(store=path)
    tasks: list[tuple] = []
    quarantine: list[tuple] = []
    flags: list[tuple] = []
    if os.path.exists(path):
        tasks, quarantine, flags, result.read_errors = _salvage(path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        result.moved_to = f"{path}.damaged-{stamp}"
        for suffix in ("-wal", "-shm", ""):
            if os.path.exists(path + suffix):
                os.rename(path + suffix, result.moved_to + suffix)
    conn = _connect(path)
    try:
        with conn:
            conn.executemany(f"INSERT OR IGNORE INTO tasks ({', '.join(_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(_COLUMNS))})", tasks)
            conn.executemany("INSERT INTO quarantine (task_id, tenant, reason, quarantined_at,"
                             " row_json) VALUES (?, ?, ?, ?, ?)", quarantine)
            conn.executemany("INSERT OR REPLACE INTO node_flags (name, cordoned, draining) "
                             "VALUES (?, ?, ?)", flags)
            result.salvaged = len(tasks)
            have = {r[0] for r in conn.execute("SELECT id FROM tasks")}
            have |= {r[0] for r in conn.execute("SELECT task_id FROM quarantine")}
            now = time.time()
            for task_id, (tenant, source) in sorted(_known_tasks(state_dir, audit).items()):
                if task_id in have:
                    continue
                conn.execute(
                    "INSERT INTO quarantine (task_id, tenant, reason, quarantined_at, row_json)"
                    " VALUES (?, ?, ?, ?, '')",
                    (task_id, tenant, f"lost with the task store (known from {source}); "
                                      "its spec is gone, it cannot run again", now))
                result.lost.append(task_id)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    if audit is not None:
        audit.append("task.store_recovered", tenant="", peer="operator", detail={
            "store": path, "moved_to": result.moved_to, "salvaged": result.salvaged,
            "lost": result.lost, "read_errors": result.read_errors})
    return result


def check_offline(state_dir: str) -> str:
    """The store's path, once no process has it open.

    Raises:
        StoreInUse: a running process (the daemon) has it open.
    """
    path = os.path.join(state_dir, "tasks.db")
    users = _processes_using(path)
    if users:
        raise StoreInUse(f"{path} is open in process {', '.join(map(str, users))} (a running "
                         "daemon?); stop it first: recovery works on a closed store")
    return path


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Give the salvage copy of an older store the columns added since (their defaults),
    so its rows read in today's column order; a copy too damaged for it is read as is."""
    with contextlib.suppress(sqlite3.DatabaseError):
        have = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
        for name, definition in _ADDED_COLUMNS:
            if have and name not in have:
                conn.execute(f"ALTER TABLE tasks ADD COLUMN {name} {definition}")
        conn.commit()


def _salvage(path: str) -> tuple[list, list, list, int]:
    """Whatever rows SQLite can still read, from a copy of the file (and of its WAL): a
    full scan per table, else chunks of rowids, else row by row. A truncated file's header
    still counts the pages it lost, and SQLite then refuses every read: the copy's page
    count is set to what the file holds, so the rows on the pages that remain come back."""
    copy = f"{path}.salvage-{os.getpid()}"
    errors = 0
    try:
        for suffix in ("", "-wal"):
            if os.path.exists(path + suffix):
                shutil.copyfile(path + suffix, copy + suffix)
        _fit_page_count(copy)
        try:
            conn = sqlite3.connect(copy)
        except sqlite3.DatabaseError:
            return [], [], [], 1
        try:
            _add_missing_columns(conn)
            out = []
            for table, columns in (("tasks", _COLUMNS),
                                   ("quarantine", ("task_id", "tenant", "reason",
                                                   "quarantined_at", "row_json")),
                                   ("node_flags", ("name", "cordoned", "draining"))):
                rows, failed = _read_table(conn, table, columns)
                out.append(rows)
                errors += failed
        finally:
            conn.close()
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy + suffix)
    return out[0], out[1], out[2], errors


def _fit_page_count(path: str) -> None:
    """Set an SQLite file's in-header page count (offset 28) to the pages it really has."""
    with open(path, "r+b") as f:
        header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return
        page_size = struct.unpack(">H", header[16:18])[0]
        page_size = 65536 if page_size == 1 else page_size
        pages = os.fstat(f.fileno()).st_size // page_size
        if pages and struct.unpack(">I", header[28:32])[0] > pages:
            f.seek(28)
            f.write(struct.pack(">I", pages))


def _read_table(conn: sqlite3.Connection, table: str, columns: tuple) -> tuple[list, int]:
    try:  # a store older than a column gives its default (NULL -> the schema's default)
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    except sqlite3.DatabaseError:
        have = set(columns)
    wanted = [c if c in have or not have else "''" for c in columns]
    select = f"SELECT {', '.join(wanted)} FROM {table}"
    try:
        return conn.execute(select).fetchall(), 0
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc) or "not a database" in str(exc):
            return [], int("not a database" in str(exc))
    rows, errors, empty, start = [], 0, 0, 1
    while empty < _EMPTY_CHUNKS:
        try:
            chunk = conn.execute(f"{select} WHERE rowid >= ? AND rowid < ?",
                                 (start, start + _CHUNK)).fetchall()
        except sqlite3.DatabaseError:  # one by one: a bad row costs only itself
            chunk = []
            for rowid in range(start, start + _CHUNK):
                try:
                    chunk += conn.execute(f"{select} WHERE rowid = ?", (rowid,)).fetchall()
                except sqlite3.DatabaseError:
                    errors += 1
        rows += chunk
        empty = 0 if chunk else empty + 1
        start += _CHUNK
    return rows, errors


def _known_tasks(state_dir: str, audit) -> dict[str, tuple[str, str]]:
    """task id -> (tenant, where it is known from), from the task directories and the audit
    log's task.submit records; tasks whose retention removed them (task.expired) are not."""
    known: dict[str, tuple[str, str]] = {}
    root = os.path.join(state_dir, "tasks")
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("task-"):
                known[name] = ("", "its directory")
    if audit is not None:
        expired: set[str] = set()
        for kind in ("task.submit", "task.expired"):
            after = 0
            while True:
                page = audit.query(kind=kind, after_seq=after, limit=1000)
                if not page:
                    break
                for rec in page:
                    detail = rec.detail
                    ids = detail.get("task_ids") or [detail.get("task_id")]
                    for task_id in ids:
                        if not task_id:
                            continue
                        if kind == "task.expired":
                            expired.add(task_id)
                        else:
                            source = ("its directory and the audit log" if task_id in known
                                      else "the audit log")
                            known[task_id] = (rec.tenant, source)
                after = page[-1].seq
        for task_id in expired:
            known.pop(task_id, None)
    return known


def _processes_using(path: str) -> list[int]:
    """Pids (not ours) with path open, read from /proc/*/fd."""
    target = os.path.realpath(path)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found
