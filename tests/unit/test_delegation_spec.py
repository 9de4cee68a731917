"""Delegation without a daemon: a DELEGATE's arguments -> TaskSpec (every refusal names its
field as the agent wrote it), and the parent link in the task store (old stores upgrade)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from corral.runtime.session_state import TaskNote, TurnEnded, deliverable
from corral.runtime.tasks.delegation import parse_delegate
from corral.runtime.tasks.model import DeepTask, TaskSpec
from corral.runtime.tasks.store import TaskStore
from corral.sandbox.errors import InvalidSpec


def test_a_full_delegate_becomes_a_task_spec_and_its_files():
    spec, files = parse_delegate({
        "argv": ["python3", "sim.py"], "selector": {"accelerator": "gpu"},
        "resources": {"cpu": 2}, "priority": 7, "retries": 1, "max_runtime": "20m",
        "files": ["sim.py", "data/in.csv"], "labels": {"job": "sim"}})
    assert spec == TaskSpec(argv=("python3", "sim.py"), selector={"accelerator": "gpu"},
                            resources={"cpu": 2.0}, priority=7, retries=1,
                            max_runtime_s=1200.0, labels={"job": "sim"})
    assert files == ["sim.py", "data/in.csv"]


@pytest.mark.parametrize(("arguments", "field", "message"), [
    ([1], "delegate", "must be a JSON object"),
    ({"argv": "true"}, "delegate.argv", "must be a list of strings"),
    ({"argv": []}, "delegate.argv", None),
    ({"argv": ["true"], "gpu": 1}, "delegate.gpu", None),
    ({"argv": ["true"], "priority": "high"}, "delegate.priority", "'high' must be a number"),
    ({"argv": ["true"], "priority": 5000}, "delegate.priority", None),
    ({"argv": ["true"], "selector": {"Bad Key": "x"}}, "delegate.selector", None),
    ({"argv": ["true"], "resources": {"cpu": -1}}, "delegate.resources[cpu]", None),
    ({"argv": ["true"], "max_runtime": "soon"}, "delegate.max_runtime", None),
    ({"argv": ["true"], "files": "a.txt"}, "delegate.files", "must be a list of strings"),
    ({"argv": ["true"], "image": 3}, "delegate.image", "must be an image REF (a string)"),
])
def test_a_malformed_delegate_names_its_field(arguments, field, message):
    with pytest.raises(InvalidSpec) as err:
        parse_delegate(arguments)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    if message is not None:
        assert str(err.value) == f"{field}: {message}"


def test_the_parent_link_is_stored_and_read_back(tmp_path):
    path = str(tmp_path / "tasks.db")
    store = TaskStore(path)
    store.start(None)
    task = DeepTask(id="task-1", seq=1, tenant="acme", spec=TaskSpec(argv=("true",)),
                    submitted_at=time.time(), parent_session="ses-1", parent_ref="sim")
    store.insert(task)
    task.parent_session, task.delivered = "ses-2", True  # taken over, then told
    store.update(task)
    store.close()
    store = TaskStore(path)
    [loaded] = store.load()[0]
    store.close()
    assert (loaded.parent_session, loaded.parent_ref, loaded.delivered) == (
        "ses-2", "sim", True)


def test_a_store_from_before_delegation_is_upgraded(tmp_path):
    path = str(tmp_path / "tasks.db")
    store = TaskStore(path)
    store.start(None)
    store.insert(DeepTask(id="task-1", seq=1, tenant="acme", spec=TaskSpec(argv=("true",)),
                          submitted_at=time.time()))
    store.close()
    conn = sqlite3.connect(path)
    for column in ("parent_session", "parent_ref", "delivered"):
        conn.execute(f"ALTER TABLE tasks DROP COLUMN {column}")
    conn.commit()
    conn.close()
    store = TaskStore(path)
    [task] = store.load()[0]
    store.close()
    assert (task.parent_session, task.parent_ref, task.delivered) == ("", "", False)


def test_task_news_waits_for_the_entries_before_it():
    note = TaskNote("update", seq=5, task_id="task-1")
    assert not deliverable(note, 4)
    assert deliverable(note, 5)
    assert deliverable(TurnEnded(1, "completed", 3), 4)


def test_steering_for_a_task_is_taken_once_in_the_order_it_was_posted(tmp_path):
    from corral.runtime.tasks.files import TaskFiles

    files = TaskFiles(str(tmp_path), "task-1")
    assert files.take_inputs() == []  # no inbox yet
    for text in ("first", "second", "third"):
        files.post_input(text)
    (tmp_path / "task-1" / "inbox" / "x.tmp-123").write_bytes(b"half written")
    assert files.take_inputs() == [b"first", b"second", b"third"]
    assert files.take_inputs() == []
