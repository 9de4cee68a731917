"""sandbox/cgroup_tuning.py: reading cgroup2 mounts, and the remount that adds favordynmods
while keeping every other option of the mount and of the hierarchy."""

from __future__ import annotations

import pytest

from corral.runtime.config import load
from corral.sandbox import cgroup_tuning as ct
from corral.sandbox.errors import InvalidSpec

HYBRID = "".join((
    "25 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n",
    "26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 "
    "cgroup2 rw,nsdelegate,memory_recursiveprot\n",
    "27 25 0:24 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup "
    "cgroup rw,memory\n",
))
V1_ONLY = HYBRID.splitlines()[0] + "\n" + HYBRID.splitlines()[2] + "\n"


def test_cgroup2_mounts_reads_both_option_sets_and_unescapes_paths():
    text = HYBRID + ("40 25 0:23 / /mnt/cg\\040two rw,relatime - cgroup2 none "
                     "rw,favordynmods\n")
    mounts = ct.cgroup2_mounts(text)
    assert [m.point for m in mounts] == ["/sys/fs/cgroup/unified", "/mnt/cg two"]
    assert mounts[0].mount_options == ("rw", "nosuid", "nodev", "noexec", "relatime")
    assert mounts[0].super_options == ("rw", "nsdelegate", "memory_recursiveprot")
    assert mounts[1].source == "none"
    assert ct.is_on(text) and not ct.is_on(HYBRID)


def test_the_remount_keeps_the_mounts_flags_and_the_hierarchys_options():
    flags, data = ct.cgroup2_mounts(HYBRID)[0].remount_args()
    # MS_REMOUNT | nosuid | nodev | noexec | relatime: nothing of the mount is lost
    assert flags == 0x20 | 0x2 | 0x4 | 0x8 | (1 << 21)
    # nsdelegate and memory_recursiveprot are passed again: a reconfigure applies exactly
    # what it is given; rw is a mount flag, not a cgroup2 option
    assert data == "nsdelegate,memory_recursiveprot,favordynmods"


def test_enable_changes_nothing_when_already_on_or_without_a_cgroup2_mount():
    on = HYBRID.replace("memory_recursiveprot\n", "memory_recursiveprot,favordynmods\n", 1)
    assert ct.enable(on) == "already"
    outcome = ct.enable(V1_ONLY)
    assert outcome.startswith("off: no cgroup2 hierarchy is mounted")
    assert "cgroup_favordynmods=true" in outcome


def test_the_daemon_setting_must_be_a_boolean(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text('cgroup_favordynmods = "yes"\n')
    with pytest.raises(InvalidSpec) as exc:
        load(str(path), {})
    assert exc.value.field == "cgroup_favordynmods"
    path.write_text("cgroup_favordynmods = false\n")
    assert load(str(path), {}).cgroup_favordynmods is False
    assert load(None, {}).cgroup_favordynmods is True
