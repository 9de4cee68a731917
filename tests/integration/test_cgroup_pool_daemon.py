"""`corral daemon --cgroup-pool-size N`: sandboxes take cgroups made ahead (and given back
renewed), and every verb that acts on a sandbox's cgroup (exec, stats, pause, resume,
destroy) finds the one it took; after a SIGKILL the next start sweeps the idle ones, and a
stop leaves none."""

from __future__ import annotations

import glob
import json
import os

import pytest

from corral.sandbox.backends.native import runtime_base

from .daemon_harness import DaemonProcess, collect_exec, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def _pool_cgroups(pid: int) -> list[str]:
    return sorted({os.path.basename(p) for p in glob.glob(f"/sys/fs/cgroup/*/corral/pool.{pid}.*")
                   + glob.glob(f"/sys/fs/cgroup/corral/pool.{pid}.*")})


def _cgroup_of(sandbox_id: str) -> str:
    with open(os.path.join(runtime_base(), sandbox_id, "state.json")) as f:
        return json.load(f)["cgroup"]


def test_sandboxes_run_in_pooled_cgroups_and_a_stop_leaves_none(tmp_path):
    d = DaemonProcess(tmp_path, args=("--cgroup-pool-size", "2")).start()
    try:
        c = d.client(tenant="pooled")
        first = c.create_sandbox(memory_bytes=64 << 20)  # the class's first: made on demand
        assert _cgroup_of(first.id) == first.id
        c.destroy_sandbox(first.id)
        taken = []
        for _ in range(3):
            sb = c.create_sandbox(memory_bytes=64 << 20)
            name = _cgroup_of(sb.id)
            assert name.startswith(f"pool.{d.pid}.")
            taken.append(name)
            result = collect_exec(c.exec(sb.id, ["sh", "-c", "cat /proc/self/cgroup"]))
            assert result.returncode == 0 and f"/corral/{name}" not in result.stdout.decode()
            c.pause(sb.id)
            with open(glob.glob(f"/sys/fs/cgroup/freezer/corral/{name}/freezer.state")[0]) as f:
                assert f.read().strip() == "FROZEN"
            c.resume(sb.id)
            assert next(iter(c.stats(sb.id, interval_s=0.1))).pids >= 1
            c.destroy_sandbox(sb.id)
        assert len(set(taken)) < 3  # given back renewed, taken again
        assert set(taken) <= set(_pool_cgroups(d.pid))  # ready for the next creates
        pid = d.pid
    finally:
        assert d.stop() == 0, d.log()
    assert _pool_cgroups(pid) == []
    assert d.leftovers() == {}


def test_a_killed_daemons_idle_pool_is_swept_at_the_next_start(tmp_path):
    d = DaemonProcess(tmp_path, args=("--cgroup-pool-size", "2")).start()
    c = d.client(tenant="pooled")
    c.destroy_sandbox(c.create_sandbox(memory_bytes=64 << 20).id)  # wakes the refill
    pid = d.pid
    assert wait_until(lambda: len(_pool_cgroups(pid)) == 2, 10)
    d.kill()
    assert len(_pool_cgroups(pid)) == 2  # nothing removed them: the process was killed
    d2 = DaemonProcess(tmp_path / "again").start()
    try:
        assert _pool_cgroups(pid) == []
    finally:
        assert d2.stop() == 0, d2.log()
