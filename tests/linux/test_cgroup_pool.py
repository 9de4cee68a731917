"""Cgroups made ahead (sandbox/cgroup_pool.py): a sandbox takes one, records it, and gives
it back renewed for the next (or removed, when it cannot be); the pools of gone processes
are swept.

The conftest's leak check runs after each test: a test that leaves a pool enabled, or a
pooled cgroup behind, fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from corral.sandbox import Sandbox, SandboxSpec, cgroup_pool, cgroups
from corral.sandbox.backends.native import runtime_base, sweep
from corral.sandbox.undertaker import undertaker

from ..processes import wait_until
from .conftest import MiB

SPEC = SandboxSpec(memory_bytes=96 * MiB, pids_max=40, cpus=0.5)


@pytest.fixture
def pool():
    made = cgroup_pool.enable(2)
    assert made is not None  # root on this host: delegated cgroups
    try:
        yield made
    finally:
        cgroup_pool.disable()


def _limits(layout, name: str) -> dict[str, str]:
    cg = cgroups.Cgroup(layout, name)

    def read(controller, filename):
        with open(os.path.join(cg.path(controller), filename)) as f:
            return f.read().strip()

    return {"memory": read("memory", "memory.limit_in_bytes"),
            "memsw": read("memory", "memory.memsw.limit_in_bytes"),
            "pids": read("pids", "pids.max"), "quota": read("cpu", "cpu.cfs_quota_us"),
            "freezer": read("freezer", "freezer.state")}


def _recorded(sb: Sandbox) -> str:
    with open(os.path.join(sb.runtime_dir, "state.json")) as f:
        return json.load(f)["cgroup"]


def test_a_sandbox_takes_a_ready_cgroup_with_its_limits_and_new_counters(pool, cgroup_layout):
    Sandbox.create(SPEC).destroy()  # the class's first create finds none and wakes the refill
    undertaker.flush()
    ready = pool.ready()
    assert len(ready) == 2
    with Sandbox(SPEC) as sb:
        name = _recorded(sb)
        assert name in ready and name.startswith(f"pool.{os.getpid()}.")
        assert name not in pool.ready()
        with open(f"/proc/{sb.init_pid}/cgroup") as f:
            assert f"/corral/{name}\n" in f.read()
        assert _limits(cgroup_layout, name) == {
            "memory": str(96 * MiB), "memsw": str(96 * MiB), "pids": "40", "quota": "50000",
            "freezer": "THAWED"}
        # what a cgroup made for it would say: nothing used before it, no OOM kill
        stats = cgroups.Cgroup(cgroup_layout, name).stats()
        assert stats["oom_kills"] == 0 and stats["cpu_throttled_periods"] == 0
        # its peak is its PID 1's own: the usage now, give or take the charges the kernel
        # takes and gives back in per-CPU batches (MEMCG_CHARGE_BATCH, 64 pages a CPU);
        # a cgroup used before would show its last user's peak (8 MB or more below)
        batches = 64 * os.sysconf("SC_PAGE_SIZE") * os.cpu_count()
        assert stats["memory_bytes"] <= stats["memory_peak_bytes"]
        assert stats["memory_peak_bytes"] <= stats["memory_bytes"] + batches
        assert sb.exec(["/bin/true"]).wait() == 0
    undertaker.flush()
    pool.settle()
    assert name in pool.ready() and pool.renewed == 1  # back, renewed for the next one
    assert (pool.hits, pool.misses) == (1, 1)


def _read(layout, name: str, controller: str, filename: str) -> str:
    with open(os.path.join(cgroups.Cgroup(layout, name).path(controller), filename)) as f:
        return f.read()


def test_a_used_cgroup_comes_back_renewed(pool, cgroup_layout):
    """Its next user finds the counters, limits and freezer state of a new cgroup: CPU time,
    throttling, peaks, fail counts and refused forks from zero, a weight a task changed
    back to the class's, thawed though its last sandbox was destroyed while paused."""
    Sandbox.create(SPEC).destroy()  # the class's first create wakes the refill
    undertaker.flush()
    with Sandbox(SPEC) as sb:
        name = _recorded(sb)
        burn = ("i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; "  # CPU under the quota
                "head -c 8000000 /dev/zero > /tmp/f; "  # memory: a peak of 8 MB or more
                "for j in $(seq 60); do sleep 5 & done; wait")  # forks past pids.max (40)
        sb.exec(["/bin/sh", "-c", burn]).wait()
        assert int(_read(cgroup_layout, name, "cpuacct", "cpuacct.usage")) > 0
        assert int(_read(cgroup_layout, name, "memory", "memory.max_usage_in_bytes")) > 8e6
        assert "max 0" not in _read(cgroup_layout, name, "pids", "pids.events")
        assert sb.set_cpu_weight(500)
        assert sb.pause()
        dirs = {c: os.stat(cgroups.Cgroup(cgroup_layout, name).path(c)).st_ino
                for c in ("cpu", "pids", "freezer", "memory")}
    undertaker.flush()
    pool.settle()
    assert name in pool.ready() and pool.renewed == 1
    assert _limits(cgroup_layout, name) == {
        "memory": str(96 * MiB), "memsw": str(96 * MiB), "pids": "40", "quota": "50000",
        "freezer": "THAWED"}
    assert _read(cgroup_layout, name, "cpu", "cpu.shares").strip() == "1024"
    assert _read(cgroup_layout, name, "cpuacct", "cpuacct.usage").strip() == "0"
    # new directories (cpu.stat and pids.events have no reset), the memory cgroup kept
    renewed = {c: os.stat(cgroups.Cgroup(cgroup_layout, name).path(c)).st_ino for c in dirs}
    assert [c for c in dirs if renewed[c] != dirs[c]] == ["cpu", "pids", "freezer"]
    assert "nr_throttled 0\nthrottled_time 0" in _read(cgroup_layout, name, "cpu", "cpu.stat")
    assert _read(cgroup_layout, name, "pids", "pids.events").strip() == "max 0"
    for counter in ("memory.failcnt", "memory.memsw.failcnt", "memory.kmem.failcnt"):
        assert _read(cgroup_layout, name, "memory", counter).strip() == "0"
    # what is left charged (caches of host files it looked up) is under the bound
    usage = int(_read(cgroup_layout, name, "memory", "memory.usage_in_bytes"))
    assert int(_read(cgroup_layout, name, "memory", "memory.max_usage_in_bytes")) <= 1 << 20
    assert usage <= cgroups.RENEW_RESIDUAL_BYTES
    taken = []
    for _ in range(2):  # the next creates take the renewed one or its neighbour
        with Sandbox(SPEC) as sb:
            taken.append(_recorded(sb))
            stats = cgroups.Cgroup(cgroup_layout, taken[-1]).stats()
            assert stats["oom_kills"] == 0 and stats["cpu_throttled_periods"] == 0
        undertaker.flush()
    assert name in taken


