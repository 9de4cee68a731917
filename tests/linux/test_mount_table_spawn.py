"""A MountTable applied by a real PID 1: its placeholders become the plan's own directories,
and one that would make a path longer than the kernel takes fails the spawn naming the op,
with ENAMETOOLONG, before anything is mounted there."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import tempfile

import pytest

from corral.ext import _spawn
from corral.sandbox import ids
from corral.sandbox.mounts import Template


@pytest.fixture
def id_map():
    taken = ids.allocate("test")
    try:
        yield f"0 {taken.base} {taken.count}\n".encode()
    finally:
        taken.release()


def _spawn_with(table, bases, id_map):
    plan = _spawn.ChildPlan(argv=["corral-init"], mount_ops=table, mount_bases=bases)
    with pytest.raises(_spawn.SpawnError) as failed:
        _spawn.spawn_init(plan, id_map, id_map)
    return failed.value


def test_a_path_too_long_for_the_kernel_fails_the_op_that_makes_it(id_map):
    table = _spawn.MountTable([
        ("mount", None, "/", None, 0x40000 | 0x4000, None, 0),  # MS_PRIVATE | MS_REC
        ("mkdir", None, Template.ROOT + "/x", None, 0, None, 0o755),
    ], bases=Template.PLACEHOLDERS)
    failed = _spawn_with(table, ("/" + "r" * 4094, "/w", "/e"), id_map)
    assert (failed.step_name, failed.errno, failed.detail) == ("mount", errno.ENAMETOOLONG, 1)


def test_the_placeholders_become_the_plans_own_paths(id_map):
    """PID 1 mounts a tmpfs on the plan's root, then fails at a mkdir under a base that
    does not exist: the report names the op, with the errno of the real path."""
    top = tempfile.mkdtemp(prefix="corral-table-")
    os.chmod(top, 0o711)  # PID 1's ids must reach it
    root = pathlib.Path(top, "root")
    root.mkdir()
    try:
        _check_placeholders(root, id_map)
    finally:
        shutil.rmtree(top)


def _check_placeholders(root, id_map):
    table = _spawn.MountTable([
        ("mount", None, "/", None, 0x40000 | 0x4000, None, 0),
        ("mount", "tmpfs", Template.ROOT, "tmpfs", 0, "size=65536", 0),
        ("mkdir", None, Template.ROOT + "/made", None, 0, None, 0o755),
        ("mkdir", None, Template.EMPTY + "/a/b", None, 0, None, 0o755),
    ], bases=Template.PLACEHOLDERS)
    failed = _spawn_with(table, (str(root), "", str(root / "missing")), id_map)
    assert (failed.step_name, failed.errno, failed.detail) == ("mkdir", errno.ENOENT, 3)
    assert not (root / "made").exists()  # made in PID 1's own mount namespace only
