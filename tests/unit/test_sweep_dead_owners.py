"""One sweep of owner records (sandbox/procinfo.py sweep_dead_owners) serves the id pool and
the workspaces: a record whose owner runs stays, one whose owner is gone or that cannot be
read is released, one that vanished meanwhile is skipped, other entries are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from corral.sandbox import workspace_fs
from corral.sandbox.procinfo import (
    live_start_time,
    named_owner,
    owned_name,
    owner_gone,
    sweep_dead_owners,
)


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_missing_directory_releases_nothing(tmp_path):
    assert sweep_dead_owners(str(tmp_path / "absent"), lambda e: e, lambda p: False,
                             lambda k: k) == []


def test_alive_gone_unreadable_vanished_and_others(tmp_path):
    for name in ("1", "2", "3", "4", "notes"):
        (tmp_path / name).write_text(name)

    def alive(path: str) -> bool:
        name = os.path.basename(path)
        if name == "2":
            raise PermissionError(path)  # unreadable: its owner counts as gone
        if name == "3":
            raise FileNotFoundError(path)  # removed meanwhile: skipped
        return name == "1"

    released = sweep_dead_owners(str(tmp_path), lambda e: e if e.isdigit() else None, alive,
                                 lambda key: int(key) * 10)
    assert sorted(released) == [20, 40]


def test_workspace_sweep_removes_only_the_dead_owners(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_WORKSPACE_ROOT", str(tmp_path))
    owners = {
        "live": {"pid": os.getpid(), "start": live_start_time(os.getpid())},
        "dead": {"pid": _gone_pid(), "start": 1},
        "garbled": None,
    }
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.owner").write_text("{" if owner is None else json.dumps(owner))
    (tmp_path / ".half.owner.tmp").write_text("{}")

    assert sorted(workspace_fs.sweep()) == ["dead", "garbled"]
    assert sorted(os.listdir(tmp_path)) == [".half.owner.tmp", "live", "live.owner"]


def test_an_owned_name_says_whether_its_process_lives():
    mine = owned_name("pool.")
    assert mine == f"pool.{os.getpid()}.{live_start_time(os.getpid())}"
    assert named_owner(mine, "pool.") == (os.getpid(), True)
    assert named_owner(mine + ".7", "pool.") == (os.getpid(), True)  # a serial after it
    assert not owner_gone(mine + ".7", "pool.")
    # the same pid with another start time: a reused pid is not the owner
    reused = f"pool.{os.getpid()}.{live_start_time(os.getpid()) + 1}"
    assert named_owner(reused, "pool.") == (os.getpid(), False)
    assert owner_gone(reused, "pool.")
    gone = f"tasks.{_gone_pid()}.12345"
    assert owner_gone(gone, "tasks.")
    # other names are nobody's: never gone, never alive
    for other in ("tasks.x.1", "tasks.1", mine, "pool.1.2.3.4", "sb-1234"):
        assert named_owner(other, "tasks.") is None and not owner_gone(other, "tasks.")