def test_a_cgroup_with_an_oom_kill_on_record_is_removed_not_renewed(pool, cgroup_layout):
    Sandbox.create(SPEC).destroy()
    undertaker.flush()
    with Sandbox(SPEC) as sb:
        name = _recorded(sb)
        proc = sb.exec(["/bin/sh", "-c", "head -c 400000000 /dev/zero | tail"])
        assert proc.wait() != 0
        assert cgroups.Cgroup(cgroup_layout, name).oom_kills() >= 1
    undertaker.flush()
    assert not cgroups.Cgroup(cgroup_layout, name).exists()
    assert name not in pool.ready() and pool.renewed == 0


def test_a_class_it_does_not_hold_is_made_on_demand_and_named_by_the_sandbox(pool):
    with Sandbox(SandboxSpec(memory_bytes=80 * MiB)) as sb:
        assert _recorded(sb) == sb.id


def test_disable_removes_the_ready_cgroups(cgroup_layout):
    pool = cgroup_pool.enable(3)
    try:
        Sandbox.create(SPEC).destroy()
        undertaker.flush()
        ready = pool.ready()
        assert len(ready) == 3
    finally:
        cgroup_pool.disable()
    assert cgroup_pool.current() is None
    assert not any(cgroups.Cgroup(cgroup_layout, n).exists() for n in ready)
    assert pool.take(cgroups.CgroupLimits()) is None  # a drained pool makes no more


