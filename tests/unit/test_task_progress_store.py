"""A task's progress reaches watchers at once and the task store at most once a second:
a real Scheduler, TaskStore and AuditLog on disk, with an executor that reports progress
the way a shim does (on_started, then on_update per PROGRESS frame)."""

from __future__ import annotations

import asyncio
import json
import os

from corral.runtime.audit import AuditLog
from corral.runtime.auth import Caller
from corral.runtime.tasks import scheduler as scheduler_module
from corral.runtime.tasks.model import TaskSpec
from corral.runtime.tasks.nodes import NodeConfig
from corral.runtime.tasks.scheduler import Scheduler
from corral.runtime.tasks.states import TaskState
from corral.runtime.tasks.store import TaskStore

REPORTS = 40


class Reporter:
    """An executor whose attempts start at once and report REPORTS progress steps."""

    def __init__(self) -> None:
        self.reported = asyncio.Event()

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    async def stop(self) -> None:
        pass

    def node_alive(self, node) -> bool:
        return True

    async def launch(self, task, node, plan) -> None:
        asyncio.get_running_loop().create_task(self._run(task.id, plan.attempt))

    async def _run(self, task_id: str, attempt: int) -> None:
        sched = self.scheduler
        await sched.on_started(task_id, attempt, 1.0, {"sandbox_id": "sbx-000000000001"})
        for step in range(1, REPORTS + 1):
            await sched.on_update(task_id, attempt, progress_json=json.dumps({"step": step}))
        self.reported.set()


def _stored_progress(state_dir: str, task_id: str) -> dict:
    store = TaskStore(os.path.join(state_dir, "tasks.db"))
    try:
        tasks, _ = store.load()
    finally:
        store.close()
    return json.loads({t.id: t for t in tasks}[task_id].progress_json or "{}")


def test_progress_is_told_at_once_and_stored_at_most_once_an_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler_module, "PROGRESS_STORE_INTERVAL_S", 0.3)
    state = str(tmp_path)

    async def run() -> tuple[list[str], int, dict, dict]:
        audit = AuditLog.open(os.path.join(state, "audit.db"))
        reporter = Reporter()
        sched = Scheduler(state, audit, [NodeConfig("n1", resources={"cpu": 1},
                                                    executor="local")],
                          executors={"local": reporter})
        await sched.start()
        told: list[str] = []
        sched.listeners.append(lambda task: told.append(task.progress_json))
        task = await sched.submit(Caller("acme", "test"), TaskSpec(argv=["true"]))
        await asyncio.wait_for(reporter.reported.wait(), 30)
        writes_after_reports = sched.store.writes
        await asyncio.sleep(0.6)  # one interval: the latest progress is stored once
        writes_after_interval = sched.store.writes
        stored_before_stop = _stored_progress(state, task.id)
        assert sched.tasks[task.id].state == TaskState.RUNNING
        # another report, then a stop before its interval: the stop stores it
        await sched.on_update(task.id, task.attempt, progress_json=json.dumps({"step": 99}))
        await sched.stop()
        audit.close()
        return (told, writes_after_interval - writes_after_reports, stored_before_stop,
                _stored_progress(state, task.id))

    told, interval_writes, before_stop, after_stop = asyncio.run(run())
    steps = [json.loads(p)["step"] for p in told if p]
    assert steps[:REPORTS] == list(range(1, REPORTS + 1))  # every report told, in order
    assert interval_writes == 1  # forty reports, one row write
    assert before_stop == {"step": REPORTS}
    assert after_stop == {"step": 99}
