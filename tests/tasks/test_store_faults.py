"""tasks.db faults at start (issue 20.5), through the real daemon.

A bad row is quarantined and everything else loads; a file SQLite cannot read is refused in
one line that names it and the recovery command; a deleted store is noticed against the task
directories and the audit log. `corral task recover` brings each back.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from .helpers import SUCCEEDED, wait_done


def _finished_tasks(d, n: int) -> list[str]:
    c = d.client()
    ids = [c.submit_task(["sh", "-c", f"echo {i}"]).id for i in range(n)]
    for task_id in ids:
        assert wait_done(c, task_id).state == SUCCEEDED
    return ids


def _sql(d, statement: str, *params) -> None:
    conn = sqlite3.connect(d.state / "tasks.db")
    with conn:
        conn.execute(statement, params)
    conn.close()


def _refusal(d) -> list[str]:
    """Start expecting a refusal: exit status 1 and the daemon's log lines of this start."""
    before = len(d.log().splitlines())
    assert d.run_to_exit() == 1
    lines = d.log().splitlines()[before:]
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    return [line for line in lines if " ERROR " in line]


def _recover(d) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", "task", "recover",
                           "--state", str(d.state)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_bad_rows_are_quarantined_and_the_rest_loads(task_daemon):
    d = task_daemon()
    good, bad_state, bad_spec = _finished_tasks(d, 3)
    assert d.stop() == 0
    _sql(d, "UPDATE tasks SET state = 99 WHERE id = ?", bad_state)
    _sql(d, "UPDATE tasks SET spec = '{not json' WHERE id = ?", bad_spec)

    d.start()
    c = d.client()
    assert c.get_task(good).state == SUCCEEDED
    assert [t.id for t in c.list_tasks()] == [good]
    errors = [line for line in d.log().splitlines() if "quarantine table" in line]
    assert len(errors) == 2
    assert f"task {bad_state} does not load (unknown state: 99 is not a valid TaskState)" \
        in errors[0]
    assert f"task {bad_spec} does not load (its spec is not JSON: " in errors[1]
    records = c.audit_query(kind="task.quarantined")
    assert [r.tenant for r in records] == ["local", "local"]
    assert [json.loads(r.detail_json)["task_id"] for r in records] == [bad_state, bad_spec]
    assert d.stop() == 0
    conn = sqlite3.connect(d.state / "tasks.db")
    rows = conn.execute("SELECT task_id, tenant, row_json FROM quarantine ORDER BY qid").fetchall()
    conn.close()
    assert [(r[0], r[1]) for r in rows] == [(bad_state, "local"), (bad_spec, "local")]
    assert json.loads(rows[0][2])["state"] == 99  # the raw row is kept for repair
    # A second start finds nothing more to quarantine.
    d.start()
    assert len(d.client().audit_query(kind="task.quarantined")) == 2


def test_a_damaged_store_is_refused_in_one_line_and_recovered(task_daemon):
    d = task_daemon()
    ids = _finished_tasks(d, 2)
    assert d.stop() == 0
    path = d.state / "tasks.db"
    assert not os.path.exists(f"{path}-wal")  # a clean stop checkpoints the WAL
    with open(path, "r+b") as f:  # garbage over the header: not a database any more
        f.write(b"\xff" * 100)

    errors = _refusal(d)
    assert len(errors) == 1
    assert f"the task store {path} is damaged (file is not a database); with the daemon " \
        f"stopped, run `corral task recover --state {d.state}`" in errors[0]

    done = _recover(d)
    assert done.returncode == 0, done.stderr
    assert f"task store {path} rebuilt: 0 task(s) salvaged" in done.stdout
    assert "2 task(s) could not be restored" in done.stdout
    assert [p for p in os.listdir(d.state) if p.startswith("tasks.db.damaged-")]
    d.start()
    c = d.client()
    assert c.list_tasks() == []
    [rec] = c.audit_query(kind="task.store_recovered")
    assert sorted(json.loads(rec.detail_json)["lost"]) == sorted(ids)


def test_a_truncated_store_is_refused_and_its_readable_rows_recovered(task_daemon):
    d = task_daemon()
    # Specs with a large file each spread the rows over many pages.
    c = d.client()
    ids = [c.submit_task(["true"], files={"pad": bytes(20000)}).id for _ in range(20)]
    for task_id in ids:
        wait_done(c, task_id)
    assert d.stop() == 0
    path = d.state / "tasks.db"
    size = os.path.getsize(path)
    os.truncate(path, size // 2)

    errors = _refusal(d)
    assert len(errors) == 1
    assert f"the task store {path} is damaged (" in errors[0]
    assert f"run `corral task recover --state {d.state}`" in errors[0]

    done = _recover(d)
    assert done.returncode == 0, done.stderr
    d.start()
    c = d.client()
    kept = {t.id for t in c.list_tasks()}
    [rec] = c.audit_query(kind="task.store_recovered")
    lost = set(json.loads(rec.detail_json)["lost"])
    assert kept | lost == set(ids) and not kept & lost
    assert kept  # the first half of the file still held rows


def test_a_deleted_store_is_noticed_and_recovered(task_daemon):
    d = task_daemon()
    ids = _finished_tasks(d, 3)
    assert d.stop() == 0
    os.unlink(d.state / "tasks.db")

    errors = _refusal(d)
    assert len(errors) == 1
    assert f"the task store {d.state / 'tasks.db'} is missing, but 3 task directories " \
           f"under {d.state / 'tasks'} (e.g. {min(ids)}) and task.submit records in the " \
           "audit log show tasks; restore it from a backup, or with the daemon stopped run " \
           f"`corral task recover --state {d.state}`" in errors[0]
    # The refused start left no empty store that a second start would take as the real one.
    assert not os.path.exists(d.state / "tasks.db")
    errors = _refusal(d)
    assert len(errors) == 1 and "is missing" in errors[0]

    done = _recover(d)
    assert done.returncode == 0, done.stderr
    assert "3 task(s) could not be restored" in done.stdout
    d.start()
    [rec] = d.client().audit_query(kind="task.store_recovered")
    assert sorted(json.loads(rec.detail_json)["lost"]) == sorted(ids)


def test_a_deleted_store_with_no_task_directories_is_noticed_from_the_audit_log(task_daemon):
    d = task_daemon()
    ids = _finished_tasks(d, 2)
    assert d.stop() == 0
    os.unlink(d.state / "tasks.db")
    subprocess.run(["rm", "-rf", str(d.state / "tasks")], check=True)

    for _ in range(2):  # a refused start leaves no empty store behind to pass the next
        errors = _refusal(d)
        assert len(errors) == 1
        assert "is missing, but task.submit records in the audit log show tasks" in errors[0]
    assert _recover(d).returncode == 0
    d.start()
    conn = sqlite3.connect(d.state / "tasks.db")
    lost = conn.execute("SELECT task_id, tenant, reason FROM quarantine").fetchall()
    conn.close()
    assert sorted(lost) == sorted(
        (i, "local", "lost with the task store (known from the audit log); its spec is gone, "
                     "it cannot run again") for i in ids)


def test_recover_refuses_while_the_daemon_runs(task_daemon):
    d = task_daemon()
    done = _recover(d)
    assert done.returncode == 1
    assert done.stderr.startswith(f"corral: task recover: {d.state / 'tasks.db'} is open in "
                                  f"process {d.pid} (a running daemon?); stop it first")
