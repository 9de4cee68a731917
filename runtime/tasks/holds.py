"""Snapshots held by the deep tasks that start from them (spec.sandbox.snapshot).

Each attempt's sandbox holds its snapshot while it runs (sandbox/backends/native.py), but
a task lives longer than its attempts: it waits in the queue, between retries, across a
daemon restart. The daemon holds the snapshot for the task itself (holder: the task id)
from its submit until it ends, so `corral snapshot rm` is refused meanwhile
(SnapshotInUse) and no attempt finds its files gone. The holds are flocks of the daemon's
(sandbox/state/snapshots.py): a daemon that dies drops them, and the next one takes them
again for the tasks it finds unfinished (start).
"""

from __future__ import annotations

import logging

from corral.sandbox.errors import CorralError
from corral.sandbox.state.snapshots import SnapshotStore

log = logging.getLogger("corral.tasks.holds")


class SnapshotHolds:
    """The daemon's holds of snapshots, one per unfinished task that starts from one."""

    def __init__(self, store: SnapshotStore | None = None):
        self.store = store or SnapshotStore()
        self._held: dict[str, object] = {}  # task id -> HeldSnapshot

    def start(self, scheduler) -> None:
        """Hold for every unfinished task, and follow every task's changes from now on."""
        for task in list(scheduler.tasks.values()):
            try:
                self.sync(task)
            except CorralError as exc:  # its attempt reports the missing snapshot itself
                log.warning("task %s: cannot hold snapshot %s: %s", task.id,
                            task.spec.sandbox.snapshot, exc)
        # (a listener's exception is logged by the scheduler; the task goes on)
        scheduler.listeners.append(self.sync)

    def sync(self, task) -> None:
        """Hold the task's snapshot while it is unfinished; release it once it ended.

        Raises:
            SnapshotNotFound: (a new hold) the snapshot is gone, or not the tenant's.
        """
        snapshot = task.spec.sandbox.snapshot
        if not snapshot:
            return
        if task.terminal:
            held = self._held.pop(task.id, None)
            if held is not None:
                held.close()
            return
        if task.id not in self._held:
            self._held[task.id] = self.store.hold(snapshot, task.id, task.tenant)

