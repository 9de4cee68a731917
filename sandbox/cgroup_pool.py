"""Cgroups made ahead of time: a sandbox's create takes one instead of making it.

Making a sandbox's cgroup is a mkdir in every hierarchy (five on this v1 host) and the limit
writes, one of which (the CPU quota) walks every task group of the host: 0.3 ms of a 4.4 ms
one-shot `run()` here, more as the host fills. A long-lived process that starts sandboxes
(the daemon, with `cgroup_pool_size`) keeps a few ready per limits class instead, so that a
create only takes one; making them is done off the caller's path.

- **Made ahead.** `take(limits)` hands out a ready cgroup of exactly those limits, or None
  (the caller then makes one as before). A take wakes a refill on the undertaker's thread
  (sandbox/undertaker.py), back to `size` ready. At most `MAX_CLASSES` classes (a class is
  one CgroupLimits value) are kept, the first ones asked for.
- **Used once, never reused.** A cgroup's next user must not see anything of the last one,
  and the kernel cannot reset all of it: on v1, cpu.stat's nr_periods and throttled_time,
  cpuacct.stat and the kernel memory still charged to the memcg (about 300 KB of a sandbox's
  namespaces and dentries, which memory.force_empty does not reclaim); on v2, cpu.stat's
  usage and memory.events. So a pooled cgroup is removed after its sandbox exactly as one
  made on demand (on the undertaker's thread too), and the refill makes a new one. A
  sandbox that takes one starts with the counters of a new cgroup, its limits written when
  it was made, thawed (tests/linux/test_cgroup_pool.py).
- **Names.** A pooled cgroup is `corral/pool.<pid>.<start time>.<n>`, of the process that
  made it. A sandbox records the cgroup it runs in in its state.json (`cgroup`), and every
  lookup of a sandbox's cgroup (the start-up sweep, adopt, live restore) reads it there.
  `sweep()` removes the idle pool cgroups of processes that are gone (native.sweep calls
  it); `drain()` removes this process's ready ones (the daemon's stop, and at exit).

The pool is off unless `enable(size)` is called: a one-shot `corral run` would only make
cgroups it never uses.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import threading

from . import cgroups
from .errors import CorralError
from .procinfo import live_start_time
from .undertaker import undertaker

#: Names of pooled cgroups start with this; the rest is "<pid>.<start time>.<n>".
PREFIX = "pool."
#: Limits classes kept ready at most.
MAX_CLASSES = 8
#: Ready cgroups per class, at most.
MAX_SIZE = 64

_NAME = re.compile(r"pool\.(\d+)\.(\d+)\.\d+")


class CgroupPool:
    """Ready cgroups by limits class, for one cgroup layout."""

    def __init__(self, layout: cgroups.CgroupLayout, size: int) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"a cgroup pool holds 1-{MAX_SIZE} per class, not {size}")
        self.layout = layout
        self.size = size
        self._lock = threading.Lock()
        self._ready: dict[cgroups.CgroupLimits, list[cgroups.Cgroup]] = {}
        self._refilling: set[cgroups.CgroupLimits] = set()
        self._serial = itertools.count()
        self._closed = False
        pid = os.getpid()
        self._prefix = f"{PREFIX}{pid}.{live_start_time(pid)}."
        #: Creates that took a ready cgroup, and those that found none.
        self.hits = 0
        self.misses = 0

    def take(self, limits: cgroups.CgroupLimits) -> cgroups.Cgroup | None:
        """A ready cgroup with exactly these limits (the caller's from now on, to destroy
        like any other), or None."""
        with self._lock:
            if self._closed:
                return None
            ready = self._ready.get(limits)
            if ready is None:
                if len(self._ready) >= MAX_CLASSES:
                    self.misses += 1
                    return None
                ready = self._ready[limits] = []
            cg = ready.pop() if ready else None
            if cg is None:
                self.misses += 1
            else:
                self.hits += 1
            refill = limits not in self._refilling
            if refill:
                self._refilling.add(limits)
        if refill:
            undertaker.bury(lambda: self._refill(limits))
        return cg

    def ready(self) -> list[str]:
        """Names of the cgroups ready now."""
        with self._lock:
            return sorted(cg.name for ready in self._ready.values() for cg in ready)

    def drain(self) -> None:
        """Remove every ready cgroup; the pool makes no more (take answers None)."""
        with self._lock:
            self._closed = True
            idle = [cg for ready in self._ready.values() for cg in ready]
            self._ready.clear()
        for cg in idle:
            with contextlib.suppress(CorralError, OSError):
                cg.destroy()

    def _refill(self, limits: cgroups.CgroupLimits) -> None:
        """Make cgroups of this class until `size` are ready (the undertaker's thread)."""
        while True:
            with self._lock:
                ready = self._ready.get(limits)
                if self._closed or ready is None or len(ready) >= self.size:
                    self._refilling.discard(limits)  # in the same hold as the last look
                    return
                name = f"{self._prefix}{next(self._serial)}"
            try:
                cg = cgroups.Cgroup.create(self.layout, name, limits)
            except BaseException:
                with self._lock:
                    self._refilling.discard(limits)  # the next take tries again
                raise
            with self._lock:
                kept = not self._closed
                if kept:
                    self._ready[limits].append(cg)
            if not kept:
                cg.destroy()


# -- the process's pool ------------------------------------------------------------------------

_pool: CgroupPool | None = None


def enable(size: int) -> CgroupPool | None:
    """Keep `size` cgroups ready per limits class in this process (0: none, the default);
    returns the pool, or None when there is none (size 0, or no delegated cgroups here)."""
    global _pool
    disable()
    if size <= 0:
        return None
    from .backends.native import _cgroup_layout

    layout = _cgroup_layout()
    if cgroups.delegation_problem(layout) is not None:
        return None
    _pool = CgroupPool(layout, size)
    return _pool


def disable() -> None:
    """Remove the ready cgroups and keep none from now on."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.drain()
        undertaker.flush()  # a refill under way ends; what it made after the drain goes


def current() -> CgroupPool | None:
    """The process's pool, or None when it keeps none."""
    return _pool


def sweep(layout: cgroups.CgroupLayout) -> list[str]:
    """Remove the idle pool cgroups of processes that are gone; returns their names.

    One of a dead process's pool that holds a process belongs to a sandbox: that sandbox's
    own sweep (native.sweep, by its state.json) removes it, not this one.
    """
    def owner_gone(name: str) -> bool:
        m = _NAME.fullmatch(name)
        return m is not None and live_start_time(int(m.group(1))) != int(m.group(2))

    return cgroups.reap_orphans(layout, PREFIX, pick=owner_gone)


def _forget_in_child() -> None:
    global _pool
    _pool = None  # the parent's: a forked child makes its own if it enables one


atexit.register(lambda: _pool is not None and disable())
os.register_at_fork(after_in_child=_forget_in_child)
