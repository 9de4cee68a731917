"""Removal of what a dead sandbox left, off its caller's path.

Once a sandbox's PID 1 is reaped, nothing of it runs any more: what is left is directories
(its empty cgroups, its run directory, a workspace of its own). Removing them is bookkeeping
the caller need not wait for, and on this VM's ext4 `/run` it is a third of a one-shot
`run()`'s teardown. `bury(job)` hands such a job to one background thread per process.

Bounded: while `MAX_BACKLOG` jobs wait, the next one runs inline on the caller's thread,
so a tight loop of `run()`s cannot pile up directories faster than they go. `flush()`
waits until every job handed in so far is done; it runs at interpreter exit too. A crash
before a job runs leaves exactly what a crash during a synchronous removal leaves: the
next start-up sweep (`native.sweep`) removes it, as for any dead creator's sandbox.

Fork: the thread does not exist in a forked child (the task zygote forks shims). The child
starts with an empty backlog and fresh locks; jobs queued before the fork stay the
parent's. `stop()` drains and joins the thread, for a process about to fork many times
(the zygote keeps itself thread-free).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("corral.sandbox")

#: Jobs that may wait for the thread; one more runs on the caller's thread instead.
MAX_BACKLOG = 32


class Undertaker:
    """One background thread that runs removal jobs in the order they came."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._busy = False  # the thread is running a job taken off _jobs
        self._thread: threading.Thread | None = None

    def bury(self, job: Callable[[], None]) -> None:
        """Run job soon on the background thread, or now when the backlog is full."""
        with self._cv:
            if len(self._jobs) < MAX_BACKLOG:
                self._jobs.append(job)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="corral-undertaker")
                    self._thread.start()
                self._cv.notify()
                return
        _run_logged(job)

    def pending(self) -> int:
        """Jobs handed in and not finished yet."""
        with self._cv:
            return len(self._jobs) + self._busy

    def flush(self) -> None:
        """Return once every job handed in before this call has run."""
        with self._cv:
            self._cv.wait_for(lambda: not self._jobs and not self._busy)

    def stop(self) -> None:
        """Flush, then end the thread (the next bury starts a new one)."""
        with self._cv:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._jobs.append(_STOP)
            self._cv.notify()
        thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs)
                job = self._jobs.popleft()
                if job is _STOP:
                    self._cv.notify_all()
                    return
                self._busy = True
            _run_logged(job)
            with self._cv:
                self._busy = False
                self._cv.notify_all()


def _STOP() -> None:  # the job that ends the thread
    pass


def _run_logged(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:  # noqa: BLE001 - what stays is the start-up sweep's to remove
        log.exception("removing a destroyed sandbox's leftovers failed")


#: The process's undertaker.
undertaker = Undertaker()
atexit.register(undertaker.flush)
os.register_at_fork(after_in_child=undertaker._reset)
