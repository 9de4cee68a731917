"""`corral doctor` as root, through the CLI: every feature is asked of the kernel and found
here, and the pool is shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from corral.sandbox import cgroup_tuning, ids

CORRAL = str(Path(sys.executable).with_name("corral"))


def test_doctor_json_as_root():
    # what a root sandbox start or the daemon does first: doctor only reads it
    assert cgroup_tuning.enable() in ("on", "already")
    r = subprocess.run([CORRAL, "doctor", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stderr) == (0, "")
    report = json.loads(r.stdout)
    assert (report["uid"], report["rootless"]) == (0, False)
    checks = {c["feature"]: c for c in report["checks"]}
    assert list(checks) == ["user namespaces", "subordinate ids", "idmapped mounts",
                            "cgroups", "cgroup moves", "landlock", "seccomp", "overlayfs",
                            "egress"]
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(checks, "ok")
    assert [name for name, c in checks.items() if c["required"]] == ["user namespaces",
                                                                     "seccomp"]
    pool = ids.pool()
    assert checks["subordinate ids"]["found"].startswith(f"pool {pool.start}:{pool.count} (")
    found = checks["idmapped mounts"]["found"]
    assert found.split("; ")[-2].startswith("your directories (")
    assert found.split("; ")[-2].endswith(" at /tmp): yes")
    assert found.split("; ")[-1] == "tmpfs (task workspaces) (a new tmpfs): yes"
    assert checks["cgroups"]["found"].startswith("v1 (")
    # the deep tasks' group and its weight as a daemon (or an earlier test's) left it
    shares = "/sys/fs/cgroup/cpu/corral-batch/cpu.shares"
    batch = checks["cgroups"]["found"].split("; ")[-1]
    if os.path.exists(shares):
        with open(shares) as f:
            assert batch == f"deep tasks: corral-batch/ at cpu.shares {f.read().strip()}"
    else:
        assert batch.startswith("deep tasks: corral-batch/ not made yet")
    assert checks["cgroup moves"]["found"].startswith("cgroup2 favordynmods is on")


def test_doctor_table_says_what_corral_does_without_each():
    r = subprocess.run([CORRAL, "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("corral doctor for root (uid 0, root) on Linux ")
    features = [line.split("  ")[0] for line in lines[2:] if not line.startswith(" ")]
    assert features == ["user namespaces", "subordinate ids", "idmapped mounts", "cgroups",
                        "cgroup moves", "landlock", "seccomp", "overlayfs", "egress"]