def test_the_sweep_removes_a_gone_processs_idle_pool_and_keeps_a_live_sandboxs(cgroup_layout,
                                                                              tmp_path):
    """A process that dies without draining its pool leaves ready cgroups; the sweep of
    the next start removes them, but not a pooled cgroup a live sandbox of it runs in."""
    out = tmp_path / "left.json"
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, os, sys
        from corral.sandbox import Sandbox, SandboxSpec, cgroup_pool
        from corral.sandbox.undertaker import undertaker
        spec = SandboxSpec(memory_bytes={96 * MiB}, die_with_parent=False)
        pool = cgroup_pool.enable(2)
        Sandbox.create(spec).destroy()
        undertaker.flush()
        kept = Sandbox.create(spec)  # outlives this process (adoptable)
        undertaker.flush()
        with open(os.path.join(kept.runtime_dir, "state.json")) as f:
            left = {{"ready": pool.ready(), "kept": kept.id,
                    "kept_cgroup": json.load(f)["cgroup"], "pid": kept.init_pid}}
        with open({str(out)!r}, "w") as f:
            json.dump(left, f)
        os._exit(0)  # no drain, no destroy: a crash
    """)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # PID 1 keeps its stdio
       stderr=(tmp_path / "stderr").open("w"), timeout=60)
    assert child.returncode == 0, (tmp_path / "stderr").read_text()
    left = json.loads(out.read_text())
    assert left["ready"] and left["kept_cgroup"].startswith("pool.")
    try:
        assert all(cgroups.Cgroup(cgroup_layout, n).exists() for n in left["ready"])
        cgroup_pool.sweep(cgroup_layout)
        assert not any(cgroups.Cgroup(cgroup_layout, n).exists() for n in left["ready"])
        assert cgroups.Cgroup(cgroup_layout, left["kept_cgroup"]).pids()  # its sandbox runs
    finally:
        os.kill(left["pid"], 9)
        wait_until(lambda: not os.path.exists(f"/proc/{left['pid']}/stat")
                   or "Z" in open(f"/proc/{left['pid']}/stat").read().split(")")[1][:3], 5)
        # the sandbox's own sweep finds its pooled cgroup by its state.json
        wait_until(lambda: left["kept"] in sweep(), 5)
    assert not cgroups.Cgroup(cgroup_layout, left["kept_cgroup"]).exists()
    assert not os.path.exists(os.path.join(runtime_base(), left["kept"]))


def test_a_live_processs_pool_is_not_swept(pool, cgroup_layout):
    Sandbox.create(SPEC).destroy()
    undertaker.flush()
    ready = pool.ready()
    assert ready and cgroup_pool.sweep(cgroup_layout) == []
    assert pool.ready() == ready


def test_pool_size_is_bounded():
    with pytest.raises(ValueError, match=r"^a cgroup pool holds 1-64 per class, not 65$"):
        cgroup_pool.CgroupPool(cgroups.detect(), 65)


def test_two_destroys_at_once_give_a_pooled_cgroup_back_once(pool):
    """Two destroys of one sandbox at once: the second waits for the first's clean-up
    (base.destroy) instead of running one alongside it. Alongside, both closed the same
    descriptors (EBADF, or another thread's newly opened one) and both could give a
    pooled cgroup back: two later sandboxes in one cgroup, the first's destroy killing
    the second's processes."""
    import threading

    for _ in range(20):
        sb = Sandbox.create(SPEC)
        name = _recorded(sb)
        start = threading.Barrier(2)
        raised: list[BaseException] = []

        def destroy(sb=sb, start=start, raised=raised) -> None:
            start.wait()
            try:
                sb.destroy()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                raised.append(exc)

        threads = [threading.Thread(target=destroy) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert raised == [] and sb.state == "destroyed"  # the second waited, then saw it done
        undertaker.flush()
        pool.settle()
        ready = pool.ready()
        assert len(ready) == len(set(ready)), ready
        if name in ready:  # given back once: the next two sandboxes get two cgroups
            a, b = Sandbox.create(SPEC), Sandbox.create(SPEC)
            try:
                assert _recorded(a) != _recorded(b)
            finally:
                a.destroy()
                b.destroy()
            undertaker.flush()
            pool.settle()
