"""Helpers of the deep-task tests."""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

from corral.runtime.client import Client

ROOT = Path(__file__).resolve().parents[2]
DEEP_TASK = (ROOT / "examples" / "agents" / "deep_task.py").read_bytes()
QUEUED, PLACED, RUNNING, RETRYING, SUCCEEDED, FAILED, CANCELLED = range(1, 8)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def attempt_files(path: str, name: str) -> list[str]:
    """`name` in every attempt directory of the daemons under path (path itself, or the
    tmp_path holding them): <root>/state/tasks/<task>/attempt-<n>/<name>.

    The depth is fixed on purpose. A recursive search (Path.rglob, glob's "**") recurses
    into the agents' own trees, and a test's 1,500-level tree makes it hit RecursionError;
    glob.glob also skips directories that vanish while it looks (a checkpoint replaced).
    """
    found = []
    for root in (path, os.path.join(path, "*")):
        found += glob.glob(os.path.join(root, "state", "tasks", "*", "attempt-*", name))
    return found


def shims_under(path: str) -> list[int]:
    """Pids of live shims of attempts under path (each records itself in shim.json)."""
    out = set()
    for shim_json in attempt_files(path, "shim.json"):
        try:
            info = json.loads(Path(shim_json).read_text())
            with open(f"/proc/{info['pid']}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{info['pid']}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, KeyError):
            continue
        if (fields[0] != "Z" and int(fields[19]) == info.get("start")
                and b"corral.runtime.tasks" in cmd):
            out.add(info["pid"])
    return sorted(out)


def wait_task(client: Client, task_id: str, predicate, timeout_s: float = 60.0, what: str = ""):
    """Poll Get until predicate(task) holds; returns the task (AssertionError on timeout)."""
    end = time.monotonic() + timeout_s
    task = client.get_task(task_id)
    while time.monotonic() < end:
        if predicate(task):
            return task
        time.sleep(0.05)
        task = client.get_task(task_id)
    raise AssertionError(f"task {task_id} never got {what or predicate}: state {task.state} "
                         f"reason {task.reason!r} progress {task.progress_json!r}")


def wait_done(client: Client, task_id: str, timeout_s: float = 60.0):
    return wait_task(client, task_id, lambda t: t.state in TERMINAL, timeout_s, "terminal")


def progress(task) -> dict:
    return json.loads(task.progress_json) if task.progress_json else {}


def deep_task(client: Client, *args: str, **kw):
    """Submit examples/agents/deep_task.py with args."""
    return client.submit_task(["python3", "/workspace/deep_task.py", *args],
                              files={"deep_task.py": DEEP_TASK}, **kw)


def answer(steps: int) -> int:
    return sum(i * i for i in range(steps))


def wait_until_true(predicate, timeout_s: float = 20.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
