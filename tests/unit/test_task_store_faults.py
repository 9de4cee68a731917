"""TaskStore faults without a daemon (no root): quarantine, refusal, salvage of a truncated file.

The daemon-level tests are tests/tasks/test_store_faults.py; these pin the store's own rules.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest

from corral.runtime.tasks import recover as recover_mod
from corral.runtime.tasks.model import DeepTask, TaskSpec
from corral.runtime.tasks.states import TaskState
from corral.runtime.tasks.store import (
    TaskStore,
    TaskStoreDamaged,
    TaskStoreMissing,
    check_complete,
)


class Audit:
    """Records appended, and task.submit ids answered to query()."""

    def __init__(self, submitted: list[str] = ()):
        self.records: list[tuple[str, dict]] = []
        self.submitted = list(submitted)

    def append(self, kind: str, **fields) -> None:
        self.records.append((kind, fields))

    def query(self, *, kind: str, limit: int, after_seq: int = 0):
        if kind != "task.submit" or after_seq or not self.submitted:
            return []

        class Rec:
            seq = 1
            tenant = "acme"
            detail = {"task_ids": self.submitted}

        return [Rec()]


def _fill(path: str, n: int, pad: int = 0) -> list[str]:
    store = TaskStore(path)
    store.start(None)
    ids = []
    for i in range(n):
        task = DeepTask(id=f"task-{i:04d}", seq=i + 1, tenant="acme",
                        spec=TaskSpec(argv=("true",), files={"pad": bytes(pad)} if pad else {}),
                        submitted_at=time.time(), request_id=f"r{i}")
        store.insert(task)
        task.state = TaskState.SUCCEEDED
        store.update(task)
        ids.append(task.id)
    store.close()
    return ids


def _sql(path: str, statement: str, *params) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement, params)
    conn.close()


def test_rows_that_do_not_decode_are_quarantined(tmp_path):
    path = str(tmp_path / "tasks.db")
    ids = _fill(path, 4)
    _sql(path, "UPDATE tasks SET state = 99 WHERE id = ?", ids[0])
    _sql(path, "UPDATE tasks SET spec = '{not json' WHERE id = ?", ids[1])
    _sql(path, "UPDATE tasks SET spec = '{\"argv\": []}' WHERE id = ?", ids[2])
    audit = Audit()
    store = TaskStore(path, audit)
    tasks, _flags = store.load()
    assert [t.id for t in tasks] == [ids[3]]
    assert tasks[0].request_id == "r3" and tasks[0].state == TaskState.SUCCEEDED
    assert store.quarantined_ids() == set(ids[:3])
    reasons = [fields["detail"]["reason"] for kind, fields in audit.records]
    assert [kind for kind, _ in audit.records] == ["task.quarantined"] * 3
    assert reasons[0] == "unknown state: 99 is not a valid TaskState"
    assert reasons[1].startswith("its spec is not JSON: ")
    assert reasons[2] == "InvalidSpec: spec.argv: the command is empty"
    assert {fields["tenant"] for _, fields in audit.records} == {"acme"}
    store.close()
    # Loaded again: nothing more to move, the quarantined rows are kept raw.
    store = TaskStore(path, Audit())
    assert [t.id for t in store.load()[0]] == [ids[3]]
    row = store._conn.execute("SELECT row_json FROM quarantine WHERE task_id = ?",
                              (ids[0],)).fetchone()
    assert json.loads(row[0])["state"] == 99
    store.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = str(tmp_path / "tasks.db")
    _fill(path, 2)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 100)
    with pytest.raises(TaskStoreDamaged) as refused:
        TaskStore(path).load()
    assert str(refused.value) == (
        f"the task store {path} is damaged (file is not a database); with the daemon "
        f"stopped, run `corral task recover --state {tmp_path}` to set it aside and rebuild "
        "it from what can still be read (docs/architecture.md, \"Task store faults\")")


def test_a_truncated_file_is_refused_and_recover_salvages_its_remaining_pages(tmp_path):
    path = str(tmp_path / "tasks.db")
    ids = _fill(path, 20, pad=20000)
    for task_id in ids:  # the task directories say which tasks exist
        os.makedirs(tmp_path / "tasks" / task_id)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(TaskStoreDamaged, match="database disk image is malformed"):
        store = TaskStore(path)
        store.load()
    done = recover_mod.recover(str(tmp_path), audit=None)
    assert 0 < done.salvaged < 20
    assert sorted(done.lost) == ids[done.salvaged:]
    assert os.path.exists(done.moved_to)
    store = TaskStore(path)
    tasks, _ = store.load()
    assert [t.id for t in tasks] == ids[:done.salvaged]
    check_complete(store, tasks, str(tmp_path / "tasks"), None)  # accounted for: starts
    store.close()


def test_a_missing_store_is_noticed_and_the_empty_file_removed(tmp_path):
    path = str(tmp_path / "tasks.db")
    store = TaskStore(path)
    tasks, _ = store.load()
    with pytest.raises(TaskStoreMissing) as refused:
        check_complete(store, tasks, str(tmp_path / "tasks"), Audit(["task-0001"]))
    assert str(refused.value).startswith(
        f"the task store {path} is missing, but task.submit records in the audit log show "
        "tasks; restore it from a backup, or with the daemon stopped run `corral task "
        f"recover --state {tmp_path}`")
    assert not os.path.exists(path)
    # A fresh state directory with nothing anywhere starts.
    store = TaskStore(path)
    check_complete(store, store.load()[0], str(tmp_path / "tasks"), Audit())
    store.close()


def test_a_store_without_the_request_id_column_is_upgraded(tmp_path):
    path = str(tmp_path / "tasks.db")
    _fill(path, 1)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE tasks DROP COLUMN request_id")
    conn.commit()
    conn.close()
    store = TaskStore(path)
    [task] = store.load()[0]
    assert task.request_id == ""
    store.close()
