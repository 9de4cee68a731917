"""A user namespace mapped while the sandbox is prepared (_spawn.UserNamespaceInProgress).

The rootless suite runs the real newuidmap/newgidmap through it; here, as root, a helper
that fails must be named with its wait status, as spawn_init named it when the launcher
ran the helpers itself, and nothing of the attempt may remain.
"""

from __future__ import annotations

import os

import pytest

from corral.ext import _spawn


def _children() -> set[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return {int(pid) for pid in f.read().split()}


def _failed_spawn(uid_helper: list[str], gid_helper: list[str]) -> _spawn.SpawnError:
    mapping = _spawn.UserNamespaceInProgress(uid_helper, gid_helper)
    try:
        with pytest.raises(_spawn.SpawnError) as failed:
            _spawn.spawn_init(_spawn.ChildPlan(argv=["corral-init"]), b"", b"",
                              user_namespace=mapping)
    finally:
        mapping.close()
    return failed.value


@pytest.mark.parametrize("uid_helper,gid_helper,which,status", [
    (["/nonexistent/newuidmap", "PID"], ["/bin/true", "PID"], 1, 127 << 8),
    (["/bin/true", "PID"], ["/bin/false", "PID"], 2, 1 << 8),
])
def test_a_failed_helper_is_named_with_its_wait_status(uid_helper, gid_helper, which, status):
    before = _children()
    failed = _failed_spawn(uid_helper, gid_helper)
    assert failed.step_name == "write uid_map/gid_map"
    assert failed.detail == (which << 16) | status
    assert _children() == before  # holder, helpers and PID 1 all reaped


def test_a_helper_that_writes_no_map_fails_the_spawn():
    """Both exit 0 (/bin/true), yet no map exists: the launcher checks the maps too."""
    failed = _failed_spawn(["/bin/true", "PID"], ["/bin/true", "PID"])
    assert (failed.step_name, failed.detail) == ("write uid_map/gid_map", -1)
