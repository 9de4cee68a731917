"""The cgroups the deep tasks run in: `corral-batch/`, whose weight bounds them all.

A local attempt is started by a shim (shim.py) that the daemon's zygote (zygote.py) forks:
the shim makes the attempt's workspace, starts its sandbox and relays its frames. Every
task's sandbox is batch work (`SandboxSpec.batch`): its cgroup is made in `corral-batch/`,
beside `corral/` at the top of each hierarchy (sandbox/cgroups.py). Here the daemon makes
that group at its `task_cpu_weight` (cpu.shares on v1, cpu.weight on v2), so that all tasks
together, however many run, get that share of contended CPU against the sessions'
`corral/`, the daemon and its clients. A weight on each task's cgroup inside `corral/`
could not do it: it ordered tasks against the session sandboxes beside them, while the
`corral` group kept one weight at the top whatever filled it (bench/README.md, the mixed
run).

The shims, and every sandbox process until it joins its own cgroup, run in the group too:
the daemon makes `corral-batch/tasks.<pid>.<start time>` (at the task weight, like each
task's sandbox) and moves the zygote into it before it forks its first shim. Left in the
daemon's cgroup, 32 starting shims (their Python, the sandboxes' set-up) competed with the
daemon at the ordinary weight. No memory or pids limit is set: a task's limits are its
sandbox's.

- Best effort: where the daemon cannot make cgroups (rootless without delegation), shims
  run where the daemon does, and that is logged once.
- Shims outlive a daemon that stops or dies (a deep task runs on), so the shims' cgroup is
  not removed while one is in it: `release()` removes it at the daemon's stop when empty,
  and `sweep()` (the next daemon's start) removes the empty ones of daemons that are gone.
  The group itself stays, like `corral/`.
- One weight per host: the last daemon to start sets the group's. On a node without a
  daemon (a Ray worker), the first task's sandbox makes the group at the ordinary weight.

Relaying is not batch work. Once its task's agent runs, a shim only passes frames on
(progress, results, logs: a few per second), and a watcher waits on each of them. At the
task weight, behind starting shims and busy task sandboxes, a PROGRESS frame reached the
session 0.65-1.5 s late at p99 in the mixed bench. So a shim moves itself (`Moves`) into
this daemon's relays' cgroup, `corral/relays.<pid>.<start time>`, at the ordinary weight
beside the sessions' sandboxes, for as long as its agent runs, and back to the shims'
cgroup for the attempt's end (its sandbox's removal, the results' copy). The relays'
cgroup has a CPU quota for all of them together (`relay_cpus()`: an eighth of the host's
CPUs, at least half of one): a task that floods its shim with frames cannot take more from
the sessions than that.
"""

from __future__ import annotations

import logging
import os
import sys

from corral.sandbox import cgroups
from corral.sandbox.errors import CorralError
from corral.sandbox.procinfo import owned_name, owner_gone

log = logging.getLogger("corral.tasks")

#: Names start with this; the rest is "<daemon pid>.<its start time>".
PREFIX = "tasks."
#: The relays' cgroup (in corral/): this, then "<daemon pid>.<its start time>".
RELAY_PREFIX = "relays."
#: The relaying shims of one daemon may use this share of the host's CPUs together (a CFS
#: quota), and at least RELAY_MIN_CPUS.
RELAY_CPU_SHARE = 0.125
RELAY_MIN_CPUS = 0.5


def name_for(pid: int) -> str:
    return owned_name(PREFIX, pid)


#: What is logged where cgroups cannot be made here, for the shims' and the relays'.
_NO_SHIMS_CGROUP = "deep tasks' shims run in the daemon's cgroup"
_NO_RELAYS_CGROUP = "deep tasks' shims relay from their own cgroup"


def _layout(group: str = cgroups.BATCH_DIR,
            otherwise: str = _NO_SHIMS_CGROUP) -> cgroups.CgroupLayout | None:
    """The layout of `group`, or None (logged: `otherwise`) where this process cannot make
    cgroups there."""
    try:
        layout = cgroups.detect().in_group(group)
    except CorralError as exc:
        log.info("%s: %s", otherwise, exc)
        return None
    problem = cgroups.delegation_problem(layout)
    if problem is not None:
        log.info("%s: %s", otherwise, problem)
        return None
    return layout


