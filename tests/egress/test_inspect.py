"""`sandbox/effective.py`: the live policy of a sandbox, and loud mismatches when the kernel
state no longer matches the spec (here changed behind Corral's back, from the host)."""

from __future__ import annotations

import os
import socket

from corral.sandbox import Sandbox, SandboxSpec, cgroups, net
from corral.sandbox import effective as live

MiB = 1 << 20


def test_a_fresh_sandbox_matches_its_spec(internet):
    spec = SandboxSpec(allow_net=("allowed.test",), memory_bytes=128 * MiB, pids_max=64,
                       cpus=0.5)
    with Sandbox.create(spec) as sb:
        proc = sb.exec(["sleep", "30"])
        try:
            rep = live.report(sb, spec)
            problems = live.mismatches(rep, spec)
        finally:
            proc.kill()
            proc.communicate()
    assert problems == []
    names = sorted(p["name"] for p in rep["processes"])
    assert names == ["corral-init", "sleep"]
    for p in rep["processes"]:
        assert not any(ns["shared_with_host"] for ns in p["namespaces"].values())
        assert (p["seccomp_mode"], p["no_new_privs"], int(p["cap_eff"], 16)) == (2, True, 0)
        assert p["seccomp_filters"] >= 1
        assert p["uid_map"] == ["0", str(sb.spec.uid_base), "65536"]  # its own range
    limits = rep["cgroup_limits"]
    assert int(limits.get("memory.limit_in_bytes") or limits["memory.max"]) == 128 * MiB
    assert limits["pids.max"] == "64"
    links = {link["name"]: link for link in rep["network"]["links"]}
    assert links["eth0"]["addresses"] == ["100.127.255.2/30"]
    assert {"dst": "default", "gateway": "100.127.255.1", "dev": "eth0"} in rep[
        "network"]["routes"]
    assert rep["landlock"]["new_commands"] == (
        "restricted (a write only landlock forbids got EACCES)")
    table = live.format_table(rep, problems)
    assert "matches the spec" in table and "MISMATCH" not in table


def test_commands_without_landlock_are_caught_by_the_probe():
    """Simulate an exec path that lost its landlock step: the probe's write succeeds."""
    import dataclasses

    from corral.sandbox import landlock

    spec = SandboxSpec(memory_bytes=128 * MiB)
    with Sandbox.create(spec) as sb:
        if sb._prepared.landlock.abi == 0:
            raise AssertionError("this kernel has no landlock; the probe cannot be tested")
        sb._prepared = dataclasses.replace(sb._prepared, landlock=landlock.LandlockPlan(0, 0, ()))
        problems = live.mismatches(live.report(sb, spec), spec)
    assert problems == ["landlock: new commands are NOT restricted: a write only landlock "
                        "forbids succeeded"]


def test_changes_behind_corrals_back_are_flagged(internet):
    spec = SandboxSpec(allow_net=("allowed.test",), memory_bytes=128 * MiB)
    with Sandbox.create(spec) as sb:
        layout = cgroups.detect()
        cg = cgroups.Cgroup(layout, sb.id)
        memory_file = next(
            os.path.join(os.path.dirname(p), name) for p in cg.procs_files
            for name in ("memory.limit_in_bytes", "memory.max")
            if os.path.exists(os.path.join(os.path.dirname(p), name)))
        with open(memory_file, "w") as f:
            f.write(str(96 * MiB))  # (v1: above memsw.limit_in_bytes is refused)

        def drop_default_route():
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.route("del", dst="0.0.0.0/0", gateway="100.127.255.1")

        fd = os.open(f"/proc/{sb.init_pid}/ns/net", os.O_RDONLY)
        try:
            net.in_netns(fd, drop_default_route)
        finally:
            os.close(fd)
        rep = live.report(sb, spec)
        problems = live.mismatches(rep, spec)
    assert problems == [
        f"cgroup memory limit is {96 * MiB}, spec says {128 * MiB}",
        "network: the default route does not lead to the egress proxy",
    ]
    table = live.format_table(rep, problems)
    assert "!!! 2 MISMATCH(ES) WITH THE SPEC !!!" in table


def test_a_link_in_a_sandbox_without_egress_is_flagged():
    spec = SandboxSpec(memory_bytes=128 * MiB)
    with Sandbox.create(spec) as sb:
        def add_dummy():
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("add", ifname="sneaky0", kind="veth", peer={"ifname": "sneaky1"})

        fd = os.open(f"/proc/{sb.init_pid}/ns/net", os.O_RDONLY)
        try:
            net.in_netns(fd, add_dummy)
        finally:
            os.close(fd)
        problems = live.mismatches(live.report(sb, spec), spec)
    assert problems == [
        "network: spec allows no egress, but links ['lo', 'sneaky0', 'sneaky1'] exist"]
    assert "sneaky0" not in {name for _, name in socket.if_nameindex()}
