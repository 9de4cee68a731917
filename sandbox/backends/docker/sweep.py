"""Labels, creators and the sweep: every container carries its sandbox id and who made
it; those whose creator is gone are removed, with their temporary workspaces, unless live
restore keeps them (a `kept` file in their runtime directory names the restore.db whose
row keeps the sandbox: runtime/restore.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3

from ... import fstree, workspace_fs
from ...procinfo import live_start_time
from ..base import report_swept
from .engine import client, engine_url

#: Label every Corral container carries: the sandbox id.
LABEL = "corral.sandbox"


#: Label naming the creator: "<boot id>:<pid>:<start time>", for sweep().
LABEL_CREATOR = "corral.creator"


#: Label holding a temporary workspace directory the sandbox owns (removed by sweep()).
LABEL_WORKSPACE = "corral.workspace"


#: Label holding the host directory of the sandbox's descriptor FIFOs (removed by sweep()).
LABEL_FDS = "corral.fds"


#: Label holding the sandbox's runtime directory on the host (its command journals and
#: its `kept` mark; removed by sweep()).
LABEL_RUNTIME = "corral.runtime"


#: The file in a runtime directory naming the restore.db that keeps the sandbox.
KEPT_FILE = "kept"


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str:
    """The start time in the creator token's form: "" when gone or a zombie."""
    start = live_start_time(pid)
    return "" if start is None else str(start)


def _creator() -> str:
    return f"{_boot_id()}:{os.getpid()}:{_start_time(os.getpid())}"


def _creator_alive(value: str) -> bool:
    try:
        boot, pid, start = value.split(":")
    except ValueError:
        return False
    if boot != _boot_id():
        return False
    return _start_time(int(pid)) == start


def kept_by_store(labels: dict) -> bool:
    """Whether live restore keeps the container with these labels: its runtime directory's
    `kept` file names a restore.db that has a row of its sandbox (any doubt: not kept)."""
    runtime, sandbox_id = labels.get(LABEL_RUNTIME), labels.get(LABEL)
    if not runtime or not sandbox_id:
        return False
    try:
        with open(os.path.join(runtime, KEPT_FILE)) as f:
            store = f.read().strip()
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    except (OSError, sqlite3.Error):
        return False
    try:
        return db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone() \
            is not None
    except sqlite3.Error:
        return False
    finally:
        db.close()


def sweep(url: str | None = None) -> list[str]:
    """Remove Corral containers (and their temporary workspaces) whose creator is gone and
    that live restore does not keep; returns the sandbox ids removed."""
    api = client(url)
    removed = []
    for info in api.containers(all=True, filters={"label": LABEL}):
        labels = info.get("Labels") or {}
        if _creator_alive(labels.get(LABEL_CREATOR, "")) or kept_by_store(labels):
            continue
        with contextlib.suppress(Exception):
            api.remove_container(info["Id"], force=True, v=True)
        _remove_workspace(labels.get(LABEL_WORKSPACE))
        _remove_workspace(labels.get(LABEL_FDS))
        _remove_runtime(labels.get(LABEL_RUNTIME))
        removed.append(labels.get(LABEL, info["Id"][:12]))
    report_swept("docker", removed, engine_url(url))
    return removed


def runtime_base() -> str:
    """Where docker sandboxes keep their runtime directories (not the native backend's
    base: its sweep removes what it does not know)."""
    return workspace_fs.runtime_path("docker")


def _remove_runtime(path: str | None) -> None:
    """Remove a runtime directory a container's label names (only one under our base)."""
    if path and os.path.dirname(os.path.normpath(path)) == runtime_base():
        fstree.remove_tree(path, ignore_errors=True)


def _remove_workspace(path: str | None) -> None:
    """Remove a temporary workspace a container's label names (only ones Corral made)."""
    if workspace_fs.is_managed(path):
        workspace_fs.remove(path)
    elif path and os.path.basename(path).startswith("corral.sbx-"):  # an older version's
        fstree.remove_tree(path, ignore_errors=True)
