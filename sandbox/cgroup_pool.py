"""Cgroups made ahead and renewed: a sandbox's create takes one instead of making it.

Making a sandbox's cgroup is a mkdir in every hierarchy (five on this v1 host) and the limit
writes, one of which (the CPU quota) walks every task group of the host. Removing one is
worse as the host fills: a memory cgroup's removal makes the kernel reparent its share of
every superblock's shrinker lists (memcg_reparent_list_lrus), and each sandbox brings 5
superblocks, so at 5,000 idle sandboxes every removal costs milliseconds of a core. A
long-lived process that starts sandboxes (the daemon: `cgroup_pool_size`, 4) keeps a few
cgroups ready per limits class and renews them instead of removing them.

- **Made ahead.** `take(limits)` hands out a ready cgroup of exactly those limits, or None
  (the caller then makes one as before). A take that leaves fewer than half of `size` ready
  wakes a refill on the undertaker's thread (sandbox/undertaker.py), back to `size`; a
  sandbox that ends soon gives its cgroup back first, so steady use renews rather than
  makes. At most `MAX_CLASSES` classes (one CgroupLimits value each), the first asked for.
- **Renewed after a clean drain** (cgroup v1, `Cgroup.renew`). `give_back` runs on the
  undertaker's thread once the sandbox's processes are all gone and its workspace and run
  directory removed. Every hierarchy but memory's gets a new directory (cpu.stat's and
  cpuacct's counters have no reset); the memory cgroup is kept, its pages reclaimed
  (memory.force_empty), its peaks and fail counts written back to zero, and every limit is
  written again (a task's CPU weight may have changed one). A cgroup with a process left,
  frozen, with an OOM kill on record, or with more than 1 MiB still charged after the
  reclaim is removed instead, as one is past `size`. What carries over to the next user:
  up to that 1 MiB of charged kernel caches of host files the last one looked up (dentries
  of /usr, freed under pressure like any cache), which its `memory_bytes` includes, and
  memory.stat's cumulative event counts (page faults, pages in and out), which Corral
  never shows and a sandbox cannot read (it has no cgroupfs). Its usage counters, peaks,
  OOM kills, limits and freezer state are those of a new cgroup
  (tests/linux/test_cgroup_pool.py).
- **Cgroup v2: made ahead, used once.** One directory holds every controller, and its
  cpu.stat usage and memory.events cannot be reset: a v2 cgroup is removed after its
  sandbox, as without a pool.
- **Names.** A pooled cgroup is `corral/pool.<pid>.<start time>.<n>`, of the process that
  made it. A sandbox records its cgroup in its state.json (`cgroup`), and every lookup of a
  sandbox's cgroup (the start-up sweep, adopt, live restore) reads it there; one a sandbox
  of another process runs in is destroyed with that sandbox, never given back. `sweep()`
  removes the idle pool cgroups of processes that are gone (native.sweep calls it);
  `drain()` removes this process's ready ones (the daemon's stop, and at exit).

The pool is off unless `enable(size)` is called: a one-shot `corral run` would only make
cgroups it never uses.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

from . import cgroups
from .errors import CorralError
from .pool_slot import PoolSlot
from .procinfo import owned_name, owner_gone
from .undertaker import undertaker

#: Names of pooled cgroups start with this; the rest is "<pid>.<start time>.<n>".
PREFIX = "pool."
#: Limits classes kept ready at most.
MAX_CLASSES = 8
#: Ready cgroups per class, at most.
MAX_SIZE = 64
#: Seconds a renewed cgroup may wait for its last user's kernel objects to be freed (what
#: stays charged) before it is removed instead.
SETTLE_S = 5.0



class CgroupPool:
    """Ready cgroups by limits class, for one cgroup layout."""

    def __init__(self, layout: cgroups.CgroupLayout, size: int) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"a cgroup pool holds 1-{MAX_SIZE} per class, not {size}")
        self.layout = layout
        self.size = size
        # refill below this: a sandbox that ends soon gives its cgroup back first
        self._low_water = max(1, size // 2)
        self._lock = threading.Lock()
        self._ready: dict[cgroups.CgroupLimits, list[cgroups.Cgroup]] = {}
        self._refilling: set[cgroups.CgroupLimits] = set()
        # renewed, waiting for their last user's kernel objects to be freed: (cgroup,
        # class, when given back)
        self._settling: list[tuple[cgroups.Cgroup, cgroups.CgroupLimits, float]] = []
        self._serial = itertools.count()
        self._closed = False
        self._prefix = owned_name(PREFIX) + "."
        #: Creates that took a ready cgroup, and those that found none.
        self.hits = 0
        self.misses = 0
        #: Cgroups taken back after their sandbox, renewed.
        self.renewed = 0

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
            work = ((len(ready) + self._settling_count(limits) < self._low_water
                     or self._settling) and limits not in self._refilling)
            if work:
                self._refilling.add(limits)
        if work:
            undertaker.bury(lambda: self._refill(limits))
        return cg

    def owns(self, name: str) -> bool:
        """Whether `name` is one of this pool's cgroups (ready, or taken by a sandbox)."""
        return name.startswith(self._prefix)

    def give_back(self, cg: cgroups.Cgroup, limits: cgroups.CgroupLimits) -> None:
        """Take back a cgroup of this pool whose sandbox is gone, renewed for its next user
        (Cgroup.renew, v1), or remove it: on v2, when it cannot be renewed, or when the
        class is full. Raises what its removal raises."""
        if self._has_room(limits) and cg.renew(limits):
            with self._lock:
                if self._has_room(limits):  # a refill may have filled it meanwhile
                    self._settling.append((cg, limits, time.monotonic()))
                    self.renewed += 1
                    return
        cg.destroy()

    def _has_room(self, limits: cgroups.CgroupLimits) -> bool:
        ready = self._ready.get(limits)
        return (not self._closed and ready is not None
                and len(ready) + self._settling_count(limits) < self.size)

    def settle(self, timeout_s: float = SETTLE_S) -> None:
        """Wait until every renewed cgroup is handed out or removed, at most timeout_s
        (tests and benches; the pool itself never waits)."""
        end = time.monotonic() + timeout_s
        while True:
            self._tend()
            with self._lock:
                if not self._settling or time.monotonic() >= end:
                    return
            time.sleep(0.01)

    def _settling_count(self, limits: cgroups.CgroupLimits) -> int:
        return sum(1 for _, of, _ in self._settling if of == limits)

    def _tend(self) -> None:
        """Hand out the renewed cgroups whose last user's kernel objects are freed (what is
        charged is at most RENEW_RESIDUAL_BYTES); remove those still over it after
        SETTLE_S (the undertaker's thread)."""
        with self._lock:
            settling, self._settling = self._settling, []
        keep, gone = [], []
        now = time.monotonic()
        for cg, limits, since in settling:
            charged = cg.memory_charged()
            if charged is not None and charged <= cgroups.RENEW_RESIDUAL_BYTES:
                try:  # its peaks restart from what is left, not from the exit's
                    cg.reset_memory_counters()
                except CorralError:
                    gone.append(cg)
                    continue
                with self._lock:
                    ready = self._ready.get(limits)
                    if not self._closed and ready is not None:
                        ready.append(cg)
                        continue
                gone.append(cg)
            elif now - since > SETTLE_S or charged is None:
                gone.append(cg)
            else:
                keep.append((cg, limits, since))
        with self._lock:
            if self._closed:
                gone += [cg for cg, _, _ in keep]
            else:
                self._settling[:0] = keep
        for cg in gone:
            with contextlib.suppress(CorralError, OSError):
                cg.destroy()

    def ready(self) -> list[str]:
        """Names of the cgroups ready now."""
        with self._lock:
            return sorted(cg.name for ready in self._ready.values() for cg in ready)

    def drain(self) -> None:
        """Remove every ready cgroup; the pool makes no more (take answers None)."""
        with self._lock:
            self._closed = True
            idle = [cg for ready in self._ready.values() for cg in ready]
            idle += [cg for cg, _, _ in self._settling]
            self._ready.clear()
            self._settling.clear()
        for cg in idle:
            with contextlib.suppress(CorralError, OSError):
                cg.destroy()

    def _refill(self, limits: cgroups.CgroupLimits) -> None:
        """Hand out what has settled (_tend); below half of `size` (the settling ones
        counted), make cgroups of this class until `size` (the undertaker's thread)."""
        self._tend()
        with self._lock:
            short = (len(self._ready.get(limits, ())) + self._settling_count(limits)
                     < self._low_water)
        if not short:
            with self._lock:
                self._refilling.discard(limits)
            return
        while True:
            with self._lock:
                ready = self._ready.get(limits)
                if (self._closed or ready is None
                        or len(ready) + self._settling_count(limits) >= self.size):
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

_slot: PoolSlot[CgroupPool] = PoolSlot()


def enable(size: int) -> CgroupPool | None:
    """Keep `size` cgroups ready per limits class in this process (0: none, the default);
    returns the pool, or None when there is none (size 0, or no delegated cgroups here)."""
    _slot.disable()
    if size <= 0:
        return None
    from .backends.native import _cgroup_layout

    layout = _cgroup_layout()
    if cgroups.delegation_problem(layout) is not None:
        return None
    return _slot.install(CgroupPool(layout, size))


#: Remove the ready cgroups and keep none from now on.
disable = _slot.disable
#: The process's pool, or None when it keeps none.
current = _slot.current


def sweep(layout: cgroups.CgroupLayout) -> list[str]:
    """Remove the idle pool cgroups of processes that are gone; returns their names.

    One of a dead process's pool that holds a process belongs to a sandbox: that sandbox's
    own sweep (native.sweep, by its state.json) removes it, not this one.
    """
    return cgroups.reap_orphans(layout, PREFIX, pick=lambda name: owner_gone(name, PREFIX))
