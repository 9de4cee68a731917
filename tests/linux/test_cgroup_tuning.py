"""favordynmods on this host for real: the remount turns it on and changes nothing else of
the cgroup2 mount (its per-mount flags and the hierarchy's other options)."""

from __future__ import annotations

import pytest

from corral.sandbox import cgroup_tuning as ct

pytestmark = pytest.mark.root


def _mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_enable_turns_the_flag_on_and_keeps_every_other_option():
    before = ct.cgroup2_mounts(_mountinfo())
    assert before, "this host mounts a cgroup2 hierarchy (/sys/fs/cgroup/unified)"
    outcome = ct.enable()
    assert outcome in ("on", "already")
    after = ct.cgroup2_mounts(_mountinfo())
    assert [m.point for m in after] == [m.point for m in before]
    for old, new in zip(before, after, strict=True):
        assert new.mount_options == old.mount_options
        assert set(new.super_options) - {ct.FLAG} == set(old.super_options) - {ct.FLAG}
        assert ct.FLAG in new.super_options
    assert ct.enable() == "already"