def make(weight: int) -> cgroups.Cgroup | None:
    """The batch group at `weight`, and in it this process's shims' cgroup at `weight`
    (made, or rewritten where it exists), or None where cgroups cannot be made here
    (logged)."""
    layout = _layout()
    if layout is None:
        return None
    name = name_for(os.getpid())
    limits = cgroups.CgroupLimits(cpu_weight=weight)
    try:
        cgroups.make_group(layout, weight)
        existing = cgroups.Cgroup(layout, name)
        if existing.exists():  # a second executor of this process
            existing.set_cpu_weight(weight)
            return existing
        return cgroups.Cgroup.create(layout, name, limits)
    except CorralError as exc:
        log.warning("%s: %s", _NO_SHIMS_CGROUP, exc)
        return None


def make_relay() -> cgroups.Cgroup | None:
    """This process's relays' cgroup in `corral/`, at the ordinary weight and `relay_cpus()`
    (made, or found where it exists), or None where cgroups cannot be made here (logged:
    shims then relay from the shims' cgroup)."""
    layout = _layout(cgroups.CORRAL_DIR, _NO_RELAYS_CGROUP)
    if layout is None:
        return None
    existing = cgroups.Cgroup(layout, owned_name(RELAY_PREFIX, os.getpid()))
    try:
        if existing.exists():  # a second executor of this process
            return existing
        return cgroups.Cgroup.create(layout, existing.name,
                                     cgroups.CgroupLimits(cpu_quota=relay_cpus()))
    except CorralError as exc:
        log.warning("%s: %s", _NO_RELAYS_CGROUP, exc)
        return None


def relay_cpus(host_cpus: int | None = None) -> float:
    """The relays' CPU quota on a host of host_cpus (default: this one's)."""
    cpus = host_cpus or os.cpu_count() or 1
    return max(RELAY_MIN_CPUS, cpus * RELAY_CPU_SHARE)


class Moves:
    """A shim's moves between its two cgroups (directories, one per hierarchy, as
    `Cgroup.paths`): into `relay` while its agent runs, back to `home` for the attempt's
    end. Either list empty: the shim stays where it is. A move that fails is written to the
    shim's log (its stderr) and the shim runs on where it is."""

    def __init__(self, relay: list[str], home: list[str]) -> None:
        self.relay = relay if home else []  # a shim that was not in its cgroup stays out
        self.home = home if self.relay else []
        #: "home", "relay", or None after a move that failed part way (some hierarchies
        #: moved): the next move writes every directory again.
        self.where: str | None = "home"

    def enter(self, where: str) -> bool:
        """Move this process to `where` ("relay" or "home"); True once it is there."""
        dirs = self.relay if where == "relay" else self.home
        if not dirs or where == self.where:
            return False
        pid = str(os.getpid()).encode()
        for d in dirs:
            try:
                fd = os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            except OSError as exc:  # its cgroup is gone (a stopped daemon's), or refused
                print(f"corral: the shim stays in its cgroup: moving to {d}: {exc}",
                      file=sys.stderr, flush=True)
                self.where = None if d != dirs[0] else self.where
                return False
        self.where = where
        return True


def join(cgroup: cgroups.Cgroup | None, pid: int) -> bool:
    """Move `pid` (the zygote, or a shim started without it) into `cgroup`; False (logged)
    where that fails: it then runs at the ordinary weight."""
    if cgroup is None:
        return False
    try:
        cgroup.attach(pid)
        return True
    except CorralError as exc:
        log.warning("a shim process stays in the daemon's cgroup: %s", exc)
        return False


def release(cgroup: cgroups.Cgroup | None) -> bool:
    """Remove `cgroup` if no process is in it any more (at the daemon's stop); True if it
    is gone. Shims still running keep it: the next daemon's sweep removes it after them."""
    if cgroup is None:
        return False
    gone = True
    for d in reversed(cgroup.paths):  # never Cgroup.destroy: that kills what is inside
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:  # EBUSY: a shim is still in it
            gone = False
    return gone


def sweep() -> list[str]:
    """Remove the empty shims' and relays' cgroups of daemons that are gone; returns their
    names. Also the shims' cgroups in `corral/`, where daemons before the batch group made
    them."""
    layout = _layout()
    if layout is None:
        return []
    removed = []
    for group, prefix in ((cgroups.BATCH_DIR, PREFIX), (cgroups.CORRAL_DIR, PREFIX),
                          (cgroups.CORRAL_DIR, RELAY_PREFIX)):
        try:
            removed += cgroups.reap_orphans(layout.in_group(group), prefix,
                                            pick=lambda name, p=prefix: owner_gone(name, p))
        except (CorralError, OSError) as exc:
            log.warning("sweeping the shims' cgroups of stopped daemons failed: %s", exc)
    return removed
