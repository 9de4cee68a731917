"""Helpers the kernel and integration suites share: process liveness, waiting, cgroups."""

from __future__ import annotations

import glob
import time


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a zombie has nothing left to run)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll predicate until it holds or timeout_s passes; returns its last value."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def cgroup_dirs(sandbox_id: str) -> list[str]:
    """Every cgroup directory of a sandbox, v1 hierarchies and unified, in either group
    (corral/, or corral-batch/ for a deep task's)."""
    return sorted(path for group in ("corral", "corral-batch")
                  for path in (glob.glob(f"/sys/fs/cgroup/*/{group}/{sandbox_id}")
                               + glob.glob(f"/sys/fs/cgroup/{group}/{sandbox_id}")))
