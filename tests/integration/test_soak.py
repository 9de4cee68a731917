"""Soak: many cycles of sessions, commands and deep tasks, then the daemon is back where it was.

One daemon of its own runs WARMUP cycles (the first sandbox, session, task and shim zygote
fill thread pools, gRPC buffers, the reactor, allocator arenas), then a baseline is taken,
then CYCLES more. Each cycle: a session that streams 2 MB and is closed, two sessions on one
OpenMany stream, a sandbox with two commands whose stdin is kept open, and a deep task run
to its end. After them:

* descriptors (/proc/PID/fd) and child processes are exactly at the baseline: each of
  these is a leak from the first cycle on;
* threads (/proc/PID/task) are at most THREAD_SLACK over it: the default executor starts a
  thread when none is idle at the moment of a call, so its count may still creep up by one
  or two after the warm-up without any leak (it stops at its max_workers);
* RSS grows by less than RSS_SLACK_KIB, with the cyclic GC left to run on its own schedule:
  the cycles move 80 MB of tokens through session logs that are freed by reference
  counting now (it grew ~2.6 MB per session while those logs waited for the GC);
* every sandbox the daemon made, sessions' and tasks' included, left no runtime directory,
  cgroup, workspace (mount or temporary directory) or live process, and no line of the
  daemon's /proc/PID/mountinfo names one of them or the daemon's directory. (The daemon
  shares the host's mount namespace, so other work on the machine moves its mount count:
  the mounts are matched by name, not counted.)

Measured on the 2-core CI machine: about 35 s in all (each cycle makes five sandboxes).
"""

from __future__ import annotations

import os
import time

import pytest

from corral.sandbox import workspace_fs

from .daemon_harness import sandbox_footprint, wait_until
from .test_leaks import exec_cycle, mux_cycle, rss_kib, session_cycle

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

WARMUP = 5
CYCLES = 40
TOKENS = 2000  # of 1000 bytes: 2 MB per session
THREAD_SLACK = 2
RSS_SLACK_KIB = 16 << 10
TASK_SUCCEEDED = 5


def snapshot(pid: int) -> dict:
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "children": children(pid),
        "rss_kib": rss_kib(pid),
    }


def quiet_snapshot(pid: int, timeout_s: float = 15.0) -> dict:
    """snapshot() once the daemon holds still: the pools renew a destroyed sandbox's cgroup
    and make a namespace pair anew after a create's (sandbox/cgroup_pool.py,
    sandbox/namespace_pool.py) on the undertaker thread, just after the calls return, which
    holds descriptors (and a short-lived holder child) meanwhile. Descriptors and children
    the same over 5 looks 0.1 s apart, or the last seen."""
    deadline = time.monotonic() + timeout_s
    seen = [snapshot(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.1)
        seen.append(snapshot(pid))
        if len(seen) >= 5 and len({(s["fds"], s["children"]) for s in seen[-5:]}) == 1:
            break
    return seen[-1]


def mounts_naming(pid: int, names: set[str]) -> list[str]:
    """Lines of the process's mountinfo that mention any of names."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line for line in f.read().splitlines() if any(n in line for n in names)]


def children(pid: int) -> int:
    """Children of pid (zombies included: one never reaped is a leak too)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            count += 1
    return count


def task_cycle(client, i: int) -> str:
    task = client.submit_task(["sh", "-c", f"echo {i}"])
    end = time.monotonic() + 60
    while client.get_task(task.id).state != TASK_SUCCEEDED:
        assert time.monotonic() < end, client.get_task(task.id)
        time.sleep(0.05)
    return task.id


def cycle(client, i: int) -> None:
    session_cycle(client, TOKENS)
    mux_cycle(client, TOKENS // 10)
    exec_cycle(client)
    task_cycle(client, i)


def footprint(sandbox_id: str) -> dict:
    left = sandbox_footprint(sandbox_id)
    workspace = os.path.join(workspace_fs.root(), sandbox_id)
    if os.path.lexists(workspace) or os.path.exists(workspace + ".owner"):
        left["workspace mount"] = [workspace]
    return left


def test_soak_sessions_commands_and_tasks_return_the_daemon_to_its_baseline(make_daemon):
    daemon = make_daemon("soak").start()
    client = daemon.client()
    for i in range(WARMUP):
        cycle(client, i)
    base = quiet_snapshot(daemon.pid)
    for i in range(WARMUP, WARMUP + CYCLES):
        cycle(client, i)
    # A finished exec's exit record and a sandbox's removal complete just after the calls
    # return: let the daemon settle before the last look.
    wait_until(lambda: snapshot(daemon.pid)["fds"] == base["fds"], 5.0)
    after = quiet_snapshot(daemon.pid)
    print(f"soak: {CYCLES} cycles, baseline {base}, after {after}")

    assert after["fds"] == base["fds"], os.listdir(f"/proc/{daemon.pid}/fd")
    assert after["children"] == base["children"]
    assert after["threads"] <= base["threads"] + THREAD_SLACK
    assert after["rss_kib"] - base["rss_kib"] < RSS_SLACK_KIB

    tasks = client.list_tasks()
    assert len(tasks) == WARMUP + CYCLES
    assert {t.state for t in tasks} == {TASK_SUCCEEDED}
    task_sandboxes = {r.sandbox_id for r in client.audit_query(kind="task.start", limit=1000)}
    assert len(task_sandboxes) == WARMUP + CYCLES
    made = set(daemon.created()) | task_sandboxes
    assert len(made) == 5 * (WARMUP + CYCLES)  # 3 sessions', a command's and a task's
    assert {s: footprint(s) for s in made if footprint(s)} == {}
    assert mounts_naming(daemon.pid, made | {str(daemon.root)}) == []
    assert daemon.leftovers() == {}
    assert daemon.stop() == 0
