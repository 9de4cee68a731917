"""The local executor's doorbell (runtime/tasks/local.py): a shim rings one byte per change,
naming what it persisted (files.BELL_*); the daemon reads only what the bytes name, syncs
once for many bells, and reads everything for BELL_ANY, an unknown byte (an older shim's
"!") or when it starts to follow an attempt."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from corral.runtime.tasks import local
from corral.runtime.tasks.files import (
    BELL_ANY,
    BELL_CHECKPOINT,
    BELL_NET,
    BELL_PROGRESS,
    BELL_RESULT,
    TaskFiles,
)


class Scheduler:
    """What _sync calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.tasks = {"task-1": type("Task", (), {"tenant": "t"})()}
        self.audit = None

    async def on_pulling(self, *args) -> None:
        self.calls.append(("pulling", *args))

    async def on_started(self, task_id, attempt, started_at, runner) -> None:
        self.calls.append(("started", task_id))

    async def on_update(self, task_id, attempt, **kw) -> None:
        self.calls.append(("update", tuple(sorted(kw))))

    def on_log(self, task_id) -> None:
        self.calls.append(("log",))


@pytest.fixture
def following(tmp_path):
    """follow(task_id) -> (executor, watch, files): an executor following attempt 1 of
    the task through its real FIFO (closed after the test)."""
    opened: list[int] = []

    def follow(task_id: str):
        files = TaskFiles(str(tmp_path), task_id)
        files.create()
        os.makedirs(files.attempt_dir(1))
        executor = local.LocalExecutor(use_zygote=False)
        executor.scheduler = Scheduler()
        w = local._Watch(task_id, 1, files, files.attempt_dir(1), pid=0)
        w.fifo = os.open(files.notify_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        opened.append(w.fifo)
        return executor, w, files

    yield follow
    for fd in opened:
        os.close(fd)


@pytest.fixture
def attempt(following, monkeypatch):
    """task-1 followed, its files written; the files the executor reads are counted."""
    executor, w, files = following("task-1")
    attempt_dir = w.attempt_dir
    for name, body in (("runner.json", {"started_at": 1.0}), ("progress.json", {"done": 1}),
                       ("result.json", {"ok": True})):
        with open(os.path.join(attempt_dir, name), "w") as f:
            json.dump(body, f)
    reads: list[str] = []
    real_text = local._changed_text
    monkeypatch.setattr(local, "_changed_text",
                        lambda w, name: reads.append(name) or real_text(w, name))
    monkeypatch.setattr(TaskFiles, "latest_checkpoint",
                        lambda self: reads.append("LATEST") or 0)

    async def net(audit, tenant, task_id, attempt, attempt_dir):
        reads.append("net")
        return 0

    monkeypatch.setattr(local, "audit_net_events", net)
    bell = files.open_bell_writer()
    yield executor, w, files, bell, reads
    os.close(bell)


def _rings(executor, w, files, bell, *bells: bytes, first: bool = False) -> None:
    async def go() -> None:
        executor._loop = asyncio.get_running_loop()
        for what in bells:
            files.ring(bell, what)
        executor._on_bell(w, first)
        await asyncio.sleep(0)  # the sync task runs
        await asyncio.sleep(0)

    asyncio.run(go())


def test_the_first_look_reads_everything_then_a_progress_bell_only_its_file(attempt):
    executor, w, files, bell, reads = attempt
    _rings(executor, w, files, bell, first=True)
    assert reads == ["progress.json", "result.json", "LATEST", "net"]
    assert executor.scheduler.calls == [("started", "task-1"),
                                        ("update", ("progress_json", "result_json")),
                                        ("log",)]
    reads.clear()
    executor.scheduler.calls.clear()
    os.utime(os.path.join(w.attempt_dir, "progress.json"), ns=(1, 1))  # rewritten
    _rings(executor, w, files, bell, BELL_PROGRESS, BELL_PROGRESS, BELL_PROGRESS)
    assert reads == ["progress.json"]  # three bells, one sync, one file
    assert executor.scheduler.calls == [("update", ("progress_json",)), ("log",)]


def test_bells_name_what_is_read_and_anything_else_reads_all(attempt):
    executor, w, files, bell, reads = attempt
    w.started = True
    _rings(executor, w, files, bell, BELL_RESULT, BELL_NET)
    assert reads == ["result.json", "net"]
    reads.clear()
    _rings(executor, w, files, bell, BELL_CHECKPOINT)
    assert reads == ["LATEST"]
    for unknown in (BELL_ANY, b"?"):  # the attempt's end; an older shim's byte
        reads.clear()
        _rings(executor, w, files, bell, BELL_PROGRESS, unknown)
        assert reads == ["progress.json", "result.json", "LATEST", "net"]


def test_a_shim_gone_from_its_fifo_is_no_longer_watched_and_one_not_there_yet_is(following):
    executor, w, files = following("task-2")
    calls = []

    def on_bell(w, first=False):
        calls.append(first)
        executor._on_bell(w, first)

    async def go() -> None:
        loop = executor._loop = asyncio.get_running_loop()
        loop.add_reader(w.fifo, on_bell, w)
        on_bell(w, True)  # the first look, before the shim opened its end: end-of-file
        await asyncio.sleep(0.05)
        assert calls == [True]  # still watched, and not readable meanwhile
        bell = files.open_bell_writer()  # the shim starts, rings, and goes
        files.ring(bell, BELL_PROGRESS)
        await asyncio.sleep(0.05)
        files.ring(bell, BELL_ANY)
        os.close(bell)
        await asyncio.sleep(0.1)
        # the last bell and the end-of-file were read together, then it was let go: a
        # FIFO without a writer stays readable, and would have woken the loop on and on
        assert len(calls) <= 3 and not w.sync_due
        assert loop.remove_reader(w.fifo) is False  # already removed

    asyncio.run(go())


def test_a_shim_that_ended_without_a_bell_is_let_go_too(following):
    executor, w, files = following("task-3")
    calls = []

    async def go() -> None:
        loop = executor._loop = asyncio.get_running_loop()
        loop.add_reader(w.fifo, lambda: calls.append(1) or executor._on_bell(w))
        os.close(files.open_bell_writer())  # a shim that crashed before its first bell
        await asyncio.sleep(0.1)
        assert len(calls) == 1 and loop.remove_reader(w.fifo) is False

    asyncio.run(go())
