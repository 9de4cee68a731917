"""Fixtures of the sandbox-state tests: a snapshot store and a changes root of their own,
and a check that no mount, loop device or sandbox a test made is left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.sandbox.state.snapshots import SnapshotStore


def pytest_collection_modifyitems(config, items):
    """Real overlays, loop devices and sandboxes need root; without it, skip."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/state need root (overlayfs, loop devices, sandboxes)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


def mounts_under(path: str) -> list[str]:
    """Mount points of this mount namespace at or below path."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == path or p.startswith(path.rstrip("/") + "/")]


def loops_of(path: str) -> list[str]:
    """Loop devices whose backing file is below path."""
    out = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if path in line]


@pytest.fixture
def store(tmp_path) -> SnapshotStore:
    return SnapshotStore(str(tmp_path / "snapshots"))


@pytest.fixture
def changes_root(tmp_path) -> str:
    return str(tmp_path / "changes")


@pytest.fixture(autouse=True)
def nothing_mounted_left(tmp_path):
    """After each test: no mount and no loop device of the test's directories remain."""
    yield
    left = mounts_under(str(tmp_path))
    loops = loops_of(str(tmp_path))
    for point in reversed(left):
        subprocess.run(["umount", "-l", point], check=False)
    assert not left and not loops, f"left mounted: {left} {loops}"
