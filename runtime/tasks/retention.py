"""Retention of deep tasks: what a finished task and a lost attempt leave is removed in time.

A finished task (SUCCEEDED, FAILED, CANCELLED) keeps its row, RESULT, output files, log and
checkpoint for `retention_s` after it ended; then its directory goes first and its row
second (a crash between the two leaves a row without a directory, which the next pass
removes; never a directory without a row, which the next start would take for a lost
store), behind one ``task.expired`` audit record per tenant and pass that lists the ids.
Its request_id is forgotten with it.

An attempt that was lost (its shim or node died) never cleaned up after itself: its
workspace (a capped tmpfs, or a directory in an older layout) stays until the attempt is
`retention_s` old, then goes behind a ``task.workspace_expired`` record. The current attempt
of a task that still runs is never touched, nor any attempt whose shim still holds its lock.

retention_s = 0 keeps everything (the behaviour before retention existed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections import defaultdict

from corral.sandbox import fstree, workspace_fs

from .files import TaskFiles
from .shim import LOCK_NAME

log = logging.getLogger("corral.tasks.retention")

#: The shortest and longest wait between two passes (a pass runs every retention_s / 4).
MIN_PASS_S = 0.5
MAX_PASS_S = 600.0


class TaskRetention:
    """Periodic removal of expired tasks and lost attempts' workspaces, for one scheduler."""

    def __init__(self, scheduler, retention_s: float):
        self.scheduler = scheduler
        self.retention_s = retention_s
        self.expired = 0  # tasks removed, ever
        self.workspaces = 0  # lost attempts' workspaces removed, ever
        self._task: asyncio.Task | None = None

    @property
    def interval_s(self) -> float:
        return min(MAX_PASS_S, max(MIN_PASS_S, self.retention_s / 4))

    def start(self) -> None:
        if self.retention_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next pass tries again
                log.exception("task retention pass failed")
            await asyncio.sleep(self.interval_s)

    async def collect(self, now: float | None = None) -> tuple[int, int]:
        """One pass: (tasks removed, lost attempts' workspaces removed)."""
        sched = self.scheduler
        now = time.time() if now is None else now
        cutoff = now - self.retention_s
        loop = asyncio.get_running_loop()
        expired = [t for t in list(sched.tasks.values())
                   if t.terminal and 0 < t.finished_at <= cutoff]
        lost = await loop.run_in_executor(None, self._lost_workspaces, cutoff)
        for task_id, attempt, path in lost:
            removed = await loop.run_in_executor(None, _remove_workspace, path)
            if removed:
                self.workspaces += 1
                task = sched.tasks.get(task_id)
                sched.audit.append("task.workspace_expired",
                                   tenant=task.tenant if task else "", peer="daemon",
                                   detail={"task_id": task_id, "attempt": attempt,
                                           "retention_s": self.retention_s})
        if not expired:
            return 0, len(lost)
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for task in expired:
            await loop.run_in_executor(None, self._remove_dir, task.id)
            by_tenant[task.tenant].append(task.id)
        audit = [("task.expired", {"tenant": tenant, "peer": "daemon", "detail": {
            "task_ids": ids, "count": len(ids), "retention_s": self.retention_s}})
                 for tenant, ids in sorted(by_tenant.items())]
        await sched.store.delete([t.id for t in expired], audit)
        for task in expired:
            sched.forget(task)
        self.expired += len(expired)
        log.info("task retention: removed %d task(s) finished over %gs ago", len(expired),
                 self.retention_s)
        return len(expired), len(lost)

    def _remove_dir(self, task_id: str) -> None:
        files = TaskFiles(self.scheduler.tasks_root, task_id)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(files.dir):
                if name.startswith("attempt-"):
                    _remove_workspace(os.path.join(files.dir, name, "workspace"))
        fstree.remove_tree(files.dir, ignore_errors=True)

    def _lost_workspaces(self, cutoff: float) -> list[tuple[str, int, str]]:
        """(task id, attempt, workspace path) of attempts that are over, older than cutoff,
        whose workspace is still there."""
        sched = self.scheduler
        found = []
        for task in list(sched.tasks.values()):
            files = TaskFiles(sched.tasks_root, task.id)
            try:
                names = os.listdir(files.dir)
            except FileNotFoundError:
                continue
            for name in names:
                if not name.startswith("attempt-") or not name[8:].isdigit():
                    continue
                attempt = int(name[8:])
                if attempt == task.attempt and not task.terminal:
                    continue  # the attempt that runs now (or is about to)
                adir = os.path.join(files.dir, name)
                workspace = os.path.join(adir, "workspace")
                try:
                    os.lstat(workspace)  # gone already: nothing to do
                    if os.stat(adir).st_mtime > cutoff:
                        continue  # not old enough
                except FileNotFoundError:
                    continue
                if _lock_held(os.path.join(adir, LOCK_NAME)):
                    continue  # its shim is alive after all
                found.append((task.id, attempt, workspace))
        return found


def _remove_workspace(link: str) -> bool:
    """Remove an attempt's workspace: the tmpfs a link points to (and the link), or a
    directory of the older layout. True when something was there."""
    try:
        st = os.lstat(link)
    except FileNotFoundError:
        return False
    if os.path.islink(link):
        target = os.readlink(link)
        if workspace_fs.is_managed(target):
            workspace_fs.remove(target)
        os.unlink(link)
    elif stat.S_ISDIR(st.st_mode):
        fstree.remove_tree(link, ignore_errors=True)
    else:
        os.unlink(link)
    return True


def _lock_held(path: str) -> bool:
    from .local import _lock_held as held

    return held(path)
