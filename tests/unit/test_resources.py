"""ResourceGuard: the disk reserve, refusal and recovery with hysteresis, descriptors."""

from __future__ import annotations

import os

import pytest

from corral.runtime import resources
from corral.runtime.resources import ResourceGuard
from corral.sandbox.errors import ResourceExhausted

MiB = 1 << 20


@pytest.fixture
def disk(monkeypatch):
    """A fake state filesystem whose free bytes the test sets."""
    state = {"free": 100 * MiB}

    def fs_free(path):
        held = os.path.exists(os.path.join(path, resources.RESERVE_NAME))
        free = state["free"] - (4 * MiB if held else 0)
        return resources.FsFree(path, free, 10_000, 1 << 30)

    monkeypatch.setattr(resources, "fs_free", fs_free)
    return state


def test_reserve_released_when_full_and_taken_back_with_twice_the_room(tmp_path, disk):
    guard = ResourceGuard(str(tmp_path), reserve_bytes=4 * MiB, fd_reserve=0)
    assert guard.check() == ""
    reserve = tmp_path / resources.RESERVE_NAME
    assert reserve.stat().st_size == 4 * MiB
    guard.admit("sandbox")

    disk["free"] = 7 * MiB  # 3 MiB free beside the reserve
    reason = guard.check()
    assert reason.startswith(f"filesystem of {tmp_path} has 3145728 bytes free, less than "
                             "the 4194304 the daemon keeps free")
    assert not reserve.exists() and guard.reserve_released == 1
    with pytest.raises(ResourceExhausted, match=r"^cannot start a new task: filesystem of "):
        guard.admit("task")
    assert guard.statistics()["serving"] is False

    disk["free"] = 7 * MiB  # room for the reserve, but not twice: still refused
    assert guard.check() != "" and not reserve.exists()
    disk["free"] = 8 * MiB
    assert guard.check() == ""
    assert reserve.exists()
    stats = guard.statistics()
    assert (stats["serving"], stats["disk_reserve_held"], stats["disk_reserve_released"]) == (
        True, True, 1)


def test_descriptors_refused_inside_the_daemons_reserve(tmp_path, disk, monkeypatch):
    guard = ResourceGuard(str(tmp_path), reserve_bytes=0, fd_reserve=10)
    monkeypatch.setattr(resources, "open_fds", lambda: 100)
    monkeypatch.setattr(resources, "fd_limit", lambda: 100 + 10 + resources.FDS_PER_EXEC)
    guard.check()
    guard.admit("exec")  # exactly fits
    with pytest.raises(ResourceExhausted) as refused:
        guard.admit("sandbox")
    assert str(refused.value) == (
        "cannot start a new sandbox: the daemon has 100 of its 118 descriptors open "
        "(RLIMIT_NOFILE) and keeps 10 for itself; end idle sandboxes or sessions, or raise "
        "the daemon's descriptor limit (LimitNOFILE=, prlimit)")
    assert guard.check().startswith("100 of 118 descriptors open")
