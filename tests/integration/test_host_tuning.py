"""The daemon turns on cgroup2 favordynmods at start (sandbox/cgroup_tuning.py) and records
the outcome in its daemon.start audit record."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.root


def test_the_daemon_start_record_says_what_became_of_favordynmods(daemon):
    detail = json.loads(daemon.records("daemon.start")[-1].detail_json)
    # this host mounts cgroup2 at /sys/fs/cgroup/unified and the daemon runs as root
    assert detail["cgroup_favordynmods"] in ("on", "already")
    with open("/proc/self/mountinfo") as f:
        assert "favordynmods" in f.read()
